"""lsskd.py: every loss term against hand-computed values, the flags that switch terms off (and the
reductions to HSAKD's joint teacher loss and to PS-KD), where gradients flow, the per-head
prediction buffers (layout, sample ids, epoch 0, fp16, write timing, resume), and end-to-end runs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

import common
import hssakd
import pskd
from lsskd import (
    Args,
    check_feature_map_shapes,
    deep_to_shallow_kl,
    feature_alignment,
    head_class_logits,
    kd_loss,
    lsskd_alpha,
    lsskd_loss,
    per_head_rows,
    per_sample,
    progressive_targets,
    read_targets,
    record_predictions,
    soft_cross_entropy,
)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_run(run_dir):
    return torch.load(run_dir / "last.pth", weights_only=False)


def loss_args(**changes):
    return SimpleNamespace(**{**vars(Args()), **changes})


def kl_by_hand(teacher_probs, student_probs):
    return sum(t * math.log(t / s) for t, s in zip(teacher_probs, student_probs))


# ---- alpha and targets ----


def test_alpha_ramps_linearly_to_alpha_T_or_stays_constant():
    assert lsskd_alpha(0, 240, 0.8, "linear") == pytest.approx(0.8 / 240)
    assert lsskd_alpha(119, 240, 0.8, "linear") == pytest.approx(0.4)
    assert lsskd_alpha(239, 240, 0.8, "linear") == pytest.approx(0.8)
    assert lsskd_alpha(0, 240, 0.8, "constant") == lsskd_alpha(200, 240, 0.8, "constant") == 0.8


def test_progressive_targets_golden_value():
    targets = progressive_targets(torch.tensor([1]), torch.tensor([[0.2, 0.5, 0.3]]), 0.25)
    torch.testing.assert_close(targets, torch.tensor([[0.05, 0.875, 0.075]]))


def test_epoch_zero_targets_are_exactly_one_hot_for_every_head_and_rotation():
    buffer = torch.rand(6, 3, 4, 8)  # garbage in the rows: epoch 0 must ignore it
    untouched = buffer[[0, 2, 3, 5]].clone()
    joint = torch.tensor([[1, 4, 6, 7], [0, 2, 3, 5]])[:, None].expand(2, 3, 4)  # [B, L, 4]
    targets = read_targets(buffer, torch.tensor([4, 1]), joint, alpha=0.7, first_epoch=True)
    assert torch.equal(targets, F.one_hot(joint, 8).float())
    assert torch.equal(buffer[[4, 1]], F.one_hot(joint, 8).float())  # the rows were reset
    assert torch.equal(buffer[[0, 2, 3, 5]], untouched)  # and only the batch's rows


def test_later_epochs_mix_the_buffer_row_of_each_sample_id_in():
    buffer = torch.zeros(5, 1, 3)
    buffer[3, 0] = torch.tensor([0.2, 0.5, 0.3])
    buffer[1, 0] = torch.tensor([0.6, 0.2, 0.2])
    targets = read_targets(buffer, torch.tensor([3, 1]), torch.tensor([[1], [0]]), alpha=0.25, first_epoch=False)
    torch.testing.assert_close(targets[:, 0], torch.tensor([[0.05, 0.875, 0.075], [0.9, 0.05, 0.05]]))


def test_fp16_buffer_rows_are_renormalised_to_distributions_when_read():
    row = torch.softmax(torch.randn(400), 0)
    buffer = row.half().view(1, 1, 1, 400).clone()
    assert buffer.float().sum() != 1.0  # rounding moved the sum off 1: the renormalisation matters
    targets = read_targets(buffer, torch.tensor([0]), torch.tensor([[[7]]]), alpha=1.0, first_epoch=False)
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(), torch.tensor(1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(targets.flatten(), row, rtol=2e-3, atol=1e-6)


def test_buffer_layout_maps_row_4b_plus_k_of_head_l_to_sample_b_head_l_rotation_k():
    heads = [torch.arange(24.0).view(12, 2) + 100 * head for head in range(3)]  # L=3 heads, B=3 -> 12 rows
    samples = per_sample(heads)
    assert samples.shape == (3, 3, 4, 2)
    for head in range(3):
        for b in range(3):
            for k in range(4):
                assert torch.equal(samples[b, head, k], heads[head][4 * b + k])
    for a, b in zip(per_head_rows(samples), heads):
        assert torch.equal(a, b)


def test_recorded_rows_are_detached_tempered_softmax_at_the_sample_ids():
    buffer = torch.zeros(4, 2, 4, 3, dtype=torch.float16)
    logits = torch.randn(2, 2, 4, 3, requires_grad=True)
    record_predictions(buffer, torch.tensor([3, 0]), logits, temperature=2.0)
    expected = F.softmax(logits.detach() / 2.0, dim=-1).half()
    assert torch.equal(buffer[[3, 0]], expected) and buffer.dtype == torch.float16
    assert not buffer[[1, 2]].any()


def test_restoring_buffers_of_another_run_says_what_to_do():
    buffer = torch.zeros(4, 3, 4, 400, dtype=torch.float16)
    common._restore(buffer, torch.ones(4, 3, 4, 400, dtype=torch.float16), "aux_predictions", "x")
    assert (buffer == 1).all()
    for saved in (None, torch.zeros(4, 3, 4, 400), torch.zeros(8, 3, 4, 400, dtype=torch.float16)):
        with pytest.raises(common.ConfigError, match="resume with the flags of the interrupted run"):
            common._restore(buffer, saved, "aux_predictions", "last.pth")


# ---- loss terms ----


def test_soft_cross_entropy_golden_values():
    logits, targets = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.5, 0.5]])
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(0.5 * math.log(16 / 3))
    # T = 2 halves the logits: softmax [1, sqrt 3] / (1 + sqrt 3)
    low, high = 1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))
    expected = -(0.5 * math.log(low) + 0.5 * math.log(high))
    assert soft_cross_entropy(logits, targets, temperature=2.0).item() == pytest.approx(expected)
    hard = torch.randn(5, 7), torch.randint(0, 7, (5,))
    assert soft_cross_entropy(hard[0], F.one_hot(hard[1], 7).float()).item() == pytest.approx(
        F.cross_entropy(*hard).item(), rel=1e-6
    )


def test_kd_loss_golden_value_with_t_squared():
    teacher, student = torch.tensor([[0.0, 3 * math.log(3.0)]]), torch.zeros(1, 2)
    expected = 9 * kl_by_hand([0.25, 0.75], [0.5, 0.5])  # at T = 3 the teacher softmax is [1/4, 3/4]
    assert kd_loss(student, teacher, 3.0).item() == pytest.approx(expected)


def test_deep_to_shallow_kl_deepest_and_chain_golden_values():
    # softmax of the three heads at T = 1: [1/5, 4/5], [1/4, 3/4], [3/4, 1/4]
    heads = [
        torch.tensor([[0.0, math.log(4.0)]]),
        torch.tensor([[0.0, math.log(3.0)]]),
        torch.tensor([[math.log(3.0), 0.0]]),
    ]
    p1, p2, p3 = [0.2, 0.8], [0.25, 0.75], [0.75, 0.25]
    deepest = kl_by_hand(p3, p1) + kl_by_hand(p3, p2)  # head 3 teaches heads 1 and 2
    chain = kl_by_hand(p2, p1) + kl_by_hand(p3, p2)  # head 2 teaches 1, head 3 teaches 2
    assert deep_to_shallow_kl(heads, 1.0, "deepest").item() == pytest.approx(deepest)
    assert deep_to_shallow_kl(heads, 1.0, "chain").item() == pytest.approx(chain)
    assert deepest != pytest.approx(chain)
    same = [torch.randn(8, 16)] * 4
    assert deep_to_shallow_kl(same, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_deep_to_shallow_kl_never_trains_the_teacher_head():
    heads = [torch.randn(8, 16, requires_grad=True) for _ in range(3)]
    deep_to_shallow_kl(heads, 3.0, "deepest").backward()
    assert heads[2].grad is None
    assert heads[0].grad.abs().sum() > 0 and heads[1].grad.abs().sum() > 0
    # chain: head 2 learns from head 3 only; teaching head 1 sends nothing back into it
    heads = [torch.randn(8, 16, requires_grad=True) for _ in range(3)]
    deep_to_shallow_kl(heads, 3.0, "chain").backward()
    alone = heads[1].detach().clone().requires_grad_()
    kd_loss(alone, heads[2].detach(), 3.0).backward()
    torch.testing.assert_close(heads[1].grad, alone.grad)
    assert heads[2].grad is None


def test_feature_alignment_golden_values_and_the_deepest_head_excluded_by_default():
    feats = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[5.0, 5.0]])]
    final = torch.tensor([[1.0, 0.0]])
    assert feature_alignment(feats, final).item() == pytest.approx(2.0 + 0.5)  # (0^2+2^2)/2 + (1^2+0^2)/2
    assert feature_alignment(feats, final, include_last=True).item() == pytest.approx(2.5 + 20.5)


def test_head_class_logits_sum_each_class_four_rotation_logits():
    head = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 0.0, 0.0, -1.0]])  # C = 2: joint labels 0-3 class 0, 4-7 class 1
    assert head_class_logits(head).tolist() == [[10.0, 9.0]]


def test_final_classifier_teaches_every_heads_class_distribution_on_its_own_rows():
    # One image, C = 2, L = 2. Upright row 0: head 1 class scores [0, log 3] -> softmax [1/4, 3/4]; head 2's
    # [log 4, 0] -> [4/5, 1/5]; the final classifier's [0, 0] -> [1/2, 1/2]. Rows 1-3 (rotated) must not count.
    head1, head2 = torch.full((4, 8), 50.0), torch.full((4, 8), -50.0)
    head1[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, math.log(3.0), 0.0, 0.0, 0.0])
    head2[0] = torch.tensor([math.log(4.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    final_upright = torch.zeros(1, 2)
    expected = kl_by_hand([0.5, 0.5], [0.25, 0.75]) + kl_by_hand([0.5, 0.5], [0.8, 0.2])  # both heads learn
    kl = deep_to_shallow_kl([head1, head2], 1.0, "final", final_upright, "upright")
    assert kl.item() == pytest.approx(expected)
    # --final-rows all: every row of every head, batchmean over the 4 rows
    rows = torch.zeros(4, 8)
    all_rows = deep_to_shallow_kl([rows, rows], 1.0, "final", torch.tensor([[0.0, math.log(3.0)]] * 4), "all")
    assert all_rows.item() == pytest.approx(2 * kl_by_hand([0.25, 0.75], [0.5, 0.5]))


def test_final_teacher_trains_every_head_and_never_the_final_classifier():
    heads = [torch.randn(8, 12, requires_grad=True) for _ in range(3)]
    final = torch.randn(2, 3, requires_grad=True)
    deep_to_shallow_kl(heads, 3.0, "final", final, "upright").backward()
    assert final.grad is None and all(head.grad[0::4].abs().sum() > 0 for head in heads)
    assert all(head.grad[1::4].abs().sum() == 0 for head in heads)  # rotated rows: the final head does not teach


def test_lsskd_loss_passes_the_final_rows_to_the_final_teacher():
    logits, aux_logits, aux_feats, final_feat, _, final_targets, aux_targets = small_batch()
    terms = lsskd_loss(
        logits, aux_logits, aux_feats, final_feat, final_targets, aux_targets, loss_args(kl_teacher="final")
    )
    torch.testing.assert_close(terms["kl"], deep_to_shallow_kl(aux_logits, 3.0, "final", logits[0::4]))


def test_feature_alignment_on_maps_averages_over_channels_and_positions():
    # [1, 1, 2, 2] maps: head 1 differs by [1, 2, 0, 3] -> (1 + 4 + 0 + 9) / 4; head 2 (deepest) excluded.
    final = torch.zeros(1, 1, 2, 2)
    maps = [torch.tensor([[[[1.0, 2.0], [0.0, 3.0]]]]), torch.full((1, 1, 2, 2), 7.0)]
    assert feature_alignment(maps, final).item() == pytest.approx(14 / 4)
    assert feature_alignment(maps, final, include_last=True).item() == pytest.approx(14 / 4 + 49.0)


def test_feature_maps_of_cifar_resnet_branches_match_the_last_stage_and_pool_to_the_pooled_features():
    model = common.build_auxiliary_model("resnet8", 10).eval()
    images = torch.randn(2, 3, 32, 32)
    feats, maps, logits_from_maps, _ = model(images, is_feat=True, feature_maps=True)
    _, pooled, logits, _ = model(images, is_feat=True)
    assert all(m.shape == feats[-2].shape == (2, 64, 8, 8) for m in maps)
    for m, p, a, b in zip(maps, pooled, logits_from_maps, logits):
        torch.testing.assert_close(m.mean(dim=(2, 3)), p)
        torch.testing.assert_close(a, b)


def test_map_level_alignment_names_the_mismatched_shapes():
    check_feature_map_shapes("resnet8x4", 100, include_last=True)  # CIFAR ResNets: every map is [w3, 8, 8]
    with pytest.raises(
        common.ConfigError, match=r"ShuffleV2.*\(464, 4, 4\).*head 1: \(1024, 4, 4\).*--feat-level pooled"
    ):
        check_feature_map_shapes("ShuffleV2", 100, include_last=False)


def test_feature_alignment_stops_gradient_into_the_final_feature_unless_asked():
    feats = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    final = torch.randn(4, 6, requires_grad=True)
    feature_alignment(feats, final).backward()
    assert final.grad is None and feats[2].grad is None and feats[0].grad.abs().sum() > 0
    feature_alignment(feats, final, detach_target=False).backward()
    assert final.grad.abs().sum() > 0


def small_batch(heads=3, classes=5, batch=2, seed=0):
    """Logits/features of a B-image rotated batch with L heads: logits [4B, C], heads L x [4B, 4C]."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4 * batch, classes, generator=gen)
    aux_logits = [torch.randn(4 * batch, 4 * classes, generator=gen) for _ in range(heads)]
    aux_feats = [torch.randn(4 * batch, 6, generator=gen) for _ in range(heads)]
    final_feat = torch.randn(4 * batch, 6, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    final_targets = torch.softmax(torch.randn(batch, classes, generator=gen), 1)
    aux_targets = [torch.softmax(torch.randn(4 * batch, 4 * classes, generator=gen), 1) for _ in range(heads)]
    return logits, aux_logits, aux_feats, final_feat, labels, final_targets, aux_targets


def test_lsskd_loss_is_the_weighted_sum_of_its_terms():
    logits, aux_logits, aux_feats, final_feat, _, final_targets, aux_targets = small_batch()
    args = loss_args(lambda_sad=0.5, lambda_kl=2.0, lambda_feat=3.0)
    terms = lsskd_loss(logits, aux_logits, aux_feats, final_feat, final_targets, aux_targets, args)
    final = soft_cross_entropy(logits[0::4], final_targets)  # upright rows only
    sad = [soft_cross_entropy(head, target) for head, target in zip(aux_logits, aux_targets)]
    kl = deep_to_shallow_kl(aux_logits, 3.0, "deepest")
    feat = feature_alignment(aux_feats, final_feat)
    torch.testing.assert_close(terms["final"], final)
    torch.testing.assert_close(terms["sad"], sum(sad))
    for head, term in enumerate(sad, 1):
        torch.testing.assert_close(terms[f"sad_{head}"], term)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["feat"], feat)
    torch.testing.assert_close(terms["total"], final + 0.5 * sum(sad) + 2.0 * kl + 3.0 * feat)


