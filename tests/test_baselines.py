"""The baselines (``magnitude``, ``wanda-sp``, ``flap``): each score against a direct computation of its
paper's formula, FLAP's adaptive selection and bias compensation, and the methods end to end (plain-torch
attention block; a tiny grouped-query ``LlamaForCausalLM`` when ``transformers`` is installed)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.baselines import (
    adaptive_keep,
    classify,
    compensation_offsets,
    flap_scores,
    flap_standardized,
    input_statistics,
    wanda_sp_scores,
)
from prunekit.engine import ChannelGraph, ScoreContext, apply, get_criterion, make_plan
from prunekit.errors import ConfigError
from prunekit.methods import PruneOptions, get_method, list_methods

pytestmark = pytest.mark.usefixtures("one_thread")

D, H, HD, F_ = 16, 4, 4, 16  # hidden, heads, head dim, MLP width


class Block(nn.Module):
    """Pre-norm transformer block: Linear q/k/v/o + SDPA heads, GELU MLP."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, F_), nn.Linear(F_, D)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (y.view(b, t, -1, HD).transpose(1, 2) for y in (self.q(h), self.k(h), self.v(h)))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Net(nn.Module):
    """Input projection → block → head: the hidden size is a prunable group too."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.block, self.head = nn.Linear(5, D), Block(), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def data(n: int = 12, t: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, t, 5, generator=torch.Generator().manual_seed(seed))


def inputs_of(model: nn.Module, module: nn.Module, x) -> torch.Tensor:
    """The module's input over all tokens of ``x``, (tokens, columns), float64."""
    seen = []
    h = module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**x) if isinstance(x, dict) else model(x)
    h.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()


def group_of(graph, module):
    return graph.group(module)


# ---------------------------------------------------------------- activations


def test_streamed_statistics_equal_the_direct_ones():
    model, x = Net().eval(), data()
    stats = input_statistics(model, ["block.o", "block.fc2", "head"], x, batch_size=5)  # 3 uneven batches
    for name in ("block.o", "block.fc2", "head"):
        X = inputs_of(model, model.get_submodule(name), x)
        s = stats[name]
        assert s.n == X.shape[0] == 12 * 6
        assert torch.allclose(s.norm, X.norm(dim=0), rtol=1e-10)
        assert torch.allclose(s.mean, X.mean(0), rtol=1e-10, atol=1e-12)
        assert torch.allclose(s.var, X.var(0, unbiased=True), rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError, match="not a Linear-like"):
        input_statistics(model, ["block.ln1"], x)


# ---------------------------------------------------------------- magnitude


def test_magnitude_sums_every_slice_of_a_channel_and_is_mean_normalised():
    model = Net().eval()
    graph = ChannelGraph.build(model, data(2))
    crit = get_criterion("magnitude")
    b = model.block
    ab = lambda t: t.detach().abs().double()
    # a head: its D rows of q, k, v and its D columns of o
    g = group_of(graph, "block.q")
    raw = torch.stack([sum(ab(m.weight[h * HD:(h + 1) * HD]).sum() for m in (b.q, b.k, b.v))
                       + ab(b.o.weight[:, h * HD:(h + 1) * HD]).sum() for h in range(H)])
    assert torch.allclose(crit(ScoreContext(model, graph), g), raw / raw.mean(), rtol=1e-10)
    # with biases (TP's bias=True): + |b| of the producer rows
    raw_b = raw + torch.stack([sum(ab(m.bias[h * HD:(h + 1) * HD]).sum() for m in (b.q, b.k, b.v)) for h in range(H)])
    assert torch.allclose(crit(ScoreContext(model, graph, include_bias=True), g), raw_b / raw_b.mean(), rtol=1e-10)
    # the hidden size: every producer row, consumer column and LayerNorm γ of the residual stream
    g = group_of(graph, "embed")
    rows = sum(ab(m.weight).sum(1) for m in (model.embed, b.o, b.fc2))
    cols = sum(ab(m.weight).sum(0) for m in (b.q, b.k, b.v, b.fc1, model.head))
    raw = rows + cols + ab(b.ln1.weight) + ab(b.ln2.weight)
    assert torch.allclose(crit(ScoreContext(model, graph), g), raw / raw.mean(), rtol=1e-10)
    # p = 2: |w|² (no root)
    g = group_of(graph, "block.fc1")
    raw = b.fc1.weight.detach().double().pow(2).sum(1) + b.fc2.weight.detach().double().pow(2).sum(0)
    assert torch.allclose(get_criterion("magnitude-l2")(ScoreContext(model, graph), g), raw / raw.mean())
    # the method = plain prune with that criterion
    res = get_method("magnitude")(model, data(2), PruneOptions(ratio=0.5))
    plan = make_plan(model, graph, ratio=0.5, criterion="magnitude")
    assert [gp.keep for gp in res.model.prunekit_plan.groups] == [gp.keep for gp in plan.groups]
    assert res.model.block.fc1.out_features == 8 and res.details["criterion_used"] == "magnitude"
    with pytest.raises(ConfigError, match="p must be 1 or 2"):
        get_method("magnitude")(model, data(2), PruneOptions(method_options={"p": 3}))


