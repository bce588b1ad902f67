"""Hierarchical self-supervised augmented knowledge distillation (HSAKD / HSSAKD).

Papers: C. Yang, Z. An, L. Cai, Y. Xu, "Hierarchical Self-supervised Augmented Knowledge
Distillation", IJCAI 2021, https://arxiv.org/abs/2107.13715, and "Knowledge Distillation
Using Hierarchical Self-Supervision Augmented Distribution", IEEE TNNLS 2022,
https://arxiv.org/abs/2109.03075. Reference code: winycg/HSAKD@28c8dc2 (docs/hssakd.md).

Every network gets L auxiliary classifiers after its intermediate stages
(common.AuxiliaryModel), each predicting a 4C-way "self-supervised augmented" label, class x
rotation (4y + k), for the four 90-degree rotations of every image. Stage 1 trains the
teacher's auxiliary classifiers with cross-entropy on those joint labels: on top of kd.py's
frozen cross-entropy teacher ("HSAKD" rows), or together with a teacher trained from scratch
(`--teacher-mode joint`, "HSAKD*"). Stage 2 trains the student: CE on the upright images
plus, over all four rotations, a KL term between each pair of same-numbered auxiliary
classifiers (the teacher's joint distributions at every depth) and one between the final
classifiers. Compared with kd.py: 4x the rows (rotations), auxiliary branches on both
networks, stage 1, L + 2 loss terms, and Nesterov momentum.

Run: python hssakd.py --teacher resnet56 --student resnet20
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

import common

METHOD_NAME = "hssakd"  # in run folder names, the config line and summary.json


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
    nesterov: bool = True
    """Nesterov momentum"""
    weight_decay: float = common.per_dataset(5e-4, imagenet=1e-4)
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
    # HSAKD
    kd_T: float = 3.0
    """softmax temperature T of the distillation KL"""
    ce_weight: float = 1.0
    """weight of the cross-entropy with the labels"""
    kl_p_weight: float = 1.0
    """weight of the final-classifier KL over all rotations (IJCAI Eq. 3)"""
    kl_q_weight: float = 1.0
    """weight of the summed auxiliary-branch KLs (IJCAI Eq. 4)"""
    student_aux_ce_weight: float = 0.0
    """ablation only: CE of the student's branches on the joint labels (not in HSAKD)"""
    teacher_mode: Literal["frozen", "joint"] = "frozen"
    """stage 1: branches on the frozen CE teacher ("HSAKD"), or teacher and branches from
    scratch ("HSAKD*"); the Teacher fields serve frozen mode"""
    teacher_aux_path: Optional[str] = None
    """a trained teacher with auxiliary classifiers (ours or HSAKD's "net" file); skips stage 1"""
    teacher_epochs: Optional[int] = None
    """stage-1 epochs; unset means 100 (frozen) or 240 (joint)"""
    teacher_milestones: Tuple[int, ...] = ()
    """stage-1 lr milestones; empty means 30,60,90 (frozen) or 150,180,210 (joint)"""
    teacher_lr: float = common.per_dataset(0.05, imagenet=0.1)
    """stage-1 initial lr (--lr-gamma, --momentum, --nesterov, --weight-decay apply too)"""
    teacher_ckpt: Literal["last", "best"] = "last"
    """stage-1 epoch the student learns from: last, or best max-over-branches 4C-way test top-1"""
    teacher_seed: int = 1
    """seed of stage 1 (fixed, so every student seed shares one cached teacher)"""


