"""Model zoo: exact sizes from the NM / Polarization docs, forwards, fx tracing, cfg round trips."""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx
from torch import nn

from prunekit.errors import ConfigError, UnknownNameError
from prunekit.models import MODELS, arch_of, create, list_models, register_model
from prunekit.models.hf import TRANSFORMERS_MODELS

ALL = list_models()
IMAGE_ZOO = [n for n in ALL if n not in TRANSFORMERS_MODELS]  # transformers models: tests/test_train_hf.py
IMAGENET = {"resnet50", "mobilenetv2"}
VGG_C10_PRUNED = [32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256]
VGG_C100_PRUNED = [32, 64, 128, 128, 256, 256, 256, 512, 512, 256, 256, 256, 256]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, shape) -> int:
    """Conv: k_h·k_w·(C_in/groups)·C_out·H_out·W_out; Linear: in·out (docs/polarization.md, FLOPs)."""
    total = 0

    def hook(m, _inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += kh * kw * (m.in_channels // m.groups) * m.out_channels * out.shape[2] * out.shape[3]
        else:
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total


def small(name: str, **cfg) -> nn.Module:
    """The model at its default input, except ImageNet nets at 64×64 to keep the suite fast."""
    if name in IMAGENET:
        cfg.setdefault("input_size", 64)
    return create(name, **cfg)


# ------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("name,cfg,expected", [
    ("lenet-300-100", {}, 266_610),
    ("lenet-300-100", {"widths": [150, 50]}, 125_810),  # Neuron Merging LeNet at r = 0.5
    ("lenet-5", {}, 61_706),
    ("vgg16", {}, 14_987_722),
    ("vgg16", {"num_classes": 100}, 15_033_892),
    ("vgg16", {"widths": VGG_C10_PRUNED}, 5_397_034),
    ("vgg16", {"widths": VGG_C100_PRUNED, "num_classes": 100}, 8_393_348),
    ("resnet56", {"shortcut": "B"}, 855_770),
    ("resnet56", {"shortcut": "B", "internal_widths": [12] * 9 + [25] * 9 + [51] * 9}, 678_650),  # NM r=0.2
    ("resnet56", {"shortcut": "A"}, 853_018),  # option A shortcuts are parameter-free
    ("resnet20", {}, 269_722),
    ("resnet110", {}, 1_727_962),
    ("wrn-40-4", {}, 8_949_210),
    ("wrn-40-4", {"internal_widths": [48] * 6 + [100] * 6 + [204] * 6}, 7_095_642),  # NM preset, r=0.2
    ("wrn", {"depth": 40, "widen_factor": 4}, 8_949_210),
    ("wrn-28-10", {}, 36_479_194),
    ("resnet50", {}, 25_557_032),
    ("mobilenetv2", {}, 3_504_872),
])
def test_param_counts(name, cfg, expected):
    assert n_params(create(name, **cfg)) == expected


@pytest.mark.parametrize("name,cfg,shape,expected", [
    ("resnet56", {"shortcut": "A"}, (3, 32, 32), 125_485_696),
    ("resnet56", {"shortcut": "A", "num_classes": 100}, (3, 32, 32), 125_491_456),
    ("vgg16", {}, (3, 32, 32), 313_463_808),
    ("vgg16", {"num_classes": 100}, (3, 32, 32), 313_509_888),
    ("resnet50", {}, (3, 224, 224), 4_089_184_256),
    ("mobilenetv2", {}, (3, 224, 224), 300_774_272),
])
def test_mac_counts(name, cfg, shape, expected):
    assert count_macs(create(name, **cfg), shape) == expected


