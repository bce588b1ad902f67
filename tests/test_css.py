"""css.py: the CSS networks against the official code's reference, mask placement, joint labels, the loss
terms against hand-computed values, the detach policy, the aggregation rule, and one end-to-end
run that is interrupted and resumed."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ZOO_REFERENCE, run_script

import common
from css import (
    Args,
    aggregate_branches,
    branch_ce_loss,
    branch_diversity,
    branch_joint_labels,
    branch_kd_loss,
    branch_mask,
    branch_masks,
    build_css_resnet,
    css_loss,
)

CSS_NAMES = ("css_resnet56", "css_resnet110", "css_wide_resnet20_8")


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def parameter_count(modules):
    return sum(p.numel() for module in modules for p in module.parameters())


# ---- networks (resnet_css.py) ----


@pytest.mark.parametrize("name", CSS_NAMES)
def test_css_network_state_dict_and_parameter_count_equal_the_reference(name):
    model = build_css_resnet(name, 100)
    assert {key: list(t.shape) for key, t in model.state_dict().items()} == ZOO_REFERENCE[name]["state_dict"]
    assert parameter_count([model]) == ZOO_REFERENCE[name]["params"]


@pytest.mark.parametrize(
    "name, trunk, branch", [("css_resnet56", 141_264, 524_588), ("css_resnet110", 275_280, 946_988)]
)
def test_css_network_shares_stem_layer1_layer2_and_owns_layer3_and_classifier_per_branch(name, trunk, branch):
    model = build_css_resnet(name, 100)
    assert parameter_count([model.conv1, model.bn1, model.layer1, model.layer2]) == trunk
    for i in range(3):
        assert parameter_count([getattr(model, f"layer3_{i}"), getattr(model, f"classifier3_{i}")]) == branch
    assert getattr(model, "classifier3_0").out_features == 300


def test_css_network_outputs_one_column_of_joint_logits_per_branch():
    with torch.no_grad():
        assert build_css_resnet("css_resnet56", 100).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 300, 3)
        two_branches = build_css_resnet("css_resnet56", 10, branches=2).eval()
        assert two_branches(torch.randn(2, 3, 32, 32), branch_masks("corners", 2, 16, 16)).shape == (2, 20, 2)
    with pytest.raises(common.ConfigError, match="single-branch"):
        build_css_resnet("resnet56", 100)


# ---- feature-level transformation (resnet_css.py transform) ----


def zeroed_cells(mask):
    return sorted(map(tuple, (mask == 0).nonzero().tolist()))


def block(rows, cols):
    return sorted((r, c) for r in rows for c in cols)


def test_branch_masks_zero_top_left_bottom_right_bottom_left_quarter_sized_corners():
    # 16x16 layer2 map, s = 4: TL, BR, BL (branch 3 only exists with n_b >= 4).
    assert zeroed_cells(branch_mask(0, 16, 16)) == block(range(0, 4), range(0, 4))
    assert zeroed_cells(branch_mask(1, 16, 16)) == block(range(12, 16), range(12, 16))
    assert zeroed_cells(branch_mask(2, 16, 16)) == block(range(12, 16), range(0, 4))
    assert zeroed_cells(branch_mask(3, 16, 16)) == block(range(0, 4), range(12, 16))
    assert zeroed_cells(branch_mask(4, 16, 16)) == []
    assert branch_masks("none", 3, 16, 16) is None


def test_literal_mask3_reproduces_the_one_column_bug_of_the_code():
    assert zeroed_cells(branch_mask(3, 16, 16, literal_mask3=True)) == block(range(0, 4), [12])
    assert zeroed_cells(branch_mask(1, 16, 16, literal_mask3=True)) == block(range(12, 16), range(12, 16))


@pytest.mark.parametrize("train_mode", [True, False])
def test_branch_i_sees_the_layer2_output_times_mask_i_on_every_channel(train_mode):
    torch.manual_seed(0)
    model = build_css_resnet("css_resnet56", 100).train(train_mode)
    masks = branch_masks("corners", 3, 16, 16)
    seen = {}
    model.layer2.register_forward_hook(lambda module, inputs, output: seen.__setitem__("shared", output))
    for i in range(3):
        getattr(model, f"layer3_{i}").register_forward_pre_hook(
            lambda module, inputs, i=i: seen.__setitem__(i, inputs[0])
        )
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32), masks)
    shared = seen["shared"]  # [4, 128, 16, 16], post-ReLU so mostly non-zero
    assert shared.shape == (4, 128, 16, 16)
    for i in range(3):
        torch.testing.assert_close(seen[i], shared * masks[i])
        hidden = masks[i] == 0
        assert (seen[i][:, :, hidden] == 0).all() and (shared[:, :, hidden] != 0).any()


def test_masked_forward_runs_under_bf16_autocast_and_channels_last():
    model = common.prepare_model(build_css_resnet("css_resnet56", 100), torch.device("cpu"), amp=True).eval()
    with torch.no_grad(), common.autocast(torch.device("cpu"), True):
        images = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
        logits = model(images, branch_masks("corners", 3, 16, 16))
    assert logits.shape == (2, 300, 3) and torch.isfinite(logits.float()).all()


# ---- augmented labels and losses (train.py) ----


def test_branch_i_is_trained_on_joint_label_y_times_branches_plus_i():
    assert branch_joint_labels(torch.tensor([2, 5]), 3).tolist() == [[6, 7, 8], [15, 16, 17]]
    # C = 3, n_b = 2: branch 0 of the class-1 image puts logit log(5) on joint label 1*2+0 = 2, so
    # p = 5 / (5 + 5) and CE = log 2; branch 1 is all zeros: CE = log 6. Mean over branches.
    logits = torch.zeros(1, 6, 2)
    logits[0, 2, 0] = math.log(5)
    assert branch_ce_loss(logits, torch.tensor([1])).item() == pytest.approx((math.log(2) + math.log(6)) / 2)
    wrong_layout = torch.zeros(1, 6, 2)
    wrong_layout[0, 3, 0] = math.log(5)  # branch-major index 0*3 + 1 would be the wrong slot
    assert branch_ce_loss(wrong_layout, torch.tensor([1])).item() > branch_ce_loss(logits, torch.tensor([1])).item()


def test_branch_kd_loss_golden_value():
    # Branch 0 at T=2: learner softmax([0.5, 0]), target softmax([0, 0.5]); KL = tanh(0.25)/2.
    # Branch 1 identical on both sides: KL 0. Mean over 2 branches, batchmean over 1 row, times T^2 = 4.
    learner = torch.tensor([[[1.0, 3.0], [0.0, -1.0]]])  # [1, 2 joint logits, 2 branches]
    target = torch.tensor([[[0.0, 3.0], [1.0, -1.0]]])
    assert branch_kd_loss(learner, target, 2.0).item() == pytest.approx(math.tanh(0.25), abs=1e-6)


def test_a_target_probability_of_exactly_zero_gives_torch_1_0_1s_zero_gradient_not_nan():
    learner = torch.zeros(1, 3, 1, requires_grad=True)
    target = torch.tensor([[[0.0], [0.0], [-200.0]]])  # softmax(target / 1) of the last class underflows to 0
    assert F.softmax(target, dim=1)[0, 2, 0].item() == 0.0
    loss = branch_kd_loss(learner, target, 1.0)
    loss.backward()
    # torch 1.0.1's kl_div: sum over target > 0 of p * (log p - log q), the zero entry adding 0 and no gradient
    q = torch.full((3,), 1 / 3)
    p = torch.tensor([0.5, 0.5, 0.0])
    assert loss.item() == pytest.approx((p[:2] * (p[:2].log() - q[:2].log())).sum().item(), abs=1e-6)
    assert torch.isfinite(learner.grad).all()
    torch.testing.assert_close(learner.grad[0, :, 0], q - p)  # d/dz of -sum p log softmax(z) = softmax(z) - p


def test_branch_kd_loss_pairs_same_numbered_branches_only():
    generator = torch.Generator().manual_seed(0)
    learner, target = torch.randn(2, 4, 30, 3, generator=generator)
    per_branch = [
        F.kl_div(F.log_softmax(learner[:, :, i] / 3, 1), F.softmax(target[:, :, i] / 3, 1), reduction="batchmean") * 9
        for i in range(3)
    ]
    assert branch_kd_loss(learner, target, 3.0).item() == pytest.approx(sum(per_branch).item() / 3, rel=1e-5)
    swapped = target[:, :, [1, 0, 2]]
    assert branch_kd_loss(learner, swapped, 3.0).item() != pytest.approx(branch_kd_loss(learner, target, 3.0).item())


def random_logits(seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 30, 3, generator=generator) * scale).requires_grad_()


def test_css_loss_weights_each_kd_term_by_the_ratio_of_the_two_ce_losses():
    logits_t, logits_s, labels = random_logits(1, scale=3.0), random_logits(2), torch.tensor([0, 3, 9, 4])
    total, terms = css_loss(logits_t, logits_s, labels, 3.0)
    ce_t, ce_s = branch_ce_loss(logits_t, labels), branch_ce_loss(logits_s, labels)
    kd_ts = branch_kd_loss(logits_t, logits_s, 3.0)
    kd_st = branch_kd_loss(logits_s, logits_t, 3.0)
    expected = ce_t + ce_t / ce_s * kd_ts + ce_s + ce_s / ce_t * kd_st
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["alpha1"].item() == pytest.approx((ce_t / ce_s).item())
    # The sharper random net1 has the higher CE here, so it is the one that learns more from net2.
    assert terms["ce_t"] > terms["ce_s"] and terms["alpha1"] > 1 > terms["alpha2"]


def gradients(detach_kd_target, detach_ratio):
    logits_t, logits_s = random_logits(1, scale=3.0), random_logits(2)
    total, _ = css_loss(logits_t, logits_s, torch.tensor([0, 3, 9, 4]), 3.0, detach_kd_target, detach_ratio)
    total.backward()
    return logits_t, logits_s


def official_train_py_loss(out_t, out_s, targets, n, T, detached=False):
    """PumpkinsLemon/CSS train.py's `train` step, written out branch by branch as the code does it:
    CE per branch / n, F.kl_div batchmean per branch / n, alpha = CE ratio, T^2 on the KD terms.
    detached=True is the conventional form: partners' distributions and the ratios are constants."""
    partner_t, partner_s = (out_t.detach(), out_s.detach()) if detached else (out_t, out_s)
    ce_t = sum(F.cross_entropy(out_t[:, :, i], targets * n + i) / n for i in range(n))
    ce_s = sum(F.cross_entropy(out_s[:, :, i], targets * n + i) / n for i in range(n))
    t2s = sum(
        F.kl_div(F.log_softmax(out_t[:, :, i] / T, 1), F.softmax(partner_s[:, :, i] / T, 1), reduction="batchmean") / n
        for i in range(n)
    )
    s2t = sum(
        F.kl_div(F.log_softmax(out_s[:, :, i] / T, 1), F.softmax(partner_t[:, :, i] / T, 1), reduction="batchmean") / n
        for i in range(n)
    )
    alpha_1, alpha_2 = (ce_t / ce_s, ce_s / ce_t) if not detached else ((ce_t / ce_s).detach(), (ce_s / ce_t).detach())
    return (ce_s + alpha_2 * s2t * T**2) + (ce_t + alpha_1 * t2s * T**2)


