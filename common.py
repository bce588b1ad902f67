"""Shared infrastructure for the single-file KD implementations: data, backbones, training
utilities and run bookkeeping. No loss and no method logic lives here: a reader looks things up
in this file; nobody needs to read it to understand a method.

Sections: DATA | BACKBONES | TRAINING UTILITIES | RUN BOOKKEEPING | TEACHERS AND CACHED STAGES.
What a method file calls, in the order a run calls it:

1. Arguments: show_user_errors_plainly, parse_args (FIELD_RANGES checked), default_normalize,
   check_architectures, print_config.
2. Setup: seed_everything, get_device, load_data (-> CifarData on the device), prepare_run_dir.
3. Teacher and cached stages: load_teacher (-> teacher_cache_path, train_teacher), cached_stage
   (cache_lock, an own random stream with seed=), publish_stage, stage_digest, model_from_checkpoint.
4. Models: build_model, build_auxiliary_model / AuxiliaryModel, prepare_model.
5. Optimisation: default_lr, make_sgd, lr_at_epoch, set_lr, resume_state (trained_with), Logger.
6. The epoch: epoch_generator, train_batches (standard_augment), rotations, rotation_joint_labels,
   autocast, Meter (add, add_sum, add_top1), accuracy_count.
7. After the epoch: check_finite, evaluate / test_batches / topk_counts, auxiliary_accuracy,
   model_payload, training_state, save_checkpoint, print_epoch.
8. The end: write_summary.

Not run by itself: every method file imports it (python kd.py, python sskd.py, ...).
"""

import argparse
import ast
import atexit
import contextlib
import dataclasses
import datetime
import difflib
import errno
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import string
import subprocess
import sys
import tempfile
import time
import typing
import urllib.parse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A problem with the user's input (arguments, data, checkpoints); printed without traceback."""


# =================================================================================================
# DATA: CIFAR in the official python layout, kept on the training device as uint8
# =================================================================================================

# Official python-version layout of each dataset (what torchvision downloads and extracts).
DATASETS = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key="labels",
        num_classes=10,
        torchvision_class="CIFAR10",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        label_key="fine_labels",
        num_classes=100,
        torchvision_class="CIFAR100",
    ),
}

# Normalisation constants of each official code base (RepDistiller, SSKD and PS-KD/CSS `transforms.Normalize`).
NORMALIZE = {
    "repdistiller": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "sskd": ((0.5071, 0.4866, 0.4409), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's; every recipe beyond CIFAR
}


# Data the CIFAR archives are fetched from when missing (torchvision's URLs and archive names).
ARCHIVES = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


NormalizeName = typing.Literal[tuple(NORMALIZE)]  # --normalize


def default_normalize(dataset, cifar100_recipe):
    """The constants an unset --normalize means: CIFAR-10's own statistics on cifar10 (every official
    code base here that trains CIFAR-10 uses them), the method's recipe constants on cifar100, ImageNet's on
    folder datasets."""
    if dataset in ("imagenet", "tiny-imagenet", "imagefolder"):
        return "imagenet"  # ImageNet's statistics: every recipe beyond CIFAR uses them
    return "cifar10" if dataset == "cifar10" else cifar100_recipe


def same_normalization(name_a, name_b):
    """Whether two --normalize choices give the same inputs up to 1e-3 in every constant: repdistiller
    and sskd differ by 1e-4 (the same CIFAR-100 statistics, rounded differently)."""
    (mean_a, std_a), (mean_b, std_b) = NORMALIZE[name_a], NORMALIZE[name_b]
    return all(abs(a - b) <= 1e-3 for a, b in zip(mean_a + std_a, mean_b + std_b))


@dataclasses.dataclass
class CifarData:
    """Train and test sets as uint8 [N, 3, 32, 32] tensors on the training device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # [1, 3, 1, 1], float, on the device
    std: torch.Tensor
    channels_last: bool = False

    def normalize(self, images_uint8):
        """uint8 [B, 3, H, W] -> normalised float32, the ToTensor + Normalize of torchvision."""
        images = images_uint8.to(torch.float32, copy=True)  # a copy even of a float input: changed in place
        images.div_(255.0).sub_(self.mean).div_(self.std)  # (x / 255 - mean) / std in place: the same bits,
        # without two more batch-sized buffers (3.3x faster for a 224-px batch of 256 on one CPU thread)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.contiguous(memory_format=fmt)


def _missing_files(dataset, data_dir):
    info = DATASETS[dataset]
    folder = Path(data_dir) / info["folder"]
    return [str(folder / name) for name in info["train"] + info["test"] if not (folder / name).is_file()]


def _download(dataset, data_dir):
    """Let torchvision fetch and extract the official archive; it checks the archive's md5."""
    import torchvision  # only needed here; imported lazily to keep start-up fast

    getattr(torchvision.datasets, DATASETS[dataset]["torchvision_class"])(data_dir, train=True, download=True)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: a dict of bytes, lists and one numpy array. Only numpy's
    array-rebuilding functions may be looked up, so a tampered batch cannot run code while loading."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }  # protocol-2 bytes from Python 3

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR batch never contains")
        return super().find_class(module, name)


def _read_batches(folder, names, label_key):
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = _CifarUnpickler(f, encoding="latin1").load()
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in batch[label_key])
        except Exception as err:  # truncated, garbage, tampered or re-packed wrongly: one message for all
            raise ConfigError(
                f"{path} is not a readable CIFAR python batch ({type(err).__name__}: {err}). "
                f"Nothing in it was run. Delete the folder {folder} and let it download again, "
                f"or put the official files there."
            ) from None
        if len(labels) != sum(len(part) for part in images):
            raise ConfigError(
                f"{path} holds {len(images[-1])} images but a different number of labels; "
                f"delete the folder {folder} and let it download again"
            )
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def load_cifar(dataset, data_dir, download=True):
    """Read CIFAR-10/100 from `data_dir` in the official python layout, downloading it if missing.

    We read the pickles ourselves instead of using torchvision's dataset classes, which insist on
    the official md5 of every file: re-encoded copies and test fixtures must load too.
    Returns (train_images, train_labels, test_images, test_labels) as CPU tensors.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}")
    info = DATASETS[dataset]
    missing = _missing_files(dataset, data_dir)
    download_error = None
    download = download and not os.environ.get("KD_NO_DOWNLOAD")  # tests and air-gapped machines
    if missing and download:
        created = not Path(data_dir).exists()
        try:
            _download(dataset, data_dir)
        except Exception as err:  # offline, proxy, disk: all end in the same advice below
            download_error = err
        missing = _missing_files(dataset, data_dir)
        if missing and created and Path(data_dir).is_dir() and not any(Path(data_dir).iterdir()):
            Path(data_dir).rmdir()  # leave no empty folder behind a failed download
    if missing:
        why = (
            f"downloading it failed ({download_error})"
            if download_error
            else "no download was attempted (KD_NO_DOWNLOAD is set)"
            if os.environ.get("KD_NO_DOWNLOAD")
            else "no download was attempted"
        )
        archive = ARCHIVES[dataset]
        raise ConfigError(
            f"{dataset} not found: missing {', '.join(missing)}; {why}. Offline, download {archive} "
            f"({archive.rsplit('/', 1)[1]}) on a machine with internet access and unpack it into --data-dir "
            f"{data_dir}, so that {info['folder']}/ holds {', '.join(info['train'] + info['test'])}; set "
            f"KD_NO_DOWNLOAD=1 to never try a download."
        )
    folder = Path(data_dir) / info["folder"]
    train_images, train_labels = _read_batches(folder, info["train"], info["label_key"])
    test_images, test_labels = _read_batches(folder, info["test"], info["label_key"])
    return train_images, train_labels, test_images, test_labels


def fixed_sample(images, labels, count):
    """`count` images drawn once with a fixed seed (0), in their original order, the same for every run and
    every --seed: a test set stored sorted by class (as some CIFAR-10 copies are) would otherwise give a
    "first N" subset of one or two classes."""
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:count].sort().values
    return images[keep], labels[keep]


def load_data(args, device):
    """Load the dataset named by `args` onto `device` (fields: dataset, data_dir, normalize, train_subset,
    test_subset, amp; on folder datasets also image_size and workers): CifarData, or StreamData."""
    if args.normalize not in NORMALIZE:
        raise ConfigError(f"unknown --normalize '{args.normalize}'; choose one of: {', '.join(NORMALIZE)}")
    mean, std = NORMALIZE[args.normalize]
    if args.dataset in FOLDER_DATASETS:
        return load_folder_data(args, device, mean, std)
    train_images, train_labels, test_images, test_labels = load_cifar(args.dataset, args.data_dir)
    check_subsets(args, len(train_labels), len(test_labels))
    if args.train_subset:  # quick runs: the first N training images
        train_images, train_labels = train_images[: args.train_subset], train_labels[: args.train_subset]
    if getattr(args, "test_subset", None):  # quick runs (summary.json records it; reports flag it)
        test_images, test_labels = fixed_sample(test_images, test_labels, args.test_subset)
    return CifarData(
        train_images.to(device),
        train_labels.to(device),
        test_images.to(device),
        test_labels.to(device),
        DATASETS[args.dataset]["num_classes"],
        torch.tensor(mean, device=device).view(1, 3, 1, 1),
        torch.tensor(std, device=device).view(1, 3, 1, 1),
        channels_last=args.amp,
    )


def check_subsets(args, train_count, test_count):
    if args.train_subset and args.train_subset > train_count:
        raise ConfigError(
            f"--train-subset {args.train_subset} is larger than the {train_count} training "
            f"images of {args.dataset}; leave it unset to train on all of them"
        )
    test_subset = getattr(args, "test_subset", None)
    if test_subset and test_subset > test_count:
        raise ConfigError(f"--test-subset {test_subset} is larger than the {test_count} test images")


# ---- Beyond CIFAR: ImageNet, Tiny-ImageNet and image folders (README.md, "Data beyond CIFAR") ----
# Small sets are decoded once, resized to --image-size and kept on the device as uint8, exactly like CIFAR
# (the same batched crop and flip). ImageNet, and any set whose decoded images would not fit, stream from
# disk through a DataLoader: the workers decode and augment, the device normalises.

FOLDER_DATASETS = {
    "imagenet": "DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG (ILSVRC-2012; README.md says how to sort val)",
    "tiny-imagenet": "tiny-imagenet-200 as distributed: train/<wnid>/images/*.JPEG, val/images/* + val_annotations.txt",
    "imagefolder": "DIR/train/<class>/* and DIR/val/<class>/*",
}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
RESIDENT_LIMIT_BYTES = 4 * 2**30  # decoded uint8 training images above this stream from disk instead
STREAM_PROGRESS_STEPS = 100  # a streamed epoch prints its progress every this many steps


def default_image_size(dataset):
    """224 on ImageNet (RandomResizedCrop(224), every recipe); 32 elsewhere (CIFAR's zoo, HSAKD's probe)."""
    return 224 if dataset == "imagenet" else 32


def class_folders(folder):
    """Sorted sub-folder names (torchvision ImageFolder's class order)."""
    if not Path(folder).is_dir():
        raise ConfigError(f"{folder} is missing")
    classes = sorted(entry.name for entry in Path(folder).iterdir() if entry.is_dir())
    if not classes:
        raise ConfigError(f"{folder} holds no class folders")
    return classes


def images_in(folder):
    found = sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ConfigError(
            f"{folder} is an empty class folder (no {', '.join(IMAGE_SUFFIXES)} files): add images or remove it"
        )
    return found


def read_folder_lists(dataset, data_dir):
    """(train paths, train labels, val paths, val labels, class names) of a folder dataset, checked: every
    class folder holds images, val exists and has the train classes (Tiny-ImageNet: every annotation line
    names a train class and an existing file)."""
    root = Path(data_dir)
    if dataset == "tiny-imagenet":
        root = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
        classes = class_folders(root / "train")
        train = [
            (path, label) for label, wnid in enumerate(classes) for path in images_in(root / "train" / wnid / "images")
        ]
        val = tiny_imagenet_val(root, {wnid: label for label, wnid in enumerate(classes)})
    else:
        if not (root / "val").is_dir():
            raise ConfigError(f"{root / 'val'} is missing: --dataset {dataset} reads {FOLDER_DATASETS[dataset]}")
        classes, val_classes = class_folders(root / "train"), class_folders(root / "val")
        if classes != val_classes:
            only_train, only_val = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
            raise ConfigError(
                f"{root / 'train'} and {root / 'val'} have different class folders: only in train: "
                f"{', '.join(only_train[:5]) or '-'}; only in val: {', '.join(only_val[:5]) or '-'}"
            )
        train, val = (
            [(path, label) for label, name in enumerate(classes) for path in images_in(root / split / name)]
            for split in ("train", "val")
        )
    return (
        [path for path, _ in train],
        torch.tensor([label for _, label in train]),
        [path for path, _ in val],
        torch.tensor([label for _, label in val]),
        classes,
    )


def tiny_imagenet_val(root, label_of):
    """Tiny-ImageNet's val set as distributed: val/images/<file> labelled by val/val_annotations.txt."""
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise ConfigError(f"{annotations} is missing (the official tiny-imagenet-200 val/ layout)")
    val = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise ConfigError(
                f"{annotations} line {number} is not '<file>\\t<wnid of a train class>\\t...': {line[:80]!r}"
            )
        path = root / "val" / "images" / fields[0]
        if not path.is_file():
            raise ConfigError(f"{annotations} line {number} names {path}, which is missing")
        val.append((path, label_of[fields[1]]))
    return val


def open_rgb(path):
    """An image file as a decoded RGB Pillow image (as torchvision's ImageFolder reads it); an unreadable or
    truncated file is a ConfigError naming it."""
    from PIL import Image, UnidentifiedImageError  # installed with torchvision; CIFAR runs never need it

    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ConfigError(f"{path} could not be read as an image ({err}): replace or remove it") from None


def to_uint8(image):
    """A Pillow RGB image as uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def read_image(path):
    """An image file as uint8 [3, H, W] RGB (open_rgb's errors)."""
    return to_uint8(open_rgb(path))


def resize_square(image, size, resize=None):
    """Resize(resize or size) of the shorter side (antialiased), then CenterCrop(size); a Pillow image or a
    uint8 tensor, returned as the same kind."""
    from torchvision.transforms.v2 import functional as TF

    if TF.get_size(image) == [size, size] and resize is None:
        return image  # already square at that size: every pixel kept (CIFAR written as PNG folders)
    return TF.center_crop(TF.resize(image, [resize or size], antialias=True), [size, size])


class FolderImages(torch.utils.data.Dataset):
    """Image files for a DataLoader: item (position, seed) -> (uint8 [3, S, S], label, position). With a
    seed the image is augmented from its own random stream, so a batch is the same whichever worker made
    it, and a resumed epoch draws what an uninterrupted one draws. augment: "rrc" (RandomResizedCrop + flip,
    the ImageNet recipes) or "crop" (resize, then CIFAR's padded crop + flip); test images: Resize + CenterCrop."""

    def __init__(self, paths, labels, size, augment, test_resize=None):
        self.paths, self.labels, self.size, self.augment, self.test_resize = paths, labels, size, augment, test_resize

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        from torchvision.transforms import v2

        position, seed = item
        image = open_rgb(self.paths[position])  # transformed as a Pillow image: its resize is the fast one
        if seed is None:
            image = resize_square(image, self.size, self.test_resize)
        else:
            with torch.random.fork_rng(devices=[]):  # v2 draws from the global stream: seed it from ours
                torch.default_generator.manual_seed(seed)  # the CPU stream only: torch.manual_seed would also
                # queue a CUDA seeding that records a stack trace (0.4 ms an image) and outlives fork_rng
                if self.augment == "rrc":
                    image = v2.RandomResizedCrop(self.size, antialias=True)(image)
                else:
                    image = v2.RandomCrop(self.size, padding=self.size // 8)(resize_square(image, self.size))
                image = v2.RandomHorizontalFlip()(image)
        return to_uint8(image), self.labels[position], position


@dataclasses.dataclass
class StreamData:
    """A folder dataset read from disk every epoch: the CifarData interface without the images."""

    train: FolderImages
    test: FolderImages
    train_labels: torch.Tensor  # on the device, as CifarData's
    test_labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    channels_last: bool = False
    workers: int = 0
    normalize = CifarData.normalize

    NO_IMAGES = (
        "this dataset streams from disk, so its images are not held as uint8 tensors: pass --rotation-pipeline gpu "
        "to sskd.py (the standard augmentation, then the rotations; torchdistill's order on ImageNet)"
    )

    @property
    def train_images(self):
        raise ConfigError(self.NO_IMAGES)


def stream_batches(data, batch_size, generator, augment=True):
    """train_batches of a StreamData: the same seeded order; each image augmented from (a seed drawn for
    the epoch + its index); a progress line every STREAM_PROGRESS_STEPS steps with the epoch's ETA."""
    order = torch.randperm(len(data.train_labels), generator=generator)
    epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    keys = [(position, epoch_seed + position if augment else None) for position in order.tolist()]
    batches = [keys[start : start + batch_size] for start in range(0, len(keys), batch_size)]
    loader = torch.utils.data.DataLoader(
        data.train,
        batch_sampler=[batch[rank_rows(len(batch))] for batch in batches if len(batch) >= WORLD.size],
        num_workers=data.workers,
        pin_memory=data.train_labels.is_cuda,
    )
    started, steps = time.time(), len(loader)
    for step, (images, labels, indices) in enumerate(loader, 1):
        device = data.train_labels.device
        yield data.normalize(images.to(device, non_blocking=True)), labels.to(device), indices.to(device)
        if step % STREAM_PROGRESS_STEPS == 0 and step < steps:
            seconds = time.time() - started
            print(
                f"  step {step}/{steps} | {step * batch_size / seconds:.0f} img/s | epoch eta "
                f"{format_seconds(seconds * (steps - step) / step)}",
                flush=True,
            )


def stream_test_batches(data, batch_size, rows):
    """test_batches of a StreamData: the val images of `rows` (a slice) in order, un-augmented."""
    keys = [(position, None) for position in range(rows.start, rows.stop)]
    loader = torch.utils.data.DataLoader(
        data.test,
        batch_sampler=[keys[start : start + batch_size] for start in range(0, len(keys), batch_size)],
        num_workers=data.workers,
    )
    for images, labels, _ in loader:
        yield data.normalize(images.to(data.test_labels.device)), labels.to(data.test_labels.device)


def decode_all(images, workers):
    """Every image of a FolderImages, un-augmented, as one uint8 [N, 3, S, S] tensor (decoded by workers)."""
    keys = [(position, None) for position in range(len(images))]
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=[keys[start : start + 256] for start in range(0, len(keys), 256)], num_workers=workers
    )
    started, chunks = time.time(), []
    for batch, _, _ in loader:
        chunks.append(batch)
        if time.time() - started > EVALUATION_PROGRESS_SECONDS and len(chunks) % 40 == 0:
            print(f"  decoding: {sum(map(len, chunks))}/{len(images)} images", flush=True)
    return torch.cat(chunks)


def load_folder_data(args, device, mean, std):
    """A folder dataset (FOLDER_DATASETS): checked before anything trains, subsets drawn as fixed samples
    (folders are sorted by class), then resident on the device if the decoded training images fit in
    RESIDENT_LIMIT_BYTES (and it is not ImageNet), else streamed."""
    train_paths, train_labels, val_paths, val_labels, classes = read_folder_lists(args.dataset, args.data_dir)
    check_subsets(args, len(train_labels), len(val_labels))
    if args.train_subset:
        keep = fixed_sample(torch.arange(len(train_labels)), train_labels, args.train_subset)[0]
        train_paths, train_labels = [train_paths[i] for i in keep], train_labels[keep]
    if getattr(args, "test_subset", None):
        keep = fixed_sample(torch.arange(len(val_labels)), val_labels, args.test_subset)[0]
        val_paths, val_labels = [val_paths[i] for i in keep], val_labels[keep]
    size = args.image_size or default_image_size(args.dataset)
    augment = "rrc" if args.dataset == "imagenet" else "crop"
    test_resize = size * 256 // 224 if args.dataset == "imagenet" else None  # Resize(256) + CenterCrop(224)
    train = FolderImages(train_paths, train_labels, size, augment)
    test = FolderImages(val_paths, val_labels, size, augment, test_resize)
    statistics = [torch.tensor(value, device=device).view(1, 3, 1, 1) for value in (mean, std)]
    streams = args.dataset == "imagenet" or len(train_paths) * 3 * size * size > RESIDENT_LIMIT_BYTES
    print(
        f"{args.dataset}: {len(classes)} classes, {len(train_paths)} training and {len(val_paths)} val images at "
        f"{size}x{size}, {'streamed from disk' if streams else 'decoded once and kept on the device'}",
        flush=True,
    )
    if streams and getattr(args, "rotation_pipeline", None) == "sskd":  # refused here, before any stage trains
        raise ConfigError(StreamData.NO_IMAGES)
    if streams:
        labels = (train_labels.to(device), val_labels.to(device))
        return StreamData(train, test, *labels, len(classes), *statistics, args.amp, args.workers)
    images = [decode_all(part, args.workers).to(device) for part in (train, test)]
    return CifarData(
        images[0],
        train_labels.to(device),
        images[1],
        val_labels.to(device),
        len(classes),
        *statistics,
        channels_last=args.amp,
    )


def crop(images, top, left, padding):
    """Crop each image of a zero-padded batch at its own offset: [B, C, H, W] -> [B, C, H, W].

    Zero padding of the uint8 image is what torchvision's RandomCrop(32, padding=4) does to the
    PIL image before ToTensor, so padded pixels normalise to -mean/std exactly as there.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)).permute(0, 2, 3, 1)  # [B, H+2p, W+2p, C]
    rows = top.to(images.device)[:, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = left.to(images.device)[:, None] + torch.arange(width, device=images.device)  # [B, W]
    samples = torch.arange(batch, device=images.device)[:, None, None]
    return padded[samples, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def hflip(images, flip):
    """Mirror the images whose `flip` entry is True: [B, C, H, W], flip bool [B]."""
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)


def standard_augment(images, generator):
    """RandomCrop(32, padding=4) + RandomHorizontalFlip(0.5), batched, on the images' device; other sizes
    S pad by S // 8 likewise. Random numbers come from a CPU generator so CPU and CUDA runs see the same
    augmentation."""
    batch, padding = images.shape[0], images.shape[-1] // 8
    top, left = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)  # offsets of the padding
    flip = torch.rand(batch, generator=generator) < 0.5
    return hflip(crop(images, top, left, padding=padding), flip)


def epoch_generator(seed, epoch):
    """The random stream of one epoch's data order and augmentation. Derived from (seed, epoch)
    alone, so a resumed run draws exactly what an uninterrupted one draws."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def train_batches(data, batch_size, generator, augment=True):
    """One epoch of shuffled training batches (drop_last=False, as every official loader).
    Yields (images [B, 3, 32, 32] normalised float, labels [B], sample indices [B]); under torchrun, this
    rank's share of each global batch of `batch_size` (rank_rows)."""
    if isinstance(data, StreamData):
        yield from stream_batches(data, batch_size, generator, augment)
        return
    num_images = len(data.train_labels)
    order = torch.randperm(num_images, generator=generator).to(data.train_labels.device)
    for start in range(0, num_images, batch_size):
        indices = order[start : start + batch_size]
        images = data.train_images[indices]
        if augment:  # drawn for the global batch, so every rank's share is augmented as in one process
            images = standard_augment(images, generator)
        if len(indices) < WORLD.size:  # torchrun: a last batch smaller than the ranks is dropped
            continue
        rows = rank_rows(len(indices))
        yield data.normalize(images[rows]), data.train_labels[indices[rows]], indices[rows]


EVALUATION_PROGRESS_SECONDS = 30  # a longer evaluation says how far it is


def test_batches(data, batch_size, shard=False):
    """The un-augmented test set in order, the counterpart of `train_batches`.
    Yields (images [B, 3, 32, 32] normalised float, labels [B]). An evaluation that takes longer than
    EVALUATION_PROGRESS_SECONDS prints how many test images it has seen, every that many seconds.
    `shard` (torchrun): this rank's contiguous share of the test set only."""
    rows = rank_rows(len(data.test_labels)) if shard else slice(0, len(data.test_labels))
    if isinstance(data, StreamData):
        yield from stream_test_batches(data, batch_size, rows)
        return
    total = rows.stop - rows.start
    started = shown = time.time()
    for start in range(rows.start, rows.stop, batch_size):
        if time.time() - shown > EVALUATION_PROGRESS_SECONDS:
            shown = time.time()
            seen = start - rows.start
            print(f"  evaluating: {seen}/{total} test images, {format_seconds(shown - started)}", flush=True)
        end = min(start + batch_size, rows.stop)
        yield data.normalize(data.test_images[start:end]), data.test_labels[start:end]


def rotations(images):
    """The 4 rotations of a batch, interleaved as SSKD's and HSAKD's code stack them:
    [B, C, H, W] -> [4B, C, H, W] with row 4i+k = image i rotated by k*90 deg counter-clockwise."""
    return torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)], dim=1).flatten(0, 1)


