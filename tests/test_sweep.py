"""tools/sweep.py: preset commands, skip-finished and resume-interrupted, a failure that does not stop the
grid, a real tiny grid with 2 jobs at once, the SLURM script, one teacher for concurrent runs, bad input."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import sweep  # noqa: E402


def run_sweep(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "sweep.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_cpu_demo_preset_runs_every_method_beside_its_baseline_for_three_seeds_after_one_teacher(tmp_path):
    result = run_sweep("--preset", "cpu-demo", "--dry-run", "--", "--data-dir", "/data", cwd=tmp_path)
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 1 + 10 * 3  # the teacher once, 10 grid points x seeds 1, 2, 3
    scripts = sorted({command[1].rsplit("/", 1)[1] for command in commands})
    assert scripts == ["baseline.py", "css.py", "hssakd.py", "kd.py", "lsskd.py", "pskd.py", "sskd.py"]
    names = [command[command.index("--run-name") + 1] for command in commands]
    assert names[0] == "baseline-teacher_resnet20_cifar10_seed1" and "--train-subset" not in commands[0]
    assert "pskd-ce_vgg8_cifar10_seed3" in names and "lsskd-floor_resnet8_cifar10_seed1" in names
    assert all("--data-dir" in command and "cifar10" in command for command in commands)
    assert not any(name.endswith(("_seed1_", "seed4")) for name in names)  # the data folder is not in the name
    teacher_file = str(tmp_path / "runs" / names[0] / "last.pth")  # the output folder is filled in
    distilled = [command for command in commands if command[1].endswith(("/kd.py", "/sskd.py", "/hssakd.py"))]
    assert len(distilled) == 9 and all(
        command[command.index("--teacher-path") + 1] == teacher_file for command in distilled
    )


def test_published_presets_follow_the_tables_pairs_with_three_seeds(tmp_path):
    kd = run_sweep("--preset", "kd-cifar100", "--dry-run", cwd=tmp_path).stdout.splitlines()
    assert len(kd) == 13 * 3
    assert any("--teacher resnet32x4 --student ShuffleV2" in line and "--seed 3" in line for line in kd)
    hssakd = run_sweep("--preset", "hssakd-cifar100", "--dry-run", cwd=tmp_path).stdout.splitlines()
    assert len(hssakd) == 8 * 2 * 3  # HSAKD (frozen) and HSAKD* (joint) for every pair
    mobile = [line for line in hssakd if "--student MobileNetV2" in line]
    assert mobile and all("--student MobileNetV2_hsakd " in line for line in mobile)  # HSAKD's stride-1 network
    every = run_sweep("--preset", "cifar100-all", "--dry-run", cwd=tmp_path).stdout.splitlines()
    assert len(every) == len(kd) + len(hssakd) + 11 * 3 + 1 * 3  # CIFAR-100 only
    imagenet = run_sweep("--preset", "hssakd-imagenet", "--dry-run", cwd=tmp_path).stdout.splitlines()
    assert len(imagenet) == 2 * 3 and all("--dataset imagenet --teacher resnet34_imagenet" in line for line in imagenet)


def test_finished_runs_are_skipped_and_interrupted_ones_resume(tmp_path):
    (tmp_path / "runs" / "baseline_resnet8_cifar100_seed1").mkdir(parents=True)
    (tmp_path / "runs" / "baseline_resnet8_cifar100_seed1" / "summary.json").write_text("{}")
    (tmp_path / "runs" / "baseline_resnet8_cifar100_seed2").mkdir()
    (tmp_path / "runs" / "baseline_resnet8_cifar100_seed2" / "last.pth").write_bytes(b"")
    lines = run_sweep(
        "--methods", "baseline", "--pairs", "resnet20:resnet8", "--seeds", 1, 2, 3, "--dry-run", cwd=tmp_path
    ).stdout.splitlines()
    assert lines[0].startswith("# finished: ")
    assert lines[1].endswith("--resume") and not lines[2].endswith("--resume")


def test_a_real_tiny_grid_with_two_jobs_at_once_ends_with_four_summaries_and_a_report(tmp_path, cifar_dir):
    result = run_sweep(
        "--methods",
        "baseline",
        "pskd",
        "--pairs",
        "resnet8:resnet8",
        "--seeds",
        1,
        2,
        "--jobs-per-device",
        2,
        "--",
        "--data-dir",
        cifar_dir,
        "--epochs",
        1,
        "--train-subset",
        64,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[sweep] done 4 | running 0 | failed 0 | left 0" in result.stdout
    summaries = sorted((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 4
    device_lines = [
        line
        for log in (tmp_path / "runs" / "logs").glob("*.log")
        for line in log.read_text().splitlines()
        if line.startswith("device:")
    ]
    expected_threads = max(1, (os.cpu_count() or 1) // 2)  # the cores divided between the 2 concurrent runs
    assert len(device_lines) == 4 and all(line.endswith(f", {expected_threads} CPU threads") for line in device_lines)
    report = subprocess.run(
        [sys.executable, str(REPO / "tools" / "report.py"), tmp_path / "runs", "--format", "json"],
        capture_output=True,
        text=True,
    )
    rows = json.loads(report.stdout)["rows"]
    assert sorted((row["method"], row["n"], row["seeds"]) for row in rows) == [
        ("baseline", 2, [1, 2]),
        ("pskd", 2, [1, 2]),
    ]
    again = run_sweep(
        "--methods",
        "baseline",
        "pskd",
        "--pairs",
        "resnet8:resnet8",
        "--seeds",
        1,
        2,
        "--",
        "--data-dir",
        cifar_dir,
        "--epochs",
        1,
        "--train-subset",
        64,
        cwd=tmp_path,
    )
    assert "skipped 4" in again.stdout and again.returncode == 0


def test_a_failing_run_is_reported_with_its_log_and_the_others_go_on(tmp_path, cifar_dir):
    # baseline.py has no --ce-teacher-epochs: its runs fail at once; kd.py's succeed
    result = run_sweep(
        "--methods",
        "baseline",
        "kd",
        "--pairs",
        "resnet8:resnet8",
        "--seeds",
        1,
        "--",
        "--data-dir",
        cifar_dir,
        "--epochs",
        1,
        "--train-subset",
        64,
        "--ce-teacher-epochs",
        1,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "failed: baseline_resnet8_cifar100_seed1_" in result.stdout and "log: " in result.stdout
    log = next((tmp_path / "runs" / "logs").glob("baseline_*.log")).read_text()
    assert "unrecognized arguments: --ce-teacher-epochs" in log
    assert len(list((tmp_path / "runs").glob("kd_*/summary.json"))) == 1


def test_two_concurrent_runs_that_need_the_same_missing_teacher_train_it_once(tmp_path, cifar_dir):
    result = run_sweep(
        "--methods",
        "kd",
        "--pairs",
        "resnet8:resnet8",
        "--seeds",
        1,
        2,
        "--jobs-per-device",
        2,
        "--",
        "--data-dir",
        cifar_dir,
        "--epochs",
        1,
        "--train-subset",
        64,
        "--ce-teacher-epochs",
        2,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout
    logs = [log.read_text() for log in (tmp_path / "runs" / "logs").glob("kd_*.log")]
    assert len(logs) == 2
    assert sum("training one with baseline.py" in log for log in logs) == 1
    assert sum("waiting for another run that is preparing" in log for log in logs) <= 1
    teacher_logs = [log for log in logs if "training one with baseline.py" in log][0]
    assert teacher_logs.count("epoch 2/2") == 1  # the teacher's 2 epochs ran once, in one of the runs
    assert len(list((tmp_path / "runs").glob("kd_*/summary.json"))) == 2


def test_the_slurm_script_has_one_array_index_per_run_and_the_same_skip_and_resume_rules(tmp_path):
    result = run_sweep(
        "--methods",
        "kd",
        "--pairs",
        "resnet56:resnet20",
        "--seeds",
        1,
        2,
        3,
        "--slurm",
        tmp_path / "grid.sbatch",
        "--",
        "--epochs",
        240,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "3 array tasks" in result.stdout
    script = (tmp_path / "grid.sbatch").read_text()
    assert script.startswith("#!/bin/bash") and "#SBATCH --array=0-2" in script
    assert 'if [ -f "$OUT/$name/summary.json" ]' in script and 'resume="--resume"' in script
    assert script.count("kd.py --dataset cifar100 --teacher resnet56 --student resnet20 --epochs 240") == 3
    assert subprocess.run(["bash", "-n", tmp_path / "grid.sbatch"]).returncode == 0  # valid shell


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "kd", "dkd", "--pairs", "resnet56:resnet20"], "unknown method 'dkd'"),
        (["--methods", "kd", "--pairs", "resnet56:resnet2O"], "unknown model 'resnet2O'"),
        (["--preset", "cifar1000"], "unknown preset 'cifar1000'"),
        (["--methods", "kd", "--pairs", "resnet56-resnet20"], "malformed pair 'resnet56-resnet20'"),
        (["--methods", "kd"], "needs --pairs"),
        (["--methods", "css", "--pairs", "resnet56:resnet20"], "css trains two CSS networks"),
        (["--methods", "pskd", "--pairs", "resnet8", "--", "--dataset", "cifar10"], "--dataset after --"),
        (["--preset", "cpu-demo", "--", "--dataset=cifar100"], "the preset fixes it"),
    ],
)
def test_bad_input_is_one_clear_error_before_anything_runs(tmp_path, args, message):
    result = run_sweep(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_threads_divide_the_cores_between_concurrent_runs(monkeypatch):
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 16)
    assert sweep.threads_per_run(["cpu"], 1) == 16 and sweep.threads_per_run(["cpu"], 4) == 4
    assert sweep.threads_per_run(["cuda:0", "cuda:1"], 8) == 1


def test_teacher_free_methods_take_a_bare_model_and_the_dataset_names_the_runs(tmp_path):
    result = run_sweep(
        "--methods", "pskd", "lsskd", "--pairs", "resnet8", "--dataset", "cifar10", "--dry-run", cwd=tmp_path
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2 * 3, result.stderr
    assert all("--dataset cifar10 --model resnet8" in line and "_resnet8_cifar10_seed" in line for line in lines)


def test_help_prints_the_description_once(tmp_path):
    text = run_sweep("--help", cwd=tmp_path).stdout
    assert text.count("Run a grid of experiments") == 1 and "--preset" in text


def test_a_shared_teacher_stage_is_trained_by_one_run_before_the_runs_that_need_it():
    def run(method, teacher, student, seed, **flags):
        extra = [token for name, value in flags.items() for token in (f"--{name.replace('_', '-')}", str(value))]
        pair = ["--teacher", teacher, "--student", student] if teacher else ["--model", student]
        return sweep.Run(method, ["--dataset", "cifar10", *pair, *extra], seed, f"{method}{seed}{student}")

    kd_first, kd_second = run("kd", "resnet20", "resnet8", 1), run("kd", "resnet20", "resnet8", 2)
    sskd = run("sskd", "resnet20", "resnet14", 1)  # the same CE teacher, its own head stage
    other_teacher = run("kd", "resnet32", "resnet8", 1)
    pskd = run("pskd", None, "resnet8", 1)
    runs = [kd_first, kd_second, sskd, other_teacher, pskd]
    leaders = sweep.stage_leaders(runs)
    assert [sweep.ready(each, leaders) for each in runs] == [True, False, False, True, True]
    kd_first.status = "done"
    assert sweep.ready(kd_second, leaders) and sweep.ready(sskd, leaders)
    second_head = run("sskd", "resnet20", "resnet8", 2)
    assert not sweep.ready(second_head, sweep.stage_leaders([*runs, second_head]))  # waits for sskd's head


def test_a_grid_teacher_run_leads_the_runs_given_its_file_and_slurm_chains_it_before_their_stages(tmp_path):
    runs = sweep.build_runs(sweep.presets()["cpu-demo"], [1, 2], [])
    teacher, leaders = runs[0], sweep.stage_leaders(runs)
    kd = [run for run in runs if run.method == "kd"]
    sskd = [run for run in runs if run.method == "sskd"]
    assert [sweep.ready(run, leaders) for run in (teacher, kd[0], sskd[0])] == [True, False, False]
    teacher.status = "done"
    assert sweep.ready(kd[0], leaders) and sweep.ready(kd[1], leaders) and sweep.ready(sskd[0], leaders)
    assert not sweep.ready(sskd[1], leaders)  # waits for the head trained by sskd[0]
    phases = sweep.teacher_phases(runs)
    assert [[run.method for run in phase] for phase in phases] == [["baseline"], ["sskd", "hssakd"]]
    teacher.status = "skipped"  # finished earlier: nothing waits on it
    assert sweep.ready(kd[0], sweep.stage_leaders(runs))
    result = run_sweep("--preset", "cpu-demo", "--slurm", "grid.sbatch", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--dependency=afterok:$jid grid.teachers2.sbatch" in result.stdout
    assert (
        "--teacher-path out/baseline-teacher_resnet20_cifar10_seed1/last.pth" in (tmp_path / "grid.sbatch").read_text()
    )


def test_the_slurm_scripts_chain_the_teacher_array_first_throttle_and_name_no_local_path(tmp_path):
    result = run_sweep(
        *("--methods", "kd", "pskd", "--pairs", "resnet56:resnet20", "--seeds", 1, 2),
        *("--slurm", "grid.sbatch", "--slurm-throttle", 3, "--output-dir", "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "sbatch --parsable grid.teachers.sbatch" in result.stdout and "--dependency=afterok:$jid" in result.stdout
    grid, teachers = (tmp_path / "grid.sbatch").read_text(), (tmp_path / "grid.teachers.sbatch").read_text()
    assert "#SBATCH --array=0-3%3" in grid and "#SBATCH --array=0-0%3" in teachers
    assert "kd.py --dataset cifar100 --teacher resnet56 --student resnet20 --seed 1" in teachers
    assert "pskd.py" not in teachers and (tmp_path / "out" / "logs").is_dir()
    for script in (grid, teachers):
        assert str(tmp_path) not in script and str(REPO) not in script and sys.executable not in script
        assert 'PYTHON="${PYTHON:-python}"' in script and 'cd "${SLURM_SUBMIT_DIR:-$PWD}"' in script
    for name in ("grid.sbatch", "grid.teachers.sbatch"):
        assert subprocess.run(["bash", "-n", tmp_path / name]).returncode == 0


def test_no_printed_command_gives_a_flag_twice(tmp_path):
    lines = run_sweep("--preset", "cpu-demo", "--dry-run", cwd=tmp_path).stdout.splitlines()
    css = [line for line in lines if "css.py" in line]
    assert css and all("--epochs 8" in line and "--train-subset 4000" in line for line in css)
    for line in lines:
        flags = [token for token in shlex.split(line) if token.startswith("--")]
        assert len(flags) == len(set(flags)), line


def test_nproc_per_run_starts_each_run_with_torchrun_on_its_own_group_of_gpus(tmp_path):
    flags = ["--methods", "kd", "--pairs", "resnet56:resnet20", "--seeds", "1", "--nproc-per-run", "2"]
    result = run_sweep(*flags, "--devices", "cuda:0,cuda:1,cuda:2,cuda:3", "--dry-run", cwd=tmp_path)
    command = shlex.split(result.stdout.splitlines()[0])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5].endswith("/kd.py") and command[command.index("--device") + 1] == "cuda"
    assert sweep.device_groups(["cuda:0", "cuda:1", "cuda:2", "cuda:3"], 2) == [
        ["cuda:0", "cuda:1"],
        ["cuda:2", "cuda:3"],
    ]
    assert sweep.launch_settings(["cuda:2", "cuda:3"], 2) == ("cuda", "2,3")  # each rank: cuda:<LOCAL_RANK> of these
    assert sweep.launch_settings(["cpu"], 2) == ("cpu", None) and sweep.launch_settings(["cuda:1"], 1) == (
        "cuda:1",
        None,
    )
    odd = run_sweep(*flags, "--devices", "cuda:0,cuda:1,cuda:2", "--dry-run", cwd=tmp_path)
    assert odd.returncode == 2 and "needs GPUs in groups of 2" in odd.stderr
    run_sweep(*flags, "--slurm", tmp_path / "grid.sbatch", "--output-dir", "out", cwd=tmp_path)
    script = (tmp_path / "grid.sbatch").read_text()
    assert (
        "#SBATCH --gres=gpu:2" in script and "'-m torch.distributed.run --standalone --nproc_per_node=2 kd.py" in script
    )
