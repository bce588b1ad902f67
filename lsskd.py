"""Layered Self-Supervised Knowledge Distillation (LSSKD) on CIFAR: teacher-free, on
HSAKD's branches.

Paper: T. Dahri, Z. A. Memon, Z. Yu, M. Y. I. Idris, S. Khan, S. Ahmad, M. Shoman, S.
Aziz, R. Qureshi, "A Layered Self-Supervised Knowledge Distillation Framework for
Efficient Multimodal Learning on the Edge", arXiv 2506.07055 (2025),
https://arxiv.org/abs/2506.07055. No public code: most choices here are interpretations,
each a flag marked [INTERP] in --help, the recipe included (HSAKD's); docs/lsskd.md
gives each reading and its source.

One network, no teacher. HSAKD's auxiliary classifiers (common.AuxiliaryModel) sit after
the intermediate stages and predict the 4C-way class x rotation label (4y + k) of all
four rotations of every image, with gradients into the backbone. Every head learns from
PS-KD soft targets: (1 - alpha_e) * onehot + alpha_e * (the same head's prediction for
the same sample and rotation in the previous epoch), kept in per-head buffers addressed
by dataset index. On top, the deepest auxiliary head teaches the shallower ones (KL, T =
3) and the shallow heads' pooled features are pulled towards the backbone's final
feature (L2). Compared with kd.py: no teacher, 4x the rows (rotations), auxiliary
branches, prediction buffers instead of a teacher, four loss terms, and Nesterov
momentum.

Run: python lsskd.py --model resnet8x4
"""

import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

import common

METHOD_NAME = "lsskd"  # in run folder names, the config line and summary.json


@dataclass
class Args:
    # Run
    dataset: Literal["cifar100", "cifar10", "imagenet", "tiny-imagenet", "imagefolder"] = "cifar100"
    """dataset to train on"""
    data_dir: str = "data"
    """folder holding the dataset (CIFAR is downloaded into it if missing; layouts: README.md, Data)"""
    image_size: Optional[int] = None
    """image folders: image side; unset: 224 on imagenet, else 32"""
    workers: int = 4
    """image folders: DataLoader decoding processes"""
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
    model: str = common.per_dataset("resnet8x4", imagenet="resnet18_imagenet")
    """zoo architecture trained with auxiliary classifiers [INTERP]"""
    epochs: int = common.per_dataset(240, imagenet=100)
    """number of training epochs"""
    batch_size: int = common.per_dataset(64, imagenet=256)
    """training batch size"""
    learning_rate: Optional[float] = common.per_dataset(None, imagenet=0.1)
    """initial lr; unset means the recipe's value for the architecture (docs/<method>.md)"""
    lr_milestones: Tuple[int, ...] = common.per_dataset((150, 180, 210), imagenet=(30, 60, 90))
    """0-based epochs at which the lr is multiplied by --lr-gamma"""
    lr_gamma: float = 0.1
    """lr decay factor at each milestone"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = True
    """Nesterov momentum"""
    weight_decay: float = common.per_dataset(5e-4, imagenet=1e-4)
    """SGD weight decay, on every trained parameter"""
    normalize: Optional[common.NormalizeName] = None
    """normalisation constants; unset: CIFAR-10's on cifar10, the recipe's on cifar100, else ImageNet's"""
    # LSSKD
    kd_T: float = 3.0
    """softmax temperature T of the distillation KL"""
    alpha_T: float = 0.8
    """alpha of the soft targets at the last epoch (PS-KD's value) [INTERP]"""
    alpha_schedule: Literal["linear", "constant"] = "linear"
    """linear: alpha_e = alpha_T * (e + 1) / epochs (PS-KD); constant: alpha_e = alpha_T [INTERP]"""
    final_soft_targets: bool = True
    """PS-KD soft targets for the final classifier; false = hard-label CE [SECONDARY]"""
    aux_soft_targets: bool = True
    """PS-KD soft targets for every auxiliary head; false = hard joint-label CE [SECONDARY]"""
    final_rows: Literal["upright", "all"] = "upright"
    """rows the final classifier learns from: the upright images, or all 4 rotations [INTERP]"""
    sad_tau: float = 1.0
    """temperature of the heads' soft-target CE and of their buffered predictions [INTERP]"""
    kl_teacher: Literal["deepest", "chain", "final"] = "deepest"
    """deep-to-shallow KL: the deepest auxiliary head teaches every shallower one, head l+1
    teaches head l (chain), or the final classifier teaches every head's classes (final) [INTERP]"""
    lambda_sad: float = 1.0
    """weight of the heads' soft-target CE, summed over heads (0 switches it off; the deepest
    head then learns nothing: it only teaches through the KL) [INTERP]"""
    lambda_kl: float = 1.0
    """weight of the deep-to-shallow KL (0 switches the term off) [INTERP]"""
    lambda_feat: float = 1.0
    """weight of the auxiliary-to-final feature L2 (0 switches the term off) [INTERP]"""
    feat_level: Literal["pooled", "map"] = "pooled"
    """feature L2 between pooled vectors, or between auxiliary and final feature maps [INTERP]"""
    feat_detach_target: bool = True
    """stop the feature L2's gradient into the backbone's final feature [INTERP]"""
    feat_include_last: bool = False
    """also align the deepest head's feature (default: the shallower heads only) [INTERP]"""
    buffer_dtype: Literal["fp16", "fp32"] = "fp16"
    """dtype of the prediction buffers; fp16 rows are renormalised to sum 1 when read [INTERP]"""
    buffer_device: Literal["cuda", "cpu"] = common.per_dataset("cuda", imagenet="cpu")
    """where the buffers live: cuda = the training device, cpu = host memory [INTERP]"""


