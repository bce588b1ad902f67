"""Run a grid of experiments (methods x teacher-student pairs x seeds), each the unchanged method script in
its own process, then aggregate it with tools/report.py.

    python tools/sweep.py --preset cpu-demo -- --data-dir /path/to/cifar10
    python tools/sweep.py --methods kd sskd --pairs resnet56:resnet20 --seeds 1 2 3 -- --epochs 240
    python tools/sweep.py --preset cifar100-all --devices cuda:0,cuda:1 --jobs-per-device 4
    python tools/sweep.py --preset kd-cifar100 --slurm kd.sbatch --slurm-throttle 8   # SLURM array jobs instead
    python tools/sweep.py --preset cpu-demo --dry-run                 # print the commands only
    python tools/sweep.py --methods hssakd --pairs resnet34_imagenet:resnet18_imagenet --dataset imagenet \
        --devices cuda:0,cuda:1,cuda:2,cuda:3 --nproc-per-run 4 --seeds 1 -- --data-dir /data/imagenet

Every run gets a name derived from its grid point (method, variant, models, dataset, seed, and a digest of
the extra flags when there are any) and a folder <output-dir>/<name>. A run whose summary.json exists is
skipped; one with a last.pth is continued with --resume; a failed run is reported with its log
(<output-dir>/logs/<name>.log) and the others go on. Teacher stages that several runs need (a missing CE
teacher, SSKD's teacher head, HSAKD's stage 1) are trained once, first: the first run that needs a stage
trains it, and the runs that need it start only after that run ended, so no device slot waits on a cache
lock meanwhile (runs without a teacher fill the slots). The method scripts also lock each cache file, so two
sweeps sharing a checkpoint folder still train a stage once. On SLURM the teacher runs are an array of their
own (<file>.teachers.sbatch) and the whole grid a second array that starts after it (afterok); both scripts
run from the folder they are submitted from, with $PYTHON (default python), and name no path of the machine
that wrote them. On the CPU the cores are divided between concurrent runs (torch threads per run), never
oversubscribed. With --nproc-per-run N each run is one torchrun job on N of the devices (DDP: docs/distributed.md),
and its SLURM array task asks for N GPUs.

Run: python tools/sweep.py --preset cpu-demo --jobs-per-device 2 -- --data-dir DIR
"""

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402  (the zoo names and the process helper; importing it has no side effects)
from css import CSS_RESNETS  # noqa: E402  (CSS's own networks; importing css.py has no side effects)

METHODS = ("baseline", "kd", "sskd", "hssakd", "pskd", "lsskd", "css")
DISTILLATION = ("kd", "sskd", "hssakd")  # need a teacher -> student pair


class SweepError(ValueError):
    """Bad input, printed as one line before anything runs."""


@dataclass
class Run:
    """One grid point: `python <method>.py <flags> --seed S --run-name <name>`."""

    method: str
    flags: list
    seed: int
    name: str
    status: str = "left"  # left | skipped | running | done | failed
    log: Path = None
    process: subprocess.Popen = None
    started: float = 0.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def command(self, output_dir, device=None, resume=False, nproc=1):
        """With nproc > 1: torchrun (python -m torch.distributed.run) starts nproc ranks of the script."""
        launcher = [sys.executable] + (TORCHRUN + [f"--nproc_per_node={nproc}"] if nproc > 1 else [])
        command = [
            *launcher,
            str(REPO / f"{self.method}.py"),
            *(token.replace(OUTPUT_DIR, str(output_dir)) for token in self.flags),
            "--seed",
            str(self.seed),
            "--output-dir",
            str(output_dir),
            "--run-name",
            self.name,
        ]
        if device:
            command += ["--device", device]
        return command + (["--resume"] if resume else [])


TORCHRUN = ["-m", "torch.distributed.run", "--standalone"]  # torchrun, run by the same python


# In a preset's flags: the sweep's --output-dir, filled in when a command is made (the run names stay the same
# whichever folder a grid is run in); and the last.pth of the grid's teacher run (tag "teacher"), filled in when
# the grid is built.
OUTPUT_DIR = "{output_dir}"
TEACHER_RUN = "{teacher_run}"


