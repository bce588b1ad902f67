"""Knowledge Distillation Meets Self-Supervision (SSKD) with the official CIFAR recipe.

Paper: G. Xu, Z. Liu, X. Li, C. C. Loy, ECCV 2020, https://arxiv.org/abs/2006.07114. Reference code:
xuguodong03/SSKD@661b972 (`student.py`, `wrapper.py`, `cifar.py`; docs/sskd.md).

Every training image comes in four copies, rotated by 0, 90, 180 and 270 degrees; teacher and student each get a
projection head, and a rotated copy should be most similar (cosine) to its own upright copy. Stages: kd.py's CE
teacher; 60 epochs training the teacher's head alone; the student, on the labels, the teacher's softened classes on
upright (KD) and rotated ("tf") copies and its similarity distribution ("ss"), less the rotated rows the teacher errs
worst on ("selective transfer"). Compared with kd.py: four copies, two heads, stage 2, sskd_loss.

Run: python sskd.py --teacher resnet32x4 --student resnet8x4
"""

import functools
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD_NAME = "sskd"  # in run folder names, the config line and summary.json


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
    student: str = common.per_dataset("resnet8x4", imagenet="resnet18_imagenet")
    """zoo architecture of the student"""
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
    nesterov: bool = False
    """Nesterov momentum"""
    weight_decay: float = 5e-4
    """SGD weight decay, on every trained parameter"""
    normalize: Optional[common.NormalizeName] = None
    """normalisation constants; unset: CIFAR-10's on cifar10, the recipe's on cifar100, else ImageNet's"""
    # Teacher
    teacher: str = common.per_dataset("resnet32x4", imagenet="resnet34_imagenet")
    """zoo architecture of the teacher"""
    teacher_path: Optional[str] = common.per_dataset(None, imagenet="torchvision:{teacher}")
    """teacher checkpoint (formats: README.md); unset: cached, trained by baseline.py if missing"""
    teacher_sha256: Optional[str] = None
    """sha256 (hex, or its first 8+ digits) the --teacher-path file or URL must have"""
    checkpoint_dir: str = "checkpoints"
    """where trained teachers and teacher stages are cached"""
    ce_teacher_epochs: int = 240
    """epochs of baseline.py training when the teacher has to be trained"""
    teacher_expected_acc: Optional[float] = None
    """expected teacher test top-1; unset: RepDistiller's value for known CIFAR-100 teachers"""
    strict_teacher_check: bool = False
    """abort (not warn) when the teacher's top-1 is more than 0.5 from the expected value"""
    allow_teacher_normalize_mismatch: bool = False
    """use a teacher whose recorded --normalize differs from this run's (warn, do not refuse)"""
    # SSKD
    kd_T: float = 4.0
    """softmax temperature T of the distillation KL"""
    ce_weight: float = common.per_dataset(0.1, imagenet=1.0)
    """weight of the cross-entropy with the labels"""
    kd_weight: float = 0.9
    """weight of the KD term"""
    tf_weight: float = 2.7
    """weight of the KD term on the rotated copies (code value; see docs for the paper's)"""
    ss_weight: float = 10.0
    """weight of the similarity-distribution term (code value; see docs for the paper's)"""
    tf_T: float = 4.0
    """temperature of the rotated-copies KD term"""
    ss_T: float = 0.5
    """temperature of the similarity-distribution term"""
    ratio_tf: float = 1.0
    """fraction of teacher-wrong rotated rows kept in the tf term (best-ranked first)"""
    ratio_ss: float = 0.75
    """fraction of teacher-wrong rotated rows kept in the ss term (best-ranked first)"""
    stable_sort: bool = True
    """stable ranking: ties at the cut keep the lower row (SSKD: torch's unspecified order) [INTERP]"""
    rotation_pipeline: Literal["sskd", "gpu"] = common.per_dataset("sskd", imagenet="gpu")
    """sskd: flip, rotate, crop each copy (cifar.py); gpu: one crop+flip, then rotate [INTERP]"""
    # SSKD stage 2: the teacher's projection head
    teacher_head_path: Optional[str] = None
    """trained head (ours or SSKD's ckpt/teacher.pth); unset: cached, trained if missing [INTERP]"""
    t_epochs: int = common.per_dataset(60, imagenet=30)
    """epochs of teacher-head training (stage 2; stage 1 is --ce-teacher-epochs)"""
    t_lr: float = common.per_dataset(0.05, imagenet=0.1)
    """lr of the head (its SGD takes the recipe's lr gamma, momentum, Nesterov, weight decay)"""
    t_milestones: Tuple[int, ...] = common.per_dataset((30, 45), imagenet=(10, 20))
    """0-based head epochs at which the head lr is multiplied by --lr-gamma"""
    head_T: float = 1.0
    """temperature of the head's contrastive CE (code: raw cosines; the paper has a tau)"""
    head_seed: int = 0
    """seed of the head's initialisation and data order: one head for every student seed [INTERP]"""


