"""Write CIFAR-10/100 as image folders, to train it through --dataset imagefolder (or imagenet, tiny-imagenet).

    python tools/cifar_to_folder.py DATA_DIR OUT --dataset cifar10    # OUT/train/<class>/*.png, OUT/val/...
    python tools/cifar_to_folder.py DATA_DIR OUT --dataset cifar10 --layout tiny-imagenet --format jpeg

DATA_DIR holds the official python layout (cifar-10-batches-py/ ...). Class folders are named
<label, 3 digits>_<class name>, so their sorted order is CIFAR's label order; PNG keeps every pixel (the
equivalence check of README.md, "Data beyond CIFAR", relies on it), JPEG (quality 95) gives real JPEG files.
--layout tiny-imagenet writes tiny-imagenet-200's layout instead (train/<class>/images/, val/images/ with
val_annotations.txt). Nothing is written into a non-empty OUT.

Run: python tools/cifar_to_folder.py data /tmp/cifar10_folder --dataset cifar10
"""

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (importing it has no side effects)

CLASS_NAMES_FILE = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}


def class_names(dataset, data_dir):
    """CIFAR's class names from its meta file (read with the same restricted unpickler as the batches)."""
    name, key = CLASS_NAMES_FILE[dataset]
    path = Path(data_dir) / common.DATASETS[dataset]["folder"] / name
    try:
        with open(path, "rb") as f:
            return [str(label) for label in common._CifarUnpickler(f, encoding="latin1").load()[key]]
    except Exception:  # a copy without a readable meta file: numbered classes only
        return [f"class{label}" for label in range(common.DATASETS[dataset]["num_classes"])]


def write_split(images, labels, folders, out, split, layout, suffix):
    """Each image as <folder>/<index>.<suffix>; tiny-imagenet's val: val/images/ and val_annotations.txt."""
    annotations = []
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        if layout == "tiny-imagenet" and split == "val":
            path = out / "val" / "images" / f"val_{index:05d}.{suffix}"
            annotations.append(f"{path.name}\t{folders[label]}\t0\t0\t32\t32")
        elif layout == "tiny-imagenet":
            path = out / "train" / folders[label] / "images" / f"{folders[label]}_{index:05d}.{suffix}"
        else:
            path = out / split / folders[label] / f"{index:05d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, quality=95)
    if annotations:
        (out / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="folder holding CIFAR's python layout")
    parser.add_argument("out", help="where the image folders are written (must be empty or absent)")
    parser.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    parser.add_argument("--layout", choices=("imagefolder", "tiny-imagenet"), default="imagefolder")
    parser.add_argument("--format", choices=("png", "jpeg"), default="png")
    parser.add_argument("--train-count", type=int, help="write only the first N training images (as --train-subset N)")
    options = parser.parse_args(argv)
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; give a new folder", file=sys.stderr)
        return 2
    try:
        train_images, train_labels, test_images, test_labels = common.load_cifar(options.dataset, options.data_dir)
    except common.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if options.train_count:
        train_images, train_labels = train_images[: options.train_count], train_labels[: options.train_count]
    names = class_names(options.dataset, options.data_dir)
    folders = [f"{label:03d}_{name}" for label, name in enumerate(names)]
    suffix = "png" if options.format == "png" else "JPEG"
    for images, labels, split in ((train_images, train_labels, "train"), (test_images, test_labels, "val")):
        write_split(images, labels, folders, out, split, options.layout, suffix)
    print(f"wrote {len(train_labels)} training and {len(test_labels)} val images of {options.dataset} under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
