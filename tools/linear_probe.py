"""Linear probe: how well a frozen backbone's features transfer (HSAKD's eval_rep.py protocol).

The backbone of a trained student (any run's best.pth or last.pth, any supported checkpoint file, or
HSAKD's own "net" file with its backbone.* keys) is frozen in eval mode; a fresh linear classifier on its
pooled feature is the only thing trained, on STL-10 or Tiny-ImageNet at 32x32 pixels:
RandomResizedCrop(32) + horizontal flip for training, Resize(32) for testing, SGD with Nesterov momentum
0.9, lr 0.1, weight decay 0, batch 64, 100 epochs, x0.1 at epochs 30, 60 and 90 (winycg/HSAKD eval_rep.py;
docs/hssakd.md, Linear probe). The result is a run folder (metrics.jsonl, summary.json) that
tools/report.py aggregates. Data sets are read from their official layouts without pickle:
- stl10: DIR/stl10_binary/{train,test}_{X,y}.bin (the official binary release);
- tiny-imagenet: DIR/tiny-imagenet-200/ (or DIR) as distributed: train/<wnid>/images/*.JPEG,
  val/images/* with val/val_annotations.txt;
- imagefolder: DIR/train/<class>/* and DIR/val/<class>/* (any image size).

Run: python tools/linear_probe.py --checkpoint runs/RUN/last.pth --model resnet8x4 --dataset stl10 --data-dir data
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (importing it has no side effects)

# eval_rep.py's normalisation of each data set
PROBE_NORMALIZE = {
    "stl10": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "tiny-imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class Args:
    # Run
    checkpoint: str = ""
    """the trained backbone: a run's best.pth/last.pth, any supported checkpoint file, or a URL"""
    model: str = "resnet8x4"
    """zoo architecture of the checkpoint's backbone"""
    dataset: Literal["stl10", "tiny-imagenet", "imagefolder"] = "stl10"
    """transfer data set (layouts: this file's docstring)"""
    data_dir: str = "data"
    """folder holding the data set"""
    seed: int = 1
    """seed of the classifier's initialisation, the data order and the augmentation"""
    torch_deterministic: bool = True
    """deterministic algorithms"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; unset means cuda when available"""
    output_dir: str = "runs"
    """parent folder of the run folder"""
    run_name: Optional[str] = None
    """run folder name; unset means probe_<dataset>_<model>_<checkpoint's folder>_seed<seed>"""
    resume: bool = False
    """accepted for the common run folder rules; a probe restarts (it is short)"""
    resume_with_changes: bool = False
    """accepted for the common run folder rules"""
    train_subset: Optional[int] = None
    """train on the first N training images only (quick runs)"""
    eval_batch_size: int = 256
    """test-time batch size"""
    # Recipe (eval_rep.py)
    epochs: int = 100
    """number of training epochs"""
    batch_size: int = 64
    """training batch size"""
    learning_rate: float = 0.1
    """initial lr of the classifier"""
    lr_milestones: Tuple[int, ...] = (30, 60, 90)
    """0-based epochs at which the lr is multiplied by --lr-gamma"""
    lr_gamma: float = 0.1
    """lr decay factor at each milestone"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = True
    """Nesterov momentum"""
    weight_decay: float = 0.0
    """SGD weight decay of the classifier"""
    image_size: int = 32
    """side of the probe's images (eval_rep.py: 32)"""


def read_stl10(folder):
    """STL-10's official binary files: uint8 images stored column-major, labels 1..10."""
    root = Path(folder) / "stl10_binary"

    def read(split):
        images_file, labels_file = root / f"{split}_X.bin", root / f"{split}_y.bin"
        for path in (images_file, labels_file):
            if not path.is_file():
                raise common.ConfigError(f"STL-10 not found: missing {path} (the official stl10_binary/ release)")
        pixels = np.fromfile(images_file, dtype=np.uint8)
        labels = np.fromfile(labels_file, dtype=np.uint8).astype(np.int64) - 1
        if pixels.size != len(labels) * 3 * 96 * 96 or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise common.ConfigError(f"{images_file} and {labels_file} do not hold matching STL-10 images and labels")
        images = torch.from_numpy(pixels.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())
        return list(images), torch.from_numpy(labels)

    return (*read("train"), *read("test"), 10)


def read_folders(dataset):
    """A common.read_folder_lists reader (the checked layouts the method files read): decoded whole images."""

    def read(folder):
        train_paths, train_labels, val_paths, val_labels, classes = common.read_folder_lists(dataset, folder)
        images = [[common.read_image(path) for path in paths] for paths in (train_paths, val_paths)]
        return images[0], train_labels, images[1], val_labels, len(classes)

    return read


def resized_test_set(images, size):
    """Resize(size) of eval_rep.py: the shorter side to `size`, then a centre crop to a square batch."""
    return torch.stack([common.resize_square(image, size) for image in images])


def augmented_batch(images, indices, size, generator):
    """RandomResizedCrop(size) + RandomHorizontalFlip of each image, drawn from `generator`."""
    crop = v2.RandomResizedCrop(size, antialias=True)
    batch = []
    for position in indices.tolist():
        image = images[position]
        with torch.random.fork_rng(devices=[]):  # v2 draws from the global stream: seed it from ours
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            image = crop(image)
        if torch.rand(1, generator=generator).item() < 0.5:
            image = TF.horizontal_flip(image)
        batch.append(image)
    return torch.stack(batch)