@pytest.mark.parametrize("flags, detached", [((False, False), False), ((True, True), True)])
def test_each_networks_gradient_equals_autograd_of_the_official_formula(flags, detached):
    logits_t, logits_s = gradients(*flags)
    fresh_t, fresh_s = random_logits(1, scale=3.0), random_logits(2)
    official_train_py_loss(fresh_t, fresh_s, torch.tensor([0, 3, 9, 4]), 3, 3.0, detached).backward()
    torch.testing.assert_close(logits_t.grad, fresh_t.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits_s.grad, fresh_s.grad, rtol=1e-5, atol=1e-7)


def test_literal_default_lets_both_kd_terms_and_both_ratios_train_each_network():
    literal_t, literal_s = gradients(False, False)
    detached_t, detached_s = gradients(True, True)
    target_only_t, _ = gradients(False, True)
    ratio_only_t, _ = gradients(True, False)
    for grads in (detached_t.grad, target_only_t.grad, ratio_only_t.grad):
        assert (grads - literal_t.grad).abs().max() > 1e-4
    # Detached: net2's gradient is its own CE and its own KD term with alpha2 a constant, nothing else.
    fresh_t, fresh_s, labels = random_logits(1, scale=3.0), random_logits(2), torch.tensor([0, 3, 9, 4])
    alpha2 = (branch_ce_loss(fresh_s, labels) / branch_ce_loss(fresh_t, labels)).detach()
    (branch_ce_loss(fresh_s, labels) + alpha2 * branch_kd_loss(fresh_s, fresh_t.detach(), 3.0)).backward()
    torch.testing.assert_close(detached_s.grad, fresh_s.grad)
    # Literal: net2 also receives the gradient of net1's KD term, in which net2 is the target, and of alpha1.
    fresh_t, fresh_s = random_logits(1, scale=3.0), random_logits(2)
    ce_t, ce_s = branch_ce_loss(fresh_t, labels), branch_ce_loss(fresh_s, labels)
    (ce_t.detach() / ce_s * branch_kd_loss(fresh_t.detach(), fresh_s, 3.0)).backward()
    from_partner_term = fresh_s.grad.clone()
    assert from_partner_term.abs().max() > 1e-4
    fresh_s.grad, ce_s = None, branch_ce_loss(fresh_s, labels)
    (ce_s + ce_s / ce_t.detach() * branch_kd_loss(fresh_s, fresh_t.detach(), 3.0)).backward()
    torch.testing.assert_close(literal_s.grad, fresh_s.grad + from_partner_term, rtol=1e-5, atol=1e-7)


