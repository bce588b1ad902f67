"""baseline.py end to end, and the errors every script gives for bad input."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_script

import common


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_speed(rows):
    return [{key: value for key, value in row.items() if not key.startswith("speed/")} for row in rows]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cifar_dir):
    """Three epochs of resnet8 on the miniature CIFAR-10, run twice with the same seed."""
    cwd = tmp_path_factory.mktemp("baseline")
    flags = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--model", "resnet8", "--epochs", "3"]
    for name in ("first", "second"):
        result = run_script("baseline.py", *flags, "--run-name", name, cwd=cwd)
        assert result.returncode == 0, result.stderr
    return cwd / "runs", result.stdout


def test_baseline_learns_the_labels_of_its_images(trained_run):
    runs, stdout = trained_run
    rows = read_metrics(runs / "first")
    assert [row["epoch"] for row in rows] == [1, 2, 3] and stdout.count("epoch ") >= 3
    # The miniature classes differ by mean colour: chance is 10%, a pipeline that pairs images with
    # the wrong labels stays there.
    assert max(row["test/top1"] for row in rows) > 30
    assert rows[-1]["loss/ce"] < rows[0]["loss/ce"]
    summary = json.loads((runs / "first" / "summary.json").read_text())
    assert summary["best_top1"] == max(row["test/top1"] for row in rows)
    assert summary["last_top1"] == pytest.approx(rows[-1]["test/top1"])
    assert rows[summary["best_epoch"] - 1]["test/top1"] == summary["best_top1"]


def test_same_seed_gives_identical_metrics(trained_run):
    runs, _ = trained_run
    assert without_speed(read_metrics(runs / "first")) == without_speed(read_metrics(runs / "second"))


def test_eval_only_reports_the_saved_accuracy(trained_run, cifar_dir):
    runs, _ = trained_run
    summary = json.loads((runs / "first" / "summary.json").read_text())
    result = run_script(
        "baseline.py",
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--eval-checkpoint",
        runs / "first" / "best.pth",
        cwd=runs,
    )
    assert result.returncode == 0, result.stderr
    assert f"test top1 {summary['best_top1']:.2f}" in result.stdout


def test_best_checkpoint_is_a_repdistiller_teacher_file(trained_run):
    runs, _ = trained_run
    checkpoint = torch.load(runs / "first" / "best.pth", weights_only=False)
    model = common.build_model("resnet8", 10)
    model.load_state_dict(checkpoint["model"], strict=True)  # what RepDistiller's load_teacher does


def test_existing_run_is_not_overwritten_without_resume(trained_run, cifar_dir):
    runs, _ = trained_run
    result = run_script(
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
        "first",
        cwd=runs.parent,
    )
    assert result.returncode != 0 and "--resume" in result.stderr and "Traceback" not in result.stderr


def test_unknown_architecture_is_refused_with_the_valid_names(tmp_path, cifar_dir):
    result = run_script("baseline.py", "--data-dir", cifar_dir, "--model", "resnet21", cwd=tmp_path)
    assert result.returncode != 0
    assert "resnet21" in result.stderr and "resnet20" in result.stderr and "Traceback" not in result.stderr


def test_missing_data_dir_names_the_missing_files(tmp_path):
    result = run_script(
        "baseline.py", "--data-dir", tmp_path / "empty", "--epochs", "1", cwd=tmp_path, env={"KD_NO_DOWNLOAD": "1"}
    )
    assert result.returncode != 0
    assert "cifar-100-python" in result.stderr and "--data-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_teacher_checkpoint_of_another_architecture_is_refused(trained_run, cifar_dir, tmp_path):
    runs, _ = trained_run
    ours = run_script(
        "kd.py",
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet14",
        "--student",
        "resnet8",
        "--teacher-path",
        runs / "first" / "best.pth",
        cwd=tmp_path,
    )
    assert ours.returncode != 0 and "holds a resnet8" in ours.stderr and "resnet14" in ours.stderr
    foreign = tmp_path / "repdistiller_style.pth"  # a bare {"model": state_dict}: no arch recorded
    torch.save({"model": torch.load(runs / "first" / "best.pth", weights_only=False)["model"]}, foreign)
    result = run_script(
        "kd.py",
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet14",
        "--student",
        "resnet8",
        "--teacher-path",
        foreign,
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "does not match resnet14" in result.stderr and "missing" in result.stderr


def test_teacher_with_the_wrong_number_of_classes_is_refused(trained_run, cifar_dir, tmp_path):
    runs, _ = trained_run  # trained on CIFAR-10, used for CIFAR-100
    result = run_script(
        "kd.py",
        "--dataset",
        "cifar100",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--teacher-path",
        runs / "first" / "best.pth",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "10 classes" in result.stderr and "100" in result.stderr
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": torch.load(runs / "first" / "best.pth", weights_only=False)["model"]}, foreign)
    result = run_script(
        "kd.py",
        "--dataset",
        "cifar100",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--teacher-path",
        foreign,
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "wrong shape: fc.weight (10, 64) vs (100, 64)" in result.stderr


def test_missing_teacher_file_is_refused(cifar_dir, tmp_path):
    result = run_script(
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
        tmp_path / "nope.pth",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "nope.pth does not exist" in result.stderr


def test_diverging_loss_stops_with_advice(cifar_dir, tmp_path):
    result = run_script(
        "baseline.py",
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--epochs",
        "1",
        "--learning-rate",
        "1e12",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "non-finite" in result.stderr and "--learning-rate" in result.stderr


def test_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, cifar_dir):
    flags = [
        "--dataset",
        "cifar10",
        "--data-dir",
        str(cifar_dir),
        "--model",
        "resnet8",
        "--epochs",
        "6",
        "--train-subset",
        "256",
        "--test-subset",
        "40",
        "--lr-milestones",
        "2",
        "4",
    ]
    straight = run_script("baseline.py", *flags, "--run-name", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    for attempt in range(3):  # on a loaded 2-core machine the run can finish before the signal lands: try again
        name = f"cut{attempt}"
        process = subprocess.Popen(
            [sys.executable, str(REPO / "baseline.py"), *flags, "--run-name", name],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        checkpoint = tmp_path / "runs" / name / "last.pth"  # appears atomically once epoch 1 is finished
        deadline = time.time() + 300
        while not checkpoint.exists() and time.time() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)  # Ctrl-C during the second epoch
        _, stderr = process.communicate(timeout=300)
        if process.returncode != 0 or not (tmp_path / "runs" / name / "summary.json").exists():
            break
    assert process.returncode != 0 and "--resume" in stderr and "Traceback" not in stderr
    finished = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 1 <= finished < 6
    resumed = run_script("baseline.py", *flags, "--run-name", name, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "runs" / "straight" / "last.pth", weights_only=False)["model"]
    b = torch.load(checkpoint, weights_only=False)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert without_speed(read_metrics(tmp_path / "runs" / "straight")) == without_speed(
        read_metrics(tmp_path / "runs" / name)
    )
