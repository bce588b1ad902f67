"""A newcomer's first runs: no code runs from a downloaded file, mistakes are refused before any work,
a cached teacher matches the student's data, a resume keeps its record, corrupt files and full disks
get one paragraph, no teacher child outlives its parent, and every run says where it ran."""

import argparse
import dataclasses
import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch
from conftest import REPO, run_script

import common


class CreatesFile:
    """Unpickling this calls open(path, "w"): if loading a file ever runs code, the file appears."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def resnet8_state(num_classes=100):
    return common.build_model("resnet8", num_classes).state_dict()


def save_malicious_teacher(path, marker):
    torch.save({"model": resnet8_state(), "arch": "resnet8", "num_classes": 100, "extra": CreatesFile(marker)}, path)


# ---- 1. no code executes from a file ----


def test_loading_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "teacher.pth"
    save_malicious_teacher(path, marker)
    with pytest.raises(common.ConfigError, match="refused.*Nothing in it was run"):
        common.load_checkpoint(path, "teacher checkpoint")
    assert not marker.exists()


def teacher_entry_points(tmp_path, cifar_dir, bad):
    """Every command line that loads a user-supplied or cached file, pointed at `bad`."""
    data = ["--data-dir", cifar_dir, "--epochs", "1", "--train-subset", "32"]
    cached = tmp_path / "cache" / "cifar100" / "resnet8_e1_n32.pth"
    return {
        "kd --teacher-path": ("kd.py", *data, "--teacher", "resnet8", "--student", "resnet8", "--teacher-path", bad),
        "baseline --eval-checkpoint": (
            "baseline.py",
            "--data-dir",
            cifar_dir,
            "--model",
            "resnet8",
            "--eval-checkpoint",
            bad,
        ),
        "kd cached teacher": (
            "kd.py",
            *data,
            "--teacher",
            "resnet8",
            "--student",
            "resnet8",
            "--ce-teacher-epochs",
            "1",
            "--checkpoint-dir",
            tmp_path / "cache",
            "--run-name",
            "cached",
            cached,
        ),
        "sskd --teacher-head-path": (
            "sskd.py",
            *data,
            "--teacher",
            "resnet8",
            "--student",
            "resnet8",
            "--teacher-path",
            tmp_path / "good.pth",
            "--teacher-head-path",
            bad,
        ),
        "hssakd --teacher-aux-path": (
            "hssakd.py",
            *data,
            "--teacher",
            "resnet8",
            "--student",
            "resnet8",
            "--teacher-aux-path",
            bad,
        ),
        "baseline --resume": ("baseline.py", *data, "--model", "resnet8", "--run-name", "planted", "--resume"),
    }


@pytest.mark.parametrize(
    "entry",
    [
        "kd --teacher-path",
        "baseline --eval-checkpoint",
        "kd cached teacher",
        "sskd --teacher-head-path",
        "hssakd --teacher-aux-path",
        "baseline --resume",
    ],
)
def test_every_entry_point_refuses_a_malicious_checkpoint_and_creates_no_file(tmp_path, cifar_dir, entry):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pth"
    save_malicious_teacher(bad, marker)
    torch.save({"model": resnet8_state(), "arch": "resnet8", "num_classes": 100}, tmp_path / "good.pth")
    command = list(teacher_entry_points(tmp_path, cifar_dir, bad)[entry])
    if entry == "kd cached teacher":  # plant the bad file where the teacher cache is looked up
        cached = command.pop()
        cached.parent.mkdir(parents=True)
        bad.rename(cached)
    if entry == "baseline --resume":
        (tmp_path / "runs" / "planted").mkdir(parents=True)
        bad.rename(tmp_path / "runs" / "planted" / "last.pth")
    result = run_script(*command, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "Nothing in it was run" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_a_cifar_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path, cifar_dir):
    data = tmp_path / "data" / "cifar-10-batches-py"
    data.mkdir(parents=True)
    for name in os.listdir(cifar_dir / "cifar-10-batches-py"):
        (data / name).write_bytes((cifar_dir / "cifar-10-batches-py" / name).read_bytes())
    marker = tmp_path / "pwned"
    with open(data / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": CreatesFile(marker)}, f, protocol=2)
    with pytest.raises(common.ConfigError, match=r"test_batch is not a readable CIFAR.*Nothing in it was run"):
        common.load_cifar("cifar10", tmp_path / "data", download=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "epoch": 240, "accuracy": torch.tensor(72.3)},  # RepDistiller / mdistiller
        lambda sd: {"model": sd, "opt": argparse.Namespace(lr=0.05), "best_acc": np.float64(72.3)},  # RepDistiller last
        lambda sd: {"state_dict": sd, "epoch": np.int64(239)},  # SSKD
        lambda sd: {"net": {f"module.{k}": v for k, v in sd.items()}, "acc": 73.4, "epoch": 239},  # HSAKD / PS-KD
        lambda sd: sd,  # a bare state dict
    ],
    ids=["repdistiller", "repdistiller_last", "sskd", "hsakd_pskd", "bare"],
)
def test_community_checkpoint_formats_still_load(tmp_path, wrap):
    state = resnet8_state()
    torch.save(wrap(state), tmp_path / "teacher.pth")
    model = common.load_model_file("resnet8", 100, tmp_path / "teacher.pth")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name])


def test_our_last_checkpoint_with_rng_states_loads_safely(tmp_path):
    model = common.build_model("resnet8", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = common.parse_args(TinyArgs, [])
    common.save_checkpoint(tmp_path / "last.pth", common.training_state(model, optimizer, 1, {"top1": 1.0}, args))
    loaded = common.load_checkpoint(tmp_path / "last.pth")
    assert loaded["rng"]["numpy"][0] == "MT19937" and loaded["epoch"] == 1


# ---- 2. everything is validated before any stage runs ----


@pytest.mark.parametrize(
    "script, flags, named",
    [
        ("kd.py", ["--teacher", "resnet8", "--student", "resnet2O"], "resnet20"),
        ("hssakd.py", ["--teacher", "resnet8", "--student", "resnet2O"], "resnet20"),
        ("sskd.py", ["--teacher", "resnet5", "--student", "resnet8"], "resnet8"),
        ("baseline.py", ["--model", "wrn_40_3"], "wrn_40_2"),
        ("css.py", ["--model-t", "resnet56"], "css_resnet56"),
    ],
)
def test_a_typo_in_an_architecture_leaves_no_teacher_file_and_no_run_folder(tmp_path, cifar_dir, script, flags, named):
    cache = ["--checkpoint-dir", tmp_path / "cache"] if script in ("kd.py", "sskd.py", "hssakd.py") else []
    result = run_script(script, "--data-dir", cifar_dir, *flags, *cache, cwd=tmp_path)
    assert result.returncode != 0
    assert named in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


@dataclasses.dataclass
class TinyArgs:
    epochs: int = 2
    """epochs"""
    batch_size: int = 8
    """batch"""
    train_subset: Optional[int] = None
    """subset"""
    learning_rate: float = 0.1
    """lr"""
    warmup_epochs: int = 0
    """warm-up"""
    output_dir: str = "runs"
    """out"""
    seed: int = 1
    """seed"""


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--train-subset", "0"], "--train-subset 0"),
        (["--train-subset", "-49900"], "--train-subset -49900"),
        (["--epochs", "0"], "--epochs 0"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--learning-rate", "-1"], "--learning-rate -1"),
        (["--warmup-epochs", "-1"], "--warmup-epochs -1"),
        (["--learning-rate", "nan"], "--learning-rate nan must be a finite number"),
        (["--learning-rate", "inf"], "--learning-rate inf must be a finite number"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser_naming_the_value(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(TinyArgs, argv)
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_bad_numbers_stop_a_script_before_any_folder_exists(tmp_path, cifar_dir):
    result = run_script(
        "kd.py",
        "--data-dir",
        cifar_dir,
        "--train-subset",
        "0",
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--checkpoint-dir",
        tmp_path / "cache",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "--train-subset 0" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    too_many = run_script(
        "baseline.py", "--data-dir", cifar_dir, "--model", "resnet8", "--train-subset", "999", cwd=tmp_path
    )
    assert too_many.returncode != 0 and "larger than the 320 training images" in too_many.stderr


def test_an_unwritable_output_folder_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit):
        common.parse_args(TinyArgs, ["--output-dir", str(tmp_path / "a_file" / "runs")])
    assert "is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            common.parse_args(TinyArgs, ["--output-dir", str(locked / "runs")])


def test_help_lists_the_architectures():
    result = subprocess.run([sys.executable, str(REPO / "kd.py"), "--help"], capture_output=True, text=True)
    assert "architectures:" in result.stdout and "resnet32x4" in result.stdout and "wrn_40_2" in result.stdout


# ---- 3. the cached teacher matches the student's data ----


def test_a_teacher_for_another_normalization_is_trained_with_it_and_cached_under_its_own_name(tmp_path, cifar_dir):
    flags = [
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--epochs",
        "1",
        "--ce-teacher-epochs",
        "1",
        "--train-subset",
        "64",
    ]
    result = run_script("kd.py", *flags, "--normalize", "cifar10", "--run-name", "c10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cached = tmp_path / "checkpoints" / "cifar100" / "resnet8_e1_n64_norm-cifar10.pth"
    assert cached.exists() and not (tmp_path / "checkpoints" / "cifar100" / "resnet8_e1_n64.pth").exists()
    assert common.load_checkpoint(cached)["args"]["normalize"] == "cifar10"
    # the same file fed other constants is refused, with a way out
    refused = run_script(
        "kd.py", *flags, "--normalize", "repdistiller", "--teacher-path", cached, "--run-name", "rd", cwd=tmp_path
    )
    assert refused.returncode != 0 and "--normalize cifar10" in refused.stderr
    assert "--allow-teacher-normalize-mismatch" in refused.stderr and "Traceback" not in refused.stderr
    allowed = run_script(
        "kd.py",
        *flags,
        "--normalize",
        "repdistiller",
        "--teacher-path",
        cached,
        "--run-name",
        "rd",
        "--allow-teacher-normalize-mismatch",
        cwd=tmp_path,
    )
    assert allowed.returncode == 0 and "warning:" in allowed.stdout


def test_normalization_defaults_follow_the_dataset_and_the_recipe():
    assert common.default_normalize("cifar10", "repdistiller") == "cifar10"
    assert common.default_normalize("cifar100", "sskd") == "sskd"
    assert common.same_normalization("sskd", "repdistiller") and not common.same_normalization("cifar10", "sskd")


# ---- 4. resume checks its arguments ----


def test_resume_with_a_changed_learning_rate_is_refused_and_leaves_last_pth_unchanged(tmp_path, cifar_dir):
    flags = ["--data-dir", cifar_dir, "--model", "resnet8", "--train-subset", "32", "--run-name", "r"]
    assert run_script("baseline.py", *flags, "--epochs", "1", cwd=tmp_path).returncode == 0
    last = tmp_path / "runs" / "r" / "last.pth"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    refused = run_script("baseline.py", *flags, "--epochs", "1", "--learning-rate", "0.2", "--resume", cwd=tmp_path)
    assert refused.returncode != 0 and "--learning-rate None -> 0.2" in refused.stderr
    assert "--resume-with-changes" in refused.stderr and "Traceback" not in refused.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    accepted = run_script(
        "baseline.py", *flags, "--epochs", "2", "--seed", "7", "--resume", "--resume-with-changes", cwd=tmp_path
    )
    assert accepted.returncode == 0, accepted.stderr
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["resumed_with_changes"] == [{"from_epoch": 2, "changed": {"epochs": [1, 2], "seed": [1, 7]}}]


@pytest.mark.parametrize(
    "script, flags, named",
    [
        ("kd.py", ["--weight-decay", "nan"], "--weight-decay nan"),
        ("kd.py", ["--kd-T", "nan"], "--kd-T nan"),
        ("kd.py", ["--lr-gamma", "-1"], "--lr-gamma -1.0 must be positive"),
        ("pskd.py", ["--alpha-T", "5"], "--alpha-T 5.0 must be in [0, 1]"),
        ("pskd.py", ["--alpha-T", "-1"], "--alpha-T -1.0 must be in [0, 1]"),
        ("sskd.py", ["--ratio-ss", "1.5"], "--ratio-ss 1.5 must be in [0, 1]"),
    ],
)
def test_nan_inf_and_out_of_range_floats_are_refused_before_any_work(tmp_path, script, flags, named):
    result = run_script(script, "--data-dir", tmp_path / "none", *flags, cwd=tmp_path)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


def test_resume_after_a_cut_off_metrics_line_drops_it_and_matches_the_checkpoint(tmp_path, cifar_dir):
    flags = ["--data-dir", cifar_dir, "--model", "resnet8", "--train-subset", "32", "--run-name", "r"]
    assert run_script("baseline.py", *flags, "--epochs", "1", cwd=tmp_path).returncode == 0
    metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
    first_line = metrics.read_text()
    metrics.write_text(first_line + first_line[: len(first_line) // 2].replace('"epoch": 1', '"epoch": 2'))  # a kill
    resumed = run_script("baseline.py", *flags, "--epochs", "2", "--resume", "--resume-with-changes", cwd=tmp_path)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and metrics.read_text().startswith(first_line)


def test_a_zero_byte_checkpoint_is_named_in_one_clear_error(tmp_path):
    empty = tmp_path / "last.pth"
    empty.write_bytes(b"")
    with pytest.raises(common.ConfigError, match=r"last\.pth is empty \(0 bytes\)"):
        common.load_checkpoint(empty, "the run's last checkpoint", "Delete it.")


def test_a_diverged_loss_stops_within_ten_steps_and_the_advice_fits_what_is_on_disk(tmp_path):
    meter = common.Meter(tmp_path)
    for step in range(9):
        meter.add("loss/ce", torch.tensor(float("nan") if step == 0 else 1.0), 4)
        meter.add("loss/total", torch.tensor(1.0), 4)
    with pytest.raises(FloatingPointError, match="loss/ce became non-finite by step 10") as stopped:
        meter.add("loss/ce", torch.tensor(1.0), 4)
    assert "No epoch finished" in str(stopped.value) and "--resume" not in str(stopped.value)
    (tmp_path / "last.pth").write_bytes(b"x")
    with pytest.raises(FloatingPointError) as later:
        common.check_finite({"loss/ce": float("nan")}, 3, tmp_path, hint="Try --x.")
    assert str(later.value).startswith("loss/ce became non-finite in epoch 4. Try --x. The checkpoint")
    assert "--resume" in str(later.value) and str(tmp_path / "last.pth") in str(later.value)
    common.Meter().add("loss/ce", torch.tensor(float("nan")), 1)  # an evaluation meter never stops a run


@pytest.mark.skipif(not Path("/proc/self").exists() or os.geteuid() != 0, reason="needs /proc and root")
def test_proc_is_not_writable_even_for_root(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(TinyArgs, ["--output-dir", "/proc/x"])
    assert exit_info.value.code == 2 and "/proc is not writable" in capsys.readouterr().err


def test_the_normalization_refusal_offers_deleting_only_a_cached_teacher():
    checkpoint = {"args": {"normalize": "cifar10"}}
    cached = SimpleNamespace(normalize="repdistiller", teacher_path=None, allow_teacher_normalize_mismatch=False)
    with pytest.raises(common.ConfigError, match="delete the file"):
        common.check_teacher_normalization(checkpoint, cached, "checkpoints/cifar100/resnet56.pth")
    given = SimpleNamespace(normalize="repdistiller", teacher_path="mine.pth", allow_teacher_normalize_mismatch=False)
    with pytest.raises(common.ConfigError) as refused:
        common.check_teacher_normalization(checkpoint, given, "mine.pth")
    assert "delete" not in str(refused.value) and "--normalize cifar10" in str(refused.value)


def test_resume_with_nothing_to_resume_says_so(tmp_path, cifar_dir):
    result = run_script(
        "baseline.py",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--train-subset",
        "32",
        "--epochs",
        "1",
        "--resume",
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "holds no finished epoch to resume from" in result.stdout


# ---- 5. corrupt files and full disks ----


def test_a_corrupt_cached_teacher_gets_one_paragraph_that_says_deleting_retrains(tmp_path, cifar_dir):
    cached = tmp_path / "checkpoints" / "cifar100" / "resnet8_e1_n32.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 truncated")
    result = run_script(
        "kd.py",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--epochs",
        "1",
        "--ce-teacher-epochs",
        "1",
        "--train-subset",
        "32",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "checkpoints/cifar100/resnet8_e1_n32.pth" in result.stderr and "delete it and rerun" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_garbage_data_batch_names_the_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"\x00garbage")
    (folder / "test").write_bytes(b"\x00garbage")
    with pytest.raises(common.ConfigError, match=r"cifar-100-python/train is not a readable CIFAR python batch"):
        common.load_cifar("cifar100", tmp_path, download=False)


def test_a_full_disk_says_so_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(payload, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(common.ConfigError, match="the disk is full.*--resume"):
        common.save_checkpoint(tmp_path / "last.pth", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_offline_message_names_the_archive_and_kd_no_download_and_leaves_no_empty_folder(tmp_path, monkeypatch):
    def offline(dataset, data_dir):
        Path(data_dir).mkdir(parents=True, exist_ok=True)  # torchvision creates the folder before it fails
        raise OSError("no network")

    monkeypatch.setattr(common, "_download", offline)
    monkeypatch.delenv("KD_NO_DOWNLOAD", raising=False)
    with pytest.raises(common.ConfigError) as error:
        common.load_cifar("cifar10", tmp_path / "data")
    assert "cifar-10-python.tar.gz" in str(error.value) and "KD_NO_DOWNLOAD" in str(error.value)
    assert "https://" in str(error.value) and not (tmp_path / "data").exists()


# ---- 6. no orphans ----


def test_killing_the_method_script_kills_its_teacher_child(tmp_path, cifar_dir):
    command = [
        sys.executable,
        str(REPO / "kd.py"),
        "--data-dir",
        str(cifar_dir),
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--ce-teacher-epochs",
        "500",
        "--epochs",
        "1",
    ]
    parent = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child_pid = None
    for _ in range(600):  # wait until baseline.py has started and trained its first epoch
        time.sleep(0.1)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"baseline.py") for part in cmdline) and b"teacher_resnet8_e500_cifar100" in cmdline:
                child_pid = int(pid)
        if child_pid and (tmp_path / "runs" / "teacher_resnet8_e500_cifar100" / "last.pth").exists():
            break
    assert child_pid is not None
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        if not Path(f"/proc/{child_pid}").exists() or "Z" in Path(f"/proc/{child_pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the teacher child outlived its parent")


# ---- 7. say where it runs ----


def test_every_run_prints_its_device_and_records_it(tmp_path, cifar_dir):
    result = run_script(
        "baseline.py",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--train-subset",
        "32",
        "--epochs",
        "1",
        "--run-name",
        "d",
        cwd=tmp_path,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr
    device_line = next(line for line in result.stdout.splitlines() if line.startswith("device:"))
    assert "cpu (no CUDA device was found)" in device_line and f"torch {torch.__version__}" in device_line
    summary = json.loads((tmp_path / "runs" / "d" / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["torch"] == torch.__version__ and "cuda" in summary
    assert summary["method"] == "baseline"


# ---- 8. notebook-friendly arguments ----


def test_an_args_class_built_by_exec_parses_an_explicit_argument_list():
    namespace = {}
    exec(
        "import dataclasses\n@dataclasses.dataclass\nclass Args:\n    epochs: int = 3\n    name: str = 'x'\n", namespace
    )
    args = common.parse_args(namespace["Args"], ["--epochs", "5"])
    assert args.epochs == 5 and args.name == "x"


# ---- 9. one numbering of epochs ----


def test_epochs_are_one_based_on_screen_in_metrics_and_in_summary(tmp_path, cifar_dir):
    result = run_script(
        "baseline.py",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--train-subset",
        "32",
        "--epochs",
        "2",
        "--run-name",
        "e",
        cwd=tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "runs" / "e" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "runs" / "e" / "summary.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2] and "epoch 1/2" in result.stdout and "epoch 2/2" in result.stdout
    best_row = max(rows, key=lambda row: (row["test/top1"], -row["epoch"]))
    assert summary["best_epoch"] == best_row["epoch"]


def test_baseline_takes_checkpoint_dir_and_can_cache_its_model_as_the_teacher(tmp_path, cifar_dir):
    data = ["--data-dir", cifar_dir, "--train-subset", "32", "--epochs", "1", "--checkpoint-dir", tmp_path / "cache"]
    trained = run_script("baseline.py", *data, "--model", "resnet8", "--cache-as-teacher", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    cached = tmp_path / "cache" / "cifar100" / "resnet8_e1_n32.pth"
    assert cached.exists()
    distilled = run_script(
        "kd.py", *data, "--teacher", "resnet8", "--student", "resnet8", "--ce-teacher-epochs", "1", cwd=tmp_path
    )
    assert distilled.returncode == 0 and f"teacher resnet8 from {cached}" in distilled.stdout
    assert "training one with baseline.py" not in distilled.stdout


def test_a_test_subset_evaluates_n_images_and_is_recorded(tmp_path, cifar_dir):
    flags = ["--data-dir", cifar_dir, "--model", "resnet8", "--train-subset", "32", "--epochs", "1"]
    result = run_script("baseline.py", *flags, "--test-subset", "50", "--run-name", "q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "runs" / "q" / "summary.json").read_text())
    assert summary["args"]["test_subset"] == 50 and (summary["last_top1"] * 50 / 100).is_integer()
    too_many = run_script("baseline.py", *flags, "--test-subset", "999", "--run-name", "r", cwd=tmp_path)
    assert too_many.returncode != 0 and "--test-subset 999 is larger than the 200 test images" in too_many.stderr


def test_a_test_subset_is_a_fixed_sample_that_mixes_the_classes_of_a_sorted_test_set():
    images, labels = torch.arange(1000), torch.arange(1000) // 100  # sorted by class, as some CIFAR-10 copies are
    kept_images, kept_labels = common.fixed_sample(images, labels, 200)
    assert kept_labels.unique().numel() == 10 and kept_images.unique().numel() == 200
    assert torch.equal(kept_images, kept_images.sort().values)  # the original order is kept
    torch.manual_seed(123)  # the global stream (--seed) does not change the sample
    assert torch.equal(common.fixed_sample(images, labels, 200)[0], kept_images)


def test_a_long_evaluation_says_how_far_it_is(monkeypatch, capsys):
    monkeypatch.setattr(common, "EVALUATION_PROGRESS_SECONDS", -1)  # every batch counts as long
    data = common.CifarData(
        torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(4, dtype=torch.long),
        torch.zeros(6, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(6, dtype=torch.long),
        10,
        torch.zeros(1, 3, 1, 1),
        torch.ones(1, 3, 1, 1),
    )
    assert len(list(common.test_batches(data, 2))) == 3
    assert "evaluating: 2/6 test images" in capsys.readouterr().out
