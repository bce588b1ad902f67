"""Knowledge Distillation Meets Self-Supervision (SSKD) with the official CIFAR recipe.

Paper: G. Xu, Z. Liu, X. Li, C. C. Loy, "Knowledge Distillation Meets Self-Supervision", ECCV 2020,
https://arxiv.org/abs/2006.07114. Reference code: xuguodong03/SSKD@661b972 (`student.py`,
`wrapper.py`, `cifar.py`; spec: specs/sskd.md).

Every training image comes in four copies, rotated by 0, 90, 180 and 270 degrees. Teacher and
student each get a small projection head on their pooled feature; a rotated copy should be most
similar (cosine of projections) to the upright copy of its own image among all upright images of
the batch, a contrastive self-supervision task. Three stages run in one command: the cross-entropy
teacher (the one kd.py uses), 60 epochs that train only the teacher's head on that task, then the
student. The student learns the labels (upright copies), the teacher's softened class distribution
on the upright copies (KD, as kd.py) and on the rotated copies ("tf"), and the teacher's similarity
distribution between rotated and upright copies ("ss"). In the last two terms, the rotated rows on
which the teacher errs worst are dropped ("selective transfer"). Compared with kd.py: the
four-copy data pipeline, the two projection heads, the teacher-head stage and `sskd_loss`.
"""

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args:
    dataset: Literal["cifar100", "cifar10"] = "cifar100"
    """dataset to train on"""
    data_dir: str = "data"
    """folder holding cifar-100-python/ or cifar-10-batches-py/ (downloaded there when missing)"""
    teacher: str = "resnet32x4"
    """zoo architecture of the teacher"""
    student: str = "resnet8x4"
    """zoo architecture of the student"""
    epochs: int = 240
    """number of student training epochs (stage 3)"""
    batch_size: int = 64
    """training batch size in images; each step sees 4x as many rows (the rotated copies)"""
    learning_rate: Optional[float] = None
    """initial student lr; unset means 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2"""
    lr_milestones: Tuple[int, ...] = (150, 180, 210)
    """0-based epochs at which the student lr is multiplied by --lr-gamma"""
    lr_gamma: float = 0.1
    """lr decay factor at each milestone (student and teacher head)"""
    momentum: float = 0.9
    """SGD momentum (student and teacher head)"""
    nesterov: bool = False
    """Nesterov momentum (SSKD: off)"""
    weight_decay: float = 5e-4
    """SGD weight decay, on all trained parameters (student and teacher head)"""
    seed: int = 1
    """seed of python, numpy, torch and of the student's data order and augmentation"""
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
    """run folder name; unset means sskd_<teacher>_<student>_<dataset>_seed<seed>"""
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
    # Teacher (stage 1)
    teacher_path: Optional[str] = None
    """teacher checkpoint (ours, RepDistiller/mdistiller, SSKD, HSAKD, PS-KD formats); unset means
    <checkpoint-dir>/<dataset>/<teacher>.pth, trained with baseline.py first when missing"""
    checkpoint_dir: str = "checkpoints"
    """where trained teachers and teacher heads are cached"""
    ce_teacher_epochs: int = 240
    """epochs of baseline.py training when the teacher has to be trained"""
    teacher_expected_acc: Optional[float] = None
    """expected teacher test top-1; unset means the RepDistiller value for known CIFAR-100 teachers"""
    strict_teacher_check: bool = False
    """abort (instead of warn) when the teacher's top-1 differs from the expected value by > 0.5"""
    allow_teacher_normalize_mismatch: bool = False
    """use a teacher whose recorded --normalize differs from this run's (warn instead of refusing)"""
    # Teacher projection head (stage 2, specs/sskd.md section 5)
    teacher_head_path: Optional[str] = None
    """trained teacher head (ours, or SSKD's ckpt/teacher.pth) to skip stage 2; unset means the
    head cached beside the teacher, trained first when missing [INTERP]"""
    t_epochs: int = 60
    """epochs of teacher-head training (stage 2; --ce-teacher-epochs is the CE teacher's, stage 1)"""
    t_lr: float = 0.05
    """lr of the teacher head; the teacher backbone is not trained"""
    t_milestones: Tuple[int, ...] = (30, 45)
    """0-based head epochs at which the head lr is multiplied by --lr-gamma"""
    head_T: float = 1.0
    """temperature of the head's contrastive cross-entropy (code: raw cosines; the paper has a tau)"""
    head_seed: int = 0
    """seed of the head's initialisation and data order, fixed so that one cached head serves
    every student seed [INTERP]"""
    # Student loss (specs/sskd.md sections 6 and 7)
    ce_weight: float = 0.1
    """weight of the cross-entropy with the labels (upright copies)"""
    kd_weight: float = 0.9
    """weight of the KD term on the upright copies"""
    tf_weight: float = 2.7
    """weight of the KD term on the rotated copies (code value; see docs for the paper's)"""
    ss_weight: float = 10.0
    """weight of the similarity-distribution term (code value; see docs for the paper's)"""
    kd_T: float = 4.0
    """temperature of the KD term"""
    tf_T: float = 4.0
    """temperature of the rotated-copies KD term"""
    ss_T: float = 0.5
    """temperature of the similarity-distribution term"""
    ratio_tf: float = 1.0
    """fraction of teacher-wrong rotated rows kept in the tf term (best-ranked first)"""
    ratio_ss: float = 0.75
    """fraction of teacher-wrong rotated rows kept in the ss term (best-ranked first)"""
    stable_sort: bool = True
    """rank rows with a stable sort, so ties at the cut keep the lower row (SSKD: torch's default
    sort, whose tie order is unspecified) [INTERP]"""
    rotation_pipeline: Literal["sskd", "gpu"] = "sskd"
    """sskd: one flip per image, rotate, then a crop per copy (SSKD's cifar.py); gpu: standard
    crop+flip shared by the copies, then rotation (faster approximation) [INTERP]"""


