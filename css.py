"""CSS: Channel Self-Supervision for Online Knowledge Distillation (two networks, no teacher).

Paper: S. Fan, X. Cheng, X. Wang, C. Yang, P. Deng, M. Liu, J. Deng, M. Liu, arXiv 2203.11660
(2022), https://arxiv.org/abs/2203.11660. Code followed: PumpkinsLemon/CSS@7b5c928
`resnet_css.py`, `train.py` (docs/css.md).

Two multi-branch networks (shared stem, layer1 and layer2; 3 branches, each with its own layer3
and classifier) train together from scratch. Each branch sees the shared map with another corner
zeroed, also at test time, and learns a joint label: class y seen by branch i is y*3 + i of a
300-way head. Branch i of each network learns its partner's branch i's softened distribution
(T = 3), each KD term weighted by the ratio of the networks' CEs: the worse network learns more.
A network predicts class c by averaging branch i's logit for c*3 + i. Compared with kd.py: no
teacher, two networks and optimizers, masks, joint labels, a warm-up, three test accuracies.

Run: python css.py --model-t css_resnet110 --model-s css_resnet56
"""

import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD_NAME = "css"  # in run folder names, the config line and summary.json


@dataclass
class Args:
    # Run
    dataset: Literal["cifar100", "cifar10"] = "cifar100"
    """dataset to train on"""
    data_dir: str = "data"
    """folder holding the dataset (CIFAR is downloaded into it if missing; layouts: README.md, Data)"""
    seed: int = 1
    """seed of python, numpy, torch and of the data order and augmentation"""
    torch_deterministic: bool = True
    """deterministic algorithms (cuDNN deterministic, no benchmark autotuning)"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; unset means cuda when available"""
    sync_bn: bool = False
    """torchrun: batch norm over the global batch (default: per rank)"""
    amp: bool = False
    """bf16 autocast + channels_last (CUDA, or CPUs with AVX512-BF16/AMX)"""
    output_dir: str = "runs"
    """parent folder of the run folder (metrics.jsonl, last.pth, best.pth, summary.json)"""
    run_name: Optional[str] = None
    """run folder name; unset means <method>_<networks>_<dataset>_seed<seed>"""
    resume: bool = False
    """continue the run in <output-dir>/<run-name> from its last finished epoch"""
    resume_with_changes: bool = False
    """with --resume, accept arguments that differ from the interrupted run's (resumes.jsonl)"""
    train_subset: Optional[int] = None
    """train on the first N training images only (quick runs)"""
    test_subset: Optional[int] = None
    """evaluate on N test images, a fixed sample (quick runs; never a published-protocol number)"""
    eval_batch_size: int = 128
    """test-time batch size (no effect on accuracy)"""
    tensorboard: bool = False
    """also log to TensorBoard in the run folder (needs the tensorboard package)"""
    track: bool = False
    """also log to Weights & Biases (needs the wandb package)"""
    wandb_project: str = "sskd-reference"
    """W&B project name, with --track"""
    # Recipe
    model_t: str = "css_resnet110"
    """first network, net1 (the larger; it learns too): css_resnet56/110/wide_resnet20_8"""
    model_s: str = "css_resnet56"
    """second network, net2: its accuracy is test/top1"""
    epochs: int = 300
    """number of training epochs"""
    batch_size: int = 128
    """training batch size"""
    learning_rate: Optional[float] = None
    """initial lr; unset means the recipe's value for the architecture (docs/<method>.md)"""
    lr_milestones: Tuple[int, ...] = (149, 224)
    """0-based epochs at which the lr is multiplied by --lr-gamma"""
    lr_gamma: float = 0.1
    """lr decay factor at each milestone"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = False
    """Nesterov momentum"""
    weight_decay: float = 5e-4
    """SGD weight decay, on every trained parameter"""
    normalize: Optional[common.NormalizeName] = None
    """normalisation constants; unset: CIFAR-10's on cifar10, the recipe's on cifar100, else ImageNet's"""
    # CSS
    kd_T: float = 3.0
    """softmax temperature T of the distillation KL"""
    warmup_epochs: int = 5
    """linear per-epoch warm-up: 0-based epoch e < W uses lr * (e + 1) / W"""
    branches: int = 3
    """branches per network (n_b); joint label space num_classes * n_b"""
    detach_kd_target: bool = False
    """stop the gradient through each KD target; false (train.py): KD trains both networks"""
    detach_ratio: bool = False
    """CE-ratio weights alpha1, alpha2 as constants; false (train.py): they pass gradients"""
    mask: Literal["corners", "none"] = "corners"
    """[INTERP] feature-level transformation: corner masks per branch, or none (ablation)"""
    literal_mask3: bool = False
    """[INTERP] branch 3 (--branches >= 4) zeroes one column (the code's bug), not a block"""
    log_diversity: bool = False
    """[INTERP] log OKDDip's branch diversity on the test set every epoch"""
    log_branch_top1: bool = True
    """[INTERP] also log each branch's own-slot test top-1 (a diagnostic)"""
    distill: bool = True
    """false drops both KD terms: each network trains alone (the CE baseline)"""


