"""kd.py: the KD loss against hand-computed values, its invariants, and end-to-end runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

import common
from kd import kd_loss


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kd_loss_golden_value():
    # Row 1 at T=2: q = softmax([0.5, 0]), p = softmax([0, 0.5]); log(p2/p1) = 0.5, so
    # KL(p||q) = (p2 - p1) * 0.5 = tanh(0.25) / 2. Row 2 is identical for both: KL 0.
    # batchmean over 2 rows, times T^2 = 4: tanh(0.25).
    student = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    teacher = torch.tensor([[0.0, 1.0], [-2.0, -2.0]])
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(math.tanh(0.25), abs=1e-6)


def test_kd_loss_is_summed_kl_over_batch_size_times_t_squared():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 8, 100, generator=generator) * 3
    p = F.softmax(teacher / 4, dim=1)
    summed_kl = (p * (p.log() - F.log_softmax(student / 4, dim=1))).sum()  # RepDistiller's DistillKL
    assert kd_loss(student, teacher, 4.0).item() == pytest.approx((summed_kl / 8 * 16).item(), rel=1e-5)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(5, 10)
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(5, 10), 4.0).item() > 0


def test_kd_gradient_reaches_only_the_student():
    student = torch.randn(4, 10, requires_grad=True)
    teacher_net = torch.nn.Linear(3, 10)
    with torch.no_grad():
        teacher = teacher_net(torch.randn(4, 3))  # as in kd.py: the teacher runs under no_grad
    kd_loss(student, teacher, 4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_net.weight.grad is None


def test_kd_trains_a_missing_teacher_caches_it_and_distils(tmp_path, cifar_dir):
    common_flags = [
        "--dataset",
        "cifar100",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--ce-teacher-epochs",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "64",
    ]
    first = run_script("kd.py", *common_flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "training one with baseline.py" in first.stdout
    assert "--resume:" not in first.stdout  # nobody asked to resume the teacher it trains
    cache = tmp_path / "checkpoints" / "cifar100" / "resnet8_e1.pth"
    assert cache.exists()
    checkpoint = torch.load(cache, weights_only=False)
    assert checkpoint["arch"] == "resnet8" and checkpoint["num_classes"] == 100 and checkpoint["epoch"] == 1

    # The teacher accuracy kd.py measured is the one baseline.py measured for the same weights.
    teacher_summary = json.loads((tmp_path / "runs" / "teacher_resnet8_e1_cifar100" / "summary.json").read_text())
    summary = json.loads((tmp_path / "runs" / "kd_resnet8_resnet8_cifar100_seed1" / "summary.json").read_text())
    assert summary["teacher_top1"] == pytest.approx(teacher_summary["last_top1"])
    assert summary["args"]["kd_T"] == 4.0 and summary["args"]["ce_weight"] == 0.1
    assert len(summary["git_commit"]) >= 7

    [metrics] = read_metrics(tmp_path / "runs" / "kd_resnet8_resnet8_cifar100_seed1")
    assert metrics["lr"] == 0.05
    assert 0 < metrics["loss/ce"] < 3 * math.log(100)  # near log(100) for a fresh 100-way classifier
    assert metrics["loss/kd"] > 0
    assert metrics["loss/total"] == pytest.approx(0.1 * metrics["loss/ce"] + 0.9 * metrics["loss/kd"], rel=1e-4)
    assert 0 <= metrics["test/top1"] <= metrics["test/top5"] <= 100
    assert metrics["speed/images_per_s"] > 0
    assert summary["last_top1"] == pytest.approx(metrics["test/top1"])

    second = run_script("kd.py", *common_flags, "--run-name", "again", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "training one" not in second.stdout and f"from {cache.relative_to(tmp_path)}" in second.stdout


def test_kd_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, cifar_dir):
    teacher = run_script(
        "baseline.py",
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--epochs",
        "1",
        "--run-name",
        "teacher",
        cwd=tmp_path,
    )
    assert teacher.returncode == 0, teacher.stderr
    flags = [
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--teacher-path",
        tmp_path / "runs" / "teacher" / "last.pth",
        "--lr-milestones",
        "1",
    ]
    straight = run_script("kd.py", *flags, "--epochs", "2", "--run-name", "straight", cwd=tmp_path)
    stopped = run_script("kd.py", *flags, "--epochs", "1", "--run-name", "resumed", cwd=tmp_path)
    resumed = run_script(
        "kd.py", *flags, "--epochs", "2", "--run-name", "resumed", "--resume", "--resume-with-changes", cwd=tmp_path
    )
    for result in (straight, stopped, resumed):
        assert result.returncode == 0, result.stderr
    assert "resumed from" in resumed.stdout
    a = torch.load(tmp_path / "runs" / "straight" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "runs" / "resumed" / "last.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for slot, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][slot]["momentum_buffer"])
    strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith("speed/")} for row in rows]
    assert strip(read_metrics(tmp_path / "runs" / "straight")) == strip(read_metrics(tmp_path / "runs" / "resumed"))
    assert [row["lr"] for row in read_metrics(tmp_path / "runs" / "straight")] == [0.05, pytest.approx(0.005)]


def test_kd_amp_runs_bf16_on_cpu(tmp_path, cifar_dir):
    model = common.prepare_model(common.build_model("resnet8", 10), torch.device("cpu"), amp=True)
    with common.autocast(torch.device("cpu"), True):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16
    teacher = run_script(
        "baseline.py",
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--epochs",
        "1",
        "--run-name",
        "teacher",
        "--amp",
        cwd=tmp_path,
    )
    assert teacher.returncode == 0, teacher.stderr
    student = run_script(
        "kd.py",
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--teacher-path",
        tmp_path / "runs" / "teacher" / "best.pth",
        "--epochs",
        "1",
        "--amp",
        cwd=tmp_path,
    )
    assert student.returncode == 0, student.stderr
    [metrics] = read_metrics(tmp_path / "runs" / "kd_resnet8_resnet8_cifar10_seed1")
    assert math.isfinite(metrics["loss/total"]) and 0 < metrics["loss/ce"] < 3 * math.log(10)