def sskd_batches(data, args, generator):
    """Four copies per image, row 4i+k = image i rotated k*90 degrees: (normalised [4B, 3, H, W], labels, indices).
    sskd (cifar.py): a flip per image, its 4 rotations, RandomCrop(32, 4) per copy; gpu: crop+flip, then rotate."""
    gpu_pipeline = args.rotation_pipeline == "gpu"
    for images, labels, indices in common.train_batches(data, args.batch_size, generator, augment=gpu_pipeline):
        if gpu_pipeline:
            layout = torch.channels_last if data.channels_last else torch.contiguous_format  # --amp
            yield common.rotations(images).contiguous(memory_format=layout), labels, indices
            continue
        raw = data.train_images[indices]  # uint8: the crop zero-pads before normalising, as there
        flip = torch.rand(len(indices), generator=generator) < 0.5
        copies = common.rotations(common.hflip(raw, flip))  # [4B, 3, 32, 32]
        top, left = torch.randint(0, 9, (2, len(copies)), generator=generator)
        yield data.normalize(common.crop(copies, top, left, padding=4)), labels, indices


def split_rotations(rows):
    """[4B, ...] -> (upright [B, ...], rotated [3B, ...]); rotated row j: image j // 3, rotation j % 3 + 1."""
    per_image = rows.unflatten(0, (-1, 4))
    return per_image[:, 0], per_image[:, 1:].flatten(0, 1)


def projection_head(feat_dim):
    """SSKD's proj_head (wrapper.py): Linear(d, d) - ReLU - Linear(d, d), PyTorch's init; keys = `proj_head.*`."""
    return nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, feat_dim))


def similarity_matrix(projections):
    """S[j, b] = cos(rotated j, upright b): [4B, d] -> [3B, B], positive column j // 3; fp32 (bf16 blurs S / 0.5)."""
    with torch.autocast(projections.device.type, enabled=False):
        upright, rotated = split_rotations(F.normalize(projections.float(), dim=1, eps=1e-8))
        return rotated @ upright.T


def positive_columns(similarity):
    """The column of each rotated row's own upright image: [3B, B] -> [3B] = 0,0,0,1,1,1,..."""
    return torch.arange(similarity.shape[1], device=similarity.device).repeat_interleave(3)


@torch.no_grad()
def selective_transfer_mask(teacher_scores, target_columns, keep_ratio, stable_sort=True):
    """Error-level ranking (docs/sskd.md): keep every row whose teacher top-1 is its target, plus the
    floor(wrong * keep_ratio) wrong rows whose target the teacher ranks best. [N, K], [N] -> bool [N]."""
    target_scores = teacher_scores.gather(1, target_columns[:, None])  # [N, 1]
    rank = (teacher_scores > target_scores).sum(dim=1)  # position of the target in the sorted row
    wrong = (rank > 0).sum()
    # float64 as Python's float, so the floor matches int(wrong * ratio) of the official code
    keep_count = len(rank) - wrong + torch.floor(wrong.double() * keep_ratio).long()
    order = torch.sort(rank, stable=stable_sort).indices  # correct rows, then the best-ranked wrong
    keep = torch.zeros_like(rank, dtype=torch.bool)
    keep[order] = torch.arange(len(rank), device=rank.device) < keep_count
    return keep


