"""sskd.py: each loss term against hand-computed values, selective transfer, the similarity matrix,
the four-copy data pipeline, the teacher-head stage, heads for every backbone, and one end-to-end
run of all three stages (with the cached head reused and an exact resume)."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

import common
import sskd
from sskd import projection_head, selective_transfer_mask, similarity_matrix, sskd_loss


def interleave(upright, rotated):
    """Rows in the rotation layout (row 4i+k = image i at rotation k) from upright [B, ...] and
    rotated [3B, ...] rows (rotated row j = image j // 3)."""
    return torch.cat([upright[:, None], rotated.unflatten(0, (-1, 3))], dim=1).flatten(0, 1)


def swapped_pair_kl(x, temperature):
    """KL(softmax([0, x]/T) || softmax([x, 0]/T)) by hand: with p2 = sigmoid(x/T), p1 = 1 - p2 and
    the student's probabilities swapped, KL = (p2 - p1) * log(p2 / p1) = tanh(x / 2T) * x / T."""
    return math.tanh(x / (2 * temperature)) * x / temperature


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- flags ----


def test_defaults_are_the_official_recipe_and_interp_flags_are_marked():
    defaults = sskd.Args()
    assert (defaults.epochs, defaults.batch_size, defaults.lr_milestones) == (240, 64, (150, 180, 210))
    assert defaults.normalize is None  # sskd.py resolves it to SSKD's constants on CIFAR-100
    assert (defaults.t_epochs, defaults.t_lr, defaults.t_milestones, defaults.head_T) == (60, 0.05, (30, 45), 1.0)
    assert (defaults.kd_T, defaults.tf_T, defaults.ss_T, defaults.ratio_tf, defaults.ratio_ss) == (4, 4, 0.5, 1, 0.75)
    assert (defaults.ce_weight, defaults.kd_weight, defaults.tf_weight, defaults.ss_weight) == (0.1, 0.9, 2.7, 10.0)
    docs = common._field_docs(sskd.Args)  # the --help text
    assert set(docs) == {field.name for field in dataclasses.fields(sskd.Args)}
    assert {name for name, text in docs.items() if "[INTERP]" in text} == {
        "teacher_head_path",
        "head_seed",
        "stable_sort",
        "rotation_pipeline",
    }


@pytest.mark.parametrize("bad", [["--ss-T", "0"], ["--head-T", "-1"], ["--t-epochs", "0"]])
def test_bad_numbers_are_refused_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(sskd.Args, bad)
    assert exit_info.value.code == 2 and " ".join(bad) in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--ratio-ss", "1.5"], ["--ratio-tf", "-0.1"], ["--student", "resnet99"]])
def test_bad_flags_stop_the_script_before_any_work(bad, tmp_path):
    # No data folder: had a check been missed, the run would fail later, trying to download CIFAR.
    result = run_script(
        "sskd.py", "--data-dir", tmp_path / "none", "--checkpoint-dir", tmp_path / "cache", *bad, cwd=tmp_path
    )
    flag_or_name = bad[0] if bad[0] != "--student" else bad[1]
    assert result.returncode != 0 and "error: " in result.stderr and flag_or_name in result.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# ---- loss ----


def golden_batch():
    """B = 2 images, 2 classes, labels [0, 1]; see test_sskd_loss_terms_match_hand_computed_values."""
    labels = torch.tensor([0, 1])
    student_logits = interleave(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * 5))
    teacher_logits = interleave(torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0]] * 6))
    # Teacher similarities: rotated rows 0-2 belong to image 0 (positive column 0), rows 3-5 to
    # image 1. Row 2 is the only teacher-wrong row; the student disagrees on rows 0 and 2.
    teacher_similarity = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5]])
    student_similarity = teacher_similarity.clone()
    student_similarity[0] = torch.tensor([0.0, 0.5])
    student_similarity[2] = torch.tensor([0.5, 0.0])
    return (
        *(t.double() for t in (student_logits, teacher_logits, student_similarity, teacher_similarity)),
        labels,
    )  # float64, so the hand values can be compared tightly