def rotation_joint_labels(labels):
    """Joint class-rotation labels of the interleaved layout: row 4i+k gets 4*y_i + k. [B] -> [4B]."""
    return (4 * labels[:, None] + torch.arange(4, device=labels.device)).flatten()


# =================================================================================================
# BACKBONES
# =================================================================================================
# Every model below reproduces HobbitLong/RepDistiller@b84f547 `models/` state-dict keys and shapes
# exactly (tests/zoo_state_dicts.json), so published teacher checkpoints load with strict=True.
# Interface: forward(x, is_feat=False) -> logits, or (feats, logits) with is_feat=True,
# feats ending with the pooled vector of size `model.feat_dim`. `preact` is not implemented.


def he_init_convs(model):
    """Conv weights ~ N(0, sqrt(2 / (k*k*out_channels))), conv biases 0.

    RepDistiller writes this as kaiming_normal_(mode='fan_out') in the ResNets and as
    normal_(0, sqrt(2/n)), n = k*k*out_channels, in WRN/VGG/MobileNetV2: the same distribution
    (PyTorch's fan_out is out_channels*k*k also for grouped convs). BN keeps PyTorch's default
    weight 1 / bias 0, which is what all families ask for.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def residual_stage(block, in_planes, planes, num_blocks, stride):
    """num_blocks blocks; only the first one strides (and may project the shortcut)."""
    blocks = [block(in_planes, planes, stride)]
    blocks += [block(planes * block.expansion, planes, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _conv_bn_relu(in_channels, out_channels, kernel_size, stride=1):
    """Sequential(conv, BN, ReLU): keys `.0` conv, `.1` BN, as in RepDistiller's conv_bn helpers."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _run_stages(x, stages):
    """Pass the stem output through the stages; returns (last map, [stem output, stage outputs...])."""
    feats = [x]
    for stage in stages:
        x = stage(x)
        feats.append(x)
    return x, feats


def global_average(x):
    """Global average pooling [N, C, H, W] -> [N, C]: adaptive_avg_pool2d(x, 1) written as a mean over H and W.
    The same function, bit-identical on the CPU (tested), but its CUDA backward is deterministic, while
    adaptive_avg_pool2d's accumulates with atomics and is not (what --torch-deterministic needs on CUDA)."""
    return x.mean(dim=(2, 3))


def _classify(pooled, feats, classifier, is_feat):
    """The zoo interface: logits, or (feats ending with the pooled vector, logits) with is_feat."""
    logits = classifier(pooled)
    return (feats + [pooled], logits) if is_feat else logits


# ---- CIFAR ResNet: resnet8 ... resnet110, resnet8x4, resnet32x4 (RepDistiller models/resnet.py) ----


class CifarBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class CifarResNet(nn.Module):
    """Depth 6n+2: stem + three stages of n BasicBlocks, widths (stem, stage1, stage2, stage3)."""

    def __init__(self, blocks_per_stage, widths, num_classes):
        super().__init__()
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = residual_stage(CifarBasicBlock, stem, w1, blocks_per_stage, 1)
        self.layer2 = residual_stage(CifarBasicBlock, w1, w2, blocks_per_stage, 2)
        self.layer3 = residual_stage(CifarBasicBlock, w2, w3, blocks_per_stage, 2)
        self.fc = nn.Linear(w3, num_classes)
        self.feat_dim = w3
        he_init_convs(self)  # Linear keeps the PyTorch default

    def forward(self, x, is_feat=False):
        x, feats = _run_stages(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3))
        return _classify(torch.flatten(F.avg_pool2d(x, 8), 1), feats, self.fc, is_feat)  # 8x8 final map


# ---- ResNet50, CIFAR variant of RepDistiller's models/resnetv2.py ----


class ResNet50Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # strides in the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Identity()  # named `shortcut`, not `downsample`, in resnetv2.py
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem: 3x3, no max-pool
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = residual_stage(ResNet50Bottleneck, 64, 64, 3, 1)
        self.layer2 = residual_stage(ResNet50Bottleneck, 256, 128, 4, 2)
        self.layer3 = residual_stage(ResNet50Bottleneck, 512, 256, 6, 2)
        self.layer4 = residual_stage(ResNet50Bottleneck, 1024, 512, 3, 2)
        self.linear = nn.Linear(2048, num_classes)
        self.feat_dim = 2048
        he_init_convs(self)  # no zero-init of residual BNs; Linear keeps the PyTorch default

    def forward(self, x, is_feat=False):
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        x, feats = _run_stages(F.relu(self.bn1(self.conv1(x))), stages)
        return _classify(global_average(x), feats, self.linear, is_feat)


# ---- Wide ResNet: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (RepDistiller models/wrn.py) ----


class WideBasicBlock(nn.Module):
    """Pre-activation block (dropout 0)."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        # Projection (no BN) only when widths differ: wrn_*_1's first block has none (82 vs 83 keys).
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        preact = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(preact))))
        # The identity path takes the raw input, the projection the pre-activated one (RepDistiller models/wrn.py).
        return out + (x if self.convShortcut is None else self.convShortcut(preact))


class WideStage(nn.Module):
    """RepDistiller's NetworkBlock: the extra `.layer` level is part of the keys (blockS.layer.J)."""

    def __init__(self, num_blocks, in_planes, out_planes, stride):
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor, num_classes):
        super().__init__()
        num_blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)  # no BN/ReLU: blocks pre-activate
        self.block1 = WideStage(num_blocks, widths[0], widths[1], 1)
        self.block2 = WideStage(num_blocks, widths[1], widths[2], 2)
        self.block3 = WideStage(num_blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feat_dim = widths[3]
        he_init_convs(self)
        nn.init.zeros_(self.fc.bias)  # weight keeps the PyTorch default

    def forward(self, x, is_feat=False):
        x, feats = _run_stages(self.conv1(x), (self.block1, self.block2, self.block3))  # raw stage outputs
        x = F.relu(self.bn1(x))  # the final BN-ReLU belongs to the head, not to f3
        return _classify(torch.flatten(F.avg_pool2d(x, 8), 1), feats, self.fc, is_feat)


# ---- VGG with BN: vgg8, vgg11, vgg13, vgg16, vgg19 (RepDistiller models/vgg.py) ----

# Conv widths of the five groups block0..block4 (cfg S, A, B, D, E).
VGG_GROUP_WIDTHS = {
    "vgg8": ([64], [128], [256], [512], [512]),
    "vgg11": ([64], [128], [256] * 2, [512] * 2, [512] * 2),
    "vgg13": ([64] * 2, [128] * 2, [256] * 2, [512] * 2, [512] * 2),
    "vgg16": ([64] * 2, [128] * 2, [256] * 3, [512] * 3, [512] * 3),
    "vgg19": ([64] * 2, [128] * 2, [256] * 4, [512] * 4, [512] * 4),
}


def _vgg_group(in_channels, widths):
    """(conv with bias, BN, ReLU) per width, minus the last ReLU: keys blockG.{3j} conv, {3j+1} BN."""
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, group_widths, num_classes):
        super().__init__()
        in_channels = 3
        for g, widths in enumerate(group_widths):
            self.add_module(f"block{g}", _vgg_group(in_channels, widths))
            in_channels = widths[-1]
        self.classifier = nn.Linear(512, num_classes)
        self.feat_dim = 512
        he_init_convs(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x, is_feat=False):
        # RepDistiller max-pools after block3 only for 64-px inputs; at 32 px block4 runs at 4x4.
        pool_after_block3 = x.shape[2] == 64
        feats = []
        for g in range(5):
            x = F.relu(getattr(self, f"block{g}")(x))
            feats.append(x)
            if g < 3 or (g == 3 and pool_after_block3):
                x = F.max_pool2d(x, 2)
        return _classify(global_average(x), feats, self.classifier, is_feat)


# ---- MobileNetV2 = RepDistiller's mobile_half: expansion 6, width 0.5 (RepDistiller models/mobilenetv2.py) ----

# (expansion, output channels = int(0.5 * width-1.0 channels), repeats, first stride) per stage.
MOBILE_HALF_STAGES = (
    (1, 8, 1, 1),
    (6, 12, 2, 1),
    (6, 16, 3, 2),
    (6, 32, 4, 2),
    (6, 48, 3, 1),
    (6, 80, 3, 2),
    (6, 160, 1, 1),
)


class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        # Keys conv.0/1 (expand, kept even for expansion 1), conv.3/4 (depthwise), conv.6/7 (project).
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = _conv_bn_relu(3, 16, 3, stride=2)  # stride 2: 16x16 after the stem
        stages, in_channels = [], 16
        for expansion, out_channels, repeats, stride in MOBILE_HALF_STAGES:
            blocks = [InvertedResidual(in_channels, out_channels, stride, expansion)]
            blocks += [InvertedResidual(out_channels, out_channels, 1, expansion) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.blocks = nn.ModuleList(stages)
        self.conv2 = _conv_bn_relu(160, 1280, 1)
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))  # keys classifier.0.*
        self.feat_dim = 1280
        he_init_convs(self)
        nn.init.normal_(self.classifier[0].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x, is_feat=False):
        x = self.conv1(x)
        feats = [x]
        for s, stage in enumerate(self.blocks):
            x = stage(x)
            if s in (1, 2, 4, 6):  # f1..f4 as in RepDistiller
                feats.append(x)
        x = self.conv2(x)
        # RepDistiller: AvgPool2d(input_size // 16 = 2, ceil_mode=True) on the 2x2 map.
        return _classify(torch.flatten(F.avg_pool2d(x, 2, ceil_mode=True), 1), feats, self.classifier, is_feat)


# ---- ShuffleNets: RepDistiller models/ShuffleNetv1.py and ShuffleNetv2.py; PyTorch default init ----


def channel_shuffle(x, groups):
    """[N, g*c, H, W] -> view as [N, g, c, H, W], swap g and c, flatten back (reshape: channels_last safe)."""
    n, channels, h, w = x.shape
    return x.reshape(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes, out_planes, stride, groups=3):
        super().__init__()
        mid = out_planes // 4
        # The first 1x1 is not grouped on the 24-channel stem output (ShuffleNet paper, RepDistiller).
        self.first_groups = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:  # the block adds out_planes channels to the pooled input
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleV1(nn.Module):
    def __init__(self, num_classes, out_planes=(240, 480, 960), num_blocks=(4, 8, 4)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)  # 1x1 stem, no max-pool
        self.bn1 = nn.BatchNorm2d(24)
        in_planes, stages = 24, []
        for planes, repeats in zip(out_planes, num_blocks):
            # First block strides and concatenates the pooled input: it produces planes - in_planes.
            blocks = [ShuffleV1Block(in_planes, planes - in_planes, 2)]
            blocks += [ShuffleV1Block(planes, planes, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(out_planes[-1], num_classes)
        self.feat_dim = out_planes[-1]

    def forward(self, x, is_feat=False):
        x, feats = _run_stages(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3))
        return _classify(torch.flatten(F.avg_pool2d(x, 4), 1), feats, self.linear, is_feat)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches on the full input, each producing out/2 channels."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        # left: depthwise 3x3 s2 -> 1x1
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1x1 -> depthwise 3x3 s2 -> 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2BasicBlock(nn.Module):
    """First half of the channels passes through, the second half is transformed."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        half = x.shape[1] // 2
        passed, processed = x[:, :half], x[:, half:]
        processed = F.relu(self.bn1(self.conv1(processed)))
        processed = self.bn2(self.conv2(processed))
        processed = F.relu(self.bn3(self.conv3(processed)))
        return channel_shuffle(torch.cat([passed, processed], 1), 2)


class ShuffleV2(nn.Module):
    def __init__(self, num_classes, stage_channels=(116, 232, 464), num_blocks=(3, 7, 3), final_channels=1024):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels, stages = 24, []
        for channels, repeats in zip(stage_channels, num_blocks):
            # layerS.0 down-samples, layerS.1..repeats are basic blocks (repeats + 1 blocks in all).
            blocks = [ShuffleV2DownBlock(in_channels, channels)]
            blocks += [ShuffleV2BasicBlock(channels) for _ in range(repeats)]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(in_channels, final_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(final_channels)
        self.linear = nn.Linear(final_channels, num_classes)
        self.feat_dim = final_channels

    def forward(self, x, is_feat=False):
        x, feats = _run_stages(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3))
        x = F.relu(self.bn2(self.conv2(x)))
        return _classify(torch.flatten(F.avg_pool2d(x, 4), 1), feats, self.linear, is_feat)


# ---- Extra backbone: HSAKD's MobileNetV2 with a stride-1 stem (winycg/HSAKD models/mobilenetv2.py) ----


class MobileNetV2HSAKD(MobileNetV2):
    """winycg/HSAKD's MobileNetV2: RepDistiller's mobile_half with a stride-1 stem (stages at 32, 16,
    8, 4 px; 3.94x the MACs, same 812,836 parameters) and adaptive average pooling. Keys stay
    `classifier.0.*`; load_weights maps HSAKD's bare `classifier.*`."""

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.conv1[0].stride = (1, 1)

    def forward(self, x, is_feat=False):
        x = self.conv1(x)
        feats = [x]
        for s, stage in enumerate(self.blocks):
            x = stage(x)
            if s in (1, 2, 4, 6):
                feats.append(x)
        x = self.conv2(x)  # 4x4 here: the parent's fixed 2x2 pooling would not reduce it to 1x1
        return _classify(global_average(x), feats, self.classifier, is_feat)


# ---- Extra backbone: PS-KD's CIFAR PreAct ResNet-18 (lgcnsai/PS-KD-Pytorch models/preact_resnet.py) ----


class PskdPreActBlock(nn.Module):
    """CS-KD-style pre-activation block: residual and shortcut both start from a = ReLU(bn1(x));
    the projection shortcut is a 1x1 conv without BN."""

    expansion = 1

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))  # key shortcut.0

    def forward(self, x):
        preact = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(preact))))
        # Unlike the canonical pre-activation ResNet (and WideBasicBlock), the identity path also
        # takes the pre-activated input (PS-KD's preact_resnet.py).
        return out + (preact if self.shortcut is None else self.shortcut(preact))


class PreActResNet18(nn.Module):
    """PS-KD's "PreAct ResNet-18" (`--classifier_type ResNet18`, CIFAR_ResNet18_preActBasic): 3x3 stem
    with BN-ReLU, four stages of two blocks, no BN-ReLU after the last stage, PyTorch default init.
    Not mdistiller's (post-activation) ResNet18."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = residual_stage(PskdPreActBlock, 64, 64, 2, 1)
        self.layer2 = residual_stage(PskdPreActBlock, 64, 128, 2, 2)
        self.layer3 = residual_stage(PskdPreActBlock, 128, 256, 2, 2)
        self.layer4 = residual_stage(PskdPreActBlock, 256, 512, 2, 2)
        self.linear = nn.Linear(512, num_classes)
        self.feat_dim = 512

    def forward(self, x, is_feat=False):
        # The stem's BN-ReLU is followed at once by layer1.0's own BN-ReLU; the official code has both.
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        x, feats = _run_stages(F.relu(self.bn1(self.conv1(x))), stages)
        return _classify(torch.flatten(F.avg_pool2d(x, 4), 1), feats, self.linear, is_feat)  # 4x4 final map


# ---- torchvision's ImageNet ResNets: resnet18/34/50_imagenet ----


class ImageNetResNet(nn.Module):
    """torchvision's ResNet-18/34/50 (`torchvision.models.resnet{depth}`): its modules under its names, so its
    weight files (resnet34-333f7ec4.pth ...) and HSAKD's ImageNet backbones load with strict=True; the zoo's
    forward(x, is_feat) with feats = [stem, layer1..layer4, pooled]. Any input size (224 on ImageNet)."""

    def __init__(self, depth, num_classes):
        super().__init__()
        import torchvision  # lazily: CIFAR runs never need it

        net = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc"):
            setattr(self, name, getattr(net, name))
        self.block = type(net.layer1[0])
        self.feat_dim = net.fc.in_features

    def forward(self, x, is_feat=False):
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x, feats = _run_stages(stem, (self.layer1, self.layer2, self.layer3, self.layer4))
        return _classify(global_average(x), feats, self.fc, is_feat)


# ---- Registry: RepDistiller `models/__init__.py` names ----

_SMALL_RESNET_WIDTHS = (16, 16, 32, 64)
_X4_RESNET_WIDTHS = (32, 64, 128, 256)

_ZOO = {
    **{
        f"resnet{6 * n + 2}": (lambda num_classes, n=n: CifarResNet(n, _SMALL_RESNET_WIDTHS, num_classes))
        for n in (1, 2, 3, 5, 7, 9, 18)
    },
    "resnet8x4": lambda num_classes: CifarResNet(1, _X4_RESNET_WIDTHS, num_classes),
    "resnet32x4": lambda num_classes: CifarResNet(5, _X4_RESNET_WIDTHS, num_classes),
    "ResNet50": ResNet50,
    "wrn_16_1": lambda num_classes: WideResNet(16, 1, num_classes),
    "wrn_16_2": lambda num_classes: WideResNet(16, 2, num_classes),
    "wrn_40_1": lambda num_classes: WideResNet(40, 1, num_classes),
    "wrn_40_2": lambda num_classes: WideResNet(40, 2, num_classes),
    **{
        name: (lambda num_classes, widths=widths: VGG(widths, num_classes)) for name, widths in VGG_GROUP_WIDTHS.items()
    },
    "MobileNetV2": MobileNetV2,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
    # Extra backbones of HSAKD and PS-KD, after the RepDistiller names
    "MobileNetV2_hsakd": MobileNetV2HSAKD,
    "PreActResNet18": PreActResNet18,
    # torchvision's ImageNet ResNets, named so they cannot be mistaken for the CIFAR ones
    **{
        f"resnet{depth}_imagenet": (lambda num_classes, depth=depth: ImageNetResNet(depth, num_classes))
        for depth in (18, 34, 50)
    },
}
MODEL_NAMES = tuple(_ZOO)


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build a zoo backbone by its RepDistiller name; `arch` and `num_classes` are recorded on the model
    because checkpoints store them."""
    if name.startswith("css_"):  # css.py's multi-branch networks: forward(x, masks) -> [N, C * branches, branches]
        raise ConfigError(f"{name} is a CSS multi-branch network; only css.py trains it (--model-t/--model-s)")
    if name not in _ZOO:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    model = _ZOO[name](num_classes=num_classes)
    model.arch = name
    model.num_classes = num_classes
    return model


