"""Deterministic, DDP-consistent batch loading.

The sample order of an epoch is a function of (seed, epoch) only: ``torch.randperm`` from a
generator seeded with ``seed + epoch`` (as torch's DistributedSampler does). Rank ``r`` of ``W``
takes ``order[r::W]`` and cuts it into batches of ``batch_size``, so the union of the ranks' i-th
batches is exactly the single-process i-th batch of size ``batch_size * W``. Together with the
datasets' (seed, epoch, index)-determined augmentation, a resumed run, a W-process run and one
uninterrupted run see the same samples in the same batches.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["Loader", "epoch_permutation", "make_loader", "shard_indices"]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """``torch.randperm(n)`` from a generator seeded with ``seed + epoch``, (n,) int64."""
    g = torch.Generator()
    g.manual_seed(int(seed) + int(epoch))
    return torch.randperm(n, generator=g)


def shard_indices(
    n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int,
    batch_size: int, drop_last: bool, pad: bool,
) -> torch.Tensor:
    """The dataset indices rank ``rank`` visits in ``epoch``, in order, (num_samples,) int64.

    drop_last: keep only the first ``(n // (batch_size*W)) * batch_size*W`` positions of the order
    (all ranks get the same number of full batches; no padding needed). Otherwise with ``pad`` the
    order is extended by its own head up to a multiple of W (DistributedSampler padding: a few
    samples are seen twice); without ``pad`` the shards are uneven and every sample is seen exactly
    once (use this for evaluation).
    """
    order = epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)
    if drop_last:
        order = order[: (n // (batch_size * world_size)) * batch_size * world_size]
    elif pad and n % world_size:
        extra = world_size - n % world_size
        reps = -(-extra // n)
        order = torch.cat([order, order.repeat(reps)[:extra]])
    return order[rank::world_size]


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if on else 0
        if world_size is None:
            world_size = dist.get_world_size() if on else 1
    return int(rank), int(world_size)


class Loader:
    """Iterable over (x, y) batches of one rank's shard; call :meth:`set_epoch` before each epoch.

    Datasets with ``get_batch(indices, epoch)`` (array datasets) are served by that vectorised
    fast path in the calling process (``num_workers`` is ignored: there is no per-sample work to
    parallelise). Other datasets go through ``torch.utils.data.DataLoader`` over the same index
    list with ``num_workers`` workers; their ``set_epoch`` is called first.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pad: bool | None = None,
        pin_memory: bool = False,
    ):
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        rank, world_size = _dist_defaults(rank, world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.num_workers = int(num_workers)
        self.pad = self.shuffle if pad is None else bool(pad)
        self.pin_memory = pin_memory
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next iteration uses."""
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's dataset indices for ``epoch`` (default: current), in visiting order."""
        return shard_indices(
            len(self.dataset), shuffle=self.shuffle, seed=self.seed,
            epoch=self.epoch if epoch is None else epoch, rank=self.rank, world_size=self.world_size,
            batch_size=self.batch_size, drop_last=self.drop_last, pad=self.pad,
        )

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch (padding duplicates included)."""
        return int(self.indices().numel())

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        epoch = self.epoch
        if hasattr(self.dataset, "get_batch"):
            return self._fast(idx, epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        from torch.utils.data import DataLoader

        return iter(DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=idx.tolist(), num_workers=self.num_workers,
            drop_last=self.drop_last, pin_memory=self.pin_memory,
        ))

    def _fast(self, idx: torch.Tensor, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.pin_memory and torch.cuda.is_available()
        for i in range(0, len(self) * self.batch_size, self.batch_size):
            x, y = self.dataset.get_batch(idx[i: i + self.batch_size], epoch)
            if pin and x.device.type == "cpu":
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y

    def __repr__(self) -> str:
        return (f"Loader(n={len(self.dataset)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"rank={self.rank}/{self.world_size}, epoch={self.epoch}, batches={len(self)})")


def make_loader(dataset, batch_size: int, **options: Any) -> Loader:
    """Build a :class:`Loader`; ``options`` are its keyword arguments (``shuffle`` is required; see its
    docs and :func:`shard_indices` for the exact semantics).

    ``rank``/``world_size`` default to torch.distributed's when it is initialised, else 0/1.
    ``pad`` defaults to ``shuffle``: training shards are padded to equal length like
    DistributedSampler; evaluation (shuffle=False) shards are uneven so each sample counts once.
    """
    return Loader(dataset, batch_size, **options)
