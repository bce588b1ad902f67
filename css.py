"""CSS: Channel Self-Supervision for Online Knowledge Distillation (two networks, no teacher).

Paper: S. Fan, X. Cheng, X. Wang, C. Yang, P. Deng, M. Liu, J. Deng, M. Liu, "Channel
Self-Supervision for Online Knowledge Distillation", arXiv 2203.11660 (2022),
https://arxiv.org/abs/2203.11660. Code: PumpkinsLemon/CSS@7b5c928 `resnet_css.py`, `train.py`
(spec: specs/css.md; only the paper's abstract is available, everything else follows the code).

Two multi-branch networks (default css_resnet110 and css_resnet56: a shared stem + layer1 +
layer2, then 3 branches with their own layer3 and classifier) are trained together from scratch.
Each branch sees the shared feature map with a different corner zeroed (the "feature-level
transformation", at training and at test time) and is trained on an augmented label: class y seen
by branch i is joint label y*3 + i of a 300-way head, so branches get different inputs and
different targets. The networks distil into each other branch by branch (branch i of one network
learns the 300-way softened distribution of branch i of the other, T = 3), each KD term weighted
by the ratio of the two networks' cross-entropies, so the network that is currently worse learns
more from its partner. A network predicts class c by averaging, over its branches, branch i's
logit for joint label c*3 + i. Compared with kd.py: no pre-trained teacher, two networks and two
optimizers, per-branch masks and joint labels, a warm-up, and three test accuracies (each network
and their ensemble).
"""

import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

import common


@dataclass
class Args:
    dataset: Literal["cifar100", "cifar10"] = "cifar100"
    """dataset to train on"""
    data_dir: str = "data"
    """folder holding cifar-100-python/ or cifar-10-batches-py/ (downloaded there when missing)"""
    model_t: str = "css_resnet110"
    """first network, net1 (the larger of the paper's pair; it learns too): css_resnet56/110/wide_resnet20_8"""
    model_s: str = "css_resnet56"
    """second network, net2: its accuracy is the primary test/top1"""
    epochs: int = 300
    """number of training epochs"""
    batch_size: int = 128
    """training batch size"""
    learning_rate: float = 0.1
    """initial lr of both networks (reached at the end of the warm-up)"""
    lr_milestones: Tuple[int, ...] = (149, 224)
    """0-based epochs at which the lr is multiplied by --lr-gamma (train.py decays at 1-based 150, 225)"""
    lr_gamma: float = 0.1
    """lr decay factor at each milestone"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = False
    """Nesterov momentum (CSS train.py: off)"""
    weight_decay: float = 5e-4
    """SGD weight decay, on all parameters"""
    seed: int = 1
    """seed of python, numpy, torch and of the data order and augmentation"""
    torch_deterministic: bool = True
    """deterministic algorithms (cuDNN deterministic, no benchmark autotuning)"""
    amp: bool = False
    """bf16 autocast + channels_last (CUDA, or CPUs with AVX512-BF16/AMX)"""
    resume: bool = False
    """continue the run in <output-dir>/<run-name> from its last finished epoch"""
    resume_with_changes: bool = False
    """with --resume, accept arguments that differ from the interrupted run's (recorded in resumes.jsonl)"""
    output_dir: str = "runs"
    """parent folder of the run folder (metrics.jsonl, last.pth, best.pth, summary.json)"""
    run_name: Optional[str] = None
    """run folder name; unset means css_<model-t>_<model-s>_<dataset>_seed<seed>"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; unset means cuda when available"""
    normalize: Optional[Literal["repdistiller", "sskd", "cifar10"]] = None
    """normalisation constants; unset means CIFAR-10's statistics on cifar10 and the method's recipe
    constants on cifar100 (docs/<method>.md)"""
    train_subset: Optional[int] = None
    """train on the first N training images only (quick runs)"""
    eval_batch_size: int = 128
    """test-time batch size (no effect on accuracy)"""
    tensorboard: bool = False
    """also log to TensorBoard in the run folder (needs the tensorboard package)"""
    track: bool = False
    """also log to Weights & Biases (needs the wandb package)"""
    wandb_project: str = "sskd-reference"
    """W&B project name, with --track"""
    # CSS (specs/css.md sections 3-7)
    warmup_epochs: int = 5
    """linear per-epoch warm-up: 0-based epoch e < W uses lr * (e + 1) / W"""
    branches: int = 3
    """branches per network (n_b); joint label space num_classes * n_b"""
    kd_T: float = 3.0
    """softmax temperature T of the branch-to-branch KD terms"""
    detach_kd_target: bool = False
    """true stops the gradient through each KD term's target (the partner's branches); false, the official
    train.py, lets both KD terms train both networks"""
    detach_ratio: bool = False
    """true makes the CE-ratio weights alpha1, alpha2 constants; false, the official train.py, passes their
    gradient to both networks' CEs"""
    mask: Literal["corners", "none"] = "corners"
    """[INTERP] feature-level transformation: corner masks per branch, or none (ablation)"""
    literal_mask3: bool = False
    """[INTERP] branch 3 (only with --branches >= 4) zeroes one column, the code's bug, not the top-right block"""
    log_diversity: bool = False
    """[INTERP] log OKDDip's branch diversity on the test set every epoch"""
    log_branch_top1: bool = True
    """[INTERP] also log each branch's test top-1 on its own slot (a diagnostic; no effect on training)"""
    distill: bool = True
    """false drops both KD terms: each network trains alone on its joint-label CE (css.md section 8 baseline)"""


