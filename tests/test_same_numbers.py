"""tools/same_numbers.py: identical checkouts pass, a changed number is caught, a wrong folder is refused."""

import shutil
import subprocess
import sys

from conftest import REPO

TOOL = REPO / "tools" / "same_numbers.py"


def same_numbers(*arguments):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, arguments)], capture_output=True, text=True, timeout=600
    )


def test_the_same_code_twice_is_identical_and_a_variant_runs_its_method_file_with_its_flags():
    result = same_numbers(REPO, REPO, "--methods", "kd", "pskd-off")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kd: metrics identical, weights identical, cached stages identical" in result.stdout
    assert "pskd-off: metrics identical, weights identical, cached stages identical" in result.stdout
    assert result.stdout.strip().endswith("ALL IDENTICAL")


def test_a_changed_default_is_caught(tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(REPO, changed, ignore=shutil.ignore_patterns(".git", "tests", "docs", "runs", "checkpoints"))
    baseline_source = (changed / "baseline.py").read_text()
    assert "momentum: float = 0.9" in baseline_source
    (changed / "baseline.py").write_text(baseline_source.replace("momentum: float = 0.9", "momentum: float = 0.8"))
    result = same_numbers(REPO, changed, "--methods", "baseline")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "baseline: metrics DIFFERENT, weights DIFFERENT, cached stages identical" in result.stdout
    assert result.stdout.strip().endswith("DIFFERENCES FOUND")


def test_a_folder_that_is_no_checkout_is_refused(tmp_path):
    result = same_numbers(tmp_path, REPO, "--methods", "kd")
    assert result.returncode == 2 and "is not a checkout of this repository" in result.stderr