def kl_per_row(student_scores, teacher_scores, temperature):
    """kd_loss before the mean over rows: T^2 * KL(teacher_T || student_T) of each row, [N, K] -> [N]."""
    log_student = F.log_softmax(student_scores / temperature, dim=1)
    teacher_probs = F.softmax(teacher_scores / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="none").sum(dim=1) * temperature**2


def mean_over_kept(values, keep):
    """The mean of `values` over the rows that selective transfer keeps (the kept set |I|)."""
    return (values * keep).sum() / keep.sum().clamp_min(1)


def sskd_loss(student_logits, teacher_logits, student_similarity, teacher_similarity, labels, args):
    """SSKD's student loss (student.py) on fp32 logits [4B, C], similarities [3B, B], labels [B]. Returns
    (unweighted ce, kd, tf, ss and the weighted total; the rotated rows [3B] the tf and ss terms keep)."""
    student_upright, student_rotated = split_rotations(student_logits)  # [B, C], [3B, C]
    teacher_upright, teacher_rotated = split_rotations(teacher_logits)
    teacher_probs = F.softmax(teacher_rotated / args.tf_T, dim=1)
    keep_tf = selective_transfer_mask(teacher_probs, labels.repeat_interleave(3), args.ratio_tf, args.stable_sort)
    ss_columns = positive_columns(teacher_similarity)
    keep_ss = selective_transfer_mask(teacher_similarity, ss_columns, args.ratio_ss, args.stable_sort)
    tf_rows = kl_per_row(student_rotated, teacher_rotated, args.tf_T)
    ss_rows = kl_per_row(student_similarity, teacher_similarity.detach(), args.ss_T)
    terms = {
        "ce": F.cross_entropy(student_upright, labels),  # only upright copies carry the hard label
        "kd": kl_per_row(student_upright, teacher_upright, args.kd_T).mean(),
        "tf": mean_over_kept(tf_rows, keep_tf),
        "ss": mean_over_kept(ss_rows, keep_ss),
    }
    weights = {"ce": args.ce_weight, "kd": args.kd_weight, "tf": args.tf_weight, "ss": args.ss_weight}
    terms["total"] = sum(weights[name] * terms[name] for name in weights)
    return terms, {"tf": keep_tf, "ss": keep_ss}


@torch.no_grad()
def ss_top1(model, head, data, batch_size, amp):
    """% of rotated test copies whose most similar upright copy in their batch is their own."""
    model.eval()
    meter = common.Meter()
    for images, _ in common.test_batches(data, batch_size, shard=True):
        with common.autocast(images.device, amp):
            feats, _ = model(common.rotations(images), is_feat=True)
            similarity = similarity_matrix(head(feats[-1]))
        meter.add_top1("ss_top1", similarity, positive_columns(similarity))
    return meter.averages()["ss_top1"]