# ---- HSAKD auxiliary classifiers (winycg/HSAKD models/*_aux.py; docs/hssakd.md) ----
# winycg/HSAKD@28c8dc2 `models/*_Auxiliary`: L branches, each made of FRESH copies of the backbone's
# later stages (new weights), the deepest one run at stride 1, then global average pooling and a
# Linear. State-dict names follow HSAKD (`backbone.*`, `auxiliary_classifier.block_extractor{l}.*`,
# `.fc{l}`, `.bn{l}` for WRN, `.conv2_{l}` for MobileNetV2) so the authors' "net" checkpoints load.


class AuxiliaryClassifier(nn.Module):
    """Branch l: `block_extractor{l}` -> optional family head `{head_name}{l}` (+ ReLU) -> global
    average pooling -> `fc{l}` Linear(feat_dim, num_outputs). Input: the L stage outputs."""

    def __init__(self, extractors, feat_dim, num_outputs, heads=(), head_name="", relu_after_head=False):
        super().__init__()
        self.num_branches, self.head_name, self.relu_after_head = len(extractors), head_name, relu_after_head
        for branch, extractor in enumerate(extractors, 1):
            self.add_module(f"block_extractor{branch}", extractor)
        for branch, head in enumerate(heads, 1):
            self.add_module(f"{head_name}{branch}", head)
        for branch in range(1, self.num_branches + 1):
            self.add_module(f"fc{branch}", nn.Linear(feat_dim, num_outputs))

    def forward(self, stage_outputs, feature_maps=False):
        """[L maps] -> (pooled branch features [L x [N, feat_dim]], branch logits [L x [N, num_outputs]]);
        with feature_maps=True the first list holds the maps before pooling [L x [N, feat_dim, H, W]]."""
        features, logits = [], []
        for branch, x in enumerate(stage_outputs, 1):
            x = getattr(self, f"block_extractor{branch}")(x)
            if self.head_name:
                x = getattr(self, f"{self.head_name}{branch}")(x)
                x = F.relu(x) if self.relu_after_head else x
            pooled = global_average(x)
            features.append(x if feature_maps else pooled)
            logits.append(getattr(self, f"fc{branch}")(pooled))
        return features, logits


def _cifar_resnet_branches(net, num_outputs):
    """Inputs f1, f2, f3; branches = stages (w2, s2)+(w3, s2) | (w3, s2) | (w3, s1)."""
    n = len(net.layer1)
    w1, w2, w3 = (stage[0].bn2.num_features for stage in (net.layer1, net.layer2, net.layer3))
    stage = lambda in_planes, planes, stride: residual_stage(CifarBasicBlock, in_planes, planes, n, stride)
    extractors = [
        nn.Sequential(stage(w1, w2, 2), stage(w2, w3, 2)),
        nn.Sequential(stage(w2, w3, 2)),
        nn.Sequential(stage(w3, w3, 1)),
    ]
    return (1, 2, 3), AuxiliaryClassifier(extractors, w3, num_outputs)


def _resnet50_branches(net, num_outputs):
    """Inputs f1..f4; branch l = fresh copies of layer l+1..4, the last branch a stride-1 layer4."""
    stage = lambda in_planes, layer, stride: residual_stage(
        ResNet50Bottleneck, in_planes, layer[0].bn1.num_features, len(layer), stride
    )
    layer2, layer3, layer4 = net.layer2, net.layer3, net.layer4
    extractors = [
        nn.Sequential(stage(256, layer2, 2), stage(512, layer3, 2), stage(1024, layer4, 2)),
        nn.Sequential(stage(512, layer3, 2), stage(1024, layer4, 2)),
        nn.Sequential(stage(1024, layer4, 2)),
        nn.Sequential(stage(2048, layer4, 1)),
    ]
    return (1, 2, 3, 4), AuxiliaryClassifier(extractors, 2048, num_outputs)


def _imagenet_resnet_branches(net, num_outputs):
    """HSAKD's `Auxiliary_Classifier` of models/resnet_imagenet.py, inputs layer1..layer4: branch l = fresh
    copies of layer l+1..4 (torchvision's blocks, its downsample rule), branch 4 one more layer4 at stride 1."""
    block, expansion = net.block, net.block.expansion

    def stage(in_planes, planes, layer, stride):
        downsample = None
        if stride != 1 or in_planes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes * expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * expansion)
            )
        blocks = [block(in_planes, planes, stride, downsample)]
        return nn.Sequential(*blocks, *(block(planes * expansion, planes) for _ in range(len(layer) - 1)))

    widths = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
    extractors = [
        nn.Sequential(
            stage(widths[0], 128, net.layer2, 2),
            stage(widths[1], 256, net.layer3, 2),
            stage(widths[2], 512, net.layer4, 2),
        ),
        nn.Sequential(stage(widths[1], 256, net.layer3, 2), stage(widths[2], 512, net.layer4, 2)),
        nn.Sequential(stage(widths[2], 512, net.layer4, 2)),
        nn.Sequential(stage(widths[3], 512, net.layer4, 1)),
    ]
    return (1, 2, 3, 4), AuxiliaryClassifier(extractors, widths[3], num_outputs)


def _wrn_branches(net, num_outputs):
    """Inputs: raw block outputs f1..f3; each branch ends with its own BN `bn{l}` and ReLU."""
    n = len(net.block1.layer)
    c1, c2, c3 = (block.layer[0].bn2.num_features for block in (net.block1, net.block2, net.block3))
    extractors = [
        nn.Sequential(WideStage(n, c1, c2, 2), WideStage(n, c2, c3, 2)),
        nn.Sequential(WideStage(n, c2, c3, 2)),
        nn.Sequential(WideStage(n, c3, c3, 1)),
    ]
    heads = [nn.BatchNorm2d(c3) for _ in extractors]
    return (1, 2, 3), AuxiliaryClassifier(extractors, c3, num_outputs, heads, "bn", relu_after_head=True)


def _vgg_branches(net, num_outputs):
    """Inputs f0, f1, f2, f4 (post-ReLU). Branch 4 is a group with group 3's widths taking 512 channels."""
    widths = [[m.out_channels for m in getattr(net, f"block{g}") if isinstance(m, nn.Conv2d)] for g in range(5)]
    group = lambda g, in_channels=None: [_vgg_group(in_channels or widths[g - 1][-1], widths[g]), nn.ReLU(inplace=True)]
    pool = lambda: [nn.MaxPool2d(2)]
    extractors = [
        nn.Sequential(*pool(), *group(1), *pool(), *group(2), *pool(), *group(3), *group(4)),
        nn.Sequential(*pool(), *group(2), *pool(), *group(3), *group(4)),
        nn.Sequential(*pool(), *group(3), *group(4)),
        nn.Sequential(*group(3, in_channels=512), *group(4)),
    ]
    return (0, 1, 2, 4), AuxiliaryClassifier(extractors, 512, num_outputs)


