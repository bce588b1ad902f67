"""Hierarchical self-supervised augmented knowledge distillation (HSAKD / HSSAKD).

Papers: C. Yang, Z. An, L. Cai, Y. Xu, "Hierarchical Self-supervised Augmented Knowledge Distillation", IJCAI 2021,
https://arxiv.org/abs/2107.13715, and "Knowledge Distillation Using Hierarchical Self-Supervision Augmented
Distribution", IEEE TNNLS 2022, https://arxiv.org/abs/2109.03075. Reference code: winycg/HSAKD@28c8dc2 (docs/hssakd.md).

Every network gets L auxiliary classifiers after its intermediate stages (common.AuxiliaryModel), each predicting a
4C-way "self-supervised augmented" label, class x rotation (4y + k), for the four 90-degree rotations of every image.
Stage 1 trains the teacher's auxiliary classifiers with cross-entropy on those joint labels: on top of kd.py's frozen
cross-entropy teacher ("HSAKD" rows), or together with a teacher trained from scratch (`--teacher-mode joint`,
"HSAKD*"). Stage 2 trains the student: CE on the upright images plus, over all four rotations, a KL term between each
pair of same-numbered auxiliary classifiers (the teacher's joint distributions at every depth) and one between the
final classifiers. Compared with kd.py: 4x the rows (rotations), auxiliary branches on both networks, stage 1, L + 2
loss terms, and Nesterov momentum.

Run: python hssakd.py --teacher resnet56 --student resnet20
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

import common


@dataclass
class Args:
    # Run
    dataset: Literal["cifar100", "cifar10"] = "cifar100"
    """dataset to train on"""
    data_dir: str = "data"
    """folder holding cifar-100-python/ or cifar-10-batches-py/ (downloaded there when missing)"""
    seed: int = 1
    """seed of python, numpy, torch and of the data order and augmentation"""
    torch_deterministic: bool = True
    """deterministic algorithms (cuDNN deterministic, no benchmark autotuning)"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; unset means cuda when available"""
    amp: bool = False
    """bf16 autocast + channels_last (CUDA, or CPUs with AVX512-BF16/AMX)"""
    output_dir: str = "runs"
    """parent folder of the run folder (metrics.jsonl, last.pth, best.pth, summary.json)"""
    run_name: Optional[str] = None
    """run folder name; unset means <method>_<networks>_<dataset>_seed<seed>"""
    resume: bool = False
    """continue the run in <output-dir>/<run-name> from its last finished epoch"""
    resume_with_changes: bool = False
    """with --resume, accept arguments that differ from the interrupted run's (recorded in resumes.jsonl)"""
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
    # Recipe
    student: str = "resnet8x4"
    """zoo architecture of the student"""
    epochs: int = 240
    """number of training epochs"""
    batch_size: int = 64
    """training batch size"""
    learning_rate: Optional[float] = None
    """initial lr; unset means the recipe's value for the architecture (docs/<method>.md)"""
    lr_milestones: Tuple[int, ...] = (150, 180, 210)
    """0-based epochs at which the lr is multiplied by --lr-gamma"""
    lr_gamma: float = 0.1
    """lr decay factor at each milestone"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = True
    """Nesterov momentum"""
    weight_decay: float = 5e-4
    """SGD weight decay, on every trained parameter"""
    normalize: Optional[Literal["repdistiller", "sskd", "cifar10"]] = None
    """normalisation constants; unset means CIFAR-10's on cifar10, the recipe's on cifar100 (docs/<method>.md)"""
    # Teacher
    teacher: str = "resnet32x4"
    """zoo architecture of the teacher"""
    teacher_path: Optional[str] = None
    """teacher checkpoint (formats: README.md); unset means the cached one, trained with baseline.py when missing"""
    checkpoint_dir: str = "checkpoints"
    """where trained teachers and teacher stages are cached"""
    ce_teacher_epochs: int = 240
    """epochs of baseline.py training when the teacher has to be trained"""
    teacher_expected_acc: Optional[float] = None
    """expected teacher test top-1; unset means the RepDistiller value for known CIFAR-100 teachers"""
    strict_teacher_check: bool = False
    """abort (instead of warn) when the teacher's top-1 differs from the expected value by > 0.5"""
    allow_teacher_normalize_mismatch: bool = False
    """use a teacher whose recorded --normalize differs from this run's (warn instead of refusing)"""
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
    """stage 1: train branches on the frozen CE teacher ("HSAKD"), or train teacher and branches
    together from scratch ("HSAKD*"); the Teacher group's fields serve frozen mode"""
    teacher_aux_path: Optional[str] = None
    """a trained teacher with auxiliary classifiers (ours or HSAKD's "net" file); skips stage 1"""
    teacher_epochs: Optional[int] = None
    """stage-1 epochs; unset means 100 (frozen) or 240 (joint)"""
    teacher_milestones: Tuple[int, ...] = ()
    """stage-1 lr milestones; empty means 30,60,90 (frozen) or 150,180,210 (joint)"""
    teacher_lr: float = 0.05
    """stage-1 initial lr; --lr-gamma, --momentum, --nesterov and --weight-decay apply to stage 1 too"""
    teacher_ckpt: Literal["last", "best"] = "last"
    """stage-1 epoch the student learns from: last, or best max-over-branches 4C-way test top-1"""
    teacher_seed: int = 1
    """seed of stage 1 (fixed, so every student seed shares one cached teacher)"""
    mbv2_variant: Literal["repdistiller", "hsakd"] = "repdistiller"
    """MobileNetV2 means RepDistiller's (stride-2 stem), or HSAKD's stride-1 one (MobileNetV2_hsakd)"""