class CssBottleneck(nn.Module):
    """torchvision's Bottleneck as resnet_css.py uses it: expansion 4, stride in the 3x3."""

    expansion, width_factor = 4, 1  # inner width = planes * width_factor

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        width, out_planes = planes * self.width_factor, planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(in_planes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes)
        self.downsample = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            projection = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
            self.downsample = nn.Sequential(projection, nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class CssWideBottleneck(CssBottleneck):
    width_factor = 8  # resnet_css.py wide_resnet20_8: width_per_group 64 * 8


class CssMultiBranchResNet(nn.Module):
    """resnet_css.py's multi-branch ResNet (depth 9n + 2): stem, layer1, layer2 shared; per branch i
    its `layer3_i` and `classifier3_i` Linear(256, C * n_b). forward(x, branch_masks) -> [N, C*n_b, n_b]:
    column i = branch i's logits; its layer3 sees the layer2 map times branch_masks[i] (or all)."""

    def __init__(self, blocks_per_stage, num_classes, branches=3, block=CssBottleneck):
        super().__init__()
        self.branches = branches
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.layer1 = common.residual_stage(block, 16, 16, blocks_per_stage, 1)
        self.layer2 = common.residual_stage(block, 64, 32, blocks_per_stage, 2)
        for i in range(branches):  # registration order = resnet_css.py's key order
            self.add_module(f"layer3_{i}", common.residual_stage(block, 128, 64, blocks_per_stage, 2))
            self.add_module(f"classifier3_{i}", nn.Linear(256, num_classes * branches))
        self.feat_dim = 256
        common.he_init_convs(self)  # BN 1/0 and Linear keep the PyTorch defaults

    def forward(self, x, branch_masks=None):
        shared = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))  # [N, 128, 16, 16]
        if branch_masks is not None and branch_masks.shape[-2:] != shared.shape[-2:]:
            raise ValueError(f"{tuple(branch_masks.shape)} masks for a {tuple(shared.shape)} map")
        outputs = []
        for i in range(self.branches):
            branch_input = shared if branch_masks is None else shared * branch_masks[i].to(shared.dtype)
            features = getattr(self, f"layer3_{i}")(branch_input)  # [N, 256, 8, 8]
            outputs.append(getattr(self, f"classifier3_{i}")(torch.flatten(F.avg_pool2d(features, 8), 1)))
        return torch.stack(outputs, dim=2)


# resnet_css.py's resnet56, resnet110 and wide_resnet20_8: (blocks per stage, block)
CSS_RESNETS = {"css_resnet56": (6, CssBottleneck), "css_resnet110": (12, CssBottleneck)}
CSS_RESNETS["css_wide_resnet20_8"] = (2, CssWideBottleneck)
DIVERGENCE_HINT = "CSS's official step diverges at small scale (docs/css.md): try --detach-kd-target true."
CSS_KIND = "CSS multi-branch network; the zoo's resnet56/110 are single-branch"


def build_css_resnet(name, num_classes, branches=3):
    """A CSS multi-branch network by name, any number of branches."""
    common.check_architectures(name, valid=tuple(CSS_RESNETS), kind=CSS_KIND)
    model = CssMultiBranchResNet(CSS_RESNETS[name][0], num_classes, branches, CSS_RESNETS[name][1])
    model.arch, model.num_classes = name, num_classes
    return model


def branch_mask(branch, height, width, literal_mask3=False):
    """CSS's feature-level transformation (resnet_css.py `transform`): [H, W] ones, one s x s corner
    zeroed, s = H // 4: branch 0 top-left, 1 bottom-right, 2 bottom-left, 3 top-right; 4+ unmasked."""
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