def teacher_loss(logits, aux_logits, labels, joint_labels):
    """Stage 1 (IJCAI Eq. 1, weights 1): CE of the final classifier on the upright rows (0::4) plus,
    per branch, CE on the joint labels 4y + k over all 4B rows. logits [4B, C], aux [4B, 4C]."""
    ce = F.cross_entropy(logits[0::4], labels)
    aux_ce = sum(F.cross_entropy(branch, joint_labels) for branch in aux_logits)
    return {"ce": ce, "aux_ce": aux_ce, "total": ce + aux_ce}


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton's KD term: T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over
    classes and averaged over the rows ("batchmean"; RepDistiller's DistillKL writes it
    as sum / B). The T^2 keeps the gradient magnitude independent of T (Hinton et al.,
    section 2)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)  # [B, C]
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)  # [B, C]
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def student_loss(logits, aux_logits, teacher_logits, teacher_aux_logits, labels, joint_labels, args):
    """Stage 2 (IJCAI Eqs. 2-5), fp32 logits: CE on the upright rows + kl_q (the branches' 4C-way KLs,
    summed) + kl_p (the final classifiers' KL), both KLs over all 4B rows. Every term and the total."""
    terms = {"ce": F.cross_entropy(logits[0::4], labels)}  # logits [4B, C], upright rows 0::4
    branch_kls = [kd_loss(*pair, args.kd_T) for pair in zip(aux_logits, teacher_aux_logits)]  # [4B, 4C]
    terms.update({f"kl_q_{branch}": kl for branch, kl in enumerate(branch_kls, 1)})
    terms["kl_q"] = sum(branch_kls)
    terms["kl_p"] = kd_loss(logits, teacher_logits, args.kd_T)
    total = args.ce_weight * terms["ce"] + args.kl_q_weight * terms["kl_q"] + args.kl_p_weight * terms["kl_p"]
    if args.student_aux_ce_weight:
        terms["aux_ce"] = sum(F.cross_entropy(branch, joint_labels) for branch in aux_logits)
        total = total + args.student_aux_ce_weight * terms["aux_ce"]
    terms["total"] = total
    return terms


def check_pair(teacher_arch, student_arch):
    """Branch l of the student mimics branch l of the teacher, so both need the same L."""
    for arch in (teacher_arch, student_arch):
        if not common.auxiliary_supported(arch):
            supported = [name for name in common.MODEL_NAMES if common.auxiliary_supported(name)]
            raise common.ConfigError(f"{arch} has no auxiliary classifiers; choose one of: {', '.join(supported)}")
    teacher_branches, student_branches = map(common.auxiliary_branch_count, (teacher_arch, student_arch))
    if teacher_branches != student_branches:
        raise common.ConfigError(
            f"{teacher_arch} has {teacher_branches} auxiliary branches, {student_arch} {student_branches}; HSAKD "
            f"distils branch l into branch l: pick two with the same number (4: VGGs, MobileNetV2, *ResNet50*)"
        )


def stage1_recipe(args):
    """(epochs, milestones) of stage 1: train_teacher_freezed.sh or train_teacher_cifar.sh."""
    frozen = args.teacher_mode == "frozen"
    epochs = args.teacher_epochs if args.teacher_epochs is not None else (100 if frozen else 240)
    return epochs, args.teacher_milestones or ((30, 60, 90) if frozen else (150, 180, 210))


STAGE1_ADVICE = "Lower --teacher-lr or turn off --amp, then rerun."
STAGE1_RECIPE = ("teacher_mode", "dataset", "normalize", "train_subset", "batch_size", "teacher_lr", "lr_gamma")
STAGE1_RECIPE += ("momentum", "nesterov", "weight_decay", "teacher_seed", "amp")


def stage1_cache_path(args, ce_file):
    """checkpoints/<dataset>/<CE teacher file stem, or arch>_aux_<mode>_e<epochs>_<digest>.pth;
    the digest covers STAGE1_RECIPE and the CE teacher's bytes (frozen mode), not the
    student's --seed (common.stage_digest)."""
    epochs, milestones = stage1_recipe(args)
    recipe = {name: getattr(args, name) for name in STAGE1_RECIPE} | {"arch": args.teacher, "milestones": milestones}
    base = Path(ce_file).stem if ce_file else args.teacher + (f"_n{args.train_subset}" if args.train_subset else "")
    name = f"{base}_aux_{args.teacher_mode}_e{epochs}_{common.stage_digest(8, recipe, ce_file)}.pth"
    return Path(args.checkpoint_dir) / args.dataset / name


