"""Infrastructure in common.py: data loading, on-device augmentation, rotations, schedule, argument
parsing and checkpoint loading."""

import dataclasses
import os
import pickle
import sys
from typing import Literal, Optional, Tuple

import pytest
import torch
import torchvision.transforms.functional as TF

import common


def test_load_cifar_reads_the_official_pickle_layout(cifar_dir):
    folder = cifar_dir / "cifar-10-batches-py"
    expected_labels = []
    for k in range(1, 6):
        with open(folder / f"data_batch_{k}", "rb") as f:
            expected_labels += pickle.load(f, encoding="latin1")["labels"]
    with open(folder / "data_batch_1", "rb") as f:
        first_row = pickle.load(f, encoding="latin1")["data"][0]
    train_images, train_labels, test_images, test_labels = common.load_cifar("cifar10", cifar_dir)
    assert train_images.shape == (320, 3, 32, 32) and train_images.dtype == torch.uint8
    assert test_images.shape == (200, 3, 32, 32) and len(test_labels) == 200
    assert train_labels.tolist() == expected_labels  # batches concatenated in order 1..5
    assert torch.equal(train_images[0].flatten(), torch.from_numpy(first_row))  # CHW row layout
    _, labels100, _, _ = common.load_cifar("cifar100", cifar_dir)
    assert labels100.max() < 100 and labels100.max() >= 10  # fine labels, not coarse


def test_missing_data_without_download_names_the_files(tmp_path, monkeypatch):
    def offline(dataset, data_dir):
        raise OSError("no network")

    monkeypatch.setattr(common, "_download", offline)
    with pytest.raises(common.ConfigError, match=r"cifar-100-python.*train.*no network"):
        common.load_cifar("cifar100", tmp_path / "nothing_here")


def test_crop_matches_torchvision_pad_then_crop():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    top = torch.tensor([0, 8, 3, 4, 8, 1])
    left = torch.tensor([0, 8, 5, 0, 2, 7])
    cropped = common.crop(images, top, left, padding=4)
    for i in range(6):
        reference = TF.crop(TF.pad(images[i], [4]), int(top[i]), int(left[i]), 32, 32)  # RandomCrop(32, padding=4)
        assert torch.equal(cropped[i], reference)


def test_hflip_mirrors_only_selected_images():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    flipped = common.hflip(images, torch.tensor([True, False]))
    assert torch.equal(flipped[0], TF.hflip(images[0]))
    assert torch.equal(flipped[1], images[1])


def test_standard_augment_gives_a_pad4_crop_or_its_mirror():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    augmented = common.standard_augment(images, torch.Generator().manual_seed(2))
    for i in range(16):
        padded = TF.pad(images[i], [4])
        candidates = [padded[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(augmented[i], c) or torch.equal(augmented[i], c.flip(2)) for c in candidates)


def test_train_batches_visit_every_image_once_with_its_own_label(cifar_dir):
    args = argparse_namespace(dataset="cifar10", data_dir=cifar_dir)
    data = common.load_data(args, torch.device("cpu"))
    seen, sizes = [], []
    for images, labels, indices in common.train_batches(data, 64, common.epoch_generator(1, 0), augment=False):
        assert torch.equal(labels, data.train_labels[indices])
        assert torch.allclose(images, data.normalize(data.train_images[indices]))
        seen += indices.tolist()
        sizes.append(len(labels))
    assert sorted(seen) == list(range(320)) and sizes == [64] * 5  # drop_last=False, shuffled
    assert seen != list(range(320))


def test_normalize_is_totensor_then_normalize():
    data = common.CifarData(
        *(torch.empty(0),) * 4,
        10,
        torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1),
        torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1),
    )
    image = torch.tensor([[[[0]], [[255]], [[51]]]], dtype=torch.uint8)
    expected = torch.tensor([(0 - 0.5) / 0.2, (1 - 0.4) / 0.25, (0.2 - 0.3) / 0.5])
    assert torch.allclose(data.normalize(image).flatten(), expected)
    # in place, yet bit for bit the out-of-place formula, and a float input is left as it was
    batch = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(data.normalize(batch), (batch.float() / 255.0 - data.mean) / data.std)
    floats = batch.float()
    data.normalize(floats)
    assert torch.equal(floats, batch.float())


def test_epoch_generator_is_a_function_of_seed_and_epoch():
    first = torch.randperm(100, generator=common.epoch_generator(3, 7))
    assert torch.equal(first, torch.randperm(100, generator=common.epoch_generator(3, 7)))
    assert not torch.equal(first, torch.randperm(100, generator=common.epoch_generator(3, 8)))


def test_rotations_interleave_samples_and_joint_labels_follow():
    images = torch.randn(3, 3, 8, 8)
    rotated = common.rotations(images)
    assert rotated.shape == (12, 3, 8, 8)
    for i in range(3):
        for k in range(4):
            assert torch.equal(rotated[4 * i + k], torch.rot90(images[i], k, dims=(1, 2)))
    assert common.rotation_joint_labels(torch.tensor([2, 0])).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]
    # counter-clockwise as displayed: the top-right pixel moves to the top-left
    pixel = torch.zeros(1, 1, 2, 2)
    pixel[0, 0, 0, 1] = 1
    assert common.rotations(pixel)[1, 0, 0, 0] == 1


