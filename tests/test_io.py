"""Checkpoint I/O: round-trips, crash safety, every error path, safe legacy loading, key mapping."""
from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit import models as zoo
from prunekit.errors import CheckpointError, ConfigError
from prunekit.io import checkpoint as ckpt_mod
from prunekit.io import (
    import_state_dict,
    load_model,
    load_state,
    register_load_hook,
    save_model,
    save_state,
)
from prunekit.io import state as state_mod

# ---------------------------------------------------------------------------------------------
# Small stand-in models (the zoo is exercised separately, when importable)
# ---------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """conv-bn-relu-pool-linear; ``width`` changes shapes, ``extra`` adds a layer (key tests)."""

    def __init__(self, width: int = 4, extra: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 5)
        if extra:
            self.head = nn.Linear(5, 5)
        self.prunekit_arch = {"name": "tiny", "config": {"width": width, "extra": extra}}
        self.input_shape = (3, 6, 6)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        x = self.fc(x)
        return self.head(x) if hasattr(self, "head") else x


class TinyLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)
        self.prunekit_arch = {"name": "lenet-300-100", "config": {}}

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _fake_build(name, config):
    if name == "tiny":
        return TinyNet(**config)
    if name == "lenet-300-100":
        return TinyLeNet()
    raise ConfigError(f"unknown model {name}")


@pytest.fixture
def fake_zoo(monkeypatch):
    monkeypatch.setattr(ckpt_mod, "_build_model", _fake_build)


def _trained_tiny(width=4, extra=False, seed=0):
    torch.manual_seed(seed)
    m = TinyNet(width, extra)
    m.train()
    m(torch.randn(8, 3, 6, 6))  # move BN running stats away from their init
    for p in m.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def assert_same(a, b, path="root"):
    """Deep equality that also checks container and key types (tuple vs list, int vs str)."""
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert type(k) is type(next(kk for kk in b if kk == k)), f"{path}: key type of {k!r}"
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# ---------------------------------------------------------------------------------------------
# save_state / load_state
# ---------------------------------------------------------------------------------------------


def test_state_roundtrip_preserves_types(tmp_path):
    state = {
        "epoch": 3,
        "best": float("inf"),
        "worst": float("-inf"),
        "undefined": float("nan"),
        "flag": True,
        "none": None,
        "name": "run",
        "betas": (0.9, 0.999),
        "ints": {0: "a", 1: [1, 2], "1": "str key"},
        "tuple_key": {(1, 2): "x"},
        "looks_tagged": {"__pk__": "not a tag"},
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(7),
        "np_arr": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "np_f16": np.array([1.0, 2.0], dtype=np.float16),
        "blob": b"\x00\xffbytes",
        "size": torch.Size([2, 3]),
        "t_scalar": torch.tensor(2.5),
        "t_bf16": torch.randn(3, dtype=torch.bfloat16),
        "t_bool": torch.tensor([True, False]),
        "t_empty": torch.zeros(0, 4),
        "nested": [{"w": torch.arange(4).view(2, 2).t()}],  # non-contiguous view
    }
    save_state(tmp_path / "s", state)
    assert (tmp_path / "s.safetensors").is_file() and (tmp_path / "s.json").is_file()
    back = load_state(tmp_path / "s")
    assert_same(state, back)
    # Suffix forms are accepted too.
    assert_same(state, load_state(tmp_path / "s.json"))
    assert_same(state, load_state(str(tmp_path / "s.safetensors")))
    # No leftover temporary files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]


_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5)
_keys = st.integers(-5, 5) | st.text(max_size=4) | st.sampled_from(["__pk__", "0"])
_trees = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=3)
    | st.tuples(kids, kids)
    | st.dictionaries(_keys, kids, max_size=3),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(tree=_trees)
def test_state_roundtrip_property(tree):
    with tempfile.TemporaryDirectory() as d:
        save_state(Path(d) / "s", {"tree": tree, "t": torch.arange(3)})
        back = load_state(Path(d) / "s")
    assert_same({"tree": tree, "t": torch.arange(3)}, back)


