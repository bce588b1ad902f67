"""tools/report.py on synthetic run folders with hand-computed means and sample standard deviations, and
the published tables of the docs generated from docs/published.json."""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import report  # noqa: E402

KD_ARGS = {
    "dataset": "cifar100",
    "teacher": "resnet56",
    "student": "resnet20",
    "kd_T": 4.0,
    "epochs": 240,
    "data_dir": "data",
    "output_dir": "runs",
    "device": None,
    "resume": False,
}


def write_run(root, name, method, args, seed, last, best, curve=(10.0, 20.0), teacher_top1=None, summary=True):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    rows = [{"epoch": epoch, "test/top1": value} for epoch, value in enumerate(curve, 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if summary:
        content = {
            "method": method,
            "last_top1": last,
            "best_top1": best,
            "best_epoch": 2,
            "seed": seed,
            "args": {**args, "seed": seed, "run_name": name},
        }
        if teacher_top1 is not None:
            content["teacher_top1"] = teacher_top1
        (run_dir / "summary.json").write_text(json.dumps(content))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, last, best in ((1, 70.0, 71.0), (2, 71.0, 72.0), (3, 72.5, 73.0)):
        write_run(root, f"kd_s{seed}", "kd", KD_ARGS, seed, last, best, (60.0 + seed, last), teacher_top1=72.0)
    write_run(root, "kd_t2", "kd", {**KD_ARGS, "kd_T": 2.0}, 1, 69.0, 69.5)  # differs in one argument
    write_run(root, "base", "baseline", {"dataset": "cifar100", "model": "resnet20", "epochs": 240}, 1, 68.0, 68.4)
    write_run(root, "cut", "kd", KD_ARGS, 4, 0, 0, summary=False)  # interrupted: metrics only
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text("{not json")
    write_run(root, "teacher_resnet56_cifar100", "baseline", {"dataset": "cifar100", "model": "resnet56"}, 1, 1, 1)
    return root


def test_mean_and_sample_std_by_hand_with_n_minus_one(runs):
    rows, unfinished = report.rows_of(runs, report.load_published(), warn=lambda message: None)
    kd = next(row for row in rows if row["method"] == "kd" and row["n"] == 3)
    assert kd["seeds"] == [1, 2, 3]
    assert kd["last_mean"] == pytest.approx((70.0 + 71.0 + 72.5) / 3)
    # sample std: deviations -1.1667, -0.1667, 1.3333 -> sum of squares 3.1667 / (3 - 1) -> sqrt = 1.2583
    assert kd["last_std"] == pytest.approx(1.2583, abs=1e-4)
    assert kd["best_mean"] == pytest.approx(72.0) and kd["best_std"] == pytest.approx(1.0)
    assert kd["teacher_top1"] == pytest.approx(72.0)
    # RepDistiller's KD resnet56 -> resnet20 is 70.66, a last-epoch number: compared with our last-epoch mean
    assert kd["published_top1"] == pytest.approx(70.66) and kd["published_protocol"] == "last epoch, runs not stated"
    assert kd["difference"] == pytest.approx(71.1667 - 70.66, abs=1e-4)
    single = next(row for row in rows if row["method"] == "baseline")
    assert single["n"] == 1 and single["last_std"] is None and single["published_top1"] is None


def test_runs_differing_in_one_argument_are_never_averaged_and_the_setting_says_how(runs):
    rows, _ = report.rows_of(runs, report.load_published(), warn=lambda message: None)
    kd_rows = sorted((row for row in rows if row["method"] == "kd"), key=lambda row: row["n"])
    assert [row["n"] for row in kd_rows] == [1, 3]
    assert kd_rows[0]["setting"] == "kd_T=2.0" and kd_rows[1]["setting"] == "kd_T=4.0"
    assert kd_rows[0]["last_mean"] == 69.0


def test_unfinished_runs_are_listed_not_averaged_and_a_corrupt_summary_is_named(runs):
    warnings = []
    rows, unfinished = report.rows_of(runs, report.load_published(), warn=warnings.append)
    assert [run["dir"].name for run in unfinished] == ["cut"] and unfinished[0]["epochs_done"] == 2
    assert sum(row["n"] for row in rows) == 5  # 3 + 1 kd, 1 baseline; no teacher stage, no broken file
    assert len(warnings) == 1 and "broken/summary.json" in warnings[0]
    text = report.markdown(rows, unfinished)
    assert (
        "| kd | resnet56 → resnet20 | cifar100 | kd_T=4.0 | 3 | 71.17 ± 1.26 | 72.00 ± 1.00 | 72.00 | "
        "70.66 (last epoch, runs not stated) | +0.51 |" in text
    )
    assert "| 68.00 ± — |" in text and "Unfinished" in text and "cut (2 epochs logged)" in text


def run_report(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "report.py"), *map(str, args)], capture_output=True, text=True
    )


