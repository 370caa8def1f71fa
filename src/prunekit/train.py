"""The Trainer: recipe-driven epochs, regularizer hooks, callbacks, DDP, atomic checkpoints, exact resume.

One epoch, on every rank::

    loader.set_epoch(e); reseed RNGs from (seed, e, rank)
    for each batch:  loss = CE(model(x), y) + Σ_r r.penalty(module)   →  backward  →  [clip]  →  optimizer.step()
                     r.after_step(module) for every regularizer         (projection, e.g. a clamp)
    scheduler.step(); evaluate on the test set; callbacks may add keys to the epoch's record
    rank 0: append the record to out_dir/log.jsonl and write the resume checkpoint out_dir/last

Models and tasks (:mod:`prunekit.tasks`): logits or ``.logits``; ``(x, y)`` or dict batches; ``classification``
(top-1/top-5 accuracy) or ``causal-lm`` (mean token cross-entropy, perplexity ``exp(mean token NLL)``), from
``task=``, the dataset's ``task``, or the first batch's shapes.

Exact resume: everything random is a function of ``(seed, epoch, rank)``: the loader's order and
augmentation (``make_loader(seed=...)`` + ``set_epoch``) and the torch / python / numpy RNG streams,
which are reseeded at the start of every epoch. The checkpoint stores the rest of the state (model,
optimizer, scheduler, AMP scaler, regularizers, step counters, history), so a run killed after any
epoch and resumed ends with bit-identical weights to an uninterrupted run with the same seed.

DDP (under ``torchrun``): each of W ranks gets ``recipe.batch_size // W`` samples per step, the
ranks' shards of one global batch are exactly the single-process batch, and DDP averages gradients,
so the update equals the single-process update on the global batch (up to float summation order).
The Trainer joins torchrun's process group itself (:func:`prunekit.distributed.init_from_env`); only
rank 0 prints and writes files.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .errors import CheckpointError, ConfigError, PrunekitError
from .optim import SCHEDULES
from .recipes import TrainRecipe, get_recipe
from .regularizers import Regularizer
from .runtime import seed_everything
from .tasks import (
    TASKS,
    LogitsOf,
    _first_rows,
    _Pairs,
    _to_device,
    dataset_task,
    forward_kwargs,
    infer_task,
    model_logits,
    split_batch,
)

__all__ = ["TASKS", "LogitsOf", "NonFiniteLossError", "TrainResult", "Trainer", "dataset_task", "infer_task",
           "model_logits", "seed_everything", "split_batch", "train"]

logger = logging.getLogger(__name__)

CHECKPOINT_STEM = "last"
LOG_NAME = "log.jsonl"
_FORMAT = "prunekit-train/1"


class NonFiniteLossError(PrunekitError, FloatingPointError):
    """The training loss became NaN or infinite; the weights were not updated with it."""


@dataclass
class TrainResult:
    """What :func:`train` / :meth:`Trainer.fit` return. ``accuracy`` is the final test top-1 in percent
    (causal LMs: next-token top-1; their ``extra`` holds ``task`` and ``perplexity``)."""

    model: nn.Module
    accuracy: float
    history: list[dict[str, Any]]
    checkpoint_path: Path | None
    params: int | None = None
    macs: int | None = None
    top5: float | None = None
    test_loss: float | None = None
    epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the model and the history)."""
        return {"accuracy": self.accuracy, "top5": self.top5, "test_loss": self.test_loss, "params": self.params,
                "macs": self.macs, "epochs": self.epochs,
                "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None, **self.extra}

    @property
    def perplexity(self) -> float | None:
        """Final test perplexity of a causal LM (``None`` for classification)."""
        return self.extra.get("perplexity")


def _jsonable(v: Any) -> Any:
    """Tensors and numpy values in log records become plain numbers / lists."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"log record value of type {type(v).__name__} is not JSON-serialisable")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Trainer:
    """Train ``model`` with ``recipe``; see the module docstring for the epoch loop.

    Args:
        model: any ``nn.Module`` mapping a batch ``x`` to logits ``[B, num_classes]`` (or ``[B, T, V]`` for a
            causal LM), or to an object with ``.logits`` (Hugging Face models).
        recipe: a :class:`~prunekit.recipes.TrainRecipe` or a registered recipe name.
        train_set, test_set: map-style datasets; loaders are built with ``prunekit.data.make_loader``
            (train: shuffled with ``seed``; under DDP sharded by rank). Or pass ``train_loader`` /
            ``test_loader`` directly (they should offer ``set_epoch`` for exact resume).
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        out_dir: where ``log.jsonl``, the resume checkpoint ``last.*`` and ``model.*`` go (rank 0 only);
            ``None`` writes nothing (and cannot resume).
        seed: seeds data order, augmentation and every RNG (per epoch, see module docstring).
        regularizers: :class:`~prunekit.regularizers.Regularizer` hooks, applied in order.
        callbacks: objects with optional ``on_epoch_end(trainer, epoch, record)`` (may add keys to
            ``record``, which is then logged) and ``on_train_end(trainer, result)``.
        amp: ``False``; ``True`` (fp16 + GradScaler on CUDA, bf16 on CPU); ``"bf16"`` or ``"fp16"``.
        progress: tqdm bar per epoch and a summary line (rank 0 only).
        log: callable receiving each human-readable summary line (default: tqdm.write to stderr when
            ``progress``); lines also go to the ``prunekit.train`` logger.
        loss_fn: ``(logits, targets) -> batch-mean loss``; default cross-entropy (with the recipe's
            ``label_smoothing``; causal LM: mean token cross-entropy, targets ``-100`` skipped).
        param_groups: what the optimizer optimizes (default ``model.parameters()``), e.g. groups with
            their own weight decay.
        drop_last: drop the last incomplete training batch.
        num_workers: loader worker processes (only datasets without a vectorised ``get_batch``).
        metadata: extra keys stored in ``model.json`` (e.g. ``{"dataset": "cifar10"}``).
        task: ``"classification"`` or ``"causal-lm"``; default: the dataset's, else from the first batch.
    """

    def __init__(self, model: nn.Module, recipe: TrainRecipe | str, *, train_set=None, test_set=None,
                 train_loader: Iterable | None = None, test_loader: Iterable | None = None,
                 device: str | torch.device | None = None, out_dir: str | Path | None = None, seed: int = 0,
                 regularizers: Sequence[Regularizer] = (), callbacks: Sequence[Any] = (),
                 amp: bool | str = False, progress: bool = True, log: Callable[[str], None] | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 param_groups: Iterable | None = None, drop_last: bool = False, num_workers: int = 0,
                 metadata: dict[str, Any] | None = None, task: str | None = None):
        self.recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        if not isinstance(self.recipe, TrainRecipe):
            raise ConfigError(f"recipe must be a TrainRecipe or a recipe name, got {type(recipe).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        dist.init_from_env()
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.regularizers = list(regularizers)
        self.callbacks = list(callbacks)
        self.progress = progress and self.is_main
        self._log_fn = log
        self.loss_fn = loss_fn or F.cross_entropy
        self._custom_loss = loss_fn is not None
        if task is not None and task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.task: str | None = task or dataset_task(train_set if train_set is not None else test_set)
        self.metadata = dict(metadata or {})
        if getattr(train_set, "name", None):
            self.metadata.setdefault("dataset", train_set.name)

        if self.recipe.batch_size % self.world_size:
            raise ConfigError(f"recipe batch_size={self.recipe.batch_size} is not divisible by the "
                              f"world size {self.world_size}; the global batch must split evenly across ranks")
        self.batch_size = self.recipe.batch_size // self.world_size  # per rank
        self.device = torch.device(device) if device is not None else dist.default_device()
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" under torchrun: this rank's GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.train_loader, self.test_loader = self._loaders(train_set, test_set, train_loader, test_loader,
                                                            drop_last, num_workers)

        self.module = model.to(self.device)  # the underlying model, never the DDP wrapper
        self._call_kwargs = forward_kwargs(self.module)
        self.model: nn.Module = self.module  # what forward runs on (DDP-wrapped in fit() when W > 1)
        self.optimizer = self.recipe.build_optimizer(self.module.parameters() if param_groups is None
                                                     else param_groups)
        self.scheduler = self.recipe.build_schedule(self.optimizer)
        self.amp_dtype = self._amp_dtype(amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

        self.epoch = 0  # number of completed epochs == index of the next epoch
        self.global_step = 0  # optimizer steps taken
        self.history: list[dict[str, Any]] = []
        self._input_shape: tuple[int, ...] | None = None
        self._example: Any = None  # the first training input, batch of one (MACs of token models)

    # ------------------------------------------------------------------ setup helpers

    def _loaders(self, train_set, test_set, train_loader, test_loader, drop_last, num_workers):
        if (train_set is None) == (train_loader is None):
            raise ConfigError("pass exactly one of train_set / train_loader")
        if (test_set is None) == (test_loader is None):
            raise ConfigError("pass exactly one of test_set / test_loader")
        if train_loader is None or test_loader is None:
            from .data import make_loader

            shard = {"rank": self.rank, "world_size": self.world_size, "num_workers": num_workers,
                     "pin_memory": self.device.type == "cuda"}
            if train_loader is None:
                train_loader = make_loader(train_set, self.batch_size, shuffle=True, seed=self.seed,
                                           drop_last=drop_last, **shard)
            if test_loader is None:
                test_bs = max(1, self.recipe.test_batch_size // self.world_size)
                test_loader = make_loader(test_set, test_bs, shuffle=False, **shard)
        return train_loader, test_loader

    def _amp_dtype(self, amp: bool | str) -> torch.dtype | None:
        if amp is False or amp is None:
            return None
        if amp is True:
            return torch.float16 if self.device.type == "cuda" else torch.bfloat16
        if amp in ("bf16", "bfloat16"):
            return torch.bfloat16
        if amp in ("fp16", "float16"):
            if self.device.type != "cuda":
                raise ConfigError(f"amp='{amp}' needs a CUDA device (got {self.device}); use amp='bf16' on CPU")
            return torch.float16
        raise ConfigError(f"amp={amp!r}: expected False, True, 'bf16' or 'fp16'")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _say(self, line: str) -> None:
        logger.info(line)
        if not self.is_main:
            return
        if self._log_fn is not None:
            self._log_fn(line)
        elif self.progress:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)

    @property
    def checkpoint_stem(self) -> Path | None:
        return self.out_dir / CHECKPOINT_STEM if self.out_dir is not None else None

    # ------------------------------------------------------------------ main loop

    def fit(self, resume: bool = False) -> TrainResult:
        """Run the remaining epochs of the recipe; with ``resume``, first load ``out_dir/last`` if present.

        Raises:
            NonFiniteLossError: the loss became NaN/inf (the message names epoch and step; the last
                checkpoint on disk is the last good epoch).
            CheckpointError / ConfigError: the checkpoint does not match this model / recipe / seed.
        """
        self._prepare_out_dir(resume)
        if self.world_size > 1:
            self._check_equal_steps()
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        recipe = self.recipe
        while self.epoch < recipe.epochs:
            e = self.epoch
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            record: dict[str, Any] = {"epoch": e, **self._train_epoch(e)}
            self.scheduler.step()
            record.update(self._test_record(self._evaluate()))
            record.update({"lr": lr, "time_s": round(time.perf_counter() - start, 3)})
            self.epoch = e + 1
            for cb in self.callbacks:
                hook = getattr(cb, "on_epoch_end", None)
                if hook is not None:
                    hook(self, e, record)
            record = json.loads(json.dumps(record, default=_jsonable))
            self.history.append(record)
            if self.is_main and self.out_dir is not None:
                with open(self.out_dir / LOG_NAME, "a") as f:
                    f.write(json.dumps(record) + "\n")
                self._save_checkpoint()
            self._say(self._summary(e, record))
        self.model = self.module  # drop the DDP wrapper: it holds the process group alive
        result = self._finish()
        for cb in self.callbacks:
            hook = getattr(cb, "on_train_end", None)
            if hook is not None:
                hook(self, result)
        return result

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training loader (at most ``recipe.steps_per_epoch`` steps); returns mean train
        loss / accuracy over all ranks' samples (causal LM: per token, plus the train perplexity)."""
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        from .data.transforms import mix_seed

        s = mix_seed(self.seed, epoch, self.rank, 0x7472_6169)  # independent stream per (seed, epoch, rank)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        for r in self.regularizers:
            r.on_epoch_start(epoch)
        self.module.train()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # Σ loss·n, Σ correct, Σ n, Σ penalty
        n_steps = self._steps_per_epoch()
        from tqdm import tqdm

        bar = tqdm(itertools.islice(loader, n_steps), total=n_steps, desc=f"epoch {epoch + 1}/{self.recipe.epochs}",
                   leave=False, disable=not self.progress, dynamic_ncols=True)
        try:
            for step, batch in enumerate(bar):
                value = self._train_step(epoch, step, n_steps, batch, sums)
                if self.progress and step % 10 == 0:
                    bar.set_postfix(loss=f"{value / self.world_size:.4f}", refresh=False)
        finally:
            bar.close()
        dist.all_reduce_sum(sums)
        loss_sum, correct, count, penalty_sum = sums.tolist()
        stats = {"train_loss": loss_sum / max(count, 1.0), "train_accuracy": 100.0 * correct / max(count, 1.0)}
        if self.task == "causal-lm":
            from .metrics import perplexity

            stats["train_perplexity"] = perplexity(stats["train_loss"])
        if self.regularizers:  # the penalty is the same on every rank: mean over steps
            stats["train_penalty"] = penalty_sum / max(n_steps * self.world_size, 1)
        return stats

    def _train_step(self, epoch: int, step: int, n_steps: int, batch: Any, sums: torch.Tensor) -> float:
        """Forward, loss, backward, (clip,) optimizer step and regularizer hooks for one batch; adds to
        ``sums`` = [Σ loss·n, Σ correct, Σ n, Σ penalty] (n: samples, or scored tokens for a causal LM).
        Returns the all-reduced total loss (sum over ranks)."""
        x, y = split_batch(batch)
        x, y = _to_device(x, self.device), _to_device(y, self.device)
        if self._example is None:
            self._example = _first_rows(x)
            if isinstance(x, torch.Tensor):
                self._input_shape = tuple(x.shape[1:])
        self._set_step_lr(epoch, step, n_steps)
        with self._autocast():
            out = self._forward(self.model, x)
            if self.task is None:
                self.task = infer_task(out, y)
            loss = self._loss(out, y)
        n = self._count(y)
        scale = 1.0
        if self.world_size > 1 and step == n_steps - 1:
            # DDP averages per-rank means; a short last batch may split unevenly, so weight each
            # rank's mean by n_rank·W/n_total to get the mean over the whole global batch.
            total_n = dist.all_reduce_sum(torch.tensor([float(n)], device=self.device)).item()
            scale = float(n) * self.world_size / total_n
        total = loss.float() * scale if scale != 1.0 else loss.float()
        penalty = self._penalty()
        if penalty is not None:
            total = total + penalty
        # One host sync per step: stop *before* a non-finite loss reaches the weights (all
        # ranks decide together, so none is left waiting in a collective).
        value = dist.all_reduce_sum(total.detach().reshape(1).clone()).item()
        if not math.isfinite(value):
            self._raise_nonfinite(epoch, step, n_steps, loss, penalty)
        self._backward_and_step(total)
        if self.regularizers:
            with torch.no_grad():
                for r in self.regularizers:
                    r.after_step(self.module)
        self.global_step += 1
        with torch.no_grad():  # no host sync: summed on the device, read once per epoch
            sums[0] += loss.detach().double() * n
            sums[1] += self._correct(out, y)
            sums[2] += n
            if penalty is not None:
                sums[3] += penalty.detach().double()
        return value

    def _forward(self, model: nn.Module, x: Any) -> torch.Tensor:
        """Logits of ``model`` on ``x`` (a dict goes in as keyword arguments)."""
        out = model(**x, **self._call_kwargs) if isinstance(x, dict) else model(x, **self._call_kwargs)
        return model_logits(out)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch-mean training loss: ``loss_fn``, else cross-entropy (token-mean for a causal LM)."""
        if self._custom_loss:
            return self.loss_fn(logits, y)
        if self.task == "causal-lm":
            from .metrics import IGNORE_INDEX

            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)
        if self.recipe.label_smoothing:
            return F.cross_entropy(logits, y, label_smoothing=self.recipe.label_smoothing)
        return self.loss_fn(logits, y)

    def _count(self, y: torch.Tensor) -> int | torch.Tensor:
        """Samples in the batch; scored tokens (a device tensor) for a causal LM."""
        if self.task == "causal-lm":
            from .metrics import IGNORE_INDEX

            return (y != IGNORE_INDEX).sum()
        return y.shape[0]

    def _correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "causal-lm":
            from .metrics import IGNORE_INDEX

            return ((logits.argmax(dim=-1) == y) & (y != IGNORE_INDEX)).sum()
        return (logits.argmax(dim=1) == y).sum()

    def _backward_and_step(self, total: torch.Tensor) -> None:
        """Backward, optional gradient-norm clipping (``recipe.grad_clip``) and the optimizer step."""
        opt, clip = self.optimizer, self.recipe.grad_clip
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            if clip:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            total.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            opt.step()

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the loader's length, capped by ``recipe.steps_per_epoch``."""
        n = len(self.train_loader)
        cap = self.recipe.steps_per_epoch
        return min(n, cap) if cap else n

    def _set_step_lr(self, epoch: int, step: int, n_steps: int) -> None:
        """Per-step lr (only with warm-up or ``schedule_per_step``), in closed form from the step counters:
        ``base · factor(e [+ i/n]) · min(1, (global_step + 1) / warmup_steps)``."""
        r = self.recipe
        if not r.steps_lr_shaped:
            return
        at = epoch + step / n_steps if r.schedule_per_step else epoch
        warm = min(1.0, (self.global_step + 1) / r.warmup_steps) if r.warmup_steps else 1.0
        sched = self.scheduler
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(at) * warm

    def _penalty(self) -> torch.Tensor | None:
        terms = [p for p in (r.penalty(self.module) for r in self.regularizers) if p is not None]
        if not terms:
            return None
        total = terms[0].float()
        for t in terms[1:]:
            total = total + t.float()
        return total

    def _raise_nonfinite(self, epoch, step, n_steps, loss, penalty):
        ckpt = self.checkpoint_stem
        where = (f"the last good checkpoint is {ckpt} (after {self.epoch} epochs)" if ckpt and self.epoch
                 else "no checkpoint was written yet")
        parts = f"task loss {loss.item():.4g}" + (f", penalty {penalty.item():.4g}" if penalty is not None else "")
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch} (0-based), step {step + 1}/{n_steps} "
            f"(global step {self.global_step + 1}; {parts}; rank {self.rank}). The weights were not updated "
            f"with it; {where}. Lower the learning rate or check the data / regularizer strength.")

    def _evaluate(self) -> dict[str, Any]:
        """Test metrics: :func:`prunekit.metrics.evaluate` (classification) or ``evaluate_lm`` (causal LM)."""
        from .metrics import evaluate, evaluate_lm

        view, loader = LogitsOf(self.module, **self._call_kwargs), _Pairs(self.test_loader)
        if self.task is None:
            self.task = self._task_from_test_batch(view)
        with self._autocast():
            if self.task == "causal-lm":
                return evaluate_lm(view, loader, device=self.device)
            return evaluate(view, loader, device=self.device,
                            criterion=None if self.loss_fn is F.cross_entropy else self.loss_fn)

    def _task_from_test_batch(self, view: nn.Module) -> str:
        """Decide the task from the shapes of one test batch (before any training step decided it)."""
        from .runtime import call, eval_mode

        x, y = split_batch(next(iter(self.test_loader)))
        with eval_mode(view), self._autocast():
            return infer_task(call(view, _to_device(x, self.device)), y)

    def _test_record(self, test: dict[str, Any]) -> dict[str, Any]:
        """The epoch record's test keys: loss and accuracy (+ top-5, or the perplexity of a causal LM)."""
        if self.task == "causal-lm":
            return {"test_loss": test["loss"], "perplexity": test["perplexity"], "accuracy": test["accuracy"]}
        return {"test_loss": test["loss"], "accuracy": test["accuracy"], "top5": test.get("top5")}

    def _summary(self, e: int, record: dict[str, Any]) -> str:
        head = f"epoch {e + 1}/{self.recipe.epochs}  loss {record['train_loss']:.4f}  "
        tail = f"lr {record['lr']:.3g}  {record['time_s']:.1f}s"
        if self.task == "causal-lm":
            return (head + f"train ppl {record['train_perplexity']:.3f}  test loss {record['test_loss']:.4f}  "
                    f"test ppl {record['perplexity']:.3f}  " + tail)
        return head + f"train {record['train_accuracy']:.2f}%  test {record['accuracy']:.2f}%  " + tail

    def _check_equal_steps(self) -> None:
        """Every rank must take the same number of steps per epoch, or DDP would hang."""
        import torch.distributed as tdist

        steps = self._steps_per_epoch()
        n = torch.tensor([steps, -steps], device=self.device)
        tdist.all_reduce(n, op=tdist.ReduceOp.MAX)
        if n[0].item() != -n[1].item():
            raise ConfigError(f"ranks have different numbers of training batches per epoch (between "
                              f"{-n[1].item()} and {n[0].item()}); the loader must give every rank the same count")

    # ------------------------------------------------------------------ files

    def _prepare_out_dir(self, resume: bool) -> None:
        if self.out_dir is None:
            if resume:
                raise ConfigError("resume=True needs an out_dir holding a checkpoint")
            return
        stem = self.checkpoint_stem
        if resume and Path(f"{stem}.json").exists():
            self._load_checkpoint()
            if self.is_main:  # the log ends where the checkpoint does (drops lines of a killed epoch)
                _write_text_atomic(self.out_dir / LOG_NAME, "".join(json.dumps(r) + "\n" for r in self.history))
            self._say(f"resumed from {stem} after {self.epoch} epochs")
        elif self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for suffix in (".json", ".safetensors"):  # a stale checkpoint of an earlier run must not be resumed
                Path(f"{stem}{suffix}").unlink(missing_ok=True)
            _write_text_atomic(self.out_dir / LOG_NAME, "")
        dist.barrier()

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "seed": self.seed,
            "task": self.task,
            "recipe": self.recipe.to_dict(),
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "regularizers": [r.state_dict() for r in self.regularizers],
            "history": self.history,
        }

    def _save_checkpoint(self) -> None:
        from .io import save_state

        save_state(self.checkpoint_stem, self._checkpoint_state())

    def _load_checkpoint(self) -> None:
        from .io import load_state

        stem = self.checkpoint_stem
        state = load_state(stem)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise CheckpointError(f"{stem}: not a prunekit training checkpoint (format "
                                  f"{state.get('format') if isinstance(state, dict) else None!r})")
        self._check_compatible(state)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for r, s in zip(self.regularizers, state["regularizers"]):
            r.load_state_dict(s)
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = list(state["history"])
        self.task = self.task or state.get("task")

    def _same_lr_so_far(self, saved_epochs: Any, done: int) -> bool:
        """Whether a run planned for ``saved_epochs`` used the same LR factors for its first ``done``
        epochs as this recipe does: then extending or shortening it on resume is exact (true for step
        schedules, false for schedules shaped by the run length, e.g. cosine)."""
        if not isinstance(saved_epochs, int) or saved_epochs < 1:
            return False
        r = self.recipe
        make = SCHEDULES.get(r.schedule)
        kw = {"step_size": r.step_size, "milestones": tuple(r.milestones), "gamma": r.gamma}
        before, now = make(epochs=saved_epochs, **kw), make(epochs=r.epochs, **kw)
        n = self._steps_per_epoch() if r.schedule_per_step else 1  # per step: every step's fractional epoch
        points = (e + i / n for e in range(done) for i in range(n))
        return all(math.isclose(before(t), now(t), rel_tol=0, abs_tol=0) for t in points)

    def _check_compatible(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint written by a different model, recipe, seed or regularizer list."""
        stem = self.checkpoint_stem
        saved, own = state["model"], self.module.state_dict()
        missing = sorted(set(own) - set(saved))
        unexpected = sorted(set(saved) - set(own))
        shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
        if missing or unexpected or shapes:
            bits = []
            if missing:
                bits.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                bits.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            if shapes:
                bits.append("shape mismatch " + "; ".join(shapes[:5]))
            raise CheckpointError(f"{stem}: the checkpoint was written for a different model ({', '.join(bits)}); "
                                  f"use a fresh out_dir or resume=False")
        ours = self.recipe.to_dict()
        # a field the checkpoint lacks was added to TrainRecipe later: the run used its default (= off)
        theirs = {**TrainRecipe().to_dict(), **state["recipe"]}
        ignore = {"name"} | ({"epochs"} if self._same_lr_so_far(theirs.get("epochs"), int(state["epoch"])) else set())
        diff = [f"{k}: checkpoint {theirs.get(k)!r} vs now {ours[k]!r}" for k in ours
                if k not in ignore and theirs.get(k) != ours[k]]
        if diff:
            raise ConfigError(f"{stem}: the checkpoint was written with a different recipe ({'; '.join(diff)}); "
                              f"use a fresh out_dir or resume=False")
        if self.task and state.get("task") and state["task"] != self.task:
            raise ConfigError(f"{stem}: the checkpoint was written for task {state['task']!r}, this run is "
                              f"{self.task!r}")
        if state["seed"] != self.seed:
            raise ConfigError(f"{stem}: the checkpoint was written with seed={state['seed']}, this run has "
                              f"seed={self.seed}")
        if state["epoch"] > self.recipe.epochs:
            raise ConfigError(f"{stem}: the checkpoint already has {state['epoch']} epochs but the recipe asks "
                              f"for epochs={self.recipe.epochs}")
        if len(state["regularizers"]) != len(self.regularizers):
            raise ConfigError(f"{stem}: the checkpoint has {len(state['regularizers'])} regularizer state(s), "
                              f"this run has {len(self.regularizers)} regularizer(s)")

    def _finish(self) -> TrainResult:
        """Final metrics, sizes and ``model.safetensors`` + ``model.json`` (rank 0)."""
        from .metrics import count_params

        last = self.history[-1] if self.history else self._final_eval_record()
        if self._example is None:
            self._example = _first_rows(_to_device(split_batch(next(iter(self.test_loader)))[0], self.device))
        params = count_params(self.module)
        macs = self._macs()
        checkpoint = None
        extra = {"seed": self.seed, "recipe": self.recipe.name, "dataset": self.metadata.get("dataset")}
        lm = {"task": "causal-lm", "perplexity": last["perplexity"]} if self.task == "causal-lm" else {}
        extra.update(lm)
        if self.out_dir is not None:
            checkpoint = self.out_dir / "model.safetensors"
            if self.is_main:
                from .io import save_model

                meta = {**self.metadata, "recipe": self.recipe.to_dict(), "seed": self.seed,
                        "accuracy": last["accuracy"], "top5": last.get("top5"), "test_loss": last["test_loss"],
                        "epochs": self.epoch, "params": params, "macs": macs, "world_size": self.world_size,
                        "checkpoint": str(checkpoint), **lm}
                save_model(self.out_dir, self.module, metadata=meta)
            dist.barrier()
        return TrainResult(model=self.module, accuracy=last["accuracy"], history=list(self.history),
                           checkpoint_path=checkpoint, params=params, macs=macs, top5=last.get("top5"),
                           test_loss=last["test_loss"], epochs=self.epoch, extra=extra)

    def _final_eval_record(self) -> dict[str, Any]:
        return self._test_record(self._evaluate())

    def _macs(self) -> int:
        """Per-sample MACs: zeros of the input shape for float inputs, else the first real input (token ids)."""
        from .metrics import count_macs

        ex = self._example
        if isinstance(ex, torch.Tensor) and ex.is_floating_point():
            return count_macs(self.module, input_shape=tuple(ex.shape[1:]))
        return count_macs(self.module, ex)


def train(model: nn.Module, train_set, test_set, recipe: TrainRecipe | str, *, out_dir: str | Path | None = None,
          seed: int = 0, resume: bool = False, device: str | torch.device | None = None, **kwargs: Any) -> TrainResult:
    """Train ``model`` on ``train_set`` with ``recipe``, evaluating on ``test_set`` after every epoch.

    The model's initial weights are the caller's: seed before creating it (``torch.manual_seed``)
    if the initialisation must be reproducible. ``kwargs`` go to :class:`Trainer` (regularizers,
    callbacks, amp, progress, log, loss_fn, param_groups, drop_last, metadata).

    Returns:
        TrainResult with the trained model, final test accuracy (%), per-epoch history, params, MACs
        and the path of ``out_dir/model.safetensors`` (``None`` without ``out_dir``).
    """
    trainer = Trainer(model, recipe, train_set=train_set, test_set=test_set, device=device, out_dir=out_dir,
                      seed=seed, **kwargs)
    return trainer.fit(resume=resume)
