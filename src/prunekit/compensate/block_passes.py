"""Forward passes of a model that does not trace, resumed at the entry of one of its repeated blocks.

Hugging Face transformers do not trace with torch.fx, but their encoder/decoder layers form a *chain*: an
``nn.ModuleList`` whose blocks are called once each, in order, block i+1 reading block i's output as its
first argument (the hidden states) and otherwise the same arguments as block 0 (attention mask, position
embeddings: the same objects for every block). :func:`find_chains` checks exactly that on one calibration
batch. :class:`BlockPasses` keeps, per batch, the arguments with which a pass entered each block, with a
digest of the own parameters of every module called before it; a later pass on a network whose earlier
modules hash the same calls the blocks from there instead of the whole network from its input — the
reconstruction's O(L²) block evaluations become O(L). Key/value caches are off during these passes
(``use_cache=False``, :func:`prunekit.runtime.without_kv_cache`): they are state carried between calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..runtime import StopForward, as_inputs, without_kv_cache
from .passes import CutStore, digest
from .stream_skips import skip_value

if TYPE_CHECKING:
    from .stream_skips import StreamSkip

__all__ = ["BlockPasses", "Chain", "find_chains"]


@dataclass(frozen=True)
class Chain:
    """Blocks ``name.0`` … ``name.{size−1}``; per block, the modules called before it and its call rank."""

    name: str
    size: int
    before: tuple[frozenset[str], ...]
    rank: tuple[int, ...]

    def block(self, module: str) -> int | None:
        """Index of the block that contains module ``module`` (None: none)."""
        if not module.startswith(self.name + "."):
            return None
        head = module[len(self.name) + 1:].split(".", 1)
        return int(head[0]) if len(head) == 2 and head[0].isdigit() and int(head[0]) < self.size else None


def _run(model: nn.Module, inputs: Any) -> Any:
    """``model`` on ``inputs`` without a key/value cache (state carried between calls, not an input)."""
    args, kwargs = as_inputs(inputs)
    return model(*args, **without_kv_cache(model, args, kwargs))


def _plain(value: Any) -> bool:
    """A value a block may be re-called with: tensors, numbers, strings, None, and tuples/lists/dicts of them."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(_plain(v) for v in value.values())


def _same(a: Any, b: Any) -> bool:
    """The same object, or equal plain scalars / containers of the same objects."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and type(a) is type(b) and a == b


def _hidden(out: Any) -> Any:
    """A block's output as the next block's first argument: the tensor, or a tuple's first element."""
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _is_chain(calls: dict[str, list[tuple[int, tuple, dict]]], outputs: dict[str, Any], blocks: list[str]) -> bool:
    if any(len(calls.get(b, [])) != 1 for b in blocks):
        return False
    entries = [calls[b][0] for b in blocks]
    if any(e[0] >= f[0] for e, f in pairwise(entries)):  # called in index order
        return False
    _, args0, kwargs0 = entries[0]
    if not args0 or not isinstance(args0[0], torch.Tensor) or not _plain((args0[1:], kwargs0)):
        return False
    for prev, (_, args, kwargs) in zip(blocks, entries[1:]):
        if not args or args[0] is not _hidden(outputs.get(prev)) or not _same(args[1:], args0[1:]) \
                or not _same(kwargs, kwargs0):
            return False
    return True