def test_csv_and_json_formats_carry_the_rows(runs):
    as_json = json.loads(run_report(runs, "--format", "json").stdout)
    fields = {
        "method",
        "teacher",
        "student",
        "model",
        "dataset",
        "n",
        "seeds",
        "last_mean",
        "last_std",
        "best_mean",
        "best_std",
        "run_dirs",
    }
    assert all(fields <= set(row) for row in as_json["rows"]) and len(as_json["rows"]) == 3
    assert [run["dir"].endswith("cut") for run in as_json["unfinished"]] == [True]
    lines = run_report(runs, "--format", "csv").stdout.splitlines()
    assert lines[0].startswith("method,teacher,student,model,dataset") and len(lines) == 4


def test_plots_write_valid_png_files(runs, tmp_path):
    result = run_report(runs, "--plots", tmp_path / "figures")
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    assert len(pngs) == 6  # three configurations, one comparison for resnet20 on cifar100, and:
    assert {"against_baselines.png", "differences.png"} <= {path.name for path in pngs}
    assert any(path.name.startswith("compare_cifar100_resnet20") for path in pngs)
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in pngs)
    kd = next(
        group for group in report.group_runs(report.find_runs(runs, lambda m: None)[0]) if len(group["runs"]) == 3
    )
    epochs, means, stds = report.curves(kd)
    assert epochs == [1, 2] and means[0] == pytest.approx(62.0) and stds[0] == pytest.approx(1.0)


def test_a_missing_runs_folder_is_one_clear_error(tmp_path):
    result = run_report(tmp_path / "nowhere")
    assert result.returncode == 2 and "is not a folder of runs" in result.stderr and "Traceback" not in result.stderr


def test_cell_numbers_read_every_published_notation():
    assert report.cell_number("77.20±0.17") == (77.2, 0.17)
    assert report.cell_number("**20.82 → 79.18**") == (79.18, None)
    assert report.cell_number("75.11") == (75.11, None)


@pytest.mark.parametrize("method", sorted({table["method"] for table in report.load_published()}))
def test_each_docs_published_table_is_generated_from_published_json(method):
    block = report.published_markdown(method)
    doc = (REPO / "docs" / f"{method}.md").read_text()
    embedded = re.search(rf"<!-- published:{method} -->\n(.*?)<!-- /published -->", doc, re.S)
    assert embedded, f"docs/{method}.md has no <!-- published:{method} --> block"
    assert embedded.group(1) == block, f"regenerate with: python tools/report.py --published-markdown {method}"


def test_published_entries_name_zoo_models_and_real_columns():
    import common

    for table in report.load_published():
        for row in table["rows"]:
            for name in (row.get("teacher"), row.get("student"), row.get("model")):
                assert name is None or name in common.MODEL_NAMES, name
            for result in row["results"]:
                assert result["column"] in table["columns"]
                report.cell_number(row["cells"][table["columns"].index(result["column"])])


def test_two_runs_with_one_seed_count_as_one_sample(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "kd_a", "kd", KD_ARGS, 1, 70.0, 71.0)
    write_run(root, "kd_copy", "kd", {**KD_ARGS, "output_dir": "elsewhere"}, 1, 70.0, 71.0)  # the same seed again
    warnings = []
    rows, _ = report.rows_of(root, {}, warn=warnings.append)
    assert [row["n"] for row in rows] == [1] and rows[0]["seeds"] == [1] and rows[0]["last_std"] is None
    assert any("repeats seed 1" in message and "kd_copy" in message for message in warnings)


def test_a_folder_without_runs_says_no_runs_found(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "report.py"), str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "no runs found" in result.stderr and "Traceback" not in result.stderr