# ---- prediction (train.py) ----


def test_prediction_averages_each_branch_logits_of_its_own_slot():
    # C = 2, n_b = 2: branch 0 owns joint labels 0, 2 (c*2+0), branch 1 owns 1, 3.
    logits = torch.zeros(1, 4, 2)
    logits[0, :, 0] = torch.tensor([1.0, 100.0, 3.0, 100.0])
    logits[0, :, 1] = torch.tensor([-100.0, 5.0, -100.0, 7.0])
    assert aggregate_branches(logits).tolist() == [[(1.0 + 5.0) / 2, (3.0 + 7.0) / 2]]


def test_branch_diversity_golden_value():
    # n_b = 1: net1 softmax [0.5, 0.5], net2 softmax [0.75, 0.25]; one pair, L2 = 0.25 * sqrt(2).
    logits_t, logits_s = torch.tensor([[[0.0], [0.0]]]), torch.tensor([[[math.log(3)], [0.0]]])
    all_pairs, same_numbered = branch_diversity(logits_t, logits_s)
    assert all_pairs.item() == pytest.approx(0.25 * math.sqrt(2), rel=1e-5)
    assert same_numbered.item() == pytest.approx(0.25 * math.sqrt(2), rel=1e-5)
    identical = torch.randn(3, 12, 2)
    assert branch_diversity(identical, identical)[1].abs().max().item() < 1e-5


