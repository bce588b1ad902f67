"""Progressive Self-Knowledge Distillation (PS-KD) on CIFAR, with the official recipe.

Paper: K. Kim, B. Ji, D. Yoon, S. Hwang, "Self-Knowledge Distillation with Progressive Refinement of
Targets", ICCV 2021, https://arxiv.org/abs/2006.12000. Reference code: lgcnsai/PS-KD-Pytorch@9aa0828
`main.py`, `loss/pskd_loss.py` (docs/pskd.md).

There is no teacher network: the model is its own teacher, one epoch in the past. A buffer keeps,
for every training image (by dataset index), the softmax the model gave it in the previous epoch. An
image's target is (1 - alpha_e) * onehot(y) + alpha_e * P[i], with alpha_e growing linearly to
alpha_T = 0.8, and the loss is the cross-entropy with that soft target. Targets are built before the
forward pass, the batch's buffer rows overwritten after the optimizer step; epoch-0 targets are
exactly one-hot. Compared with kd.py: no teacher, one model (`--model`, default PreActResNet18), the
buffer (in last.pth, so `--resume` is exact), soft-target CE instead of CE + KL, PS-KD's recipe (300
epochs, batch 128, lr 0.1 Nesterov, x0.1 at 150 and 225), CIFAR-10 normalisation, and test NLL and
ECE.

Run: python pskd.py --model resnet18
"""

import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

import common

METHOD_NAME = "pskd"  # in run folder names, the config line and summary.json


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
    model: str = common.per_dataset("PreActResNet18", imagenet="resnet50_imagenet")
    """zoo architecture to train; resnet18/ResNet18 (PS-KD's name) mean PreActResNet18"""
    epochs: int = common.per_dataset(300, imagenet=100)
    """number of training epochs"""
    batch_size: int = common.per_dataset(128, imagenet=256)
    """training batch size"""
    learning_rate: Optional[float] = None
    """initial lr; unset means the recipe's value for the architecture (docs/<method>.md)"""
    lr_milestones: Tuple[int, ...] = common.per_dataset((150, 225), imagenet=(30, 60, 90))
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
    # PS-KD
    pskd: bool = True
    """PS-KD soft targets; false trains with plain cross-entropy and the same recipe (the baseline)"""
    alpha_T: float = common.per_dataset(0.8, imagenet=0.3)
    """alpha at the last epoch; alpha_e = alpha_T * (e + 1) / epochs"""
    buffer_device: Literal["cuda", "cpu"] = common.per_dataset("cuda", imagenet="cpu")
    """where the prediction buffer lives: cuda = the training device (the CPU for CPU runs), cpu =
    host memory as in the official code; numerically identical [INTERP]"""
    log_calibration: bool = True
    """also log test NLL and 10-bin expected calibration error (no effect on training) [INTERP]"""


# PS-KD's name for the network (`--classifier_type ResNet18`) and its lower-case form. The zoo keeps
# the unambiguous PreActResNet18: mdistiller's "ResNet18" is a different (post-activation) network.
MODEL_ALIASES = {"resnet18": "PreActResNet18", "ResNet18": "PreActResNet18"}


def pskd_alpha(epoch, epochs, alpha_T):
    """alpha_e = alpha_T * (e + 1) / E for the 0-based epoch e, the same for every batch of the epoch
    (official main.py; its clamp at 0 never binds)."""
    return max(0.0, alpha_T * (epoch + 1) / epochs)


def progressive_targets(labels, past_predictions, alpha):
    """PS-KD soft targets (1 - alpha) * onehot(y) + alpha * P: [B], [B, C] -> [B, C].

    Written as onehot + alpha * (P - onehot), the same value, so that P = onehot gives exactly the
    one-hot target in floating point too (the epoch-0 rule)."""
    one_hot = F.one_hot(labels, past_predictions.shape[1]).to(past_predictions.dtype)
    return one_hot + alpha * (past_predictions - one_hot)


