"""Capture by recording one real run: an fx graph of what the model actually did on the example inputs.

:func:`trace_record` runs the model once (the caller sets eval mode and no_grad) under a
:class:`~torch.overrides.TorchFunctionMode`, which sees every torch function, Tensor method and Tensor
operator, plus forward pre-/post-hooks on every module (removed again in a ``finally``). Python control
flow, ``**kwargs`` forwards and returned cache objects simply execute, so models that torch.fx cannot
trace (every ``transformers`` model) and torch.export cannot export are captured; the graph holds the path
the example inputs took.

Graph contract (what :class:`~prunekit.engine.walker.Walker` reads):

* ``placeholder``: one per input tensor, positional args then kwargs (nested containers flattened), named
  after the forward parameter / kwarg key (``input_ids``, ``x_0`` for ``x[0]``); other inputs are only
  passed to the model.
* ``get_attr``: a tensor no recorded op produced and no input is: target = the parameter/buffer's
  qualified name, else ``_prunekit_constant_<i>``; one node per tensor object.
* ``call_module``: one per call of a *leaf* (:func:`records_as_call`); nothing inside it is recorded. Its
  args/kwargs mirror the call (tensors looked up before it runs, as in-place modules return their input).
* ``call_function``: every torch call outside leaves whose result holds a tensor; calls returning no tensor
  (``size``, ``shape``, ``item``, ``__bool__``) are not recorded, their values appear as literals in later
  args. Target = the function received (``torch.Tensor.view``, ``torch.matmul``, ``F.relu``), except Tensor
  dunders, spelt as torch.fx spells them: ``operator.getitem``, ``operator.sub(other, self)`` for
  ``__rsub__`` (reflected ones swap their args), ``operator.iand`` ..., and property getters as
  ``getattr(x, "T")``. ``x * y`` / ``x / y`` reach the mode as ``Tensor.mul`` / ``Tensor.div``, so they are
  recorded under those names (``op_name`` "mul" / "div"; fx says "mul" / "truediv").
* ``operator.setitem(x, index, value)`` for ``x[index] = value``; afterwards ``x`` maps to that node, as the
  tensor returned by any op that returns one of its inputs (in-place ops) maps to the op's node.
* a result that is a tuple/list/dict of tensors gets, per tensor element, an ``operator.getitem(node, i)``
  node (recursively for nested containers).
* ``output``: the model's output structure with tensors replaced by nodes; dicts and ``ModelOutput`` s
  become plain dicts, other objects (a ``DynamicCache``) None.

Every node has ``meta["module"]``: the qualified name of the innermost module whose forward was running
("" for the root; for a ``call_module`` node, the module that called the leaf).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .rules import find_rule

__all__ = ["records_as_call", "shape_tree", "trace_record"]

_BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor",
           "lshift", "rshift")


def _dunder_targets() -> dict[str, tuple[Any, bool]]:
    """Tensor dunder name → (operator function, swap the first two args)."""
    table: dict[str, tuple[Any, bool]] = {}
    for op in _BINARY:
        b = op.rstrip("_")
        table[f"__{b}__"] = (getattr(operator, op), False)
        table[f"__r{b}__"] = (getattr(operator, op), True)
        table[f"__i{b}__"] = (getattr(operator, f"i{b}"), False)
    table.update({"__div__": (operator.truediv, False), "__rdiv__": (operator.truediv, True),
                  "__idiv__": (operator.itruediv, False)})
    for op in ("eq", "ne", "lt", "le", "gt", "ge", "neg", "pos", "invert", "abs", "getitem"):
        table[f"__{op}__"] = (getattr(operator, op), False)
    return table


_DUNDERS = _dunder_targets()


def records_as_call(m: nn.Module, qualname: str, leaves: set[str]) -> bool:
    """Whether the recorder keeps ``m`` as one ``call_module``: named leaves, modules with a layer rule and
    torch.nn layers (not containers). Unlike :func:`~prunekit.engine.capture.is_leaf`, a custom module that
    is a leaf only because it owns parameters is traced into, op by op (its parameters become ``get_attr``
    nodes), e.g. a relative-position-bias table."""
    if qualname in leaves or find_rule(type(m)) is not None:
        return True
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return m.__module__.startswith(("torch.nn", "torch.ao.nn"))


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    return False


def _items(v: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(v, (list, tuple)):
        return iter(enumerate(v))
    if isinstance(v, dict):
        return iter(v.items())
    return iter(())


def _target(func: Any, args: tuple) -> tuple[Any, tuple]:
    """The fx target and args for a call the mode received (dunders → ``operator``, getters → getattr)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr, (args[0], getattr(getattr(func, "__self__", None), "__name__", "?"))
    hit = _DUNDERS.get(name)
    if hit is None:
        return func, tuple(args)
    op, swap = hit
    return op, ((args[1], args[0], *args[2:]) if swap else tuple(args))


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