def test_lr_schedule_follows_the_kd_recipe():
    lrs = [common.lr_at_epoch(e, 0.05, (150, 180, 210), 0.1) for e in range(240)]
    assert lrs[0] == lrs[149] == 0.05
    assert lrs[150] == pytest.approx(0.005) and lrs[179] == pytest.approx(0.005)
    assert lrs[180] == pytest.approx(0.0005) and lrs[209] == pytest.approx(0.0005)
    assert lrs[210] == pytest.approx(0.00005) and lrs[239] == pytest.approx(0.00005)
    assert common.default_lr("MobileNetV2") == common.default_lr("ShuffleV1") == common.default_lr("ShuffleV2") == 0.01
    assert common.default_lr("resnet20") == 0.05 and common.default_lr("ShuffleV2", 0.2) == 0.2


@dataclasses.dataclass
class ToyArgs:
    name: Literal["a", "b"] = "a"
    """which letter"""
    milestones: Tuple[int, ...] = (150, 180)
    """decay epochs"""
    flag: bool = False
    """a switch"""
    rate: Optional[float] = None
    """an optional number"""


def test_parse_args_builds_the_command_line_from_the_dataclass(capsys):
    assert common.parse_args(ToyArgs, []) == ToyArgs()
    parsed = common.parse_args(ToyArgs, ["--name", "b", "--milestones", "1,2", "3", "--flag", "--rate", "0.5"])
    assert parsed == ToyArgs("b", (1, 2, 3), True, 0.5)
    assert common.parse_args(ToyArgs, ["--flag", "false"]).flag is False
    with pytest.raises(SystemExit):
        common.parse_args(ToyArgs, ["--help"])
    help_text = capsys.readouterr().out
    assert "which letter" in help_text and "decay epochs" in help_text and "an optional number" in help_text
    with pytest.raises(SystemExit):
        common.parse_args(ToyArgs, ["--name", "c"])


def test_kd_args_help_documents_every_field():
    import kd

    docs = common._field_docs(kd.Args)
    assert set(docs) == {field.name for field in dataclasses.fields(kd.Args)}
    assert all(text.strip() for text in docs.values())


def argparse_namespace(**overrides):
    values = dict(dataset="cifar100", data_dir="data", normalize="repdistiller", train_subset=None, amp=False)
    values.update(overrides)
    return type("Namespace", (), values)()


@pytest.mark.parametrize("wrap", ["model", "state_dict", "net"])
def test_teacher_files_of_every_official_format_load(tmp_path, wrap):
    source = common.build_model("resnet8", 100)
    state = {"module." + name: tensor for name, tensor in source.state_dict().items()}  # as saved under DDP
    torch.save({wrap: state, "epoch": 240}, tmp_path / "teacher.pth")
    loaded = common.load_model_file("resnet8", 100, tmp_path / "teacher.pth")
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_sskd_style_mobilenetv2_classifier_loads_through_the_mapping(tmp_path):
    source = common.build_model("MobileNetV2", 100)
    state = source.state_dict()
    state["classifier.weight"] = state.pop("classifier.0.weight")  # SSKD/HSAKD spell it as a bare Linear
    state["classifier.bias"] = state.pop("classifier.0.bias")
    torch.save({"state_dict": state}, tmp_path / "mobilenet.pth")
    loaded = common.load_model_file("MobileNetV2", 100, tmp_path / "mobilenet.pth")
    assert torch.equal(loaded.classifier[0].weight, source.classifier[0].weight)


def test_loading_a_checkpoint_does_not_shift_the_seeded_stream(tmp_path):
    torch.save({"model": common.build_model("resnet8", 10).state_dict()}, tmp_path / "t.pth")
    torch.manual_seed(0)
    common.load_model_file("resnet8", 10, tmp_path / "t.pth")
    after_load = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_load, torch.rand(3))  # a student built next gets the same init as without a teacher


