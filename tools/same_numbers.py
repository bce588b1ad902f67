"""Check that a change moved no number: the same tiny seeded CPU run of each method file in two checkouts.

A refactor must leave every number as it was. This runs each method file for 2 epochs on a miniature synthetic
CIFAR-100 (tools/synthetic_cifar.py: 320 training, 200 test images; 64 of them trained on) in BEFORE and in AFTER,
each in its own folder, and compares metrics.jsonl (speed aside), every tensor of last.pth and best.pth, and every
tensor of the cached teacher stages. Stage files are paired in sorted order, not by name: a teacher trained by a
changed file may pickle its arguments in another order, which changes the digests in the names of the stages trained
on it, not their weights. Exit status 0 when everything is identical, 1 otherwise.

Run: python tools/same_numbers.py /path/to/checkout-before . --variants   (every method, then the other code paths)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TEACHER = ["--teacher", "resnet8", "--student", "resnet8", "--ce-teacher-epochs", "1"]
RUNS = {  # the flags of each method's tiny run, besides the shared ones below
    "baseline": ["--model", "resnet8"],
    "kd": TEACHER,
    "sskd": [*TEACHER, "--t-epochs", "1"],
    "hssakd": [*TEACHER, "--teacher-epochs", "1"],
    "pskd": ["--model", "resnet8"],
    "lsskd": ["--model", "resnet8"],
    "css": [
        "--model-t",
        "css_resnet56",
        "--model-s",
        "css_resnet56",
        "--detach-kd-target",
        "true",
        "--detach-ratio",
        "true",
    ],
}
# Other code paths of the same files, run with --variants: (method file, its flags besides the shared ones).
VARIANTS = {
    "hssakd-joint": ("hssakd", [*TEACHER, "--teacher-epochs", "1", "--teacher-mode", "joint"]),
    "hssakd-best": ("hssakd", [*TEACHER, "--teacher-epochs", "1", "--teacher-ckpt", "best"]),
    "sskd-gpu": ("sskd", [*TEACHER, "--t-epochs", "1", "--rotation-pipeline", "gpu"]),
    "pskd-off": ("pskd", ["--model", "resnet8", "--pskd", "false"]),
    "lsskd-final": ("lsskd", ["--model", "resnet8", "--kl-teacher", "final", "--final-rows", "all"]),
    "css-official": ("css", RUNS["css"][:4]),  # CSS's undetached form
}
SHARED = ["--dataset", "cifar100", "--train-subset", "64", "--batch-size", "32", "--epochs", "2", "--device", "cpu"]


def tensors(value, prefix=""):
    """Every tensor inside a checkpoint, by its key path; arguments and RNG states are left out."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    found = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in ("args", "rng"):
                found.update(tensors(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def run(checkout, method, data_dir, folder):
    """One tiny run; returns (metrics rows without speed, {file: tensors}, [cached stage tensors], their names)."""
    folder.mkdir(parents=True)
    script, flags = VARIANTS[method] if method in VARIANTS else (method, RUNS[method])
    command = [sys.executable, str(Path(checkout) / f"{script}.py"), *SHARED, *flags]
    result = subprocess.run(
        [*command, "--data-dir", str(data_dir), "--run-name", method], cwd=folder, text=True, capture_output=True
    )
    if result.returncode != 0:
        raise SystemExit(f"{method} failed in {checkout}:\n{result.stderr[-3000:]}")
    run_dir = folder / "runs" / method
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{key: value for key, value in row.items() if not key.startswith("speed/")} for row in rows]
    weights = {name: tensors(torch.load(run_dir / name, weights_only=False)) for name in ("last.pth", "best.pth")}
    stage_files = sorted(folder.glob("checkpoints/**/*.pth"))
    stages = [tensors(torch.load(path, weights_only=False)) for path in stage_files]
    return rows, weights, stages, [path.name for path in stage_files]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="checkout of the code before the change")
    parser.add_argument("after", help="checkout of the code after the change")
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=[*RUNS, *VARIANTS])
    parser.add_argument("--variants", action="store_true", help="also run every entry of VARIANTS")
    args = parser.parse_args()
    args.before, args.after = Path(args.before).resolve(), Path(args.after).resolve()  # runs start in other folders
    for checkout in (args.before, args.after):
        if not (Path(checkout) / "common.py").is_file():
            parser.error(f"{checkout} is not a checkout of this repository (no common.py)")
    identical = True
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        synthetic = [sys.executable, str(Path(args.after) / "tools" / "synthetic_cifar.py"), str(work / "data")]
        subprocess.run([*synthetic, "--train", "320", "--test", "200"], check=True, capture_output=True)
        for method in [*args.methods, *(VARIANTS if args.variants else [])]:
            before = run(args.before, method, work / "data", work / "before" / method)
            after = run(args.after, method, work / "data", work / "after" / method)
            same = {
                "metrics": before[0] == after[0],
                "weights": all(same_tensors(before[1][name], after[1][name]) for name in before[1]),
                "cached stages": len(before[2]) == len(after[2])
                and all(same_tensors(a, b) for a, b in zip(before[2], after[2])),
            }
            identical &= all(same.values())
            count = sum(len(found) for found in after[1].values())
            verdicts = ", ".join(f"{name} {'identical' if ok else 'DIFFERENT'}" for name, ok in same.items())
            names = "same names" if before[3] == after[3] else f"names {before[3]} -> {after[3]}"
            print(f"{method}: {verdicts} ({count} tensors, {len(after[2])} cached stage files, {names})", flush=True)
    print("ALL IDENTICAL" if identical else "DIFFERENCES FOUND")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