def test_final_rows_all_uses_every_rotated_row_of_the_final_classifier():
    logits, aux_logits, aux_feats, final_feat, _, _, aux_targets = small_batch()
    targets = torch.softmax(torch.randn(len(logits), logits.shape[1]), 1)
    terms = lsskd_loss(logits, aux_logits, aux_feats, final_feat, targets, aux_targets, loss_args(final_rows="all"))
    torch.testing.assert_close(terms["final"], soft_cross_entropy(logits, targets))


def test_switched_off_terms_add_nothing_even_when_not_finite():
    logits, aux_logits, aux_feats, final_feat, _, final_targets, aux_targets = small_batch()
    aux_feats = [torch.full_like(feat, float("nan")) for feat in aux_feats]
    terms = lsskd_loss(
        logits, aux_logits, aux_feats, final_feat, final_targets, aux_targets, loss_args(lambda_kl=0.0, lambda_feat=0.0)
    )
    assert math.isnan(terms["feat"].item())  # still logged
    torch.testing.assert_close(terms["total"], terms["final"] + terms["sad"])


def test_hard_targets_without_kl_and_l2_are_hsakds_joint_teacher_loss():
    # the sanity floor: --lambda-kl 0 --lambda-feat 0 --aux/final-soft-targets false = HSAKD's Teacher* loss
    logits, aux_logits, aux_feats, final_feat, labels, _, _ = small_batch()
    logits.requires_grad_()
    joint = common.rotation_joint_labels(labels)
    terms = lsskd_loss(
        logits,
        aux_logits,
        aux_feats,
        final_feat,
        F.one_hot(labels, 5).float(),
        [F.one_hot(joint, 20).float()] * 3,
        loss_args(lambda_kl=0.0, lambda_feat=0.0),
    )
    reference = hssakd.teacher_loss(logits, aux_logits, labels, joint)
    torch.testing.assert_close(terms["total"], reference["total"])
    (ours,) = torch.autograd.grad(terms["total"], logits)
    (theirs,) = torch.autograd.grad(reference["total"], logits)
    torch.testing.assert_close(ours, theirs)


