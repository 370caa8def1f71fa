"""Metrics: parameter/MAC counts on hand-computable models, sparsity, latency, evaluation."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import models as zoo
from prunekit.errors import ConfigError
from prunekit.metrics import (
    LatencyResult,
    accuracy,
    count_macs,
    count_params,
    evaluate,
    layer_macs,
    measure_latency,
    sparsity,
)

# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def test_count_params_includes_bn_affine_excludes_buffers():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4, bias=False))
    # conv 8·3·3·3 + 8 bias; BN γ,β 2·8; linear 8·4. Running stats are buffers: not counted.
    assert count_params(m) == 216 + 8 + 16 + 32
    m[0].weight.requires_grad_(False)
    assert count_params(m, trainable_only=True) == 8 + 16 + 32
    m.tied = m[3]  # the same module twice counts once
    assert count_params(m) == 272


# ---------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Every MAC-relevant layer kind, with hand-computed per-sample MACs in ``EXPECTED``."""

    input_shape = (3, 10, 10)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 3·3·3·8·10·10 = 21600
        self.bn = nn.BatchNorm2d(8)  # 0
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)  # 3·3·4·16·5·5 = 14400
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # 3·3·1·16·5·5 = 3600
        self.pw = nn.Conv2d(16, 4, 1)  # 1·16·4·5·5 = 1600
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)  # k 4 · C_in 4 · C_out 2 · input 5·5 = 800
        self.conv1d = nn.Conv1d(2, 4, 3)  # on (2, 100): 3·2·4·98 = 2352
        self.seq_fc = nn.Linear(98, 6)  # on (4, 98): 98·6 per position, 4 positions = 2352
        self.head = nn.Linear(24, 10)  # 240
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.dw(self.grouped(torch.relu(self.bn(self.conv(x)))))
        x = self.up(self.pw(x))  # (2, 10, 10)
        x = self.conv1d(x.flatten(2))  # (4, 98)
        x = self.seq_fc(x)  # (4, 6)
        return self.head(self.drop(x.flatten(1)))


EXPECTED = {
    "conv": 21600,
    "grouped": 14400,
    "dw": 3600,
    "pw": 1600,
    "up": 800,
    "conv1d": 2352,
    "seq_fc": 2352,
    "head": 240,
}


def test_layer_macs_hand_computed():
    m = Mixed()
    assert layer_macs(m) == EXPECTED
    assert count_macs(m) == sum(EXPECTED.values())
    # Per sample: a batch of 4 gives the same number; input_shape overrides model.input_shape.
    assert count_macs(m, torch.randn(4, 3, 10, 10)) == sum(EXPECTED.values())
    assert count_macs(nn.Sequential(nn.Conv2d(1, 1, 3)), input_shape=(1, 5, 5)) == 9 * 9


def test_conv3d_and_reused_module():
    conv = nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1))
    assert count_macs(conv, torch.zeros(1, 2, 4, 6, 6)) == 9 * 2 * 3 * 4 * 36

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert layer_macs(Twice(), torch.zeros(1, 4)) == {"fc": 32}


def test_count_macs_restores_modes_and_takes_no_grad():
    m = Mixed()
    m.train()
    m.bn.eval()  # a deliberately mixed state must come back as it was
    stats = m.bn.running_mean.clone()
    count_macs(m, torch.randn(2, 3, 10, 10))
    assert m.training and m.conv.training and m.drop.training and not m.bn.training
    assert torch.equal(m.bn.running_mean, stats)
    assert all(p.grad is None for p in m.parameters())
    with pytest.raises(ConfigError, match="input_shape"):
        count_macs(nn.Sequential(nn.Linear(2, 2)))


