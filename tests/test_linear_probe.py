"""tools/linear_probe.py on miniature data: the frozen backbone stays bit-identical, only the probe trains,
and the layouts of STL-10 (binary) and Tiny-ImageNet (as distributed) are read as they are."""

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_script
from PIL import Image

import common

sys.path.insert(0, str(REPO / "tools"))
import linear_probe  # noqa: E402


def write_png(image, path):
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def image_folder(root, classes=3, per_class=4, size=40):
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for index in range(classes):
            folder = root / split / f"class{index}"
            folder.mkdir(parents=True)
            for number in range(per_class):
                image = torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)
                image[index] = 255  # each class has one bright channel: a probe can learn it
                write_png(image, str(folder / f"{number}.png"))
    return root


def test_the_probe_trains_only_its_classifier_and_writes_a_run_folder_the_report_reads(tmp_path):
    data = image_folder(tmp_path / "folder")
    backbone = common.build_model("resnet8", 100)
    common.save_checkpoint(tmp_path / "student" / "best.pth", common.model_payload(backbone, 1, {"top1": 1.0}, _Args()))
    flags = ["--checkpoint", tmp_path / "student" / "best.pth", "--model", "resnet8", "--dataset", "imagefolder"]
    result = run_script("tools/linear_probe.py", *flags, "--data-dir", data, "--epochs", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "probe_imagefolder_resnet8_student_seed1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "linear_probe" and summary["backbone_unchanged"] is True
    assert summary["trained_tensors"] == ["classifier.weight", "classifier.bias"]
    assert 0 <= summary["last_top1"] <= 100 and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    sys.path.insert(0, str(REPO / "tools"))
    import report

    rows, _ = report.rows_of(tmp_path / "runs", {})
    assert [row["method"] for row in rows] == ["linear_probe"]


@dataclasses.dataclass
class _Args:
    """What model_payload records of a run's arguments."""

    seed: int = 1


def test_stl10_is_read_from_its_binary_files_column_major(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, size=(2, 3, 96, 96), dtype=np.uint8)
    for split in ("train", "test"):
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # the release stores columns first
        np.array([1, 10], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    train_images, train_labels, _, _, classes = linear_probe.read_stl10(tmp_path)
    assert classes == 10 and train_labels.tolist() == [0, 9]
    assert torch.equal(train_images[1], torch.from_numpy(images[1]))
    (folder / "test_y.bin").write_bytes(b"\x01")  # one label for two images
    with pytest.raises(common.ConfigError, match="do not hold matching"):
        linear_probe.read_stl10(tmp_path)


def test_tiny_imagenet_is_read_as_distributed_and_bad_annotations_are_named(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for wnid in ("n01", "n02"):
        (root / "train" / wnid / "images").mkdir(parents=True)
        write_png(torch.zeros(3, 64, 64, dtype=torch.uint8), str(root / "train" / wnid / "images" / f"{wnid}_0.png"))
    (root / "val" / "images").mkdir(parents=True)
    write_png(torch.zeros(3, 64, 64, dtype=torch.uint8), str(root / "val" / "images" / "val_0.png"))
    (root / "val" / "val_annotations.txt").write_text("val_0.png\tn02\t0\t0\t63\t63\n")
    train_images, train_labels, val_images, val_labels, classes = linear_probe.read_folders("tiny-imagenet")(tmp_path)
    assert classes == 2 and train_labels.tolist() == [0, 1] and val_labels.tolist() == [1]
    (root / "val" / "val_annotations.txt").write_text("val_0.png\tn99\n")
    with pytest.raises(common.ConfigError, match="line 1"):
        linear_probe.read_folders("tiny-imagenet")(tmp_path)