# ---- Data: four rotated copies per image, row 4i+k = image i rotated by k*90 degrees ----


def sskd_batches(data, batch_size, generator):
    """One epoch in SSKD's pipeline (cifar.py): one flip decision per image for all four copies,
    the four rotations of the raw image, then RandomCrop(32, padding 4) separately for each copy.
    Yields (normalised images [4B, 3, 32, 32], labels [B], dataset indices [B])."""
    for _, labels, indices in common.train_batches(data, batch_size, generator, augment=False):
        raw = data.train_images[indices]  # uint8 again: the crop zero-pads before normalising, as there
        flip = torch.rand(len(indices), generator=generator) < 0.5
        copies = common.rotations(common.hflip(raw, flip))  # [4B, 3, 32, 32]
        top, left = torch.randint(0, 9, (2, len(copies)), generator=generator)
        yield data.normalize(common.crop(copies, top, left, padding=4)), labels, indices


def rotated_standard_batches(data, batch_size, generator):
    """--rotation-pipeline gpu: the standard crop and flip, shared by the four copies, then the
    rotations of the augmented batch (HSAKD's order). Same output layout as `sskd_batches`."""
    layout = torch.channels_last if data.channels_last else torch.contiguous_format  # --amp
    for images, labels, indices in common.train_batches(data, batch_size, generator):
        yield common.rotations(images).contiguous(memory_format=layout), labels, indices


def split_rotations(rows):
    """[4B, ...] -> (upright rows [B, ...], rotated rows [3B, ...]); rotated row j is image j // 3
    at rotation j % 3 + 1 (specs/README.md section 4)."""
    per_image = rows.unflatten(0, (-1, 4))
    return per_image[:, 0], per_image[:, 1:].flatten(0, 1)


# ---- Projection head and similarity matrix (wrapper.py, student.py) ----


class ProjectionHead(nn.Sequential):
    """SSKD's proj_head: Linear(d, d) - ReLU - Linear(d, d) on the pooled penultimate feature,
    PyTorch default init. Keys 0.* and 2.* are those of SSKD's `proj_head.*`."""

    def __init__(self, feat_dim):
        super().__init__(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, feat_dim))


def similarity_matrix(projections):
    """S[j, b] = cos(rotated row j, upright row b): [4B, d] -> [3B, B]. Upright-upright and
    rotated-rotated pairs are never compared; row j's positive column is j // 3. Always fp32: the
    ss term divides cosines by 0.5, bf16's three digits would blur them under --amp."""
    with torch.autocast(projections.device.type, enabled=False):
        upright, rotated = split_rotations(F.normalize(projections.float(), dim=1, eps=1e-8))
        return rotated @ upright.T


