"""Aggregate images/s of K kd.py processes training at once on one device: how many runs to pack per GPU.

A CIFAR-sized model leaves a large GPU mostly idle, so several runs side by side can finish a grid sooner
(tools/sweep.py --jobs-per-device K). For each K, K copies of the same kd.py run (other seeds) start
together; each trains 2 epochs on the first N images, and the second epoch's speed/images_per_s of every
process is added up (the epochs overlap: the processes start together and do the same work). The teacher
is trained and cached once before timing. On the CPU the cores are divided between the K processes.

  python benchmarks/concurrent_kd.py --data-dir /tmp/data --device cuda --jobs 1 4 8 --amp
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kd_command(args, work, name, seed):
    return [
        sys.executable,
        str(REPO / "kd.py"),
        "--dataset",
        args.dataset,
        "--data-dir",
        args.data_dir,
        "--teacher",
        args.teacher,
        "--student",
        args.student,
        "--ce-teacher-epochs",
        "1",
        "--checkpoint-dir",
        str(work / "checkpoints"),
        "--train-subset",
        str(args.train_subset),
        "--epochs",
        "2",
        "--seed",
        str(seed),
        "--output-dir",
        str(work / "runs"),
        "--run-name",
        name,
        *(["--device", args.device] if args.device else []),
        *(["--amp"] if args.amp else []),
    ]


def run_together(args, work, jobs):
    """Start `jobs` kd.py processes at once; returns (sum of their epoch-2 images/s, wall seconds)."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    names = [f"k{jobs}_{index}" for index in range(jobs)]
    start = time.time()
    processes = [
        subprocess.Popen(
            kd_command(args, work, name, seed),
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, name in enumerate(names, 1)
    ]
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            sys.exit(f"kd.py failed:\n{stderr[-3000:]}")
    wall = time.time() - start
    speeds = [
        json.loads((work / "runs" / name / "metrics.jsonl").read_text().splitlines()[-1])["speed/images_per_s"]
        for name in names
    ]
    return sum(speeds), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="cifar100", choices=["cifar100", "cifar10"])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8], help="numbers of concurrent processes")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; unset means cuda when available")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(kd_command(args, work, "warmup", 0), check=True, stdout=subprocess.DEVNULL)  # caches the teacher
        for jobs in args.jobs:
            aggregate, wall = run_together(args, work, jobs)
            results[jobs] = {
                "aggregate_images_per_s": aggregate,
                "per_run_images_per_s": aggregate / jobs,
                "wall_s": wall,
            }
            print(
                f"K={jobs}: {aggregate:.0f} images/s together ({aggregate / jobs:.0f} per run), {wall:.0f} s wall",
                flush=True,
            )
    single = results[args.jobs[0]]["aggregate_images_per_s"]
    print(
        f"\n{args.teacher} -> {args.student}, {args.dataset}, {args.train_subset} images, "
        f"{'amp' if args.amp else 'fp32'}, device {args.device or 'default'}"
    )
    print("| concurrent kd.py runs | aggregate images/s | per run | vs K = " + str(args.jobs[0]) + " |")
    print("|---|---|---|---|")
    for jobs, figures in results.items():
        print(
            f"| {jobs} | {figures['aggregate_images_per_s']:.0f} | {figures['per_run_images_per_s']:.0f} | "
            f"{figures['aggregate_images_per_s'] / single:.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "benchmark": "concurrent_kd",
                    "device": args.device or "default",
                    "amp": args.amp,
                    "pair": f"{args.teacher}->{args.student}",
                    "results": results,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
