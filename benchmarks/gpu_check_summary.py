"""Collect what benchmarks/gpu_check.sh wrote into OUT/summary.json and OUT/summary.md.

Run: python benchmarks/gpu_check_summary.py gpu_check (benchmarks/gpu_check.sh runs it)
"""

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def test_results(path):
    """passed / failed / skipped counts and the names of failures from pytest's JUnit XML."""
    if not path.exists():
        return None
    cases = ElementTree.parse(path).getroot().iter("testcase")
    counts, failures = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in cases:
        outcome = (
            "failed"
            if case.find("failure") is not None or case.find("error") is not None
            else "skipped"
            if case.find("skipped") is not None
            else "passed"
        )
        counts[outcome] += 1
        if outcome == "failed":
            failures.append(case.get("name"))
    return {**counts, "failures": failures}


def main(out):
    out = Path(out)
    steps = (
        [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
        if (out / "steps.jsonl").exists()
        else []
    )
    figures = {
        name: json.loads((out / f"{name}.json").read_text())
        for name in ("speed_kd", "speed_methods", "concurrent_kd")
        if (out / f"{name}.json").exists()
    }
    summary = {"steps": steps, "tests": test_results(out / "cuda_tests.xml"), **figures}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# GPU check", "", "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {step['step']} | {step['exit']} | {step['seconds']} |" for step in steps]
    if summary["tests"]:
        tests = summary["tests"]
        lines += [
            "",
            f"tests/test_cuda.py: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped",
        ]
        lines += [f"- failed: {name}" for name in tests["failures"]]
    if "speed_kd" in figures:
        lines += [
            "",
            f"kd.py step, {figures['speed_kd']['pair']}, batch {figures['speed_kd']['batch_size']}, "
            f"{figures['speed_kd']['device']} ({figures['speed_kd'].get('device_name')}):",
            "",
            "| pipeline | images/s |",
            "|---|---|",
        ]
        lines += [f"| {name} | {value:.0f} |" for name, value in figures["speed_kd"]["images_per_s"].items()]
    if "speed_methods" in figures:
        lines += ["", "Method scripts (--amp), loader images/s:", "", "| script | images/s |", "|---|---|"]
        lines += [f"| {name}.py | {value:.0f} |" for name, value in figures["speed_methods"]["images_per_s"].items()]
    if "concurrent_kd" in figures:
        lines += [
            "",
            "Concurrent kd.py runs on one device (--amp):",
            "",
            "| K | aggregate images/s | per run |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['aggregate_images_per_s']:.0f} | {v['per_run_images_per_s']:.0f} |"
            for k, v in figures["concurrent_kd"]["results"].items()
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [step for step in steps if step["exit"] != 0]
    return 1 if failed or (summary["tests"] and summary["tests"]["failed"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check"))