def positive_columns(similarity):
    """The column of each rotated row's own upright image: [3B, B] -> [3B] = 0,0,0,1,1,1,..."""
    return torch.arange(similarity.shape[1], device=similarity.device).repeat_interleave(3)


def ss_correct_count(similarity):
    """Rotated rows whose most similar upright image is their own (a tensor: no host sync)."""
    return (similarity.argmax(dim=1) == positive_columns(similarity)).sum()


# ---- Loss (student.py, second loop) ----


@torch.no_grad()
def selective_transfer_mask(teacher_scores, target_columns, keep_ratio, stable_sort=True):
    """Error-level ranking (specs/sskd.md section 7): keep every row whose teacher top-1 is its
    target, plus the floor(wrong * keep_ratio) wrong rows whose target the teacher ranks best.
    teacher_scores [N, K], target_columns [N] -> keep [N] (bool, original row order)."""
    target_scores = teacher_scores.gather(1, target_columns[:, None])  # [N, 1]
    rank = (teacher_scores > target_scores).sum(dim=1)  # position of the target in the sorted row
    wrong = (rank > 0).sum()
    # float64 as Python's float, so the floor matches int(wrong * ratio) of the official code
    keep_count = len(rank) - wrong + torch.floor(wrong.double() * keep_ratio).long()
    order = torch.sort(rank, stable=stable_sort).indices  # correct rows first, then best-ranked wrong
    keep = torch.zeros_like(rank, dtype=torch.bool)
    keep[order] = torch.arange(len(rank), device=rank.device) < keep_count
    return keep


