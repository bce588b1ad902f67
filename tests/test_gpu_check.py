"""benchmarks/gpu_check_summary.py turns what gpu_check.sh wrote into summary.json and summary.md."""

import json
import subprocess
import sys

from conftest import REPO


def test_summary_collects_steps_test_counts_and_figures(tmp_path):
    (tmp_path / "steps.jsonl").write_text(
        '{"step": "cuda_tests", "exit": 1, "seconds": 70}\n{"step": "speed_kd", "exit": 0, "seconds": 30}\n'
    )
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped/></testcase></testsuite></testsuites>'
    )
    (tmp_path / "speed_kd.json").write_text(
        json.dumps(
            {
                "pair": "resnet56->resnet20",
                "batch_size": 64,
                "device": "cuda",
                "device_name": "GPU",
                "images_per_s": {"ours/amp": 12345.6},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check_summary.py"), tmp_path], capture_output=True, text=True
    )
    assert result.returncode == 1  # a step and a test failed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tests"] == {"passed": 1, "failed": 1, "skipped": 1, "failures": ["b"]}
    markdown = (tmp_path / "summary.md").read_text()
    assert "| cuda_tests | 1 | 70 |" in markdown and "| ours/amp | 12346 |" in markdown and "- failed: b" in markdown