class _Recorder(TorchFunctionMode):
    """Builds the graph while the model runs; see the module docstring for the contract."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.graph = fx.Graph()
        self.shapes: dict[fx.Node, Any] = {}
        self.nodes: dict[int, fx.Node] = {}  # id(tensor) → node holding its current value
        self.keep: list[Any] = []  # every mapped tensor stays alive, so ids are not reused
        self.names: dict[int, str] = {}
        for getter in (model.named_parameters, model.named_buffers):
            for n, t in getter(remove_duplicate=False):
                self.names.setdefault(id(t), n)
        self.stack: list[tuple[str, bool, Any]] = []  # (module name, counted in depth, leaf call args)
        self.depth = self.quiet = self.n_const = 0

    # -- nodes
    @contextlib.contextmanager
    def silent(self) -> Iterator[None]:
        """Our own tensor accesses (``.shape``) in hooks are not recorded."""
        self.quiet += 1
        try:
            yield
        finally:
            self.quiet -= 1

    def where(self) -> str:
        return self.stack[-1][0] if self.stack else ""

    def new(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None, value: Any = None) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs or {})
        node.meta["module"] = self.where()
        self.shapes[node] = shape_tree(value)
        return node

    def bind(self, value: Any, node: fx.Node) -> None:
        """Map ``value``'s tensors to ``node`` (containers: to getitem nodes, recursively)."""
        if isinstance(value, torch.Tensor):
            self.nodes[id(value)] = node
            self.keep.append(value)
            return
        for k, x in _items(value):
            if _has_tensor(x):
                self.bind(x, self.new("call_function", operator.getitem, (node, k), value=x))

    def node_of(self, t: torch.Tensor) -> fx.Node:
        node = self.nodes.get(id(t))
        if node is None:
            name = self.names.get(id(t))
            if name is None:
                name, self.n_const = f"_prunekit_constant_{self.n_const}", self.n_const + 1
            node = self.new("get_attr", name, value=t)
            self.bind(t, node)
        return node

    def arg(self, a: Any) -> Any:
        """``a`` with tensors replaced by their nodes."""
        if isinstance(a, torch.Tensor):
            return self.node_of(a)
        if isinstance(a, (list, tuple)):
            mapped = [self.arg(x) for x in a]
            return mapped if isinstance(a, list) else tuple(mapped)
        if isinstance(a, dict):
            return {k: self.arg(x) for k, x in a.items()}
        if isinstance(a, slice):
            return slice(self.arg(a.start), self.arg(a.stop), self.arg(a.step))
        return a

    def output(self, v: Any) -> Any:
        """The output node's arg: tensors → nodes, dicts/dataclasses → dicts, other objects → None."""
        if isinstance(v, torch.Tensor):
            return self.node_of(v)
        if isinstance(v, dict):
            return {k: self.output(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: self.output(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [self.output(x) for x in v] if isinstance(v, list) else tuple(self.output(x) for x in v)
        return v if isinstance(v, (int, float, bool, str)) or v is None else None

    # -- inputs
    def inputs(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """One placeholder per input tensor, named after its forward parameter or kwarg key."""
        try:
            params = [p.name for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        named = [(params[i] if i < len(params) else f"arg{i}", a) for i, a in enumerate(args)]
        used: set[str] = set()
        for name, v in named + list(kwargs.items()):
            self.placeholders(str(name), v, used)

    def placeholders(self, name: str, v: Any, used: set[str]) -> None:
        if isinstance(v, torch.Tensor):
            if id(v) not in self.nodes:
                while name in used:
                    name += "_"
                used.add(name)
                self.bind(v, self.new("placeholder", name, value=v))
            return
        for k, x in _items(v):
            self.placeholders(f"{name}_{k}", x, used)

    # -- module hooks
    def pre_hook(self, name: str, leaf: bool) -> Any:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            counted = leaf or self.depth > 0
            call = None
            if leaf and self.depth == 0:
                with self.silent():
                    call = (self.arg(args), self.arg(kwargs))
            self.stack.append((name, counted, call))
            self.depth += counted

        return hook

    def post_hook(self, name: str) -> Any:
        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            _, counted, call = self.stack.pop()
            self.depth -= counted
            if call is not None:
                with self.silent():
                    self.bind(out, self.new("call_module", name, call[0], call[1], value=out))

        return hook

    def hook(self, model: nn.Module, leaves: set[str]) -> list[Any]:
        handles = []
        for name, m in model.named_modules():
            leaf = bool(name) and records_as_call(m, name, leaves)
            handles.append(m.register_forward_pre_hook(self.pre_hook(name, leaf), with_kwargs=True))
            handles.append(m.register_forward_hook(self.post_hook(name), with_kwargs=True, always_call=True))
        return handles

    # -- torch calls
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.quiet or self.depth:
            return out
        if getattr(func, "__name__", "") == "__setitem__":
            self.setitem(*args[:3])
        elif _has_tensor(out):
            target, a = _target(func, args)
            self.bind(out, self.new("call_function", target, self.arg(a), self.arg(kwargs), value=out))
        return out

    def setitem(self, x: torch.Tensor, index: Any, value: Any) -> None:
        node = self.new("call_function", operator.setitem, (self.node_of(x), self.arg(index), self.arg(value)),
                        value=x)
        self.bind(x, node)


def trace_record(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str]) -> tuple[fx.Graph, dict, Any]:
    """Run ``model(*args, **kwargs)`` once and record it: ``(graph, shapes per node, output shapes)``.

    ``leaves``: qualified names kept as single ``call_module`` nodes besides those of
    :func:`records_as_call`. Call it under eval mode and no_grad; the model's hooks are restored.
    """
    rec = _Recorder(model)
    rec.inputs(model, args, kwargs)
    handles = rec.hook(model, leaves)
    try:
        with rec:
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    node = rec.graph.output(rec.output(out))
    node.meta["module"] = ""
    rec.graph.lint()
    return rec.graph, rec.shapes, shape_tree(out)