def teacher_loss(logits, aux_logits, labels, joint_labels):
    """Stage 1 (IJCAI Eq. 1, weights 1): CE of the final classifier on the upright rows (0::4) plus,
    for every branch, CE on the joint labels 4y + k over all 4B rows. logits [4B, C], aux [4B, 4C]."""
    ce = F.cross_entropy(logits[0::4], labels)
    aux_ce = sum(F.cross_entropy(branch, joint_labels) for branch in aux_logits)
    return {"ce": ce, "aux_ce": aux_ce, "total": ce + aux_ce}


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton's KD term: T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes
    and averaged over the rows ("batchmean"; RepDistiller's DistillKL writes it as sum / B).
    The T^2 keeps the gradient magnitude independent of T (Hinton et al., section 2)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)  # [B, C]
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)  # [B, C]
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def student_loss(logits, aux_logits, teacher_logits, teacher_aux_logits, labels, joint_labels, args):
    """Stage 2 (IJCAI Eqs. 2-5): CE on the upright rows + kl_q (sum over branches of the 4C-way KL)
    + kl_p (the final classifiers' KL), both KLs over all 4B rows. Returns every term and the total."""
    logits, teacher_logits = logits.float(), teacher_logits.float()  # bf16 under --amp: the losses in fp32
    aux_logits, teacher_aux_logits = [b.float() for b in aux_logits], [b.float() for b in teacher_aux_logits]
    terms = {"ce": F.cross_entropy(logits[0::4], labels)}  # logits [4B, C], upright rows 0::4
    branch_kls = [kd_loss(s, t, args.kd_T) for s, t in zip(aux_logits, teacher_aux_logits)]  # [4B, 4C]
    terms.update({f"kl_q_{branch}": kl for branch, kl in enumerate(branch_kls, 1)})
    terms["kl_q"] = sum(branch_kls)
    terms["kl_p"] = kd_loss(logits, teacher_logits, args.kd_T)
    total = args.ce_weight * terms["ce"] + args.kl_q_weight * terms["kl_q"] + args.kl_p_weight * terms["kl_p"]
    if args.student_aux_ce_weight:
        terms["aux_ce"] = sum(F.cross_entropy(branch, joint_labels) for branch in aux_logits)
        total = total + args.student_aux_ce_weight * terms["aux_ce"]
    terms["total"] = total
    return terms


def resolve_arch(name, args):
    return "MobileNetV2_hsakd" if name == "MobileNetV2" and args.mbv2_variant == "hsakd" else name


def check_pair(teacher_arch, student_arch):
    """Branch l of the student mimics branch l of the teacher, so both need the same L."""
    for arch in (teacher_arch, student_arch):
        if not common.auxiliary_supported(arch):
            supported = [name for name in common.MODEL_NAMES if common.auxiliary_supported(name)]
            raise common.ConfigError(f"{arch} has no auxiliary classifiers; choose one of: {', '.join(supported)}")
    teacher_branches, student_branches = map(common.auxiliary_branch_count, (teacher_arch, student_arch))
    if teacher_branches != student_branches:
        raise common.ConfigError(
            f"{teacher_arch} has {teacher_branches} auxiliary classifiers but {student_arch} has {student_branches}; "
            f"HSAKD distils branch l into branch l, so pick a pair with the same number: 3 for CIFAR ResNets, WRNs, "
            f"ShuffleV1, ShuffleV2; 4 for VGGs, MobileNetV2, ResNet50"
        )