BUFFER_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def lsskd_alpha(epoch, epochs, alpha_T, schedule):
    """alpha_e of the 0-based epoch e, the same for every head and every batch of the
    epoch."""
    return alpha_T * (epoch + 1) / epochs if schedule == "linear" else alpha_T


def progressive_targets(hard_labels, past_predictions, alpha):
    """PS-KD targets (1 - alpha) * onehot + alpha * P, written as onehot + alpha * (P -
    onehot) so that P = onehot gives exactly the one-hot target (the epoch-0 rule).
    [..., K] float32."""
    one_hot = F.one_hot(hard_labels, past_predictions.shape[-1]).to(past_predictions.dtype)
    return one_hot + alpha * (past_predictions - one_hot)


def read_targets(buffer, sample_ids, hard_labels, alpha, first_epoch):
    """Soft targets of a batch from its buffer rows, addressed by dataset index. buffer
    [N_train, *slots, K], hard_labels [B, *slots] -> targets [B, *slots, K] float32. In
    the first epoch the rows are first set to their one-hot labels, so every epoch-0
    target is exactly one-hot (PS-KD's rule)."""
    rows = sample_ids.to(buffer.device)
    if first_epoch:
        buffer[rows] = F.one_hot(hard_labels, buffer.shape[-1]).to(buffer.device, buffer.dtype)
    past = buffer[rows].to(hard_labels.device, torch.float32)
    if buffer.dtype != torch.float32:  # fp16 rows sum to 1 +- 1e-3: renormalise them
        past = past / past.sum(dim=-1, keepdim=True)
    return progressive_targets(hard_labels, past, alpha)


def record_predictions(buffer, sample_ids, logits, temperature=1.0):
    """After the optimizer step: the batch's detached softmax(logits / T) [B, *slots, K]
    becomes its rows."""
    probabilities = F.softmax(logits.detach().float() / temperature, dim=-1)
    buffer[sample_ids.to(buffer.device)] = probabilities.to(buffer.device, buffer.dtype)


def per_sample(head_rows):
    """Auxiliary-head outputs in buffer layout: L x [4B, K] (row 4b + k) -> [B, L, 4, K]."""
    return torch.stack(head_rows, dim=1).unflatten(0, (-1, 4)).transpose(1, 2)


def per_head_rows(sample_values):
    """The inverse of per_sample: [B, L, 4, K] -> L x [4B, K] (row 4b + k)."""
    return list(sample_values.transpose(0, 1).flatten(1, 2))


