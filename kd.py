"""Hinton knowledge distillation (KD) with the RepDistiller CIFAR recipe.

Paper: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
NIPS 2014 Deep Learning Workshop, https://arxiv.org/abs/1503.02531. Reference code:
HobbitLong/RepDistiller `train_student.py --distill kd -r 0.1 -a 0.9 -b 0` (docs/kd.md).

A frozen teacher, trained beforehand with plain cross-entropy (baseline.py), looks at
the same augmented batch as the student. The student learns from two targets at once:
the hard label (cross-entropy, weight 0.1) and the teacher's class distribution softened
by a temperature T = 4 (KL divergence, weight 0.9, times T^2 so that its gradient keeps
the size of the CE's as T grows). Compared with baseline.py, the only changes are the
teacher (loaded, or trained and cached when missing, and evaluated before the first
student step) and the `kd_loss` term.

Run: python kd.py --teacher resnet32x4 --student resnet8x4
"""

import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

import common

METHOD_NAME = "kd"  # in run folder names, the config line and summary.json


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
    # KD
    kd_T: float = common.per_dataset(4.0, imagenet=1.0)
    """softmax temperature T of the distillation KL"""
    ce_weight: float = common.per_dataset(0.1, imagenet=0.5)
    """weight of the cross-entropy with the labels"""
    kd_weight: float = common.per_dataset(0.9, imagenet=0.5)
    """weight of the KD term"""


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton's KD term: T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over
    classes and averaged over the rows ("batchmean"; RepDistiller's DistillKL writes it
    as sum / B). The T^2 keeps the gradient magnitude independent of T (Hinton et al.,
    section 2)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)  # [B, C]
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)  # [B, C]
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


if __name__ == "__main__":
    common.show_user_errors_plainly()
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "repdistiller")
    common.check_architectures(args.teacher, args.student)
    common.print_config(args, METHOD_NAME)
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device, args.sync_bn)
    data = common.load_data(args, device)
    run_name = f"{METHOD_NAME}_{args.teacher}_{args.student}_{args.dataset}_seed{args.seed}"
    run_dir = common.prepare_run_dir(args, run_name)

    # --- METHOD: a frozen teacher, evaluated before the first student step ---
    teacher, teacher_result = common.load_teacher(args, data, device)
    # --- END METHOD ---
    student = common.build_model(args.student, data.num_classes)
    student = common.prepare_model(student, device, args.amp)
    base_lr = common.default_lr(args.student, args.learning_rate)
    optimizer = common.make_sgd(student.parameters(), base_lr, args)
    start_epoch, best, _ = common.resume_state(run_dir, student, optimizer, args.resume, args)
    logger = common.Logger(run_dir, args, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        lr = common.lr_at_epoch(epoch, base_lr, args.lr_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        student.train()
        meter = common.Meter(run_dir)
        epoch_start = time.time()
        generator = common.epoch_generator(args.seed, epoch)
        for images, labels, _ in common.train_batches(data, args.batch_size, generator):
            # --- METHOD: KD, the teacher's softened distribution on the same batch as a second target ---
            with common.autocast(device, args.amp):
                student_logits = student(images).float()
                with torch.no_grad():
                    teacher_logits = teacher(images).float()
            loss_ce = F.cross_entropy(student_logits, labels)
            loss_kd = kd_loss(student_logits, teacher_logits, args.kd_T)
            loss = args.ce_weight * loss_ce + args.kd_weight * loss_kd
            # --- END METHOD ---
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # --- METHOD: KD's training metrics ---
            meter.add("loss/kd", loss_kd, len(labels))
            meter.add("loss/total", loss, len(labels))
            # --- END METHOD ---
            meter.add("loss/ce", loss_ce, len(labels))
            meter.add_top1("train/top1", student_logits, labels)

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
        state = common.training_state(student, optimizer, epoch + 1, best, args)
        common.save_checkpoint(run_dir / "last.pth", state)
        common.print_epoch(epoch, args.epochs, metrics, epoch_start)

    last = common.evaluate(student, data, args.eval_batch_size, args.amp)
    # --- METHOD: the teacher's accuracy, recorded in summary.json ---
    summary = {"teacher_top1": teacher_result["top1"]}
    # --- END METHOD ---
    common.write_summary(run_dir, args, best, last, METHOD_NAME, **summary)
