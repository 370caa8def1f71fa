"""DDP: two gloo processes under torchrun train to the same weights as one process on the same global batch."""
from __future__ import annotations

import json

import pytest
import torch
from ddp_util import ddp_and_single

from prunekit import distributed
from prunekit.errors import ConfigError
from prunekit.recipes import TrainRecipe
from prunekit.train import Trainer

# Run by torchrun (2 ranks) and, via runpy, in this process (1 rank). A model without BatchNorm:
# BN batch statistics are per rank, so they would legitimately differ from the single process.
SCRIPT = r'''
import json, sys
import torch
from torch import nn
from prunekit import distributed
from prunekit.data import get_dataset
from prunekit.recipes import TrainRecipe
from prunekit.regularizers import Regularizer
from prunekit.train import train


class L1Clamp(Regularizer):
    def penalty(self, model):
        return 1e-3 * model[1].weight.abs().sum()

    def after_step(self, model):
        model[1].weight.clamp_(-0.15, 0.15)


class Ranks:
    def on_epoch_end(self, trainer, epoch, record):
        record["world_size"] = trainer.world_size


def run(out_dir):
    kw = dict(num_classes=4, input_shape=(1, 8, 8), seed=0)
    train_set = get_dataset("synthetic", "train", size=500, **kw)  # last global batch: 20 = 10 + 10
    test_set = get_dataset("synthetic", "test", size=201, **kw)    # uneven eval shards: 101 + 100
    recipe = TrainRecipe(epochs=2, batch_size=32, test_batch_size=64, lr=0.05, momentum=0.9,
                         weight_decay=1e-4, schedule="step", step_size=1, gamma=0.5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 4))
    return train(model, train_set, test_set, recipe, out_dir=out_dir, seed=3, device="cpu", progress=False,
                 regularizers=[L1Clamp()], callbacks=[Ranks()])


if __name__ == "__main__":
    distributed.init_from_env()
    run(sys.argv[1])
    distributed.cleanup()
'''


def test_two_gloo_ranks_match_one_process(tmp_path):
    ddp_weights, ddp_log, single = ddp_and_single(SCRIPT, tmp_path, "ddp_train.py")
    assert ddp_weights["1.weight"].abs().max() <= 0.15  # every rank applied the clamp

    assert [r["epoch"] for r in ddp_log] == [0, 1]  # rank 0 alone wrote it
    assert [r["world_size"] for r in ddp_log] == [2, 2]
    for d, s in zip(ddp_log, single.history):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)  # reduced over both ranks
        assert d["train_penalty"] == pytest.approx(s["train_penalty"], rel=1e-5)
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-5)  # all 201 test samples, once
        assert d["lr"] == s["lr"]
    meta = json.loads((tmp_path / "ddp" / "model.json").read_text())["metadata"]
    assert meta["world_size"] == 2 and meta["accuracy"] == pytest.approx(single.accuracy, abs=0.6)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = torch.tensor([1.5, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    distributed.barrier()
    distributed.cleanup()
    assert distributed.default_device() == torch.device("cuda", 0) if torch.cuda.is_available() \
        else distributed.default_device() == torch.device("cpu")


def test_bad_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_from_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match=r"RANK=2 is outside \[0, WORLD_SIZE=2\)"):
        distributed.init_from_env()


def test_global_batch_must_split_evenly_across_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "init_from_env", lambda: False)
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="batch_size=128 is not divisible by the world size 3"):
        Trainer(model, TrainRecipe(batch_size=128), train_loader=[], test_loader=[])