def test_final_head_term_is_pskds_loss_with_pskds_targets():
    torch.manual_seed(0)
    buffer = torch.softmax(torch.randn(10, 7), 1)
    ids, labels, logits = torch.tensor([7, 2, 5]), torch.tensor([1, 6, 0]), torch.randn(3, 7)
    ours = soft_cross_entropy(logits, read_targets(buffer[:, None].clone(), ids, labels[:, None], 0.3, False)[:, 0])
    theirs = pskd.soft_cross_entropy(logits, pskd.read_targets(buffer.clone(), ids, labels, 0.3, False))
    torch.testing.assert_close(ours, theirs)


# ---- gradient flow in the network ----


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    model = common.build_auxiliary_model("resnet8", 10).train()
    rotated = common.rotations(torch.randn(2, 3, 32, 32))
    return model, rotated


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_auxiliary_losses_train_the_backbone(network):
    model, rotated = network
    _, aux_logits, _ = model(rotated, is_feat=True)[1:]
    joint_targets = F.one_hot(torch.arange(8) % 40, 40).float()
    grads = grads_of(model, sum(soft_cross_entropy(head, joint_targets) for head in aux_logits))
    assert grads["backbone.conv1.weight"].abs().sum() > 0  # no teacher: the heads' losses shape the backbone
    assert grads["backbone.fc.weight"] is None