def test_a_summary_whose_top1_is_not_a_number_is_skipped_with_a_warning(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "good", "kd", KD_ARGS, 1, 70.0, 71.0)
    write_run(root, "bad", "kd", KD_ARGS, 2, "n/a", 71.0)
    warnings = []
    rows, _ = report.rows_of(root, {}, warn=warnings.append)
    assert [row["n"] for row in rows] == [1] and any("bad" in message and "n/a" in message for message in warnings)


def test_identical_differences_give_a_zero_width_interval():
    assert report.bootstrap_interval([1.5, 1.5, 1.5]) == (1.5, 1.5)
    assert report.bootstrap_interval([2.0]) is None  # one seed: no interval


def test_the_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    import itertools

    import numpy as np

    differences = [-1.0, 0.5, 2.0]
    # All 27 equally likely resamples of three values: the exact bootstrap distribution of the mean.
    exact = np.array([np.mean(choice) for choice in itertools.product(differences, repeat=3)])
    low, high = report.bootstrap_interval(differences, resamples=200_000)
    weights = np.full(len(exact), 1 / len(exact))
    order = np.argsort(exact)
    cumulative = np.cumsum(weights[order])
    exact_low, exact_high = (
        exact[order][np.searchsorted(cumulative, 0.025)],
        exact[order][np.searchsorted(cumulative, 0.975)],
    )
    assert low == pytest.approx(exact_low, abs=0.06) and high == pytest.approx(exact_high, abs=0.06)
    assert report.bootstrap_interval(differences) == report.bootstrap_interval(differences)  # fixed seed


def test_each_method_is_paired_seed_by_seed_with_its_matched_baseline(tmp_path):
    root = tmp_path / "runs"
    demo = {"dataset": "cifar10", "train_subset": 4000, "epochs": 10, "lr_milestones": [7], "batch_size": 64}
    for seed, base, kd, pskd_on, pskd_off in ((1, 50.0, 53.0, 48.0, 49.0), (2, 51.0, 55.0, 47.0, 50.0)):
        write_run(root, f"base{seed}", "baseline", {**demo, "model": "resnet8"}, seed, base, base)
        write_run(root, f"kd{seed}", "kd", {**demo, "teacher": "resnet20", "student": "resnet8"}, seed, kd, kd)
        pskd_args = {**demo, "model": "resnet8", "alpha_T": 0.8}
        write_run(root, f"pskd{seed}", "pskd", {**pskd_args, "pskd": True}, seed, pskd_on, pskd_on)
        write_run(root, f"pskdoff{seed}", "pskd", {**pskd_args, "pskd": False}, seed, pskd_off, pskd_off)
    write_run(
        root,
        "kd_other_data",
        "kd",
        {**demo, "train_subset": 8000, "teacher": "resnet20", "student": "resnet8"},
        1,
        60.0,
        60.0,
    )
    rows = {(row["method"], row["setting"]): row for row in report.rows_of(root, {})[0]}
    kd = rows[("kd", "train_subset=4000")]
    assert kd["baseline"] == "baseline resnet8" and kd["differences"] == [3.0, 4.0] and kd["difference_mean"] == 3.5
    assert kd["difference_ci95"] == [3.0, 4.0]  # two values: every resampled mean lies between them
    assert rows[("kd", "train_subset=8000")]["baseline"] is None  # no baseline on 8,000 images
    pskd = rows[("pskd", "pskd=True")]
    assert pskd["baseline"] == "pskd pskd=False" and pskd["differences"] == [-1.0, -3.0]
    assert rows[("pskd", "pskd=False")]["baseline"] is None  # the baseline row itself
    table = report.markdown(list(rows.values()), [])
    assert "+3.50 [+3.00, +4.00] vs baseline resnet8 (n 2)" in table and "10,000 resamples" in table
    assert "difference_ci95" in report.csv_text(list(rows.values())).splitlines()[0]


def test_a_run_on_part_of_the_test_set_is_never_compared_with_a_published_number(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "kd_quick", "kd", {**KD_ARGS, "test_subset": 500}, 1, 70.0, 71.0)
    rows, _ = report.rows_of(root, report.load_published(), warn=lambda message: None)
    assert rows[0]["published_top1"] is None and rows[0]["difference"] is None and rows[0]["test_subset"] == 500
    assert "not comparable: 500 test images" in report.markdown(rows, [])