def stage1_recipe(args):
    """(epochs, milestones) of stage 1: train_teacher_freezed.sh or train_teacher_cifar.sh."""
    frozen = args.teacher_mode == "frozen"
    epochs = args.teacher_epochs if args.teacher_epochs is not None else (100 if frozen else 240)
    return epochs, args.teacher_milestones or ((30, 60, 90) if frozen else (150, 180, 210))


# Everything stage 1's result depends on besides the CE teacher file; the cache name carries a digest.
STAGE1_RECIPE = ("teacher_mode", "dataset", "normalize", "train_subset", "batch_size", "teacher_lr", "lr_gamma")
STAGE1_RECIPE += ("momentum", "nesterov", "weight_decay", "teacher_seed", "amp")


def stage1_cache_path(args, teacher_arch, ce_file):
    """checkpoints/<dataset>/<CE teacher file stem, or arch>_aux_<mode>_e<epochs>_<digest>.pth; the digest covers
    STAGE1_RECIPE and the CE teacher's bytes (frozen mode), not the student's --seed (common.stage_digest)."""
    epochs, milestones = stage1_recipe(args)
    recipe = {name: getattr(args, name) for name in STAGE1_RECIPE} | {"arch": teacher_arch, "milestones": milestones}
    base = Path(ce_file).stem if ce_file else teacher_arch + (f"_n{args.train_subset}" if args.train_subset else "")
    name = f"{base}_aux_{args.teacher_mode}_e{epochs}_{common.stage_digest(8, recipe, ce_file)}.pth"
    return Path(args.checkpoint_dir) / args.dataset / name


def train_stage1(args, data, device, teacher_arch, ce_teacher, ce_file, cache_path):
    """Stage 1: CE on joint labels for the teacher's branches (frozen: on the CE teacher, whose
    backbone stays in eval mode with detached stage outputs; joint: everything from scratch).
    Runs in runs/teacher_<cache name>_<dataset>, resuming there after an interruption."""
    frozen = args.teacher_mode == "frozen"
    epochs, milestones = stage1_recipe(args)
    print(f"stage 1: training the {args.teacher_mode} teacher's branches ({epochs} epochs) -> {cache_path}", flush=True)
    common.seed_everything(args.teacher_seed, args.torch_deterministic)
    backbone = ce_teacher if frozen else common.build_model(teacher_arch, data.num_classes)
    model = common.prepare_model(common.AuxiliaryModel(backbone, 4 * data.num_classes), device, args.amp)
    model.backbone.requires_grad_(not frozen)
    optimizer = common.make_sgd([p for p in model.parameters() if p.requires_grad], args.teacher_lr, args)
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
        meter, images_seen, epoch_start = common.Meter(), 0, time.time()
        for images, labels, _ in common.train_batches(
            data, args.batch_size, common.epoch_generator(args.teacher_seed, epoch)
        ):
            rotated, joint_labels = common.rotations(images), common.rotation_joint_labels(labels)
            with common.autocast(device, args.amp):
                # Branch l [4B, 4C] runs on stage l's output, detached in frozen mode (HSAKD's grad=False).
                aux_logits, logits = model(rotated, detach_stages=frozen)
            losses = teacher_loss(logits.float(), [branch.float() for branch in aux_logits], labels, joint_labels)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            for name, value in losses.items():
                meter.add(f"loss/{name}", value, len(labels))
            meter.add_sum("train/top1", 100.0 * common.accuracy_count(logits[0::4], labels), len(labels))
            images_seen += len(labels)
        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir, "Lower --teacher-lr or turn off --amp, then rerun.")
        images_per_s = images_seen / (time.time() - epoch_start)
        result = common.evaluate(model.backbone, data, args.eval_batch_size, args.amp)
        branches = common.auxiliary_accuracy(model, data, args.eval_batch_size, args.amp)
        if max(branches["ss_top1"]) > best_ss:  # HSAKD keeps <arch>_best.pth by the best branch
            best_ss, best = max(branches["ss_top1"]), {**result, "epoch": epoch, "ss_top1": max(branches["ss_top1"])}
            common.save_checkpoint(run_dir / "best.pth", common.model_payload(model, epoch + 1, result, args))
        metrics.update({"lr": lr, "test/top1": result["top1"], "test/top5": result["top5"]})
        metrics.update({"test/best_top1": best["top1"], "speed/images_per_s": images_per_s})  # best: of best.pth
        metrics.update({f"test/ss_top1_{branch}": acc for branch, acc in enumerate(branches["ss_top1"], 1)})
        logger.log(epoch, metrics)
        common.save_checkpoint(run_dir / "last.pth", common.training_state(model, optimizer, epoch + 1, best, args))
        common.print_epoch(epoch, epochs, metrics, (time.time() - epoch_start) * (epochs - epoch - 1))
    provenance = {"teacher_mode": args.teacher_mode, "ce_teacher": str(ce_file) if ce_file else None}
    for source, target in (("best.pth", cache_path.with_name(cache_path.stem + "_best.pth")), ("last.pth", cache_path)):
        checkpoint = common.load_checkpoint(run_dir / source, "stage 1's checkpoint")  # last: written last
        weights = {key: checkpoint[key] for key in ("model", "arch", "num_classes", "epoch", "args")}
        common.save_checkpoint(target, weights | provenance)


