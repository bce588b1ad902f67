"""pskd.py: alpha ramp, targets and soft cross-entropy against hand-computed values, the prediction
buffer (indexing by sample id, epoch 0, write timing, resume), PS-KD's PreActResNet18, the
calibration metrics, and end-to-end runs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ZOO_REFERENCE, run_script

import common
from pskd import (
    MODEL_ALIASES,
    calibration_error,
    evaluate_calibrated,
    progressive_targets,
    pskd_alpha,
    read_targets,
    record_predictions,
    soft_cross_entropy,
)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_run(run_dir):
    return torch.load(run_dir / "last.pth", weights_only=False)


# ---- alpha, targets, loss ----


def test_alpha_ramps_linearly_to_alpha_T_at_the_last_epoch():
    assert pskd_alpha(0, 300, 0.8) == pytest.approx(0.8 / 300)
    assert pskd_alpha(149, 300, 0.8) == pytest.approx(0.4)
    assert pskd_alpha(299, 300, 0.8) == pytest.approx(0.8)
    assert pskd_alpha(0, 2, 0.8) == pytest.approx(0.4) and pskd_alpha(1, 2, 0.8) == pytest.approx(0.8)


def test_progressive_targets_golden_value():
    # (1 - 0.25) * onehot + 0.25 * P, by hand.
    past = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    targets = progressive_targets(torch.tensor([1, 0]), past, 0.25)
    torch.testing.assert_close(targets, torch.tensor([[0.05, 0.875, 0.075], [0.9, 0.025, 0.075]]))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(2))


def test_epoch_zero_targets_are_exactly_one_hot_whatever_the_buffer_holds():
    predictions = torch.rand(6, 4)  # not a prediction: epoch 0 must ignore it
    untouched = predictions[[0, 2, 4]].clone()
    labels, sample_ids = torch.tensor([3, 0, 2]), torch.tensor([5, 1, 3])
    for alpha in (0.8 / 300, 0.3, 0.8):
        targets = read_targets(predictions, sample_ids, labels, alpha, first_epoch=True)
        assert torch.equal(targets, F.one_hot(labels, 4).float())  # exact, not approximately
    assert torch.equal(predictions[sample_ids], F.one_hot(labels, 4).float())
    assert torch.equal(predictions[[0, 2, 4]], untouched)


def test_later_epochs_mix_the_stored_rows_in():
    predictions = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.5, 0.5]])
    targets = read_targets(predictions, torch.tensor([2, 0]), torch.tensor([0, 0]), 0.5, first_epoch=False)
    torch.testing.assert_close(targets, torch.tensor([[0.75, 0.25], [0.55, 0.45]]))


def test_soft_cross_entropy_golden_value():
    # Row 1: uniform softmax over 2 classes, -log(1/2) whatever the target. Row 2: softmax(ln 3, 0) =
    # (3/4, 1/4) with a one-hot target: -log(3/4). Mean over the 2 rows.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    targets = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_soft_cross_entropy_is_cross_entropy_for_one_hot_targets_and_its_gradient_is_p_minus_target():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 7, generator=generator) * 3).requires_grad_()
    labels = torch.tensor([0, 6, 3, 3, 1])
    one_hot = F.one_hot(labels, 7).float()
    assert soft_cross_entropy(logits, one_hot).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    # Derived gradient (docs/pskd.md): (softmax - target) / B for the soft target too.
    targets = progressive_targets(labels, F.softmax(torch.randn(5, 7, generator=generator), dim=1), 0.6)
    soft_cross_entropy(logits, targets).backward()
    torch.testing.assert_close(logits.grad, (F.softmax(logits.detach(), dim=1) - targets) / 5)


# ---- the buffer ----


def encoded_data(num_images=10, num_classes=4):
    """Images whose pixel value encodes their dataset index, so a prediction tells which image it saw."""
    images = (torch.arange(num_images, dtype=torch.uint8) * 20)[:, None, None, None].expand(-1, 3, 32, 32).clone()
    labels = torch.arange(num_images) % num_classes
    return common.CifarData(
        images, labels, images, labels, num_classes, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    )


def image_dependent_logits(images, num_classes=4):
    return images.mean(dim=(1, 2, 3))[:, None] * torch.arange(1.0, num_classes + 1)  # [B, C]


def test_buffer_rows_follow_sample_ids_whatever_the_shuffle_order():
    data = encoded_data()
    buffers, first_batches = [], []
    for seed in (0, 1):
        predictions = torch.zeros(10, 4)
        batches = list(common.train_batches(data, 3, torch.Generator().manual_seed(seed), augment=False))
        for images, labels, sample_ids in batches:
            record_predictions(predictions, sample_ids, image_dependent_logits(images))
        buffers.append(predictions)
        first_batches.append(batches[0][2].tolist())
    assert first_batches[0] != first_batches[1]  # the two epochs really visit the samples in other orders
    assert torch.equal(buffers[0], buffers[1])
    expected = F.softmax(image_dependent_logits(data.normalize(data.train_images)), dim=1)
    torch.testing.assert_close(buffers[0], expected)
    # Reading back: a batch in any order gets the rows of its own samples.
    sample_ids = torch.tensor([7, 2, 9])
    targets = read_targets(buffers[0], sample_ids, data.train_labels[sample_ids], 0.5, first_epoch=False)
    reversed_targets = read_targets(
        buffers[0], sample_ids.flip(0), data.train_labels[sample_ids.flip(0)], 0.5, first_epoch=False
    )
    assert torch.equal(targets, reversed_targets.flip(0))
    torch.testing.assert_close(targets, progressive_targets(data.train_labels[sample_ids], expected[sample_ids], 0.5))


def test_recorded_predictions_are_detached_probabilities_in_the_buffer_dtype():
    logits = torch.randn(3, 5, requires_grad=True)
    predictions = torch.zeros(8, 5, dtype=torch.float16)  # lsskd.py's fp16 buffers go through the same code
    record_predictions(predictions, torch.tensor([6, 0, 3]), logits)
    assert not predictions.requires_grad and predictions.dtype == torch.float16
    torch.testing.assert_close(predictions[[6, 0, 3]].float(), F.softmax(logits.detach(), dim=1), atol=1e-3, rtol=0)
    assert torch.count_nonzero(predictions[[1, 2, 4, 5, 7]]) == 0


def test_restoring_a_buffer_of_another_run_says_what_to_do():
    predictions = torch.zeros(4, 3)
    with pytest.raises(common.ConfigError, match="--train-subset"):
        common._restore(predictions, torch.zeros(5, 3), "predictions", "runs/x/last.pth")
    with pytest.raises(common.ConfigError, match="holds predictions none"):
        common._restore(predictions, None, "predictions", "runs/x/last.pth")
    common._restore(predictions, torch.full((4, 3), 0.5), "predictions", "runs/x/last.pth")
    assert torch.equal(predictions, torch.full((4, 3), 0.5))
    common._restore(None, torch.ones(2), "predictions", "runs/x/last.pth")  # --pskd false: nothing to restore


# ---- PS-KD's PreActResNet18 (PS-KD's models/preact_resnet.py) ----


@pytest.fixture(scope="module")
def preact18():
    torch.manual_seed(0)
    return common.build_model("PreActResNet18", 100).eval()


def test_preact_resnet18_keys_shapes_and_parameter_count_equal_reference(preact18):
    reference = ZOO_REFERENCE["PreActResNet18"]
    assert {key: list(tensor.shape) for key, tensor in preact18.state_dict().items()} == reference["state_dict"]
    assert sum(p.numel() for p in preact18.parameters()) == reference["params"] == 11_217_444


def test_preact_resnet18_is_what_the_issue_calls_resnet18():
    assert MODEL_ALIASES["resnet18"] == MODEL_ALIASES["ResNet18"] == "PreActResNet18"
    assert "resnet18" not in common.MODEL_NAMES  # the zoo name stays unambiguous


def test_preact_resnet18_feature_shapes_and_no_final_bn_relu(preact18):
    with torch.no_grad():
        feats, logits = preact18(torch.randn(2, 3, 32, 32), is_feat=True)
    assert [list(f.shape) for f in feats] == [
        [2, 64, 32, 32],
        [2, 64, 32, 32],
        [2, 128, 16, 16],
        [2, 256, 8, 8],
        [2, 512, 4, 4],
        [2, 512],
    ]
    assert feats[-1].shape[1] == preact18.feat_dim and list(logits.shape) == [2, 100]
    assert (feats[-2] < 0).any()  # last stage output goes to the pooling without a ReLU
    torch.testing.assert_close(feats[-1], feats[-2].mean(dim=(2, 3)))


def test_preact_block_identity_path_takes_the_preactivated_input():
    block = common.PskdPreActBlock(8, 8, 1).eval()
    torch.nn.init.zeros_(block.conv2.weight)  # no residual: the block returns its shortcut
    with torch.no_grad():
        block.bn1.bias.fill_(0.3)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(block.bn1(x)))
    projection = common.PskdPreActBlock(8, 16, 2)
    assert [type(m) for m in projection.shortcut] == [torch.nn.Conv2d]  # 1x1 conv, no BN


def test_preact_resnet18_keeps_pytorch_default_init(preact18):
    # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for convs and the Linear; a He init
    # (as in the RepDistiller zoo) would exceed this bound.
    for name, module in preact18.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = module.weight[0].numel()
            assert module.weight.abs().max().item() <= 1 / math.sqrt(fan_in) + 1e-7, name


def test_official_pskd_checkpoint_loads(preact18, tmp_path):
    # checkpoint_best.pth of the official code: {"net": state_dict} with DDP's "module." prefix.
    path = tmp_path / "checkpoint_best.pth"
    torch.save(
        {
            "net": {"module." + key: value for key, value in preact18.state_dict().items()},
            "epoch": 299,
            "alpha_t": 0.8,
            "prev_predictions": torch.zeros(2, 100),
        },
        path,
    )
    loaded = common.load_model_file("PreActResNet18", 100, path)
    for key, value in preact18.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---- calibration metrics (common.py) ----


def test_calibration_error_golden_value():
    # Bin (0.9, 1]: 2 samples, accuracy 0.5, confidence 0.95 -> gap 0.45. Bin (0.5, 0.6]: accuracy 1,
    # confidence 0.55 -> 0.45. Bin (0.1, 0.2]: accuracy 0, confidence 0.15 -> 0.15.
    # ECE = (2 * 0.45 + 0.45 + 0.15) / 4 = 0.375 -> 37.5 %.
    confidences = torch.tensor([0.95, 0.95, 0.55, 0.15])
    correct = torch.tensor([True, False, True, False])
    assert calibration_error(confidences, correct) == pytest.approx(37.5, abs=1e-4)
    # Gaps of opposite sign inside one bin cancel; one bin for everything is |accuracy - confidence|.
    assert calibration_error(confidences, correct, bins=1) == pytest.approx(100 * abs(0.5 - 0.65), abs=1e-4)


def test_evaluate_calibrated_agrees_with_evaluate(cifar_dir):
    args = SimpleNamespace(dataset="cifar100", data_dir=cifar_dir, train_subset=None, normalize="cifar10", amp=False)
    data = common.load_data(args, torch.device("cpu"))
    torch.manual_seed(0)
    model = common.build_model("resnet8", 100)
    plain = common.evaluate(model, data, 64)
    calibrated = evaluate_calibrated(model, data, 64)
    assert (calibrated["top1"], calibrated["top5"]) == (plain["top1"], plain["top5"])
    with torch.no_grad():
        logits = model(data.normalize(data.test_images))
    assert calibrated["nll"] == pytest.approx(F.cross_entropy(logits, data.test_labels).item(), rel=1e-5)
    confidences, predicted = F.softmax(logits, dim=1).max(dim=1)
    by_hand = sum(
        abs((predicted[m] == data.test_labels[m]).float().mean() - confidences[m].mean()) * m.sum()
        for m in [(confidences > b / 10) & (confidences <= (b + 1) / 10) for b in range(10)]
        if m.any()
    )
    assert calibrated["ece"] == pytest.approx(100 * by_hand.item() / len(logits), abs=1e-3)


# ---- end-to-end ----


def tiny_flags(cifar_dir, *extra):
    return [
        "--dataset",
        "cifar100",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--train-subset",
        "64",
        "--batch-size",
        "32",
        *extra,
    ]


def test_pskd_resumed_run_ends_with_the_weights_and_buffer_of_an_uninterrupted_one(tmp_path, cifar_dir):
    straight = run_script("pskd.py", *tiny_flags(cifar_dir), "--epochs", "2", "--run-name", "straight", cwd=tmp_path)
    stopped = run_script("pskd.py", *tiny_flags(cifar_dir), "--epochs", "1", "--run-name", "resumed", cwd=tmp_path)
    stopped_buffer = load_run(tmp_path / "runs" / "resumed")["predictions"]
    resumed = run_script(
        "pskd.py",
        *tiny_flags(cifar_dir),
        "--epochs",
        "2",
        "--run-name",
        "resumed",
        "--resume",
        "--resume-with-changes",
        cwd=tmp_path,
    )
    for result in (straight, stopped, resumed):
        assert result.returncode == 0, result.stderr
    assert "resumed from" in resumed.stdout
    a, b = load_run(tmp_path / "runs" / "straight"), load_run(tmp_path / "runs" / "resumed")
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["predictions"], b["predictions"])
    assert not torch.equal(a["predictions"], stopped_buffer)  # epoch 2 rewrote the buffer
    for slot, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][slot]["momentum_buffer"])
    # The 1-epoch run had E = 1, so it logged alpha_0 = 0.8 instead of 0.4; epoch-0 targets are one-hot
    # whatever alpha is, which is why the weights still agree. Everything else must be equal.
    strip = lambda rows: [
        {k: v for k, v in row.items() if not k.startswith("speed/") and (k, row["epoch"]) != ("pskd/alpha", 1)}
        for row in rows
    ]
    assert strip(read_metrics(tmp_path / "runs" / "straight")) == strip(read_metrics(tmp_path / "runs" / "resumed"))

    # The uninterrupted run itself: every sample's row holds a probability vector, the recipe and alpha ramp.
    buffer = a["predictions"]
    assert buffer.shape == (64, 100) and buffer.dtype == torch.float32 and (buffer >= 0).all()
    torch.testing.assert_close(buffer.sum(dim=1), torch.ones(64))
    rows = read_metrics(tmp_path / "runs" / "straight")
    assert [row["pskd/alpha"] for row in rows] == [pytest.approx(0.4), pytest.approx(0.8)]
    assert [row["lr"] for row in rows] == [0.1, 0.1]
    for row in rows:
        assert row["loss/total"] == row["loss/pskd"]
        assert 0 < row["loss/ce"] < 3 * math.log(100)
        assert 0 <= row["test/ece"] <= 100 and row["test/nll"] > 0
        assert 0 <= row["test/top1"] <= row["test/top5"] <= 100
    # Epoch 0 targets are one-hot, so its soft-target CE is the hard-label CE.
    assert rows[0]["loss/pskd"] == pytest.approx(rows[0]["loss/ce"], rel=1e-5)
    summary = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())
    assert summary["last_top1"] == pytest.approx(rows[-1]["test/top1"])
    assert summary["last_ece"] == pytest.approx(rows[-1]["test/ece"])
    assert "best_top1" in summary and "last_nll" in summary
    assert summary["args"]["normalize"] == "cifar10" and summary["args"]["nesterov"] is True
    assert summary["args"]["alpha_T"] == 0.8 and summary["args"]["buffer_device"] == "cuda"
    assert summary["args"]["lr_milestones"] == [150, 225] and summary["args"]["weight_decay"] == 5e-4
    assert optimizer_settings(a) == {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


def optimizer_settings(checkpoint):
    group = checkpoint["optimizer"]["param_groups"][0]
    return {key: group[key] for key in ("momentum", "nesterov", "weight_decay")}


def test_buffer_holds_this_iterations_train_mode_predictions_before_the_update(tmp_path, cifar_dir):
    # One batch per epoch: the row of each sample must be softmax of the initial weights, in train
    # mode, on epoch 0's augmented image, written at the sample's dataset index.
    flags = [
        "--dataset",
        "cifar100",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet8",
        "--train-subset",
        "32",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--log-calibration",
        "false",
        "--buffer-device",
        "cpu",
    ]
    result = run_script("pskd.py", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    checkpoint = load_run(tmp_path / "runs" / "pskd_resnet8_cifar100_seed1")
    [row] = read_metrics(tmp_path / "runs" / "pskd_resnet8_cifar100_seed1")
    assert "test/ece" not in row and "test/nll" not in row

    args = SimpleNamespace(dataset="cifar100", data_dir=cifar_dir, train_subset=32, normalize="cifar10", amp=False)
    data = common.load_data(args, torch.device("cpu"))
    torch.manual_seed(1)  # pskd.py's seed: the same initial weights
    model = common.build_model("resnet8", 100).train()
    [(images, labels, sample_ids)] = common.train_batches(data, 32, common.epoch_generator(1, 0))
    assert sample_ids.tolist() != list(range(32))  # shuffled: batch position is not the dataset index
    with torch.no_grad():
        before_update = F.softmax(model(images), dim=1)
        common.load_weights(model, checkpoint, "last.pth")
        after_update = F.softmax(model.train()(images), dim=1)
    buffer = checkpoint["predictions"]
    torch.testing.assert_close(buffer[sample_ids], before_update, rtol=0, atol=1e-6)
    assert (buffer[sample_ids] - after_update).abs().max() > 1e-4  # the test can tell the two apart


def test_pskd_off_is_the_cross_entropy_baseline_with_the_same_recipe(tmp_path, cifar_dir):
    off = run_script("pskd.py", *tiny_flags(cifar_dir), "--epochs", "1", "--pskd", "false", cwd=tmp_path)
    baseline = run_script(
        "baseline.py",
        *tiny_flags(cifar_dir),
        "--epochs",
        "1",
        "--nesterov",
        "true",
        "--learning-rate",
        "0.1",
        "--lr-milestones",
        "150,225",
        "--normalize",
        "cifar10",
        cwd=tmp_path,
    )
    for result in (off, baseline):
        assert result.returncode == 0, result.stderr
    a = load_run(tmp_path / "runs" / "pskd-off_resnet8_cifar100_seed1")
    b = load_run(tmp_path / "runs" / "baseline_resnet8_cifar100_seed1")
    assert a["predictions"] is None
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    [row] = read_metrics(tmp_path / "runs" / "pskd-off_resnet8_cifar100_seed1")
    assert "loss/pskd" not in row and "pskd/alpha" not in row and row["loss/total"] == row["loss/ce"]


def test_model_resnet18_trains_pskds_preact_resnet18(tmp_path, cifar_dir):
    result = run_script(
        "pskd.py",
        "--dataset",
        "cifar100",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet18",
        "--train-subset",
        "16",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "model=PreActResNet18" in result.stdout
    run_dir = tmp_path / "runs" / "pskd_PreActResNet18_cifar100_seed1"
    checkpoint = load_run(run_dir)
    assert checkpoint["arch"] == "PreActResNet18"
    assert (
        sum(t.numel() for k, t in checkpoint["model"].items() if "running" not in k and "num_batches" not in k)
        == 11_217_444
    )
    assert json.loads((run_dir / "summary.json").read_text())["args"]["model"] == "PreActResNet18"


def test_unknown_model_is_a_clear_error(tmp_path, cifar_dir):
    result = run_script(
        "pskd.py",
        "--dataset",
        "cifar100",
        "--data-dir",
        cifar_dir,
        "--model",
        "resnet19",
        "--epochs",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "unknown architecture 'resnet19'" in result.stderr and "PreActResNet18" in result.stderr
    assert "Traceback" not in result.stderr