def test_wrn_convs_have_no_bias():
    convs = [m for m in create("wrn-40-4").modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 18 * 2 + 3 and all(c.bias is None for c in convs)


# ------------------------------------------------------------------------ every registered model


def test_registry_lists_contract_models():
    expected = {"lenet-300-100", "lenet-5", "vgg16", "resnet20", "resnet32", "resnet56", "resnet110",
                "wrn", "wrn-40-4", "wrn-28-10", "resnet50", "mobilenetv2"}
    assert expected <= set(ALL) and ALL == sorted(ALL) and ALL == MODELS.names()


@pytest.mark.parametrize("name", IMAGE_ZOO)
def test_forward_default_input(name):
    model = small(name).eval()
    c, h, w = model.input_shape
    assert h == w and c in (1, 3)
    num_classes = model.prunekit_arch["config"]["num_classes"]
    with torch.no_grad():
        assert model(torch.randn(2, c, h, w)).shape == (2, num_classes)


@pytest.mark.parametrize("name", IMAGE_ZOO)
def test_forward_one_channel_28(name):
    model = create(name, in_channels=1, input_size=28, num_classes=7)
    assert model.input_shape == (1, 28, 28)
    out = model(torch.randn(2, 1, 28, 28))  # train mode: BN with batch statistics
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", IMAGE_ZOO)
def test_arch_roundtrip(name):
    model = small(name)
    arch = arch_of(model)
    assert arch == model.prunekit_arch and arch is not model.prunekit_arch
    arch = json.loads(json.dumps(arch))  # JSON-serialisable, survives a round trip
    assert arch["name"] == name
    assert {"num_classes", "in_channels", "input_size"} <= set(arch["config"])
    rebuilt = create(arch["name"], **arch["config"])
    assert arch_of(rebuilt) == arch
    sd, sd2 = model.state_dict(), rebuilt.state_dict()
    assert list(sd) == list(sd2)
    assert all(sd[k].shape == sd2[k].shape for k in sd)
    assert rebuilt.input_shape == model.input_shape


@pytest.mark.parametrize("name", IMAGE_ZOO)
def test_fx_trace_matches_eager(name):
    model = small(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, *model.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


# ------------------------------------------------------------------------------ config handling


def test_resolved_config_has_defaults():
    cfg = create("resnet20").prunekit_arch["config"]
    assert cfg == {"num_classes": 10, "in_channels": 3, "input_size": 32, "shortcut": "A",
                   "widths": [16, 32, 64], "internal_widths": [16] * 3 + [32] * 3 + [64] * 3}
    cfg = create("resnet50").prunekit_arch["config"]
    assert cfg["internal_widths"][:4] == [[64, 64]] * 3 + [[128, 128]]
    assert len(create("mobilenetv2").prunekit_arch["config"]["internal_widths"]) == 17


def test_custom_internal_widths_change_only_block_internals():
    iw = list(range(1, 10))
    model = create("resnet20", internal_widths=iw, shortcut="B")
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    assert [b.conv1.out_channels for b in blocks] == iw
    assert [b.bn1.num_features for b in blocks] == iw
    assert [b.conv2.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert isinstance(model.layer2[0].shortcut, nn.Sequential) and isinstance(model.layer2[1].shortcut, nn.Identity)
    assert model.state_dict()["layer2.0.shortcut.0.weight"].shape == (32, 16, 1, 1)
    assert "layer2.0.shortcut.1.running_var" in model.state_dict()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = create("resnet20").layer2[0]
    assert not list(block.shortcut.parameters())
    x = torch.randn(2, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_wrn_projection_uses_preactivated_input():
    model = create("wrn-40-4").eval()
    block = model.block2[0]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        pre = torch.relu(block.bn1(x))
        branch = block.conv2(torch.relu(block.bn2(block.conv1(pre))))
        torch.testing.assert_close(block(x), branch + block.shortcut(pre))
    assert model.block1[1].shortcut is None and model.block1[0].shortcut is not None  # 16 → 64


def test_vgg_structure_and_init():
    model = create("vgg16", bn_init=0.25)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 4
    assert all(c.bias is None for c in model.features if isinstance(c, nn.Conv2d))
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(bns) == 14 and all(torch.all(b.weight == 0.25) and torch.all(b.bias == 0) for b in bns)
    assert create("vgg16").prunekit_arch["config"]["bn_init"] == 0.5


def test_lenet_param_names():
    names = [n for n, _ in create("lenet-300-100").named_parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert create("lenet-300-100", in_channels=3, input_size=32).fc1.in_features == 3 * 32 * 32


def test_resnet50_torchvision_layout():
    sd = create("resnet50").state_dict()
    assert len(sd) == 320
    expected = {
        "conv1.weight": (64, 3, 7, 7), "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_mean": (256,), "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,), "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048), "fc.bias": (1000,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert not any(k.startswith("layer1.1.downsample") for k in sd)
    model = create("resnet50")
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    narrow = create("resnet50", internal_widths=[[8, 16]] * 16, input_size=64)
    assert narrow.layer3[2].conv2.weight.shape == (16, 8, 3, 3)


def test_mobilenetv2_torchvision_layout():
    model = create("mobilenetv2")
    sd = model.state_dict()
    assert len(sd) == 314
    expected = {
        "features.0.0.weight": (32, 3, 3, 3), "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3), "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.weight": (16,), "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3), "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.bias": (24,), "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1), "classifier.1.weight": (1000, 1280),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert isinstance(model.features[0][2], nn.ReLU6) and isinstance(model.classifier[0], nn.Dropout)
    assert model.classifier[0].p == 0.2
    assert [b.use_res_connect for b in model.features[1:18]].count(True) == 10
    iw = [32] + [8] * 16
    narrow = create("mobilenetv2", internal_widths=iw, input_size=64)
    assert narrow.features[5].conv[1][0].weight.shape == (8, 1, 3, 3)


# ----------------------------------------------------------------------------------------- errors


def test_unknown_model_names_closest_match():
    with pytest.raises(UnknownNameError, match="resnet56"):
        create("resnet57")
    with pytest.raises(KeyError):
        create("no-such-model")


@pytest.mark.parametrize("name,cfg,key", [
    ("resnet56", {"shorcut": "A"}, "shorcut"),
    ("resnet56", {"shortcut": "C"}, "shortcut"),
    ("resnet56", {"internal_widths": [16] * 26}, "internal_widths"),
    ("resnet56", {"internal_widths": [16] * 26 + [-1]}, "internal_widths"),
    ("resnet-cifar", {"depth": 21}, "depth"),
    ("vgg16", {"widths": [64] * 12}, "widths"),
    ("vgg16", {"widths": [64] * 12 + [0]}, "widths"),
    ("vgg16", {"input_size": 8}, "input_size"),
    ("vgg16", {"bn_init": "x"}, "bn_init"),
    ("lenet-300-100", {"widths": [300, -100]}, "widths"),
    ("lenet-5", {"num_classes": 0}, "num_classes"),
    ("lenet-5", {"in_channels": True}, "in_channels"),
    ("wrn", {"depth": 41}, "depth"),
    ("wrn-40-4", {"depth": 28}, "depth"),  # named variants fix depth
    ("wrn-40-4", {"dropout": 1.0}, "dropout"),
    ("resnet50", {"internal_widths": [[64, 64]] * 15}, "internal_widths"),
    ("resnet50", {"internal_widths": [[64, 0]] * 16}, "internal_widths"),
    ("mobilenetv2", {"internal_widths": [16] * 17}, "internal_widths"),
    ("mobilenetv2", {"width_mult": -1.0}, "width_mult"),
])
def test_invalid_cfg_names_key(name, cfg, key):
    with pytest.raises(ConfigError, match=key):
        create(name, **cfg)


def test_arch_of_requires_create():
    with pytest.raises(ConfigError, match="create"):
        arch_of(nn.Linear(2, 2))


def test_register_model_requires_keyword_only():
    with pytest.raises(TypeError):
        register_model("bad-model-for-test")(lambda num_classes=10: nn.Linear(1, num_classes))
    assert "bad-model-for-test" not in MODELS
