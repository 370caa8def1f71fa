"""Resumed passes through chains of blocks (``prunekit.compensate.block_passes``), for models that do not
trace: the chains of real ``transformers`` classes are found (and T5's, whose blocks pass state along, are
not), every resumed input equals a fresh pass's bit for bit whatever changed, the work is linear in the
blocks, and a reconstruction gives the same refits with and without it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from hf_models import HEAD_AND_MLP, build

import prunekit.compensate.reconstruct as reconstruct_module
from prunekit.compensate import ReconstructOptions, reconstruct_plan
from prunekit.compensate.block_passes import BlockPasses, find_chains
from prunekit.compensate.calibration import module_inputs
from prunekit.engine import ChannelGraph, make_plan

pytestmark = pytest.mark.usefixtures("one_thread")

CHAINS = {"llama": ("model.layers",), "gpt2": ("transformer.h",), "bert": ("bert.encoder.layer",),
          "vit": ("vit.layers",), "t5": ()}


@pytest.mark.parametrize("family", sorted(CHAINS))
def test_chains_of_real_transformers(family):
    model, x = build(family, layers=3)
    chains = find_chains(model, x)
    assert tuple(c.name for c in chains) == CHAINS[family]
    for c in chains:
        assert c.size == 3 and list(c.rank) == sorted(c.rank)
        assert all(a < b for a, b in zip(map(len, c.before), map(len, c.before[1:])))  # each sees more


def linears(model: nn.Module, chain: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(chain + ".")]


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
def test_resumed_inputs_equal_fresh_passes_and_cost_linear_work(family):
    """Every linear layer of the chain read in order, the network edited at the layer just read (as the
    sequential refit does) and, once, before the chain: bit-identical inputs; each block run about once."""
    model, x = build(family, layers=4)
    (chain,) = find_chains(model, x)
    passes = BlockPasses([chain], 1 << 30)
    names = linears(model, chain.name) or [n for n, m in model.named_modules()  # GPT-2: transposed Conv1D
                                           if n.startswith(chain.name + ".") and hasattr(m, "nf")]
    assert len(names) >= 8
    net = model
    for step, name in enumerate(names):
        for b in range(2):
            xb = x if b == 0 else x.flip(0)
            got, skip = passes.inputs(net, name, None, b, xb)
            assert skip is None and torch.equal(got, module_inputs(net, [name], xb)[name])
        net = copy.deepcopy(net)
        target = net.get_submodule(names[0] if step == len(names) // 2 else name)  # once: an early layer
        with torch.no_grad():
            target.weight.mul_(1.1)
    # each read runs (part of) its own block, one more when it enters a new block: linear in the layers;
    # from the input every time it would be Σ (block index + 1) over the reads: quadratic
    quadratic = 2 * sum(chain.block(n) + 1 for n in names)
    assert 0 < passes.blocks_run <= 2 * (len(names) + chain.size) < quadratic


def test_a_module_outside_the_chains_is_left_to_plain_passes():
    model, x = build("llama", layers=2)
    passes = BlockPasses(find_chains(model, x), 1 << 30)
    assert passes.inputs(model, "lm_head", None, 0, x) is None


@pytest.mark.parametrize(("family", "select"), [("llama", "greedy"), ("llama", "global"), ("vit", "greedy")])
def test_reconstruction_is_the_same_with_and_without_block_passes(monkeypatch, family, select):
    """Resumed (the default) vs every pass from the input (no entries kept; residual targets on) and, without
    residual targets, vs plain hooks: the same survivors and bit-identical refits."""
    model, x = build(family, layers=3)
    heads, mlp = HEAD_AND_MLP[family]
    graph = ChannelGraph.build(model, x)
    plan = make_plan(model, graph, ratio=0.0, overrides={heads: 0.5, mlp: 0.5})
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(48, 3, 32, 32, generator=g) if family == "vit" else torch.randint(0, 1000, (48, 12), generator=g)
    for residual in (True, False):
        options = ReconstructOptions(calibration=48, batch_size=16, select=select, residual=residual)
        resumed, reports = reconstruct_plan(model, graph, plan, calib, options)
        assert any(r.get("residual_target") for r in reports) == residual
        with monkeypatch.context() as m:
            if residual:
                m.setattr(reconstruct_module, "BlockPasses", lambda chains, max_bytes: BlockPasses(chains, 0))
            else:
                m.setattr(reconstruct_module, "find_chains", lambda model, probe: [])
            plain, _ = reconstruct_plan(model, graph, plan, calib, options)
        assert [gp.keep for gp in resumed.groups] == [gp.keep for gp in plain.groups]
        assert len(resumed.refits) == len(plain.refits) >= 6
        for a, b in zip(resumed.refits, plain.refits):
            assert a.module == b.module and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "vit", "distilbert"])
def test_stream_skips_of_real_transformers_are_the_residual_inputs(family):
    """Attention and MLP output projections are added to the stream value their sublayer started from."""
    from prunekit.compensate.stream_skips import find_stream_skips

    model, x = build(family, layers=2)
    skips = find_stream_skips(model, find_chains(model, x), x)
    assert len(skips) == 4 and all(s.kind == "in" for s in skips.values())
    want = {"llama": ("input_layernorm", "post_attention_layernorm"), "gpt2": ("ln_1", "ln_2"),
            "vit": ("layernorm_before", "layernorm_after"),
            "bert": ("attention.self.value", "intermediate.dense"),  # post-norm: the sublayer's input
            "distilbert": ("attention.v_lin", "ffn.lin1")}[family]
    (chain,) = find_chains(model, x)
    assert sorted(s.module for s in skips.values()) == sorted(f"{chain.name}.{i}.{w}" for i in range(2) for w in want)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, h):
        return h + self.fc2(torch.relu(self.fc1(h)))


class _Stack(nn.Module):
    """Residual MLP blocks in a ModuleList (traceable: the fx path and the block path can be compared)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_Residual() for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, h):
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_stream_skips_give_the_same_refits_as_skips_found_on_the_trace(monkeypatch):
    """With the trace hidden from the reconstruction, the chain's stream skips (found numerically) stand in for
    the add's other operand (found on the fx graph): the same residual-aware refits, to float tolerance."""
    net = _Stack().eval()
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(2))
    graph = ChannelGraph.build(net, x[:1])
    plan = make_plan(net, graph, ratio=0.5)
    options = ReconstructOptions(calibration=200, batch_size=50, select="greedy")
    traced, traced_reports = reconstruct_plan(net, graph, plan, x, options)
    monkeypatch.setattr(reconstruct_module, "find_skips", lambda model, probe: ({}, None))
    chained, chained_reports = reconstruct_plan(net, graph, plan, x, options)
    skipped = {r["module"] for r in chained_reports if r.get("residual_target")}
    assert skipped == {r["module"] for r in traced_reports if r.get("residual_target")} == \
        {f"layers.{i}.fc2" for i in range(3)}
    assert [gp.keep for gp in traced.groups] == [gp.keep for gp in chained.groups]
    for a, b in zip(traced.refits, chained.refits):
        assert a.module == b.module
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-9)
