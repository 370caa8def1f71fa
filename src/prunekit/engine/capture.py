"""Capture: turn a model and example inputs into an fx graph whose leaf modules are single calls.

torch.fx ``symbolic_trace`` comes first (modules with a layer rule, torch.nn layers and parameter-owning
custom modules are leaves, and an fx interpreter records every node's output shape). When fx fails
(data-dependent Python, ``int(x.shape[1])``, ...) it falls back to ``torch.export`` and folds the aten nodes
of each leaf module call back into one ``call_module`` node, so the walker sees the same vocabulary either
way. When both fail, the error names the innermost module and source line of the model's forward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import linecache
import logging
import operator
import traceback
from typing import Any

import torch
from torch import fx, nn

from .errors import UnsupportedLayerError, UntraceableModelError
from .rules import find_rule

__all__ = ["capture_graph", "failure_site", "has_rule", "is_leaf", "shape_tree"]


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


def shape_tree(v: Any) -> Any:
    """Tensors → their shapes, containers and dataclasses → the same structure, anything else → None."""
    if isinstance(v, torch.Tensor):
        return v.shape
    if isinstance(v, torch.Size):
        return None
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return (type(v).__name__, tuple((f.name, shape_tree(getattr(v, f.name))) for f in dataclasses.fields(v)))
    if isinstance(v, (list, tuple)):
        return type(v)(shape_tree(x) for x in v) if not hasattr(v, "_fields") else tuple(
            shape_tree(x) for x in v)
    if isinstance(v, dict):
        return {k: shape_tree(x) for k, x in v.items()}
    return None


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


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str]) -> tuple[fx.Graph, dict, Any]:
    loggers = [logging.getLogger(n) for n in ("torch", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:  # export prints the partial graph to stderr on failure; we report our own message
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(model, args, kwargs)
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    consts = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") and spec.target is not None:
            consts[spec.arg.name] = spec.target
    src = ep.graph
    cluster: dict[fx.Node, tuple[str, str]] = {}
    for node in src.nodes:
        if node.op != "call_function":
            continue
        for key, (path, _t) in (node.meta.get("nn_module_stack") or {}).items():
            if not path:
                continue
            try:
                m = model.get_submodule(path)
            except AttributeError:
                break
            if is_leaf(m, path, leaves):
                cluster[node] = (key, path)
                break
    members: dict[str, list[fx.Node]] = {}
    for node, (key, _p) in cluster.items():
        members.setdefault(key, []).append(node)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    shapes: dict[fx.Node, Any] = {}

    def mapped(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    for node in src.nodes:
        if node.op == "placeholder":
            new = g.get_attr(consts[node.name]) if node.name in consts else g.placeholder(node.name)
        elif node.op == "call_function" and node in cluster:
            key, path = cluster[node]
            nodes = members[key]
            if node is not nodes[-1]:
                continue
            inside = set(nodes)
            ins: list[fx.Node] = []
            for n in nodes:
                for a in n.all_input_nodes:
                    if a not in inside and a not in ins and not (a.op == "placeholder" and a.name in consts):
                        ins.append(a)
            outs = [n for n in nodes if any(u not in inside for u in n.users)]
            call = g.call_module(path, tuple(env[a] for a in ins))
            if len(outs) == 1:
                env[outs[0]] = call
                shapes[call] = shape_tree(outs[0].meta.get("val"))
            else:
                shapes[call] = tuple(shape_tree(o.meta.get("val")) for o in outs)
                for i, o in enumerate(outs):
                    env[o] = g.call_function(operator.getitem, (call, i))
                    shapes[env[o]] = shape_tree(o.meta.get("val"))
            continue
        elif node.op == "call_function":
            new = g.call_function(node.target, mapped(node.args), mapped(node.kwargs))
        elif node.op == "output":
            g.output(mapped(node.args[0]))
            continue
        else:
            continue
        env[node] = new
        shapes[new] = shape_tree(node.meta.get("val"))
    g.lint()
    return g, shapes, shape_tree(model(*args, **kwargs))


def failure_site(exc: BaseException, model: nn.Module) -> tuple[str | None, str]:
    """(module name, 'Type line N: code') of the innermost model forward frame in ``exc``'s traceback."""
    names = {id(m): n for n, m in model.named_modules()}
    site: tuple[str | None, str] = (None, "")
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code_obj = frame.f_code
        if code_obj.co_filename.startswith(torch_dir) or not code_obj.co_argcount:
            continue
        self_obj = frame.f_locals.get(code_obj.co_varnames[0])
        if isinstance(self_obj, nn.Module) and id(self_obj) in names:
            code = linecache.getline(frame.f_code.co_filename, lineno).strip()
            site = (names[id(self_obj)], f"{type(self_obj).__name__}.{frame.f_code.co_name} line {lineno}: `{code}`")
    return site


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def capture_graph(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str], ignored: set[str],
                  capture: str = "auto") -> tuple[fx.Graph, dict, Any, str, set[str]]:
    """Capture ``model`` as an fx graph: ``(graph, shapes per node, output shapes, mode, leaves)``.

    torch.fx first (``capture="auto"``/``"fx"``); an ignored module whose body fx cannot trace is made an
    opaque leaf and fx retried; then torch.export (``"auto"``/``"export"``). When both fail, an
    :class:`UntraceableModelError` names the module and source line at fault and how to get around it.
    ``leaves`` in the result includes the modules made leaves on the way. Run it under
    :func:`prunekit.runtime.eval_mode`.
    """
    leaves = set(leaves)
    fx_error: BaseException = RuntimeError("fx skipped (capture='export')")
    for _ in range(8 if capture != "export" else 0):  # an ignored module whose body fx cannot trace becomes an opaque leaf
        try:
            g, s, o = _trace_fx(model, args, kwargs, leaves)
            return g, s, o, "fx", leaves
        except UnsupportedLayerError:
            raise
        except Exception as e:  # noqa: BLE001 - any fx failure falls through to export
            fx_error = e
            where, code = failure_site(e, model)
            owner = next((n for n in sorted(ignored, key=len) if where is not None and n not in leaves
                          and (where == n or where.startswith(n + "."))), None)
            if owner is None:
                break
            leaves.add(owner)
    if capture == "fx":
        where, code = failure_site(fx_error, model)
        at = f"module '{where}' ({code})" if where else f"{type(model).__name__}.forward"
        raise UntraceableModelError(f"cannot trace {type(model).__name__} with torch.fx: failed in {at}: "
                                    f"{_first_line(fx_error)}. Fix: capture='auto' (falls back to "
                                    f"torch.export) or leaf_modules=['{where or '...'}']") from fx_error
    try:
        g, s, o = _trace_export(model, args, kwargs, leaves)
        return g, s, o, "export", leaves
    except Exception as e:  # noqa: BLE001
        export_error = e
    where, code = failure_site(fx_error, model)
    if where is None:
        where, code = failure_site(export_error, model)
    at = f"module '{where}' ({code})" if where else f"{type(model).__name__}.forward"
    hint = (f"mark it as a leaf or exclude it: ChannelGraph.build(..., leaf_modules=['{where}']) or "
            f"prune(..., ignored=['{where}']) (its channels are then protected)" if where
            else "move the data-dependent code into a submodule and pass it as a leaf/ignored module")
    raise UntraceableModelError(
        f"cannot trace {type(model).__name__}: torch.fx failed in {at}: {_first_line(fx_error)}; "
        f"torch.export also failed: {_first_line(export_error)}. Fix: {hint}") from fx_error