def prepare_teacher(args, data, device, teacher_arch):
    """The stage-1 teacher (trained and cached when missing), frozen in eval mode.
    Returns (model, file, the mode it was trained in)."""
    ce_teacher = ce_file = None
    if args.teacher_mode == "frozen" and not args.teacher_aux_path:  # kd.py's teacher, trained first when missing
        ce_teacher, ce_result = common.load_teacher(dataclasses.replace(args, teacher=teacher_arch), data, device)
        ce_file = ce_result["file"]
    cache_path = None if args.teacher_aux_path else stage1_cache_path(args, teacher_arch, ce_file)
    train = lambda path: train_stage1(args, data, device, teacher_arch, ce_teacher, ce_file, path)  # writes `path`
    path = common.cached_stage(args.teacher_aux_path, cache_path, train)
    if not args.teacher_aux_path and args.teacher_ckpt == "best":
        path = path.with_name(path.stem + "_best.pth")
    remedy = None if args.teacher_aux_path else "It is a cached stage 1: delete it and rerun to train it again."
    checkpoint = common.load_checkpoint(path, "teacher checkpoint", remedy)
    with torch.random.fork_rng(devices=[]):  # building a model to overwrite must not shift the seed's stream
        teacher = common.build_auxiliary_model(teacher_arch, data.num_classes)
    common.load_weights(teacher, checkpoint, str(path))
    unknown = "unknown (--teacher-aux-path)" if args.teacher_aux_path else args.teacher_mode
    mode = checkpoint.get("teacher_mode", unknown)
    return common.prepare_model(teacher, device, args.amp).eval().requires_grad_(False), path, mode