def soft_cross_entropy(logits, targets, temperature=1.0):
    """-sum_k target_k * log softmax(logits / T)_k, mean over rows (PS-KD's loss; T = 1
    unless --sad-tau)."""
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton's KD term: T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over
    classes and averaged over the rows ("batchmean"; RepDistiller's DistillKL writes it
    as sum / B). The T^2 keeps the gradient magnitude independent of T (Hinton et al.,
    section 2)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)  # [B, C]
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)  # [B, C]
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def head_class_logits(head_logits):
    """An auxiliary head's class scores: the sum of each class's 4 rotation logits (joint
    labels 4c..4c+3), as HSAKD's branch diagnostics read them. [R, 4C] -> [R, C]."""
    return head_logits.unflatten(1, (-1, 4)).sum(2)


def deep_to_shallow_kl(aux_logits, temperature, teacher="deepest", final_logits=None, final_rows="upright"):
    """KL from a deeper classifier with stop-gradient. "deepest": the deepest head L
    teaches every head l = 1..L-1 (Be-Your-Own-Teacher's rule on the SAD heads);
    "chain": head l+1 teaches head l; both on the 4C joint logits of all 4B rows.
    "final": the final classifier's logits [R, C] on the rows it learns from
    (--final-rows) teach every head l = 1..L, on the head's class scores
    (head_class_logits) of those rows. aux_logits L x [4B, 4C]."""
    if teacher == "final":
        rows = slice(0, None, 4) if final_rows == "upright" else slice(None)
        target = final_logits.detach()
        return sum(kd_loss(head_class_logits(head[rows]), target, temperature) for head in aux_logits)
    shallow_heads = aux_logits[:-1]
    teachers = [aux_logits[-1]] * len(shallow_heads) if teacher == "deepest" else aux_logits[1:]
    return sum(kd_loss(shallow, deep.detach(), temperature) for shallow, deep in zip(shallow_heads, teachers))


def feature_alignment(aux_feats, final_feat, detach_target=True, include_last=False):
    """Sum over heads of the mean squared difference between head l's feature and the
    backbone's final feature on the same 4B rows: pooled vectors (aux_feats L x [4B, D],
    final_feat [4B, D]) or, with --feat-level map, maps (L x [4B, D, H, W] against [4B,
    D, H, W]); the mean runs over every element."""
    target = final_feat.detach() if detach_target else final_feat
    heads = aux_feats if include_last else aux_feats[:-1]
    return sum(((feat - target) ** 2).mean() for feat in heads)


def lsskd_loss(logits, aux_logits, aux_feats, final_feat, final_targets, aux_targets, args):
    """The loss of docs/lsskd.md, per step on the 4B rotated rows (row 4b + k). logits [4B,
    C], aux_logits and aux_targets L x [4B, 4C], final_targets [R*B, C] for the upright
    rows (R = 1) or all rows (R = 4). Returns every term (unweighted) and the weighted
    total."""
    final_logits = logits[0::4] if args.final_rows == "upright" else logits
    terms = {"final": soft_cross_entropy(final_logits, final_targets)}
    head_targets = zip(aux_logits, aux_targets)
    sad = [soft_cross_entropy(head, target, args.sad_tau) for head, target in head_targets]
    terms.update({f"sad_{head}": term for head, term in enumerate(sad, 1)})
    terms["sad"] = sum(sad)
    kl_options = (args.kl_teacher, final_logits, args.final_rows)
    terms["kl"] = deep_to_shallow_kl(aux_logits, args.kd_T, *kl_options)
    feat_options = (args.feat_detach_target, args.feat_include_last)
    terms["feat"] = feature_alignment(aux_feats, final_feat, *feat_options)
    total = terms["final"]
    for name, weight in (("sad", args.lambda_sad), ("kl", args.lambda_kl), ("feat", args.lambda_feat)):
        if weight:  # a switched-off term adds nothing, not even 0 * NaN
            total = total + weight * terms[name]
    terms["total"] = total
    return terms


