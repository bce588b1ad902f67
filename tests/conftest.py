"""Shared fixtures: miniature CIFAR-10 and CIFAR-100 folders in the official python pickle layout,
so tests exercise the real loading path (common.load_cifar) without internet access."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN_IMAGES, TEST_IMAGES = 320, 200


def make_split(rng, count, num_classes, palette):
    """Images whose mean colour depends on the class, plus noise: a few epochs can learn them, so a
    training run that mixes up images and labels shows up as chance accuracy."""
    labels = rng.integers(0, num_classes, count)
    noise = rng.normal(0.0, 25.0, (count, 3, 32, 32))
    images = np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return images.reshape(count, 3072), labels.tolist()


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, rng):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    palette = rng.uniform(20, 235, (10, 3))
    images, labels = make_split(rng, TRAIN_IMAGES, 10, palette)
    for k, chunk in enumerate(np.array_split(np.arange(TRAIN_IMAGES), 5)):  # data_batch_1..5 like the release
        dump(folder / f"data_batch_{k + 1}", {"batch_label": f"training batch {k + 1} of 5",
                                              "labels": [labels[i] for i in chunk], "data": images[chunk],
                                              "filenames": [f"{i}.png" for i in chunk]})
    images, labels = make_split(rng, TEST_IMAGES, 10, palette)
    dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels, "data": images,
                                 "filenames": [f"{i}.png" for i in range(TEST_IMAGES)]})
    dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})


def write_cifar100(root, rng):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    palette = rng.uniform(20, 235, (100, 3))
    for split, count in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        images, labels = make_split(rng, count, 100, palette)
        dump(folder / split, {"filenames": [f"{i}.png" for i in range(count)], "batch_label": split,
                              "fine_labels": labels, "coarse_labels": [y // 5 for y in labels], "data": images})
    dump(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                           "coarse_label_names": [f"super{i}" for i in range(20)]})


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A data dir holding both miniature datasets (320 train / 200 test images each)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_cifar10(root, rng)
    write_cifar100(root, rng)
    return root


def run_script(script, *args, cwd, env=None):
    """Run a repository script as a user would; returns the CompletedProcess (never raises)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# The spec's zoo_state_dicts.json: name -> {"params": count, "state_dict": {key: shape}} for 100
# classes, including the extra backbones and the HSAKD auxiliary models (zoo.md section 4).
ZOO_REFERENCE = json.loads((Path(__file__).parent / "zoo_state_dicts.json").read_text())