def find_chains(model: nn.Module, probe: Any) -> list[Chain]:
    """The outermost chains of blocks of ``model`` (module docstring), checked on one forward pass on
    ``probe``; none when the model has none or the pass fails."""
    lists = [(n, len(m)) for n, m in model.named_modules() if n and isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return []
    block_names = {f"{n}.{i}" for n, size in lists for i in range(size)}
    order: list[str] = []
    calls: dict[str, list[tuple[int, tuple, dict]]] = {}
    outputs: dict[str, Any] = {}

    def pre(name: str):
        def hook(_m, args, kwargs):
            if name in block_names:
                calls.setdefault(name, []).append((len(order), args, kwargs))
            order.append(name)
        return hook

    def post(name: str):
        return lambda _m, _args, _kwargs, out: outputs.__setitem__(name, out)

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        if name in block_names:
            handles.append(module.register_forward_hook(post(name), with_kwargs=True))
    try:
        with torch.no_grad():
            _run(model, probe)
    except Exception:  # noqa: BLE001 - a model that fails here simply gets plain passes
        return []
    finally:
        for h in handles:
            h.remove()
    chains: list[Chain] = []
    for name, size in sorted(lists, key=lambda x: len(x[0])):
        blocks = [f"{name}.{i}" for i in range(size)]
        if any(c.block(name) is not None for c in chains) or not _is_chain(calls, outputs, blocks):
            continue
        ranks = tuple(calls[b][0][0] for b in blocks)
        chains.append(Chain(name, size, tuple(frozenset(order[:r]) for r in ranks), ranks))
    return chains


class BlockPasses:
    """Inputs of modules inside chains of blocks, for a sequence of networks with the same module names,
    resumed from saved block entries (module docstring).

    Args:
        chains: from :func:`find_chains` on the original model.
        max_bytes: the saved entries' hidden states stay below this (bytes); 0 turns resuming off.
    """

    def __init__(self, chains: list[Chain], max_bytes: int):
        self.chains = chains
        self.store = CutStore(max_bytes, lambda model, name: digest(model.get_submodule(name), recurse=False))
        self.blocks_run = 0  # block calls made by resumed passes (for tests and profiling)

    def _locate(self, name: str) -> tuple[Chain, int] | None:
        for chain in self.chains:
            if (j := chain.block(name)) is not None:
                return chain, j
        return None

    def inputs(self, model: nn.Module, name: str, skip: StreamSkip | None, b: int, xb: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Module ``name``'s first input in ``model`` on batch ``b``, and the value of its stream skip (computed
        before it in the same block, :mod:`.stream_skips`); None when ``name`` is in no chain."""
        where = self._locate(name)
        if where is None:
            return None
        chain, j = where
        self.store.bind(model)
        ranks = set(chain.rank[:j + 1])
        cut = self.store.best(b, lambda c: c.stop in ranks)
        seen: dict[str, torch.Tensor] = {}

        def grab(_m, args):
            if args and isinstance(args[0], torch.Tensor):
                seen["x"] = args[0].detach()
            raise StopForward

        handles = [model.get_submodule(name).register_forward_pre_hook(grab)]
        if skip is not None:
            skip_handle, box = skip_value(model, skip)
            handles.append(skip_handle)
        try:
            with torch.no_grad():
                if cut is None:
                    self._from_input(model, chain, j, b, xb)
                else:
                    self._from_block(model, chain, chain.rank.index(cut.stop), j, b, cut.envs[b])
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if "x" not in seen:
            raise RuntimeError(f"module '{name}' was not called in block {j} of '{chain.name}'")
        return seen["x"], (box.get("s") if skip is not None else None)

    def _save(self, chain: Chain, i: int, b: int, args: tuple, kwargs: dict) -> None:
        hidden = args[0].detach().clone()
        self.store.save(chain.rank[i], chain.before[i], b, ((hidden, *args[1:]), kwargs), size=hidden)

    def _from_input(self, model: nn.Module, chain: Chain, j: int, b: int, xb: Any) -> None:
        """One pass from the input; the entries of blocks 0 … j are saved on the way."""
        blocks = model.get_submodule(chain.name)
        handles = [blocks[i].register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: self._save(chain, i, b, args, kwargs), with_kwargs=True)
            for i in range(j + 1)]
        try:
            _run(model, xb)
        finally:
            for h in handles:
                h.remove()

    def _from_block(self, model: nn.Module, chain: Chain, k: int, j: int, b: int, entry: tuple) -> None:
        """Blocks k … j from block k's saved entry; the entries of blocks k+1 … j are saved on the way."""
        args, kwargs = entry
        blocks = model.get_submodule(chain.name)
        hidden = args[0].clone()
        for i in range(k, j + 1):
            if i > k:
                self._save(chain, i, b, (hidden, *args[1:]), kwargs)
            self.blocks_run += 1
            hidden = _hidden(blocks[i](hidden, *args[1:], **kwargs))