def load_backbone(args, num_classes_of_checkpoint=None):
    """The frozen backbone: ours (model_from_checkpoint), or HSAKD's {"net": {"backbone.*": ...}}."""
    path = common.fetch_checkpoint(args.checkpoint, Path("checkpoints"))
    checkpoint = common.load_checkpoint(path, "backbone checkpoint")
    state = common.extract_state_dict(checkpoint)
    if any(key.startswith("backbone.") for key in state):  # an auxiliary model: keep the backbone
        state = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    classes = checkpoint.get("num_classes") if isinstance(checkpoint, dict) else None
    classes = classes or next(value.shape[0] for key, value in reversed(state.items()) if key.endswith("weight"))
    model = common.model_from_checkpoint(args.model, classes, {"model": state}, str(path))
    return model.eval().requires_grad_(False), path


@torch.no_grad()
def probe_accuracy(backbone, classifier, images, labels, normalize, batch_size):
    """Top-1 and top-5 (%) of the probe on the resized test set."""
    correct1 = correct5 = torch.zeros(())
    for start in range(0, len(labels), batch_size):
        feats, _ = backbone(normalize(images[start : start + batch_size]), is_feat=True)
        top1, top5 = common.topk_counts(classifier(feats[-1]), labels[start : start + batch_size])
        correct1, correct5 = correct1 + top1.cpu(), correct5 + top5.cpu()
    return {"top1": 100.0 * correct1.item() / len(labels), "top5": 100.0 * correct5.item() / len(labels)}


if __name__ == "__main__":
    common.show_user_errors_plainly()
    args = common.parse_args(Args)
    if not args.checkpoint:
        raise common.ConfigError("give --checkpoint: the trained backbone to probe")
    common.check_architectures(args.model)
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.get_device(args.device)
    backbone, backbone_file = load_backbone(args)
    readers = {
        "stl10": read_stl10,
        "tiny-imagenet": read_folders("tiny-imagenet"),
        "imagefolder": read_folders("imagefolder"),
    }
    print(f"reading {args.dataset} from {args.data_dir}", flush=True)
    train_images, train_labels, test_images, test_labels, num_classes = readers[args.dataset](args.data_dir)
    if args.train_subset:
        train_images, train_labels = train_images[: args.train_subset], train_labels[: args.train_subset]
    test_images = resized_test_set(test_images, args.image_size).to(device)
    test_labels = test_labels.to(device)
    mean, std = (torch.tensor(values, device=device).view(1, 3, 1, 1) for values in PROBE_NORMALIZE[args.dataset])

    def normalize(images_uint8):
        return (images_uint8.float() / 255.0 - mean) / std

    run_name = f"probe_{args.dataset}_{args.model}_{Path(backbone_file).parent.name}_seed{args.seed}"
    run_dir = common.prepare_run_dir(args, run_name)
    backbone = backbone.to(device)
    frozen_state = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    classifier = torch.nn.Linear(backbone.feat_dim, num_classes).to(device)  # PyTorch's default init
    optimizer = common.make_sgd(classifier.parameters(), args.learning_rate, args)
    logger = common.Logger(run_dir, args)
    best = {"top1": 0.0, "top5": 0.0, "epoch": -1}
    for epoch in range(args.epochs):
        lr = common.lr_at_epoch(epoch, args.learning_rate, args.lr_milestones, args.lr_gamma)
        common.set_lr(optimizer, lr)
        meter = common.Meter(run_dir)
        epoch_start = time.time()
        generator = common.epoch_generator(args.seed, epoch)
        order = torch.randperm(len(train_labels), generator=generator)
        for start in range(0, len(order), args.batch_size):
            indices = order[start : start + args.batch_size]
            images = augmented_batch(train_images, indices, args.image_size, generator).to(device)
            labels = train_labels[indices].to(device)
            with torch.no_grad():  # the backbone is frozen: eval mode, no gradient
                feats, _ = backbone(normalize(images), is_feat=True)
            logits = classifier(feats[-1])
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add("loss/ce", loss, len(labels))
            meter.add_top1("train/top1", logits, labels)
        metrics = meter.averages()
        common.check_finite(metrics, epoch, run_dir, "Lower --learning-rate, then rerun.")
        result = probe_accuracy(backbone, classifier, test_images, test_labels, normalize, args.eval_batch_size)
        if result["top1"] > best["top1"]:
            best = {**result, "epoch": epoch}
        images_per_s = len(train_labels) / (time.time() - epoch_start)
        metrics.update({"lr": lr, "test/top1": result["top1"], "test/top5": result["top5"]})
        metrics["test/best_top1"] = best["top1"]
        metrics["speed/images_per_s"] = images_per_s
        logger.log(epoch, metrics)
        common.print_epoch(epoch, args.epochs, metrics, epoch_start, stage="probe epoch")
    unchanged = all(torch.equal(frozen_state[name], tensor) for name, tensor in backbone.state_dict().items())
    common.save_checkpoint(run_dir / "classifier.pth", {"classifier": classifier.state_dict()})
    extra = {"backbone_file": str(backbone_file), "model": args.model, "backbone_unchanged": unchanged}
    extra["trained_tensors"] = [f"classifier.{name}" for name, _ in classifier.named_parameters()]
    common.write_summary(run_dir, args, best, result, "linear_probe", **extra)
