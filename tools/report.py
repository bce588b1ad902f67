"""Turn run folders into tables and learning curves: mean ± std over seeds, beside the published numbers.

    python tools/report.py runs/                          # markdown table, one row per configuration
    python tools/report.py runs/ --format csv             # or json
    python tools/report.py runs/ --plots figures/         # PNG learning curves (needs matplotlib)
    python tools/report.py --published-markdown kd        # the published table of docs/kd.md, from docs/published.json

A configuration is a method with all of its arguments except the bookkeeping ones (IGNORED_ARGS: seed, run
name, output folder, device, and flags that only change how a run is watched or resumed); runs that differ
in anything else are never averaged together. The primary number is the last-epoch top-1; the best-epoch
top-1 (chosen on the test set) is reported beside it. Std is the sample standard deviation (n - 1), "—" for
a single seed. A run folder without summary.json is listed as unfinished and never averaged. Teacher-stage
folders (runs/teacher_*) are not configurations and are skipped.

Run: python tools/report.py runs --plots figures
"""

import argparse
import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "docs" / "published.json"

# Arguments that say where or how a run was kept, not what was trained.
IGNORED_ARGS = (
    "seed",
    "run_name",
    "output_dir",
    "device",
    "resume",
    "resume_with_changes",
    "data_dir",
    "tensorboard",
    "track",
    "wandb_project",
)
MODEL_ARGS = ("teacher", "student", "model", "model_t", "model_s")


class ReportError(ValueError):
    """Bad input (a missing folder, an unknown method): printed as one line."""


# ---- reading run folders ----


