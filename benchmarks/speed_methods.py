"""Images/s of the method scripts against kd.py, side by side, as a user runs them.

Each configuration is a real run of the script (`python <method>.py ...`) on the first N training
images for 2 epochs; the second epoch's `speed/images_per_s` from metrics.jsonl is taken (loader
images per second of training steps, evaluation excluded; the first epoch carries one-off costs).
A teacher is trained once for 1 epoch (kd.py does it and caches it) and every method's own teacher
stage (SSKD head, HSAKD auxiliary branches) runs for 1 epoch and is cached before timing starts.
The scripts take turns for several rounds so that machine noise hits all of them alike; the median
per script is printed, with its ratio to kd.py and the time per loader batch relative to kd.py.

pskd.py, lsskd.py and baseline.py have no teacher: they train the --student architecture alone at batch 64;
css.py trains two css_resnet56 networks together (its smallest pair, at its own batch 128).

  python benchmarks/speed_methods.py --data-dir /tmp/cifar10 --dataset cifar10 --methods kd sskd hssakd lsskd
  python benchmarks/speed_methods.py --data-dir /tmp/data --device cuda --amp --methods kd sskd hssakd pskd lsskd css
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Flags that shorten each method's own teacher stage to 1 epoch (it is cached after the first run).
STAGE_FLAGS = {
    "kd": [],
    "sskd": ["--t-epochs", "1"],
    "hssakd": ["--teacher-epochs", "1"],  # stage 1: the auxiliary classifiers
    "pskd": [],
    "lsskd": [],
    "baseline": [],
    "css": [],
}
TEACHER_FREE = ("pskd", "lsskd", "baseline")  # they train --student's architecture alone, at kd.py's batch size 64


def run(method, args, work, run_name):
    if method in TEACHER_FREE:
        models = ["--model", args.student, "--batch-size", "64"]
    elif method == "css":
        models = ["--model-t", "css_resnet56", "--model-s", "css_resnet56"]
    else:
        models = [
            "--teacher",
            args.teacher,
            "--student",
            args.student,
            "--ce-teacher-epochs",
            "1",
            "--checkpoint-dir",
            str(work / "checkpoints"),
        ]
    command = [
        sys.executable,
        str(REPO / f"{method}.py"),
        "--dataset",
        args.dataset,
        "--data-dir",
        args.data_dir,
        *models,
        "--train-subset",
        str(args.train_subset),
        "--epochs",
        "2",
        "--run-name",
        run_name,
        "--output-dir",
        str(work / "runs"),
        *STAGE_FLAGS[method],
        *(["--amp"] if args.amp else []),
        *(["--device", args.device] if args.device else []),
    ]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method}.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    lines = (work / "runs" / run_name / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["speed/images_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="cifar100", choices=["cifar100", "cifar10"])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--methods", nargs="+", default=["kd", "sskd", "hssakd"], choices=sorted(STAGE_FLAGS))
    parser.add_argument("--train-subset", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; unset means cuda when available")
    parser.add_argument("--json", metavar="FILE", help="also write the medians to FILE")
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    methods = ["kd"] + [m for m in args.methods if m != "kd"]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for method in methods:  # warm-up run: trains and caches the teacher and each method's teacher stage
            run(method, args, work, f"warmup_{method}")
        speeds = {method: [] for method in methods}
        for round_index in range(args.rounds):
            for method in methods:
                speeds[method].append(run(method, args, work, f"{method}_round{round_index}"))
                print(f"round {round_index}: {method:8s} {speeds[method][-1]:8.1f} images/s", flush=True)

    kd_speed = statistics.median(speeds["kd"])
    print(
        f"\n{args.teacher} -> {args.student}, {args.dataset}, {args.train_subset} images, "
        f"{'amp' if args.amp else 'fp32'}, median of {args.rounds} rounds"
    )
    print("| script | loader images/s | vs kd.py | time per loader batch vs kd.py |")
    print("|---|---|---|---|")
    for method in methods:
        speed = statistics.median(speeds[method])
        print(f"| {method}.py | {speed:.0f} | {speed / kd_speed:.2f}x | {kd_speed / speed:.2f}x |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "benchmark": "speed_methods",
                    "device": args.device or "default",
                    "amp": args.amp,
                    "pair": f"{args.teacher}->{args.student}",
                    "train_subset": args.train_subset,
                    "images_per_s": {method: statistics.median(values) for method, values in speeds.items()},
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