def _mobilenetv2_branches(net, num_outputs):
    """Inputs f1..f4 (12, 16, 48, 160 channels); stages as (t, width before x0.5, n, s); each branch
    ends with its own 1x1 conv 160->1280 + BN + ReLU (`conv2_{l}`)."""
    tail = [(6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    plans = [(12, tail), (16, tail[1:]), (48, tail[3:]), (160, [(6, 160, 3, 1), (6, 320, 1, 1)])]
    extractors = []
    for in_channels, stages in plans:
        modules = []
        for expansion, width, repeats, stride in stages:
            out_channels = int(width * 0.5)
            blocks = [InvertedResidual(in_channels, out_channels, stride, expansion)]
            blocks += [InvertedResidual(out_channels, out_channels, 1, expansion) for _ in range(repeats - 1)]
            modules.append(nn.Sequential(*blocks))
            in_channels = out_channels
        extractors.append(nn.Sequential(*modules))
    heads = [_conv_bn_relu(160, 1280, 1) for _ in extractors]
    return (1, 2, 3, 4), AuxiliaryClassifier(extractors, 1280, num_outputs, heads, "conv2_")


def _shufflev1_branches(net, num_outputs):
    """Inputs f1..f3; branch 3 is a stage of the last width without down-sampling (residual adds)."""
    planes = [stage[-1].bn3.num_features for stage in (net.layer1, net.layer2, net.layer3)]  # 240, 480, 960
    blocks2, blocks3 = len(net.layer2), len(net.layer3)

    def stage(in_planes, out_planes, num_blocks, downsample):
        first = (
            ShuffleV1Block(in_planes, out_planes - in_planes, 2)
            if downsample
            else ShuffleV1Block(out_planes, out_planes, 1)
        )
        return nn.Sequential(first, *[ShuffleV1Block(out_planes, out_planes, 1) for _ in range(num_blocks - 1)])

    extractors = [
        nn.Sequential(stage(planes[0], planes[1], blocks2, True), stage(planes[1], planes[2], blocks3, True)),
        nn.Sequential(stage(planes[1], planes[2], blocks3, True)),
        nn.Sequential(stage(planes[2], planes[2], blocks3, False)),
    ]
    return (1, 2, 3), AuxiliaryClassifier(extractors, planes[2], num_outputs)


def _shufflev2_branches(net, num_outputs):
    """Inputs f1..f3; each branch ends with a 1x1 conv to 1024 + BN + ReLU; branch 3's down-sampling
    block runs at stride 1."""
    channels = [stage[0].bn2.num_features * 2 for stage in (net.layer1, net.layer2, net.layer3)]  # 116, 232, 464
    basic2, basic3 = len(net.layer2) - 1, len(net.layer3) - 1

    def stage(in_channels, out_channels, num_basic, stride):
        down = ShuffleV2DownBlock(in_channels, out_channels)
        if stride == 1:
            down.conv1.stride = down.conv4.stride = (1, 1)
        return nn.Sequential(down, *[ShuffleV2BasicBlock(out_channels) for _ in range(num_basic)])

    final = lambda: [
        nn.Conv2d(channels[2], net.feat_dim, 1, bias=False),
        nn.BatchNorm2d(net.feat_dim),
        nn.ReLU(inplace=True),
    ]
    extractors = [
        nn.Sequential(stage(channels[0], channels[1], basic2, 2), stage(channels[1], channels[2], basic3, 2), *final()),
        nn.Sequential(stage(channels[1], channels[2], basic3, 2), *final()),
        nn.Sequential(stage(channels[2], channels[2], basic3, 1), *final()),
    ]
    return (1, 2, 3), AuxiliaryClassifier(extractors, net.feat_dim, num_outputs)


def _init_auxiliary(classifier, style):
    """HSAKD's per-family init: "he" convs N(0, sqrt(2/(k*k*out))) + BN 1/0, "he_fc0" also Linear bias 0,
    "he_fc001" also Linear weight N(0, 0.01); "default" keeps PyTorch's init (VGG: its init routine is
    never called; ShuffleV2: has none) -- reproduced on purpose (docs/hssakd.md)."""
    if style == "default":
        return
    he_init_convs(classifier)
    for module in classifier.modules():
        if isinstance(module, nn.Linear) and style in ("he_fc0", "he_fc001"):
            nn.init.zeros_(module.bias)
            if style == "he_fc001":
                nn.init.normal_(module.weight, 0, 0.01)


# backbone class -> (branch builder, init style); MobileNetV2HSAKD is caught by MobileNetV2.
_AUXILIARY_FAMILIES = (
    (CifarResNet, _cifar_resnet_branches, "he_fc0"),
    (WideResNet, _wrn_branches, "he_fc0"),
    (ShuffleV1, _shufflev1_branches, "he_fc0"),
    (MobileNetV2, _mobilenetv2_branches, "he_fc001"),
    (ResNet50, _resnet50_branches, "he"),
    (ImageNetResNet, _imagenet_resnet_branches, "he"),
    (VGG, _vgg_branches, "default"),
    (ShuffleV2, _shufflev2_branches, "default"),
)


class AuxiliaryModel(nn.Module):
    """A zoo backbone plus HSAKD's auxiliary classifiers (HSAKD's `<arch>_aux`; docs/hssakd.md).

    `AuxiliaryModel(backbone, num_outputs)` attaches `num_branches` (L) fresh branches to the backbone's
    stage outputs `branch_inputs` (positions in its is_feat list); each branch predicts `num_outputs`
    logits (HSAKD: 4 * num_classes, the class x rotation joint label). Independent of any loss.

    forward(x, detach_stages=False, is_feat=False) -> (aux_logits [L x [N, num_outputs]], logits [N, C]);
    with is_feat=True -> (backbone feats (zoo is_feat list), pooled branch features [L x [N, feat_dim]],
    aux_logits, logits); feature_maps=True returns the branch maps before pooling instead of the pooled
    features. detach_stages=True cuts the branches' gradient into the backbone (HSAKD's
    grad=False, used to train branches on a frozen backbone). `arch` is "<backbone arch>_aux".
    """

    def __init__(self, backbone, num_outputs):
        super().__init__()
        family = next((entry for entry in _AUXILIARY_FAMILIES if isinstance(backbone, entry[0])), None)
        if family is None:
            supported = ", ".join(name for name in MODEL_NAMES if auxiliary_supported(name))
            raise ConfigError(
                f"no auxiliary classifiers are defined for {getattr(backbone, 'arch', backbone)}; "
                f"choose one of: {supported}"
            )
        self.backbone = backbone
        self.branch_inputs, self.auxiliary_classifier = family[1](backbone, num_outputs)
        _init_auxiliary(self.auxiliary_classifier, family[2])
        self.num_branches = len(self.branch_inputs)
        self.feat_dim = backbone.feat_dim
        self.arch = f"{getattr(backbone, 'arch', type(backbone).__name__)}_aux"
        self.num_classes = getattr(backbone, "num_classes", None)

    def forward(self, x, detach_stages=False, is_feat=False, feature_maps=False):
        feats, logits = self.backbone(x, is_feat=True)
        stages = [feats[i].detach() if detach_stages else feats[i] for i in self.branch_inputs]
        aux_feats, aux_logits = self.auxiliary_classifier(stages, feature_maps)
        return (feats, aux_feats, aux_logits, logits) if is_feat else (aux_logits, logits)


def build_auxiliary_model(name, num_classes):
    """`build_model(name)` + auxiliary classifiers on the 4 * num_classes class x rotation labels."""
    return AuxiliaryModel(build_model(name, num_classes), 4 * num_classes)


def auxiliary_supported(name):
    """Whether auxiliary classifiers are defined for the zoo backbone `name`."""
    with torch.device("meta"):  # no weights allocated
        backbone = build_model(name, 10)
    return any(isinstance(backbone, entry[0]) for entry in _AUXILIARY_FAMILIES)


def auxiliary_branch_count(name):
    """L for a zoo name, without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return AuxiliaryModel(build_model(name, 10), 1).num_branches


@torch.no_grad()
def auxiliary_accuracy(model, data, batch_size, amp):
    """HSAKD's auxiliary-branch diagnostics (docs/hssakd.md) on the rotated test set, per branch
    of an AuxiliaryModel: "ss" = 400-way top-1 on the joint label; "class" = 100-way top-1 after
    summing each class's 4 rotation logits; both over all 4B rows."""
    model.eval()
    ss_correct = class_correct = torch.zeros(model.num_branches, device=data.test_labels.device)
    for images, labels in test_batches(data, batch_size):
        rotated = rotations(images)
        with autocast(labels.device, amp):
            aux_logits, _ = model(rotated)
        aux_logits = torch.stack([branch.float() for branch in aux_logits])  # [L, 4B, 4C]
        joint_labels = rotation_joint_labels(labels)
        class_logits = aux_logits.view(*aux_logits.shape[:2], -1, 4).sum(3)  # [L, 4B, C]: 4c..4c+3 is class c
        ss_correct = ss_correct + (aux_logits.argmax(2) == joint_labels).sum(1)
        class_correct = class_correct + (class_logits.argmax(2) == labels.repeat_interleave(4)).sum(1)
    rows = 4 * len(data.test_labels)
    return {"ss_top1": (100.0 * ss_correct / rows).tolist(), "class_top1": (100.0 * class_correct / rows).tolist()}


# =================================================================================================
# TRAINING UTILITIES
# =================================================================================================

# RepDistiller forces lr 0.01 for these students (train_student.py).
SMALL_LR_MODELS = ("MobileNetV2", "MobileNetV2_hsakd", "ShuffleV1", "ShuffleV2")


def default_lr(arch, learning_rate=None):
    """The RepDistiller recipe's initial lr: an explicit --learning-rate wins, else 0.05, or 0.01 for M/S models."""
    if learning_rate is not None:
        return learning_rate
    return 0.01 if arch in SMALL_LR_MODELS else 0.05


def lr_at_epoch(epoch, base_lr, milestones, gamma, warmup_epochs=0):
    """MultiStepLR semantics with 0-based epochs: lr * gamma^#{m in milestones : m <= epoch}. With a
    linear per-epoch warm-up (CSS's train.py), epoch e < warmup_epochs uses lr * (e + 1) / warmup_epochs."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_sgd(parameters, lr, args):
    return torch.optim.SGD(
        parameters, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov
    )


def seed_everything(seed, deterministic):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def resolve_device(name=None):
    """--device, or cuda when available, else the CPU."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was requested but CUDA is not available; use --device cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"--device {name} is not a device name; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def runtime_info(device):
    """What a run ran on, for the first lines of output and summary.json."""
    info = {"device": str(device), "device_name": None, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def get_device(name=None, sync_bn=False):
    """The training device, announced with torch's version (and the GPU's name on CUDA). Under torchrun:
    this rank's device, after joining the ranks' process group (join_process_group)."""
    device = join_process_group(name, sync_bn) if under_torchrun() else resolve_device(name)
    info = runtime_info(device)
    where = f"{info['device']} ({info['device_name']}, CUDA {info['cuda']})" if device.type == "cuda" else "cpu"
    if device.type == "cpu" and not name:
        where += " (no CUDA device was found)"
    if under_torchrun():
        where += f"; {WORLD.size} ranks ({torch.distributed.get_backend()})" + (", --sync-bn" if sync_bn else "")
    print(f"device: {where}; torch {info['torch']}, {torch.get_num_threads()} CPU threads", flush=True)
    return device


# =================================================================================================
# DISTRIBUTED: torchrun's processes (ranks), one per device, with DistributedDataParallel
# =================================================================================================
# Without torchrun nothing below does anything: one process, world size 1. Under torchrun every rank
# runs the whole script: the same seeded epoch order, of which each rank takes its share of every
# global batch; trained models are wrapped in DDP (gradients averaged); rank 0 alone prints and writes.

DISTRIBUTED_TIMEOUT_MINUTES = 30  # a collective that waits longer than this fails instead of hanging
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR")
TORCHRUN_VARIABLES += ("MASTER_PORT", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


@dataclasses.dataclass
class World:
    rank: int = 0
    size: int = 1
    distributed: bool = False  # a process group is joined (torchrun), and not set aside by single_process
    sync_bn: bool = False


WORLD = World()  # this process's place; set by get_device under torchrun


def under_torchrun():
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process():
    return WORLD.rank == 0


def join_process_group(name, sync_bn):
    """Under torchrun: this rank's device (cuda:<LOCAL_RANK>, or the CPU) and its process group
    (nccl on CUDA, gloo on the CPU)."""
    if name not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {name}: under torchrun each rank takes cuda:<LOCAL_RANK>; pass cuda or cpu")
    device = resolve_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {device.index}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=DISTRIBUTED_TIMEOUT_MINUTES)
    torch.distributed.init_process_group(backend, timeout=timeout)
    atexit.register(leave_process_group)
    WORLD.rank, WORLD.size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    WORLD.distributed, WORLD.sync_bn = True, sync_bn
    if sync_bn and device.type == "cpu":
        print("--sync-bn on the CPU: GlooSyncBatchNorm (torch's SyncBatchNorm runs on GPUs only)", flush=True)
    return device


def leave_process_group():
    """At exit: destroy the process group, which torch asks for. Without it gloo can abort the finished
    process ("terminate called without an active exception", SIGABRT; measured: 9 of 24 two-rank torchrun
    runs of a gather_rows script, 0 of 24 with it), and torchrun then reports a finished job as failed.
    Not after an uncaught error (sys.last_value): another rank may be inside a collective that destroying
    would wait on."""
    if torch.distributed.is_initialized() and getattr(sys, "last_value", None) is None:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def single_process():
    """Rank 0 runs a stage alone (a teacher the others wait for): no sharding, no DDP, no collectives."""
    saved = dataclasses.replace(WORLD)
    WORLD.rank, WORLD.size, WORLD.distributed = 0, 1, False
    try:
        yield
    finally:
        WORLD.rank, WORLD.size, WORLD.distributed = saved.rank, saved.size, saved.distributed


def rank_rows(count):
    """This rank's rows of a global batch of `count` rows: a contiguous share, rank-major."""
    return slice(count * WORLD.rank // WORLD.size, count * (WORLD.rank + 1) // WORLD.size)


def all_reduce_sum(tensor):
    """The sum over ranks (in place, and returned); the tensor itself in one process."""
    if WORLD.size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def gather_rows(*tensors):
    """Every rank's rows of each tensor, rank-major (dim 0), on every rank: PS-KD's and LSSKD's per-sample
    buffers stay identical on every rank. Shares may differ by a row; they are padded for the gather."""
    if WORLD.size == 1:
        return tensors
    rank = torch.tensor(WORLD.rank, device=tensors[0].device)  # nccl reduces CUDA tensors only
    counts = all_reduce_sum(F.one_hot(rank, WORLD.size) * len(tensors[0]))
    gathered = []
    for tensor in tensors:
        padded = F.pad(tensor.detach(), (0, 0) * (tensor.dim() - 1) + (0, int(counts.max()) - len(tensor)))
        pieces = [torch.empty_like(padded) for _ in range(WORLD.size)]
        torch.distributed.all_gather(pieces, padded.contiguous())
        gathered.append(torch.cat([piece[:count] for piece, count in zip(pieces, counts.tolist())]))
    return tuple(gathered)


class DistributedModel(nn.parallel.DistributedDataParallel):
    """DDP whose attributes fall through to the wrapped model (student.feat_dim, model.backbone), so a
    method file reads the same with and without torchrun. Training forwards go through the wrapper."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def for_evaluation(model):
    """The model in eval mode, outside DDP's wrapper (ranks may see different numbers of test batches);
    under torchrun with rank 0's BN statistics (without --sync-bn each rank's differ after its last step)."""
    model = unwrap(model).eval()
    if WORLD.distributed:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    return model


def unwrap(model):
    """The model inside a DistributedModel (state dicts keep the keys of one process); else the model."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def distribute(model, find_unused=False):
    """Under torchrun, a model with trained parameters in DDP (--sync-bn: its BN layers first made
    synchronised); frozen models (teachers) and one process: the model as it is. `find_unused`: DDP looks for
    parameters without a gradient each step (only where a method's flags leave some unused)."""
    if not WORLD.distributed or not any(parameter.requires_grad for parameter in model.parameters()):
        return model
    if WORLD.sync_bn:
        model = _synchronise_batch_norm(model)
    device = next(model.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedModel(model, device_ids=device_ids, find_unused_parameters=find_unused)


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm for CPU ranks (gloo), where torch's runs on GPUs only: batch statistics over the global
    batch from all-reduced per-channel sums (autograd flows through the all-reduce); eval mode as BatchNorm2d."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        values = x.float()
        count = torch.tensor([values.numel() / values.shape[1]])
        local = torch.cat([values.sum((0, 2, 3)), (values * values).sum((0, 2, 3)), count])
        sums = torch.distributed.nn.functional.all_reduce(local)
        channels, total = x.shape[1], sums[-1]
        mean, mean_square = sums[:channels] / total, sums[channels:-1] / total
        var = mean_square - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * total / (total - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (values * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


def _synchronise_batch_norm(model):
    if next(model.parameters()).device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlooSyncBatchNorm  # same parameters, buffers and state-dict keys
    return model


def autocast(device, enabled):
    """bf16 autocast (`--amp`): on CUDA, and on CPUs with bf16 units (AVX512-BF16/AMX)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def prepare_model(model, device, amp, find_unused=False):
    """Move to the device; --amp also switches to channels_last, the layout bf16 conv kernels prefer.
    Under torchrun a model with trained parameters is wrapped in DDP (`distribute`); freeze teachers first."""
    model = model.to(device)
    return distribute(model.to(memory_format=torch.channels_last) if amp else model, find_unused)


@torch.no_grad()
def evaluate(model, data, batch_size=128, amp=False):
    """Top-1 and top-5 (%) on the un-augmented test set, model in eval mode. Under torchrun each rank
    evaluates its share with rank 0's BN statistics, and the counts are summed over the ranks."""
    model = for_evaluation(model)
    device = data.test_labels.device
    correct = torch.zeros(2, device=device)
    for images, labels in test_batches(data, batch_size, shard=True):
        with autocast(device, amp):
            logits = model(images)
        correct = correct + torch.stack(topk_counts(logits.float(), labels))
    top1, top5 = all_reduce_sum(correct).tolist()
    return {"top1": 100.0 * top1 / len(data.test_labels), "top5": 100.0 * top5 / len(data.test_labels)}


def accuracy_count(logits, labels):
    """Number of rows whose argmax is the label (a tensor: no host sync inside the step)."""
    return (logits.argmax(dim=1) == labels).sum()


def topk_counts(logits, labels):
    """(rows whose top-1 is the label, rows with the label among their top 5), as tensors; top-5 is
    top-C when there are fewer than 5 classes."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (top[:, 0] == labels).sum(), (top == labels[:, None]).any(dim=1).sum()


class Meter:
    """Sums of per-batch metrics kept on the device; one host sync per epoch in `averages`. A training
    meter (given its run folder) also looks at its loss sums every CHECK_EVERY steps, so a run whose
    loss went NaN or inf stops within that many steps, not at the end of the epoch."""

    CHECK_EVERY = 10  # steps; each look is one host sync

    def __init__(self, run_dir=None, remedy=None, hint=None):
        self.sums, self.counts = {}, {}
        self.run_dir, self.remedy, self.hint, self.steps = run_dir, remedy, hint, 0

    def add(self, name, value, count):
        self.sums[name] = self.sums.get(name, 0) + value.detach().float() * count
        self.counts[name] = self.counts.get(name, 0) + count
        if self.run_dir is not None and name == next(iter(self.sums)):  # the step's first metric: a new step
            self.steps += 1
            if self.steps % self.CHECK_EVERY == 0:
                self._stop_if_not_finite()

    def _stop_if_not_finite(self):
        losses = [name for name in self.sums if name.startswith("loss/")]
        finite = torch.stack([torch.isfinite(self.sums[name]) for name in losses]).tolist()
        bad = [name for name, ok in zip(losses, finite) if not ok]
        if bad:
            message = f"{', '.join(bad)} became non-finite by step {self.steps} of this epoch."
            raise FloatingPointError(_with_advice(message, self.run_dir, self.remedy, self.hint))

    def add_sum(self, name, total, count):
        self.sums[name] = self.sums.get(name, 0) + total.detach().float()
        self.counts[name] = self.counts.get(name, 0) + count

    def add_top1(self, name, logits, labels):
        """Top-1 (%) of the rows' argmax against `labels`, averaged over every row of the epoch."""
        self.add_sum(name, 100.0 * accuracy_count(logits, labels), len(labels))

    def averages(self):
        """Each metric's average over the epoch's rows (under torchrun: over every rank's rows)."""
        sums = all_reduce_sum(torch.stack([self.sums[name] for name in self.sums]))
        counts = torch.tensor([self.counts[name] for name in self.sums], dtype=torch.float64, device=sums.device)
        counts = all_reduce_sum(counts)
        return {name: value / count for name, value, count in zip(self.sums, sums.tolist(), counts.tolist())}


def check_finite(metrics, epoch, run_dir, remedy=None, hint=None):
    """Stop with advice when a loss went NaN/inf; the last good epoch is already on disk. `remedy` replaces
    the advice for a stage with its own lr flag or without a checkpoint to resume from; `hint` is the
    method's own advice, said first."""
    bad = [name for name, value in metrics.items() if name.startswith("loss/") and not math.isfinite(value)]
    if bad:
        message = f"{', '.join(bad)} became non-finite in epoch {epoch + 1}."
        raise FloatingPointError(_with_advice(message, run_dir, remedy, hint))


def _with_advice(message, run_dir, remedy, hint):
    return " ".join(part for part in (message, hint, remedy or _advice(run_dir)) if part)


# A recipe's learning rate is set for its default batch: measured, PS-KD's lr 0.1 (for 128 images) at
# --batch-size 16 sends plain CE on PreActResNet18 to NaN within 20 steps; 0.1 x 16/128 trains.
LR_FOR_BATCH = "(a recipe's rate is for its default --batch-size: scale it with a smaller batch)"


def _advice(run_dir):
    """What to do after a non-finite loss: resume from the last finished epoch, or, when none finished, rerun."""
    if (Path(run_dir) / "last.pth").exists():
        where = f"The checkpoint of the last finished epoch is {Path(run_dir) / 'last.pth'}; "
        return where + f"lower --learning-rate {LR_FOR_BATCH} or turn off --amp, then rerun with --resume."
    return (
        f"No epoch finished, so {run_dir} holds no checkpoint: lower --learning-rate {LR_FOR_BATCH} or turn "
        f"off --amp and rerun."
    )


# =================================================================================================
# RUN BOOKKEEPING: arguments, logging, checkpoints, teachers
# =================================================================================================


def _field_docs(args_class):
    """The string literal under each dataclass field: its --help text (as CleanRL/tyro read it). A class
    without a source file (a notebook cell, exec) has no such text: its flags get no help, nothing fails."""
    try:
        body = ast.parse(inspect.getsource(args_class)).body[0].body
    except (OSError, TypeError, IndentationError, SyntaxError):
        return {}
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = after.value.value
    return docs


def _field_groups(args_class):
    """The group comment (`# Run`, `# Recipe`, `# Teacher`, the method's) above each dataclass field: its section in
    --help. Like _field_docs, a class without a source file gets none."""
    try:
        lines, first = inspect.getsourcelines(args_class)
        body = ast.parse("".join(lines)).body[0].body
    except (OSError, TypeError, IndentationError, SyntaxError):
        return {}
    groups, header = {}, None
    for node in body:
        if isinstance(node, ast.AnnAssign):
            above = [line.strip() for line in lines[: node.lineno - 1] if line.strip().startswith("# ")]
            header = above[-1][2:] if above else header
            groups[node.target.id] = header
    return groups


def _str2bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parse_args(args_class, argv=None):
    """Build the command line from the `Args` dataclass: `--field-name`, help from the field's
    docstring, bools as `--flag` / `--flag false`, tuples as space- or comma-separated values.
    `argv` is a list of strings (default: the command line). Values no run can use are refused here,
    before any work (check_common_args). A field declared with `per_dataset` takes its dataset's default
    when its flag is not given (the recipes by dataset: `dataset_recipe`)."""
    docs = _field_docs(args_class)
    hints = typing.get_type_hints(args_class)
    module = sys.modules.get(args_class.__module__)
    module_doc = (getattr(module, "__doc__", None) or "").strip()
    parser = argparse.ArgumentParser(
        description=module_doc.split("\n\n")[0],
        epilog="architectures: " + ", ".join(MODEL_NAMES),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tuple_fields, field_groups, sections = {}, _field_groups(args_class), {}
    for field in dataclasses.fields(args_class):
        flag, kind = "--" + field.name.replace("_", "-"), hints[field.name]
        options = dict(default=field.default, help=docs.get(field.name, ""))
        if by_dataset := field.metadata.get("by_dataset"):  # per_dataset: say each dataset's default
            options["help"] += "".join(f"; {dataset}: {value}" for dataset, value in by_dataset.items())
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if kind is bool:
            options.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(kind) is typing.Literal:
            options.update(choices=typing.get_args(kind))
        elif typing.get_origin(kind) is tuple:
            tuple_fields[field.name] = typing.get_args(kind)[0]
            options.update(nargs="+", type=str)
        else:
            options.update(type=kind)
        header = field_groups.get(field.name)
        section = sections.setdefault(header, parser.add_argument_group(header)) if header else parser
        section.add_argument(flag, **options)
    argv = sys.argv[1:] if argv is None else list(argv)
    values = vars(parser.parse_args(argv))
    if recipe := dataset_recipe(args_class, values, _given_fields(parser, argv)):
        print(f"--dataset {values['dataset']}: its recipe's defaults {_shown(recipe)}", flush=True)
        values.update(recipe)
    for name, item_type in tuple_fields.items():  # "150,180,210" and "150 180 210" both work
        tokens = values[name] if isinstance(values[name], (list, tuple)) else [values[name]]
        try:
            values[name] = tuple(item_type(part) for token in tokens for part in str(token).split(",") if part)
        except ValueError:
            parser.error(
                f"--{name.replace('_', '-')}: expected {item_type.__name__} values, got {' '.join(map(str, tokens))}"
            )
    args = args_class(**values)
    try:
        check_common_args(args)
    except ConfigError as err:
        parser.error(str(err))  # usage line + message, exit 2: nothing has run yet
    return args


def per_dataset(default, **by_dataset):
    """An Args field default that switches with --dataset: `epochs: int = common.per_dataset(240, imagenet=100)`.
    A str may name another field ("torchvision:{teacher}"); docs/<method>.md cites each recipe's source."""
    return dataclasses.field(default=default, metadata={"by_dataset": by_dataset})


def dataset_recipe(args_class, values, given):
    """{field: its default on --dataset} for every per_dataset field whose flag was not given. A value that names
    another field is left out when that field was given another value (the recipe's teacher file fits only the
    recipe's teacher)."""
    dataset = values.get("dataset")
    defaults = {field.name: field.metadata.get("by_dataset", {}) for field in dataclasses.fields(args_class)}
    defaults = {name: by_dataset[dataset] for name, by_dataset in defaults.items() if dataset in by_dataset}
    recipe = {name: value for name, value in defaults.items() if name not in given}
    names = lambda text: {name for _, name, _, _ in string.Formatter().parse(text) if name}
    templates = {name: value for name, value in recipe.items() if isinstance(value, str) and names(value)}
    for name, value in templates.items():
        recipe.pop(name)
        if all(values[other] == defaults.get(other) for other in names(value) & given):
            recipe[name] = value.format(**{**values, **recipe})
    return recipe


def _shown(values):
    return " ".join(
        f"{_flag(name)} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
        for name, value in values.items()
    )


def _given_fields(parser, argv):
    """The fields whose flags are on the command line (each default set aside for one parse)."""
    defaults = {action: action.default for action in parser._actions}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults.items():
            action.default = default


def _flag(name):
    return "--" + name.replace("_", "-")


# The range of every number a method file takes, by field name: refused at argument time, before any work.
# tests/test_layout.py checks that every int, float and tuple field of every Args class is listed here.
FIELD_RANGES = {
    "at least 1": (
        *("epochs", "batch_size", "eval_batch_size", "train_subset", "test_subset", "branches"),
        *("ce_teacher_epochs", "t_epochs", "teacher_epochs", "image_size"),
    ),
    "positive": (*("learning_rate", "t_lr", "teacher_lr", "lr_gamma"), *("kd_T", "tf_T", "ss_T", "head_T", "sad_tau")),
    "0 or more": (
        *("warmup_epochs", "weight_decay", "ce_weight", "kd_weight", "tf_weight", "ss_weight", "workers"),
        *("kl_p_weight", "kl_q_weight", "student_aux_ce_weight", "lambda_sad", "lambda_kl", "lambda_feat"),
    ),
    "in [0, 1)": ("momentum",),
    "in [0, 1]": ("ratio_tf", "ratio_ss", "alpha_T"),
    "in [0, 100]": ("teacher_expected_acc",),
    "0-based epochs (0 or more)": ("lr_milestones", "t_milestones", "teacher_milestones"),
    "a whole number": ("seed", "head_seed", "teacher_seed"),
}
RANGE_TESTS = {
    "at least 1": lambda value: value >= 1,
    "positive": lambda value: value > 0,
    "0 or more": lambda value: value >= 0,
    "in [0, 1)": lambda value: 0 <= value < 1,
    "in [0, 1]": lambda value: 0 <= value <= 1,
    "in [0, 100]": lambda value: 0 <= value <= 100,
    "0-based epochs (0 or more)": lambda value: all(epoch >= 0 for epoch in value),
    "a whole number": lambda value: True,
    "a finite number": lambda value: True,  # a field of a class outside this repository
}
RANGE_OF_FIELD = {name: rule for rule, names in FIELD_RANGES.items() for name in names}


def _range_problem(name, value):
    """Why `value` is out of the field's range (FIELD_RANGES), or None. NaN and infinities never pass."""
    rule = RANGE_OF_FIELD.get(name, "a finite number")
    numbers = value if isinstance(value, tuple) else (value,)
    if not all(math.isfinite(number) for number in numbers):
        return f"{_flag(name)} {value} must be a finite number, {rule}"
    return None if RANGE_TESTS[rule](value) else f"{_flag(name)} {value} must be {rule}"


def check_common_args(args):
    """Refuse values no run can use, so every script checks them before any work: every number against
    its range in FIELD_RANGES (NaN and infinities refused everywhere), and output folders that can be
    created. An unset (None) optional number is left to the script's recipe."""
    values = dataclasses.asdict(args)
    problems = []
    for name, value in values.items():
        if value is None or isinstance(value, (bool, str)):
            continue
        if name == "train_subset" and value < 1:
            problems.append(f"--train-subset {value} must be a positive number of images (leave it unset for all)")
        elif problem := _range_problem(name, value):
            problems.append(problem)
    size = values.get("image_size") or default_image_size(values.get("dataset"))
    for name in ("teacher", "student", "model"):
        arch = values.get(name)
        if values.get("dataset") in FOLDER_DATASETS and arch in _ZOO and not arch.endswith("_imagenet") and size != 32:
            problems.append(
                f"{_flag(name)} {arch} is a CIFAR network (32x32 inputs) but images are {size}x{size}: pass "
                f"--image-size 32, or a torchvision network (resnet18_imagenet, resnet34_imagenet, resnet50_imagenet)"
            )
    ranks = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1
    if values.get("batch_size") and values["batch_size"] % ranks:
        problems.append(f"--batch-size {values['batch_size']} is the global batch: it must divide by the {ranks} ranks")
    if values.get("teacher_sha256") is not None:
        if not values.get("teacher_path"):
            problems.append("--teacher-sha256 checks the file of --teacher-path: give that too")
        elif not re.fullmatch(r"[0-9a-fA-F]{8,64}", values["teacher_sha256"]):
            problems.append(f"--teacher-sha256 {values['teacher_sha256']}: give 8 to 64 hex digits of the sha256")
    for name in ("output_dir", "checkpoint_dir"):
        if name in values and (problem := _unwritable(Path(values[name]))):
            problems.append(f"{_flag(name)} {values[name]}: {problem}")
    if problems:
        raise ConfigError("; ".join(problems))


def _unwritable(folder):
    """Why `folder` cannot be created or written, or None. Leaves nothing behind: it writes one temporary
    file into the nearest existing folder, because permission bits do not tell root that /proc is not
    writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or type(err).__name__})"
    return None


def check_architectures(*names, valid=None, kind=None):
    """Unknown architecture names stop the run before any data, teacher or run folder (a typo in
    --student must not cost a teacher's training first). `kind` names a narrower family (CSS's networks)."""
    valid = valid or MODEL_NAMES
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problem = f"{name!r} is not a {kind}" if kind else f"unknown architecture {name!r}"
            raise ConfigError(f"{problem}{hint}; choose one of: {', '.join(valid)}")


def show_user_errors_plainly():
    """Every script's first call: user errors (bad input, a diverged loss) print one line, not a traceback.
    Under torchrun, rank 0 speaks for the job: the other ranks' stdout is silenced (errors still show)."""
    sys.excepthook = _friendly_excepthook
    if int(os.environ.get("RANK", "0")) > 0 and under_torchrun():
        sys.stdout = open(os.devnull, "w")


def _friendly_excepthook(kind, error, trace):
    """User errors print one clear line instead of a traceback; everything else is unchanged."""
    if issubclass(kind, (ConfigError, FloatingPointError)):
        rank = f" (rank {os.environ['RANK']})" if under_torchrun() else ""
        print(f"error{rank}: {error}", file=sys.stderr)
    elif issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted: every finished epoch is saved; rerun the same command with --resume", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, trace)


def print_config(args, title):
    print(f"{title}: " + " ".join(f"{key}={value}" for key, value in dataclasses.asdict(args).items()), flush=True)


def git_commit():
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare_run_dir(args, default_name):
    """runs/<run_name>/; refuses to overwrite an existing run unless --resume is given."""
    run_dir = Path(args.output_dir) / (args.run_name or default_name)
    if (run_dir / "last.pth").exists() and not args.resume:
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, or --run-name "
            f"(or --output-dir) to start a new one"
        )
    if args.resume and not (run_dir / "last.pth").exists():
        print(f"--resume: {run_dir} holds no finished epoch to resume from; starting a new run there", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _optional_import(module, package):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"this option needs the {package} package: pip install {package}") from None


def _logged_epoch(line):
    """The epoch of a metrics.jsonl line; a line cut off by a kill or a full disk counts as not logged."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Logger:
    """Per-epoch metrics: one stdout line, runs/<run>/metrics.jsonl, and optionally TensorBoard
    (`--tensorboard`) and Weights & Biases (`--track`), both imported only when asked for."""

    def __init__(self, run_dir, args, start_epoch=0, file_name="metrics.jsonl", tracking=True):
        self.path = Path(run_dir) / file_name if is_main_process() else None  # torchrun: rank 0 writes
        self.tensorboard = self.wandb = None
        if self.path is None:
            return
        if self.path.exists():  # on resume, drop epochs that will be run again (lines carry 1-based epochs)
            kept = [line for line in self.path.read_text().splitlines() if _logged_epoch(line) <= start_epoch]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tracking and getattr(args, "tensorboard", False):
            SummaryWriter = _optional_import("torch.utils.tensorboard", "tensorboard").SummaryWriter
            self.tensorboard = SummaryWriter(str(run_dir))
        if tracking and getattr(args, "track", False):
            wandb = _optional_import("wandb", "wandb")
            self.wandb = wandb.init(
                project=args.wandb_project, name=Path(run_dir).name, config=dataclasses.asdict(args), resume="allow"
            )

    def log(self, epoch, metrics):
        """`epoch` is the loop's 0-based index; files and screens say epoch + 1, as summary.json does."""
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch + 1, **metrics}) + "\n")
        if self.tensorboard:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, epoch + 1)
        if self.wandb:
            self.wandb.log(metrics, step=epoch + 1)


def format_seconds(seconds):
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def print_epoch(epoch, epochs, metrics, epoch_start, stage="epoch"):
    """The one progress line per epoch: epoch, lr, each loss term, accuracies, speed, and the ETA from
    this epoch's wall time since `epoch_start` (time.time()), its evaluation included."""
    seconds_left = (time.time() - epoch_start) * (epochs - epoch - 1)
    loss_order = lambda name: (name != "loss/ce", name == "loss/total")  # ce first, method terms, total last
    losses = " ".join(
        f"{name} {metrics[name]:.4f}"
        for name in sorted((name for name in metrics if name.startswith("loss/")), key=loss_order)
    )
    train = " ".join(f"{name} {value:.2f}" for name, value in metrics.items() if name.startswith("train/"))
    test = " ".join(f"{name} {value:.2f}" for name, value in metrics.items() if name.startswith("test/"))
    if "test/top1" in metrics:  # a student: top-1, top-5 and best, other test metrics are in the files
        test = (
            f"test/top1 {metrics['test/top1']:.2f} top5 {metrics['test/top5']:.2f} best {metrics['test/best_top1']:.2f}"
        )
    print(
        f"{stage} {epoch + 1}/{epochs} lr {metrics['lr']:.5f} | {losses} | {train} | {test} | "
        f"{metrics['speed/images_per_s']:.0f} img/s | eta {format_seconds(seconds_left)}",
        flush=True,
    )


def save_checkpoint(path, payload):
    """Atomic save: write a temporary file, then rename, so an interruption never leaves a
    truncated checkpoint behind. Under torchrun, rank 0 alone writes."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError from its writer
        temporary.unlink(missing_ok=True)
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
        reason = "the disk is full" if full else f"{type(err).__name__}: {err}"
        raise ConfigError(
            f"could not write {path}: {reason}. The previous {path.name} (if any) is unchanged; "
            f"free some space and rerun the same command with --resume."
        ) from None


def rng_states():
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def training_state(model, optimizer, epoch, best, args, trained_with=None, **extra):
    """Everything `--resume` needs. `model` uses RepDistiller's keys so the file also serves as a
    teacher checkpoint; `epoch` counts finished epochs. `trained_with` ({key: module, tensor or None})
    is what a method trains or keeps beside the model (heads, branches, prediction buffers)."""
    trained_with = trained_with or {}
    kept = {
        key: unwrap(value).state_dict() if hasattr(value, "state_dict") else value
        for key, value in trained_with.items()
    }
    model = unwrap(model)
    return {
        "model": model.state_dict(),
        "arch": model.arch,
        "num_classes": model.num_classes,
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "best": best,
        "args": dataclasses.asdict(args),
        "rng": rng_states(),
        **kept,
        **extra,
    }


def model_payload(model, epoch, result, args):
    """A weights-only checkpoint (best.pth, cached teachers) in RepDistiller's {"model": ...} format."""
    model = unwrap(model)
    return {
        "model": model.state_dict(),
        "arch": model.arch,
        "num_classes": model.num_classes,
        "epoch": epoch,
        "test_acc": result["top1"],
        "args": dataclasses.asdict(args),
    }


def _checkpoint_safe_globals():
    """The only non-tensor types our files and the community formats hold: numpy's RNG state and scalars
    (last.pth, some official files) and argparse.Namespace (RepDistiller's `opt`). Nothing else is built."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = [
        type(np.dtype(kind)) for kind in (np.uint8, np.uint32, np.int32, np.int64, np.float32, np.float64, np.bool_)
    ]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, argparse.Namespace, *dtypes]


def load_checkpoint(path, what="checkpoint", remedy=None):
    """torch.load with weights_only=True: tensors, plain containers and the types above, so a file that
    would run code while loading is refused and nothing in it runs. A missing, truncated or foreign file
    gives one paragraph naming it; `remedy` says what to do (e.g. that deleting a cache retrains it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise ConfigError(
            f"{what} {path} is empty (0 bytes), not a PyTorch checkpoint." + (f" {remedy}" if remedy else "")
        )
    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("\n")[-3].strip() if "GLOBAL" in str(err) else str(err).splitlines()[0]
        raise ConfigError(
            f"{what} {path} was refused: it needs more than tensors and plain values to load "
            f"({detail}). Nothing in it was run. Load only checkpoints whose origin you trust; "
            f"if you do trust it, re-save its state dict with torch.save(model.state_dict(), ...)."
            + (f" {remedy}" if remedy else "")
        ) from None
    except Exception as err:  # truncated zip, garbage bytes, wrong format
        raise ConfigError(
            f"{what} {path} could not be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); "
            f"it is truncated or not a PyTorch checkpoint." + (f" {remedy}" if remedy else "")
        ) from None


# Arguments that may differ when a run is resumed: where things are, how it is watched; not what is trained.
RESUME_MAY_CHANGE = (
    "resume",
    "resume_with_changes",
    "device",
    "output_dir",
    "run_name",
    "data_dir",
    "checkpoint_dir",
    "eval_batch_size",
    "tensorboard",
    "track",
    "wandb_project",
)


def changed_arguments(recorded, args):
    """{name: (recorded value, new value)} for every argument outside RESUME_MAY_CHANGE that differs."""
    current = dataclasses.asdict(args)
    as_tuple = lambda value: tuple(value) if isinstance(value, list) else value
    return {
        name: (recorded.get(name), value)
        for name, value in current.items()
        if name not in RESUME_MAY_CHANGE and as_tuple(recorded.get(name)) != as_tuple(value)
    }


def check_resume_arguments(path, checkpoint, args):
    """Refuse a resume whose arguments differ from the interrupted run's, unless --resume-with-changes;
    accepted changes are appended to resumes.jsonl beside last.pth, so the record of the earlier epochs
    stays (summary.json repeats it)."""
    changes = changed_arguments(checkpoint.get("args", {}), args)
    if not changes:
        return
    listed = "; ".join(f"{_flag(name)} {old!r} -> {new!r}" for name, (old, new) in changes.items())
    if not getattr(args, "resume_with_changes", False):
        raise ConfigError(
            f"{path} was trained with other arguments: {listed}. Rerun with the original values, or "
            f"add --resume-with-changes to continue with the new ones (the change is recorded)."
        )
    print(f"resuming with changed arguments (from epoch {checkpoint['epoch'] + 1} on): {listed}", flush=True)
    if not is_main_process():
        return
    with open(Path(path).parent / "resumes.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "from_epoch": checkpoint["epoch"] + 1,
                    "changed": {name: [old, new] for name, (old, new) in changes.items()},
                }
            )
            + "\n"
        )


def resume_state(run_dir, model, optimizer, resume, args=None, trained_with=None):
    """With --resume, load runs/<run>/last.pth into model and optimizer, after checking that `args` match
    the interrupted run's, and into what the method trains or keeps beside the model (`trained_with`, as
    saved by training_state). Returns (start_epoch, best, checkpoint); a fresh start is (0, no best yet, None)."""
    path = Path(run_dir) / "last.pth"
    if not (resume and path.exists()):
        return 0, {"top1": 0.0, "top5": 0.0, "epoch": -1}, None
    checkpoint = load_checkpoint(
        path, "the run's last checkpoint", "Delete it (the run restarts from epoch 1) or restore it from a backup."
    )
    if args is not None:
        check_resume_arguments(path, checkpoint, args)
    load_weights(unwrap(model), checkpoint, str(path))
    optimizer.load_state_dict(checkpoint["optimizer"])
    for key, target in (trained_with or {}).items():
        _restore(target, checkpoint.get(key), key, path)
    restore_rng_states(checkpoint["rng"])
    print(f"resumed from {path} after epoch {checkpoint['epoch']}", flush=True)
    return checkpoint["epoch"], checkpoint["best"], checkpoint


def _restore(target, saved, key, path):
    """Load a saved module state or tensor (a prediction buffer) into `target`, refusing a file from a run
    whose flags gave it another shape; a None target (a switched-off buffer) is left alone."""
    if target is None:
        return
    if hasattr(target, "load_state_dict") and isinstance(saved, dict):  # a module or an optimizer
        unwrap(target).load_state_dict(saved)
        return
    if not isinstance(saved, torch.Tensor) or saved.shape != target.shape or saved.dtype != target.dtype:
        found = f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, torch.Tensor) else "none"
        needed = "a saved state" if hasattr(target, "load_state_dict") else f"{tuple(target.shape)} {target.dtype}"
        raise ConfigError(
            f"{path} holds {key} {found}, but this run needs {needed}: resume with the flags of the "
            f"interrupted run (the method's own flags, --train-subset, --dataset, --model)"
        )
    target.copy_(saved)


