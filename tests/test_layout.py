"""How the method files read side by side: shared fields word for word as in kd.py, one marker form, the run
command at the end of every module docstring, one name per formula, cache names that keep users' caches valid,
and a repository that cites only itself."""

import ast
import dataclasses
import importlib
import inspect
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO

import common

METHOD_FILES = ["baseline", "sskd", "hssakd", "pskd", "css", "lsskd"]
ALL_FILES = ["kd", *METHOD_FILES]
GROUPS = ["Run", "Recipe"]  # the first two group headers of every Args; "Teacher" follows where it exists


def args_layout(module_name):
    """[(group header, [field names])] of a file's Args, in source order (the sections of its --help)."""
    groups = []
    for name, header in common._field_groups(importlib.import_module(module_name).Args).items():
        if not groups or groups[-1][0] != header:
            groups.append((header, []))
        groups[-1][1].append(name)
    return groups


@pytest.mark.parametrize("module_name", METHOD_FILES)
def test_shared_fields_have_kd_help_text_word_for_word_in_kd_order(module_name):
    kd_docs = common._field_docs(importlib.import_module("kd").Args)
    docs = common._field_docs(importlib.import_module(module_name).Args)
    shared = [name for name in docs if name in kd_docs]
    assert len(shared) >= 20, shared  # every file shares the run and recipe fields at least
    for name in shared:
        assert docs[name] == kd_docs[name], f"{module_name}.{name}: {docs[name]!r} != kd.py's {kd_docs[name]!r}"
    assert shared == [name for name in kd_docs if name in docs], "shared fields must keep kd.py's order"


@pytest.mark.parametrize("module_name", ALL_FILES)
def test_args_groups_start_with_run_recipe_then_teacher(module_name):
    layout = args_layout(module_name)
    assert sum(len(fields) for _, fields in layout) == len(
        dataclasses.fields(importlib.import_module(module_name).Args)
    )
    headers = [header for header, _ in layout]
    assert headers[:2] == GROUPS, headers
    kd_groups = dict(args_layout("kd"))
    for header, fields in layout:
        if header in kd_groups:  # a shared group holds only kd.py's fields of that group, plus the networks
            assert set(fields) - set(kd_groups[header]) <= {"model", "model_t", "model_s", "cache_as_teacher"}, fields


MARKER = re.compile(r"^\s*# --- (METHOD: .+|END METHOD) ---$")


@pytest.mark.parametrize("module_name", ["kd", "sskd", "hssakd", "pskd", "css", "lsskd"])
def test_one_marker_form_opened_and_closed_in_turn(module_name):
    lines = (REPO / f"{module_name}.py").read_text().splitlines()
    markers = [line for line in lines if "METHOD" in line and line.strip().startswith("#")]
    assert markers, "no METHOD block"
    for line in markers:
        assert MARKER.match(line), f"not the one marker form: {line!r}"
    opened = [("END" not in line) for line in markers]
    assert opened == [True, False] * (len(markers) // 2), "every METHOD block must close before the next opens"


@pytest.mark.parametrize(
    "path",
    [f"{name}.py" for name in ALL_FILES]
    + ["tools/report.py", "tools/sweep.py", "tools/synthetic_cifar.py", "tools/same_numbers.py"]
    + ["benchmarks/speed_kd.py"]
    + ["benchmarks/speed_methods.py", "benchmarks/concurrent_kd.py", "benchmarks/gpu_check_summary.py"],
)
def test_module_docstring_ends_with_its_run_command(path):
    last = ast.get_docstring(ast.parse((REPO / path).read_text())).strip().splitlines()[-1].strip()
    assert last.startswith((f"Run: python {path}", f"python {path}")), last


@pytest.mark.parametrize("module_name", ["hssakd", "lsskd"])
def test_the_temperature_kl_is_kd_loss_with_kd_py_source(module_name):
    kd_source = inspect.getsource(importlib.import_module("kd").kd_loss)
    assert inspect.getsource(importlib.import_module(module_name).kd_loss) == kd_source


def test_cached_stage_file_names_are_those_of_earlier_releases(tmp_path):
    """Golden names computed with the code before the cache helper was shared (commit 494b7b4): users' caches of
    CE teachers, SSKD heads and HSAKD stage 1 stay valid."""
    sskd, hssakd = importlib.import_module("sskd"), importlib.import_module("hssakd")
    teacher_file = tmp_path / "teacher.pth"
    teacher_file.write_bytes(b"stand-in teacher weights")
    head_args = sskd.Args(teacher="resnet56", student="resnet20", normalize="sskd", checkpoint_dir="ckpt")
    assert sskd.teacher_head_cache_path(head_args, teacher_file).as_posix() == (
        "ckpt/cifar100/resnet56_sskd_head_e60_4fa2ecc6db.pth"
    )
    reduced = dataclasses.replace(
        head_args, t_epochs=30, train_subset=500, normalize="repdistiller", ce_teacher_epochs=2
    )
    assert sskd.teacher_head_cache_path(reduced, teacher_file).name == "resnet56_e2_n500_sskd_head_e30_8f41fa8d1c.pth"
    stage1_args = hssakd.Args(teacher="resnet56", student="resnet20", normalize="repdistiller", checkpoint_dir="ckpt")
    frozen = hssakd.stage1_cache_path(stage1_args, teacher_file)
    assert frozen.name == "teacher_aux_frozen_e100_43b1b9f3.pth"
    joint = hssakd.stage1_cache_path(dataclasses.replace(stage1_args, teacher_mode="joint", train_subset=256), None)
    assert joint.name == "resnet56_n256_aux_joint_e240_066f0e77.pth"
    ce_args = dataclasses.replace(stage1_args, ce_teacher_epochs=3, train_subset=64, normalize="cifar10")
    assert common.teacher_cache_path(ce_args).name == "resnet56_e3_n64_norm-cifar10.pth"


def test_cached_stage_uses_the_given_file_else_the_cache_else_trains_once(tmp_path):
    trained = []

    def train(path):
        trained.append(path)
        path.write_text("stage")

    cache = tmp_path / "stage.pth"
    assert common.cached_stage("given.pth", cache, train) == common.Path("given.pth") and not trained
    assert common.cached_stage(None, cache, train) == cache and trained == [cache]
    assert common.cached_stage(None, cache, train) == cache and trained == [cache]  # cached: not trained again


def test_a_seeded_stage_draws_from_its_own_stream_and_leaves_the_callers(tmp_path):
    drawn = []

    def train(path):
        drawn.append(torch.rand(3))
        path.write_text("stage")

    torch.manual_seed(5)
    common.cached_stage(None, tmp_path / "a.pth", train, seed=0)
    after_stage = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_stage, torch.rand(3))  # the caller's stream is where it was
    torch.manual_seed(0)
    assert torch.equal(drawn[0], torch.rand(3))  # the stage drew from seed 0
    common.cached_stage(None, tmp_path / "b.pth", train, seed=0)
    assert torch.equal(drawn[1], drawn[0])  # the same stage for every caller seed


