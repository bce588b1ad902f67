"""The CUDA path: every method script trains on the GPU with and without --amp, seeded deterministic runs
repeat bit for bit (or the test names the op that is not deterministic), an interrupted run resumes
bit-identically, checkpoints move between CPU and GPU, and the training data is copied to the GPU once.

Skipped where CUDA is absent (CI). KD_TEST_DEVICE=cpu runs the same checks on the CPU, which is how
benchmarks/gpu_check.sh --cpu-tiny proves them on a machine without a GPU."""

import json
import math
import os

import pytest
import torch
from conftest import run_script

import common

DEVICE = os.environ.get("KD_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="CUDA is not available (KD_TEST_DEVICE=cpu runs these on the CPU)"
)

TINY = ["--dataset", "cifar100", "--train-subset", "64", "--batch-size", "32", "--epochs", "1"]
TEACHER = ["--teacher", "resnet8", "--student", "resnet8", "--ce-teacher-epochs", "1"]
METHODS = {
    "baseline.py": ["--model", "resnet8"],
    "kd.py": TEACHER,
    "sskd.py": [*TEACHER, "--t-epochs", "1"],
    "hssakd.py": [*TEACHER, "--teacher-epochs", "1"],
    "pskd.py": ["--model", "resnet8"],
    "lsskd.py": ["--model", "resnet8"],
    "css.py": ["--model-t", "css_resnet56", "--model-s", "css_resnet56"],
}


def flags(script, cifar_dir, *extra):
    return [*TINY, "--data-dir", cifar_dir, "--device", DEVICE, *METHODS[script], *extra]


def weights(run_dir):
    checkpoint = common.load_checkpoint(run_dir / "last.pth")
    return {key: value for key, value in checkpoint.items() if key in ("model", "net1_model", "auxiliary_classifier")}


def assert_same_weights(a, b, stderr=""):
    for part in a:
        for name, tensor in a[part].items():
            if not torch.equal(tensor, b[part][name]):
                culprits = sorted({line.strip() for line in stderr.splitlines() if "deterministic" in line})
                pytest.fail(
                    f"{part}.{name} differs between two seeded runs; ops without a deterministic "
                    f"implementation reported by torch: {culprits or 'none'}"
                )


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("script", METHODS)
def test_each_method_trains_one_tiny_epoch_on_the_device(script, amp, tmp_path, cifar_dir):
    result = run_script(script, *flags(script, cifar_dir, *(["--amp"] if amp else [])), "--run-name", "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"device: {DEVICE}" in result.stdout
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["device"].startswith(DEVICE) and 0 <= summary["last_top1"] <= 100
    if DEVICE.startswith("cuda"):
        assert summary["device_name"] and summary["cuda"]
    row = json.loads((tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(value) for name, value in row.items() if name.startswith("loss/"))


@pytest.mark.parametrize("script", METHODS)
def test_two_seeded_deterministic_runs_end_with_identical_weights(script, tmp_path, cifar_dir):
    runs = [
        run_script(
            script,
            *flags(script, cifar_dir, "--torch-deterministic", "--epochs", "2"),
            "--run-name",
            name,
            cwd=tmp_path,
        )
        for name in ("a", "b")
    ]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "runs" / "a"), weights(tmp_path / "runs" / "b"), runs[0].stderr)


@pytest.mark.parametrize("script", ["kd.py", "pskd.py", "hssakd.py"])
def test_an_interrupted_then_resumed_run_ends_bit_identical(script, tmp_path, cifar_dir):
    straight = run_script(script, *flags(script, cifar_dir, "--epochs", "2"), "--run-name", "straight", cwd=tmp_path)
    first = run_script(script, *flags(script, cifar_dir, "--epochs", "1"), "--run-name", "resumed", cwd=tmp_path)
    second = run_script(
        script,
        *flags(script, cifar_dir, "--epochs", "2"),
        "--run-name",
        "resumed",
        "--resume",
        "--resume-with-changes",
        cwd=tmp_path,
    )  # the epoch count is the only change
    for result in (straight, first, second):
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "runs" / "straight"), weights(tmp_path / "runs" / "resumed"))


def test_a_checkpoint_saved_on_the_cpu_loads_on_the_device_and_back(tmp_path):
    model = common.build_model("resnet8", 10).eval()
    images = torch.randn(4, 3, 32, 32)
    common.save_checkpoint(tmp_path / "cpu.pth", {"model": model.state_dict(), "arch": "resnet8", "num_classes": 10})
    on_device = common.load_model_file("resnet8", 10, tmp_path / "cpu.pth").to(DEVICE).eval()
    with torch.no_grad():
        torch.testing.assert_close(on_device(images.to(DEVICE)).cpu(), model(images), rtol=1e-4, atol=1e-4)
    common.save_checkpoint(
        tmp_path / "device.pth", {"model": on_device.state_dict(), "arch": "resnet8", "num_classes": 10}
    )
    back = common.load_model_file("resnet8", 10, tmp_path / "device.pth")  # map_location="cpu" inside
    assert all(tensor.device.type == "cpu" for tensor in back.state_dict().values())
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_training_data_is_copied_to_the_device_once_not_per_step(cifar_dir, monkeypatch):
    device = torch.device(DEVICE)
    args = type(
        "A", (), dict(dataset="cifar100", data_dir=cifar_dir, normalize="repdistiller", train_subset=None, amp=False)
    )
    data = common.load_data(args, device)
    assert data.train_images.device.type == device.type and data.test_images.device.type == device.type
    copies = []  # (bytes) of every host -> device copy made while iterating an epoch
    original_to = torch.Tensor.to

    def recording_to(tensor, *to_args, **to_kwargs):
        moved = original_to(tensor, *to_args, **to_kwargs)
        if tensor.device.type == "cpu" and moved.device.type != "cpu":
            copies.append(tensor.numel() * tensor.element_size())
        return moved

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    batches = list(common.train_batches(data, 32, common.epoch_generator(1, 0)))
    assert all(images.device.type == device.type for images, _, _ in batches)
    image_bytes = 32 * 3 * 32 * 32
    assert all(size < image_bytes // 8 for size in copies), copies  # only index vectors, never images