# ---------------------------------------------------------------- wanda-sp


def test_wanda_sp_scores_a_structure_by_its_consumer_columns():
    model, x = Net().eval(), data()
    graph = ChannelGraph.build(model, data(2))
    kinds = classify(model, graph)
    heads, mlp, hidden = graph.group("block.q"), graph.group("block.fc1"), graph.group("embed")
    assert kinds[heads.id][0] == "heads" and kinds[mlp.id][0] == "neurons" and kinds[hidden.id][0] == "multi"
    stats = input_statistics(model, ["block.o", "block.fc2"], x)
    Xo, Xf = inputs_of(model, model.block.o, x), inputs_of(model, model.block.fc2, x)
    Wo, Wf = model.block.o.weight.detach().double(), model.block.fc2.weight.detach().double()
    per_col = Wo.abs() * Xo.norm(dim=0)  # |W_ij| · ‖X_j‖₂
    want = per_col.sum(0).view(H, HD).sum(1)  # Σ over the head's columns and all rows
    assert torch.allclose(wanda_sp_scores(H, kinds[heads.id][1], stats), want, rtol=1e-10)
    want = (Wf.abs() * Xf.norm(dim=0)).sum(0)
    assert torch.allclose(wanda_sp_scores(F_, kinds[mlp.id][1], stats), want, rtol=1e-10)
    # the method keeps the best half of each, and leaves the hidden size whole by default
    res = get_method("wanda-sp")(model, data(2), PruneOptions(ratio=0.5, calibration_data=x))
    plan = res.model.prunekit_plan
    assert plan.group(heads.id).keep == sorted(torch.topk(wanda_sp_scores(H, kinds[heads.id][1], stats), 2)
                                               .indices.tolist())
    assert plan.group(mlp.id).keep == sorted(torch.topk(want, 8).indices.tolist())
    assert plan.group(hidden.id).keep == list(range(D)) and "embed" in res.details["left_whole"]
    assert res.model.block.o.in_features == 2 * HD and res.model.block.fc2.in_features == 8
    # hidden=sum: the same formula summed over the stream's consumers
    res = get_method("wanda-sp")(model, data(2), PruneOptions(ratio=0.25, calibration_data=x,
                                                              method_options={"hidden": "sum"}))
    cons = [model.block.q, model.block.k, model.block.v, model.block.fc1, model.head]
    s = sum((m.weight.detach().double().abs() * inputs_of(model, m, x).norm(dim=0)).sum(0) for m in cons)
    assert res.model.prunekit_plan.group(hidden.id).keep == sorted(torch.topk(s, 12).indices.tolist())


# ---------------------------------------------------------------- FLAP


