"""Capture: turn a model and example inputs into an fx graph whose leaf modules are single calls.

Three methods, tried in this order by ``capture="auto"`` (or chosen with ``"fx"``/``"record"``/``"export"``):

* **fx**: torch.fx ``symbolic_trace`` (modules with a layer rule, torch.nn layers and parameter-owning
  custom modules are leaves; an fx interpreter records every node's output shape). Fails on
  data-dependent Python, ``int(x.shape[1])``, ``**kwargs`` forwards (every ``transformers`` model).
* **record**: one real run recorded op by op (:mod:`~prunekit.engine.record`): follows whatever Python
  the model runs, so it captures the path the example inputs take.
* **export**: ``torch.export``, whose aten nodes of each leaf module call are folded back into one
  ``call_module`` node (one output per tensor the module returns), so the walker sees the same
  vocabulary either way.

Every node gets ``meta["module"]``, the innermost module whose forward produced it ("" for the root; a
leaf's ``call_module`` node: its caller). When all methods fail, the error names the innermost module and
source line of the model's forward and what gets around it.
"""
from __future__ import annotations

import contextlib
import io
import linecache
import logging
import operator
import traceback
from typing import Any

import torch
from torch import fx, nn

from ..errors import ConfigError
from .errors import UnsupportedLayerError, UntraceableModelError
from .record import shape_tree, trace_record
from .rules import find_rule

__all__ = ["CAPTURES", "capture_graph", "failure_site", "has_rule", "is_leaf", "shape_tree"]


class _LeafTracer(fx.Tracer):
    """torch.fx tracer that does not trace into leaf modules (see :func:`is_leaf`)."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf(m, qualname, self.leaves)


def is_leaf(m: nn.Module, qualname: str, leaves: set[str]) -> bool:
    """Whether capture keeps ``m`` as one call: named leaves, modules with a layer rule, torch.nn layers,
    and custom modules that own parameters but have no children (containers are traced through)."""
    if qualname in leaves or find_rule(type(m)) is not None:
        return True
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if m.__module__.startswith(("torch.nn", "torch.ao.nn")):
        return True
    return next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None


def has_rule(m: nn.Module) -> bool:
    """Whether ``m``'s type has a layer rule that can trace it (not a refusing one)."""
    rule = find_rule(type(m))
    return rule is not None and not getattr(rule, "refuses", False)


def _trace_fx(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str]) -> tuple[fx.Graph, dict, Any]:
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    shapes: dict[fx.Node, Any] = {}

    class Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            shapes[n] = shape_tree(out)
            return out

    out = Prop(gm).run(*_bind_inputs(graph, args, kwargs))
    for n in graph.nodes:
        paths = [p for p, _t in (n.meta.get("nn_module_stack") or {}).values()]
        if n.op == "call_module" and paths and paths[-1] == n.target:
            paths = paths[:-1]  # the stack of a leaf's call includes the leaf itself
        n.meta["module"] = paths[-1] if paths else ""
    return graph, shapes, shape_tree(out)


def _bind_inputs(graph: fx.Graph, args: tuple, kwargs: dict) -> list:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out, rest = list(args), dict(kwargs)
    for n in placeholders[len(args):]:
        name = str(n.target).lstrip("*")
        if name in rest:
            out.append(rest.pop(name))
        elif n.args:
            out.append(n.args[0])
        else:
            out.append(None)
    return out