def branch_masks(kind, branches, height, width, literal_mask3=False, device="cpu"):
    """All branches' masks [n_b, H, W] (times the layer2 map), or None for --mask none."""
    if kind == "none":
        return None
    return torch.stack([branch_mask(i, height, width, literal_mask3) for i in range(branches)]).to(device)


def branch_joint_labels(labels, branches):
    """Augmented labels: branch i learns y * n_b + i (class-major). [N] -> [N, n_b]."""
    return labels[:, None] * branches + torch.arange(branches, device=labels.device)


def branch_ce_loss(branch_logits, labels):
    """CE_n = (1/n_b) sum_i CE(z_i, y * n_b + i), batch means; [N, C*n_b, n_b]."""
    return F.cross_entropy(branch_logits, branch_joint_labels(labels, branch_logits.shape[2]))


def branch_kd_loss(learner_logits, target_logits, temperature):
    """T^2 * (1/n_b) sum_i KL(softmax(target_i / T) || softmax(learner_i / T)), batchmean, over the
    C*n_b-way distributions of same-numbered branches [N, C*n_b, n_b]; the target is used as given,
    as a log-softmax: a target probability of exactly 0 adds 0 and a zero gradient, as in CSS's
    torch 1.0.1, not NaN."""
    log_learner = F.log_softmax(learner_logits / temperature, dim=1)
    log_target = F.log_softmax(target_logits / temperature, dim=1)
    rows, _, branches = learner_logits.shape
    kl = F.kl_div(log_learner, log_target, reduction="sum", log_target=True)
    return kl / (rows * branches) * temperature**2


def css_loss(logits_t, logits_s, labels, temperature, detach_kd_target=False, detach_ratio=False):
    """train.py: L = [CE_t + alpha1 * KD_(t<-s)] + [CE_s + alpha2 * KD_(s<-t)], alpha1 = CE_t / CE_s =
    1 / alpha2; by default, as there, targets and ratios get gradients too. Returns (total, terms)."""
    ce_t, ce_s = branch_ce_loss(logits_t, labels), branch_ce_loss(logits_s, labels)
    target_t = logits_t.detach() if detach_kd_target else logits_t
    target_s = logits_s.detach() if detach_kd_target else logits_s
    kd_t_from_s = branch_kd_loss(logits_t, target_s, temperature)
    kd_s_from_t = branch_kd_loss(logits_s, target_t, temperature)
    ratio_t, ratio_s = (ce_t.detach(), ce_s.detach()) if detach_ratio else (ce_t, ce_s)
    alpha1, alpha2 = ratio_t / ratio_s, ratio_s / ratio_t
    total = (ce_t + alpha1 * kd_t_from_s) + (ce_s + alpha2 * kd_s_from_t)
    terms = {"ce_t": ce_t, "ce_s": ce_s, "kd_t_from_s": kd_t_from_s, "kd_s_from_t": kd_s_from_t}
    return total, terms | {"alpha1": alpha1, "alpha2": alpha2}