def extract_state_dict(checkpoint):
    """The state dict inside any supported checkpoint format (README.md, Teachers): look for
    "model", then "state_dict", then "net"; strip DDP's "module." prefix."""
    for key in ("model", "state_dict", "net"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {name.removeprefix("module."): tensor for name, tensor in checkpoint.items()}


def load_weights(model, checkpoint, source):
    """Strict load with a message that says what does not match, instead of a bare KeyError."""
    if isinstance(checkpoint, dict) and checkpoint.get("arch") not in (None, model.arch):
        raise ConfigError(
            f"{source} holds a {checkpoint['arch']}, not the requested {model.arch}; "
            f"pass the matching architecture or another checkpoint"
        )
    if isinstance(checkpoint, dict) and checkpoint.get("num_classes") not in (None, model.num_classes):
        raise ConfigError(
            f"{source} has {checkpoint['num_classes']} classes, but this run needs "
            f"{model.num_classes} (check --dataset)"
        )
    state = extract_state_dict(checkpoint)
    expected = model.state_dict()
    for ours, theirs in (("classifier.0.weight", "classifier.weight"), ("classifier.0.bias", "classifier.bias")):
        if ours in expected and theirs in state:  # SSKD/HSAKD MobileNetV2 spell the classifier bare
            state[ours] = state.pop(theirs)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{name} {tuple(state[name].shape)} vs {tuple(expected[name].shape)}"
        for name in expected
        if name in state and state[name].shape != expected[name].shape
    ]
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if items
        )
        raise ConfigError(f"{source} does not match {model.arch} with {model.num_classes} classes ({details})")
    model.load_state_dict(state, strict=True)