def branch_mask(branch, height, width, literal_mask3=False):
    """CSS's feature-level transformation for one branch: a [H, W] map of ones with one s x s
    corner zeroed, s = H // 4 (resnet_css.py `transform`). Branch 0 loses the top-left corner,
    1 the bottom-right, 2 the bottom-left, 3 the top-right; branches 4 and on are unmasked."""
    size = height // 4
    mask = torch.ones(height, width)
    if branch == 0:
        mask[:size, :size] = 0
    elif branch == 1:
        mask[height - size :, width - size :] = 0
    elif branch == 2:
        mask[height - size :, :size] = 0
    elif branch == 3 and literal_mask3:
        mask[:size, width - size] = 0  # the code indexes one column here, not a block
    elif branch == 3:
        mask[:size, width - size :] = 0
    return mask


def branch_masks(kind, branches, height, width, literal_mask3=False):
    """All branches' masks [n_b, H, W] (multiplied into the layer2 map, shared by every channel),
    or None for --mask none."""
    if kind == "none":
        return None
    return torch.stack([branch_mask(i, height, width, literal_mask3) for i in range(branches)])


def branch_joint_labels(labels, branches):
    """Augmented labels: branch i learns y * n_b + i (class-major joint space). [N] -> [N, n_b]."""
    return labels[:, None] * branches + torch.arange(branches, device=labels.device)


def branch_ce_loss(branch_logits, labels):
    """CE_n = (1/n_b) sum_i CE(z_i, y * n_b + i), each CE a batch mean. branch_logits [N, C*n_b, n_b]
    (cross_entropy's K-dim form averages over all N * n_b (row, branch) pairs: the same thing)."""
    return F.cross_entropy(branch_logits, branch_joint_labels(labels, branch_logits.shape[2]))


def branch_kd_loss(learner_logits, target_logits, temperature):
    """T^2 * (1/n_b) sum_i KL(softmax(target_i / T) || softmax(learner_i / T)) over the full
    C*n_b-way distribution of same-numbered branches, batchmean. Inputs [N, C*n_b, n_b].
    The target is used as given: detaching it is the caller's choice (--detach-kd-target)."""
    log_learner = F.log_softmax(learner_logits / temperature, dim=1)
    target_probs = F.softmax(target_logits / temperature, dim=1)
    rows, _, branches = learner_logits.shape
    return F.kl_div(log_learner, target_probs, reduction="sum") / (rows * branches) * temperature**2