def soft_cross_entropy(logits, targets):
    """Cross-entropy with soft targets at T = 1: sum over classes, mean over the batch
    (loss/pskd_loss.py). No KL, no T^2, no extra hard-label term: the label is inside the target."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def read_targets(predictions, sample_ids, labels, alpha, first_epoch):
    """The batch's targets from its buffer rows, addressed by dataset index (not batch position). In
    the first epoch the rows are first set to the one-hot labels, as the official code does, so
    every epoch-0 target is exactly one-hot. predictions [N_train, C] -> targets [B, C] float32."""
    rows = sample_ids.to(predictions.device)
    if first_epoch:
        predictions[rows] = F.one_hot(labels, predictions.shape[1]).to(predictions.device, predictions.dtype)
    return progressive_targets(labels, predictions[rows].to(labels.device, torch.float32), alpha)


def record_predictions(predictions, sample_ids, logits):
    """Overwrite the batch's buffer rows with its detached softmax (T = 1): next epoch's past
    predictions."""
    probabilities = F.softmax(logits.detach().float(), dim=1)
    predictions[sample_ids.to(predictions.device)] = probabilities.to(predictions.device, predictions.dtype)


def calibration_error(confidences, correct, bins=10):
    """Expected calibration error in % (Guo et al. 2017): sum over equal-width confidence bins (lower,
    upper] of (bin count / N) * |accuracy in bin - mean confidence in bin|. confidences: max softmax
    probability [N]; correct: bool [N]."""
    edges = torch.linspace(0, 1, bins + 1, device=confidences.device)
    bin_of = torch.bucketize(confidences, edges[1:-1])  # right-closed bins; 0 and 1 fall in the end bins
    # Per bin, sum(correct - confidence) = count * (accuracy - mean confidence); a one-hot matmul
    # instead of index_add_ keeps it deterministic on CUDA.
    gaps = F.one_hot(bin_of, bins).float().T @ (correct.float() - confidences.float())
    return 100.0 * gaps.abs().sum().item() / len(confidences)


@torch.no_grad()
def evaluate_calibrated(model, data, batch_size=128, amp=False, bins=10):
    """`evaluate` plus calibration, from one pass over the test set: top1, top5 (%), nll (mean test
    cross-entropy, nats) and ece (expected calibration error with `bins` bins, %)."""
    model = common.for_evaluation(model)
    chunks = []
    for images, _ in common.test_batches(data, batch_size, shard=True):
        with common.autocast(images.device, amp):
            chunks.append(model(images).float())
    logits = common.gather_rows(torch.cat(chunks))[0]  # torchrun: every rank's share, in order
    labels = data.test_labels
    top1, top5 = common.topk_counts(logits, labels)
    confidences = F.softmax(logits, dim=1).max(dim=1).values
    correct = logits.topk(1, dim=1).indices[:, 0] == labels
    return {
        "top1": 100.0 * top1.item() / len(labels),
        "top5": 100.0 * top5.item() / len(labels),
        "nll": F.cross_entropy(logits, labels).item(),
        "ece": calibration_error(confidences, correct, bins),
    }


if __name__ == "__main__":
    common.show_user_errors_plainly()
    args = common.parse_args(Args)
    args.normalize = args.normalize or common.default_normalize(args.dataset, "cifar10")
    # --- METHOD: PS-KD's name for its network is accepted too ---
    common.check_architectures(args.model, valid=common.MODEL_NAMES + tuple(MODEL_ALIASES))
    args.model = MODEL_ALIASES.get(args.model, args.model)
    # --- END METHOD ---
    common.print_config(args, METHOD_NAME)
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device, args.sync_bn)
    data = common.load_data(args, device)
    method_name = METHOD_NAME if args.pskd else "pskd-off"  # the baseline's runs are told apart by name
    run_name = f"{method_name}_{args.model}_{args.dataset}_seed{args.seed}"
    run_dir = common.prepare_run_dir(args, run_name)

    model = common.build_model(args.model, data.num_classes)
    model = common.prepare_model(model, device, args.amp)
    # --- METHOD: PS-KD's lr is 0.1 for every network; the prediction buffer P [N_train, C], in last.pth ---
    base_lr = 0.1 if args.learning_rate is None else args.learning_rate
    optimizer = common.make_sgd(model.parameters(), base_lr, args)
    predictions = None
    if args.pskd:
        buffer_device = torch.device("cpu") if args.buffer_device == "cpu" else device
        predictions = torch.zeros(len(data.train_labels), data.num_classes, device=buffer_device)
    trained_with = {"predictions": predictions}
    evaluate = evaluate_calibrated if args.log_calibration else common.evaluate
    # --- END METHOD ---
    start_epoch, best, _ = common.resume_state(run_dir, model, optimizer, args.resume, args, trained_with)
    logger = common.Logger(run_dir, args, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        lr = common.lr_at_epoch(epoch, base_lr, args.lr_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        # --- METHOD: one alpha for every batch of the epoch ---
        alpha = pskd_alpha(epoch, args.epochs, args.alpha_T)
        # --- END METHOD ---
        model.train()
        meter = common.Meter(run_dir)
        epoch_start = time.time()
        generator = common.epoch_generator(args.seed, epoch)
        for images, labels, sample_ids in common.train_batches(data, args.batch_size, generator):
            # --- METHOD: PS-KD, targets from last epoch's predictions, built before the forward pass ---
            if args.pskd:
                targets = read_targets(predictions, sample_ids, labels, alpha, first_epoch=epoch == 0)
            with common.autocast(device, args.amp):
                logits = model(images).float()
            loss_ce = F.cross_entropy(logits, labels)  # the optimised loss only with --pskd false
            loss = soft_cross_entropy(logits, targets) if args.pskd else loss_ce
            # --- END METHOD ---
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # --- METHOD: after the step, as the official code: this iteration's predictions become the rows ---
            if args.pskd:
                record_predictions(predictions, *common.gather_rows(sample_ids, logits))  # every rank's rows
                meter.add("loss/pskd", loss, len(labels))
            meter.add("loss/total", loss, len(labels))
            # --- END METHOD ---
            meter.add("loss/ce", loss_ce, len(labels))
            meter.add_top1("train/top1", logits, labels)

        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir)
        images_per_s = len(data.train_labels) / (time.time() - epoch_start)
        result = evaluate(model, data, args.eval_batch_size, args.amp)
        if result["top1"] > best["top1"]:
            best = {**result, "epoch": epoch}
            best_weights = common.model_payload(model, epoch + 1, result, args)
            common.save_checkpoint(run_dir / "best.pth", best_weights)
        metrics.update({"lr": lr, "test/top1": result["top1"], "test/top5": result["top5"]})
        metrics.update({"test/best_top1": best["top1"], "speed/images_per_s": images_per_s})
        # --- METHOD: the alpha of the epoch and the calibration metrics the paper reports ---
        metrics.update({f"test/{name}": result[name] for name in ("nll", "ece") if name in result})
        if args.pskd:
            metrics["pskd/alpha"] = alpha
        # --- END METHOD ---
        logger.log(epoch, metrics)
        state = common.training_state(model, optimizer, epoch + 1, best, args, trained_with)
        common.save_checkpoint(run_dir / "last.pth", state)
        common.print_epoch(epoch, args.epochs, metrics, epoch_start)

    last = evaluate(model, data, args.eval_batch_size, args.amp)
    # --- METHOD: the calibration of the last and of the best epoch, recorded in summary.json ---
    summary = {f"last_{name}": last[name] for name in ("nll", "ece") if name in last}
    summary.update({f"best_epoch_{name}": best[name] for name in ("nll", "ece") if name in best})
    # --- END METHOD ---
    common.write_summary(run_dir, args, best, last, METHOD_NAME, **summary)