def test_flap_fluctuation_metric_standardisation_and_head_aggregation():
    model, x = Net().eval(), data()
    graph = ChannelGraph.build(model, data(2))
    kinds = classify(model, graph)
    heads, mlp = graph.group("block.q"), graph.group("block.fc1")
    stats = input_statistics(model, ["block.o", "block.fc2"], x)
    Xo, Xf = inputs_of(model, model.block.o, x), inputs_of(model, model.block.fc2, x)
    Wo, Wf = model.block.o.weight.detach().double(), model.block.fc2.weight.detach().double()
    m_o = (Xo.var(0, unbiased=True) * Wo.pow(2).sum(0)) ** 2  # WIFV, squared for o_proj as in FLAP's code
    m_f = Xf.var(0, unbiased=True) * Wf.pow(2).sum(0)
    z = lambda m: (m - m.mean()) / m.std()  # torch.std: unbiased, as FLAP's standarlization
    assert torch.allclose(flap_standardized(H, kinds[heads.id][1], stats, heads=True), z(m_o).view(H, HD).mean(1), atol=1e-10)
    assert torch.allclose(flap_standardized(F_, kinds[mlp.id][1], stats), z(m_f), atol=1e-10)
    assert torch.allclose(flap_scores(H, kinds[heads.id][1], stats, heads=True), m_o.view(H, HD).sum(1), rtol=1e-10)
    assert torch.allclose(flap_scores(F_, kinds[mlp.id][1], stats, metric="IFV"), Xf.var(0), rtol=1e-10)


def test_flap_adaptive_selection_keeps_the_cost_closest_prefix():
    # group 0: 2 channels of cost 10 (heads), group 1: 4 channels of cost 1 (neurons); total 24
    pool = {0: (np.arange(2), torch.tensor([0.5, -1.0]), torch.tensor([10.0, 10.0])),
            1: (np.arange(4), torch.tensor([2.0, 1.0, -0.5, -2.0]), torch.ones(4))}
    # ranking: g1c0 (1), g1c1 (2), g0c0 (12), g1c2 (13), g0c1 (23), g1c3 (24); ratio 0.5 → target 12
    assert adaptive_keep(pool, 0.5) == {0: [0], 1: [0, 1]}
    assert adaptive_keep(pool, 0.0) == {0: [0, 1], 1: [0, 1, 2, 3]}
    assert adaptive_keep(pool, 0.95) == {0: [0], 1: [0]}  # never a group's last channel


def _constant_channels(model: Net) -> Net:
    """Heads 0, 1 and MLP neurons 0..7 output constants (zero weights, nonzero biases)."""
    with torch.no_grad():
        model.block.v.weight[:2 * HD] = 0
        model.block.v.bias[:2 * HD] = torch.linspace(-1, 1, 2 * HD)
        model.block.fc1.weight[:8] = 0
        model.block.fc1.bias[:8] = torch.linspace(-2, 2, 8)
    return model


# UL-UM: half of each group. AL-AM: the constant neurons (z = −0.67) rank below everything else, the
# constant heads (z = −0.37) do not (a varying neuron has z = −0.45); ratio 0.165 = the constant neurons'
# share of the cost (8 · 33 of 4 · 268 + 16 · 33 parameters).
@pytest.mark.parametrize("structure,ratio,heads", [("UL-UM", 0.5, [2, 3]), ("AL-AM", 0.165, [0, 1, 2, 3])])
def test_flap_compensation_is_exact_when_the_removed_inputs_are_constant(structure, ratio, heads):
    model, x = _constant_channels(Net().eval()), data()
    opts = {"structure": structure}
    res = get_method("flap")(model, data(2), PruneOptions(ratio=ratio, calibration_data=x, method_options=opts))
    small, plan = res.model, res.model.prunekit_plan
    graph = ChannelGraph.build(model, data(2))
    assert plan.group(graph.group("block.q").id).keep == heads  # zero fluctuation goes first
    assert plan.group(graph.group("block.fc1").id).keep == list(range(8, 16))
    assert sorted(r.module for r in plan.refits) == (["block.fc2", "block.o"] if len(heads) < H else ["block.fc2"])
    y = torch.randn(3, 5, 5)  # any input: the removed channels are constant everywhere
    with torch.no_grad():
        assert torch.allclose(small(y), model(y), atol=1e-5)
        plain = get_method("flap")(model, data(2), PruneOptions(ratio=ratio, calibration_data=x, method_options={
            **opts, "compensate": "false"})).model
        assert not plain.prunekit_plan.refits and not torch.allclose(plain(y), model(y), atol=1e-2)