def css_loss(logits_t, logits_s, labels, temperature, detach_kd_target=False, detach_ratio=False):
    """L = [CE_t + alpha1 * KD_(t<-s)] + [CE_s + alpha2 * KD_(s<-t)], alpha1 = CE_t / CE_s,
    alpha2 = CE_s / CE_t (docs/css.md, implementation details 4-5): the network with the higher CE
    learns more from its partner. By default nothing is detached, as in the official train.py: the
    targets and the ratios are differentiated too. Returns (total, dict of the terms)."""
    ce_t, ce_s = branch_ce_loss(logits_t, labels), branch_ce_loss(logits_s, labels)
    target_t = logits_t.detach() if detach_kd_target else logits_t
    target_s = logits_s.detach() if detach_kd_target else logits_s
    kd_t_from_s = branch_kd_loss(logits_t, target_s, temperature)
    kd_s_from_t = branch_kd_loss(logits_s, target_t, temperature)
    ratio_t, ratio_s = (ce_t.detach(), ce_s.detach()) if detach_ratio else (ce_t, ce_s)
    alpha1, alpha2 = ratio_t / ratio_s, ratio_s / ratio_t
    total = (ce_t + alpha1 * kd_t_from_s) + (ce_s + alpha2 * kd_s_from_t)
    return total, {
        "ce_t": ce_t,
        "ce_s": ce_s,
        "kd_t_from_s": kd_t_from_s,
        "kd_s_from_t": kd_s_from_t,
        "alpha1": alpha1,
        "alpha2": alpha2,
    }


