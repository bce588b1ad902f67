"""hssakd.py and common's auxiliary classifiers: golden loss values, the rotation/joint-label layout,
the branch architectures against the reference maps of zoo_state_dicts.json, the frozen teacher, and end-to-end runs."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from conftest import ZOO_REFERENCE, run_script

import common
from hssakd import Args, check_pair, kd_loss, stage1_cache_path, student_loss, teacher_loss

# zoo name -> reference entry of zoo_state_dicts.json
AUX_REFERENCE = {
    "resnet20": "resnet20_aux",
    "resnet56": "resnet56_aux",
    "resnet8x4": "resnet8x4_aux",
    "resnet32x4": "resnet32x4_aux",
    "wrn_16_2": "wrn_16_2_aux",
    "wrn_40_1": "wrn_40_1_aux",
    "wrn_40_2": "wrn_40_2_aux",
    "vgg13": "vgg13_bn_aux",
    "vgg8": "vgg8_bn_aux",
    "MobileNetV2_hsakd": "mobilenetV2_aux",
    "ShuffleV1": "ShuffleV1_aux",
    "ShuffleV2": "ShuffleV2_aux",
    "ResNet50": "ResNet50_aux",
    "resnet110": "resnet110_aux",
    "resnet32": "resnet32_aux",
    # winycg/HSAKD@28c8dc2 models/resnet_imagenet.py `resnet{18,34,50}_imagenet_aux`: their outputs with our
    # weights copied in were identical (0.0 difference, 64 px input) when the reference maps were recorded
    "resnet18_imagenet": "resnet18_imagenet_aux",
    "resnet34_imagenet": "resnet34_imagenet_aux",
    "resnet50_imagenet": "resnet50_imagenet_aux",
}

# parameters per auxiliary branch 1 ... L of the official models
BRANCH_PARAMS = {
    "resnet20": [283_344, 231_696, 247_952],
    "resnet56": [838_608, 675_600, 691_856],
    "resnet8x4": [1_251_984, 1_021_840, 1_283_472],
    "resnet32x4": [7_156_368, 5_744_528, 6_006_160],
    "wrn_16_2": [708_560, 577_040, 642_704],
    "wrn_40_1": [560_816, 453_584, 470_032],
    "wrn_40_2": [2_186_192, 1_758_736, 1_824_400],
    "vgg13": [9_577_104, 9_355_152, 8_468_880, 9_648_528],
    "vgg8": [4_117_008, 4_042_896, 3_747_216, 4_926_864],
    "MobileNetV2": [1_191_768, 1_180_080, 1_048_688, 1_250_960],
    "MobileNetV2_hsakd": [1_191_768, 1_180_080, 1_048_688, 1_250_960],
    "ShuffleV1": [1_198_540, 901_240, 1_018_960],
    "ShuffleV2": [1_632_716, 1_388_536, 1_498_736],
    "ResNet50": [24_102_288, 22_882_704, 15_784_336, 14_207_376],
}


def meta_aux(name, num_classes=100):
    """Shapes and counts without allocating weights."""
    with torch.device("meta"):
        return common.build_auxiliary_model(name, num_classes)


def loss_args(**overrides):
    return SimpleNamespace(
        **{
            "kd_T": 3.0,
            "ce_weight": 1.0,
            "kl_p_weight": 1.0,
            "kl_q_weight": 1.0,
            "student_aux_ce_weight": 0.0,
            **overrides,
        }
    )


def stage1_files(tmp_path, prefix):
    return [path for path in (tmp_path / "checkpoints" / "cifar100").glob(prefix + "*.pth") if "_best" not in path.name]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- rotation layout and joint labels ----


def test_rotated_rows_are_sample_major_and_joint_labels_are_4y_plus_k():
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([7, 0, 99])
    rotated, joint = common.rotations(images), common.rotation_joint_labels(labels)
    assert rotated.shape == (12, 3, 32, 32)
    for i in range(3):
        for k in range(4):
            assert torch.equal(rotated[4 * i + k], torch.rot90(images[i], k, dims=(1, 2)))
    for k in range(4):
        assert torch.equal(joint.view(-1, 4)[:, k], 4 * labels + k)


# ---- losses: golden values by hand ----


def test_teacher_loss_is_upright_ce_plus_each_branch_ce_on_joint_labels():
    # B = 1, C = 2, two branches with 8 joint outputs. Upright row: logits (ln 3, 0), label 0 ->
    # CE = ln(4/3). The rotated rows have absurd logits: they must not enter the final CE.
    # Zero branch logits: CE = ln 8 on every row, for each branch.
    logits = torch.tensor([[math.log(3.0), 0.0], [-50.0, 50.0], [-50.0, 50.0], [-50.0, 50.0]])
    aux = [torch.zeros(4, 8), torch.zeros(4, 8)]
    labels = torch.tensor([0])
    losses = teacher_loss(logits, aux, labels, common.rotation_joint_labels(labels))
    assert losses["ce"].item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    assert losses["aux_ce"].item() == pytest.approx(2 * math.log(8), abs=1e-6)
    assert losses["total"].item() == pytest.approx(math.log(4 / 3) + 2 * math.log(8), abs=1e-6)


def test_teacher_branch_ce_targets_the_rotation_slot_of_the_class():
    # A branch that puts all its mass on 4y + k for row k is perfect: CE ~ 0.
    labels = torch.tensor([1])
    joint = common.rotation_joint_labels(labels)  # 4, 5, 6, 7
    perfect = torch.full((4, 8), -30.0)
    perfect[torch.arange(4), joint] = 30.0
    assert teacher_loss(torch.zeros(4, 2), [perfect], labels, joint)["aux_ce"].item() < 1e-6


def student_golden_inputs():
    """B = 1, C = 2, L = 2 branches of 8 joint outputs, T = 3 (see the test below)."""
    student_logits = torch.tensor([[0.0, 0.0], [5.0, -5.0], [5.0, -5.0], [5.0, -5.0]])
    teacher_logits = student_logits.clone()
    teacher_logits[0] = torch.tensor([3 * math.log(3.0), 0.0])  # softmax(/3) = (3/4, 1/4)
    student_aux = [torch.zeros(4, 8), torch.zeros(4, 8)]  # uniform 1/8
    teacher_branch2 = torch.zeros(4, 8)
    teacher_branch2[:, 0] = 3 * math.log(3.0)  # softmax(/3) = (3, 1, ..., 1) / 10 on every row
    teacher_aux = [torch.zeros(4, 8), teacher_branch2]
    labels = torch.tensor([0])
    return student_logits, student_aux, teacher_logits, teacher_aux, labels, common.rotation_joint_labels(labels)


def test_student_loss_terms_golden_values():
    losses = student_loss(*student_golden_inputs(), loss_args())
    # CE on the upright row only: uniform over 2 classes -> ln 2 (rows 1..3 would give ~0).
    assert losses["ce"].item() == pytest.approx(math.log(2), abs=1e-6)
    # kl_p: only row 0 differs; KL((3/4, 1/4) || (1/2, 1/2)) * T^2, batchmean over all 4 rows.
    kl_row0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert losses["kl_p"].item() == pytest.approx(9 * kl_row0 / 4, abs=1e-6)
    # kl_q_1: identical distributions; kl_q_2: KL(p || uniform 1/8) with p = (0.3, 0.1 x 7) on all rows.
    assert losses["kl_q_1"].item() == pytest.approx(0.0, abs=1e-6)
    kl_branch2 = 0.3 * math.log(0.3 * 8) + 0.7 * math.log(0.1 * 8)
    assert losses["kl_q_2"].item() == pytest.approx(9 * kl_branch2, abs=1e-5)
    assert losses["kl_q"].item() == pytest.approx(9 * kl_branch2, abs=1e-5)
    assert losses["total"].item() == pytest.approx(math.log(2) + 9 * kl_row0 / 4 + 9 * kl_branch2, abs=1e-5)
    assert "aux_ce" not in losses  # HSAKD: no CE on the student's branches


def test_student_loss_weights_and_aux_ce_ablation():
    inputs = student_golden_inputs()
    plain = student_loss(*inputs, loss_args())
    weighted = student_loss(
        *inputs, loss_args(ce_weight=0.5, kl_p_weight=2.0, kl_q_weight=0.0, student_aux_ce_weight=1.0)
    )
    # Zero student branch logits: CE = ln 8 per branch, 2 branches.
    assert weighted["aux_ce"].item() == pytest.approx(2 * math.log(8), abs=1e-6)
    expected = 0.5 * plain["ce"] + 2.0 * plain["kl_p"] + 2 * math.log(8)
    assert weighted["total"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_kd_loss_is_summed_kl_over_rows_times_t_squared():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 12, 400, generator=generator) * 3
    p = torch.softmax(teacher / 3, dim=1)
    summed = (p * (p.log() - torch.log_softmax(student / 3, dim=1))).sum()
    assert kd_loss(student, teacher, 3.0).item() == pytest.approx((summed / 12 * 9).item(), rel=1e-5)


def test_auxiliary_kl_gradient_reaches_the_student_backbone():
    torch.manual_seed(0)
    student = common.build_auxiliary_model("resnet8", 10).train()
    rotated, labels = common.rotations(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])
    aux_logits, logits = student(rotated)
    teacher_aux = [torch.randn_like(branch) for branch in aux_logits]
    only_kl_q = loss_args(ce_weight=0.0, kl_p_weight=0.0)
    student_loss(
        logits, aux_logits, logits.detach(), teacher_aux, labels, common.rotation_joint_labels(labels), only_kl_q
    )["total"].backward()
    assert student.backbone.conv1.weight.grad.abs().sum() > 0
    assert student.backbone.fc.weight.grad.abs().sum() == 0  # the final classifier is not in kl_q
    # HSAKD's grad=False (the frozen teacher): branches train, the backbone gets nothing.
    student.zero_grad(set_to_none=True)
    aux_logits, _ = student(rotated, detach_stages=True)
    sum(branch.sum() for branch in aux_logits).backward()
    assert student.backbone.conv1.weight.grad is None
    assert student.auxiliary_classifier.fc1.weight.grad.abs().sum() > 0


# ---- auxiliary classifiers ----


@pytest.mark.parametrize("name", AUX_REFERENCE)
def test_auxiliary_model_parameters_and_keys_equal_hsakd_reference(name):
    reference = ZOO_REFERENCE[AUX_REFERENCE[name]]
    model = meta_aux(name)
    assert sum(p.numel() for p in model.parameters()) == reference["params"]
    ours = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    if name.startswith("MobileNetV2"):  # our classifier keeps RepDistiller's classifier.0.*
        ours = {key.replace("backbone.classifier.0.", "backbone.classifier."): shape for key, shape in ours.items()}
    assert ours == reference["state_dict"]


@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_backbones_load_torchvision_weights_and_give_its_outputs(depth):
    import torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(num_classes=10).eval()
    ours = common.build_model(f"resnet{depth}_imagenet", 10).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # torchvision's own keys, nothing else
    assert list(ours.state_dict()) == list(reference.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = ours(images, is_feat=True)
        assert torch.equal(logits, reference(images)) and feats[-1].shape == (2, ours.feat_dim)
    assert [feat.shape[1] for feat in feats[1:5]] == [64 * k * ours.block.expansion for k in (1, 2, 4, 8)]


@pytest.mark.parametrize("name", BRANCH_PARAMS)
def test_each_branch_has_the_official_parameter_count(name):
    classifier = meta_aux(name).auxiliary_classifier
    counts = [
        sum(
            p.numel()
            for key, p in classifier.named_parameters()
            if key.split(".")[0] in (f"block_extractor{branch}", f"fc{branch}", f"bn{branch}", f"conv2_{branch}")
        )
        for branch in range(1, classifier.num_branches + 1)
    ]
    assert counts == BRANCH_PARAMS[name]


@pytest.mark.parametrize(
    "name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "MobileNetV2_hsakd", "ShuffleV1", "ShuffleV2", "ResNet50"]
)
def test_branches_take_the_official_inputs_and_end_at_the_last_stage_resolution(name):
    model = meta_aux(name)
    feats, _ = model.backbone(torch.empty(2, 3, 32, 32, device="meta"), is_feat=True)
    last_stage_size = feats[-2].shape[-1]  # the deepest branch runs at stride 1, so all end here
    for branch, index in enumerate(model.branch_inputs, 1):
        out = getattr(model.auxiliary_classifier, f"block_extractor{branch}")(feats[index])
        assert out.shape[-1] == last_stage_size, (branch, tuple(out.shape))
        assert out.shape[1] == (160 if name.startswith("MobileNetV2") else model.feat_dim)  # then conv2_l: 1280
    expected_inputs = {
        "vgg8": (0, 1, 2, 4),
        "MobileNetV2": (1, 2, 3, 4),
        "MobileNetV2_hsakd": (1, 2, 3, 4),
        "ResNet50": (1, 2, 3, 4),
    }.get(name, (1, 2, 3))
    assert model.branch_inputs == expected_inputs
    feats, aux_feats, aux_logits, logits = model(torch.empty(2, 3, 32, 32, device="meta"), is_feat=True)
    assert [tuple(x.shape) for x in aux_logits] == [(2, 400)] * len(expected_inputs)
    assert [tuple(x.shape) for x in aux_feats] == [(2, model.feat_dim)] * len(expected_inputs)


def test_branches_are_fresh_weights_not_shared_with_the_backbone():
    model = common.build_auxiliary_model("resnet8", 100)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not any(id(p) in backbone_ids for p in model.auxiliary_classifier.parameters())
    assert model.auxiliary_classifier.block_extractor3[0][0].conv1.stride == (1, 1)
    assert model.arch == "resnet8_aux" and model.num_classes == 100 and model.num_branches == 3


def conv_std_ratio(module):
    """Mean of std(conv weight) / sqrt(2 / fan_out) over the module's larger convs (1 for HSAKD's init)."""
    ratios = [
        m.weight.std().item() / math.sqrt(2.0 / (m.weight.shape[0] * m.weight[0, 0].numel()))
        for m in module.modules()
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 4096
    ]
    return sum(ratios) / len(ratios)


def test_branch_init_per_family_including_pytorch_defaults_for_vgg_and_shufflev2():
    torch.manual_seed(0)
    resnet, wrn, mbv2, vgg, shufflev2 = (
        common.build_auxiliary_model(name, 100).auxiliary_classifier
        for name in ("resnet8", "wrn_16_1", "MobileNetV2", "vgg8", "ShuffleV2")
    )
    for classifier in (resnet, wrn, mbv2):
        assert conv_std_ratio(classifier) == pytest.approx(1.0, rel=0.1)
        assert torch.count_nonzero(classifier.fc1.bias) == 0
    assert mbv2.fc1.weight.std().item() == pytest.approx(0.01, rel=0.1)
    # PyTorch defaults (kaiming_uniform a=sqrt(5): std = 1/sqrt(3 fan_in)), conv biases not zeroed.
    for classifier in (vgg, shufflev2):
        assert conv_std_ratio(classifier) < 0.7
        assert torch.count_nonzero(classifier.fc1.bias) > 0
    assert torch.count_nonzero(vgg.block_extractor1[1][0].bias) > 0


def test_mobilenetv2_hsakd_has_a_stride1_stem_and_loads_hsakd_classifier_keys():
    model = common.build_model("MobileNetV2_hsakd", 100).eval()
    assert sum(p.numel() for p in model.parameters()) == 812_836 == ZOO_REFERENCE["MobileNetV2_hsakd"]["params"]
    with torch.no_grad():
        feats, logits = model(torch.randn(2, 3, 32, 32), is_feat=True)
    assert [tuple(f.shape[1:]) for f in feats[1:5]] == [(12, 32, 32), (16, 16, 16), (48, 8, 8), (160, 4, 4)]
    assert logits.shape == (2, 100) and feats[-1].shape == (2, 1280)
    state = {key.replace("classifier.0.", "classifier."): value for key, value in model.state_dict().items()}
    assert {k: list(v.shape) for k, v in state.items()} == ZOO_REFERENCE["MobileNetV2_hsakd"]["state_dict"]
    fresh = common.build_model("MobileNetV2_hsakd", 100)
    common.load_weights(fresh, {"state_dict": state}, "hsakd-format")
    assert torch.equal(fresh.classifier[0].weight, model.classifier[0].weight)


def test_pairs_with_different_branch_counts_are_refused():
    check_pair("resnet56", "resnet20")
    check_pair("vgg13", "MobileNetV2")
    with pytest.raises(common.ConfigError, match="4 auxiliary branches, resnet20 3"):
        check_pair("vgg13", "resnet20")
    with pytest.raises(common.ConfigError, match="unknown architecture"):
        check_pair("resnet56", "resnet21")


def test_branch_accuracy_counts_joint_and_summed_class_predictions():
    class Oracle(nn.Module):
        """One branch that predicts 4y + k for rotated row k of a test image of class y."""

        num_branches = 1

        def forward(self, rotated):
            labels = self.labels[: len(rotated) // 4]
            logits = torch.zeros(len(rotated), 40)
            logits[torch.arange(len(rotated)), common.rotation_joint_labels(labels)] = 1.0
            return [logits], None

    data = SimpleNamespace(
        test_labels=torch.tensor([3, 9, 0]),
        test_images=torch.zeros(3, 3, 32, 32, dtype=torch.uint8),
        normalize=lambda images: images.float(),
    )
    oracle = Oracle()
    oracle.labels = data.test_labels
    assert common.auxiliary_accuracy(oracle, data, 8, False) == {"ss_top1": [100.0], "class_top1": [100.0]}


def test_stage1_cache_name_tracks_teacher_file_and_recipe_but_not_the_student_seed(tmp_path):
    ce_file = tmp_path / "resnet56.pth"
    ce_file.write_bytes(b"teacher one")
    args = Args(teacher="resnet56", checkpoint_dir=str(tmp_path))
    path = stage1_cache_path(args, ce_file)
    assert path.parent == tmp_path / "cifar100" and path.name.startswith("resnet56_aux_frozen_e100_")
    assert stage1_cache_path(dataclasses.replace(args, seed=7, epochs=3), ce_file) == path
    assert stage1_cache_path(dataclasses.replace(args, teacher_lr=0.1), ce_file) != path
    assert stage1_cache_path(dataclasses.replace(args, teacher_milestones=(40,)), ce_file) != path
    ce_file.write_bytes(b"teacher two")
    assert stage1_cache_path(args, ce_file) != path
    joint = stage1_cache_path(dataclasses.replace(args, teacher_mode="joint"), None)
    assert joint.name.startswith("resnet56_aux_joint_e240_")


def test_defaults_follow_the_hsakd_recipe():
    args = Args()
    assert (args.nesterov, args.momentum, args.weight_decay, args.batch_size, args.epochs) == (True, 0.9, 5e-4, 64, 240)
    assert (args.kd_T, args.teacher_mode, args.teacher_ckpt) == (3.0, "frozen", "last")
    assert args.lr_milestones == (150, 180, 210) and args.teacher_lr == 0.05 and args.student_aux_ce_weight == 0.0
    assert common.default_lr("ShuffleV2") == 0.01 and common.default_lr("resnet20") == 0.05


# ---- end to end (tiny: resnet8 pairs, 64 images, one epoch per stage) ----

TINY = [
    "--dataset",
    "cifar100",
    "--teacher",
    "resnet8",
    "--student",
    "resnet8",
    "--train-subset",
    "64",
    "--batch-size",
    "32",
    "--teacher-epochs",
    "1",
]


def test_frozen_mode_trains_ce_teacher_then_branches_caches_stage1_and_distils(tmp_path, cifar_dir):
    flags = TINY + ["--data-dir", cifar_dir, "--ce-teacher-epochs", "1", "--epochs", "1"]
    first = run_script("hssakd.py", *flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "training one with baseline.py" in first.stdout and "stage 1: training the frozen" in first.stdout
    ce_file = tmp_path / "checkpoints" / "cifar100" / "resnet8_e1_n64.pth"
    [stage1_file] = stage1_files(tmp_path, "resnet8_e1_n64_aux_frozen_e1_")  # + a digest of teacher and recipe
    assert stage1_file.with_name(stage1_file.stem + "_best.pth").exists()

    # Frozen stage 1 leaves the CE teacher's weights AND BN statistics untouched; only branches changed.
    ce_state = torch.load(ce_file, weights_only=False)["model"]
    stage1 = torch.load(stage1_file, weights_only=False)
    assert stage1["arch"] == "resnet8_aux" and stage1["teacher_mode"] == "frozen"
    for key, tensor in ce_state.items():
        assert torch.equal(stage1["model"]["backbone." + key], tensor), key
    torch.manual_seed(1)  # stage 1 seeds --teacher-seed, loads the backbone without drawing, then builds branches
    with torch.random.fork_rng():
        backbone = common.build_model("resnet8", 100)
    initial = common.AuxiliaryModel(backbone, 400).state_dict()
    assert not torch.equal(
        stage1["model"]["auxiliary_classifier.fc1.weight"], initial["auxiliary_classifier.fc1.weight"]
    )
    [teacher_epoch] = read_metrics(tmp_path / "runs" / f"teacher_{stage1_file.stem}_cifar100")
    assert teacher_epoch["loss/aux_ce"] == pytest.approx(3 * math.log(400), rel=0.25)  # 3 fresh 400-way branches
    assert teacher_epoch["lr"] == 0.05

    run_dir = tmp_path / "runs" / "hssakd_frozen_resnet8_resnet8_cifar100_seed1"
    summary = json.loads((run_dir / "summary.json").read_text())
    ce_summary = json.loads((tmp_path / "runs" / "teacher_resnet8_e1_n64_cifar100" / "summary.json").read_text())
    assert summary["teacher_top1"] == pytest.approx(ce_summary["last_top1"])  # same frozen final classifier
    assert summary["teacher_mode"] == "frozen" and summary["teacher_file"].endswith(stage1_file.name)
    assert len(summary["teacher_ss_top1"]) == len(summary["student_class_top1"]) == 3
    assert summary["args"]["kd_T"] == 3.0 and summary["args"]["teacher_ckpt"] == "last"
    [metrics] = read_metrics(run_dir)
    assert metrics["lr"] == 0.05
    assert 0 < metrics["loss/ce"] < 3 * math.log(100)
    assert metrics["loss/kl_q"] == pytest.approx(sum(metrics[f"loss/kl_q_{branch}"] for branch in (1, 2, 3)), rel=1e-4)
    assert metrics["loss/kl_p"] > 0 and all(metrics[f"loss/kl_q_{branch}"] > 0 for branch in (1, 2, 3))
    assert metrics["loss/total"] == pytest.approx(
        metrics["loss/ce"] + metrics["loss/kl_q"] + metrics["loss/kl_p"], rel=1e-4
    )
    assert metrics["speed/images_per_s"] > 0 and summary["last_top1"] == pytest.approx(metrics["test/top1"])
    assert torch.load(run_dir / "best.pth", weights_only=False)["arch"] == "resnet8"  # a plain zoo checkpoint

    second = run_script("hssakd.py", *flags, "--run-name", "again", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "stage 1:" not in second.stdout and "training one" not in second.stdout
    assert stage1_file.name in second.stdout


def test_joint_mode_trains_teacher_from_scratch_and_resume_is_exact(tmp_path, cifar_dir):
    flags = TINY + ["--data-dir", cifar_dir, "--teacher-mode", "joint", "--lr-milestones", "1"]
    straight = run_script("hssakd.py", *flags, "--epochs", "2", "--run-name", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert "stage 1: training the joint" in straight.stdout and "baseline.py" not in straight.stdout
    [stage1_file] = stage1_files(tmp_path, "resnet8_n64_aux_joint_e1_")
    stage1 = torch.load(stage1_file, weights_only=False)
    torch.manual_seed(1)
    untrained = common.build_auxiliary_model("resnet8", 100).state_dict()
    assert stage1["teacher_mode"] == "joint"
    assert not torch.equal(stage1["model"]["backbone.conv1.weight"], untrained["backbone.conv1.weight"])  # trained

    stopped = run_script("hssakd.py", *flags, "--epochs", "1", "--run-name", "resumed", cwd=tmp_path)
    resumed = run_script(
        "hssakd.py", *flags, "--epochs", "2", "--run-name", "resumed", "--resume", "--resume-with-changes", cwd=tmp_path
    )
    for result in (stopped, resumed):
        assert result.returncode == 0, result.stderr
    assert "resumed from" in resumed.stdout and "stage 1:" not in resumed.stdout
    a = torch.load(tmp_path / "runs" / "straight" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "runs" / "resumed" / "last.pth", weights_only=False)
    for part in ("model", "auxiliary_classifier"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith("speed/")} for row in rows]
    assert strip(read_metrics(tmp_path / "runs" / "straight")) == strip(read_metrics(tmp_path / "runs" / "resumed"))
    assert [row["lr"] for row in read_metrics(tmp_path / "runs" / "straight")] == [0.05, pytest.approx(0.005)]


def test_mismatched_pair_fails_with_a_clear_message(tmp_path, cifar_dir):
    result = run_script("hssakd.py", "--data-dir", cifar_dir, "--teacher", "vgg8", "--student", "resnet8", cwd=tmp_path)
    assert result.returncode != 0
    assert "error: vgg8 has 4 auxiliary branches, resnet8 3" in result.stderr
    assert "Traceback" not in result.stderr