def test_flap_compensation_removes_the_mean_of_the_removed_contribution():
    """MLP neurons only (heads kept): the down projection's error on the calibration tokens is the removed
    contribution a_t; compensated, a_t − ā, so the squared error drops by exactly n·‖ā‖²."""
    model, x = Net(seed=3).eval(), data(16, 6, seed=4)
    opts = PruneOptions(ratio=0.5, calibration_data=x, overrides={"block.q": 0.0},
                        method_options={"structure": "local"})
    with_c = get_method("flap")(model, data(2), opts).model
    no_c = get_method("flap")(model, data(2), dataclasses.replace(opts, method_options={
        "structure": "local", "compensate": False})).model
    out = lambda m: inputs_of(m, m.head, x)  # the block output over all tokens
    ref = out(model)
    err_c, err_n = ((out(with_c) - ref) ** 2).sum(), ((out(no_c) - ref) ** 2).sum()
    offset = with_c.prunekit_plan.refit("block.fc2").offset.double()
    assert err_c < err_n
    assert torch.allclose(err_n - err_c, ref.shape[0] * offset.pow(2).sum(), rtol=1e-4)
    # the offset is W[:, removed] · mean(X_removed) (FLAP's output_bias)
    keep = with_c.prunekit_plan.group(ChannelGraph.build(model, data(2)).group("block.fc1").id).keep
    removed = sorted(set(range(F_)) - set(keep))
    Xf = inputs_of(model, model.block.fc2, x)
    want = model.block.fc2.weight.detach().double()[:, removed] @ Xf[:, removed].mean(0)
    assert torch.allclose(offset, want, atol=1e-6)


def test_method_options_are_checked():
    model, x = Net().eval(), data()
    with pytest.raises(ConfigError, match="not understood by 'wanda-sp'"):
        get_method("wanda-sp")(model, data(2), PruneOptions(calibration_data=x, method_options={"metric": "IFV"}))
    with pytest.raises(ConfigError, match="needs calibration inputs"):
        get_method("flap")(model, data(2), PruneOptions())
    with pytest.raises(ConfigError, match="leaves whole"):
        get_method("flap")(model, data(2), PruneOptions(calibration_data=x, overrides={"embed": 0.5}))
    with pytest.raises(ConfigError, match="structure"):
        get_method("flap")(model, data(2), PruneOptions(calibration_data=x, method_options={"structure": "x"}))
    assert {"magnitude", "wanda-sp", "flap"} <= set(list_methods())


# ---------------------------------------------------------------- Llama (grouped-query attention)


@pytest.fixture(scope="module")
def llama():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64)
    model = T.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (16, 10), generator=torch.Generator().manual_seed(0))
    return T, cfg, model, ids