@pytest.mark.parametrize("module_name", ALL_FILES)
def test_every_number_a_method_takes_has_a_range(module_name):
    args_class = importlib.import_module(module_name).Args
    hints = __import__("typing").get_type_hints(args_class)
    numeric = [
        field.name
        for field in dataclasses.fields(args_class)
        if any(kind in (int, float) or getattr(kind, "__origin__", None) is tuple for kind in (hints[field.name],))
        or str(hints[field.name]) in ("typing.Optional[int]", "typing.Optional[float]")
    ]
    assert numeric and all(name in common.RANGE_OF_FIELD for name in numeric), [
        name for name in numeric if name not in common.RANGE_OF_FIELD
    ]


@pytest.mark.parametrize("module_name", ALL_FILES)
def test_method_files_have_no_lambda_names_and_no_nested_defs(module_name):
    tree = ast.parse((REPO / f"{module_name}.py").read_text())
    lambdas = [
        node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda)
    ]
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    nested = [
        inner.name
        for outer in functions
        for inner in ast.walk(outer)
        if isinstance(inner, ast.FunctionDef) and inner is not outer
    ]
    assert not lambdas and not nested, (lambdas, nested)


def test_stage_digest_reads_files_and_sorted_dicts_in_order(tmp_path):
    import hashlib
    import json

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"abc")
    recipe = {"b": 1, "a": 2}
    expected = hashlib.sha1(b"abc" + json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    assert common.stage_digest(10, weights, recipe) == expected
    assert common.stage_digest(10, recipe, weights) != expected  # the order is part of the name
    assert (
        common.stage_digest(8, recipe, None)
        == hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    )


def test_test_batches_walk_the_test_set_in_order(cifar_dir):
    args = importlib.import_module("kd").Args(dataset="cifar10", data_dir=str(cifar_dir), normalize="cifar10")
    data = common.load_data(args, torch.device("cpu"))
    batches = list(common.test_batches(data, 64))
    assert [len(labels) for _, labels in batches] == [64, 64, 64, 8]
    assert torch.equal(torch.cat([labels for _, labels in batches]), data.test_labels)
    assert torch.equal(torch.cat([images for images, _ in batches]), data.normalize(data.test_images))


FOREIGN_FOLDER = "spec" + "s/"  # a folder the repository does not have, spelled so that this line does not cite it


def test_the_repository_cites_no_folder_it_does_not_have():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = [
        name
        for name in files
        if name.endswith((".py", ".md", ".sh", ".toml", ".txt")) and FOREIGN_FOLDER in (REPO / name).read_text()
    ]
    assert offenders == [], offenders


def test_help_shows_the_args_groups_as_sections():
    result = subprocess.run([sys.executable, str(REPO / "sskd.py"), "--help"], capture_output=True, text=True)
    headers = [
        line[:-1] for line in result.stdout.splitlines() if line and not line.startswith(" ") and line.endswith(":")
    ]
    assert headers == ["options", "Run", "Recipe", "Teacher", "SSKD", "SSKD stage 2: the teacher's projection head"]