# Extra flags that say where things are or how a run is watched; they do not change what is trained, so
# they stay out of the run name (the same grid run from another data folder finds its finished runs).
BOOKKEEPING_FLAGS = (
    "--data-dir",
    "--device",
    "--checkpoint-dir",
    "--eval-batch-size",
    "--tensorboard",
    "--track",
    "--wandb-project",
)


def training_flags(extra_flags):
    """The extra flags without the bookkeeping ones (and their values)."""
    kept, skip_value = [], False
    for token in extra_flags:
        if skip_value and not token.startswith("--"):
            skip_value = False
            continue
        skip_value = token.split("=")[0] in BOOKKEEPING_FLAGS
        if not skip_value:
            kept.append(token)
    return kept


def run_name(method, tag, models, dataset, seed, extra_flags):
    """<method>[-<tag>]_<models>_<dataset>_seed<seed>[_<digest of the extra training flags>]: different flags
    never share a folder, so skip-if-finished cannot mistake one grid's run for another's."""
    flags = training_flags(extra_flags)
    digest = "_" + hashlib.sha1(json.dumps(flags).encode()).hexdigest()[:8] if flags else ""
    return f"{method}{'-' + tag if tag else ''}_{models}_{dataset}_seed{seed}{digest}"


def check_model(name, valid):
    if name not in valid:
        raise SweepError(f"unknown model {name!r}; choose one of: {', '.join(valid)}")


def grid_point(method, pair, dataset, tag="", variant_flags=()):
    """(flags, models label) of one method on one pair. Teacher-free methods train the pair's student (pskd,
    lsskd, baseline); css trains both networks of the pair together (CSS names only)."""
    teacher, student = pair
    if teacher is None and method in (*DISTILLATION, "css"):
        what = "NET1:NET2" if method == "css" else "TEACHER:STUDENT"
        raise SweepError(f"malformed pair {student!r}: {method} needs --pairs {what}")
    if method in DISTILLATION:
        check_model(teacher, common.MODEL_NAMES)
        check_model(student, common.MODEL_NAMES)
        flags, models = ["--teacher", teacher, "--student", student], f"{teacher}-{student}"
    elif method == "css":
        if teacher not in CSS_RESNETS or student not in CSS_RESNETS:
            raise SweepError(
                f"css trains two CSS networks together: give --pairs NET1:NET2 with names from "
                f"{', '.join(CSS_RESNETS)} (got {teacher}:{student})"
            )
        flags, models = ["--model-t", teacher, "--model-s", student], f"{teacher}-{student}"
    else:
        check_model(student, common.MODEL_NAMES)
        flags, models = ["--model", student], student
    return without_repeats(["--dataset", dataset, *flags, *variant_flags]), models


def without_repeats(flags):
    """A flag list in which a flag given twice keeps only its last value, at its first place (a preset's
    method flags override its recipe's, and the printed command says each flag once)."""
    groups, order = {}, []
    for token in flags:
        if token.startswith("--"):
            if token not in groups:
                order.append(token)
            groups[token] = [token]
            current = token
        else:
            groups[current].append(token)
    return [token for name in order for token in groups[name]]


def parse_pair(text):
    """TEACHER:STUDENT, or a bare MODEL for the teacher-free methods (teacher None)."""
    teacher, colon, student = text.partition(":")
    if not colon and teacher:
        return None, teacher
    if not teacher or not student or ":" in student:
        raise SweepError(f"malformed pair {text!r}: write TEACHER:STUDENT (e.g. resnet56:resnet20) or MODEL")
    return teacher, student


# ---- presets ----


def published_presets():
    """One preset per published table in docs/published.json (<method>-<dataset>: kd-cifar100, hssakd-imagenet,
    ...): that table's pairs, 3 seeds, the method's own defaults for the dataset (the paper's recipe); each
    published result's arguments are a variant."""
    presets = {}
    for table in json.loads((REPO / "docs" / "published.json").read_text()):
        points = presets.setdefault(f"{table['method']}-{table['dataset']}", [])
        for row in table["rows"]:
            for result in row["results"]:
                pair = (row.get("teacher"), row.get("student") or row.get("model"))
                variant = [
                    token
                    for name, value in result["args"].items()
                    for token in (f"--{name.replace('_', '-')}", str(value).lower())
                ]
                tag = "-".join(str(value) for name, value in result["args"].items() if name == "teacher_mode")
                points.append((table["method"], pair, table["dataset"], tag, variant))
    return presets