def test_llama_scores_per_kv_head(llama):
    _, _, model, ids = llama
    graph = ChannelGraph.build(model, ids[:2])
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    g = graph.group("model.layers.0.self_attn.q_proj")
    assert g.size == 2  # one channel per kv head, with its 2 query heads (16 o_proj columns)
    kinds = classify(model, graph)
    names = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    stats = input_statistics(model, names, ids, batch_size=4)
    X = inputs_of(model, attn.o_proj, ids)
    W = attn.o_proj.weight.detach().double()
    wanda = (W.abs() * X.norm(dim=0)).sum(0).view(2, 16).sum(1)
    assert torch.allclose(wanda_sp_scores(2, kinds[g.id][1], stats), wanda, rtol=1e-9)
    m = (X.var(0) * W.pow(2).sum(0)) ** 2
    assert torch.allclose(flap_standardized(2, kinds[g.id][1], stats, heads=True),
                          ((m - m.mean()) / m.std()).view(2, 16).mean(1), atol=1e-9)
    # magnitude: q rows of query heads 2c, 2c+1, k/v rows of kv head c, o columns of both query heads
    ab = lambda t: t.detach().abs().double()
    raw = torch.stack([ab(attn.q_proj.weight[16 * c:16 * (c + 1)]).sum() + ab(attn.k_proj.weight[8 * c:8 * (c + 1)]).sum()
                       + ab(attn.v_proj.weight[8 * c:8 * (c + 1)]).sum() + ab(W[:, 16 * c:16 * (c + 1)]).sum()
                       for c in range(2)])
    assert torch.allclose(get_criterion("magnitude")(ScoreContext(model, graph), g), raw / raw.mean(), rtol=1e-9)
    # padded tokens of a dict batch are left out of the statistics
    mask = torch.ones_like(ids)
    mask[:, 7:] = 0
    s = input_statistics(model, [names[1]], {"input_ids": ids, "attention_mask": mask}, batch_size=5)[names[1]]
    Xd = inputs_of(model, mlp.down_proj, {"input_ids": ids, "attention_mask": mask}).view(16, 10, -1)[:, :7]
    assert s.n == 16 * 7 and torch.allclose(s.var, Xd.reshape(-1, 64).var(0), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap"])
def test_llama_methods_run_end_to_end(llama, method):
    _, _, model, ids = llama
    res = get_method(method)(model, ids[:2], PruneOptions(ratio=0.5, calibration_data=ids))
    small = res.model
    attn, mlp = small.model.layers[0].self_attn, small.model.layers[0].mlp
    assert attn.o_proj.in_features == 16 and res.details["channels_removed"] > 0  # one kv head (2 q heads) left
    if method != "flap":
        assert mlp.down_proj.in_features == 32
    with torch.no_grad():
        out = small(ids[:3]).logits
    assert out.shape == (3, 10, 64) and torch.isfinite(out).all()
    if method == "magnitude":
        assert small.model.embed_tokens.embedding_dim == 16  # the hidden size too
    else:
        assert small.model.embed_tokens.embedding_dim == 32  # heads and MLP only, as in the papers


def test_flap_llama_creates_biases_that_save_and_reload(llama, tmp_path):
    from prunekit.io import load_model, save_model

    T, cfg, model, ids = llama
    res = get_method("flap")(model, ids[:2], PruneOptions(ratio=0.5, calibration_data=ids))
    small = res.model
    o, d = small.model.layers[0].self_attn.o_proj, small.model.layers[0].mlp.down_proj
    assert o.bias is not None and d.bias is not None and model.model.layers[0].self_attn.o_proj.bias is None
    assert set(res.details["created_biases"]) == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    # the created bias is FLAP's offset W[:, removed] · mean(X_removed)
    graph = ChannelGraph.build(model, ids[:2])
    keep = small.prunekit_plan.group(graph.group("model.layers.0.self_attn.q_proj").id).keep
    removed = [j for j in range(32) if j // 16 not in keep]
    X = inputs_of(model, model.model.layers[0].self_attn.o_proj, ids)
    want = model.model.layers[0].self_attn.o_proj.weight.detach().double()[:, removed] @ X[:, removed].mean(0)
    assert torch.allclose(o.bias.double(), want, atol=1e-6)
    save_model(tmp_path / "flap", small)
    torch.manual_seed(1)
    dense = T.LlamaForCausalLM(cfg).eval()
    loaded, _ = load_model(tmp_path / "flap", model=dense)
    with torch.no_grad():
        assert torch.equal(loaded(ids[:3]).logits, small(ids[:3]).logits)
    assert loaded.model.layers[0].mlp.down_proj.bias is not None
    with pytest.raises(ConfigError, match="save_model"):  # the Llama config cannot say 'o_proj has a bias'
        small.save_pretrained(tmp_path / "hf")


def test_an_offset_on_a_bias_free_linear_creates_its_bias_and_replay_recreates_it():
    from prunekit.engine import Plan, Refit, replay

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, bias=False)).eval()
    graph = ChannelGraph.build(model, (2, 4))
    g = graph.group("0")
    x = torch.randn(20, 4)
    plan = make_plan(model, graph, ratio=0.5)
    removed = sorted(set(range(6)) - set(plan.group(g.id).keep))
    offsets = compensation_offsets(model, classify(model, graph)[g.id][1], plan.group(g.id).keep,
                                   input_statistics(model, ["2"], x))
    X = inputs_of(model, model[2], x)
    want = model[2].weight.detach().double()[:, removed] @ X[:, removed].mean(0)
    assert set(offsets) == {"2"} and torch.allclose(offsets["2"], want, atol=1e-7)
    small = apply(model, graph, Plan(groups=plan.groups, refits=[Refit(module="2", offset=offsets["2"])]))
    assert torch.allclose(small[2].bias, want.float())
    dense = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, bias=False))
    replay(dense, small.prunekit_record)
    assert dense[2].bias is not None and dense[2].bias.shape == (3,) and dense[0].out_features == 3
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 1, bias=False)).eval()
    cg = ChannelGraph.build(conv, (1, 1, 4, 4))
    with pytest.raises(Exception, match="needs a bias"):  # only a Linear gets one created
        apply(conv, cg, Plan(refits=[Refit(module="2", offset=torch.ones(2))]))