def test_sskd_loss_terms_match_hand_computed_values():
    losses, kept = sskd_loss(*golden_batch(), sskd.Args())
    # ce: upright student rows [2, 0] (label 0) and [0, 0] (label 1).
    ce = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    # kd: upright row 0 is a swapped pair with x = 2 at T = 4, row 1 agrees; batchmean over 2, x T^2.
    kd = 16 * swapped_pair_kl(2.0, 4.0) / 2
    # tf: the teacher is wrong on rotated rows 0-2 but ratio_tf = 1 keeps all 6; row 0 is a swapped
    # pair with x = 1 at T = 4.
    tf = 16 * swapped_pair_kl(1.0, 4.0) / 6
    # ss: one wrong row, floor(0.75 * 1) = 0 of it kept: row 2 is dropped, 5 rows remain; row 0 is a
    # swapped pair with x = 0.5 at T = 0.5.
    ss = 0.25 * swapped_pair_kl(0.5, 0.5) / 5
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert losses["kd"].item() == pytest.approx(kd, rel=1e-9)
    assert losses["tf"].item() == pytest.approx(tf, rel=1e-9)
    assert losses["ss"].item() == pytest.approx(ss, rel=1e-9)
    assert losses["total"].item() == pytest.approx(0.1 * ce + 0.9 * kd + 2.7 * tf + 10.0 * ss, rel=1e-9)
    assert kept["tf"].all() and kept["ss"].tolist() == [True, True, False, True, True, True]


def test_sskd_loss_normalises_tf_and_ss_by_the_kept_rows_and_applies_the_weight_flags():
    batch = golden_batch()
    everything = sskd_loss(*batch, dataclasses.replace(sskd.Args(), ratio_ss=1.0))[
        0
    ]  # row 2 kept: two swapped rows over 6
    assert everything["ss"].item() == pytest.approx(0.25 * 2 * swapped_pair_kl(0.5, 0.5) / 6, rel=1e-9)
    only_correct = sskd_loss(*batch, dataclasses.replace(sskd.Args(), ratio_tf=0.0))[
        0
    ]  # tf over the 3 teacher-correct rows, all agreeing
    assert only_correct["tf"].item() == pytest.approx(0.0, abs=1e-12)
    weighted = sskd_loss(
        *batch, dataclasses.replace(sskd.Args(), ce_weight=1.0, kd_weight=0.0, tf_weight=0.0, ss_weight=2.0)
    )[0]
    assert weighted["total"].item() == pytest.approx(weighted["ce"].item() + 2 * weighted["ss"].item(), rel=1e-9)


def test_sskd_loss_gradient_reaches_student_logits_and_similarities_only():
    student_logits, teacher_logits, student_similarity, teacher_similarity, labels = golden_batch()
    student_logits.requires_grad_(True)
    student_similarity.requires_grad_(True)
    teacher_similarity.requires_grad_(True)  # even if the caller forgot no_grad, S_t is a fixed target
    sskd_loss(student_logits, teacher_logits, student_similarity, teacher_similarity, labels, sskd.Args())[0][
        "total"
    ].backward()
    assert student_logits.grad.abs().sum() > 0 and student_similarity.grad.abs().sum() > 0
    assert teacher_similarity.grad is None
    assert student_similarity.grad[2].abs().sum() == 0  # the dropped row does not teach


# ---- selective transfer ----


def teacher_matrix_with_wrong_rows(num_images, wrong_rows, generator):
    """[3B, B] teacher similarities whose argmax is the positive column j // 3 except on wrong_rows."""
    scores = torch.rand(3 * num_images, num_images, generator=generator)
    positives = torch.arange(num_images).repeat_interleave(3)
    for row in range(3 * num_images):
        scores[row, positives[row]] = -1.0 if row in wrong_rows else 2.0
    return scores, positives


@pytest.mark.parametrize("wrong", [0, 1, 3, 4, 7, 12])
def test_selective_transfer_keeps_correct_rows_plus_floor_of_wrong_times_ratio(wrong):
    generator = torch.Generator().manual_seed(wrong)
    wrong_rows = set(torch.randperm(12, generator=generator)[:wrong].tolist())
    scores, positives = teacher_matrix_with_wrong_rows(4, wrong_rows, generator)
    keep = selective_transfer_mask(scores, positives, 0.75)
    assert keep.sum().item() == 12 - wrong + math.floor(0.75 * wrong)
    assert all(keep[row] for row in range(12) if row not in wrong_rows)  # teacher-correct rows always kept
    assert selective_transfer_mask(scores, positives, 1.0).all()  # ratio_tf = 1 keeps every row
    assert selective_transfer_mask(scores, positives, 0.0).sum().item() == 12 - wrong