@pytest.mark.parametrize("shape", [(8, 64, 8, 8), (8, 1280, 2, 2), (4, 2048, 4, 4), (3, 464, 4, 4)])
def test_global_average_is_adaptive_avg_pool_bit_for_bit_forward_and_backward(shape):
    """common.global_average replaces adaptive_avg_pool2d(x, 1) (deterministic CUDA backward); on the CPU
    it must not change a single bit of any run."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator, requires_grad=True)
    upstream = torch.randn(shape[0], shape[1], generator=generator)
    reference = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
    reference.backward(upstream)
    reference_grad, x.grad = x.grad.clone(), None
    ours = common.global_average(x)
    ours.backward(upstream)
    assert torch.equal(ours, reference) and torch.equal(x.grad, reference_grad)


def test_check_finite_names_the_loss_and_gives_the_stage_its_own_advice(tmp_path):
    common.check_finite({"loss/ce": 1.0, "test/top1": float("nan")}, 0, tmp_path)  # only losses are checked
    with pytest.raises(FloatingPointError) as default:
        common.check_finite({"loss/ce": 1.0, "loss/kd": float("inf")}, 2, tmp_path)
    assert str(default.value).startswith("loss/kd became non-finite in epoch 3.")
    assert str(tmp_path) in str(default.value) and "--learning-rate" in str(default.value)
    with pytest.raises(FloatingPointError) as own:
        common.check_finite({"loss/head": float("nan")}, 0, tmp_path, "Lower --t-lr.")
    assert str(own.value) == "loss/head became non-finite in epoch 1. Lower --t-lr."


# ---- the cache lock where fcntl locks are missing (Windows) or refused (NFS without locks) ----


def _without_fcntl(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def refuse_fcntl(name, *args, **kwargs):
        if name == "fcntl":
            raise ImportError("no fcntl here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse_fcntl)


def test_without_fcntl_the_cache_lock_is_an_exclusive_lock_file(tmp_path, monkeypatch):
    import socket

    _without_fcntl(monkeypatch)
    held = tmp_path / "stage.pth.lock.held"
    with common.cache_lock(tmp_path / "stage.pth"):
        assert held.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not held.exists()


def test_a_file_system_that_refuses_flock_falls_back_to_the_lock_file(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with common.cache_lock(tmp_path / "stage.pth"):
        assert (tmp_path / "stage.pth.lock.held").exists()
    assert not (tmp_path / "stage.pth.lock.held").exists()


def test_a_lock_file_of_a_dead_process_is_taken_over_and_a_live_one_is_waited_for(tmp_path, monkeypatch):
    import socket
    import subprocess
    import threading
    import time

    _without_fcntl(monkeypatch)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held = tmp_path / "stage.pth.lock.held"
    held.write_text(f"{socket.gethostname()} {dead.pid}")
    with common.cache_lock(tmp_path / "stage.pth"):  # stale: taken over at once
        assert held.read_text().endswith(str(os.getpid()))
    events = []

    def first():
        with common.cache_lock(tmp_path / "stage.pth"):
            events.append("first in")
            time.sleep(1.5)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    while not events:
        time.sleep(0.05)
    with common.cache_lock(tmp_path / "stage.pth"):  # the same process: alive, so it waits
        events.append("second in")
    thread.join()
    assert events == ["first in", "first out", "second in"]
    held.write_text("another-host 1")
    os.utime(held, (time.time() - 400, time.time() - 400))  # no heartbeat for longer than the stale limit
    with common.cache_lock(tmp_path / "stage.pth"):
        assert held.read_text().endswith(str(os.getpid()))


# ---- recipes by dataset (common.per_dataset) ----


def test_imagenet_switches_the_defaults_to_the_recipe_and_a_given_flag_wins(capsys):
    import hssakd
    import kd

    args = common.parse_args(kd.Args, ["--dataset", "imagenet", "--epochs", "3"])
    assert (args.teacher, args.student, args.teacher_path) == (
        "resnet34_imagenet",
        "resnet18_imagenet",
        "torchvision:resnet34_imagenet",
    )
    assert (args.epochs, args.batch_size, args.learning_rate, args.lr_milestones) == (3, 256, 0.1, (30, 60, 90))
    assert (args.weight_decay, args.kd_T, args.ce_weight, args.kd_weight) == (1e-4, 1.0, 0.5, 0.5)
    assert (
        "--dataset imagenet: its recipe's defaults --student resnet18_imagenet --batch-size 256"
        in capsys.readouterr().out
    )
    cifar = common.parse_args(kd.Args, ["--dataset", "cifar10"])
    assert (cifar.epochs, cifar.kd_T, cifar.teacher, cifar.teacher_path) == (240, 4.0, "resnet32x4", None)
    stage = common.parse_args(hssakd.Args, ["--dataset", "imagenet", "--teacher-lr", "0.2"])
    assert (stage.teacher_lr, stage.weight_decay, stage.kd_T) == (0.2, 1e-4, 3.0)


def test_the_recipes_teacher_file_is_left_out_for_another_teacher_but_kept_for_its_own():
    import sskd

    other = common.parse_args(sskd.Args, ["--dataset", "imagenet", "--teacher", "resnet50_imagenet"])
    same = common.parse_args(sskd.Args, ["--dataset", "imagenet", "--teacher", "resnet34_imagenet"])
    assert other.teacher_path is None and same.teacher_path == "torchvision:resnet34_imagenet"
    assert common.KNOWN_CHECKPOINTS["torchvision:resnet34_imagenet"] == common.KNOWN_CHECKPOINTS["torchvision:resnet34"]
    assert (other.rotation_pipeline, other.t_epochs, other.t_milestones, other.ce_weight) == ("gpu", 30, (10, 20), 1.0)


def test_help_gives_each_fields_imagenet_default(capsys):
    import pskd

    with pytest.raises(SystemExit):
        common.parse_args(pskd.Args, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "alpha at the last epoch; alpha_e = alpha_T * (e + 1) / epochs; imagenet: 0.3 (default: 0.8)" in text