def own_slot_logits(branch_logits):
    """Branch i's C logits of its own transformation slot: [N, C*n_b, n_b] -> [N, C, n_b] with
    [n, c, i] = z_i[n, c * n_b + i]."""
    rows, joint, branches = branch_logits.shape
    by_slot = branch_logits.reshape(rows, joint // branches, branches, branches)  # [N, C, slot, branch]
    return by_slot.diagonal(dim1=2, dim2=3)


def aggregate_branches(branch_logits):
    """A network's prediction (train.py): agg[c] = (1/n_b) sum_i z_i[c * n_b + i]. -> [N, C]."""
    return own_slot_logits(branch_logits).mean(dim=2)


def branch_diversity(logits_t, logits_s):
    """OKDDip's diversity per image (css.md section 6): softmax over each of the 2 n_b branches'
    joint logits, then the mean L2 distance over all branch pairs of both networks, and over the
    n_b same-numbered (net1 branch i, net2 branch i) pairs. Returns two [N] tensors."""
    branches = logits_t.shape[2]
    probs = F.softmax(torch.cat([logits_t, logits_s], dim=2), dim=1).transpose(1, 2)  # [N, 2n_b, C*n_b]
    distances = torch.cdist(probs, probs)  # [N, 2n_b, 2n_b]
    all_pairs = distances.triu(1).sum(dim=(1, 2)) / (branches * (2 * branches - 1))
    same_numbered = distances.diagonal(offset=branches, dim1=1, dim2=2).mean(dim=1)
    return all_pairs, same_numbered


@torch.no_grad()
def evaluate_css(net_t, net_s, masks, data, batch_size, amp, with_branches=True, with_diversity=False):
    """One pass over the test set, eval mode, masks on (as train.py tests): top-1/top-5 (%) of
    net1 (--model-t), net2 (--model-s) and their ensemble (mean of the aggregated logits), top-1
    of every branch on its own slot, and optionally the diversity (mean per image)."""
    net_t.eval()
    net_s.eval()
    device = data.test_labels.device
    meter = common.Meter()
    for start in range(0, len(data.test_labels), batch_size):
        images = data.normalize(data.test_images[start : start + batch_size])
        labels = data.test_labels[start : start + batch_size]
        with common.autocast(device, amp):
            logits_t, logits_s = net_t(images, masks).float(), net_s(images, masks).float()
        aggregated_t, aggregated_s = aggregate_branches(logits_t), aggregate_branches(logits_s)
        for name, scores in (
            ("net1", aggregated_t),
            ("net2", aggregated_s),
            ("ensemble", (aggregated_t + aggregated_s) / 2),
        ):
            top = scores.topk(min(5, data.num_classes), dim=1).indices
            meter.add_sum(f"{name}_top1", 100.0 * (top[:, 0] == labels).sum(), len(labels))
            meter.add_sum(f"{name}_top5", 100.0 * (top == labels[:, None]).any(dim=1).sum(), len(labels))
        for name, logits in (("net1", logits_t), ("net2", logits_s)) if with_branches else ():
            for i, slot_scores in enumerate(own_slot_logits(logits).unbind(dim=2)):
                meter.add_sum(f"{name}_branch{i}_top1", 100.0 * common.accuracy_count(slot_scores, labels), len(labels))
        if with_diversity:
            all_pairs, same_numbered = branch_diversity(logits_t, logits_s)
            meter.add_sum("diversity", all_pairs.sum(), len(labels))
            meter.add_sum("diversity_paired", same_numbered.sum(), len(labels))
    return meter.averages()


NO_BEST = {"top1": 0.0, "top5": 0.0, "epoch": -1}


if __name__ == "__main__":
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "cifar10")
    common.print_config(args, "css")
    if args.branches < 1 or args.warmup_epochs < 0:
        raise common.ConfigError("--branches must be at least 1 and --warmup-epochs at least 0")
    for arch in (args.model_t, args.model_s):  # a wrong name stops here, before any data or run folder
        if arch not in common.CSS_RESNETS:
            common.build_css_resnet(arch, 10)  # raises the message that names the CSS networks
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device)
    data = common.load_data(args, device)
    run_dir = common.prepare_run_dir(args, f"css_{args.model_t}_{args.model_s}_{args.dataset}_seed{args.seed}")

    # --- METHOD: two multi-branch networks from scratch, one SGD optimizer each; per-branch masks ---
    net_t, net_s = (
        common.prepare_model(common.build_css_resnet(arch, data.num_classes, args.branches), device, args.amp)
        for arch in (args.model_t, args.model_s)
    )
    for name, net in (("net1", net_t), ("net2", net_s)):
        print(f"{name}: {net.arch}, {args.branches} branches, {sum(p.numel() for p in net.parameters()):,} parameters")
    feature_size = data.train_images.shape[2] // 2  # the masked map is layer2's output: 16x16 on CIFAR
    masks = branch_masks(args.mask, args.branches, feature_size, feature_size, args.literal_mask3)
    masks = masks.to(device) if masks is not None else None
    optimizer_t = common.make_sgd(net_t.parameters(), args.learning_rate, args)
    optimizer_s = common.make_sgd(net_s.parameters(), args.learning_rate, args)
    # last.pth keeps net2 in the standard slots and net1 beside it, so it also loads as a net2 checkpoint.
    start_epoch, best, checkpoint = common.resume_state(run_dir, net_s, optimizer_s, args.resume, args)
    best_net1, best_ensemble = dict(NO_BEST), dict(NO_BEST)
    if checkpoint is not None:
        common.load_weights(
            net_t, {"model": checkpoint["net1_model"], "arch": checkpoint["net1_arch"]}, str(run_dir / "last.pth")
        )
        optimizer_t.load_state_dict(checkpoint["net1_optimizer"])
        best_net1, best_ensemble = checkpoint["best_net1"], checkpoint["best_ensemble"]
    # --- END METHOD ---
    logger = common.Logger(run_dir, args, start_epoch)

    result = None
    for epoch in range(start_epoch, args.epochs):
        lr = common.lr_with_warmup(epoch, args.learning_rate, args.lr_milestones, args.lr_gamma, args.warmup_epochs)
        common.set_lr(optimizer_t, lr)
        common.set_lr(optimizer_s, lr)
        net_t.train()
        net_s.train()
        meter, images_seen, epoch_start = common.Meter(), 0, time.time()
        for images, labels, _ in common.train_batches(data, args.batch_size, common.epoch_generator(args.seed, epoch)):
            # --- METHOD: CSS, joint-label CE per branch + CE-ratio-weighted branch-to-branch KD ---
            with common.autocast(device, args.amp):
                logits_t = net_t(images, masks).float()  # [B, C*n_b, n_b]
                logits_s = net_s(images, masks).float()
            loss, terms = css_loss(logits_t, logits_s, labels, args.kd_T, args.detach_kd_target, args.detach_ratio)
            if not args.distill:  # the CE-only baseline: the two networks no longer interact
                loss = terms["ce_t"] + terms["ce_s"]
            for name in ("ce_t", "ce_s", "kd_t_from_s", "kd_s_from_t"):
                meter.add(f"loss/{name}", terms[name], len(labels))
            meter.add("weight/alpha1", terms["alpha1"], len(labels))
            meter.add("weight/alpha2", terms["alpha2"], len(labels))
            meter.add("loss/total", loss, len(labels))
            optimizer_t.zero_grad(set_to_none=True)
            optimizer_s.zero_grad(set_to_none=True)
            loss.backward()  # one backward pass reaches both networks
            optimizer_t.step()
            optimizer_s.step()
            meter.add("loss/ce", terms["ce_t"] + terms["ce_s"], len(labels))
            correct_t = common.accuracy_count(aggregate_branches(logits_t), labels)
            correct_s = common.accuracy_count(aggregate_branches(logits_s), labels)
            meter.add_sum("train/top1", 100.0 * correct_s, len(labels))
            meter.add_sum("train/net1_top1", 100.0 * correct_t, len(labels))
            # --- END METHOD ---
            images_seen += len(labels)

        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir)
        images_per_s = images_seen / (time.time() - epoch_start)
        # --- METHOD: three test accuracies (net1, net2 = primary, ensemble), each with its best epoch ---
        result = evaluate_css(
            net_t, net_s, masks, data, args.eval_batch_size, args.amp, args.log_branch_top1, args.log_diversity
        )
        if result["net2_top1"] > best["top1"]:
            best = {"top1": result["net2_top1"], "top5": result["net2_top5"], "epoch": epoch}
            common.save_checkpoint(run_dir / "best.pth", common.model_payload(net_s, epoch + 1, best, args))
        if result["net1_top1"] > best_net1["top1"]:
            best_net1 = {"top1": result["net1_top1"], "top5": result["net1_top5"], "epoch": epoch}
            common.save_checkpoint(run_dir / "best_net1.pth", common.model_payload(net_t, epoch + 1, best_net1, args))
        if result["ensemble_top1"] > best_ensemble["top1"]:
            best_ensemble = {"top1": result["ensemble_top1"], "top5": result["ensemble_top5"], "epoch": epoch}
        metrics.update(
            {
                "lr": lr,
                "test/top1": result["net2_top1"],
                "test/top5": result["net2_top5"],
                "test/best_top1": best["top1"],
                **{f"test/{name}": value for name, value in result.items()},
                "test/net1_best_top1": best_net1["top1"],
                "test/ensemble_best_top1": best_ensemble["top1"],
                "speed/images_per_s": images_per_s,
            }
        )
        logger.log(epoch, metrics)
        common.save_checkpoint(
            run_dir / "last.pth",
            common.training_state(
                net_s,
                optimizer_s,
                epoch + 1,
                best,
                args,
                net1_model=net_t.state_dict(),
                net1_arch=net_t.arch,
                net1_optimizer=optimizer_t.state_dict(),
                best_net1=best_net1,
                best_ensemble=best_ensemble,
            ),
        )
        # --- END METHOD ---
        common.print_epoch(epoch, args.epochs, metrics, (time.time() - epoch_start) * (args.epochs - epoch - 1))

    # The last epoch's evaluation is the last-epoch result (eval mode is deterministic); a resumed
    # run that had nothing left to train evaluates once.
    last = (
        result
        if result is not None
        else evaluate_css(
            net_t, net_s, masks, data, args.eval_batch_size, args.amp, args.log_branch_top1, args.log_diversity
        )
    )
    extra = {"primary": f"net2 ({args.model_s})", "net1_arch": args.model_t, "net2_arch": args.model_s}
    for name, best_of in (("net1", best_net1), ("net2", best), ("ensemble", best_ensemble)):
        extra.update(
            {
                f"{name}_last_top1": last[f"{name}_top1"],
                f"{name}_last_top5": last[f"{name}_top5"],
                f"{name}_best_top1": best_of["top1"],
                f"{name}_best_epoch": best_of["epoch"] + 1,
            }
        )
        print(
            f"{name}: last-epoch top1 {last[f'{name}_top1']:.2f}, best-epoch top1 {best_of['top1']:.2f} "
            f"at epoch {best_of['epoch'] + 1}",
            flush=True,
        )
    extra["last_branch_top1"] = {name: value for name, value in last.items() if "_branch" in name}
    extra.update({f"last_{name}": value for name, value in last.items() if name.startswith("diversity")})
    common.write_summary(run_dir, args, best, {"top1": last["net2_top1"], "top5": last["net2_top5"]}, "css", **extra)