def own_slot_logits(branch_logits):
    """Branch i's own-slot logits: [N, C*n_b, n_b] -> [N, C, n_b], [n, c, i] = z_i[n, c*n_b+i]."""
    rows, joint, branches = branch_logits.shape
    by_slot = branch_logits.reshape(rows, joint // branches, branches, branches)  # [N, C, slot, i]
    return by_slot.diagonal(dim1=2, dim2=3)


def aggregate_branches(branch_logits):
    """A network's prediction (train.py): agg[c] = (1/n_b) sum_i z_i[c * n_b + i], [N, C]."""
    return own_slot_logits(branch_logits).mean(dim=2)


def branch_diversity(logits_t, logits_s):
    """OKDDip's diversity per image (docs/css.md): mean L2 distance of the 2 n_b branch softmaxes,
    over all pairs and over the n_b (net1 i, net2 i) pairs. Returns two [N] tensors."""
    branches = logits_t.shape[2]
    probs = F.softmax(torch.cat([logits_t, logits_s], dim=2), dim=1).transpose(1, 2)  # [N, 2n_b, K]
    distances = torch.cdist(probs, probs)  # [N, 2n_b, 2n_b]
    all_pairs = distances.triu(1).sum(dim=(1, 2)) / (branches * (2 * branches - 1))
    same_numbered = distances.diagonal(offset=branches, dim1=1, dim2=2).mean(dim=1)
    return all_pairs, same_numbered


@torch.no_grad()
def evaluate_css(net_t, net_s, masks, data, args):
    """One test pass, eval mode, masks on (as train.py tests): top-1/5 (%) of net1, net2 and their
    ensemble (mean aggregated logits); each branch's own-slot top-1, diversity when asked."""
    net_t, net_s = map(common.for_evaluation, (net_t, net_s))
    meter = common.Meter()
    for images, labels in common.test_batches(data, args.eval_batch_size, shard=True):
        with common.autocast(images.device, args.amp):
            logits_t = net_t(images, masks).float()
            logits_s = net_s(images, masks).float()
        aggregated_t = aggregate_branches(logits_t)
        aggregated_s = aggregate_branches(logits_s)
        ensemble = (aggregated_t + aggregated_s) / 2
        for name, scores in (("net1", aggregated_t), ("net2", aggregated_s), ("ensemble", ensemble)):
            top1, top5 = common.topk_counts(scores, labels)
            meter.add_sum(f"{name}_top1", 100.0 * top1, len(labels))
            meter.add_sum(f"{name}_top5", 100.0 * top5, len(labels))
        for name, logits in (("net1", logits_t), ("net2", logits_s)) if args.log_branch_top1 else ():
            for i, slot_scores in enumerate(own_slot_logits(logits).unbind(dim=2)):
                meter.add_top1(f"{name}_branch{i}_top1", slot_scores, labels)
        if args.log_diversity:
            all_pairs, same_numbered = branch_diversity(logits_t, logits_s)
            meter.add_sum("diversity", all_pairs.sum(), len(labels))
            meter.add_sum("diversity_paired", same_numbered.sum(), len(labels))
    return meter.averages()


if __name__ == "__main__":
    common.show_user_errors_plainly()
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "cifar10")
    common.check_architectures(args.model_t, args.model_s, valid=tuple(CSS_RESNETS), kind=CSS_KIND)
    common.print_config(args, METHOD_NAME)
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device, args.sync_bn)
    data = common.load_data(args, device)
    run_name = f"{METHOD_NAME}_{args.model_t}_{args.model_s}_{args.dataset}_seed{args.seed}"
    run_dir = common.prepare_run_dir(args, run_name)

    # --- METHOD: two multi-branch networks, an SGD optimizer each; per-branch masks ---
    net_t = build_css_resnet(args.model_t, data.num_classes, args.branches)
    net_s = build_css_resnet(args.model_s, data.num_classes, args.branches)
    net_t = common.prepare_model(net_t, device, args.amp)
    net_s = common.prepare_model(net_s, device, args.amp)
    for name, net in (("net1", net_t), ("net2", net_s)):
        print(f"{name}: {net.arch}, {args.branches} branches, {sum(map(torch.numel, net.parameters())):,} parameters")
    size = data.train_images.shape[2] // 2  # the masked map is layer2's output
    masks = branch_masks(args.mask, args.branches, size, size, args.literal_mask3, device)
    base_lr = 0.1 if args.learning_rate is None else args.learning_rate  # train.py's lr
    optimizer_t = common.make_sgd(net_t.parameters(), base_lr, args)
    optimizer_s = common.make_sgd(net_s.parameters(), base_lr, args)
    trained_with = {"net1_model": net_t, "net1_optimizer": optimizer_t}  # saved beside net2
    start_epoch, best, checkpoint = common.resume_state(run_dir, net_s, optimizer_s, args.resume, args, trained_with)
    best_net1 = checkpoint["best_net1"] if checkpoint else dict(best)
    best_ensemble = checkpoint["best_ensemble"] if checkpoint else dict(best)
    result = None
    # --- END METHOD ---
    logger = common.Logger(run_dir, args, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        # --- METHOD: train.py's warm-up, then the step schedule, for both networks ---
        lr = common.lr_at_epoch(epoch, base_lr, args.lr_milestones, args.lr_gamma, args.warmup_epochs)
        common.set_lr(optimizer_t, lr)
        common.set_lr(optimizer_s, lr)
        net_t.train()
        net_s.train()
        # --- END METHOD ---
        meter = common.Meter(run_dir, hint=DIVERGENCE_HINT)
        epoch_start = time.time()
        generator = common.epoch_generator(args.seed, epoch)
        for images, labels, _ in common.train_batches(data, args.batch_size, generator):
            # --- METHOD: CSS, joint-label CE per branch + CE-ratio-weighted branch-to-branch KD ---
            with common.autocast(device, args.amp):
                logits_t = net_t(images, masks).float()  # [B, C*n_b, n_b]
                logits_s = net_s(images, masks).float()
            loss, terms = css_loss(logits_t, logits_s, labels, args.kd_T, args.detach_kd_target, args.detach_ratio)
            if not args.distill:  # the CE-only baseline: the networks do not interact
                loss = terms["ce_t"] + terms["ce_s"]
            optimizer_t.zero_grad(set_to_none=True)
            optimizer_s.zero_grad(set_to_none=True)
            loss.backward()  # one backward pass reaches both networks
            optimizer_t.step()
            optimizer_s.step()
            # --- END METHOD ---
            # --- METHOD: CSS's training metrics ---
            for name in ("ce_t", "ce_s", "kd_t_from_s", "kd_s_from_t"):
                meter.add(f"loss/{name}", terms[name], len(labels))
            meter.add("weight/alpha1", terms["alpha1"], len(labels))
            meter.add("weight/alpha2", terms["alpha2"], len(labels))
            meter.add("loss/total", loss, len(labels))
            meter.add("loss/ce", terms["ce_t"] + terms["ce_s"], len(labels))
            meter.add_top1("train/top1", aggregate_branches(logits_s), labels)
            meter.add_top1("train/net1_top1", aggregate_branches(logits_t), labels)
            # --- END METHOD ---

        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir, hint=DIVERGENCE_HINT)
        images_per_s = len(data.train_labels) / (time.time() - epoch_start)
        # --- METHOD: net1, net2 (primary) and ensemble test accuracies, each with its best ---
        result = evaluate_css(net_t, net_s, masks, data, args)
        if result["net2_top1"] > best["top1"]:
            best = {"top1": result["net2_top1"], "top5": result["net2_top5"], "epoch": epoch}
            best_weights = common.model_payload(net_s, epoch + 1, best, args)
            common.save_checkpoint(run_dir / "best.pth", best_weights)
        if result["net1_top1"] > best_net1["top1"]:
            best_net1 = {"top1": result["net1_top1"], "top5": result["net1_top5"], "epoch": epoch}
            common.save_checkpoint(run_dir / "best_net1.pth", common.model_payload(net_t, epoch + 1, best_net1, args))
        if result["ensemble_top1"] > best_ensemble["top1"]:
            best_ensemble = {"top1": result["ensemble_top1"], "top5": result["ensemble_top5"], "epoch": epoch}
        metrics.update({"lr": lr, "test/top1": result["net2_top1"], "test/top5": result["net2_top5"]})
        metrics.update({"test/best_top1": best["top1"], "speed/images_per_s": images_per_s})
        metrics.update({f"test/{name}": value for name, value in result.items()})
        metrics.update({"test/net1_best_top1": best_net1["top1"], "test/ensemble_best_top1": best_ensemble["top1"]})
        logger.log(epoch, metrics)
        state = common.training_state(net_s, optimizer_s, epoch + 1, best, args, trained_with)
        state.update(net1_arch=net_t.arch, best_net1=best_net1, best_ensemble=best_ensemble)
        common.save_checkpoint(run_dir / "last.pth", state)
        # --- END METHOD ---
        common.print_epoch(epoch, args.epochs, metrics, epoch_start)

    # --- METHOD: every network's last and best epoch, in summary.json ---
    last = result if result is not None else evaluate_css(net_t, net_s, masks, data, args)
    summary = {"primary": f"net2 ({args.model_s})", "net1_arch": net_t.arch, "net2_arch": net_s.arch}
    for name, best_of in (("net1", best_net1), ("net2", best), ("ensemble", best_ensemble)):
        summary.update({f"{name}_last_top1": last[f"{name}_top1"], f"{name}_last_top5": last[f"{name}_top5"]})
        summary.update({f"{name}_best_top1": best_of["top1"], f"{name}_best_epoch": best_of["epoch"] + 1})
        print(f"{name}: last top1 {last[f'{name}_top1']:.2f}, best {best_of['top1']:.2f}, epoch {best_of['epoch'] + 1}")
    summary["last_branch_top1"] = {name: value for name, value in last.items() if "_branch" in name}
    summary.update({f"last_{name}": value for name, value in last.items() if name.startswith("diversity")})
    last = {"top1": last["net2_top1"], "top5": last["net2_top5"]}
    # --- END METHOD ---
    common.write_summary(run_dir, args, best, last, METHOD_NAME, **summary)