if __name__ == "__main__":
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "repdistiller")
    common.check_architectures(args.teacher, args.student)
    common.print_config(args, "hssakd")
    # --- METHOD: both networks need auxiliary classifiers, as many as each other: checked before any work ---
    teacher_arch, student_arch = resolve_arch(args.teacher, args), resolve_arch(args.student, args)
    check_pair(teacher_arch, student_arch)
    # --- END METHOD ---
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device)
    data = common.load_data(args, device)
    run_dir = common.prepare_run_dir(
        args, f"hssakd_{args.teacher_mode}_{args.teacher}_{args.student}_{args.dataset}_seed{args.seed}"
    )

    # --- METHOD: stage 1, a teacher with trained auxiliary classifiers; a student with fresh ones ---
    teacher, teacher_file, teacher_mode = prepare_teacher(args, data, device, teacher_arch)
    teacher_result = common.evaluate(teacher.backbone, data, args.eval_batch_size, args.amp)
    teacher_branches = common.auxiliary_accuracy(teacher, data, args.eval_batch_size, args.amp)
    branch_top1 = " ".join(f"{acc:.2f}" for acc in teacher_branches["ss_top1"])
    print(
        f"teacher {teacher.arch} ({teacher_mode}) from {teacher_file}: test top1 {teacher_result['top1']:.2f} "
        f"top5 {teacher_result['top5']:.2f}; branch {4 * data.num_classes}-way top1 {branch_top1}",
        flush=True,
    )
    common.seed_everything(args.seed, args.torch_deterministic)  # the student must not depend on stage 1 having run
    student_model = common.build_auxiliary_model(student_arch, data.num_classes)
    student_with_branches = common.prepare_model(student_model, device, args.amp)
    # The backbone is the student that is evaluated, checkpointed and reported, as in kd.py. The branches are
    # trained with it and stay in train mode throughout (evaluation switches only the backbone to eval mode).
    student = student_with_branches.backbone
    base_lr = common.default_lr(student_arch, args.learning_rate)
    optimizer = common.make_sgd(student_with_branches.parameters(), base_lr, args)  # not the teacher
    # --- END METHOD ---
    start_epoch, best, checkpoint = common.resume_state(run_dir, student, optimizer, args.resume, args)
    # --- METHOD: the student's branches are part of the training state ---
    if checkpoint:
        student_with_branches.auxiliary_classifier.load_state_dict(checkpoint["auxiliary_classifier"])
    # --- END METHOD ---
    logger = common.Logger(run_dir, args, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        lr = common.lr_at_epoch(epoch, base_lr, args.lr_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        student.train()
        meter, images_seen, epoch_start = common.Meter(), 0, time.time()
        for images, labels, _ in common.train_batches(data, args.batch_size, common.epoch_generator(args.seed, epoch)):
            # --- METHOD: 4 rotations after crop+flip (row 4i+k), KL of every branch and of the final classifier ---
            rotated, joint_labels = common.rotations(images), common.rotation_joint_labels(labels)  # [4B, ...], [4B]
            with common.autocast(device, args.amp):
                # The final logits [4B, C] and, per branch l, [4B, 4C]: branch l runs on stage l's output (a fresh
                # copy of the later stages, then its own classifier), and its gradient reaches the backbone.
                student_aux, student_logits = student_with_branches(rotated)
                with torch.no_grad():  # the frozen teacher: nothing reaches it
                    teacher_aux, teacher_logits = teacher(rotated)
            losses = student_loss(student_logits, student_aux, teacher_logits, teacher_aux, labels, joint_labels, args)
            loss, loss_ce, upright_logits = losses.pop("total"), losses.pop("ce"), student_logits[0::4]
            for name, value in losses.items():
                meter.add(f"loss/{name}", value, len(labels))
            meter.add("loss/total", loss, len(labels))
            # --- END METHOD ---
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add("loss/ce", loss_ce, len(labels))
            meter.add_sum("train/top1", 100.0 * common.accuracy_count(upright_logits, labels), len(labels))
            images_seen += len(labels)  # loader images, not the 4x rotated rows

        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir)
        images_per_s = images_seen / (time.time() - epoch_start)
        result = common.evaluate(student, data, args.eval_batch_size, args.amp)
        if result["top1"] > best["top1"]:
            best = {**result, "epoch": epoch}
            common.save_checkpoint(run_dir / "best.pth", common.model_payload(student, epoch + 1, result, args))
        metrics.update({"lr": lr, "test/top1": result["top1"], "test/top5": result["top5"]})
        metrics.update({"test/best_top1": best["top1"], "speed/images_per_s": images_per_s})
        logger.log(epoch, metrics)
        state = common.training_state(student, optimizer, epoch + 1, best, args)
        # --- METHOD: the student's branches are part of the training state ---
        state["auxiliary_classifier"] = student_with_branches.auxiliary_classifier.state_dict()
        # --- END METHOD ---
        common.save_checkpoint(run_dir / "last.pth", state)
        common.print_epoch(epoch, args.epochs, metrics, (time.time() - epoch_start) * (args.epochs - epoch - 1))

    last = common.evaluate(student, data, args.eval_batch_size, args.amp)
    # --- METHOD: the teacher, and both networks' branch diagnostics, recorded in summary.json ---
    student_branches = common.auxiliary_accuracy(student_with_branches, data, args.eval_batch_size, args.amp)
    summary = {"teacher_top1": teacher_result["top1"], "teacher_mode": teacher_mode, "teacher_file": str(teacher_file)}
    summary.update(teacher_arch=teacher.arch, student_arch=student_arch)
    summary.update({f"teacher_{name}": value for name, value in teacher_branches.items()})  # ss_top1, class_top1
    summary.update({f"student_{name}": value for name, value in student_branches.items()})
    # --- END METHOD ---
    common.write_summary(run_dir, args, best, last, "hssakd", **summary)
