"""Write synthetic CIFAR-10 and CIFAR-100 folders in the official python pickle layout.

Images are a class-dependent colour plus noise, so a few epochs learn them and a pipeline that mixes up
images and labels shows up as chance accuracy. The test suite uses them (tests/conftest.py) and so do the
GPU benchmarks, on machines that have no internet and no CIFAR.

    python tools/synthetic_cifar.py DEST --train 50000 --test 10000
"""

import argparse
import pickle
from pathlib import Path

import numpy as np


def make_split(rng, count, num_classes, palette):
    """(images [count, 3072] uint8 in CIFAR's CHW row layout, labels list)."""
    labels = rng.integers(0, num_classes, count)
    noise = rng.normal(0.0, 25.0, (count, 3, 32, 32))
    images = np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return images.reshape(count, 3072), labels.tolist()


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, rng, train_images, test_images):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    palette = rng.uniform(20, 235, (10, 3))
    images, labels = make_split(rng, train_images, 10, palette)
    for k, chunk in enumerate(np.array_split(np.arange(train_images), 5)):  # data_batch_1..5 like the release
        dump(
            folder / f"data_batch_{k + 1}",
            {
                "batch_label": f"training batch {k + 1} of 5",
                "labels": [labels[i] for i in chunk],
                "data": images[chunk],
                "filenames": [f"{i}.png" for i in chunk],
            },
        )
    images, labels = make_split(rng, test_images, 10, palette)
    dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": labels,
            "data": images,
            "filenames": [f"{i}.png" for i in range(test_images)],
        },
    )
    dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})


def write_cifar100(root, rng, train_images, test_images):
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    palette = rng.uniform(20, 235, (100, 3))
    for split, count in (("train", train_images), ("test", test_images)):
        images, labels = make_split(rng, count, 100, palette)
        dump(
            folder / split,
            {
                "filenames": [f"{i}.png" for i in range(count)],
                "batch_label": split,
                "fine_labels": labels,
                "coarse_labels": [y // 5 for y in labels],
                "data": images,
            },
        )
    dump(
        folder / "meta",
        {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": [f"super{i}" for i in range(20)]},
    )


def write_both(root, train_images, test_images, seed=0):
    rng = np.random.default_rng(seed)
    write_cifar10(root, rng, train_images, test_images)
    write_cifar100(root, rng, train_images, test_images)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest")
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    options = parser.parse_args()
    write_both(options.dest, options.train, options.test)
    print(f"wrote {options.dest}/cifar-10-batches-py and cifar-100-python: {options.train} train, {options.test} test")
