"""--amp (bf16 autocast + channels_last) through every method script on the CPU: the path a CUDA run
takes, exercised here. Each script runs one tiny epoch in fp32 and once with --amp from the same
seed; the first epoch's losses must agree to bf16 precision and stay finite."""

import json
import math

import pytest
from conftest import run_script

TINY = ["--dataset", "cifar100", "--train-subset", "32", "--test-subset", "20", "--batch-size", "32", "--epochs", "1"]
SCRIPTS = {
    "sskd.py": ["--teacher", "resnet8", "--student", "resnet8", "--ce-teacher-epochs", "1", "--t-epochs", "1"],
    "hssakd.py": ["--teacher", "resnet8", "--student", "resnet8", "--teacher-mode", "joint", "--teacher-epochs", "1"],
    "pskd.py": ["--model", "resnet8"],
    "css.py": ["--model-t", "css_resnet56", "--model-s", "css_resnet56"],
    "lsskd.py": ["--model", "resnet8"],
}


def first_epoch(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("script", SCRIPTS)
def test_amp_run_matches_fp32_losses_to_bf16_precision(script, tmp_path, cifar_dir):
    flags = [*TINY, "--data-dir", cifar_dir, *SCRIPTS[script]]
    for name, extra in (("fp32", []), ("amp", ["--amp"])):
        result = run_script(script, *flags, *extra, "--run-name", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    fp32, amp = first_epoch(tmp_path / "runs" / "fp32"), first_epoch(tmp_path / "runs" / "amp")
    losses = [name for name in fp32 if name.startswith("loss/")]
    assert "loss/total" in losses and set(losses) == {name for name in amp if name.startswith("loss/")}
    for name in losses:
        assert math.isfinite(amp[name])
        # One step from the same initialisation: bf16 matmuls (8-bit mantissa) move each loss by
        # well under 5%; a wrong dtype or layout path (e.g. fp16 overflow, unnormalised input) does not.
        assert amp[name] == pytest.approx(fp32[name], rel=0.05, abs=0.02), name
    assert 0 <= amp["test/top1"] <= 100
