"""torchrun on the CPU (gloo), 2 ranks: every method file trains; 2 ranks x half the batch with --sync-bn end
with the weights of 1 process x the whole batch; PS-KD's prediction buffer is the same on every rank and the
one-process buffer; an interrupted run resumes bit-exactly; a rank that dies ends the whole job."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO

import common

RANKS = 2
QUICK = ["--device", "cpu", "--dataset", "cifar10", "--train-subset", "32", "--test-subset", "20"]
QUICK += ["--batch-size", "16", "--epochs", "1"]


def torchrun_command(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}", script, *args]


def torchrun(script, *args, cwd, timeout=300):
    """A script under torchrun as a user would start it; the CompletedProcess (never raises)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = torchrun_command(str(REPO / script), *map(str, args))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def weights(run_dir, key="model"):
    return torch.load(run_dir / "last.pth", weights_only=False)[key]


METHODS = {  # baseline.py: the --sync-bn test below; pskd.py: the kill-and-resume test
    "kd.py": ["--teacher", "resnet8", "--student", "resnet8", "--teacher-path", "{teacher}"],
    "sskd.py": ["--teacher", "resnet8", "--student", "resnet8", "--teacher-path", "{teacher}", "--t-epochs", "1"],
    # hssakd.py trains its CE teacher (baseline.py, a child process) and stage 1 on rank 0 alone, first
    "hssakd.py": ["--teacher", "resnet8", "--student", "resnet8", "--ce-teacher-epochs", "1", "--teacher-epochs", "1"],
    "lsskd.py": ["--model", "resnet8"],
    "css.py": ["--model-t", "css_resnet56", "--model-s", "css_resnet56"],
}