def test_unsupported_leaf_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"fn.*cannot save a value of type"):
        save_state(tmp_path / "s", {"fn": lambda: 0})


def _adam_with_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 1e-2}, {"params": list(model[1:].parameters())}],
        lr=1e-3,
        betas=(0.8, 0.99),
        weight_decay=1e-4,
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_optimizer_and_scheduler_roundtrip(tmp_path):
    model, opt, sched = _adam_with_state()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(model.parameters(), lr=0.1))
    sd = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "plateau": plateau.state_dict()}
    save_state(tmp_path / "opt", sd)
    back = load_state(tmp_path / "opt")
    assert_same(sd, back)
    assert all(isinstance(k, int) for k in back["optimizer"]["state"])
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert back["plateau"]["best"] == float("inf")

    # A fresh optimizer loaded from it continues exactly like the original.
    model2 = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(
        [{"params": model2[0].parameters(), "lr": 1e-2}, {"params": list(model2[1:].parameters())}]
    )
    opt2.load_state_dict(back["optimizer"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_rng_states_restore_the_same_stream(tmp_path):
    random.seed(1)
    torch.manual_seed(2)
    np.random.seed(3)
    gen = np.random.default_rng(4)
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "numpy_gen": gen.bit_generator.state,
    }
    save_state(tmp_path / "rng", state)
    expected = (random.random(), torch.rand(3), np.random.rand(3), gen.random(3))

    random.seed(99)
    torch.manual_seed(99)
    np.random.seed(99)
    back = load_state(tmp_path / "rng")
    random.setstate(back["python"])
    torch.set_rng_state(back["torch"])
    np.random.set_state(back["numpy"])
    gen2 = np.random.default_rng()
    gen2.bit_generator.state = back["numpy_gen"]
    got = (random.random(), torch.rand(3), np.random.rand(3), gen2.random(3))
    assert got[0] == expected[0]
    assert torch.equal(got[1], expected[1])
    assert np.array_equal(got[2], expected[2]) and np.array_equal(got[3], expected[3])


def test_shared_storage_tensors_save(tmp_path):
    w = torch.randn(4, 4)
    state = {"a": w, "b": w, "view": w[1], "t": w.t()}
    save_state(tmp_path / "tied", state)
    back = load_state(tmp_path / "tied")
    for k, v in state.items():
        assert torch.equal(back[k], v)


# ---------------------------------------------------------------------------------------------
# Crash safety and corrupted files
# ---------------------------------------------------------------------------------------------


def _crash_before_json(monkeypatch):
    real = state_mod._commit

    def commit(tmp, final):
        if str(final).endswith(".json"):
            raise KeyboardInterrupt("simulated crash")
        real(tmp, final)

    monkeypatch.setattr(state_mod, "_commit", commit)


def test_crash_between_files_is_detected_and_other_checkpoints_untouched(tmp_path, monkeypatch):
    save_state(tmp_path / "epoch1", {"w": torch.ones(3), "epoch": 1})
    save_state(tmp_path / "last", {"w": torch.ones(3), "epoch": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    _crash_before_json(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path / "epoch2", {"w": torch.zeros(3), "epoch": 2})  # first save of a stem
    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path / "last", {"w": torch.zeros(3), "epoch": 2})  # overwrite of a stem
    monkeypatch.undo()

    with pytest.raises(CheckpointError, match=r"epoch2\.json: missing.*incomplete"):
        load_state(tmp_path / "epoch2")
    with pytest.raises(CheckpointError, match=r"last\.json: missing.*incomplete"):
        load_state(tmp_path / "last")
    # The untouched checkpoint is byte-identical and still loads; no temp files are left behind.
    assert (tmp_path / "epoch1.json").read_bytes() == before["epoch1.json"]
    assert (tmp_path / "epoch1.safetensors").read_bytes() == before["epoch1.safetensors"]
    assert load_state(tmp_path / "epoch1")["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_json_from_another_save_is_rejected(tmp_path):
    save_state(tmp_path / "a", {"w": torch.ones(3)})
    save_state(tmp_path / "b", {"w": torch.zeros(3)})
    os.replace(tmp_path / "b.safetensors", tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.json: does not match a\.safetensors.*different saves"):
        load_state(tmp_path / "a")


def test_truncated_and_corrupt_safetensors(tmp_path):
    save_state(tmp_path / "s", {"w": torch.randn(100)})
    sft = tmp_path / "s.safetensors"
    good = sft.read_bytes()

    sft.write_bytes(good[:-40])
    with pytest.raises(CheckpointError, match=r"s\.safetensors: truncated or altered"):
        load_state(tmp_path / "s")
    sft.write_bytes(good[:20])
    with pytest.raises(CheckpointError, match=r"s\.safetensors: corrupt or truncated safetensors header"):
        load_state(tmp_path / "s")
    sft.write_bytes(good[:4])
    with pytest.raises(CheckpointError, match=r"truncated safetensors file"):
        load_state(tmp_path / "s")
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    sft.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"s\.safetensors: corrupt: sha256"):
        load_state(tmp_path / "s")
    sft.unlink()
    with pytest.raises(CheckpointError, match=r"s\.safetensors: missing"):
        load_state(tmp_path / "s")


def test_corrupt_json_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing: no such checkpoint \(neither nothing\.json nor nothing\.safetensors"):
        load_state(tmp_path / "nothing")
    save_state(tmp_path / "s", {"w": torch.ones(2)})
    (tmp_path / "s.json").write_text('{"format": "prunekit-state", "tree": ')
    with pytest.raises(CheckpointError, match=r"s\.json: corrupt JSON"):
        load_state(tmp_path / "s")
    save_state(tmp_path / "t", {"x": float("inf")})
    doc = json.loads((tmp_path / "t.json").read_text())
    doc["tree"]["x"]["v"] = "not-a-number"
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"t\.json: corrupt JSON structure"):
        load_state(tmp_path / "t")
    (tmp_path / "s.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match=r"not a prunekit-state checkpoint"):
        load_state(tmp_path / "s")


def test_nonfinite_state_refused_unless_allowed(tmp_path):
    save_state(tmp_path / "s", {"ok": torch.ones(2), "bad": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in 1 tensor\(s\): bad"):
        load_state(tmp_path / "s")
    assert torch.isnan(load_state(tmp_path / "s", allow_nonfinite=True)["bad"][1])


# ---------------------------------------------------------------------------------------------
# save_model / load_model (our format)
# ---------------------------------------------------------------------------------------------


def test_model_roundtrip_all_path_forms(tmp_path, fake_zoo):
    m = _trained_tiny(width=6)
    x = torch.randn(2, 3, 6, 6)
    ref = m(x)
    stem = save_model(tmp_path / "run", m, metadata={"accuracy": 91.25, "epochs": (1, 2)})
    assert stem == tmp_path / "run"
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["arch"] == {"name": "tiny", "config": {"width": 6, "extra": False}}
    assert doc["format_version"] == 1 and doc["state_keys"] == list(m.state_dict())
    for p in (tmp_path / "run", tmp_path / "run.json", tmp_path / "run.safetensors"):
        m2, info = load_model(p)
        assert torch.equal(m2.eval()(x), ref)
        assert info["format"] == "prunekit" and info["metadata"] == {"accuracy": 91.25, "epochs": (1, 2)}
        assert info["arch"]["config"]["width"] == 6

    (tmp_path / "dir").mkdir()
    save_model(tmp_path / "dir", m)
    save_model(f"{tmp_path}/new_dir/", m)  # a trailing slash means "directory", created
    assert (tmp_path / "new_dir" / "model.json").is_file()
    assert (tmp_path / "dir" / "model.safetensors").is_file() and (tmp_path / "dir" / "model.json").is_file()
    m3, _ = load_model(tmp_path / "dir")
    assert torch.equal(m3.eval()(x), ref)
    for k, v in m.state_dict().items():  # buffers too (BN running stats, num_batches_tracked)
        assert torch.equal(m3.state_dict()[k], v)


def test_model_with_tied_weights_saves(tmp_path, fake_zoo):
    m = _trained_tiny()
    m.head2 = m.fc  # the same module twice → shared tensors in state_dict
    stem = save_model(tmp_path / "tied", m)
    from safetensors.torch import load_file

    saved = load_file(f"{stem}.safetensors")
    assert torch.equal(saved["fc.weight"], saved["head2.weight"])


def test_model_key_and_shape_errors(tmp_path, fake_zoo):
    save_model(tmp_path / "m", _trained_tiny(width=4))
    with pytest.raises(CheckpointError, match=r"m\.json: does not fit the model: 2 missing key\(s\): head\.weight, head\.bias"):
        load_model(tmp_path / "m", model_config={"extra": True})
    _, info = load_model(tmp_path / "m", model_config={"extra": True}, strict=False)
    assert info["missing_keys"] == ["head.weight", "head.bias"]

    save_model(tmp_path / "big", _trained_tiny(extra=True))
    with pytest.raises(CheckpointError, match=r"2 unexpected key\(s\): head\.weight, head\.bias"):
        load_model(tmp_path / "big", model_config={"extra": False})

    with pytest.raises(CheckpointError, match=r"shape mismatch .*conv\.weight: checkpoint \(4, 3, 3, 3\) vs model \(8, 3, 3, 3\)"):
        load_model(tmp_path / "m", model_config={"width": 8})


def test_model_nonfinite_refused(tmp_path, fake_zoo):
    m = _trained_tiny()
    with torch.no_grad():
        m.fc.weight[0, 0] = float("inf")
        m.bn.running_var[1] = float("nan")
    save_model(tmp_path / "m", m)
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in 2 tensor\(s\): bn\.running_var, fc\.weight"):
        load_model(tmp_path / "m")
    m2, _ = load_model(tmp_path / "m", allow_nonfinite=True)
    assert torch.isinf(m2.fc.weight[0, 0])


def test_model_json_not_matching_its_tensors(tmp_path, fake_zoo):
    save_model(tmp_path / "a", _trained_tiny(width=4))
    save_model(tmp_path / "b", _trained_tiny(width=8))
    os.replace(tmp_path / "b.safetensors", tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.json: does not match a\.safetensors"):
        load_model(tmp_path / "a")


def test_model_without_arch_needs_a_name(tmp_path, fake_zoo):
    m = nn.Sequential(nn.Linear(2, 2))
    save_model(tmp_path / "plain", m)
    with pytest.raises(CheckpointError, match=r"no architecture recorded; pass the model name"):
        load_model(tmp_path / "plain")


def test_load_hook_reshapes_model_before_weights(tmp_path, fake_zoo, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "_LOAD_HOOKS", {})  # isolated from the engine's real prune_record hook
    pruned = _trained_tiny(width=3)
    pruned.prunekit_arch = {"name": "tiny", "config": {"width": 4, "extra": False}}  # zoo arch, then pruned
    record = {"conv": {"kept": [0, 2, 3]}, "widths": (3,)}
    save_model(tmp_path / "p", pruned, metadata={"note": "pruned"}, extra={"prune_record": record})

    # Without the hook the shapes do not fit, and the error says why.
    with pytest.raises(CheckpointError, match=r"shape mismatch.*no load hook is registered"):
        load_model(tmp_path / "p")

    seen = {}

    def hook(model, rec):
        seen["rec"] = rec
        return TinyNet(width=len(rec["conv"]["kept"]))

    register_load_hook("prune_record", hook)
    m, info = load_model(tmp_path / "p")
    assert seen["rec"] == record and info["prune_record"] == record
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(m.eval()(x), pruned(x))
    with pytest.raises(ConfigError, match="reserved"):
        register_load_hook("metadata", hook)
    with pytest.raises(ConfigError, match="reserved"):
        save_model(tmp_path / "q", pruned, extra={"arch": 1})


# ---------------------------------------------------------------------------------------------
# Legacy files
# ---------------------------------------------------------------------------------------------


def _official_lenet_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"ip1": (300, 784), "ip2": (100, 300), "ip3": (10, 100)}
    sd = {}
    for k, (o, i) in shapes.items():
        sd[f"{k}.weight"] = torch.randn(o, i, generator=g)
        sd[f"{k}.bias"] = torch.randn(o, generator=g)
    return sd


def test_legacy_state_dict_with_dataparallel_prefix(tmp_path, fake_zoo):
    sd = _official_lenet_sd()
    path = tmp_path / "lenet.pth.tar"
    torch.save({"acc": 91.5, "epoch": 7, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model, info = load_model(path, model_name="lenet-300-100")
    assert info["acc"] == 91.5 and info["epoch"] == 7 and info["format"] == "legacy"
    assert torch.equal(model.fc1.weight, sd["ip1.weight"]) and torch.equal(model.fc3.bias, sd["ip3.bias"])

    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)
    model, info = load_model(bare, model_name="lenet-300-100")
    assert torch.equal(model.fc2.weight, sd["ip2.weight"])

    with pytest.raises(CheckpointError, match=r"lenet\.pth\.tar: legacy checkpoint .*--model"):
        load_model(path)


def test_legacy_missing_num_batches_tracked_is_filled(tmp_path, fake_zoo):
    m = _trained_tiny()
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["old.num_batches_tracked"] = torch.tensor(3)  # present in the file, absent in the model: dropped
    torch.save({"state_dict": sd}, tmp_path / "old.pth")
    m2, info = load_model(tmp_path / "old.pth", model_name="tiny", model_config={"width": 4})
    assert info["unexpected_keys"] == [] and torch.equal(m2.bn.running_var, m.bn.running_var)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_legacy_pickle_is_refused(tmp_path, fake_zoo, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": _official_lenet_sd(), "x": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused.*may contain arbitrary code and was NOT loaded"):
        load_model(path, model_name="lenet-300-100")
    assert not marker.exists()


def test_legacy_corrupt_and_missing(tmp_path, fake_zoo):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pth: (corrupt|refused)"):
        load_model(bad, model_name="lenet-300-100")
    with pytest.raises(CheckpointError, match=r"absent\.pth: no such file"):
        load_model(tmp_path / "absent.pth", model_name="lenet-300-100")
    torch.save({"acc": 1.0, "epoch": 2}, tmp_path / "nosd.pth")
    with pytest.raises(CheckpointError, match=r"no state dict found \(top-level keys: 'acc', 'epoch'\)"):
        load_model(tmp_path / "nosd.pth", model_name="lenet-300-100")
    trunc = tmp_path / "trunc.pth"
    torch.save({"state_dict": _official_lenet_sd()}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"trunc\.pth: corrupt"):
        load_model(trunc, model_name="lenet-300-100")


def test_official_lenet_checkpoint(fake_zoo, official_lenet_checkpoint):
    model, info = load_model(official_lenet_checkpoint, model_name="lenet-300-100")
    assert info["acc"] == 89.8
    assert tuple(model.fc1.weight.shape) == (300, 784)
    assert tuple(model.fc2.weight.shape) == (100, 300)
    assert tuple(model.fc3.weight.shape) == (10, 100)
    raw = torch.load(official_lenet_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for ours, theirs in (("fc1", "ip1"), ("fc2", "ip2"), ("fc3", "ip3")):
        assert torch.equal(getattr(model, ours).weight, raw[f"{theirs}.weight"])
        assert torch.equal(getattr(model, ours).bias, raw[f"{theirs}.bias"])


# ---------------------------------------------------------------------------------------------
# Official key mappings, against the real zoo
# ---------------------------------------------------------------------------------------------


BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _official_resnet56_keys():
    """Keys of neuron-merging models/ResNet.py, ResNet(depth=56) (option-B downsample)."""
    keys = ["conv1.weight", *(f"bn1.{s}" for s in BN)]
    for g, planes in enumerate((16, 32, 64), start=1):
        for i in range(9):
            p = f"layer{g}.{i}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{s}" for s in BN)]
            keys += [f"{p}.conv2.weight", *(f"{p}.bn2.{s}" for s in BN)]
            if i == 0 and g > 1:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{s}" for s in BN)]
    return keys + ["fc.weight", "fc.bias"]


def _official_wrn_keys(n=6):
    """Keys of neuron-merging models/WideResNet.py (xternalz layout), depth 6n+4."""
    keys = ["conv1.weight"]
    for g in (1, 2, 3):
        for i in range(n):
            p = f"block{g}.layer.{i}"
            keys += [*(f"{p}.bn1.{s}" for s in BN), f"{p}.conv1.weight", *(f"{p}.bn2.{s}" for s in BN)]
            keys += [f"{p}.conv2.weight"] + ([f"{p}.convShortcut.weight"] if i == 0 else [])
    return keys + [*(f"bn1.{s}" for s in BN), "fc.weight", "fc.bias"]


def _official_vgg16_keys():
    """Keys of neuron-merging models/VGG.py VGG(depth=16): feature.N (conv, bn, relu | pool)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    keys, i = [], 0
    for v in cfg:
        if v == "M":
            i += 1
            continue
        keys += [f"feature.{i}.weight", *(f"feature.{i + 1}.{s}" for s in BN)]
        i += 3
    keys += ["classifier.0.weight", "classifier.0.bias", *(f"classifier.1.{s}" for s in BN)]
    return keys + ["classifier.3.weight", "classifier.3.bias"]


def _as_official(model, official_keys):
    """Give the model's tensors the official names (by position: both orders follow the code)."""
    ours = list(model.state_dict().items())
    assert len(ours) == len(official_keys)
    return {k: v.clone() for k, (_, v) in zip(official_keys, ours)}


@pytest.mark.parametrize(
    "name, cfg, keys",
    [
        ("resnet56", {"shortcut": "B"}, _official_resnet56_keys),
        ("wrn-40-4", {}, _official_wrn_keys),
        ("vgg16", {}, _official_vgg16_keys),
    ],
)
def test_official_key_mapping_loads_into_zoo(tmp_path, name, cfg, keys):
    src = zoo.create(name, **cfg)
    official = _as_official(src, keys())
    mapped = import_state_dict(name, official, zoo.create(name, **cfg))
    assert set(mapped) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(mapped[k], v), k
    # End to end through a legacy file, with a DataParallel prefix.
    path = tmp_path / f"{name}.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.items()}, "best_prec1": 93.0}, path)
    model, info = load_model(path, model_name=name, model_config=cfg)
    assert info["best_prec1"] == 93.0
    x = torch.randn(2, *src.input_shape)
    assert torch.equal(model.eval()(x), src.eval()(x))


def test_torchvision_names_are_identity():
    assert import_state_dict("resnet50", {"layer1.0.downsample.0.weight": torch.ones(1)}) == {
        "layer1.0.downsample.0.weight": torch.ones(1)
    }
    sd = {"module.features.0.0.weight": torch.ones(1)}
    assert list(import_state_dict("mobilenetv2", sd)) == ["features.0.0.weight"]


def test_zoo_model_roundtrip(tmp_path):
    m = zoo.create("resnet20")
    m.eval()
    x = torch.randn(2, *m.input_shape)
    save_model(tmp_path / "r20", m, metadata={"accuracy": 91.7})
    m2, info = load_model(tmp_path / "r20")
    assert info["arch"] == zoo.arch_of(m) and torch.equal(m2.eval()(x), m(x))


def test_official_lenet_checkpoint_into_the_real_zoo(official_lenet_checkpoint):
    model, info = load_model(official_lenet_checkpoint, model_name="lenet-300-100")
    assert info["acc"] == 89.8 and tuple(model.fc1.weight.shape) == (300, 784)
    assert zoo.arch_of(model)["name"] == "lenet-300-100"
