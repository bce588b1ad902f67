"""Backbone zoo: RepDistiller checkpoint compatibility, feature shapes and init ."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch

import common

# zoo_state_dicts.json (name -> {"params", "state_dict": {key: shape}}), shipped so the test
# runs from a clone. Its first 22 entries are RepDistiller@b84f547; the extra backbones and HSAKD
# auxiliary models after them are tested in the test file of the method that needs them.
REFERENCE = json.loads((Path(__file__).parent / "zoo_state_dicts.json").read_text())
REPDISTILLER_NAMES = tuple(REFERENCE)[:22]

# feats (is_feat=True) of the official models for a 32x32 input: C@H is [N, C, H, H], C alone is [N, C].
EXPECTED_FEATS = {
    "resnet8": "16@32, 16@32, 32@16, 64@8, 64",
    "resnet14": "16@32, 16@32, 32@16, 64@8, 64",
    "resnet20": "16@32, 16@32, 32@16, 64@8, 64",
    "resnet32": "16@32, 16@32, 32@16, 64@8, 64",
    "resnet44": "16@32, 16@32, 32@16, 64@8, 64",
    "resnet56": "16@32, 16@32, 32@16, 64@8, 64",
    "resnet110": "16@32, 16@32, 32@16, 64@8, 64",
    "resnet8x4": "32@32, 64@32, 128@16, 256@8, 256",
    "resnet32x4": "32@32, 64@32, 128@16, 256@8, 256",
    "ResNet50": "64@32, 256@32, 512@16, 1024@8, 2048@4, 2048",
    "wrn_16_1": "16@32, 16@32, 32@16, 64@8, 64",
    "wrn_16_2": "16@32, 32@32, 64@16, 128@8, 128",
    "wrn_40_1": "16@32, 16@32, 32@16, 64@8, 64",
    "wrn_40_2": "16@32, 32@32, 64@16, 128@8, 128",
    "vgg8": "64@32, 128@16, 256@8, 512@4, 512@4, 512",
    "vgg11": "64@32, 128@16, 256@8, 512@4, 512@4, 512",
    "vgg13": "64@32, 128@16, 256@8, 512@4, 512@4, 512",
    "vgg16": "64@32, 128@16, 256@8, 512@4, 512@4, 512",
    "vgg19": "64@32, 128@16, 256@8, 512@4, 512@4, 512",
    "MobileNetV2": "16@16, 12@16, 16@8, 48@4, 160@2, 1280",
    "ShuffleV1": "24@32, 240@16, 480@8, 960@4, 960",
    "ShuffleV2": "24@32, 116@16, 232@8, 464@4, 1024",
}

BATCH = 2


def expected_shapes(table_entry):
    shapes = []
    for item in table_entry.split(", "):
        channels, _, size = item.partition("@")
        shapes.append([BATCH, int(channels)] + ([int(size)] * 2 if size else []))
    return shapes


@functools.cache
def model_100(name):
    """One seeded 100-class model per name, shared by the read-only tests below (keeps the file fast)."""
    torch.manual_seed(0)
    return common.build_model(name, 100).eval()


def test_model_names_start_with_the_repdistiller_names_in_zoo_order():
    assert REPDISTILLER_NAMES[-1] == "ShuffleV2"
    assert common.MODEL_NAMES[:22] == REPDISTILLER_NAMES


@pytest.mark.parametrize("name", REPDISTILLER_NAMES)
def test_state_dict_keys_and_shapes_equal_repdistiller(name):
    # Exact equality (BN buffers included) is what makes RepDistiller/mdistiller teachers load strictly.
    ours = {key: list(tensor.shape) for key, tensor in model_100(name).state_dict().items()}
    assert ours == REFERENCE[name]["state_dict"]


@pytest.mark.parametrize("name", REPDISTILLER_NAMES)
def test_parameter_count_equals_reference(name):
    assert sum(p.numel() for p in model_100(name).parameters()) == REFERENCE[name]["params"]


@pytest.mark.parametrize("name", REPDISTILLER_NAMES)
def test_is_feat_shapes_match_the_official_models_and_feat_dim(name):
    model = model_100(name)
    with torch.no_grad():
        feats, logits = model(torch.randn(BATCH, 3, 32, 32), is_feat=True)
    assert [list(f.shape) for f in feats] == expected_shapes(EXPECTED_FEATS[name])
    assert feats[-1].shape[1] == model.feat_dim
    assert list(logits.shape) == [BATCH, 100]


@pytest.mark.parametrize("name", REPDISTILLER_NAMES)
def test_channels_last_and_bf16_autocast_forward(name):
    model = model_100(name)
    images = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        channels_last = model(images.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits = model(images.to(memory_format=torch.channels_last))
    # Untrained deep ResNets in eval mode produce logits up to ~1e5: compare relative to their scale.
    scale = reference.abs().max().item()
    torch.testing.assert_close(channels_last, reference, rtol=0, atol=1e-4 * scale)
    assert autocast_logits.shape == reference.shape
    assert torch.isfinite(autocast_logits.float()).all()


@pytest.mark.parametrize("name", ["resnet8", "resnet56", "resnet32x4", "ResNet50"])
def test_resnet_convs_are_kaiming_normal_fan_out(name):
    # RepDistiller's resnet.py/resnetv2.py: std = sqrt(2 / fan_out), fan_out = out_channels * k * k.
    for key, weight in model_100(name).state_dict().items():
        if weight.dim() == 4 and weight.numel() >= 2048:  # enough samples for a 10% std check
            expected_std = math.sqrt(2.0 / (weight.shape[0] * weight.shape[2] * weight.shape[3]))
            assert weight.std().item() == pytest.approx(expected_std, rel=0.1), key


@pytest.mark.parametrize("name", ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"])
def test_wrn_fc_bias_is_zero(name):
    assert torch.count_nonzero(model_100(name).fc.bias) == 0


@pytest.mark.parametrize(
    "name, linear_key",
    [(f"vgg{depth}", "classifier") for depth in (8, 11, 13, 16, 19)] + [("MobileNetV2", "classifier.0")],
)
def test_vgg_and_mobilenetv2_linear_is_normal_0_01_with_zero_bias(name, linear_key):
    state = model_100(name).state_dict()
    assert state[f"{linear_key}.weight"].std().item() == pytest.approx(0.01, abs=0.002)
    assert torch.count_nonzero(state[f"{linear_key}.bias"]) == 0


@pytest.mark.parametrize("name", ["ShuffleV1", "ShuffleV2"])
def test_shufflenet_linear_keeps_pytorch_default_init(name):
    # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std = bound/sqrt(3) ~ 0.018 here, so a
    # N(0, 0.01) re-init (as in VGG/MobileNetV2) would fail the std check.
    linear = model_100(name).linear
    bound = 1 / math.sqrt(linear.in_features)
    assert linear.weight.abs().max().item() <= bound
    assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert linear.weight.std().item() > 0.01


def test_unknown_name_raises_value_error_naming_it_and_the_choices():
    with pytest.raises(ValueError, match="'resnet21'") as excinfo:
        common.build_model("resnet21", 100)
    assert all(name in str(excinfo.value) for name in common.MODEL_NAMES)


@pytest.mark.parametrize("name", REPDISTILLER_NAMES)
def test_num_classes_sets_logit_count_and_build_args_are_recorded(name):
    model = common.build_model(name, 10).eval()
    with torch.no_grad():
        logits = model(torch.randn(BATCH, 3, 32, 32))
    assert list(logits.shape) == [BATCH, 10]
    assert (model.arch, model.num_classes) == (name, 10)  # stored in checkpoints by common.py


def test_channel_shuffle_interleaves_groups():
    # RepDistiller's ShuffleBlock: view [N, g, C/g, H, W] -> permute(0, 2, 1, 3, 4) -> reshape; the
    # order matters for loading ShuffleNet checkpoints even though the keys would still match.
    channels = torch.arange(6.0).reshape(1, 6, 1, 1)
    shuffled = common.channel_shuffle(channels, 2).flatten().tolist()
    assert shuffled == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_wrn_identity_path_takes_the_raw_input():
    # RepDistiller's wrn.py: with in == out the block returns residual + x, not residual + ReLU(BN(x)).
    # Zeroing conv2 removes the residual, so the block must return its input unchanged.
    block = common.build_model("wrn_16_1", 100).block1.layer[0]  # 16 -> 16, no convShortcut
    torch.nn.init.zeros_(block.conv2.weight)
    images = torch.randn(BATCH, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(images), images)
