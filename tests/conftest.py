"""Shared fixtures: miniature CIFAR-10 and CIFAR-100 folders in the official python pickle layout
(tools/synthetic_cifar.py), so tests exercise the real loading path (common.load_cifar) without internet."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# `pytest -n N` (pytest-xdist, README's test command): N test processes share the cores, so each one, and
# every script it starts, gets its share of torch threads instead of all of them (N x cores threads on the
# cores would make each test slower than one process alone). Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from synthetic_cifar import write_cifar10, write_cifar100  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 320, 200


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A data dir holding both miniature datasets (320 train / 200 test images each)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_cifar10(root, rng, TRAIN_IMAGES, TEST_IMAGES)
    write_cifar100(root, rng, TRAIN_IMAGES, TEST_IMAGES)
    return root


@pytest.fixture(scope="session")
def untrained_teacher(tmp_path_factory):
    """An untrained 10-class resnet8 in our checkpoint format, for tests in which a teacher only has to load
    (the CE teacher's training through baseline.py is tested in test_kd.py and test_distributed.py)."""
    import torch

    import common

    path = tmp_path_factory.mktemp("teacher") / "resnet8.pth"
    torch.manual_seed(0)
    torch.save({"model": common.build_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10}, path)
    return path


def run_script(script, *args, cwd, env=None):
    """Run a repository script as a user would; returns the CompletedProcess (never raises)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# zoo_state_dicts.json: name -> {"params": count, "state_dict": {key: shape}} for 100
# classes, including the extra backbones and the HSAKD auxiliary models.
ZOO_REFERENCE = json.loads((Path(__file__).parent / "zoo_state_dicts.json").read_text())
