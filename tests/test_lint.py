"""The whole tree stays formatted and lint-free with the one configuration in pyproject.toml."""

import subprocess
import sys

from conftest import REPO


def ruff(*arguments):
    return subprocess.run([sys.executable, "-m", "ruff", *arguments], cwd=REPO, capture_output=True, text=True)


def test_ruff_check_finds_no_lint_errors():
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_unchanged():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout + result.stderr
