"""Capture by recording a real run (``capture="record"``): the graph contract, equivalence with torch.fx,
models fx cannot trace, ``transformers`` models, and hooks left behind."""
from __future__ import annotations

import operator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from prunekit import models
from prunekit.engine import ChannelGraph, UntraceableModelError, apply, make_plan, mask
from prunekit.engine.capture import _trace_export, _trace_fx, capture_graph
from prunekit.engine.ops import op_name
from prunekit.engine.record import trace_record
from prunekit.runtime import eval_mode

pytestmark = pytest.mark.usefixtures("one_thread")


def signature(g: ChannelGraph) -> list:
    return [(gr.name, gr.size, sorted((m.module, m.role) for m in gr.members), gr.protected, gr.blocked,
             gr.mergeable, gr.merge_reason) for gr in g.groups]


def record(model: nn.Module, *args, leaves: set[str] | None = None, **kwargs):
    with eval_mode(model), torch.no_grad():
        return trace_record(model, args, kwargs, leaves or set())


def calls(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op in ("call_function", "call_module")]


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------
# same groups as torch.fx


@pytest.mark.parametrize("name, shape", [("resnet20", (2, 3, 32, 32)), ("vgg16", (1, 3, 32, 32)),
                                         ("lenet-5", (2, 1, 28, 28)), ("lenet-300-100", (2, 784)),
                                         ("resnet-cifar", (1, 3, 32, 32))])
def test_zoo_models_record_the_groups_fx_finds(name, shape):
    m = models.create(name)
    fx_graph = ChannelGraph.build(m, shape, capture="fx")
    rec_graph = ChannelGraph.build(m, shape, capture="record")
    assert fx_graph.mode == "fx" and rec_graph.mode == "record"
    assert signature(rec_graph) == signature(fx_graph) and len(rec_graph.prunable_groups) > 0
    assert no_hooks(m)