# cpu-demo: every method on real CIFAR-10 beside its matched baseline, 3 seeds, at a scale a 2-core CPU finishes
# in under two hours (measured: docs/results.md). Each group is sized for its mechanism to act:
# - a resnet20 teacher trained once on all 50,000 images (5 epochs), far above the students;
# - KD, SSKD, HSAKD and LSSKD: resnet8 students on 1,000 images for 30 epochs;
# - PS-KD, a regulariser that can only help where cross-entropy overfits: vgg8 on 1,000 images for 60 epochs
#   (its train top-1 nears 100 %); VGG's HSAKD/LSSKD branches are 20x slower than the network on a CPU;
# - CSS: its two smallest networks on 4,000 images for 8 epochs at batch 64 (lr 0.05, the official 0.1 scaled
#   with the batch), about 500 steps: on 1,000 images at batch 128 (120 steps) both stayed near chance (11.2 %).
#   The detached form: the official gradients diverged within two epochs on this CPU (docs/css.md).
# Every student run evaluates a fixed sample of 2,000 test images (--test-subset), so evaluation stays a small
# part of each epoch.
CPU_DEMO_STUDENT = ["--train-subset", "1000", "--test-subset", "2000", "--amp"]
CPU_DEMO_TEACHER = ["--epochs", "5", "--lr-milestones", "3", "4", "--amp"]
RESNET8_RECIPE = [*CPU_DEMO_STUDENT, "--epochs", "30", "--lr-milestones", "20", "25"]
VGG8_RECIPE = [*CPU_DEMO_STUDENT, "--epochs", "60", "--lr-milestones", "40", "50"]
CSS_RECIPE = [
    "--train-subset",
    "4000",
    "--test-subset",
    "2000",
    "--amp",
    "--batch-size",
    "64",
    "--learning-rate",
    "0.05",
]
CSS_RECIPE += ["--epochs", "8", "--warmup-epochs", "2", "--lr-milestones", "6", "7"]
CSS_DETACHED = ["--detach-kd-target", "true", "--detach-ratio", "true"]
TEACHER_STAGE = ["--teacher-path", TEACHER_RUN]
CPU_DEMO = [
    # method, (teacher, student), tag, flags; the sweep starts runs in this order as soon as what they need is
    # trained, so the longest teacher-free runs go first, beside the teacher
    ("baseline", ("", "resnet20"), "teacher", CPU_DEMO_TEACHER),  # first: the others' --teacher-path
    ("css", ("css_resnet56", "css_resnet56"), "", [*CSS_RECIPE, *CSS_DETACHED]),
    ("css", ("css_resnet56", "css_resnet56"), "ce", [*CSS_RECIPE, *CSS_DETACHED, "--distill", "false"]),
    ("lsskd", ("", "resnet8"), "", RESNET8_RECIPE),
    ("lsskd", ("", "resnet8"), "floor", [*RESNET8_RECIPE, "--alpha-T", "0", "--lambda-kl", "0", "--lambda-feat", "0"]),
    ("pskd", ("", "vgg8"), "", VGG8_RECIPE),
    ("pskd", ("", "vgg8"), "ce", [*VGG8_RECIPE, "--pskd", "false"]),
    ("baseline", ("", "resnet8"), "", RESNET8_RECIPE),
    ("kd", ("resnet20", "resnet8"), "", [*RESNET8_RECIPE, *TEACHER_STAGE]),
    ("sskd", ("resnet20", "resnet8"), "", [*RESNET8_RECIPE, *TEACHER_STAGE, "--t-epochs", "5", "--t-milestones", "3"]),
    (
        "hssakd",
        ("resnet20", "resnet8"),
        "",
        [*RESNET8_RECIPE, *TEACHER_STAGE, "--teacher-epochs", "5", "--teacher-milestones", "3"],
    ),
]


def presets():
    found = published_presets()
    found["cifar100-all"] = [
        point for name, points in sorted(found.items()) for point in points if point[2] == "cifar100"
    ]
    found["cpu-demo"] = [(method, pair, "cifar10", tag, flags) for method, pair, tag, flags in CPU_DEMO]
    return found