def _export(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``torch.export.export`` without its logging (it prints the partial graph on failure)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(model, args, kwargs)
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_scopes(src: fx.Graph, model: nn.Module, leaves: set[str]) -> tuple[dict, dict]:
    """``(cluster, module)``: ``cluster[node] = (call key, leaf path, caller path)`` for the aten nodes of a
    leaf module call; ``module[node]`` = innermost module path of every call node ("" for the root)."""
    cluster: dict[fx.Node, tuple[str, str, str]] = {}
    module: dict[fx.Node, str] = {}
    for node in src.nodes:
        if node.op != "call_function":
            continue
        stack = [(k, p) for k, (p, _t) in (node.meta.get("nn_module_stack") or {}).items() if p]
        module[node] = stack[-1][1] if stack else ""
        caller = ""
        for key, path in stack:
            try:
                m = model.get_submodule(path)
            except AttributeError:
                break
            if is_leaf(m, path, leaves):
                cluster[node] = (key, path, caller)
                break
            caller = path
    return cluster, module


def _split_cluster(nodes: list[fx.Node]) -> tuple[set[fx.Node], list[fx.Node]]:
    """``(pulled out, outputs)`` of one leaf call's aten nodes. Its outputs are the nodes used outside the
    cluster that no other such node depends on (the module's return value; several only where the module
    returns several tensors, e.g. ``nn.MultiheadAttention``). A node used outside that an output depends
    on (e.g. the input cast of an RMSNorm that the residual path reuses) is pulled out of the cluster with
    the cluster nodes it depends on, so that the folded call has one output per returned tensor."""
    inside = set(nodes)
    anc: dict[fx.Node, set[fx.Node]] = {}
    for n in nodes:
        anc[n] = set()
        for a in n.all_input_nodes:
            if a in inside:
                anc[n] |= {a} | anc[a]
    used = [n for n in nodes if any(u not in inside for u in n.users)]
    outs = [n for n in used if not any(n in anc[o] for o in used)]
    pulled: set[fx.Node] = set()
    for n in used:
        if n not in outs:
            pulled |= {n} | anc[n]
    return pulled, outs


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str]) -> tuple[fx.Graph, dict, Any]:
    ep = _export(model, args, kwargs)
    consts = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") and spec.target is not None:
            consts[spec.arg.name] = spec.target
    src = ep.graph
    cluster, module = _export_scopes(src, model, leaves)
    members: dict[str, list[fx.Node]] = {}
    for node, (key, _p, _c) in cluster.items():
        members.setdefault(key, []).append(node)
    pulled: set[fx.Node] = set()
    outs: dict[str, list[fx.Node]] = {}
    for key, nodes in members.items():
        p, outs[key] = _split_cluster(nodes)
        pulled |= p
    last = {key: [n for n in nodes if n not in pulled][-1] for key, nodes in members.items()}
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    shapes: dict[fx.Node, Any] = {}

    def mapped(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    for node in src.nodes:
        if node.op == "placeholder":
            new = g.get_attr(consts[node.name]) if node.name in consts else g.placeholder(node.name)
            new.meta["module"] = ""
        elif node.op == "call_function" and node in cluster and node not in pulled:
            key, path, caller = cluster[node]
            if node is last[key]:
                _fold(g, env, shapes, path, caller, [n for n in members[key] if n not in pulled], outs[key],
                      consts)
            continue
        elif node.op == "call_function":
            new = g.call_function(node.target, mapped(node.args), mapped(node.kwargs))
            new.meta["module"] = module.get(node, "")
        elif node.op == "output":
            g.output(mapped(node.args[0])).meta["module"] = ""
            continue
        else:
            continue
        env[node] = new
        shapes[new] = shape_tree(node.meta.get("val"))
    g.lint()
    return g, shapes, shape_tree(model(*args, **kwargs))


def _fold(g: fx.Graph, env: dict, shapes: dict, path: str, caller: str, nodes: list[fx.Node],
          outs: list[fx.Node], consts: dict) -> None:
    """Emit one leaf call's (kept) aten nodes as ``call_module(path)``; a tuple + getitems when it returns
    several tensors."""
    inside = set(nodes)
    ins: list[fx.Node] = []
    for n in nodes:
        if not n.users and n.meta.get("val") is None:  # _assert_tensor_metadata & co. read no channels
            continue
        for a in n.all_input_nodes:
            if a not in inside and a not in ins and not (a.op == "placeholder" and a.name in consts):
                ins.append(a)
    call = g.call_module(path, tuple(env[a] for a in ins))
    call.meta["module"] = caller
    if len(outs) == 1:
        env[outs[0]] = call
        shapes[call] = shape_tree(outs[0].meta.get("val"))
        return
    shapes[call] = tuple(shape_tree(o.meta.get("val")) for o in outs)
    for i, o in enumerate(outs):
        env[o] = g.call_function(operator.getitem, (call, i))
        env[o].meta["module"] = caller
        shapes[env[o]] = shape_tree(o.meta.get("val"))


def failure_site(exc: BaseException, model: nn.Module) -> tuple[str | None, str]:
    """(module name, 'Type line N: code') of the innermost model forward frame in ``exc``'s traceback."""
    names = {id(m): n for n, m in model.named_modules()}
    site: tuple[str | None, str] = (None, "")
    skip = (torch.__file__.rsplit("/", 1)[0], __file__.rsplit("/", 1)[0])  # torch's and the engine's frames
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code_obj = frame.f_code
        if code_obj.co_filename.startswith(skip) or not code_obj.co_argcount:
            continue
        self_obj = frame.f_locals.get(code_obj.co_varnames[0])
        if isinstance(self_obj, nn.Module) and id(self_obj) in names:
            code = linecache.getline(frame.f_code.co_filename, lineno).strip()
            site = (names[id(self_obj)], f"{type(self_obj).__name__}.{frame.f_code.co_name} line {lineno}: `{code}`")
    return site


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


CAPTURES = ("auto", "fx", "record", "export")
_METHOD = {"fx": "torch.fx", "record": "recording a real run", "export": "torch.export"}


def _trace_fx_retrying(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str],
                       ignored: set[str]) -> tuple[fx.Graph, dict, Any]:
    """torch.fx; an ignored module whose body fx cannot trace becomes an opaque leaf (added to ``leaves``)
    and fx is retried."""
    for _ in range(8):
        try:
            return _trace_fx(model, args, kwargs, leaves)
        except UnsupportedLayerError:
            raise
        except Exception as e:
            where, _code = failure_site(e, model)
            owner = next((n for n in sorted(ignored, key=len) if where is not None and n not in leaves
                          and (where == n or where.startswith(n + "."))), None)
            if owner is None:
                raise
            leaves.add(owner)
    return _trace_fx(model, args, kwargs, leaves)