def train_teacher_head(teacher, teacher_file, data, args, run_dir, cache_path):
    """Stage 2 (student.py's first loop): a fresh head on the frozen teacher, CE of cosines / head_T per rotated row."""
    print(f"no teacher head at {cache_path}: training the teacher head ({args.t_epochs} epochs)", flush=True)
    head = projection_head(teacher.feat_dim).to(data.test_labels.device)
    optimizer = common.make_sgd(head.parameters(), args.t_lr, args)
    teacher.eval()
    logger = common.Logger(run_dir, args, file_name="head_metrics.jsonl", tracking=False)
    for epoch in range(args.t_epochs):
        lr = common.lr_at_epoch(epoch, args.t_lr, args.t_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        meter = common.Meter(run_dir, HEAD_ADVICE)
        epoch_start = time.time()
        generator = common.epoch_generator(args.head_seed, epoch)
        for images, labels, _ in sskd_batches(data, args, generator):
            with common.autocast(images.device, args.amp):
                with torch.no_grad():
                    feats, _ = teacher(images, is_feat=True)
                similarity = similarity_matrix(head(feats[-1]))  # [3B, B], fp32
            positives = positive_columns(similarity)  # [3B]: each row's own upright image
            loss = F.cross_entropy(similarity / args.head_T, positives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add("loss/head", loss, len(similarity))
            meter.add_top1("train/ss_top1", similarity, positives)
        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir, HEAD_ADVICE)
        images_per_s = len(data.train_labels) / (time.time() - epoch_start)
        test_ss = ss_top1(teacher, head, data, args.batch_size, args.amp)
        metrics.update({"lr": lr, "test/ss_top1": test_ss, "speed/images_per_s": images_per_s})
        logger.log(epoch, metrics)
        common.print_epoch(epoch, args.t_epochs, metrics, epoch_start, stage="head epoch")
    recipe = {name: getattr(args, name) for name in HEAD_RECIPE}
    payload = {"head": head.state_dict(), "arch": args.teacher, "feat_dim": teacher.feat_dim, "recipe": recipe}
    common.save_checkpoint(cache_path, payload | {"teacher_file": str(teacher_file), "test_ss_top1": test_ss})


HEAD_ADVICE = "Lower --t-lr or turn off --amp, then rerun."  # the head's stage has no --resume
HEAD_RECIPE = ("dataset", "normalize", "train_subset", "batch_size", "t_epochs", "t_lr", "t_milestones", "lr_gamma")
HEAD_RECIPE += ("momentum", "nesterov", "weight_decay", "head_T", "head_seed", "rotation_pipeline", "amp")


def load_teacher_head(path, feat_dim, device):
    """A frozen head from this file's cache ({"head": ...}) or SSKD's ckpt/teacher.pth (proj_head.*)."""
    checkpoint = common.load_checkpoint(path, "teacher head", "If it is a cached head, delete it to train it again.")
    state = checkpoint.get("head")
    if state is None:  # SSKD's wrapper: the head's keys are proj_head.*
        wrapper = common.extract_state_dict(checkpoint).items()
        state = {key.removeprefix("proj_head."): value for key, value in wrapper if key.startswith("proj_head.")}
    with torch.device("meta"):  # no initialisation, no random draw: the weights come from the file
        head = projection_head(feat_dim)
    try:
        head.load_state_dict(state, assign=True)
    except RuntimeError as error:
        message = f"{path} holds no projection head for a {feat_dim}-d feature (check --teacher)"
        raise common.ConfigError(f"{message}: {str(error).splitlines()[0]}") from None
    test_ss = checkpoint.get("test_ss_top1")
    print(f"teacher head from {path}" + (f": test ss top1 {test_ss:.2f}" if test_ss is not None else ""), flush=True)
    return head.to(device).eval().requires_grad_(False), test_ss


def teacher_head_cache_path(args, teacher_file):
    """<teacher stem>_sskd_head_e<epochs>_<digest of the teacher file and HEAD_RECIPE>.pth beside the teacher."""
    teacher_cache = common.teacher_cache_path(args)
    digest = common.stage_digest(10, teacher_file, {name: getattr(args, name) for name in HEAD_RECIPE})
    return teacher_cache.with_name(f"{teacher_cache.stem}_sskd_head_e{args.t_epochs}_{digest}.pth")


if __name__ == "__main__":
    common.show_user_errors_plainly()
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "sskd")
    common.check_architectures(args.teacher, args.student)
    common.print_config(args, METHOD_NAME)
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device, args.sync_bn)
    data = common.load_data(args, device)
    run_name = f"{METHOD_NAME}_{args.teacher}_{args.student}_{args.dataset}_seed{args.seed}"
    run_dir = common.prepare_run_dir(args, run_name)

    # --- METHOD: stage 1, the frozen teacher; stage 2, its head: given, cached, or trained ---
    teacher, teacher_result = common.load_teacher(args, data, device)
    train_head = functools.partial(train_teacher_head, teacher, teacher_result["file"], data, args, run_dir)
    head_cache = teacher_head_cache_path(args, teacher_result["file"])  # one head serves every student seed
    head_file = common.cached_stage(args.teacher_head_path, head_cache, train_head, seed=args.head_seed)
    teacher_head, head_test_ss = load_teacher_head(head_file, teacher.feat_dim, device)
    # --- END METHOD ---
    student = common.build_model(args.student, data.num_classes)
    student = common.prepare_model(student, device, args.amp)
    base_lr = common.default_lr(args.student, args.learning_rate)
    # --- METHOD: the student's projection head is trained, saved and resumed with it ---
    student_head = common.prepare_model(projection_head(student.feat_dim), device, args.amp)
    optimizer = common.make_sgd([*student.parameters(), *student_head.parameters()], base_lr, args)
    trained_with = {"student_head": student_head}
    # --- END METHOD ---
    start_epoch, best, _ = common.resume_state(run_dir, student, optimizer, args.resume, args, trained_with)
    logger = common.Logger(run_dir, args, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        lr = common.lr_at_epoch(epoch, base_lr, args.lr_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        student.train()
        meter = common.Meter(run_dir)
        epoch_start = time.time()
        generator = common.epoch_generator(args.seed, epoch)
        for images, labels, _ in sskd_batches(data, args, generator):
            # --- METHOD: SSKD, four rotated copies through both networks and heads ---
            with common.autocast(device, args.amp):
                student_feats, student_logits = student(images, is_feat=True)
                student_logits = student_logits.float()
                student_similarity = similarity_matrix(student_head(student_feats[-1]))  # [3B, B]
                with torch.no_grad():
                    teacher_feats, teacher_logits = teacher(images, is_feat=True)
                    teacher_logits = teacher_logits.float()
                    teacher_similarity = similarity_matrix(teacher_head(teacher_feats[-1]))
            losses, kept = sskd_loss(
                student_logits, teacher_logits, student_similarity, teacher_similarity, labels, args
            )
            loss_ce, loss = losses["ce"], losses["total"]
            # --- END METHOD ---
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # --- METHOD: SSKD's training metrics ---
            for term in ("kd", "tf", "ss", "total"):
                meter.add(f"loss/{term}", losses[term], len(labels))
            meter.add_top1("train/ss_top1", student_similarity, positive_columns(student_similarity))
            meter.add_sum("train/kept_tf", 100.0 * kept["tf"].sum(), len(kept["tf"]))
            meter.add_sum("train/kept_ss", 100.0 * kept["ss"].sum(), len(kept["ss"]))
            meter.add_top1("train/top1", split_rotations(student_logits)[0], labels)  # upright copies
            # --- END METHOD ---
            meter.add("loss/ce", loss_ce, len(labels))

        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir)
        images_per_s = len(data.train_labels) / (time.time() - epoch_start)
        result = common.evaluate(student, data, args.eval_batch_size, args.amp)
        if result["top1"] > best["top1"]:
            best = {**result, "epoch": epoch}
            best_weights = common.model_payload(student, epoch + 1, result, args)
            common.save_checkpoint(run_dir / "best.pth", best_weights)
        metrics.update({"lr": lr, "test/top1": result["top1"], "test/top5": result["top5"]})
        metrics.update({"test/best_top1": best["top1"], "speed/images_per_s": images_per_s})
        logger.log(epoch, metrics)
        state = common.training_state(student, optimizer, epoch + 1, best, args, trained_with)
        common.save_checkpoint(run_dir / "last.pth", state)
        common.print_epoch(epoch, args.epochs, metrics, epoch_start)

    last = common.evaluate(student, data, args.eval_batch_size, args.amp)
    # --- METHOD: the teacher and its head, recorded in summary.json ---
    summary = {"teacher_top1": teacher_result["top1"], "teacher_file": str(teacher_result["file"])}
    summary.update(teacher_head_file=str(head_file), teacher_head_test_ss_top1=head_test_ss)
    # --- END METHOD ---
    common.write_summary(run_dir, args, best, last, METHOD_NAME, **summary)