class Ops(nn.Module):
    """Python operators, methods and functions whose fx spelling the recorder must reproduce."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.lin = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(4, 5)
        self.register_buffer("mix", torch.ones(4, 4))

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        a, b = h.chunk(2, 1)
        h = torch.cat([a * b, a + 1, 1 - b, 2 ** a], 1)[:, :8]
        h = -h.permute(0, 2, 3, 1).contiguous()
        h = h.mean((1, 2))
        h = h.view(h.size(0), 2, 4).flatten(1)
        h = h[..., :4] @ self.mix - 0.5
        return self.lin(torch.sigmoid(h))


def test_op_names_match_fx():
    m, x = Ops().eval(), torch.randn(2, 3, 6, 6)
    with eval_mode(m), torch.no_grad():
        fx_graph, fx_shapes, _ = _trace_fx(m, (x,), {}, set())
        graph, shapes, _ = trace_record(m, (x,), {}, set())
    # fx also records the shape queries (size) whose values the recorder writes as literals
    fx_all = [n for n in fx_graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    fx_ops = [op_name(n) if n.op != "call_module" else n.target for n in fx_all if fx_shapes[n] is not None]
    rec_ops = [op_name(n) if n.op != "call_module" else n.target for n in calls(graph)]
    assert rec_ops == fx_ops and "size" in [op_name(n) for n in fx_all] and len(rec_ops) == 23
    assert [shapes[n] for n in calls(graph)] == [fx_shapes[n] for n in fx_all if fx_shapes[n] is not None]


# ----------------------------------------------------------------------------------------------
# the graph contract


class Contract(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.pos = nn.Parameter(torch.zeros(1, 8, 1, 1))
        self.table = torch.zeros(3)  # a plain attribute: no node until the recorder meets it

    def forward(self, x):
        h = self.conv1(x)
        h.relu_()
        h += self.conv2(x)
        self.table[1] = 2.0
        h = h + self.pos * self.table[1]
        a, b = h.chunk(2, 1)
        return torch.cat([2 * a, 1 - b, 2 / a, 3 ** b], 1)


def test_record_graph_contract():
    m, x = Contract(), torch.randn(2, 3, 4, 4)
    graph, shapes, out = record(m, x)
    nodes = list(graph.nodes)
    assert [n.target for n in nodes if n.op == "placeholder"] == ["x"]
    assert set(shapes) == set(nodes) - {nodes[-1]} and all("module" in n.meta for n in nodes)
    conv1, conv2 = (n for n in nodes if n.op == "call_module")
    (relu,) = conv1.users  # in place: h now maps to relu_, then to add_
    (iadd,) = relu.users
    assert (op_name(relu), op_name(iadd), iadd.args) == ("relu", "add", (relu, conv2))
    setitem = next(n for n in nodes if n.target is operator.setitem)
    table = setitem.args[0]
    assert table.op == "get_attr" and table.target == "_prunekit_constant_0" and setitem.args[1:] == (1, 2.0)
    assert shapes[setitem] == torch.Size([3])
    read = next(n for n in nodes if n.target is operator.getitem and n.args[0] is setitem)  # table[1] after
    pos = next(n for n in nodes if n.op == "get_attr" and n.target == "pos")
    assert shapes[pos] == torch.Size([1, 8, 1, 1]) and read in next(iter(pos.users)).args
    chunk = next(n for n in nodes if op_name(n) == "chunk")
    assert shapes[chunk] == (torch.Size([2, 4, 4, 4]),) * 2
    a, b = chunk.users
    assert (a.target, a.args, b.args) == (operator.getitem, (chunk, 0), (chunk, 1))
    mul, rsub, rdiv, rpow = (n for n in nodes if n.op == "call_function" and n.args[:2] in [(a, 2), (1, b), (2, a), (3, b)])
    assert op_name(mul) == "mul"  # ``2 * a`` reaches the recorder as Tensor.mul(a, 2)
    assert (rsub.target, rdiv.target, rpow.target) == (operator.sub, operator.truediv, operator.pow)
    assert nodes[-1].args == (next(n for n in nodes if op_name(n) == "cat"),) and out == torch.Size([2, 16, 4, 4])
    assert no_hooks(m)


class LeafTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.head(out + h.transpose(0, 1) + c.transpose(0, 1))


def test_leaf_returning_a_nested_tuple():
    graph, shapes, _ = record(LeafTuple(), torch.randn(2, 3, 4))
    lstm = next(n for n in graph.nodes if n.op == "call_module" and n.target == "lstm")
    s = torch.Size([1, 2, 6])
    assert shapes[lstm] == (torch.Size([2, 3, 6]), (s, s)) and lstm.meta["module"] == ""
    out, hc = lstm.users
    h, c = hc.users
    assert out.args == (lstm, 0) and hc.args == (lstm, 1) and (h.args, c.args) == ((hc, 0), (hc, 1))
    assert shapes[h] == s and next(iter(h.users)).op == "call_function"


class Scaled(nn.Module):
    """A parameter-owning custom module without a rule: fx keeps it a leaf, the recorder traces into it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class WithScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.scaled, self.relu = nn.Conv2d(3, 8, 1), Scaled(), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.scaled(self.conv(x)))


def test_module_meta_and_traced_into_parameter_owners():
    m, x = WithScaled(), torch.randn(1, 3, 4, 4)
    graph, _shapes, _ = record(m, x)
    where = {(n.op, str(n.target) if n.op != "call_function" else op_name(n)): n.meta["module"] for n in graph.nodes}
    assert where == {("placeholder", "x"): "", ("call_module", "conv"): "", ("get_attr", "scaled.scale"): "scaled",
                     ("call_function", "view"): "scaled", ("call_function", "mul"): "scaled",
                     ("call_module", "relu"): "", ("output", "output"): ""}
    relu = next(n for n in graph.nodes if n.target == "relu")
    assert list(graph.nodes)[-1].args == (relu,)  # the in-place ReLU returns its input object: mapped to relu


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 4, 1), nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.body(self.stem(x)).mean((2, 3))


def test_module_meta_agrees_across_fx_record_export():
    m, x = Nested().eval(), torch.randn(1, 3, 6, 6)
    seen = []
    with eval_mode(m), torch.no_grad():
        for trace in (_trace_fx, trace_record, _trace_export):
            graph, _s, _o = trace(m, (x,), {}, set())
            mods = [(str(n.target), n.meta["module"]) for n in graph.nodes if n.op == "call_module"]
            adds = [n.meta["module"] for n in graph.nodes if n.op == "call_function" and op_name(n) == "add"]
            seen.append((mods, adds))
    assert seen[0][0] == [("stem", ""), ("body.0.conv", "body.0"), ("body.0.bn", "body.0"),
                          ("body.1.conv", "body.1"), ("body.1.bn", "body.1")]
    assert seen[0][1] == ["body.0", "body.1"] and seen[1] == seen[0] and seen[2] == seen[0]