def train_stage1(cache_path, args, data, device, ce_teacher, ce_file):
    """Stage 1: CE on joint labels for the teacher's branches (frozen: on the CE teacher, backbone in eval
    mode, stage outputs detached; joint: all from scratch). Runs in runs/teacher_<cache name>_<dataset>,
    resuming there, then publishes its last epoch to `cache_path`, its best as <name>_best.pth."""
    frozen = args.teacher_mode == "frozen"
    epochs, milestones = stage1_recipe(args)
    print(f"stage 1: training the {args.teacher_mode} teacher's branches ({epochs} epochs)", flush=True)
    backbone = ce_teacher if frozen else common.build_model(args.teacher, data.num_classes)
    model = common.AuxiliaryModel(backbone, 4 * data.num_classes)
    model = common.prepare_model(model, device, args.amp)
    model.backbone.requires_grad_(not frozen)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = common.make_sgd(trained, args.teacher_lr, args)
    run_dir = Path(args.output_dir) / f"teacher_{cache_path.stem}_{args.dataset}"
    run_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, best, _ = common.resume_state(run_dir, model, optimizer, resume=True)
    best_ss = best.get("ss_top1", -1.0)
    logger = common.Logger(run_dir, args, start_epoch)
    for epoch in range(start_epoch, epochs):
        lr = common.lr_at_epoch(epoch, args.teacher_lr, milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        model.train()
        if frozen:
            model.backbone.eval()  # the CE teacher's BN statistics stay as they are
        meter = common.Meter(run_dir, STAGE1_ADVICE)
        epoch_start = time.time()
        generator = common.epoch_generator(args.teacher_seed, epoch)
        for images, labels, _ in common.train_batches(data, args.batch_size, generator):
            rotated = common.rotations(images)  # [4B, 3, H, W]
            joint_labels = common.rotation_joint_labels(labels)  # [4B]: 4y + k
            with common.autocast(device, args.amp):
                # Branch l [4B, 4C] runs on stage l's output, detached if frozen (grad=False).
                aux_logits, logits = model(rotated, detach_stages=frozen)
                aux_logits = [branch.float() for branch in aux_logits]
                logits = logits.float()
            losses = teacher_loss(logits, aux_logits, labels, joint_labels)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            for name, value in losses.items():
                meter.add(f"loss/{name}", value, len(labels))
            meter.add_top1("train/top1", logits[0::4], labels)
        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir, STAGE1_ADVICE)
        images_per_s = len(data.train_labels) / (time.time() - epoch_start)
        result = common.evaluate(model.backbone, data, args.eval_batch_size, args.amp)
        branches = common.auxiliary_accuracy(model, data, args.eval_batch_size, args.amp)
        if max(branches["ss_top1"]) > best_ss:  # HSAKD's <arch>_best.pth: the best branch
            best_ss = max(branches["ss_top1"])
            best = {**result, "epoch": epoch, "ss_top1": best_ss}
            best_weights = common.model_payload(model, epoch + 1, result, args)
            common.save_checkpoint(run_dir / "best.pth", best_weights)
        metrics.update({"lr": lr, "test/top1": result["top1"], "test/top5": result["top5"]})
        metrics.update({"test/best_top1": best["top1"], "speed/images_per_s": images_per_s})
        metrics.update({f"test/ss_top1_{branch}": acc for branch, acc in enumerate(branches["ss_top1"], 1)})
        logger.log(epoch, metrics)
        state = common.training_state(model, optimizer, epoch + 1, best, args)
        common.save_checkpoint(run_dir / "last.pth", state)
        common.print_epoch(epoch, epochs, metrics, epoch_start)
    provenance = {"teacher_mode": args.teacher_mode, "ce_teacher": str(ce_file) if ce_file else None}
    best_cache = cache_path.with_name(cache_path.stem + "_best.pth")
    common.publish_stage(run_dir / "best.pth", best_cache, "stage 1's best checkpoint", **provenance)
    common.publish_stage(run_dir / "last.pth", cache_path, "stage 1's last.pth", **provenance)  # last: it is done


def prepare_teacher(args, data, device):
    """The stage-1 teacher, frozen in eval mode: --teacher-aux-path, else the cached stage 1,
    else trained by train_stage1 (frozen mode: on kd.py's CE teacher, trained first when
    missing), on its own random stream (--teacher-seed). Returns (model, file, the mode it
    was trained in)."""
    ce_teacher = None
    ce_file = None
    if args.teacher_mode == "frozen" and not args.teacher_aux_path:
        ce_teacher, ce_result = common.load_teacher(args, data, device)
        ce_file = ce_result["file"]
    cache_path = None if args.teacher_aux_path else stage1_cache_path(args, ce_file)
    path = common.cached_stage(
        args.teacher_aux_path,
        cache_path,
        lambda cache: train_stage1(cache, args, data, device, ce_teacher, ce_file),
        seed=args.teacher_seed,  # one stage 1 serves every student seed
    )
    if not args.teacher_aux_path and args.teacher_ckpt == "best":
        path = path.with_name(path.stem + "_best.pth")
    remedy = None if args.teacher_aux_path else "It is a cached stage 1: delete it and rerun to train it again."
    checkpoint = common.load_checkpoint(path, "teacher checkpoint", remedy)
    build = common.build_auxiliary_model
    teacher = common.model_from_checkpoint(args.teacher, data.num_classes, checkpoint, str(path), build)
    unknown = "unknown (--teacher-aux-path)" if args.teacher_aux_path else args.teacher_mode
    mode = checkpoint.get("teacher_mode", unknown)
    return common.prepare_model(teacher.eval().requires_grad_(False), device, args.amp), path, mode