def build_runs(points, seeds, extra_flags):
    """The runs of a grid, seeds inner. A point tagged "teacher" is trained once (first seed): its last.pth is
    the TEACHER_RUN of the points after it."""
    runs, names, teacher_file = [], set(), None
    for method, pair, dataset, tag, variant in points:
        flags, models = grid_point(method, pair, dataset, tag, variant)
        if TEACHER_RUN in flags and teacher_file is None:
            raise SweepError(f"a {method} point names the teacher run, but no point tagged 'teacher' comes first")
        flags = [teacher_file if token == TEACHER_RUN else token for token in flags]
        for seed in seeds[:1] if tag == "teacher" else seeds:
            name = run_name(method, tag, models, dataset, seed, extra_flags)
            if tag == "teacher":
                teacher_file = teacher_file_of(name)
            if name not in names:
                names.add(name)
                runs.append(Run(method, [*flags, *extra_flags], seed, name))
    return runs


def teacher_file_of(name):
    """The checkpoint a grid run leaves, as a flag value (OUTPUT_DIR is filled in when a command is made)."""
    return f"{OUTPUT_DIR}/{name}/last.pth"


# ---- shared teacher stages: trained first, by one run each ----

# What a cached CE teacher depends on (common.teacher_cache_path, common.train_teacher).
TEACHER_FLAGS = ("--dataset", "--teacher", "--train-subset", "--ce-teacher-epochs", "--normalize", "--amp")


def flag_values(flags, names):
    """{flag: value} of `names` in a flag list; a flag given without a value counts as "true"."""
    values = {}
    for position, token in enumerate(flags):
        name, equals, value = token.partition("=")
        if name in names:
            following = flags[position + 1] if position + 1 < len(flags) else ""
            values[name] = value if equals else ("true" if following.startswith("--") or not following else following)
    return values


def stage_keys(run):
    """(CE-teacher key, teacher-stage key) of a run: runs with equal keys share that cached stage; None where a
    run needs none. A teacher given by --teacher-path is keyed by its file (a grid run may make it); SSKD's
    head and HSAKD's stage 1 depend on every flag of the run except the student."""
    if run.method not in DISTILLATION:
        return None, None
    given = flag_values(run.flags, ("--teacher-path",)).get("--teacher-path")
    teacher = "file " + given if given else json.dumps(sorted(flag_values(run.flags, TEACHER_FLAGS).items()))
    if run.method == "kd":
        return teacher, None
    student_at = run.flags.index("--student")
    return teacher, json.dumps([run.method, run.flags[:student_at] + run.flags[student_at + 2 :]])


def stage_leaders(runs):
    """{key: the run that makes that stage}: the unfinished grid run whose last.pth is a --teacher-path, else
    the first unfinished run that needs the stage (it trains it); runs that need a stage start after its
    leader, so no device slot waits on a cache lock while one run trains a teacher."""
    makers = {"file " + teacher_file_of(run.name): run for run in runs if run.status != "skipped"}
    leaders = {}
    for run in runs:
        for key in stage_keys(run):
            if key in makers:
                leaders[key] = makers[key]
            elif key is not None and not key.startswith("file ") and run.status != "skipped":
                leaders.setdefault(key, run)
    return leaders


def ready(run, leaders):
    """Whether every shared stage the run needs is trained (its leader ended), or is trained by this run."""
    needed = [leaders.get(key) for key in stage_keys(run) if key is not None]
    return all(leader in (None, run) or leader.status in ("done", "failed") for leader in needed)


# ---- running ----