def test_selective_transfer_drops_the_worst_ranked_wrong_rows():
    # 4 images -> 12 rotated rows and 4 columns. Rows 2, 5, 7, 10 are teacher-wrong; their positive
    # column sits at rank 1, 3, 2 and 2 (0 = top-1).
    wrong_ranks = {2: 1, 5: 3, 7: 2, 10: 2}
    positives = torch.arange(4).repeat_interleave(3)
    scores = torch.zeros(12, 4)
    for row in range(12):
        order = [column for column in range(4) if column != positives[row]]  # columns by descending score
        order.insert(wrong_ranks.get(row, 0), positives[row].item())
        scores[row, order] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    keep = selective_transfer_mask(scores, positives, 0.75)  # floor(3) of 4 wrong rows kept
    assert [row for row in range(12) if not keep[row]] == [5]  # the worst-ranked one is dropped
    keep = selective_transfer_mask(scores, positives, 0.5)  # 2 kept: rank 1, then the first rank-2 row
    assert [row for row in range(12) if not keep[row]] == [5, 10]


# ---- similarity matrix and heads ----


def test_similarity_matrix_compares_each_rotated_row_with_every_upright_row():
    # Two images; upright projections (1, 0) and (0, 3); rotated rows in order (2, 0), (2, 1),
    # (0, -1) for image 0 and (1, 0), (-1, -2), (3, 4) for image 1.
    projections = torch.tensor(
        [[1.0, 0.0], [2.0, 0.0], [2.0, 1.0], [0.0, -1.0], [0.0, 3.0], [1.0, 0.0], [-1.0, -2.0], [3.0, 4.0]]
    )
    root5 = math.sqrt(5)
    expected = torch.tensor(
        [[1.0, 0.0], [2 / root5, 1 / root5], [0.0, -1.0], [1.0, 0.0], [-1 / root5, -2 / root5], [0.6, 0.8]]
    )
    similarity = similarity_matrix(projections)
    assert torch.allclose(similarity, expected, atol=1e-6)
    assert sskd.positive_columns(similarity).tolist() == [0, 0, 0, 1, 1, 1]
    correct = common.accuracy_count(similarity, sskd.positive_columns(similarity))
    assert correct.item() == 4  # rows 3 and 4 prefer image 0's upright copy

    random_rows = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))  # matches F.cosine_similarity
    reference = torch.stack(
        [
            torch.stack(
                [
                    F.cosine_similarity(random_rows[4 * (j // 3) + j % 3 + 1], random_rows[4 * b], dim=0)
                    for b in range(3)
                ]
            )
            for j in range(9)
        ]
    )
    assert torch.allclose(similarity_matrix(random_rows), reference, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --amp: cosines stay fp32
        assert similarity_matrix(random_rows).dtype == torch.float32


# d of the pooled feature per backbone, and head size 2(d^2 + d) (docs/sskd.md).
FEATURE_DIMS = {
    **{
        name: 64
        for name in (
            "resnet8",
            "resnet14",
            "resnet20",
            "resnet32",
            "resnet44",
            "resnet56",
            "resnet110",
            "wrn_16_1",
            "wrn_40_1",
        )
    },
    "wrn_16_2": 128,
    "wrn_40_2": 128,
    "resnet8x4": 256,
    "resnet32x4": 256,
    **{name: 512 for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "ShuffleV1": 960,
    "ShuffleV2": 1024,
    "MobileNetV2": 1280,
    "ResNet50": 2048,
}
HEAD_PARAMETERS = {
    64: 8_320,
    128: 33_024,
    256: 131_584,
    512: 525_312,
    960: 1_845_120,
    1024: 2_099_200,
    1280: 3_279_360,
    2048: 8_392_704,
}


@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
def test_projection_head_fits_every_zoo_backbone_with_the_official_size(name):
    model = common.build_model(name, 100).eval()
    head = projection_head(model.feat_dim)
    assert model.feat_dim == FEATURE_DIMS[name]
    assert sum(p.numel() for p in head.parameters()) == HEAD_PARAMETERS[FEATURE_DIMS[name]]
    assert list(head.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # SSKD's proj_head.*
    with torch.no_grad():
        feats, logits = model(common.rotations(torch.randn(2, 3, 32, 32)), is_feat=True)
        assert similarity_matrix(head(feats[-1])).shape == (6, 2) and logits.shape == (8, 100)


def test_teacher_head_loads_from_sskd_wrapper_checkpoints_and_rejects_wrong_sizes(tmp_path):
    head = projection_head(64)
    wrapper = {
        "state_dict": {
            **{f"proj_head.{k}": v for k, v in head.state_dict().items()},
            "backbone.fc.weight": torch.zeros(100, 64),
        }
    }  # SSKD's ckpt/teacher.pth
    torch.save(wrapper, tmp_path / "teacher.pth")
    loaded, _ = sskd.load_teacher_head(tmp_path / "teacher.pth", 64, "cpu")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in head.state_dict().items())
    with pytest.raises(common.ConfigError, match="128-d"):
        sskd.load_teacher_head(tmp_path / "teacher.pth", 128, "cpu")
    with pytest.raises(common.ConfigError, match="does not exist"):
        sskd.load_teacher_head(tmp_path / "missing.pth", 64, "cpu")


def test_head_cache_sits_beside_the_teacher_and_changes_with_teacher_and_recipe(tmp_path):
    args = sskd.Args(teacher="resnet56", checkpoint_dir=str(tmp_path), ce_teacher_epochs=1, normalize="sskd")
    teacher_file = tmp_path / "teacher.pth"
    teacher_file.write_bytes(b"one")
    path = sskd.teacher_head_cache_path(args, teacher_file)
    assert path.parent == common.teacher_cache_path(args).parent
    assert path.name.startswith("resnet56_e1_sskd_head_e60_")
    assert sskd.teacher_head_cache_path(args, teacher_file) == path
    assert sskd.teacher_head_cache_path(dataclasses.replace(args, t_epochs=30), teacher_file).name.startswith(
        "resnet56_e1_sskd_head_e30_"
    )
    assert sskd.teacher_head_cache_path(dataclasses.replace(args, head_T=0.5), teacher_file) != path
    assert sskd.teacher_head_cache_path(dataclasses.replace(args, seed=7), teacher_file) == path  # any student seed
    teacher_file.write_bytes(b"two")
    assert sskd.teacher_head_cache_path(args, teacher_file) != path


# ---- data pipeline ----


def toy_data(num_images=6):
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in common.NORMALIZE["sskd"])
    return common.CifarData(
        images, torch.arange(num_images), images[:1], torch.zeros(1, dtype=torch.long), 10, mean, std
    )


def test_sskd_pipeline_shares_one_flip_and_crops_each_rotated_copy_separately():
    data = toy_data()
    images, labels, indices = next(sskd.sskd_batches(data, sskd.Args(batch_size=6), torch.Generator().manual_seed(0)))
    assert images.shape == (24, 3, 32, 32) and torch.equal(labels, data.train_labels[indices])
    offsets_per_image = []
    for i, index in enumerate(indices.tolist()):
        matches = []  # per copy: every (flip, top, left) that reproduces the row
        for k in range(4):
            found = set()
            for flip in (False, True):
                raw = data.train_images[index].flip(2) if flip else data.train_images[index]
                padded = F.pad(torch.rot90(raw, k, dims=(1, 2)), (4, 4, 4, 4))  # rotate, then pad-4 crop
                for top in range(9):
                    for left in range(9):
                        crop = data.normalize(padded[None, :, top : top + 32, left : left + 32])[0]
                        if torch.equal(crop, images[4 * i + k]):
                            found.add((flip, top, left))
            assert found, f"row {4 * i + k} is no pad-4 crop of image {index} rotated by {k} (or its mirror)"
            matches.append(found)
        shared_flips = set.intersection(*({flip for flip, _, _ in found} for found in matches))
        assert shared_flips, "the four copies of an image must share one flip decision"
        offsets_per_image.append([sorted(found)[0][1:] for found in matches])
    assert any(len(set(offsets)) > 1 for offsets in offsets_per_image), "crops must be drawn per copy"


def test_gpu_pipeline_rotates_one_augmented_image():
    gpu_args = sskd.Args(batch_size=6, rotation_pipeline="gpu")
    images, _, _ = next(sskd.sskd_batches(toy_data(), gpu_args, torch.Generator().manual_seed(0)))
    for i in range(6):
        for k in range(4):
            assert torch.equal(images[4 * i + k], torch.rot90(images[4 * i], k, dims=(1, 2)))


# ---- stage 2 ----


def test_head_stage_changes_only_the_head(cifar_dir, tmp_path):
    args = sskd.Args(dataset="cifar10", data_dir=str(cifar_dir), t_epochs=1, train_subset=128, normalize="cifar10")
    data = common.load_data(args, torch.device("cpu"))
    teacher = common.build_model("resnet8", 10)  # gradients left on: the stage itself must protect it
    teacher.train()  # the stage must switch it to eval, or BN statistics would move
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    torch.manual_seed(0)
    initial_head = projection_head(64).state_dict()
    torch.manual_seed(0)  # train_teacher_head builds its head first: the same initial weights
    sskd.train_teacher_head(teacher, tmp_path / "teacher.pth", data, args, tmp_path, tmp_path / "head.pth")
    saved = torch.load(tmp_path / "head.pth", weights_only=True)
    head, test_ss = projection_head(64), saved["test_ss_top1"]
    head.load_state_dict(saved["head"])
    after = teacher.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before), "teacher weights or BN stats changed"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not torch.equal(initial_head[name], tensor) for name, tensor in head.state_dict().items())
    [metrics] = read_metrics(tmp_path / "head_metrics.jsonl")
    assert 0 < metrics["loss/head"] < math.log(64) + 2  # CE over 64 cosines in [-1, 1]
    assert metrics["test/ss_top1"] == test_ss and 0 <= test_ss <= 100 and metrics["lr"] == 0.05


# ---- end to end ----


def test_sskd_runs_all_three_stages_reuses_the_cached_head_and_resumes_exactly(tmp_path, cifar_dir):
    flags = [
        "--dataset",
        "cifar10",
        "--data-dir",
        cifar_dir,
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--ce-teacher-epochs",
        "1",
        "--t-epochs",
        "1",
        "--train-subset",
        "96",
        "--batch-size",
        "32",
        "--lr-milestones",
        "1",
    ]
    straight = run_script("sskd.py", *flags, "--epochs", "2", "--run-name", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    out = straight.stdout
    assert "training one with baseline.py" in out and "training the teacher head" in out
    assert out.index("teacher resnet8 from") < out.index("head epoch 1/1") < out.index("epoch 1/2")
    [head_file] = (tmp_path / "checkpoints" / "cifar10").glob("resnet8_e1_n96_sskd_head_e1_*.pth")
    assert torch.load(head_file, weights_only=False)["feat_dim"] == 64
    [head_row] = read_metrics(tmp_path / "runs" / "straight" / "head_metrics.jsonl")
    assert head_row["epoch"] == 1 and {"loss/head", "train/ss_top1", "test/ss_top1"} <= set(head_row)
    head_line = next(line for line in out.splitlines() if line.startswith("head epoch 1/1"))
    assert "loss/head" in head_line and "test/ss_top1" in head_line and "img/s" in head_line  # the common line

    stopped = run_script("sskd.py", *flags, "--epochs", "1", "--run-name", "resumed", cwd=tmp_path)
    resumed = run_script(
        "sskd.py", *flags, "--epochs", "2", "--run-name", "resumed", "--resume", "--resume-with-changes", cwd=tmp_path
    )
    for result in (stopped, resumed):
        assert result.returncode == 0, result.stderr
        assert "training" not in result.stdout
        assert f"teacher head from {head_file.relative_to(tmp_path)}" in result.stdout

    rows = read_metrics(tmp_path / "runs" / "straight" / "metrics.jsonl")
    first = rows[0]
    assert [row["lr"] for row in rows] == [0.05, pytest.approx(0.005)]
    assert 0 < first["loss/ce"] < 3 * math.log(10) and first["loss/kd"] > 0 and first["loss/tf"] > 0
    assert first["loss/total"] == pytest.approx(
        0.1 * first["loss/ce"] + 0.9 * first["loss/kd"] + 2.7 * first["loss/tf"] + 10.0 * first["loss/ss"], rel=1e-4
    )
    assert first["train/kept_tf"] == 100.0 and 75.0 <= first["train/kept_ss"] <= 100.0
    assert 0 <= first["train/ss_top1"] <= 100 and 0 <= first["test/top1"] <= first["test/top5"] <= 100
    assert first["speed/images_per_s"] > 0

    a = torch.load(tmp_path / "runs" / "straight" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "runs" / "resumed" / "last.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "student_head"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    strip = lambda metrics: [{k: v for k, v in row.items() if not k.startswith("speed/")} for row in metrics]
    assert strip(rows) == strip(read_metrics(tmp_path / "runs" / "resumed" / "metrics.jsonl"))

    summary = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())
    assert summary["last_top1"] == pytest.approx(rows[-1]["test/top1"])
    assert summary["teacher_head_file"] == str(head_file.relative_to(tmp_path))
    assert summary["teacher_file"] == "checkpoints/cifar10/resnet8_e1_n96.pth" and 0 <= summary["teacher_top1"] <= 100
    assert summary["args"]["ratio_ss"] == 0.75 and summary["args"]["rotation_pipeline"] == "sskd"
