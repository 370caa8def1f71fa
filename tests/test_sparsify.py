"""`prunekit sparsify`: dead-channel removal, sparse safetensors storage, sparse kernels, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.cli import main
from prunekit.errors import CheckpointError
from prunekit.io import load_model, save_model
from prunekit.models import create
from prunekit.optim import GRDA
from prunekit.sparse import (
    SparseLinear,
    decode_state,
    encode_state,
    encode_tensor,
    load_sparse,
    save_sparse,
    sparsify,
)
from prunekit.sparse.storage import _nonzero_mask


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 16), nn.Linear(16, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    """conv1 (3×3, pad 1) → BN → ReLU → conv2 (k×k) → BN → ReLU → avg pool → fc."""

    def __init__(self, k2: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, k2, padding=k2 // 2, bias=False), nn.BatchNorm2d(6)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


@torch.no_grad()
def test_mlp_constant_and_unused_neurons_are_removed_and_outputs_match():
    torch.manual_seed(0)
    model = MLP()
    model.fc1.weight[2] = 0  # constant relu(b) > 0: folded into fc2's bias
    model.fc1.bias[2] = 0.7
    model.fc1.weight[5] = 0  # constant 0
    model.fc1.bias[5] = 0
    model.fc2.weight[:, 7] = 0  # unused by its only consumer
    model.fc2.weight[4] = 0  # fc2 neuron 4: constant relu(b4)
    res = sparsify(model, (12,))
    x = torch.randn(64, 12)
    assert torch.allclose(_outputs(res.model, x), _outputs(model, x), atol=1e-5, rtol=0)
    assert res.model.fc1.out_features == 13 and res.model.fc2.in_features == 13
    assert res.model.fc2.out_features == 9 and res.model.fc3.in_features == 9
    assert res.removed["fc1"] == {"size": 16, "removed": 3, "constant": 2, "unused": 1}
    assert res.removed["fc2"]["removed"] == 1
    assert res.max_abs_diff <= 1e-5


@torch.no_grad()
def test_convnet_bn_constant_channels_fold_into_next_bn_and_unused_channels_go():
    torch.manual_seed(1)
    model = ConvNet(k2=1)
    _randomize_bn(model)
    model.conv1.weight[1] = 0  # (a) rows zero: BN1 emits β − γ·μ/σ, ReLU → positive constant
    model.bn1.bias[1], model.bn1.running_mean[1] = 0.9, 0.0
    model.bn1.weight[2] = 0  # (a) γ = 0: BN1 emits β = 0.5
    model.bn1.bias[2] = 0.5
    model.conv2.weight[:, 4] = 0  # (b) no consumer reads channel 4
    res = sparsify(model, (3, 10, 10))
    x = torch.randn(16, 3, 10, 10)
    assert torch.allclose(_outputs(res.model, x), _outputs(model, x), atol=1e-5, rtol=0)
    assert res.model.conv1.out_channels == 5 and res.model.bn1.num_features == 5
    assert res.removed["conv1"] == {"size": 8, "removed": 3, "constant": 2, "unused": 1}
    # the constants went into bn2's running mean (conv2 has no bias)
    assert not torch.equal(res.model.bn2.running_mean, model.bn2.running_mean)


@torch.no_grad()
def test_padded_consumer_keeps_a_nonzero_constant_channel_but_drops_a_zero_one():
    torch.manual_seed(2)
    model = ConvNet(k2=3)  # conv2 is 3×3 with padding: a constant input is not constant at the border
    _randomize_bn(model)
    model.conv1.weight[1] = 0
    model.bn1.bias[1], model.bn1.running_mean[1] = 0.9, 0.0  # constant relu(0.9·…) > 0: must stay
    model.conv1.weight[3] = 0
    model.bn1.bias[3], model.bn1.running_mean[3] = -1.0, 0.0  # constant relu(−1) = 0: removable
    res = sparsify(model, (3, 10, 10))
    x = torch.randn(8, 3, 10, 10)
    assert torch.allclose(_outputs(res.model, x), _outputs(model, x), atol=1e-5, rtol=0)
    assert res.model.conv1.out_channels == 7
    assert "padded conv" in res.removed["conv1"]["kept"]["1"]


def test_grda_trained_mlp_sparsifies_to_identical_outputs():
    torch.manual_seed(3)
    model = MLP()
    opt = GRDA(model.parameters(), lr=0.1, c=0.3, mu=0.7)
    x, y = torch.randn(256, 12), torch.randint(0, 3, (256,))
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    res = sparsify(model, (12,))
    assert res.removed_total > 0
    assert torch.allclose(_outputs(res.model, x), _outputs(model, x), atol=1e-5, rtol=0)


def _sparse_lenet(seed: int = 0, density: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    model = create("lenet-300-100", widths=[40, 20])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) < density)
    return model


def test_sparse_file_round_trip_is_bit_exact_and_smaller(tmp_path):
    model = _sparse_lenet()  # masking by multiplication leaves -0.0: stored as zeros, reloaded as +0.0
    assert any(bool((torch.signbit(p) & (p == 0)).any()) for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.0)  # -0.0 + 0.0 = +0.0: now every zero is +0.0 and the round trip is bit for bit
    _, info = save_sparse(tmp_path, model)
    dense_stem = save_model(tmp_path / "dense", model)
    assert info["bytes"] < 0.3 * Path(f"{dense_stem}.safetensors").stat().st_size
    back, doc = load_sparse(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(_bits(a), _bits(b)), k
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(_outputs(back, x), _outputs(model, x))
    assert doc["tensors"]["fc1.weight"]["layout"] in ("bitmask", "csr")


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), cols=st.integers(1, 300), density=st.floats(0, 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64]),
       ndim=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_random_sparsity_patterns_round_trip_exactly(rows, cols, density, dtype, ndim, seed):
    g = torch.Generator().manual_seed(seed)
    shape = {1: (rows * cols,), 2: (rows, cols), 4: (rows, 1, cols, 1)}[ndim]
    t = (torch.randn(shape, generator=g) * 10).to(dtype) * (torch.rand(shape, generator=g) < density)
    entries, tensors = encode_state({"w": t})
    back = decode_state(entries, tensors, "test")["w"]
    assert back.dtype == t.dtype and back.shape == t.shape
    expected = t if entries["w"]["layout"] == "dense" else t + 0  # sparse layouts store -0.0 as +0.0
    assert torch.equal(_bits(back), _bits(expected))
    stored = sum(v.numel() * v.element_size() for v in tensors.values())
    assert stored <= t.numel() * t.element_size() + 256  # never much larger than dense
    assert entries["w"]["nnz"] == int(_nonzero_mask(t).sum())


def test_layouts_pick_csr_for_very_sparse_and_dense_for_dense_tensors():
    w = torch.zeros(100, 784)
    w[torch.arange(100), torch.arange(100) * 7] = 1.0  # 0.13 % dense
    assert encode_tensor("w", w)[0]["layout"] == "csr"
    assert encode_tensor("w", torch.randn(100, 784))[0]["layout"] == "dense"
    mid = torch.randn(100, 784) * (torch.rand(100, 784) < 0.3)
    assert encode_tensor("w", mid)[0]["layout"] == "bitmask"


def test_corrupted_or_mismatched_sparse_files_raise_clear_errors(tmp_path):
    model = _sparse_lenet(density=0.02)
    save_sparse(tmp_path, model)
    doc_path = tmp_path / "sparse.json"
    doc = json.loads(doc_path.read_text())
    doc["tensors"]["fc1.weight"]["nnz"] += 1
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="fc1.weight"):
        load_sparse(tmp_path)
    two_per_row = torch.zeros(50, 50)
    two_per_row[:, :2] = 1.0
    entries, tensors = encode_state({"w": two_per_row})
    assert entries["w"]["layout"] == "csr"
    tensors["w::col"][:2] = tensors["w::col"][:2].flip(0)
    with pytest.raises(CheckpointError, match="strictly increasing"):
        decode_state(entries, tensors, "x")
    tensors["w::col"][0] = 60
    with pytest.raises(CheckpointError, match="column index outside"):
        decode_state(entries, tensors, "x")
    save_sparse(tmp_path / "b.sparse", model)  # a stem (like save_model: only existing dirs are dirs)
    sft = tmp_path / "b.sparse.safetensors"
    sft.write_bytes(sft.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_sparse(tmp_path / "b.sparse")
    save_sparse(tmp_path / "c.sparse", model)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_sparse(tmp_path / "c.sparse", model=create("lenet-300-100", widths=[30, 20]))


def test_sparse_linear_matches_dense_linear():
    torch.manual_seed(4)
    layer = nn.Linear(50, 7)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.2)
    x = torch.randn(3, 5, 50)
    assert torch.allclose(SparseLinear(layer)(x), layer(x), atol=1e-5, rtol=0)


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 and "--json" in argv else None), err


@pytest.mark.realdata
def test_cli_end_to_end_reloads_identically_and_keeps_accuracy(tmp_path, capsys, fashion_mnist_root):
    model = _sparse_lenet(density=0.3)
    with torch.no_grad():
        model.fc1.weight[:10] = 0  # 10 neurons with constant output relu(b)
        model.fc2.weight[:, 30:] = 0  # 10 neurons nobody reads
    save_model(tmp_path / "run", model)
    rc, rep, _ = _run(capsys, "sparsify", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                      "--dataset", "fashion-mnist", "--latency-batch", "1", "--latency-batch", "8",
                      "--latency-runs", "3", "--json")
    assert rc == 0
    assert rep["removed_channels"]["fc1"]["removed"] == 20 and rep["params_after"] < rep["params_before"]
    assert rep["accuracy_before"] == rep["accuracy_after"] == rep["accuracy_sparse_reload"]
    assert rep["reload_bit_exact"] and rep["bytes_sparse"] < rep["bytes_dense"] < rep["bytes_dense_before"]
    assert set(rep["latency_sparse_ms"]) == {"1", "8"} and set(rep["sparse_layers"]) == {"1", "8"}
    dense, _ = load_model(tmp_path / "out")
    sparse, _ = load_sparse(tmp_path / "out")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(_outputs(dense, x), _outputs(sparse, x))
    assert torch.allclose(_outputs(dense, x), _outputs(model, x), atol=1e-5, rtol=0)


def test_cli_without_zeros_says_so_and_missing_path_is_an_error(tmp_path, capsys):
    torch.manual_seed(5)
    save_model(tmp_path / "run", create("lenet-300-100", widths=[16, 8]))
    rc, rep, _ = _run(capsys, "sparsify", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o"),
                      "--latency-batch", "1", "--latency-runs", "2", "--json")
    assert rc == 0 and rep["removed_total"] == 0 and "no exactly-zero" in rep["note"]
    assert rep["sparse_layouts"] == {"dense": 6}
    rc, _, err = _run(capsys, "sparsify", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"))
    assert rc == 2 and "no such checkpoint" in err
