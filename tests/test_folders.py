"""Data beyond CIFAR: ImageNet, Tiny-ImageNet and image folders, written from the miniature CIFAR-10 by
tools/cifar_to_folder.py (PNG and JPEG files). Every method runs a tiny epoch on each layout; the streamed
loader is seeded per image (any number of workers gives the same batches) and resumes bit-exactly; the
resident path keeps every pixel of a PNG folder; bad trees stop with one error naming the file or folder."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_script

import common

QUICK = ["--train-subset", "32", "--test-subset", "20", "--batch-size", "16", "--epochs", "1", "--workers", "0"]


def write_tree(cifar_dir, out, *flags):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "cifar_to_folder.py"), str(cifar_dir), str(out), *flags],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def trees(cifar_dir, tmp_path_factory):
    """{layout: data dir}: imagefolder (PNG), imagenet (JPEG, the same class-folder layout), tiny-imagenet
    (JPEG, tiny-imagenet-200 as distributed)."""
    root = tmp_path_factory.mktemp("folders")
    return {
        "imagefolder": write_tree(cifar_dir, root / "png"),
        "imagenet": write_tree(cifar_dir, root / "jpeg", "--format", "jpeg"),
        "tiny-imagenet": write_tree(
            cifar_dir, root / "tiny" / "tiny-imagenet-200", "--layout", "tiny-imagenet", "--format", "jpeg"
        ).parent,
    }


def data_args(dataset, data_dir, **overrides):
    fields = dict(dataset=dataset, data_dir=str(data_dir), normalize="imagenet", train_subset=None, test_subset=None)
    return SimpleNamespace(**{**fields, "amp": False, "image_size": None, "workers": 0, **overrides})


TEACHER = ["--teacher", "resnet8", "--teacher-path", "{teacher_file}"]  # a CE teacher to load, not to train
METHODS = {
    "baseline.py": ["--model", "resnet8"],
    "kd.py": [*TEACHER, "--student", "resnet8"],
    "sskd.py": [*TEACHER, "--student", "resnet8", "--t-epochs", "1"],
    "hssakd.py": [*TEACHER, "--student", "resnet8", "--teacher-epochs", "1"],
    "pskd.py": ["--model", "resnet8"],
    "lsskd.py": ["--model", "resnet8"],
}


@pytest.mark.parametrize("layout", ["imagenet", "tiny-imagenet", "imagefolder"])
@pytest.mark.parametrize("script", METHODS)
def test_every_method_runs_a_tiny_epoch_on_every_layout(trees, tmp_path, script, layout, untrained_teacher):
    """resnet8 at 32 px keeps it quick; imagenet streams (any network), the others are decoded to the device.
    torchvision's ResNets on a streamed set: the resume test below and tests/test_hssakd.py."""
    flags = [flag.format(teacher_file=untrained_teacher) for flag in METHODS[script]]
    if script == "sskd.py" and layout == "imagenet":
        flags += ["--rotation-pipeline", "gpu"]  # streamed images: the standard augmentation, then rotations
    size = ["--image-size", "32"]
    result = run_script(script, "--dataset", layout, "--data-dir", trees[layout], *flags, *QUICK, *size, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    streamed = "streamed from disk" if layout == "imagenet" else "decoded once and kept on the device"
    assert f"{layout}: 10 classes" in result.stdout and streamed in result.stdout
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["args"]["dataset"] == layout and 0 <= summary["last_top1"] <= 100


def test_sskd_on_a_streamed_set_says_to_use_the_gpu_pipeline(trees, tmp_path):
    """The imagenet recipe's default is the gpu pipeline; SSKD's own needs the decoded images."""
    flags = ["--teacher", "resnet8", "--student", "resnet8", "--image-size", "32", "--rotation-pipeline", "sskd"]
    result = run_script(
        "sskd.py", "--dataset", "imagenet", "--data-dir", trees["imagenet"], *flags, *QUICK, cwd=tmp_path
    )
    assert result.returncode != 0 and "--rotation-pipeline gpu" in result.stderr
    assert "Traceback" not in result.stderr and "training one with baseline.py" not in result.stdout


def test_a_cifar_network_at_another_size_is_refused_before_any_work(trees, tmp_path):
    result = run_script(
        "baseline.py", "--dataset", "imagenet", "--data-dir", trees["imagenet"], "--model", "resnet8", cwd=tmp_path
    )
    assert (
        result.returncode == 2
        and "--model resnet8 is a CIFAR network (32x32 inputs) but images are 224x224" in result.stderr
    )
    assert not (tmp_path / "runs").exists()


def test_a_png_folder_holds_exactly_cifars_pixels_and_labels(cifar_dir, trees):
    cifar = common.load_data(data_args("cifar10", cifar_dir, normalize="cifar10"), "cpu")
    folder = common.load_data(data_args("imagefolder", trees["imagefolder"], normalize="cifar10"), "cpu")
    assert isinstance(folder, common.CifarData) and folder.num_classes == 10
    for images, labels, folder_images, folder_labels in (
        (cifar.train_images, cifar.train_labels, folder.train_images, folder.train_labels),
        (cifar.test_images, cifar.test_labels, folder.test_images, folder.test_labels),
    ):
        order = torch.argsort(labels, stable=True)  # the folder is sorted by class, CIFAR's batches are not
        assert torch.equal(folder_labels, labels[order]) and torch.equal(folder_images, images[order])


def test_the_tiny_imagenet_layout_reads_val_labels_from_its_annotations(trees):
    train_paths, train_labels, val_paths, val_labels, classes = common.read_folder_lists(
        "tiny-imagenet", trees["tiny-imagenet"]
    )
    assert len(classes) == 10 and len(train_paths) == 320 and len(val_paths) == 200
    assert all(
        path.parent.name == "images" and path.parent.parent.name == classes[label]
        for path, label in zip(train_paths, train_labels.tolist())
    )
    annotations = (
        (trees["tiny-imagenet"] / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().splitlines()
    )
    first_file, first_class = annotations[0].split("\t")[:2]
    assert val_paths[0].name == first_file and classes[val_labels[0]] == first_class


def stream(tree, workers, seed=1, epoch=0):
    data = common.load_data(data_args("imagenet", tree, image_size=24, workers=workers, train_subset=40), "cpu")
    assert isinstance(data, common.StreamData)
    return list(common.train_batches(data, 16, common.epoch_generator(seed, epoch)))


def test_streamed_batches_depend_on_seed_and_epoch_only_not_on_the_workers(trees):
    single, parallel = stream(trees["imagenet"], 0), stream(trees["imagenet"], 2)
    assert [len(labels) for _, labels, _ in single] == [16, 16, 8]  # drop_last=False, as every official loader
    for (images, labels, indices), (images2, labels2, indices2) in zip(single, parallel):
        assert torch.equal(images, images2) and torch.equal(labels, labels2) and torch.equal(indices, indices2)
    next_epoch = stream(trees["imagenet"], 0, epoch=1)
    assert not torch.equal(single[0][2], next_epoch[0][2])  # a new order every epoch
    assert single[0][0].shape == (16, 3, 24, 24) and single[0][0].dtype == torch.float32


def test_a_streamed_run_resumed_after_an_epoch_ends_with_the_weights_of_an_uninterrupted_one(trees, tmp_path):
    flags = [
        "--dataset",
        "imagenet",
        "--data-dir",
        trees["imagenet"],
        "--model",
        "resnet18_imagenet",
        "--image-size",
        "32",
    ]
    flags += [
        "--train-subset",
        "48",
        "--test-subset",
        "16",
        "--batch-size",
        "16",
        "--workers",
        "1",
        "--lr-milestones",
        "1",
    ]
    whole = run_script("baseline.py", *flags, "--epochs", "2", "--run-name", "whole", cwd=tmp_path)
    first = run_script("baseline.py", *flags, "--epochs", "1", "--run-name", "cut", cwd=tmp_path)
    # continued to 2 epochs (the lr schedule is the same): the second epoch is drawn from (seed, epoch) alone
    rest = run_script(
        "baseline.py", *flags, "--epochs", "2", "--run-name", "cut", "--resume", "--resume-with-changes", cwd=tmp_path
    )
    assert whole.returncode == first.returncode == rest.returncode == 0, rest.stderr[-2000:]
    weights = [
        torch.load(tmp_path / "runs" / name / "last.pth", weights_only=False)["model"] for name in ("whole", "cut")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


# ---- bad trees: one error naming the file or folder, before anything trains ----


def broken_copy(trees, tmp_path, layout="imagenet"):
    copy = tmp_path / "tree"
    shutil.copytree(trees[layout], copy)
    return copy


def first_class(tree, split="train"):
    return sorted(path for path in (tree / split).iterdir() if path.is_dir())[0]


def load_error(dataset, tree):
    with pytest.raises(common.ConfigError) as error:
        common.load_data(data_args(dataset, tree), "cpu")
    return str(error.value)


def test_an_empty_class_folder_is_named(trees, tmp_path):
    tree = broken_copy(trees, tmp_path)
    (tree / "train" / "zzz_empty").mkdir()
    (tree / "val" / "zzz_empty").mkdir()
    assert "zzz_empty is an empty class folder" in load_error("imagenet", tree)


def test_a_missing_val_folder_is_named(trees, tmp_path):
    tree = broken_copy(trees, tmp_path)
    shutil.rmtree(tree / "val")
    assert f"{tree / 'val'} is missing" in load_error("imagefolder", tree)


def test_train_and_val_with_different_classes_are_named(trees, tmp_path):
    tree = broken_copy(trees, tmp_path)
    shutil.rmtree(first_class(tree, "val"))
    assert f"only in train: {first_class(tree).name}" in load_error("imagenet", tree)


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_an_unreadable_or_truncated_image_is_named(trees, tmp_path, damage):
    tree = broken_copy(trees, tmp_path, "imagefolder")
    victim = sorted(first_class(tree).iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60] if damage == "truncated" else b"hello")
    message = load_error("imagefolder", tree)
    assert str(victim) in message and "could not be read as an image" in message


def test_a_malformed_annotation_line_is_named(trees, tmp_path):
    tree = broken_copy(trees, tmp_path, "tiny-imagenet")
    annotations = tree / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join([lines[0], "val_1.JPEG n_unknown 0 0", *lines[2:]]) + "\n")
    assert f"{annotations} line 2 is not" in load_error("tiny-imagenet", tree)


def test_a_bad_tree_stops_the_script_before_any_work(trees, tmp_path):
    tree = broken_copy(trees, tmp_path)
    (tree / "train" / "zzz_empty").mkdir()
    (tree / "val" / "zzz_empty").mkdir()
    result = run_script(
        "kd.py",
        "--dataset",
        "imagenet",
        "--data-dir",
        tree,
        "--teacher",
        "resnet34_imagenet",
        "--student",
        "resnet18_imagenet",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "zzz_empty is an empty class folder" in result.stderr
    assert "Traceback" not in result.stderr and "training one with baseline.py" not in result.stdout