def check_feature_map_shapes(arch, num_classes, include_last):
    """--feat-level map needs every aligned branch map to have the shape of the backbone's
    last stage map. Checked on the meta device (no weights, no compute) before anything
    runs; raises ConfigError if not."""
    with torch.device("meta"):
        model = common.build_auxiliary_model(arch, num_classes)
        feats, aux_maps, _, _ = model(torch.zeros(2, 3, 32, 32), is_feat=True, feature_maps=True)
    final_shape = tuple(feats[-2].shape[1:])
    aligned = aux_maps if include_last else aux_maps[:-1]
    shapes = [tuple(feature_map.shape[1:]) for feature_map in aligned]
    numbered = enumerate(shapes, 1)
    mismatched = [f"head {head}: {shape}" for head, shape in numbered if shape != final_shape]
    if mismatched:
        raise common.ConfigError(
            f"--feat-level map: {arch}'s auxiliary feature maps do not match its final feature map "
            f"{final_shape} (C, H, W): {', '.join(mismatched)}; use --feat-level pooled"
        )


if __name__ == "__main__":
    common.show_user_errors_plainly()
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "repdistiller")
    common.check_architectures(args.model)
    common.print_config(args, METHOD_NAME)
    # --- METHOD: auxiliary classifiers and feature-map shapes, checked before any work ---
    if not common.auxiliary_supported(args.model):
        common.build_auxiliary_model(args.model, 10)  # raises the message that lists them
    if args.feat_level == "map" and args.lambda_feat:
        check_feature_map_shapes(args.model, 10, args.feat_include_last)  # any class count
    print("LSSKD has no public code: [INTERP] flags are our reading (docs/lsskd.md)", flush=True)
    # --- END METHOD ---
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device, args.sync_bn)
    data = common.load_data(args, device)
    run_name = f"{METHOD_NAME}_{args.model}_{args.dataset}_seed{args.seed}"
    run_dir = common.prepare_run_dir(args, run_name)

    # --- METHOD: one network with HSAKD's auxiliary classifiers; the prediction buffers ---
    model_with_branches = common.build_auxiliary_model(args.model, data.num_classes)
    unused = not (args.lambda_sad or args.lambda_kl)  # torchrun: no gradient reaches the branches' classifiers
    model_with_branches = common.prepare_model(model_with_branches, device, args.amp, find_unused=unused)
    # The backbone is evaluated, saved and reported (as pskd.py's model); its branches train and resume with it.
    model = model_with_branches.backbone
    num_classes = data.num_classes
    num_heads = model_with_branches.num_branches
    final_slots = 1 if args.final_rows == "upright" else 4
    buffer_device = torch.device("cpu") if args.buffer_device == "cpu" else device
    buffer_options = dict(dtype=BUFFER_DTYPES[args.buffer_dtype], device=buffer_device)
    final_shape = (len(data.train_labels), final_slots, num_classes)
    aux_shape = (len(data.train_labels), num_heads, 4, 4 * num_classes)
    final_buffer = torch.zeros(final_shape, **buffer_options) if args.final_soft_targets else None
    aux_buffer = torch.zeros(aux_shape, **buffer_options) if args.aux_soft_targets else None
    used = [buffer for buffer in (final_buffer, aux_buffer) if buffer is not None]
    megabytes = sum(buffer.numel() * buffer.element_size() for buffer in used) / 2**20
    buffers = f"{megabytes:.0f} MB ({args.buffer_dtype}, {buffer_device})"
    print(f"{args.model}: {num_heads} auxiliary heads; prediction buffers {buffers}", flush=True)
    base_lr = common.default_lr(args.model, args.learning_rate)
    optimizer = common.make_sgd(model_with_branches.parameters(), base_lr, args)
    trained_with = {"auxiliary_classifier": model_with_branches.auxiliary_classifier}
    trained_with.update(final_predictions=final_buffer, aux_predictions=aux_buffer)
    # --- END METHOD ---
    start_epoch, best, _ = common.resume_state(run_dir, model, optimizer, args.resume, args, trained_with)
    logger = common.Logger(run_dir, args, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        lr = common.lr_at_epoch(epoch, base_lr, args.lr_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        # --- METHOD: one alpha for every batch of the epoch ---
        alpha = lsskd_alpha(epoch, args.epochs, args.alpha_T, args.alpha_schedule)
        # --- END METHOD ---
        model.train()
        meter = common.Meter(run_dir)
        epoch_start = time.time()
        generator = common.epoch_generator(args.seed, epoch)
        for images, labels, sample_ids in common.train_batches(data, args.batch_size, generator):
            # --- METHOD: 4 rotations (row 4b+k); targets from last epoch's predictions ---
            rotated = common.rotations(images)  # [4B, 3, H, W]
            joint_labels = common.rotation_joint_labels(labels)  # [4B]: 4y + k
            batch = len(labels)
            final_labels = labels[:, None].expand(batch, final_slots)  # [B, R]: the class
            aux_labels = joint_labels.view(batch, 1, 4).expand(batch, num_heads, 4)  # [B, L, 4]: 4y + k
            if args.final_soft_targets:
                final_targets = read_targets(final_buffer, sample_ids, final_labels, alpha, epoch == 0)
            else:  # hard labels: the soft CE of a one-hot target is the usual CE
                final_targets = F.one_hot(final_labels, num_classes).float()
            if args.aux_soft_targets:
                aux_targets = read_targets(aux_buffer, sample_ids, aux_labels, alpha, epoch == 0)
            else:
                aux_targets = F.one_hot(aux_labels, 4 * num_classes).float()
            aux_targets = per_head_rows(aux_targets)  # L x [4B, 4C]
            final_targets = final_targets.flatten(0, 1)
            with common.autocast(device, args.amp):
                feature_maps = args.feat_level == "map"
                outputs = model_with_branches(rotated, is_feat=True, feature_maps=feature_maps)
                feats, aux_feats, aux_logits, logits = outputs
                aux_logits = [head.float() for head in aux_logits]
                aux_feats = [feat.float() for feat in aux_feats]
                logits = logits.float()
                final_feat = (feats[-2] if args.feat_level == "map" else feats[-1]).float()
            targets = (final_targets, aux_targets)
            losses = lsskd_loss(logits, aux_logits, aux_feats, final_feat, *targets, args)
            loss = losses["total"]
            loss_ce = F.cross_entropy(logits[0::4].detach(), labels)  # monitored only
            # --- END METHOD ---
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # --- METHOD: after the step (PS-KD's timing), the predictions become the rows ---
            if args.final_soft_targets:
                final_logits = logits[0::4] if args.final_rows == "upright" else logits
                final_logits = final_logits.view(batch, final_slots, num_classes)
                record_predictions(final_buffer, *common.gather_rows(sample_ids, final_logits))
            if args.aux_soft_targets:
                record_predictions(aux_buffer, *common.gather_rows(sample_ids, per_sample(aux_logits)), args.sad_tau)
            for name, value in losses.items():
                meter.add(f"loss/{name}", value, len(labels))
            meter.add_top1("train/top1", logits[0::4], labels)  # on the upright rows
            # --- END METHOD ---
            meter.add("loss/ce", loss_ce, len(labels))

        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir)
        images_per_s = len(data.train_labels) / (time.time() - epoch_start)
        result = common.evaluate(model, data, args.eval_batch_size, args.amp)
        if result["top1"] > best["top1"]:
            best = {**result, "epoch": epoch}
            best_weights = common.model_payload(model, epoch + 1, result, args)
            common.save_checkpoint(run_dir / "best.pth", best_weights)
        metrics.update({"lr": lr, "test/top1": result["top1"], "test/top5": result["top5"]})
        metrics.update({"test/best_top1": best["top1"], "speed/images_per_s": images_per_s})
        # --- METHOD: the alpha of the epoch ---
        metrics["lsskd/alpha"] = alpha
        # --- END METHOD ---
        logger.log(epoch, metrics)
        state = common.training_state(model, optimizer, epoch + 1, best, args, trained_with)
        common.save_checkpoint(run_dir / "last.pth", state)
        common.print_epoch(epoch, args.epochs, metrics, epoch_start)

    last = common.evaluate(model, data, args.eval_batch_size, args.amp)
    # --- METHOD: the heads' diagnostics (not used in training), recorded in summary.json ---
    heads = common.auxiliary_accuracy(model_with_branches, data, args.eval_batch_size, args.amp)
    summary = {"arch": args.model, "aux_ss_top1": heads["ss_top1"]}
    summary["aux_class_top1"] = heads["class_top1"]
    # --- END METHOD ---
    common.write_summary(run_dir, args, best, last, METHOD_NAME, **summary)