class FunctionalConv(nn.Module):
    """Convolutions and a linear map written with ``torch.nn.functional``: no conv/linear module at all."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.dw = nn.Parameter(torch.randn(6, 1, 3, 3))
        self.register_buffer("proj", torch.randn(5, 96))

    def forward(self, x):  # (B, 3, 8, 8)
        x = F.conv2d(x, self.weight, padding=1)  # 3·3·3·6·8·8 = 10368
        x = F.conv2d(x, self.dw, stride=2, padding=1, groups=6)  # 3·3·1·6·4·4 = 864
        return F.linear(x.flatten(1), self.proj, torch.ones(5))  # 96·5 = 480 (bias not counted)


def test_functional_convolutions_are_counted():
    per_sample = 10368 + 864 + 480
    assert count_macs(FunctionalConv(), torch.randn(2, 3, 8, 8)) == per_sample
    # An op belongs to the innermost module whose forward ran it ("" is the root's own forward).
    assert layer_macs(FunctionalConv(), torch.randn(1, 3, 8, 8)) == {"": per_sample}
    wrapped = nn.Sequential(nn.Conv2d(3, 3, 1), FunctionalConv())  # 1·3·3·8·8 = 576
    assert layer_macs(wrapped, torch.randn(3, 3, 8, 8)) == {"0": 576, "1": per_sample}


class MatMuls(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.v = nn.Parameter(torch.randn(5))

    def forward(self, x):  # (B, 4, 6)
        y = x @ self.w  # (4×6)·(6×5): 120
        scores = torch.matmul(y, y.transpose(-1, -2))  # (4×5)·(5×4): 80
        mixed = torch.baddbmm(torch.zeros(1), scores, y[..., :3])  # (4×4)·(4×3): 48
        per_row = torch.stack([m @ self.v for m in y])  # matrix-vector (4×5)·(5,): 20 per sample
        return mixed.sum() + per_row.sum()


def test_matmul_bmm_baddbmm_and_matrix_vector_are_counted():
    assert count_macs(MatMuls(), torch.randn(2, 4, 6)) == 120 + 80 + 48 + 20
    assert count_macs(MatMuls(), torch.randn(1, 4, 6)) == 120 + 80 + 48 + 20


class SDPA(nn.Module):
    def __init__(self, mask: bool = False):
        super().__init__()
        self.mask = torch.zeros(5, 7) if mask else None

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


@pytest.mark.parametrize("mask", [False, True])
def test_scaled_dot_product_attention_is_counted(mask):
    # q (B, H=2, L=5, E=8), k (B, 2, S=7, 8), v (B, 2, 7, Ev=4): H·L·S·E for QKᵀ + H·L·S·Ev for AV.
    q, k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 4)
    assert count_macs(SDPA(mask), (q, k, v)) == 2 * 5 * 7 * 8 + 2 * 5 * 7 * 4


class Attention(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x, memory=None):
        memory = x if memory is None else memory
        if not self.batch_first:  # (B, L, E) → (L, B, E)
            x, memory = x.transpose(0, 1), memory.transpose(0, 1)
        return self.mha(x, memory, memory, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])  # True takes torch's fused inference path
def test_multihead_attention_is_counted(batch_first):
    e, lq = 16, 6
    x = torch.randn(2, lq, e)
    # q, k, v projections 3·L·E², QKᵀ and AV 2·L·L·E, output projection L·E².
    assert layer_macs(Attention(batch_first), x) == {"mha": 3 * lq * e * e + 2 * lq * lq * e + lq * e * e}
    memory, lk = torch.randn(2, 9, e), 9  # cross-attention: k and v projections over the memory's 9 positions
    expected = lq * e * e + 2 * lk * e * e + 2 * lq * lk * e + lq * e * e
    assert count_macs(Attention(batch_first), (x, memory)) == expected


@pytest.mark.parametrize(
    "name, cfg, macs, params",
    [
        ("resnet56", {}, 125_485_696, 853_018),  # 125.49 M / 0.85 M, as published
        ("resnet20", {}, 40_551_040, 269_722),  # 40.55 M
        ("vgg16", {}, 313_463_808, 14_987_722),  # 313.5 M (CIFAR-10)
        ("vgg16", {"num_classes": 100}, 313_509_888, None),
        ("resnet50", {}, 4_089_184_256, 25_557_032),
        ("mobilenetv2", {}, 300_774_272, 3_504_872),
        ("lenet-300-100", {}, 266_200, 266_610),  # Neuron Merging's LeNet-300-100: 784·300 + 300·100 + 100·10
    ],
)
def test_zoo_baseline_macs_match_published_counts(name, cfg, macs, params):
    m = zoo.create(name, **cfg)
    assert count_macs(m) == macs
    assert params is None or count_params(m) == params


def test_zoo_resnet50_params_and_grda_denominator():
    m = zoo.create("resnet50")
    assert count_params(m) == 25_557_032
    rep = sparsity(m, kinds=None, modules=None)
    assert rep.numel == rep.all_numel == 25_557_032  # gRDA's denominator (docs/grda.md)
    assert sparsity(m).numel == 25_502_912  # conv + fc weights only


# ---------------------------------------------------------------------------------------------
# Sparsity
# ---------------------------------------------------------------------------------------------


def test_sparsity_selection_and_totals():
    m = nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0]]).view(2, 1, 2, 2))  # 6/8 zero
        m[0].bias.copy_(torch.tensor([0.0, 1.0]))  # 1/2 zero
        m[1].weight.copy_(torch.tensor([0.0, 1.0]))  # 1/2 zero
        m[1].bias.zero_()  # 2/2 zero
        m[3].weight.copy_(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))  # 1/4 zero
        m[3].bias.fill_(1.0)  # 0/2
    rep = sparsity(m)
    assert [(t.name, t.numel, t.zeros) for t in rep.tensors] == [("0.weight", 8, 6), ("3.weight", 4, 1)]
    assert rep.tensors[0].fraction == 0.75
    assert (rep.numel, rep.zeros, rep.fraction) == (12, 7, 7 / 12)
    # all parameters: 8+2+2+2+4+2 = 20 entries, 6+1+1+2+1+0 = 11 zeros (gRDA's reported number).
    assert (rep.all_numel, rep.all_zeros) == (20, 11)
    full = sparsity(m, kinds=None, modules=None)
    assert (full.numel, full.zeros, full.fraction) == (20, 11, 11 / 20)
    biases = sparsity(m, kinds=("bias",), modules=None)
    assert [t.name for t in biases.tensors] == ["0.bias", "1.bias", "3.bias"] and biases.zeros == 3
    json.dumps(rep.as_dict())


# ---------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------


def test_measure_latency_returns_positive_stats():
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 4))
    m.train()
    r = measure_latency(m, torch.randn(8, 16), warmup=2, runs=7)
    assert isinstance(r, LatencyResult) and r.runs == 7
    assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms and r.mean_ms > 0
    assert m.training  # mode restored
    r = measure_latency(m, (torch.randn(1, 16),), warmup=0, runs=1, device="cpu")
    assert r.runs == 1 and r.p10_ms == r.median_ms == r.p90_ms
    with pytest.raises(ConfigError, match="runs >= 1"):
        measure_latency(m, torch.randn(1, 16), runs=0)


# ---------------------------------------------------------------------------------------------
# Accuracy and evaluate
# ---------------------------------------------------------------------------------------------

# The "model" is the identity, so the inputs are the logits. Six classes; for each sample the
# rank of its target among the logits (1 = largest) is chosen by hand.
LOGITS = torch.tensor(
    [
        [5.0, 1.0, 0.0, 2.0, 3.0, 4.0],  # target 0: rank 1 → top-1 and top-5 hit
        [1.0, 5.0, 4.0, 0.0, 2.0, 3.0],  # target 2: rank 2 → top-5 hit only
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # target 0: rank 6 → miss
        [3.0, 4.0, 5.0, 0.0, 2.0, 1.0],  # target 4: rank 4 → top-5 hit only
        [0.5, 0.0, 0.0, 0.0, 0.0, 9.0],  # target 5: rank 1 → both
    ]
)
TARGETS = torch.tensor([0, 2, 0, 4, 5])


def _hand_ce():
    total = 0.0
    for row, t in zip(LOGITS.tolist(), TARGETS.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[t]
    return total / len(TARGETS)


def _loader():
    return [(LOGITS[:3], TARGETS[:3]), (LOGITS[3:], TARGETS[3:])]  # uneven batches


def test_accuracy_helper():
    assert accuracy(LOGITS, TARGETS, topk=(1, 5)) == [40.0, 80.0]
    assert accuracy(LOGITS, F.one_hot(TARGETS, 6).float(), topk=(1, 2)) == [40.0, 60.0]


def test_evaluate_hand_computed():
    model = nn.Identity()
    res = evaluate(model, _loader())
    assert res["samples"] == 5
    assert res["accuracy"] == pytest.approx(40.0)
    assert res["top5"] == pytest.approx(80.0)
    assert res["loss"] == pytest.approx(_hand_ce(), rel=1e-6)
    # A criterion with the default 'mean' reduction gives the same per-sample mean.
    res2 = evaluate(model, _loader(), criterion=nn.CrossEntropyLoss(), topk=(1, 2, 5))
    assert res2["loss"] == pytest.approx(res["loss"], rel=1e-6) and res2["top2"] == pytest.approx(60.0)
    res_none = evaluate(model, _loader(), criterion=nn.CrossEntropyLoss(reduction="none"))
    assert res_none["loss"] == pytest.approx(res["loss"], rel=1e-6)
    # Fewer than 5 classes: no top5 entry.
    res3 = evaluate(model, [(LOGITS[:, :4], torch.tensor([0, 2, 0, 1, 0]))])
    assert "top5" not in res3 and res3["accuracy"] == pytest.approx(40.0)  # rows 0 and 4 hit
    with pytest.raises(ConfigError, match="no samples"):
        evaluate(model, [])


def test_evaluate_restores_train_mode():
    m = nn.Sequential(nn.Dropout(0.9), nn.Identity())
    m.train()
    res = evaluate(m, _loader())  # dropout off during evaluation → exact numbers
    assert res["accuracy"] == pytest.approx(40.0) and m.training


def _dist_worker(rank, world, init, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        shard = [(LOGITS[:3], TARGETS[:3])] if rank == 0 else [(LOGITS[3:], TARGETS[3:])]
        res = evaluate(nn.Identity(), shard)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_evaluate_all_reduces_under_distributed(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_dist_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["samples"] == 5
        assert res["accuracy"] == pytest.approx(40.0) and res["top5"] == pytest.approx(80.0)
        assert res["loss"] == pytest.approx(_hand_ce(), rel=1e-6)