def model_from_checkpoint(arch, num_classes, checkpoint, source, build=None):
    """Build `arch` (with `build`, e.g. build_auxiliary_model; default build_model) and load the weights of a
    loaded checkpoint (any supported format)."""
    with torch.random.fork_rng(devices=[]):  # building a model to overwrite must not shift the seed's stream
        model = (build or build_model)(arch, num_classes)
    load_weights(model, checkpoint, source)
    return model


def load_model_file(arch, num_classes, path):
    """Build `arch` and load weights from `path` (any supported format, loaded safely; a URL or short
    name is downloaded first, fetch_checkpoint)."""
    path = fetch_checkpoint(path, Path("checkpoints"))
    return model_from_checkpoint(arch, num_classes, load_checkpoint(path), str(path))


def write_summary(run_dir, args, best, last, method, **extra):
    """The small JSON every run ends with: last-epoch top-1 is the primary number, best-epoch top-1 (with its
    1-based epoch) is labelled as such; the method, the device and versions it ran on, every argument, and
    any argument changes accepted on resume (resumes.jsonl)."""
    resumes = Path(run_dir) / "resumes.jsonl"
    summary = {
        "method": method,
        "last_top1": last["top1"],
        "last_top5": last["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"] + 1,
        **extra,
        "seed": args.seed,
        "git_commit": git_commit(),
        **runtime_info(resolve_device(args.device)),
        "world_size": WORLD.size,  # torchrun's ranks (1: one process)
        "args": dataclasses.asdict(args),
    }
    if resumes.exists():
        summary["resumed_with_changes"] = [json.loads(line) for line in resumes.read_text().splitlines() if line]
    if is_main_process():
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"done: last-epoch test top1 {last['top1']:.2f} (primary), best-epoch top1 {best['top1']:.2f} "
        f"at epoch {best['epoch'] + 1}; summary in {Path(run_dir) / 'summary.json'}",
        flush=True,
    )
    return summary


