"""Plain cross-entropy training of one CIFAR network: the student baseline and the teacher trainer.

Recipe: HobbitLong/RepDistiller `train_teacher.py` (docs/kd.md): SGD with momentum 0.9, weight decay
5e-4, batch 64, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2), x0.1 at epochs 150, 180 and 210,
240 epochs. There is no teacher and no extra term: the network minimises the cross-entropy of its
logits with the hard labels. Every "Student" row of the KD tables comes from this recipe, and the
distillation files call this script to train a teacher they cannot find, so baselines and teachers
share one code path. `--eval-checkpoint FILE` evaluates any saved model.

Run: python baseline.py --model resnet20
"""

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal, Optional, Tuple

import torch.nn.functional as F

import common

METHOD_NAME = "baseline"  # in run folder names, the config line and summary.json


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
    model: str = common.per_dataset("resnet20", imagenet="resnet18_imagenet")
    """zoo architecture to train (see common.MODEL_NAMES)"""
    epochs: int = common.per_dataset(240, imagenet=90)
    """number of training epochs"""
    batch_size: int = common.per_dataset(64, imagenet=256)
    """training batch size"""
    learning_rate: Optional[float] = common.per_dataset(None, imagenet=0.1)
    """initial lr; unset means the recipe's value for the architecture (docs/<method>.md)"""
    lr_milestones: Tuple[int, ...] = common.per_dataset((150, 180, 210), imagenet=(30, 60))
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
    checkpoint_dir: str = "checkpoints"
    """where trained teachers and teacher stages are cached"""
    cache_as_teacher: bool = False
    """after training, also save the last-epoch weights where kd.py, sskd.py and hssakd.py look for this
    teacher (<checkpoint-dir>/<dataset>/<model>...pth, named for --epochs, --train-subset, --normalize)"""
    # Baseline
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint (any supported format) on the test set and exit"""


if __name__ == "__main__":
    common.show_user_errors_plainly()
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "repdistiller")
    common.check_architectures(args.model)
    common.print_config(args, METHOD_NAME)
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device, args.sync_bn)
    data = common.load_data(args, device)

    if args.eval_checkpoint:
        model = common.load_model_file(args.model, data.num_classes, args.eval_checkpoint)
        model = common.prepare_model(model, device, args.amp)
        result = common.evaluate(model, data, args.eval_batch_size, args.amp)
        print(f"{args.model} from {args.eval_checkpoint}: test top1 {result['top1']:.2f} top5 {result['top5']:.2f}")
        raise SystemExit(0)

    run_name = f"{METHOD_NAME}_{args.model}_{args.dataset}_seed{args.seed}"
    run_dir = common.prepare_run_dir(args, run_name)
    model = common.build_model(args.model, data.num_classes)
    model = common.prepare_model(model, device, args.amp)
    base_lr = common.default_lr(args.model, args.learning_rate)
    optimizer = common.make_sgd(model.parameters(), base_lr, args)
    start_epoch, best, _ = common.resume_state(run_dir, model, optimizer, args.resume, args)
    logger = common.Logger(run_dir, args, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        lr = common.lr_at_epoch(epoch, base_lr, args.lr_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        model.train()
        meter = common.Meter(run_dir)
        epoch_start = time.time()
        generator = common.epoch_generator(args.seed, epoch)
        for images, labels, _ in common.train_batches(data, args.batch_size, generator):
            # --- METHOD: cross-entropy with the hard labels, nothing else ---
            with common.autocast(device, args.amp):
                logits = model(images).float()
            loss_ce = F.cross_entropy(logits, labels)
            loss = loss_ce
            # --- END METHOD ---
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add("loss/ce", loss_ce, len(labels))
            meter.add_top1("train/top1", logits, labels)

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
        logger.log(epoch, metrics)
        state = common.training_state(model, optimizer, epoch + 1, best, args)
        common.save_checkpoint(run_dir / "last.pth", state)
        common.print_epoch(epoch, args.epochs, metrics, epoch_start)

    last = common.evaluate(model, data, args.eval_batch_size, args.amp)
    common.write_summary(run_dir, args, best, last, METHOD_NAME)
    if args.cache_as_teacher:  # the name kd.py's --ce-teacher-epochs/--train-subset/--normalize look up
        teacher_args = SimpleNamespace(
            teacher=args.model,
            dataset=args.dataset,
            ce_teacher_epochs=args.epochs,
            train_subset=args.train_subset,
            normalize=args.normalize,
            checkpoint_dir=args.checkpoint_dir,
        )
        cache = common.teacher_cache_path(teacher_args)
        if cache.exists():
            print(f"{cache} already exists and was left as it is", flush=True)
        else:
            common.save_checkpoint(cache, common.model_payload(model, args.epochs, last, args))
            print(f"cached as the teacher {cache}", flush=True)