# ---- recipe (train.py) ----


def test_defaults_follow_the_code_recipe_and_lr_warms_up_then_decays_at_149_and_224():
    args = Args()
    assert (args.model_t, args.model_s, args.epochs, args.batch_size, args.branches, args.kd_T) == (
        "css_resnet110",
        "css_resnet56",
        300,
        128,
        3,
        3.0,
    )
    assert (args.momentum, args.nesterov, args.weight_decay) == (0.9, False, 5e-4)
    assert args.normalize is None  # css.py resolves it to CSS's CIFAR-10 constants on both datasets
    assert not args.detach_kd_target and not args.detach_ratio and args.mask == "corners" and not args.literal_mask3
    assert args.learning_rate is None  # unset: train.py's 0.1, which css.py's main uses
    lrs = [
        common.lr_at_epoch(e, 0.1, args.lr_milestones, args.lr_gamma, args.warmup_epochs) for e in range(args.epochs)
    ]
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.10])
    assert set(lrs[5:149]) == {0.1}
    assert lrs[149:224] == pytest.approx([0.01] * 75) and lrs[224:] == pytest.approx([0.001] * 76)


# ---- end to end ----


def test_css_run_reports_three_accuracies_and_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, cifar_dir):
    # One batch per epoch so the epoch averages obey the per-batch identities.
    flags = [
        "--data-dir",
        cifar_dir,
        "--model-t",
        "css_resnet56",
        "--train-subset",
        32,
        "--batch-size",
        32,
        "--eval-batch-size",
        200,
        "--log-diversity",
    ]
    straight = run_script("css.py", *flags, "--epochs", 2, "--run-name", "straight", cwd=tmp_path)
    stopped = run_script("css.py", *flags, "--epochs", 1, "--run-name", "resumed", cwd=tmp_path)
    resumed = run_script(
        "css.py", *flags, "--epochs", 2, "--run-name", "resumed", "--resume", "--resume-with-changes", cwd=tmp_path
    )
    for result in (straight, stopped, resumed):
        assert result.returncode == 0, result.stderr
    assert "resumed from" in resumed.stdout

    rows = read_metrics(tmp_path / "runs" / "straight")
    assert [row["lr"] for row in rows] == pytest.approx([0.02, 0.04])
    first = rows[0]
    assert first["loss/ce_t"] == pytest.approx(math.log(300), rel=0.3)  # a fresh 300-way head
    assert first["loss/ce"] == pytest.approx(first["loss/ce_t"] + first["loss/ce_s"], rel=1e-5)
    assert first["loss/kd_t_from_s"] > 0 and first["loss/kd_s_from_t"] > 0
    assert first["weight/alpha1"] == pytest.approx(first["loss/ce_t"] / first["loss/ce_s"], rel=1e-5)
    assert first["loss/total"] == pytest.approx(
        first["loss/ce"]
        + first["weight/alpha1"] * first["loss/kd_t_from_s"]
        + first["weight/alpha2"] * first["loss/kd_s_from_t"],
        rel=1e-5,
    )
    for row in rows:
        assert row["test/top1"] == row["test/net2_top1"] and row["test/top5"] == row["test/net2_top5"]
        for name in ("net1", "net2", "ensemble"):
            assert 0 <= row[f"test/{name}_top1"] <= row[f"test/{name}_top5"] <= 100
        assert all(f"test/net{n}_branch{i}_top1" in row for n in (1, 2) for i in range(3))
        assert 0 < row["test/diversity"] <= math.sqrt(2) and 0 < row["test/diversity_paired"] <= math.sqrt(2)

    summary = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())
    for name in ("net1", "net2", "ensemble"):
        assert summary[f"{name}_last_top1"] == rows[-1][f"test/{name}_top1"]
        assert summary[f"{name}_best_top1"] == max(row[f"test/{name}_top1"] for row in rows)
        assert summary[f"{name}_best_epoch"] in (1, 2)
    assert summary["last_top1"] == summary["net2_last_top1"] and summary["primary"] == "net2 (css_resnet56)"
    assert summary["args"]["detach_kd_target"] is False and summary["args"]["detach_ratio"] is False
    for checkpoint in ("best.pth", "best_net1.pth"):
        path = tmp_path / "runs" / "straight" / checkpoint  # RepDistiller-style {"model": ...} files
        common.load_weights(build_css_resnet("css_resnet56", 100), torch.load(path, weights_only=False), str(path))

    a = torch.load(tmp_path / "runs" / "straight" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "runs" / "resumed" / "last.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for model_key in ("model", "net1_model"):
        for name, tensor in a[model_key].items():
            assert torch.equal(tensor, b[model_key][name]), (model_key, name)
    for optimizer_key in ("optimizer", "net1_optimizer"):
        for slot, state in a[optimizer_key]["state"].items():
            assert torch.equal(state["momentum_buffer"], b[optimizer_key]["state"][slot]["momentum_buffer"])
    strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith("speed/")} for row in rows]
    assert strip(rows) == strip(read_metrics(tmp_path / "runs" / "resumed"))


def test_single_branch_zoo_network_is_refused_with_a_clear_error(tmp_path, cifar_dir):
    result = run_script("css.py", "--data-dir", cifar_dir, "--model-s", "resnet56", "--epochs", 1, cwd=tmp_path)
    assert result.returncode != 0
    assert "error: 'resnet56' is not a CSS multi-branch network" in result.stderr
    assert "Traceback" not in result.stderr


def test_css_networks_are_not_single_logit_zoo_models_and_say_which_script_trains_them():
    # baseline.py/kd.py/pskd.py would feed their [N, 300, 3] output to a 100-way loss.
    assert "css_resnet56" not in common.MODEL_NAMES
    with pytest.raises(common.ConfigError, match="only css.py trains it"):
        common.build_model("css_resnet56", 100)