def threads_per_run(devices, jobs_per_device, nproc=1):
    """CPU threads of each process: the cores divided between all concurrent processes, at least one."""
    return max(1, (os.cpu_count() or 1) // (len(devices) * jobs_per_device * (nproc if devices == ["cpu"] else 1)))


def device_groups(devices, nproc):
    """The devices of each run: one device, or with --nproc-per-run N, N GPUs per run (or N CPU ranks)."""
    if nproc == 1 or devices == ["cpu"]:
        return [[device] for device in devices]
    if len(devices) % nproc or "cpu" in devices:
        raise SweepError(f"--nproc-per-run {nproc} needs GPUs in groups of {nproc}; --devices has {devices}")
    return [devices[start : start + nproc] for start in range(0, len(devices), nproc)]


def launch_settings(group, nproc):
    """(--device flag value, CUDA_VISIBLE_DEVICES or None) for a run on `group`: a torchrun job sees only its
    GPUs, and each rank takes cuda:<LOCAL_RANK> of them."""
    if group == ["cpu"]:
        return (None, None) if nproc == 1 else ("cpu", None)
    if nproc == 1:
        return group[0], None
    return "cuda", ",".join(device.partition(":")[2] or "0" for device in group)


class Status:
    """One live line: done / running / failed / left (skipped), and an ETA from the runs finished so far."""

    def __init__(self, runs, slots):
        self.runs, self.slots, self.start, self.last = runs, slots, time.time(), ""
        self.tty = sys.stdout.isatty()

    def line(self):
        count = lambda status: sum(run.status == status for run in self.runs)
        finished = [run.seconds for run in self.runs if run.status in ("done", "failed") and run.seconds]
        left, running = count("left"), count("running")
        eta = "?"
        if finished:
            per_run = sum(finished) / len(finished)
            eta = common.format_seconds(per_run * (left + running / 2) / self.slots)
        return (
            f"[sweep] done {count('done')} | running {running} | failed {count('failed')} | left {left}"
            f" | skipped {count('skipped')} | elapsed {common.format_seconds(time.time() - self.start)} | eta {eta}"
        )

    def show(self, force=False):
        """On a terminal the line is redrawn in place; in a log file a new line is written only when a
        run starts, ends or fails (or once a minute), not for every tick of the clock."""
        line = self.line()
        counts = line.split(" | elapsed")[0] + f" {int(time.time() - self.start) // 60}"
        if force or (self.tty and line != self.last) or (not self.tty and counts != self.last):
            print(("\r" + line.ljust(110)) if self.tty else line, end="" if self.tty else "\n", flush=True)
            self.last = line if self.tty else counts

    def say(self, message):
        print(("\r" + " " * 110 + "\r") if self.tty else "", end="")
        print(message, flush=True)
        self.show(force=True)


def run_grid(runs, output_dir, devices, jobs_per_device, poll=0.5, nproc=1):
    """Run everything not finished, keeping jobs_per_device runs going on each device (each device group, with
    nproc > 1). Returns the runs."""
    output_dir, logs = Path(output_dir), Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for run in runs:
        if (output_dir / run.name / "summary.json").exists():
            run.status = "skipped"
    slots = [tuple(group) for group in device_groups(devices, nproc) for _ in range(jobs_per_device)]
    free = list(slots)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    threads = str(threads_per_run(devices, jobs_per_device, nproc))
    environment.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    leaders = stage_leaders(runs)
    status = Status(runs, len(slots))
    status.show(force=True)
    try:
        while any(run.status in ("left", "running") for run in runs):
            for run in runs:
                if run.status == "running" and run.process.poll() is not None:
                    run.seconds, run.status = (
                        time.time() - run.started,
                        "done" if run.process.returncode == 0 else "failed",
                    )
                    free.append(run.extra["device"])
                    run.extra["log_file"].close()
                    if run.status == "failed":
                        status.say(f"failed: {run.name} (exit {run.process.returncode}); log: {run.log}")
            for run in runs:
                if run.status == "left" and free and ready(run, leaders):
                    device = free.pop(0)
                    resume = (output_dir / run.name / "last.pth").exists()
                    device_flag, visible = launch_settings(list(device), nproc)
                    command = run.command(output_dir, device_flag, resume, nproc)
                    run.log = logs / f"{run.name}.log"
                    log_file = open(run.log, "a")
                    log_file.write(f"+ {shlex.join(command)}\n")
                    log_file.flush()
                    run.process = subprocess.Popen(
                        command,
                        env={**environment, **({"CUDA_VISIBLE_DEVICES": visible} if visible else {})},
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        preexec_fn=common.die_with_parent(os.getpid()),
                    )
                    run.status, run.started, run.extra = (
                        "running",
                        time.time(),
                        {"device": device, "log_file": log_file},
                    )
            status.show()
            time.sleep(poll)
    except KeyboardInterrupt:
        for run in runs:
            if run.status == "running":
                run.process.send_signal(signal.SIGINT)  # each run keeps its finished epochs
        for run in runs:
            if run.status == "running":
                run.process.wait()
        status.say("interrupted: rerun the same command to continue (finished runs are skipped, the others resume)")
        raise SystemExit(130)
    status.show(force=True)
    if status.tty:
        print()
    return runs


# ---- SLURM ----


def slurm_script(runs, output_dir, throttle=None, job_name="kd-sweep", nproc=1):
    """A SLURM array job, one index per run, with the same commands and the same skip/resume rules. Nothing
    in it names the machine that wrote it: it runs from the folder it is submitted from (the checkout), with
    $PYTHON (default: python), and writes under OUTPUT_DIR as given."""
    array = f"0-{len(runs) - 1}" + (f"%{throttle}" if throttle else "")
    lines = [
        "#!/bin/bash",
        "# Written by tools/sweep.py: one array index per run of the grid. Submit it from the checkout.",
        f"#SBATCH --array={array}",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --gres=gpu:{nproc}",
        f"#SBATCH --cpus-per-task={4 * nproc}",
        f"#SBATCH --output={Path(output_dir) / 'logs'}/slurm_%A_%a.log",
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-$PWD}"',
        'PYTHON="${PYTHON:-python}"',
        f"OUT={shlex.quote(str(output_dir))}",
        'mkdir -p "$OUT/logs"',
        "NAMES=(",
    ]
    lines += [f"  {shlex.quote(run.name)}" for run in runs] + [")", "COMMANDS=("]
    lines += [f"  {shlex.quote(shlex.join(portable_command(run, output_dir, nproc)))}" for run in runs] + [")"]
    lines += [
        "name=${NAMES[$SLURM_ARRAY_TASK_ID]}",
        'if [ -f "$OUT/$name/summary.json" ]; then echo "$name is finished; skipping"; exit 0; fi',
        'resume=""',
        'if [ -f "$OUT/$name/last.pth" ]; then resume="--resume"; fi',
        'eval "$PYTHON ${COMMANDS[$SLURM_ARRAY_TASK_ID]} $resume"',
    ]
    return "\n".join(lines) + "\n"


