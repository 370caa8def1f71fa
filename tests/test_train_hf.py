"""The Trainer on Hugging Face ``transformers`` zoo models: a byte-level Llama (causal LM, perplexity) and a
ViT (classification), with tiny configs so that every test takes a few seconds on CPU."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from prunekit.data import get_dataset, make_loader
from prunekit.io import load_model
from prunekit.metrics import evaluate_lm, perplexity, token_nll
from prunekit.models import create
from prunekit.recipes import TrainRecipe, default_recipe_for, get_recipe
from prunekit.train import Trainer, train

T = 16  # block length of the synthetic token data
TINY_LLAMA = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": T}
TINY_VIT = {"patch_size": 7, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
LM_RECIPE = TrainRecipe(epochs=3, batch_size=16, test_batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0.0,
                        schedule="cosine", schedule_per_step=True, warmup_steps=5, grad_clip=1.0, name="tiny-lm")


class Pattern(torch.utils.data.Dataset):
    """Blocks of a byte stream that repeats a fixed random 11-byte pattern: items ``(x, y)`` int64 (T,),
    ``y`` = ``x`` shifted by one; the next byte is a function of the current one (perplexity → 1)."""

    def __init__(self, size: int, seed: int = 0, as_dict: bool = False):
        g = torch.Generator().manual_seed(0)
        self.pattern = torch.randperm(256, generator=g)[:11]
        self.offsets = torch.randint(0, 11, (size,), generator=torch.Generator().manual_seed(seed))
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int):
        ids = self.pattern[(self.offsets[i] + torch.arange(T + 1)) % 11]
        if self.as_dict:
            return {"input_ids": ids[:-1], "attention_mask": torch.ones(T, dtype=torch.int64), "labels": ids[1:]}
        return ids[:-1], ids[1:]


def llama(seed: int = 0):
    torch.manual_seed(seed)
    return create("llama-shakespeare", **TINY_LLAMA)


def fit_lm(out_dir=None, recipe=LM_RECIPE, *, train_set=None, **kw):
    kw.setdefault("progress", False)
    return train(llama(), train_set or Pattern(160), Pattern(32, seed=1), recipe, out_dir=out_dir, seed=0,
                 device="cpu", **kw)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_llama_learns_a_repeating_pattern(tmp_path):
    result = fit_lm(tmp_path)

    assert result.extra["task"] == "causal-lm"
    first, last = result.history[0], result.history[-1]
    assert {"train_loss", "train_perplexity", "test_loss", "perplexity", "accuracy"} <= last.keys()
    assert last["perplexity"] == pytest.approx(math.exp(last["test_loss"]))
    assert result.perplexity == last["perplexity"] < 2.0 < first["train_perplexity"]  # uniform: 256
    assert result.accuracy > 90.0  # next-token top-1
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["arch"]["name"] == "llama-shakespeare" and meta["metadata"]["perplexity"] == result.perplexity
    assert result.macs > 0 and result.params == sum(p.numel() for p in result.model.parameters())
    reloaded, _ = load_model(tmp_path)  # rebuilt by name from the zoo
    x = Pattern(2)[0][0][None]
    assert torch.equal(reloaded(x).logits, result.model.eval()(x).logits)


def test_perplexity_is_exp_of_the_mean_token_nll():
    model = llama(3).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 3, T + 1), generator=g)  # two batches of 3 sequences
    batches = [(b[:, :-1], b[:, 1:].clone()) for b in ids]
    batches[1][1][0, :5] = -100  # unscored tokens
    with torch.no_grad():
        nll = [F.log_softmax(model(x).logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0].neg()[y != -100]
               for x, y in batches]
    by_hand = torch.cat(nll).double().mean().item()

    got = evaluate_lm(model, batches)
    assert got["tokens"] == 6 * T - 5 and got["samples"] == 6
    assert got["loss"] == pytest.approx(by_hand, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(by_hand), rel=1e-6) == perplexity(got["loss"])
    # the same number as Hugging Face's own loss (labels = the inputs, shifted inside the model)
    x = ids[0]
    hf = model(x, labels=x).loss.item()
    masked = x[:, 1:].clone()
    s, n, _ = token_nll(model(x[:, :-1]).logits, masked)
    assert (s / n).item() == pytest.approx(hf, rel=1e-5)
    # and the Trainer reports it: test loss and perplexity of the untrained model
    trainer = Trainer(model, LM_RECIPE, train_loader=batches, test_loader=batches, device="cpu", progress=False)
    test = trainer._evaluate()
    assert trainer.task == "causal-lm" and test["perplexity"] == pytest.approx(math.exp(by_hand), rel=1e-6)


def test_tiny_vit_trains_and_reports_accuracy(tmp_path):
    kw = {"num_classes": 10, "input_shape": (1, 28, 28), "seed": 0}
    train_set, test_set = get_dataset("synthetic", "train", size=64, **kw), get_dataset("synthetic", "test",
                                                                                         size=48, **kw)
    torch.manual_seed(0)
    model = create("vit-fmnist", **TINY_VIT)
    assert isinstance(model, __import__("transformers").ViTForImageClassification)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = get_recipe("vit-fmnist").replace(epochs=1, batch_size=32, warmup_steps=1)
    result = train(model, train_set, test_set, recipe, out_dir=tmp_path, device="cpu", progress=False)

    rec = result.history[0]
    assert {"accuracy", "top5", "test_loss", "train_accuracy"} <= rec.keys() and "perplexity" not in rec
    assert 0.0 <= result.accuracy <= 100.0 and result.top5 >= result.accuracy and "task" not in result.extra
    assert not torch.equal(before["vit.embeddings.patch_embeddings.projection.weight"],
                           model.vit.embeddings.patch_embeddings.projection.weight)
    assert result.macs > 0
    reloaded, _ = load_model(tmp_path)
    x = test_set[0][0][None]
    assert torch.equal(reloaded(x).logits, model.eval()(x).logits)


def test_resume_after_a_kill_is_bit_identical(tmp_path):
    class Killed(Exception):
        pass

    class KillAfter:  # a crash at the end of the 2nd epoch, before its checkpoint is written
        def on_epoch_end(self, trainer, epoch, record):
            if epoch == 1:
                raise Killed

    full = fit_lm(tmp_path / "full")
    with pytest.raises(Killed):
        fit_lm(tmp_path / "run", callbacks=[KillAfter()])
    resumed = fit_lm(tmp_path / "run", resume=True)

    assert same_weights(full.model, resumed.model)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in full.history]
    assert resumed.perplexity == full.perplexity


def test_per_step_warmup_cosine_and_grad_clip():
    lrs, norms = [], []

    def loss_fn(logits, y):  # records the lr of every step
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    recipe = LM_RECIPE.replace(epochs=2, grad_clip=1e-3)
    data = Pattern(64)
    trainer = Trainer(llama(), recipe, train_set=data, test_set=Pattern(16), device="cpu", progress=False,
                      loss_fn=loss_fn)
    trainer.optimizer.register_step_pre_hook(lambda *_: norms.append(torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in trainer.module.parameters()])).item()))
    trainer.fit()
    n = len(data) // recipe.batch_size
    expect = [recipe.lr * 0.5 * (1 + math.cos(math.pi * (s / n) / recipe.epochs)) * min(1.0, (s + 1) / 5)
              for s in range(recipe.epochs * n)]
    assert lrs == pytest.approx(expect, rel=1e-12)
    assert max(norms) <= 1e-3 * (1 + 1e-4)


def test_steps_per_epoch_caps_an_epoch_and_dict_batches_go_in_as_kwargs():
    recipe = LM_RECIPE.replace(epochs=1, steps_per_epoch=3)
    calls = []
    model = llama()
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(sorted(kw)), with_kwargs=True)
    result = train(model, Pattern(160, as_dict=True), Pattern(16, as_dict=True), recipe, device="cpu",
                   progress=False)
    assert result.extra["task"] == "causal-lm" and math.isfinite(result.perplexity)
    train_calls = calls[:3]
    assert all(c == ["attention_mask", "input_ids", "use_cache"] for c in train_calls)
    assert len(calls) == 3 + 1 + 1  # 3 steps, 1 test batch, 1 MACs count


def test_recipes_and_defaults():
    vit, lm = get_recipe("vit-fmnist"), get_recipe("llama-shakespeare")
    assert vit.optimizer == lm.optimizer == "adamw" and vit.schedule_per_step and lm.grad_clip == 1.0
    assert default_recipe_for("vit-fmnist") == vit and default_recipe_for("llama-shakespeare") == lm
    with pytest.raises(Exception, match="grad_clip"):
        TrainRecipe(grad_clip=-1.0)


def test_models_need_transformers_only_when_built(monkeypatch):
    code = ("import sys, prunekit, prunekit.models, prunekit.train; from prunekit.models import list_models; "
            "assert 'vit-fmnist' in list_models(); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install prunekit\[transformers\]"):
        create("llama-shakespeare")


def test_make_loader_batches_of_token_items_are_int64():
    x, y = next(iter(make_loader(Pattern(8), 4, shuffle=False)))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T)


DDP_SCRIPT = r'''
import sys
import torch
from prunekit import distributed
from prunekit.models import create
from prunekit.recipes import TrainRecipe
from prunekit.train import train


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.ids = torch.randint(0, 256, (n, 9), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i, :-1], self.ids[i, 1:]


def run(out_dir):
    recipe = TrainRecipe(epochs=2, batch_size=8, test_batch_size=8, optimizer="adamw", lr=1e-2, schedule="cosine",
                         schedule_per_step=True, warmup_steps=3, grad_clip=0.5)
    torch.manual_seed(0)
    model = create("llama-shakespeare", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=8)
    return train(model, Blocks(44, 0), Blocks(13, 1), recipe, out_dir=out_dir, seed=3, device="cpu",
                 progress=False)  # last global batch: 4 = 2 + 2; uneven eval shards: 7 + 6


if __name__ == "__main__":
    distributed.init_from_env()
    run(sys.argv[1])
    distributed.cleanup()
'''


def test_two_gloo_ranks_match_one_process(tmp_path):
    from ddp_util import ddp_and_single

    _, log, single = ddp_and_single(DDP_SCRIPT, tmp_path, "ddp_lm.py")
    for d, s in zip(log, single.history, strict=True):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)
        assert d["perplexity"] == pytest.approx(s["perplexity"], rel=1e-5)  # all 13 test blocks, once


def run_cli(capsys, *argv: str) -> dict:
    from prunekit.cli import main

    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_cli_trains_and_evaluates_a_vit(capsys, tmp_path):
    tiny = [f"--model-config={k}={v}" for k, v in TINY_VIT.items()]
    trained = run_cli(capsys, "train", "--model", "vit-fmnist", "--dataset", "synthetic", "--recipe", "vit-fmnist",
                      "--epochs", "1", "--set", "steps_per_epoch=3", "--out", str(tmp_path), *tiny)
    assert trained["recipe"] == "vit-fmnist" and "perplexity" not in trained and trained["macs"] > 0
    evaluated = run_cli(capsys, "eval", "--checkpoint", str(tmp_path), "--dataset", "synthetic")
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-4)  # eval rounds to 4 places
    assert (evaluated["params"], evaluated["macs"]) == (trained["params"], trained["macs"])
    pruned = run_cli(capsys, "prune", "--checkpoint", str(tmp_path), "--dataset", "synthetic", "--ratio", "0.5",
                     "--out", str(tmp_path / "p50"))
    assert pruned["accuracy_before"] == pytest.approx(trained["accuracy"], abs=1e-4)
    assert 0.3 < pruned["params_reduction"] < 0.8 and pruned["macs"] < trained["macs"]
    assert pruned["preservation"]["samples"] > 0


def test_cli_trains_and_evaluates_llama_on_shakespeare(capsys, tmp_path):
    from prunekit.data.roots import resolve_root
    from prunekit.errors import DatasetError

    try:
        resolve_root("shakespeare")
    except DatasetError:
        pytest.skip("shakespeare not found: `prunekit data fetch shakespeare`")
    tiny = [f"--model-config={k}={v}" for k, v in {**TINY_LLAMA, "max_position_embeddings": 128}.items()]
    trained = run_cli(capsys, "train", "--model", "llama-shakespeare", "--dataset", "shakespeare", "--epochs", "1",
                      "--set", "steps_per_epoch=2", "--batch-size", "8", "--out", str(tmp_path), *tiny)
    assert trained["recipe"] == "llama-shakespeare" and 1.0 < trained["perplexity"] < 300.0
    assert trained["perplexity"] == pytest.approx(math.exp(trained["loss"]))
    evaluated = run_cli(capsys, "eval", "--checkpoint", str(tmp_path), "--dataset", "shakespeare")
    assert evaluated["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-6)
    assert evaluated["tokens"] == 1886 * 128 and evaluated["macs"] == trained["macs"]


def test_a_checkpoint_from_before_the_step_options_still_resumes(tmp_path):
    from prunekit.io import load_state, save_state

    recipe = TrainRecipe(epochs=2, batch_size=16, optimizer="adamw", lr=1e-3, schedule="step", name="old")
    fit_lm(tmp_path, recipe.replace(epochs=1))
    state = load_state(tmp_path / "last")
    for key in ("warmup_steps", "schedule_per_step", "grad_clip", "label_smoothing", "steps_per_epoch"):
        del state["recipe"][key]  # as written before these fields existed
    del state["task"]
    save_state(tmp_path / "last", state)
    resumed = fit_lm(tmp_path, recipe, resume=True)
    assert [r["epoch"] for r in resumed.history] == [0, 1] and resumed.extra["task"] == "causal-lm"
    with pytest.raises(Exception, match="grad_clip"):  # a real change of a new field is still refused
        fit_lm(tmp_path, recipe.replace(epochs=3, grad_clip=1.0), resume=True)


def test_models_command_lists_them_and_skips_them_without_transformers(capsys, monkeypatch):
    rows = {r["name"]: r for r in run_cli(capsys, "models")["models"]}
    assert rows["vit-fmnist"]["input_shape"] == [1, 28, 28] and rows["llama-shakespeare"]["input_shape"] == []
    monkeypatch.setitem(sys.modules, "transformers", None)
    names = {r["name"] for r in run_cli(capsys, "models")["models"]}
    assert "lenet-300-100" in names and not names & {"vit-fmnist", "llama-shakespeare"}