@pytest.mark.parametrize("script", METHODS)
def test_every_method_trains_under_torchrun_with_two_cpu_ranks(script, tmp_path, cifar_dir, untrained_teacher):
    flags = [flag.format(teacher=untrained_teacher) for flag in METHODS[script]]
    result = torchrun(script, *flags, *QUICK, "--data-dir", cifar_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"{RANKS} ranks (gloo)" in result.stdout
    method = script.removesuffix(".py")
    assert result.stdout.count(f"{method}: dataset=") == 1  # rank 0 alone prints
    if script == "hssakd.py":
        assert result.stdout.count("rank 0 trains") == 2  # the CE teacher, then stage 1
    summaries = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*/summary.json")]
    summary = next(summary for summary in summaries if summary["method"] == method)
    assert summary["world_size"] == RANKS and 0 <= summary["last_top1"] <= 100


def test_two_ranks_with_sync_bn_end_with_the_weights_of_one_process_with_the_whole_batch(tmp_path, cifar_dir):
    """4 SGD steps of 32 images: each rank takes 16, BN statistics and gradients are over all 32."""
    flags = [*QUICK, "--data-dir", cifar_dir, "--model", "resnet8", "--train-subset", "64", "--batch-size", "32"]
    flags += ["--epochs", "2", "--lr-milestones", "1"]
    one = subprocess.run(
        [sys.executable, str(REPO / "baseline.py"), *map(str, flags), "--run-name", "one"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    two = torchrun("baseline.py", *flags, "--run-name", "two", "--sync-bn", cwd=tmp_path)
    assert one.returncode == two.returncode == 0, two.stderr[-3000:]
    single, ranks = weights(tmp_path / "runs" / "one"), weights(tmp_path / "runs" / "two")
    assert single.keys() == ranks.keys()
    # float32 sums in another order: measured 7.4e-7 at most
    assert max((single[key].float() - ranks[key].float()).abs().max().item() for key in single) < 1e-5
    rows = [
        [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    for row_one, row_two in zip(*rows):  # the logged averages are over both ranks' rows
        assert row_one["loss/ce"] == pytest.approx(row_two["loss/ce"], abs=1e-5)
        assert row_one["train/top1"] == row_two["train/top1"] and row_one["test/top1"] == row_two["test/top1"]


BUFFER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {repo!r})
    import common, pskd
    common.get_device("cpu")
    buffer = torch.zeros(10, 3)
    for step, batch in enumerate([torch.tensor([4, 0, 7, 2]), torch.tensor([9, 5, 1]), torch.tensor([3, 8, 6])]):
        ids = batch[common.rank_rows(len(batch))]  # this rank's share, as train_batches gives it
        logits = torch.stack([torch.arange(3.0) * (index + 1) / 7 + step for index in ids.tolist()])
        pskd.record_predictions(buffer, *common.gather_rows(ids, logits))
    torch.save(buffer, {out!r} + f"/rank{{common.WORLD.rank}}.pt")
    """
)


def test_the_pskd_buffer_is_the_same_on_every_rank_and_equals_the_one_process_buffer(tmp_path):
    """Three global batches (the last two split 1 + 2 rows: uneven shares are padded for the gather)."""
    script = tmp_path / "buffer.py"
    script.write_text(BUFFER_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    result = torchrun(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    import pskd

    expected = torch.zeros(10, 3)
    for step, ids in enumerate([torch.tensor([4, 0, 7, 2]), torch.tensor([9, 5, 1]), torch.tensor([3, 8, 6])]):
        logits = torch.stack([torch.arange(3.0) * (index + 1) / 7 + step for index in ids.tolist()])
        pskd.record_predictions(expected, ids, logits)
    buffers = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(RANKS)]
    assert all(torch.equal(buffer, expected) for buffer in buffers)


def test_a_killed_rank_ends_the_job_and_the_run_resumes_to_the_weights_and_buffer_of_an_uninterrupted_one(
    tmp_path, cifar_dir
):
    """PS-KD (weights and prediction buffer): rank 1 is killed (SIGKILL) once an epoch is saved; torchrun stops
    rank 0 instead of leaving it waiting; --resume under torchrun then ends where an uninterrupted run ends."""
    flags = [*QUICK, "--data-dir", cifar_dir, "--model", "resnet8", "--epochs", "6", "--lr-milestones", "3"]
    whole = torchrun("pskd.py", *flags, "--run-name", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for attempt in range(3):  # on a loaded machine the run may finish before the kill lands: try again
        name = f"cut{attempt}"
        command = torchrun_command(str(REPO / "pskd.py"), *map(str, flags), "--run-name", name)
        job = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        checkpoint = tmp_path / "runs" / name / "last.pth"  # written atomically by rank 0 after each epoch
        deadline = time.time() + 300
        while not checkpoint.exists() and time.time() < deadline:
            time.sleep(0.005)
        ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(job.pid)], capture_output=True, text=True)
        for pid in ranks.stdout.split():  # the worker whose environment says RANK=1
            with contextlib.suppress(OSError):
                if b"\0RANK=1\0" in b"\0" + open(f"/proc/{pid}/environ", "rb").read():
                    os.kill(int(pid), signal.SIGKILL)
        killed = time.time()
        output, _ = job.communicate(timeout=120)
        if job.returncode != 0 or not (tmp_path / "runs" / name / "summary.json").exists():
            break
    assert job.returncode != 0 and time.time() - killed < 120
    assert "Signal 9 (SIGKILL)" in output, output[-3000:]
    assert 1 <= torch.load(checkpoint, weights_only=False)["epoch"] < 6
    resumed = torchrun("pskd.py", *flags, "--run-name", name, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    for key in ("model", "predictions"):
        ends = [weights(tmp_path / "runs" / run, key) for run in ("whole", name)]
        if key == "predictions":
            assert torch.equal(*ends) and ends[0].abs().sum() > 0
        else:
            assert ends[0].keys() == ends[1].keys() and all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_a_global_batch_that_does_not_divide_by_the_ranks_is_refused_before_any_work(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(common.ConfigError, match="--batch-size 30 is the global batch: it must divide by the 4"):
        common.check_common_args(BatchOnly(batch_size=30))
    common.check_common_args(BatchOnly(batch_size=32))


def test_under_torchrun_a_rank_takes_its_own_gpu_so_a_numbered_device_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(common.ConfigError, match="each rank takes cuda:<LOCAL_RANK>"):
        common.get_device("cuda:1")


def test_rank_rows_split_a_global_batch_into_contiguous_shares(monkeypatch):
    monkeypatch.setattr(common, "WORLD", common.World(rank=0, size=3))
    shares = []
    for rank in range(3):
        common.WORLD.rank = rank
        shares.append(list(range(10))[common.rank_rows(10)])
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


@dataclasses.dataclass
class BatchOnly:
    batch_size: int


def test_the_process_group_is_destroyed_at_a_clean_exit_but_not_after_an_error(tmp_path, monkeypatch):
    """join_process_group registers leave_process_group to run at exit (gloo can abort a finished process
    whose group was never destroyed); after an uncaught error it leaves the group alone."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(sys, "last_value", ValueError("this rank failed"), raising=False)
        common.leave_process_group()
        assert torch.distributed.is_initialized()
        monkeypatch.delattr(sys, "last_value")
        common.leave_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