if __name__ == "__main__":
    common.show_user_errors_plainly()
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "repdistiller")
    common.check_architectures(args.teacher, args.student)
    common.print_config(args, METHOD_NAME)
    # --- METHOD: both networks need as many branches, checked before any work ---
    check_pair(args.teacher, args.student)
    # --- END METHOD ---
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device, args.sync_bn)
    data = common.load_data(args, device)
    run_name = f"{METHOD_NAME}_{args.teacher_mode}_{args.teacher}_{args.student}_{args.dataset}_seed{args.seed}"
    run_dir = common.prepare_run_dir(args, run_name)

    # --- METHOD: stage 1, a teacher with trained auxiliary classifiers ---
    teacher, teacher_file, teacher_mode = prepare_teacher(args, data, device)
    teacher_result = common.evaluate(teacher.backbone, data, args.eval_batch_size, args.amp)
    teacher_branches = common.auxiliary_accuracy(teacher, data, args.eval_batch_size, args.amp)
    branch_top1 = " ".join(f"{acc:.2f}" for acc in teacher_branches["ss_top1"])
    print(
        f"teacher {teacher.arch} ({teacher_mode}) from {teacher_file}: test top1 {teacher_result['top1']:.2f} "
        f"top5 {teacher_result['top5']:.2f}; branch {4 * data.num_classes}-way top1 {branch_top1}",
        flush=True,
    )
    # The student is the backbone (evaluated, saved, reported as kd.py's); its branches train and resume with it.
    student_with_branches = common.build_auxiliary_model(args.student, data.num_classes)
    student_with_branches = common.prepare_model(student_with_branches, device, args.amp)
    student = student_with_branches.backbone
    base_lr = common.default_lr(args.student, args.learning_rate)
    optimizer = common.make_sgd(student_with_branches.parameters(), base_lr, args)
    trained_with = {"auxiliary_classifier": student_with_branches.auxiliary_classifier}
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
        for images, labels, _ in common.train_batches(data, args.batch_size, generator):
            # --- METHOD: 4 rotations (row 4i+k), KL of every branch and of the logits ---
            rotated = common.rotations(images)  # [4B, 3, H, W]
            joint_labels = common.rotation_joint_labels(labels)  # [4B]: 4y + k
            with common.autocast(device, args.amp):
                # Logits [4B, C]; branch l [4B, 4C] (copies of the later stages) runs on stage l's output.
                student_aux, student_logits = student_with_branches(rotated)
                student_aux = [branch.float() for branch in student_aux]
                student_logits = student_logits.float()
                with torch.no_grad():  # the frozen teacher: nothing reaches it
                    teacher_aux, teacher_logits = teacher(rotated)
                    teacher_aux = [branch.float() for branch in teacher_aux]
                    teacher_logits = teacher_logits.float()
            losses = student_loss(student_logits, student_aux, teacher_logits, teacher_aux, labels, joint_labels, args)
            loss_ce = losses["ce"]
            loss = losses["total"]
            # --- END METHOD ---
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # --- METHOD: HSAKD's training metrics ---
            for name, value in losses.items():
                if name != "ce":  # logged below, as in kd.py
                    meter.add(f"loss/{name}", value, len(labels))
            meter.add_top1("train/top1", student_logits[0::4], labels)
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
    # --- METHOD: the teacher and both networks' branch diagnostics, in summary.json ---
    student_branches = common.auxiliary_accuracy(student_with_branches, data, args.eval_batch_size, args.amp)
    summary = {"teacher_top1": teacher_result["top1"], "teacher_mode": teacher_mode, "teacher_file": str(teacher_file)}
    summary.update(teacher_arch=teacher.arch, student_arch=args.student)
    summary.update({f"teacher_{name}": value for name, value in teacher_branches.items()})
    summary.update({f"student_{name}": value for name, value in student_branches.items()})
    # --- END METHOD ---
    common.write_summary(run_dir, args, best, last, METHOD_NAME, **summary)