def portable_command(run, output_dir, nproc=1):
    """The run's command without the interpreter and with the script relative to the checkout."""
    command = run.command(output_dir, "cuda" if nproc > 1 else None, nproc=nproc)[1:]
    script = next(index for index, token in enumerate(command) if token.endswith(f"{run.method}.py"))
    return [*command[:script], str(Path(command[script]).relative_to(REPO)), *command[script + 1 :]]


def teacher_phases(runs):
    """The runs that make shared stages, in phases: a phase's runs need only stages made in earlier phases
    (a grid teacher run comes before the SSKD head and HSAKD stage 1 trained on it)."""
    leaders = stage_leaders(runs)
    left, phases, made = list({id(run): run for run in leaders.values()}.values()), [], set()
    while left:
        phase = [run for run in left if all(leaders.get(key) in (None, run) or key in made for key in stage_keys(run))]
        made.update(key for key, leader in leaders.items() if leader in phase)
        left = [run for run in left if run not in phase]
        phases.append(phase)
    return phases


def write_slurm(runs, path, output_dir, throttle, nproc=1):
    """The grid as SLURM array jobs. With shared teacher stages: PATH.teachers.sbatch (then .teachers2.sbatch
    ...) runs one run per stage (which trains it), each phase after the one it needs, and PATH runs the whole
    grid last (afterok; the teacher runs are then finished and skipped). Returns the submit command."""
    path = Path(path)
    path.write_text(slurm_script(runs, output_dir, throttle, nproc=nproc))
    submit, dependency = [], ""
    for number, phase in enumerate(teacher_phases(runs), 1):
        teachers = path.with_name(path.stem + f".teachers{number if number > 1 else ''}.sbatch")
        name = f"kd-sweep-teachers{number}"
        teachers.write_text(slurm_script(phase, output_dir, throttle, job_name=name, nproc=nproc))
        submit.append(f"jid=$(sbatch --parsable {dependency}{shlex.quote(str(teachers))})")
        dependency = "--dependency=afterok:$jid "
    return " && ".join([*submit, f"sbatch {dependency}{shlex.quote(str(path))}"])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", help="a named grid: " + ", ".join(sorted(presets())))
    parser.add_argument("--methods", nargs="+", help=f"methods of an explicit grid: {', '.join(METHODS)}")
    parser.add_argument(
        "--pairs", nargs="+", default=[], help="TEACHER:STUDENT pairs; teacher-free methods also take a bare MODEL"
    )
    parser.add_argument(
        "--dataset",
        default="cifar100",
        choices=(*common.DATASETS, *common.FOLDER_DATASETS),
        help="for an explicit grid",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 1 2 3)")
    parser.add_argument("--output-dir", default="runs", help="parent folder of the run folders and logs/")
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu, or cuda:0,cuda:1,...")
    parser.add_argument("--jobs-per-device", type=int, default=1, help="runs kept going at once on each device")
    parser.add_argument(
        "--nproc-per-run", type=int, default=1, metavar="N", help="each run under torchrun on N devices (DDP)"
    )
    parser.add_argument(
        "--slurm", metavar="FILE", help="write SLURM array-job scripts (FILE, and the teachers') instead"
    )
    parser.add_argument("--slurm-throttle", type=int, metavar="N", help="at most N array tasks at once (%%N)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    options = parser.parse_args(argv)
    try:
        runs = runs_from_options(options, extra_flags)
        devices = [device.strip() for device in options.devices.split(",") if device.strip()]
        if options.jobs_per_device < 1 or options.nproc_per_run < 1 or not devices:
            raise SweepError("--jobs-per-device and --nproc-per-run must be at least 1; --devices must name a device")
        for device in devices:
            if device != "cpu" and not device.startswith("cuda"):
                raise SweepError(f"unknown device {device!r}: use cpu or cuda:N")
        if not options.slurm:
            device_groups(devices, options.nproc_per_run)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if options.slurm:
        if options.slurm_throttle is not None and options.slurm_throttle < 1:
            print("error: --slurm-throttle must be at least 1", file=sys.stderr)
            return 2
        (Path(options.output_dir) / "logs").mkdir(parents=True, exist_ok=True)  # SLURM opens its logs there
        submit = write_slurm(
            runs, options.slurm, Path(options.output_dir), options.slurm_throttle, options.nproc_per_run
        )
        print(f"wrote {options.slurm}: {len(runs)} array tasks; submit from this checkout with: {submit}")
        return 0
    output_dir = Path(options.output_dir).resolve()
    if options.dry_run:
        for run in runs:
            done = (output_dir / run.name / "summary.json").exists()
            resume = (output_dir / run.name / "last.pth").exists()
            nproc = options.nproc_per_run
            device = launch_settings(device_groups(devices, nproc)[0], nproc)[0] if nproc > 1 else None
            command = run.command(output_dir, device, resume and not done, nproc)
            print(("# finished: " if done else "") + shlex.join(command))
        return 0
    finished = run_grid(runs, output_dir, devices, options.jobs_per_device, nproc=options.nproc_per_run)
    failed = [run for run in finished if run.status == "failed"]
    print(
        f"{len(finished) - len(failed)} of {len(finished)} runs finished; "
        f"aggregate with: python tools/report.py {options.output_dir}"
    )
    for run in failed:
        print(f"failed: {run.name}; log: {run.log}")
    return 1 if failed else 0


def runs_from_options(options, extra_flags):
    if bool(options.preset) == bool(options.methods):
        raise SweepError("give either --preset NAME or --methods ... --pairs ...")
    if any(flag == "--dataset" or flag.startswith("--dataset=") for flag in extra_flags):
        where = "the preset fixes it" if options.preset else "give it as the sweep's own --dataset, before --"
        raise SweepError(f"--dataset after -- would train one dataset under run names of another: {where}")
    if options.preset:
        known = presets()
        if options.preset not in known:
            raise SweepError(f"unknown preset {options.preset!r}; choose one of: {', '.join(sorted(known))}")
        return build_runs(known[options.preset], options.seeds or [1, 2, 3], extra_flags)
    unknown = [method for method in options.methods if method not in METHODS]
    if unknown:
        raise SweepError(f"unknown method {unknown[0]!r}; choose from: {', '.join(METHODS)}")
    if not options.pairs:
        raise SweepError("an explicit grid needs --pairs TEACHER:STUDENT (teacher-free methods train the student)")
    pairs = [parse_pair(text) for text in options.pairs]
    points = [(method, pair, options.dataset, "", []) for method in options.methods for pair in pairs]
    return build_runs(points, options.seeds or [1, 2, 3], extra_flags)


if __name__ == "__main__":
    sys.exit(main())