# =================================================================================================
# TEACHERS AND CACHED STAGES: what a student needs first, top-down from load_teacher
# =================================================================================================


def load_teacher(args, data, device):
    """The teacher for distillation, in eval mode and frozen, with its test accuracy printed.
    Uses --teacher-path, else the cached checkpoint, else trains one with baseline.py first."""
    train = lambda cache: train_teacher(args, cache)
    path = cached_stage(
        args.teacher_path, teacher_cache_path(args), train, sha256=getattr(args, "teacher_sha256", None)
    )
    remedy = None if args.teacher_path else "It is a cached teacher: delete it and rerun to train it again."
    checkpoint = load_checkpoint(path, "teacher checkpoint", remedy)
    teacher = model_from_checkpoint(args.teacher, data.num_classes, checkpoint, str(path))  # architecture, classes
    check_teacher_normalization(checkpoint, args, path)
    teacher = prepare_model(teacher.eval().requires_grad_(False), device, args.amp)  # frozen: no DDP
    result = evaluate(teacher, data, args.eval_batch_size, args.amp)
    print(f"teacher {args.teacher} from {path}: test top1 {result['top1']:.2f} top5 {result['top5']:.2f}", flush=True)
    expected = args.teacher_expected_acc
    full_recipe = args.teacher_path or path.stem == args.teacher  # not a reduced quick-run teacher
    if expected is None and args.dataset == "cifar100" and full_recipe:
        expected = EXPECTED_TEACHER_TOP1.get(args.teacher)
    if expected is not None and abs(result["top1"] - expected) > 0.5:
        message = f"teacher top1 {result['top1']:.2f} differs from the expected {expected:.2f} by more than 0.5"
        if args.strict_teacher_check:
            raise ConfigError(message + " (--strict-teacher-check is on)")
        print(f"warning: {message}", flush=True)
    return teacher, result | {"file": path}


def check_teacher_normalization(checkpoint, args, source):
    """A teacher whose checkpoint records its --normalize must have been trained on the inputs the student
    feeds it; otherwise refuse, or warn with --allow-teacher-normalize-mismatch. Community files record
    nothing and are trusted."""
    recorded = checkpoint.get("args", {}).get("normalize") if isinstance(checkpoint.get("args"), dict) else None
    if recorded is None or recorded not in NORMALIZE or same_normalization(recorded, args.normalize):
        return
    message = (
        f"{source} was trained with --normalize {recorded}, but this run feeds it --normalize "
        f"{args.normalize}: its accuracy would drop. Pass --normalize {recorded}"
    )
    if not args.teacher_path:  # a cached teacher: retraining it is an option; a user's file is theirs
        message += ", or delete the file so that it is retrained with this run's data settings"
    if not getattr(args, "allow_teacher_normalize_mismatch", False):
        raise ConfigError(message + " (or --allow-teacher-normalize-mismatch to use it anyway).")
    print(f"warning: {message}.", flush=True)


# Published teacher accuracies of the RepDistiller/mdistiller checkpoints (RepDistiller's README).
EXPECTED_TEACHER_TOP1 = {
    "wrn_40_2": 75.61,
    "resnet56": 72.34,
    "resnet110": 74.31,
    "resnet32x4": 79.42,
    "vgg13": 74.64,
    "ResNet50": 79.34,
}


def teacher_cache_path(args):
    """checkpoints/<dataset>/<arch>.pth for the full recipe; a suffix marks reduced runs so a quick
    test teacher is never mistaken for a real one."""
    suffix = (f"_e{args.ce_teacher_epochs}" if args.ce_teacher_epochs != 240 else "") + (
        f"_n{args.train_subset}" if args.train_subset else ""
    )
    if not same_normalization(args.normalize, default_normalize(args.dataset, "repdistiller")):
        suffix += f"_norm-{args.normalize}"  # the dataset's usual constants keep the plain name
    return Path(args.checkpoint_dir) / args.dataset / f"{args.teacher}{suffix}.pth"


def train_teacher(args, cache_path):
    """Train the missing teacher with baseline.py (one code path for baselines and teachers) and
    keep its last-epoch weights, as RepDistiller's ckpt_epoch_240.pth teachers are."""
    run_name = "teacher_" + cache_path.stem + f"_{args.dataset}"
    command = [
        sys.executable,
        str(REPO_DIR / "baseline.py"),
        "--model",
        args.teacher,
        "--dataset",
        args.dataset,
        "--data-dir",
        args.data_dir,
        "--epochs",
        str(args.ce_teacher_epochs),
        "--normalize",
        args.normalize,
        "--amp",
        str(args.amp),
        "--output-dir",
        args.output_dir,
        "--run-name",
        run_name,
    ]
    if (Path(args.output_dir) / run_name / "last.pth").exists():  # an interrupted teacher run continues
        command.append("--resume")
    if args.train_subset:
        command += ["--train-subset", str(args.train_subset)]
    if args.dataset in FOLDER_DATASETS:
        size = args.image_size or default_image_size(args.dataset)
        command += ["--image-size", str(size), "--workers", str(args.workers)]
    if args.device:
        command += ["--device", args.device]
    print(
        f"no teacher checkpoint at {cache_path}: training one with baseline.py "
        f"({args.ce_teacher_epochs} epochs; interruptible, resumes where it stopped)\n  {' '.join(command)}",
        flush=True,
    )
    preexec = die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
    environment = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    if subprocess.run(command, preexec_fn=preexec, env=environment).returncode != 0:
        raise ConfigError("training the teacher failed (see above); fix it and rerun, it resumes")
    last_file = Path(args.output_dir) / run_name / "last.pth"
    publish_stage(last_file, cache_path, "the teacher run's last checkpoint")


def die_with_parent(parent_pid):
    """preexec_fn of a stage's child process: it receives SIGTERM when the method script that started it
    dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG), so no orphaned training is left behind."""

    def set_death_signal():
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return  # not Linux: no such guarantee
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return set_death_signal


def cached_stage(given_path, cache_path, train, seed=None, sha256=None):
    """The rule of every stage a student needs first (the CE teacher, SSKD's teacher head, HSAKD's stage 1):
    the file the user gave, else the cached file, else `train(cache_path)` writes it. Training runs under
    `cache_lock`, so concurrent runs that need the same stage train it once. With `seed`, training draws
    from its own random stream seeded with it, and the caller's stream is left as it was: the stage is the
    same for every student seed, and the student the same whether the stage was trained, cached or given.
    `sha256` (hex digits) is what the given file must hash to. Returns the file to load.
    Under torchrun, rank 0 downloads or trains (alone, as one process would) while the other ranks wait."""
    if given_path:
        folder = Path(cache_path).parent if cache_path else Path("checkpoints")
        with rank_zero_first():
            return fetch_checkpoint(given_path, folder, sha256)
    if not is_main_process():
        while not Path(cache_path).exists():  # no collective: a stage may train for longer than its timeout
            time.sleep(STAGE_POLL_SECONDS)
        return Path(cache_path)
    with cache_lock(cache_path):
        if not Path(cache_path).exists():
            if WORLD.distributed:
                print(
                    f"torchrun: rank 0 trains {Path(cache_path).name} alone; the other ranks wait for it "
                    f"(docs/distributed.md: train stages first to use every device)",
                    flush=True,
                )
            with single_process(), torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.default_generator.manual_seed(seed)
                train(cache_path)
    return Path(cache_path)


STAGE_POLL_SECONDS = 2  # how often ranks other than 0 look for the stage rank 0 trains


@contextlib.contextmanager
def rank_zero_first():
    """Under torchrun, rank 0 runs the block before the other ranks do (a download the others then reuse)."""
    if WORLD.distributed and not is_main_process():
        torch.distributed.barrier()
    yield
    if WORLD.distributed and is_main_process():
        torch.distributed.barrier()


@contextlib.contextmanager
def cache_lock(path):
    """Hold an exclusive lock on <path>.lock while a cached stage is looked up and, if missing, trained and
    written: concurrent runs (a sweep's jobs) that need the same cache train it once; the others wait,
    then load it. A POSIX advisory lock (fcntl) where the file system supports it; otherwise (Windows, an
    NFS mount without locks) an exclusive lock file (_lock_file_held)."""
    lock_path = Path(path).with_name(Path(path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        fcntl = None
    with open(lock_path, "a") as lock_file:
        try:
            if fcntl is None:
                raise OSError("no fcntl")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another run that is preparing {path}", flush=True)
                fcntl.flock(lock_file, fcntl.LOCK_EX)
        except OSError:  # no advisory locks here: fall back to a lock file
            with _lock_file_held(lock_path.with_name(lock_path.name + ".held"), path):
                yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


LOCK_HEARTBEAT_SECONDS = 30  # how often a lock file's holder touches it
LOCK_STALE_SECONDS = 300  # a lock file untouched this long belongs to a dead holder


@contextlib.contextmanager
def _lock_file_held(held_path, path):
    """An exclusive lock as a file created with O_EXCL (atomic on local disks and NFS v3+), naming its
    holder (host, pid). A thread touches it every LOCK_HEARTBEAT_SECONDS; a lock file whose holder is a
    dead process on this host, or that nobody touched for LOCK_STALE_SECONDS, is stale and taken over."""
    import socket
    import threading

    holder = f"{socket.gethostname()} {os.getpid()}"
    announced = False
    while True:
        try:
            descriptor = os.open(held_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if _stale_lock(held_path):
                held_path.unlink(missing_ok=True)
                continue
            if not announced:
                print(f"waiting for another run that is preparing {path} ({held_path})", flush=True)
                announced = True
            time.sleep(1)
    with os.fdopen(descriptor, "w") as held:
        held.write(holder)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(LOCK_HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(held_path)

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        held_path.unlink(missing_ok=True)


def _stale_lock(held_path):
    """Whether a lock file's holder is gone: a dead pid on this host, or no heartbeat for LOCK_STALE_SECONDS."""
    import socket

    try:
        host, pid = held_path.read_text().split()
        age = time.time() - held_path.stat().st_mtime
    except (OSError, ValueError):
        return False  # being written or just removed: look again
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return age > LOCK_STALE_SECONDS


def publish_stage(checkpoint_file, cache_path, what, **provenance):
    """Copy a finished stage run's checkpoint into the cache as weights only (model, arch, num_classes,
    epoch, args) plus `provenance`; the atomic save means a half-written cache file never exists."""
    checkpoint = load_checkpoint(checkpoint_file, what)
    weights = {key: checkpoint[key] for key in ("model", "arch", "num_classes", "epoch", "args")}
    save_checkpoint(cache_path, weights | provenance)


def stage_digest(length, *parts):
    """The digest in a cached stage's file name: sha1 over `parts` in order, each a file (its bytes), a dict
    (its sorted JSON) or None (skipped). It covers everything the stage depends on, so a changed teacher or
    recipe never reuses a stale file; the student's --seed stays out, so seeds share a stage."""
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, dict):
            digest.update(json.dumps(part, sort_keys=True).encode())
        elif part is not None:
            digest.update(Path(part).read_bytes())
    return digest.hexdigest()[:length]


# ---- checkpoints from URLs (docs/teachers.md) ----

# Short names for published checkpoint files, with the URL their publisher gives (torchvision.models'
# ResNet*_Weights.IMAGENET1K_V1.url); torchvision's file names end in the first hex digits of the sha256.
KNOWN_CHECKPOINTS = {
    "torchvision:resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "torchvision:resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "torchvision:resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
KNOWN_CHECKPOINTS.update({f"{name}_imagenet": url for name, url in KNOWN_CHECKPOINTS.items()})  # the zoo's names
URL_SCHEMES = ("http://", "https://", "file://")


def expected_sha256(url, file_name):
    """The sha256 (or its leading hex digits) a download must have: URL#sha256=HEX, else torchvision's
    name-<at least 8 hex digits>.pth convention, else None (not checked)."""
    fragment = url.partition("#")[2]
    if fragment.startswith("sha256="):
        return fragment.removeprefix("sha256=").lower()
    found = re.search(r"-([0-9a-f]{8,64})\.[^.]+$", file_name)
    return found.group(1) if found else None


def fetch_checkpoint(spec, folder, sha256=None):
    """A local file for a checkpoint argument. A path is returned as it is; a short name (KNOWN_CHECKPOINTS)
    or an http(s):// or file:// URL is downloaded once into <folder>/downloads/ with a progress bar, to a
    temporary file renamed only when complete and verified (expected_sha256), so a partial or wrong
    download is never used. A file downloaded earlier is verified again and reused. `sha256` (leading hex
    digits of the file's sha256, e.g. --teacher-sha256) overrides the URL's and is checked on a local path too."""
    spec = KNOWN_CHECKPOINTS.get(str(spec), str(spec))
    sha256 = sha256.lower() if sha256 else None
    if not spec.startswith(URL_SCHEMES):
        if sha256 and Path(spec).is_file() and not _sha256(spec).startswith(sha256):
            raise ConfigError(
                f"{spec} has sha256 {_sha256(spec)}, which does not start with the --teacher-sha256 {sha256} "
                f"you gave: it is not the file you meant (nothing was loaded from it)"
            )
        return Path(spec)
    url = spec.partition("#")[0]
    file_name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "checkpoint.pth"
    target = Path(folder) / "downloads" / file_name
    expected = sha256 or expected_sha256(spec, file_name)
    if target.exists():
        if expected is None or _sha256(target).startswith(expected):
            return target
        target.unlink()
        print(f"{target} did not match its sha256 {expected}...: downloading it again", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {target}", flush=True)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=expected, progress=True)
    except RuntimeError as err:  # torch.hub: invalid hash value; nothing was kept
        raise ConfigError(
            f"{url} does not match its expected sha256 ({err}); the download was removed. Check the URL "
            f"and the #sha256= you gave, or download the file yourself and pass its path."
        ) from None
    except OSError as err:  # no network, a refused connection, a missing file
        reason = getattr(err, "reason", None) or err
        raise ConfigError(
            f"could not download {url} ({reason}). Offline? Fetch the file on a machine with internet and "
            f"place it at {target} (or pass its local path)."
        ) from None
    return target


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