def kl_per_row(student_scores, teacher_scores, temperature):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) of each row: [N, K] -> [N]."""
    log_student = F.log_softmax(student_scores / temperature, dim=1)
    teacher_probs = F.softmax(teacher_scores / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="none").sum(dim=1) * temperature**2


def mean_over_kept(values, keep):
    """Mean over the kept rows ("batchmean" over |I|), written as a masked sum: no host sync."""
    return (values * keep).sum() / keep.sum().clamp_min(1)


def sskd_loss(
    student_logits,
    teacher_logits,
    student_similarity,
    teacher_similarity,
    labels,
    kd_T=4.0,
    tf_T=4.0,
    ss_T=0.5,
    ratio_tf=1.0,
    ratio_ss=0.75,
    ce_weight=0.1,
    kd_weight=0.9,
    tf_weight=2.7,
    ss_weight=10.0,
    stable_sort=True,
):
    """SSKD's student loss (specs/sskd.md section 6). Logits are [4B, C] in the rotation layout,
    similarities [3B, B] (`similarity_matrix`), labels [B]. Returns ({"ce", "kd", "tf", "ss",
    "total"}, keep_tf [3B], keep_ss [3B]); the terms are unweighted, the total weighted."""
    student_upright, student_rotated = split_rotations(student_logits)  # [B, C], [3B, C]
    teacher_upright, teacher_rotated = split_rotations(teacher_logits)
    keep_tf = selective_transfer_mask(
        F.softmax(teacher_rotated / tf_T, dim=1), labels.repeat_interleave(3), ratio_tf, stable_sort
    )
    keep_ss = selective_transfer_mask(teacher_similarity, positive_columns(teacher_similarity), ratio_ss, stable_sort)
    terms = {
        "ce": F.cross_entropy(student_upright, labels),  # only upright copies carry the hard label
        "kd": kl_per_row(student_upright, teacher_upright, kd_T).mean(),
        "tf": mean_over_kept(kl_per_row(student_rotated, teacher_rotated, tf_T), keep_tf),
        "ss": mean_over_kept(kl_per_row(student_similarity, teacher_similarity.detach(), ss_T), keep_ss),
    }
    terms["total"] = (
        ce_weight * terms["ce"] + kd_weight * terms["kd"] + tf_weight * terms["tf"] + ss_weight * terms["ss"]
    )
    return terms, keep_tf, keep_ss


# ---- Stage 2: the teacher's projection head (student.py, first loop) ----


@torch.no_grad()
def ss_top1(model, head, data, batch_size, amp):
    """% of rotated test copies whose most similar upright copy in their batch is their own."""
    model.eval()
    device = data.test_labels.device
    correct, rows = torch.zeros((), device=device), 0
    for start in range(0, len(data.test_labels), batch_size):
        images = data.normalize(common.rotations(data.test_images[start : start + batch_size]))
        with common.autocast(device, amp):
            feats, _ = model(images, is_feat=True)
            similarity = similarity_matrix(head(feats[-1]))
        correct, rows = correct + ss_correct_count(similarity), rows + len(similarity)
    return 100.0 * correct.item() / rows


def train_teacher_head(teacher, data, args, batches, log_path):
    """Train a fresh head on the frozen teacher: eval mode (BN keeps its running statistics) and
    the backbone under no_grad, i.e. SSKD's bb_grad=False with backbone lr 0. Cross-entropy of the
    cosines / head_T against each rotated row's own upright image."""
    device = data.test_labels.device
    head = ProjectionHead(teacher.feat_dim).to(device)
    optimizer = common.make_sgd(head.parameters(), args.t_lr, args)
    teacher.eval()
    log_path.write_text("")  # a previous, interrupted attempt in this run folder starts over too
    for epoch in range(args.t_epochs):
        lr = common.lr_at_epoch(epoch, args.t_lr, args.t_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        meter, images_seen, epoch_start = common.Meter(), 0, time.time()
        for images, labels, _ in batches(data, args.batch_size, common.epoch_generator(args.head_seed, epoch)):
            with common.autocast(device, args.amp):
                with torch.no_grad():
                    feats, _ = teacher(images, is_feat=True)
                similarity = similarity_matrix(head(feats[-1]))  # [3B, B], fp32
            loss = F.cross_entropy(similarity / args.head_T, positive_columns(similarity))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add("loss/head", loss, len(similarity))
            meter.add_sum("train/ss_top1", 100.0 * ss_correct_count(similarity), len(similarity))
            images_seen += len(labels)
        metrics = meter.averages()
        if not math.isfinite(metrics["loss/head"]):
            raise common.ConfigError(
                f"the teacher-head loss became non-finite in head epoch {epoch + 1}; "
                f"lower --t-lr or turn off --amp and rerun"
            )
        seconds = time.time() - epoch_start
        metrics.update(
            {
                "lr": lr,
                "test/ss_top1": ss_top1(teacher, head, data, args.batch_size, args.amp),
                "speed/images_per_s": images_seen / seconds,
            }
        )
        with open(log_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        print(
            f"head epoch {epoch + 1}/{args.t_epochs} lr {lr:.5f} | loss/head {metrics['loss/head']:.4f} | "
            f"train/ss_top1 {metrics['train/ss_top1']:.2f} | test/ss_top1 {metrics['test/ss_top1']:.2f} | "
            f"{metrics['speed/images_per_s']:.0f} img/s | "
            f"eta {common.format_seconds(seconds * (args.t_epochs - epoch - 1))}",
            flush=True,
        )
    return head, metrics["test/ss_top1"]


# Everything besides the teacher's weights that the trained head depends on.
HEAD_RECIPE = (
    "dataset",
    "normalize",
    "train_subset",
    "batch_size",
    "t_epochs",
    "t_lr",
    "t_milestones",
    "lr_gamma",
    "momentum",
    "nesterov",
    "weight_decay",
    "head_T",
    "head_seed",
    "rotation_pipeline",
    "amp",
)


def teacher_head_cache_path(args, teacher_file):
    """Beside the cached teacher: <teacher stem>_sskd_head_e<epochs>_<digest>.pth. The digest covers
    the teacher file and the head recipe, so a changed teacher or recipe never reuses a stale head."""
    recipe = json.dumps({name: getattr(args, name) for name in HEAD_RECIPE}, sort_keys=True)
    digest = hashlib.sha1(Path(teacher_file).read_bytes() + recipe.encode()).hexdigest()[:10]
    cache = common.teacher_cache_path(args)
    return cache.with_name(f"{cache.stem}_sskd_head_e{args.t_epochs}_{digest}.pth")


def load_teacher_head(path, feat_dim):
    """A head saved by this file ({"head": ...}) or SSKD's ckpt/teacher.pth (wrapper keys proj_head.*)."""
    if not path.is_file():
        raise common.ConfigError(f"teacher head {path} does not exist; unset --teacher-head-path to train one")
    checkpoint = common.load_checkpoint(
        path, "teacher head", "If it is a cached head, delete it and rerun to train it again."
    )
    state = checkpoint.get("head") or {
        name.removeprefix("proj_head."): tensor
        for name, tensor in common.extract_state_dict(checkpoint).items()
        if name.startswith("proj_head.")
    }
    head = ProjectionHead(feat_dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise common.ConfigError(
            f"{path} holds no projection head for a {feat_dim}-d teacher feature "
            f"(check --teacher): {str(error).splitlines()[0]}"
        ) from None
    return head, checkpoint.get("test_ss_top1")


def get_teacher_head(teacher, teacher_file, data, args, batches, run_dir):
    """Stage 2: --teacher-head-path, else the cached head, else train one and cache it atomically.
    Runs on its own random stream (--head-seed), so loading or training it leaves the student's
    initialisation unchanged. Returns (head in eval mode and frozen, its file, its test ss top-1)."""
    path = Path(args.teacher_head_path) if args.teacher_head_path else teacher_head_cache_path(args, teacher_file)
    with torch.random.fork_rng(devices=[]):  # heads are built on the CPU; the data has its own generators
        torch.default_generator.manual_seed(args.head_seed)
        with contextlib.nullcontext() if args.teacher_head_path else common.cache_lock(path):
            if args.teacher_head_path or path.exists():
                head, test_ss = load_teacher_head(path, teacher.feat_dim)
                print(
                    f"teacher head from {path}" + (f": test ss top1 {test_ss:.2f}" if test_ss is not None else ""),
                    flush=True,
                )
            else:
                print(f"no teacher head at {path}: training the teacher head ({args.t_epochs} epochs)", flush=True)
                head, test_ss = train_teacher_head(teacher, data, args, batches, run_dir / "head_metrics.jsonl")
                common.save_checkpoint(
                    path,
                    {
                        "head": head.state_dict(),
                        "arch": args.teacher,
                        "feat_dim": teacher.feat_dim,
                        "teacher_file": str(teacher_file),
                        "test_ss_top1": test_ss,
                        "recipe": {name: getattr(args, name) for name in HEAD_RECIPE},
                    },
                )
    return head.to(data.test_labels.device).eval().requires_grad_(False), path, test_ss


def check_args(args):
    if not (0.0 <= args.ratio_tf <= 1.0 and 0.0 <= args.ratio_ss <= 1.0):
        raise common.ConfigError(
            "--ratio-tf and --ratio-ss are the fractions of teacher-wrong rows to keep: use values in [0, 1]"
        )
    if min(args.kd_T, args.tf_T, args.ss_T, args.head_T) <= 0:
        raise common.ConfigError("--kd-T, --tf-T, --ss-T and --head-T must be positive")
    if args.t_epochs < 1 and not args.teacher_head_path:
        raise common.ConfigError("--t-epochs must be at least 1 (or pass a trained --teacher-head-path)")
    common.check_architectures(args.teacher, args.student)  # unknown names fail before any training starts


if __name__ == "__main__":
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "sskd")
    common.print_config(args, "sskd")
    check_args(args)
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device)
    data = common.load_data(args, device)
    run_dir = common.prepare_run_dir(args, f"sskd_{args.teacher}_{args.student}_{args.dataset}_seed{args.seed}")

    # --- METHOD: stage 1, the frozen teacher (evaluated before stage 2); stage 2, its head ---
    batches = sskd_batches if args.rotation_pipeline == "sskd" else rotated_standard_batches
    teacher, teacher_result = common.load_teacher(args, data, device)
    teacher_file = Path(args.teacher_path) if args.teacher_path else common.teacher_cache_path(args)
    teacher_head, head_file, head_test_ss = get_teacher_head(teacher, teacher_file, data, args, batches, run_dir)
    # --- END METHOD ---
    student = common.prepare_model(common.build_model(args.student, data.num_classes), device, args.amp)
    # --- METHOD: the student's projection head is trained with it ---
    student_head = ProjectionHead(student.feat_dim).to(device)
    trained_parameters = [*student.parameters(), *student_head.parameters()]  # the teacher is not optimised
    loss_options = dict(
        kd_T=args.kd_T,
        tf_T=args.tf_T,
        ss_T=args.ss_T,
        ratio_tf=args.ratio_tf,
        ratio_ss=args.ratio_ss,
        ce_weight=args.ce_weight,
        kd_weight=args.kd_weight,
        tf_weight=args.tf_weight,
        ss_weight=args.ss_weight,
        stable_sort=args.stable_sort,
    )
    # --- END METHOD ---
    base_lr = common.default_lr(args.student, args.learning_rate)
    optimizer = common.make_sgd(trained_parameters, base_lr, args)
    start_epoch, best, checkpoint = common.resume_state(run_dir, student, optimizer, args.resume, args)
    if checkpoint:  # METHOD: the student's head is part of the training state
        student_head.load_state_dict(checkpoint["student_head"])
    logger = common.Logger(run_dir, args, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        lr = common.lr_at_epoch(epoch, base_lr, args.lr_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        student.train()
        meter, images_seen, epoch_start = common.Meter(), 0, time.time()
        for images, labels, _ in batches(data, args.batch_size, common.epoch_generator(args.seed, epoch)):
            # --- METHOD: SSKD, four rotated copies per image through both networks and heads ---
            with common.autocast(device, args.amp):
                student_feats, student_logits = student(images, is_feat=True)
                student_similarity = similarity_matrix(student_head(student_feats[-1]))  # [3B, B]
                with torch.no_grad():
                    teacher_feats, teacher_logits = teacher(images, is_feat=True)
                    teacher_similarity = similarity_matrix(teacher_head(teacher_feats[-1]))
            student_logits = student_logits.float()  # [4B, C]
            losses, keep_tf, keep_ss = sskd_loss(
                student_logits, teacher_logits.float(), student_similarity, teacher_similarity, labels, **loss_options
            )
            loss_ce, loss = losses["ce"], losses["total"]
            for term in ("kd", "tf", "ss", "total"):
                meter.add(f"loss/{term}", losses[term], len(labels))
            meter.add_sum("train/ss_top1", 100.0 * ss_correct_count(student_similarity), len(student_similarity))
            meter.add_sum("train/kept_tf", 100.0 * keep_tf.sum(), len(keep_tf))
            meter.add_sum("train/kept_ss", 100.0 * keep_ss.sum(), len(keep_ss))
            upright_logits = split_rotations(student_logits)[0]  # train/top1 on the upright copies
            # --- END METHOD ---
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add("loss/ce", loss_ce, len(labels))
            meter.add_sum("train/top1", 100.0 * common.accuracy_count(upright_logits, labels), len(labels))
            images_seen += len(labels)  # loader images, each seen in four copies

        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir)
        images_per_s = images_seen / (time.time() - epoch_start)
        result = common.evaluate(student, data, args.eval_batch_size, args.amp)
        if result["top1"] > best["top1"]:
            best = {**result, "epoch": epoch}
            common.save_checkpoint(run_dir / "best.pth", common.model_payload(student, epoch + 1, result, args))
        metrics.update(
            {
                "lr": lr,
                "test/top1": result["top1"],
                "test/top5": result["top5"],
                "test/best_top1": best["top1"],
                "speed/images_per_s": images_per_s,
            }
        )
        logger.log(epoch, metrics)
        common.save_checkpoint(
            run_dir / "last.pth",
            common.training_state(student, optimizer, epoch + 1, best, args, student_head=student_head.state_dict()),
        )
        common.print_epoch(epoch, args.epochs, metrics, (time.time() - epoch_start) * (args.epochs - epoch - 1))

    last = common.evaluate(student, data, args.eval_batch_size, args.amp)
    common.write_summary(
        run_dir,
        args,
        best,
        last,
        "sskd",
        teacher_top1=teacher_result["top1"],
        teacher_file=str(teacher_file),
        teacher_head_file=str(head_file),
        teacher_head_test_ss_top1=head_test_ss,
    )