# ----------------------------------------------------------------------------------------------
# models torch.fx cannot trace


class Dynamic(nn.Module):
    """``**kwargs`` and data-dependent Python control flow: torch.fx gives up, the recorder follows the run."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.convs = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.head = nn.Linear(8, 5)

    def forward(self, x, **kwargs):
        h = F.relu(self.bn(self.stem(x)))
        for conv in self.convs[: kwargs.get("depth", 1)]:
            if x.abs().sum() > 0:  # data-dependent branch (on the input: a reduction protects what it reads)
                h = F.relu(conv(h)) + h
        return self.head(h.mean((2, 3)) * kwargs.get("scale", 1.0))


def test_untraceable_by_fx_is_recorded_and_pruned():
    torch.manual_seed(0)
    m, x = Dynamic().eval(), torch.randn(2, 3, 8, 8)
    inputs = {"x": x, "depth": 2, "scale": 0.5}
    with pytest.raises(UntraceableModelError, match="torch.fx failed"):
        ChannelGraph.build(m, inputs, capture="fx")
    with pytest.warns(UserWarning, match=r"never reach 1 module\(s\) .*\(convs\.2\)"):
        g = ChannelGraph.build(m, inputs)
    assert g.mode == "record" and no_hooks(m)
    # the residual branch ran twice: convs.0/1 share the stem's channels; convs.2 never ran
    assert {mm.module for mm in g.group("stem").members} == {"stem", "bn", "convs.0", "convs.1", "head"}
    assert [len(gr.members) for gr in g.groups] == [7, 1] and "convs.2" not in {mm.module for mm in g.members}
    plan = make_plan(m, g, ratio=0.5)
    assert not any(p.merge is not None for p in plan.groups)
    pruned = apply(m, g, plan)
    with torch.no_grad():
        y, yp, ym = m(**inputs), pruned(**inputs), mask(m, g, plan)(**inputs)
    assert pruned.stem.out_channels == 4 and pruned.convs[0].out_channels == 4
    assert yp.shape == y.shape == (2, 5) and (yp - ym).abs().max().item() <= 1e-5 * (1 + ym.abs().max().item())


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.inner = nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU())
        self.config = SimpleNamespace(use_cache=True)

    def forward(self, x):
        h = self.conv(x)
        if h.shape[1] != 5:
            raise ValueError("needs 5 channels")
        return self.inner(h)


def test_error_names_site_and_what_works_and_hooks_are_removed():
    m, x = Broken(), torch.randn(1, 3, 2, 2)
    with pytest.raises(UntraceableModelError) as e, eval_mode(m), torch.no_grad():
        capture_graph(m, (x,), {}, set(), set(), "auto")
    text = str(e.value)
    assert "torch.fx failed" in text and "ValueError: needs 5 channels" in text
    assert "recording a real run also failed in Broken.forward line" in text
    assert "torch.export also failed" in text and "use_cache=False" in text
    assert "Broken.forward line" in text and "raise ValueError" in text
    assert no_hooks(m)
    with pytest.raises(UntraceableModelError) as e, eval_mode(m), torch.no_grad():
        m.config.use_cache = False
        capture_graph(m, (x,), {}, set(), set(), "record")
    text = str(e.value)
    assert "capture='fx' or 'export' (not tried)" in text and "use_cache" not in text and no_hooks(m)


# ----------------------------------------------------------------------------------------------
# transformers


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_transformers_models_are_recorded(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    if kind == "bert":
        m = transformers.BertModel(transformers.BertConfig(vocab_size=50, **common)).eval()
        inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    else:
        m = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, **common)).eval()
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
    with eval_mode(m), torch.no_grad():
        graph, shapes, _out, mode, _ = capture_graph(m, (), inputs, set(), set(), "auto")
    assert mode == "record" and no_hooks(m)
    assert [n.target for n in graph.nodes if n.op == "placeholder"] == list(inputs)
    output = list(graph.nodes)[-1].args[0]
    assert isinstance(output, dict) and shapes[output["last_hidden_state"]][-1] == 32
    linears = [n.target for n in graph.nodes if n.op == "call_module" and n.target.endswith(("query", "q_proj"))]
    assert len(linears) == 2
    g = ChannelGraph.build(m, inputs)
    assert g.mode == "record" and g.group(linears[0].replace("query", "key").replace("q_proj", "k_proj"))