def capture_graph(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str], ignored: set[str],
                  capture: str = "auto") -> tuple[fx.Graph, dict, Any, str, set[str]]:
    """Capture ``model`` as an fx graph: ``(graph, shapes per node, output shapes, mode, leaves)``.

    ``capture``: ``"auto"`` tries torch.fx (an ignored module whose body fx cannot trace is made an opaque
    leaf and fx retried), then a recorded real run (:func:`~prunekit.engine.record.trace_record`), then
    torch.export; ``"fx"``, ``"record"`` or ``"export"`` uses that one only. ``mode`` is the one that
    worked. When all fail, an :class:`UntraceableModelError` names the module and source line at fault
    and what gets around it. ``leaves`` in the result includes the modules made leaves on the way. Run it
    under :func:`prunekit.runtime.eval_mode`.
    """
    if capture not in CAPTURES:
        raise ConfigError(f"capture must be one of {CAPTURES}, got {capture!r}")
    leaves = set(leaves)
    methods = {"fx": lambda: _trace_fx_retrying(model, args, kwargs, leaves, ignored),
               "record": lambda: trace_record(model, args, kwargs, leaves),
               "export": lambda: _trace_export(model, args, kwargs, leaves)}
    errors: dict[str, BaseException] = {}
    for mode, run in methods.items():
        if capture not in ("auto", mode):
            continue
        try:
            g, s, o = run()
            return g, s, o, mode, leaves
        except UnsupportedLayerError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure falls through to the next method
            errors[mode] = e
    raise UntraceableModelError(_untraceable_message(model, kwargs, errors)) from next(iter(errors.values()))


def _untraceable_message(model: nn.Module, kwargs: dict, errors: dict[str, BaseException]) -> str:
    """Why each capture method failed, where (module, source line), and what to try instead."""
    sites = {m: failure_site(e, model) for m, e in errors.items()}
    where = next((sites[m][0] for m in ("record", "fx", "export") if m in sites and sites[m][0] is not None),
                 None)
    parts = []
    for m, e in errors.items():
        w, code = sites[m]
        at = "" if w is None else f" in {code}" if not w else f" in module '{w}' ({code})"
        parts.append(f"{_METHOD[m]}{' also' if parts else ''} failed{at}: {_first_line(e)}")
    fixes = []
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) and kwargs.get("use_cache", True) is not False:
        fixes.append("pass use_cache=False with the inputs (a transformers decoder returns a key/value cache "
                     "object), e.g. example_inputs={'input_ids': ids, 'use_cache': False}")
    untried = [m for m in _METHOD if m not in errors]
    if untried:
        fixes.append("capture=" + " or ".join(f"'{m}'" for m in untried) + " (not tried)")
    if where:
        fixes.append(f"mark the module as a leaf or exclude it: ChannelGraph.build(..., leaf_modules=['{where}']) "
                     f"or prune(..., ignored=['{where}']) (its channels are then protected)")
    else:
        fixes.append("move the failing code into a submodule and pass it as leaf_modules=[...] or ignored=[...]")
    return f"cannot trace {type(model).__name__}: " + "; ".join(parts) + ". Fix: " + "; or ".join(fixes)