def read_metrics(run_dir):
    """The per-epoch rows of metrics.jsonl (1-based "epoch"); unreadable lines are skipped."""
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def find_runs(root, warn=lambda message: print(message, file=sys.stderr)):
    """(finished, unfinished) run folders under `root`. A finished run has a readable summary.json; a corrupt
    one is skipped with a warning naming the file; a folder with only last.pth or metrics.jsonl is unfinished."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder of runs (expected <runs>/<run name>/summary.json)")
    finished, unfinished = [], []
    folders = {path.parent for pattern in ("summary.json", "metrics.jsonl", "last.pth") for path in root.rglob(pattern)}
    for run_dir in sorted(folders):
        if run_dir.name.startswith("teacher_"):
            continue
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            try:
                summary = json.loads(summary_path.read_text())
                numbers = summary["last_top1"], summary["best_top1"]  # the fields every table needs
                if not isinstance(summary["args"], dict) or not all(_is_number(value) for value in numbers):
                    raise TypeError(f"last_top1 {numbers[0]!r} and best_top1 {numbers[1]!r} must be numbers")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                warn(f"warning: skipping {summary_path}: not a valid summary ({type(err).__name__}: {err})")
                continue
            finished.append({"dir": run_dir, "summary": summary, "metrics": read_metrics(run_dir)})
        else:
            metrics = read_metrics(run_dir)
            unfinished.append({"dir": run_dir, "epochs_done": metrics[-1]["epoch"] if metrics else 0})
    return finished, unfinished


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_run_per_seed(group, warn):
    """The group's runs, one per seed: two runs with the same seed are one sample, not two (the first
    folder is kept, and a warning names the others)."""
    kept = {}
    for run in sorted(group["runs"], key=lambda run: str(run["dir"])):
        seed = run["summary"].get("seed")
        if seed in kept:
            warn(f"warning: {run['dir']} repeats seed {seed} of {kept[seed]['dir']}: counted once")
        else:
            kept[seed] = run
    return sorted(kept.values(), key=lambda run: run["summary"].get("seed", 0))


def method_of(summary):
    """summary.json names its method; files from before that field are recognised by their arguments."""
    if "method" in summary:
        return summary["method"]
    args = summary["args"]
    for method, marker in (
        ("css", "model_t"),
        ("lsskd", "kl_teacher"),
        ("pskd", "alpha_T"),
        ("hssakd", "teacher_mode"),
        ("sskd", "ratio_tf"),
        ("kd", "kd_T"),
        ("baseline", "model"),
    ):
        if marker in args:
            return method
    return "unknown"


# ---- grouping and statistics ----


def configuration(summary):
    """What a run trained: its method and every argument but the ignored ones."""
    args = {name: value for name, value in summary["args"].items() if name not in IGNORED_ARGS}
    return method_of(summary), args


def mean_std(values):
    """(mean, sample std with n - 1, or None for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def group_runs(finished):
    """One group per configuration, in the order first seen."""
    groups = {}
    for run in finished:
        method, args = configuration(run["summary"])
        key = json.dumps([method, args], sort_keys=True, default=str)
        groups.setdefault(key, {"method": method, "args": args, "runs": []})["runs"].append(run)
    return list(groups.values())


def models_of(method, args):
    """(teacher, student, model) of a configuration, as the tables name them."""
    if method == "css":
        return None, None, f"{args.get('model_t')}+{args.get('model_s')}"
    if "teacher" in args and "student" in args:
        return args["teacher"], args["student"], None
    return None, None, args.get("model")


def differing_settings(groups):
    """For each group, the arguments whose values differ between groups of the same method, models and
    dataset: what tells those rows apart."""
    by_identity = {}
    for group in groups:
        identity = (group["method"], models_of(group["method"], group["args"]), group["args"].get("dataset"))
        by_identity.setdefault(identity, []).append(group)
    for siblings in by_identity.values():
        names = sorted({name for group in siblings for name in group["args"]})
        varying = [
            name
            for name in names
            if name not in MODEL_ARGS
            and name != "dataset"
            and len({json.dumps(group["args"].get(name), default=str) for group in siblings}) > 1
        ]
        for group in siblings:
            group["setting"] = " ".join(f"{name}={group['args'].get(name)}" for name in varying)


# ---- paired differences against the matched baseline ----

BOOTSTRAP_RESAMPLES = 10_000  # resamples of the per-seed differences
BOOTSTRAP_SEED = 0  # fixed, so a table is reproduced exactly
# What a distillation row and its baseline.py row must share: the data and the schedule.
MATCHED_ARGS = ("dataset", "train_subset", "epochs", "lr_milestones", "batch_size", "amp")
# The teacher-free methods' own baselines: the same file with these arguments.
OWN_BASELINE = {
    "pskd": {"pskd": False},
    "css": {"distill": False},
    "lsskd": {"alpha_T": 0.0, "lambda_kl": 0.0, "lambda_feat": 0.0},  # HSAKD's joint loss on one network
}


def matched_baseline(group, groups):
    """The group a method row is compared with: baseline.py on the student with the same data and schedule
    (kd, sskd, hssakd), or the same file with the method switched off (OWN_BASELINE); None if absent."""
    method, args = group["method"], group["args"]
    if method in OWN_BASELINE:
        switched_off = OWN_BASELINE[method]
        if all(args.get(name) == value for name, value in switched_off.items()):
            return None  # this row is the baseline
        wanted = {**args, **switched_off}
        return next((other for other in groups if other["method"] == method and other["args"] == wanted), None)
    if method not in ("kd", "sskd", "hssakd"):
        return None
    for other in groups:
        same_data = all(other["args"].get(name) == args.get(name) for name in MATCHED_ARGS)
        if other["method"] == "baseline" and other["args"].get("model") == args.get("student") and same_data:
            return other
    return None


def bootstrap_interval(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """95 % percentile-bootstrap interval of the mean of `values`: resample them with replacement
    `resamples` times (numpy, fixed seed), take the 2.5th and 97.5th percentiles of the resampled means.
    None for fewer than two values."""
    import numpy as np

    if len(values) < 2:
        return None
    values = np.asarray(values, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def paired_difference(group, baseline):
    """Per seed present in both, method last-epoch top-1 minus baseline last-epoch top-1; their mean and
    the bootstrap interval of the mean."""
    ours = {run["summary"].get("seed"): run["summary"]["last_top1"] for run in group["runs"]}
    theirs = {run["summary"].get("seed"): run["summary"]["last_top1"] for run in baseline["runs"]}
    seeds = sorted(set(ours) & set(theirs), key=str)
    differences = [ours[seed] - theirs[seed] for seed in seeds]
    return {
        "paired_seeds": seeds,
        "differences": differences,
        "difference_mean": statistics.fmean(differences) if differences else None,
        "difference_ci95": list(bootstrap_interval(differences) or []) or None,  # [low, high]
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
    }


def baseline_label(baseline):
    switched_off = OWN_BASELINE.get(baseline["method"])
    if switched_off:
        return f"{baseline['method']} " + " ".join(f"{name}={value}" for name, value in switched_off.items())
    return f"baseline {baseline['args'].get('model')}"


# ---- published numbers ----


def load_published(path=PUBLISHED):
    return json.loads(Path(path).read_text())


def cell_number(cell):
    """'77.20±0.17' -> (77.2, 0.17); '20.82 → 79.18' -> (79.18, None); '**75.11**' -> (75.11, None)."""
    text = cell.replace("*", "").replace("\\", "").split("→")[-1].strip()
    value, _, spread = text.partition("±")
    return float(value), (float(spread) if spread else None)


def published_for(method, args, tables):
    """The published number of this configuration, or None: the table row with its models and dataset,
    and the result whose arguments it has."""
    teacher, student, model = models_of(method, args)
    for table in tables:
        if table["method"] != method or table["dataset"] != args.get("dataset"):
            continue
        for row in table["rows"]:
            if (row.get("teacher"), row.get("student"), row.get("model")) != (teacher, student, model):
                continue
            for result in row["results"]:
                if all(args.get(name) == value for name, value in result["args"].items()):
                    top1, std = cell_number(row["cells"][table["columns"].index(result["column"])])
                    return {
                        "top1": top1,
                        "std": std,
                        "epoch": table["protocol"]["epoch"],
                        "runs": table["protocol"]["runs"],
                        "source": table["source"],
                    }
    return None


def protocol_text(published):
    runs = f"{published['runs']} run{'s' if published['runs'] != 1 else ''}" if published["runs"] else "runs not stated"
    return f"{published['epoch']} epoch, {runs}"


# ---- rows ----


def summarise(group, tables):
    """One table row: counts, mean ± std of last and best epoch, teacher top-1, published number and our
    difference to it (our last-epoch mean against a last-epoch number, our best-epoch mean against a
    best-epoch one)."""
    method, args = group["method"], group["args"]
    runs = sorted(group["runs"], key=lambda run: run["summary"].get("seed", 0))
    last_mean, last_std = mean_std([run["summary"]["last_top1"] for run in runs])
    best_mean, best_std = mean_std([run["summary"]["best_top1"] for run in runs])
    teachers = [run["summary"]["teacher_top1"] for run in runs if "teacher_top1" in run["summary"]]
    teacher, student, model = models_of(method, args)
    published = published_for(method, args, tables)
    if args.get("test_subset"):  # a part of the test set is never a published-protocol number
        published = None
    difference = None
    if published:
        ours = best_mean if published["epoch"] == "best" else last_mean
        difference = ours - published["top1"]
    return {
        "method": method,
        "teacher": teacher,
        "student": student,
        "model": model,
        "dataset": args.get("dataset"),
        "setting": group.get("setting", ""),
        "n": len(runs),
        "seeds": [run["summary"].get("seed") for run in runs],
        "last_mean": last_mean,
        "last_std": last_std,
        "best_mean": best_mean,
        "best_std": best_std,
        "teacher_top1": statistics.fmean(teachers) if teachers else None,
        "published_top1": published["top1"] if published else None,
        "published_protocol": protocol_text(published) if published else None,
        "test_subset": args.get("test_subset"),
        "difference": difference,
        "run_dirs": [str(run["dir"]) for run in runs],
    }


def fmt(mean, std=None, show_std=False):
    if mean is None:
        return "—"
    if not show_std:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} ± —"


def rows_of(root, tables, warn=lambda message: print(message, file=sys.stderr)):
    finished, unfinished = find_runs(root, warn)
    if not finished and not unfinished:
        raise ReportError(f"no runs found under {root} (a run folder holds summary.json, metrics.jsonl or last.pth)")
    groups = group_runs(finished)
    for group in groups:
        group["runs"] = one_run_per_seed(group, warn)
    differing_settings(groups)
    rows = []
    for group in groups:
        row = summarise(group, tables)
        baseline = matched_baseline(group, groups)
        row["baseline"] = baseline_label(baseline) if baseline else None
        empty = {"paired_seeds": [], "differences": [], "difference_mean": None, "difference_ci95": None}
        row.update(paired_difference(group, baseline) if baseline else {**empty, "bootstrap_resamples": None})
        rows.append(row)
    rows.sort(
        key=lambda row: (
            str(row["dataset"]),
            str(row["student"] or row["model"]),
            str(row["teacher"]),
            row["method"],
            row["setting"],
        )
    )
    return rows, unfinished


def markdown(rows, unfinished):
    header = [
        "method",
        "teacher → student / model",
        "dataset",
        "setting",
        "n",
        "last-epoch top-1",
        "best-epoch top-1",
        "teacher top-1",
        "published (protocol)",
        "ours − published",
        "− matched baseline, per-seed mean [95 % CI]",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        models = f"{row['teacher']} → {row['student']}" if row["teacher"] else row["model"]
        published = f"{row['published_top1']:.2f} ({row['published_protocol']})" if row["published_top1"] else "—"
        if row.get("test_subset"):
            published = f"not comparable: {row['test_subset']} test images"
        difference = f"{row['difference']:+.2f}" if row["difference"] is not None else "—"
        paired = "—"
        if row.get("difference_mean") is not None:
            interval = row["difference_ci95"]
            bounds = f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else ""
            paired = f"{row['difference_mean']:+.2f}{bounds} vs {row['baseline']} (n {len(row['differences'])})"
        lines.append(
            "| "
            + " | ".join(
                [
                    row["method"],
                    str(models),
                    str(row["dataset"]),
                    row["setting"] or "—",
                    str(row["n"]),
                    fmt(row["last_mean"], row["last_std"], True),
                    fmt(row["best_mean"], row["best_std"], True),
                    fmt(row["teacher_top1"]),
                    published,
                    difference,
                    paired,
                ]
            )
            + " |"
        )
    if any(row.get("difference_ci95") for row in rows):
        lines += [
            "",
            f"Paired difference: the method's last-epoch top-1 minus its matched baseline's, seed by seed; "
            f"the interval is a 95 % percentile bootstrap of their mean ({BOOTSTRAP_RESAMPLES:,} resamples, "
            f"numpy seed {BOOTSTRAP_SEED}). With 3 seeds it is a rough guide, not a test.",
        ]
    if unfinished:
        lines += ["", "Unfinished (no summary.json; not averaged):"]
        lines += [f"- {run['dir']} ({run['epochs_done']} epochs logged)" for run in unfinished]
    return "\n".join(lines) + "\n"


def csv_text(rows):
    out = io.StringIO()
    fields = [name for name in rows[0]] if rows else ["method"]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {name: (" ".join(map(str, value)) if isinstance(value, list) else value) for name, value in row.items()}
        )
    return out.getvalue()


# ---- plots ----


def curves(group):
    """(epochs, mean test top-1 per epoch, std per epoch) over the group's seeds, on the epochs all have."""
    per_run = [
        {row["epoch"]: row["test/top1"] for row in run["metrics"] if "test/top1" in row} for run in group["runs"]
    ]
    epochs = sorted(set.intersection(*(set(run) for run in per_run))) if per_run else []
    means = [statistics.fmean(run[e] for run in per_run) for e in epochs]
    stds = [statistics.stdev(run[e] for run in per_run) if len(per_run) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def group_label(group):
    teacher, student, model = models_of(group["method"], group["args"])
    models = f"{teacher}→{student}" if teacher else model
    return " ".join(part for part in (group["method"], models, group.get("setting", "")) if part)


def plot_groups(groups, folder, rows=()):
    """One PNG per configuration, one per student network comparing every method that trained it, and from
    the table's rows: every method beside its matched baseline (against_baselines.png) and every paired
    difference with its interval (differences.png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("--plots needs the matplotlib package: pip install matplotlib") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def draw(axes, group):
        epochs, means, stds = curves(group)
        axes.plot(epochs, means, label=f"{group_label(group)} (n={len(group['runs'])})")
        axes.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)

    def save(figure, axes, title, name):
        axes.set_xlabel("epoch")
        axes.set_ylabel("test top-1 (%)")
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = folder / name
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)

    for index, group in enumerate(groups):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        draw(axes, group)
        save(
            figure,
            axes,
            f"{group_label(group)}: mean ± std over seeds",
            f"run_{index:02d}_{safe(group_label(group))}.png",
        )
    written += plot_against_baselines(groups, folder, plt) + plot_differences(rows, folder, plt)
    by_network = {}
    for group in groups:
        teacher, student, model = models_of(group["method"], group["args"])
        by_network.setdefault((group["args"].get("dataset"), student or model), []).append(group)
    for (dataset, network), members in by_network.items():
        if len(members) > 1:
            figure, axes = plt.subplots(figsize=(6, 4))
            for group in members:
                draw(axes, group)
            save(
                figure,
                axes,
                f"{network} on {dataset}: every method",
                f"compare_{safe(str(dataset))}_{safe(str(network))}.png",
            )
    return written


def plot_against_baselines(groups, folder, plt):
    """One panel per method that has a matched baseline: both mean curves, each with a band of ± 1 std."""
    pairs = [(group, baseline) for group in groups if (baseline := matched_baseline(group, groups))]
    if not pairs:
        return []
    columns = min(3, len(pairs))
    figure, axes = plt.subplots(
        math.ceil(len(pairs) / columns), columns, figsize=(4.4 * columns, 3.3 * math.ceil(len(pairs) / columns))
    )
    axes = list(getattr(axes, "flat", [axes]))
    for axis, (group, baseline) in zip(axes, pairs):
        for member, colour, name in ((baseline, "tab:gray", "baseline"), (group, "tab:blue", group["method"])):
            epochs, means, stds = curves(member)
            axis.plot(epochs, means, color=colour, label=f"{name}: mean")
            low, high = [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
            axis.fill_between(
                epochs, low, high, color=colour, alpha=0.2, label=f"± 1 std over {len(member['runs'])} seeds"
            )
        teacher, student, model = models_of(group["method"], group["args"])
        models = f"{teacher}→{student}" if teacher else model
        axis.set_title(f"{group['method']} {models}\nvs {baseline_label(baseline)}", fontsize=7)
        axis.set_xlabel("epoch", fontsize=7)
        axis.set_ylabel("test top-1 (%)", fontsize=7)
        axis.legend(fontsize=6)
    for axis in axes[len(pairs) :]:
        axis.axis("off")
    figure.tight_layout()
    path = Path(folder) / "against_baselines.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return [path]


def plot_differences(rows, folder, plt):
    """Each row's mean paired difference (method - matched baseline, same seed) with its 95 % bootstrap
    interval, and a zero line; a row with one paired seed is a dot without an interval."""
    shown = [row for row in rows if row.get("difference_mean") is not None]
    if not shown:
        return []
    figure, axis = plt.subplots(figsize=(7.5, 0.45 * len(shown) + 1.4))
    for place, row in enumerate(shown):
        mean, interval = row["difference_mean"], row["difference_ci95"] or [row["difference_mean"]] * 2
        axis.errorbar(mean, place, xerr=[[mean - interval[0]], [interval[1] - mean]], fmt="o", capsize=3)
    axis.axvline(0, color="black", linewidth=0.8)
    labels = [difference_label(row) for row in shown]
    axis.set_yticks(range(len(shown)), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("method − matched baseline, last-epoch top-1 (points): mean, 95 % bootstrap interval", fontsize=7)
    figure.tight_layout()
    path = Path(folder) / "differences.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return [path]


def difference_label(row):
    """<method> <teacher→student or model> [<setting>, when short], n=<paired seeds>."""
    models = f"{row['teacher']}→{row['student']}" if row["teacher"] else str(row["student"] or row["model"])
    setting = f" [{row['setting']}]" if row["setting"] and len(row["setting"]) <= 24 else ""
    return f"{row['method']} {models}{setting}, n={len(row['paired_seeds'])}"


def safe(text):
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80]


# ---- the published tables of the docs ----


def published_markdown(method, tables=None):
    """The published-results table of docs/<method>.md, generated from docs/published.json (the docs embed
    it between <!-- published:<method> --> markers; a test keeps them equal)."""
    tables = tables if tables is not None else load_published()
    matching = [table for table in tables if table["method"] == method]
    if not matching:
        known = sorted({table["method"] for table in tables})
        raise ReportError(f"no published table for {method!r}; docs/published.json has: {', '.join(known)}")
    blocks = []
    for table in matching:
        ours = [f"ours: {result_label(result)}" for result in table["rows"][0]["results"]] or ["ours"]
        header = [table["first_column"], *table["columns"], *ours]
        lines = [
            f"Published: {table['source']} ({protocol_text(table['protocol'])}).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for row in table["rows"]:
            cells = (
                row["cells"] + ["not run yet"] * len(row["results"])
                if row["results"]
                else row["cells"] + ["not implemented"] * len(ours)
            )
            lines.append("| " + " | ".join([row["label"], *cells]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def result_label(result):
    settings = ", ".join(
        f"--{name.replace('_', '-')} {str(value).lower() if isinstance(value, bool) else value}"
        for name, value in result["args"].items()
    )
    return f"{result['column']}" + (f" ({settings})" if settings else "")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("runs", nargs="?", help="folder holding run folders (searched recursively)")
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md")
    parser.add_argument("--plots", metavar="DIR", help="also write PNG learning curves into DIR")
    parser.add_argument("--published", default=str(PUBLISHED), help="the published numbers (JSON)")
    parser.add_argument("--published-markdown", metavar="METHOD", help="print the published table of a method's docs")
    options = parser.parse_args(argv)
    try:
        tables = load_published(options.published)
        if options.published_markdown:
            sys.stdout.write(published_markdown(options.published_markdown, tables))
            return 0
        if not options.runs:
            parser.error("give a folder of runs (e.g. runs/), or --published-markdown METHOD")
        rows, unfinished = rows_of(options.runs, tables)
        if options.format == "json":
            print(
                json.dumps(
                    {
                        "rows": rows,
                        "unfinished": [
                            {"dir": str(run["dir"]), "epochs_done": run["epochs_done"]} for run in unfinished
                        ],
                    },
                    indent=1,
                )
            )
        elif options.format == "csv":
            sys.stdout.write(csv_text(rows))
        else:
            sys.stdout.write(markdown(rows, unfinished))
        if options.plots:
            groups = group_runs(find_runs(options.runs, warn=lambda message: None)[0])
            for group in groups:
                group["runs"] = one_run_per_seed(group, warn=lambda message: None)
            differing_settings(groups)
            for path in plot_groups(groups, options.plots, rows):
                print(f"wrote {path}", file=sys.stderr)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