def test_feature_alignment_leaves_the_last_stage_alone_by_default(network):
    # heads 1 and 2 read layer1 and layer2: with the stop-gradient on the final feature, layer3 and the
    # final classifier receive no gradient from the L2; without it they do
    model, rotated = network
    feats, aux_feats, _, _ = model(rotated, is_feat=True)
    grads = grads_of(model, feature_alignment(aux_feats, feats[-1]))
    assert all(grads[name] is None for name in grads if name.startswith("backbone.layer3"))
    assert grads["backbone.layer1.0.conv1.weight"].abs().sum() > 0
    assert grads["auxiliary_classifier.block_extractor3.0.0.conv1.weight"] is None  # deepest head excluded
    feats, aux_feats, _, _ = model(rotated, is_feat=True)
    grads = grads_of(model, feature_alignment(aux_feats, feats[-1], detach_target=False))
    assert grads["backbone.layer3.0.conv1.weight"].abs().sum() > 0


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


def test_lsskd_resumed_run_ends_with_the_weights_and_buffers_of_an_uninterrupted_one(tmp_path, cifar_dir):
    straight = run_script("lsskd.py", *tiny_flags(cifar_dir), "--epochs", "2", "--run-name", "straight", cwd=tmp_path)
    stopped = run_script("lsskd.py", *tiny_flags(cifar_dir), "--epochs", "1", "--run-name", "resumed", cwd=tmp_path)
    stopped_buffer = load_run(tmp_path / "runs" / "resumed")["aux_predictions"]
    resumed = run_script(
        "lsskd.py",
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
    for part in ("model", "auxiliary_classifier"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), name
    for name in ("final_predictions", "aux_predictions"):
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["aux_predictions"], stopped_buffer)  # epoch 2 rewrote the buffer
    for slot, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][slot]["momentum_buffer"])
    # The 1-epoch run had E = 1, so it logged alpha_0 = 0.8 instead of 0.4; epoch-0 targets are one-hot
    # whatever alpha is, which is why the weights agree. Everything else must be equal.
    strip = lambda rows: [
        {k: v for k, v in row.items() if not k.startswith("speed/") and (k, row["epoch"]) != ("lsskd/alpha", 1)}
        for row in rows
    ]
    assert strip(read_metrics(tmp_path / "runs" / "straight")) == strip(read_metrics(tmp_path / "runs" / "resumed"))

    # The uninterrupted run: buffer shapes and contents, the recipe, the logged terms.
    final, aux = a["final_predictions"], a["aux_predictions"]
    assert final.shape == (64, 1, 100) and aux.shape == (64, 3, 4, 400)
    assert final.dtype == aux.dtype == torch.float16
    torch.testing.assert_close(aux.float().sum(-1), torch.ones(64, 3, 4), rtol=0, atol=5e-3)
    assert not (aux.float().amax(-1) == 1).all()  # softmax rows, no longer the epoch-0 one-hots
    rows = read_metrics(tmp_path / "runs" / "straight")
    assert [row["lsskd/alpha"] for row in rows] == [pytest.approx(0.4), pytest.approx(0.8)]
    assert [row["lr"] for row in rows] == [0.05, 0.05]
    for row in rows:
        assert row["loss/total"] == pytest.approx(
            row["loss/final"] + row["loss/sad"] + row["loss/kl"] + row["loss/feat"], rel=1e-5
        )
        assert row["loss/sad"] == pytest.approx(sum(row[f"loss/sad_{head}"] for head in (1, 2, 3)), rel=1e-5)
        assert row["loss/kl"] > 0 and row["loss/feat"] > 0
    assert rows[0]["loss/final"] == pytest.approx(rows[0]["loss/ce"], rel=1e-5)  # epoch-0 targets are one-hot
    assert rows[1]["loss/final"] != pytest.approx(rows[1]["loss/ce"], rel=1e-3)
    summary = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())
    assert summary["last_top1"] == pytest.approx(rows[-1]["test/top1"])
    assert len(summary["aux_ss_top1"]) == len(summary["aux_class_top1"]) == 3
    args = summary["args"]
    assert (args["alpha_T"], args["kl_teacher"], args["final_rows"], args["buffer_dtype"]) == (
        0.8,
        "deepest",
        "upright",
        "fp16",
    )
    assert args["lr_milestones"] == [150, 180, 210] and args["normalize"] == "repdistiller"
    group = a["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    assert "final_rows=upright" in straight.stdout and "[INTERP]" in straight.stdout


def test_buffers_hold_this_iterations_train_mode_predictions_before_the_update(tmp_path, cifar_dir):
    # One batch in one epoch: every row must be softmax of the initial weights, in train mode, on
    # epoch 0's augmented and rotated images, written at the sample's dataset index.
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
        "--buffer-dtype",
        "fp32",
        "--buffer-device",
        "cpu",
        "--final-rows",
        "all",
        "--run-name",
        "one_step",
    ]
    result = run_script("lsskd.py", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    checkpoint = load_run(tmp_path / "runs" / "one_step")

    args = SimpleNamespace(dataset="cifar100", data_dir=cifar_dir, train_subset=32, normalize="repdistiller", amp=False)
    data = common.load_data(args, torch.device("cpu"))
    torch.manual_seed(1)  # lsskd.py's seed: the same initial weights
    model = common.build_auxiliary_model("resnet8", 100).train()
    [(images, labels, sample_ids)] = common.train_batches(data, 32, common.epoch_generator(1, 0))
    assert sample_ids.tolist() != list(range(32))  # shuffled: batch position is not the dataset index
    with torch.no_grad():
        aux_logits, logits = model(common.rotations(images))
    final_expected = F.softmax(logits, 1).view(32, 4, 100)  # --final-rows all: one row per rotation
    aux_expected = per_sample([F.softmax(head, 1) for head in aux_logits])
    torch.testing.assert_close(checkpoint["final_predictions"][sample_ids], final_expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(checkpoint["aux_predictions"][sample_ids], aux_expected, rtol=0, atol=1e-6)
    common.load_weights(model.backbone, checkpoint, "last.pth")
    with torch.no_grad():
        after_update = F.softmax(model(common.rotations(images))[1], 1).view(32, 4, 100)
    assert (checkpoint["final_predictions"][sample_ids] - after_update).abs().max() > 1e-4  # tells the two apart


def test_everything_switched_off_trains_exactly_like_hsakds_joint_teacher(tmp_path, cifar_dir):
    # the sanity floor: the same file runs HSAKD's Teacher* training; compare with hssakd.py's stage 1
    common_flags = ["--dataset", "cifar100", "--data-dir", cifar_dir, "--train-subset", "64", "--batch-size", "32"]
    ours = run_script(
        "lsskd.py",
        *common_flags,
        "--model",
        "resnet8",
        "--epochs",
        "1",
        "--lambda-kl",
        "0",
        "--lambda-feat",
        "0",
        "--aux-soft-targets",
        "false",
        "--final-soft-targets",
        "false",
        "--run-name",
        "hsakd_like",
        cwd=tmp_path,
    )
    theirs = run_script(
        "hssakd.py",
        *common_flags,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--teacher-mode",
        "joint",
        "--teacher-epochs",
        "1",
        "--epochs",
        "1",
        cwd=tmp_path,
    )
    for result in (ours, theirs):
        assert result.returncode == 0, result.stderr
    a = load_run(tmp_path / "runs" / "hsakd_like")
    assert a["final_predictions"] is None and a["aux_predictions"] is None
    [stage1] = (tmp_path / "checkpoints" / "cifar100").glob("resnet8_n64_aux_joint_e1_*[0-9a-f].pth")
    b = torch.load(stage1, weights_only=False)["model"]
    ours_state = {**a["model"], **{f"auxiliary_classifier.{k}": v for k, v in a["auxiliary_classifier"].items()}}
    theirs_state = {k.removeprefix("backbone."): v for k, v in b.items()}
    assert set(ours_state) == set(theirs_state)
    for name, tensor in ours_state.items():  # soft CE with one-hot targets vs F.cross_entropy: rounding only
        torch.testing.assert_close(tensor, theirs_state[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("model, message", [("PreActResNet18", "no auxiliary classifiers"), ("resnet9", "resnet9")])
def test_model_without_auxiliary_classifiers_is_a_clear_error(tmp_path, cifar_dir, model, message):
    result = run_script("lsskd.py", "--data-dir", cifar_dir, "--model", model, "--epochs", "1", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_map_level_and_final_teacher_run_end_to_end_and_a_mismatch_stops_before_training(tmp_path, cifar_dir):
    flags = tiny_flags(cifar_dir, "--epochs", "1", "--feat-level", "map", "--kl-teacher", "final")
    result = run_script("lsskd.py", *flags, "--run-name", "map", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = read_metrics(tmp_path / "runs" / "map")[0]
    assert row["loss/kl"] > 0 and row["loss/feat"] > 0 and math.isfinite(row["loss/total"])
    summary = json.loads((tmp_path / "runs" / "map" / "summary.json").read_text())
    assert summary["args"]["feat_level"] == "map" and summary["args"]["kl_teacher"] == "final"
    refused = run_script(
        "lsskd.py",
        *tiny_flags(cifar_dir, "--epochs", "1", "--feat-level", "map"),
        "--model",
        "ShuffleV2",
        "--run-name",
        "refused",
        cwd=tmp_path,
    )
    assert refused.returncode != 0 and "--feat-level pooled" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "runs" / "refused").exists()  # refused before the run folder is made
