"""gRDA studies (``prunekit reproduce grda-...``): schema, cache reuse, magnitude pruning, missing data."""
from __future__ import annotations

import json
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.cli import main
from prunekit.errors import ConfigError, DatasetError
from prunekit.grda_studies import KeepMask, global_magnitude_prune, head
from prunekit.io import load_model
from prunekit.recipes import get_recipe
from prunekit.reproduce import StudyOptions, get_study, list_studies

TINY = ["--epochs", "1", "--set", "subset=2000", "--set", "test_subset=1000", "--set", "mus=[0.4,0.7]",
        "--set", "cs=[0.02]", "--set", "pairs=[]", "--set", "finetune_epochs=1", "--set", "plot=false"]


def _reproduce(capsys, *args: str) -> dict:
    assert main(["reproduce", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_lenet_study_schema_and_cache(tmp_path, capsys):
    report = _reproduce(capsys, "grda-lenet300-fmnist", "--out", str(tmp_path), *TINY)
    assert report["recipe"] == "grda-lenet" and report["epochs"] == 1
    assert report["train_images"] == 2000 and report["test_images"] == 1000
    assert 10 < report["sgd_accuracy"] <= 100
    rows = report["rows"]
    assert [(r["c"], r["mu"]) for r in rows] == [(0.02, 0.4), (0.02, 0.7)]
    for r in rows:
        assert {"mu", "c", "accuracy", "sparsity", "mp_accuracy", "mp_ft_accuracy", "layer_sparsity"} <= set(r)
        assert 0 < r["sparsity"] < 100 and 10 < r["accuracy"] <= 100
        assert set(r["layer_sparsity"]) == {f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")}
        assert r["gap_to_sgd"] == pytest.approx(r["accuracy"] - report["sgd_accuracy"], abs=1e-9)
    # a larger μ gives a larger threshold c·γ^{μ+½}·k^μ once k·γ^... > 1: more zeros at the same c
    assert rows[1]["sparsity"] > rows[0]["sparsity"]
    # sparsity reported is the exact-zero count of the trained model over all 266,610 parameters
    assert report["params"] == 266_610
    (run_dir,) = tmp_path.glob("grda_c_0.02_mu_0.7_*")
    model, _ = load_model(run_dir / "model.safetensors")
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert rows[1]["sparsity"] == pytest.approx(100 * zeros / 266_610, abs=1e-4)
    # second invocation: every run comes from OUT/results.json (identical numbers, no training)
    start = time.perf_counter()
    again = _reproduce(capsys, "grda-lenet300-fmnist", "--out", str(tmp_path), *TINY)
    assert time.perf_counter() - start < 3
    assert again["rows"] == rows and again["sgd_accuracy"] == report["sgd_accuracy"]
    assert report["plot"] is None and not (tmp_path / "sparsity_accuracy.png").exists()


def test_grda_run_is_sgd_at_c_zero(tmp_path):
    """c = 0 is plain SGD: the gRDA run and the SGD baseline start from the same weights and agree exactly."""
    study = get_study("grda-lenet300-fmnist")
    extra = {"subset": 1000, "test_subset": 500, "mus": [0.55], "cs": [0.0], "pairs": [], "mp": False}
    report, table = study(StudyOptions(epochs=1, out=str(tmp_path), progress=False, extra=extra))
    (row,) = report["rows"]
    assert row["accuracy"] == report["sgd_accuracy"] and row["sparsity"] == 0 and row["c"] == 0
    assert "| 0.55 | 0 | 0.00 |" in table
    (sgd_dir,), (grda_dir,) = tmp_path.glob("sgd_*"), tmp_path.glob("grda_c_0.0_mu_0.55_*")
    sgd, grda = (load_model(d / "model.safetensors")[0].state_dict() for d in (sgd_dir, grda_dir))
    assert all(torch.equal(sgd[k], grda[k]) for k in sgd)


def test_unknown_option_and_checkpoint_are_refused(tmp_path):
    study = get_study("grda-resnet20-fmnist")
    with pytest.raises(ConfigError, match="unknown study option.*'lam'"):
        study(StudyOptions(out=str(tmp_path), extra={"lam": 1.0}))
    with pytest.raises(ConfigError, match="mus= must be"):
        study(StudyOptions(out=str(tmp_path), extra={"mus": "high"}))
    with pytest.raises(ConfigError, match="--checkpoint is not used"):
        study(StudyOptions(out=str(tmp_path), checkpoint="x.safetensors"))


@pytest.mark.parametrize("name,dataset", [("grda-vgg16-cifar10", "cifar10"), ("grda-wrn28-10-cifar100", "cifar100"),
                                          ("grda-resnet50-imagenet", "imagenet")])
def test_paper_studies_fail_fast_without_data(tmp_path, monkeypatch, name, dataset):
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert name in list_studies()
    start = time.perf_counter()
    with pytest.raises(DatasetError, match=f"dataset '{dataset}' not found"):
        get_study(name)(StudyOptions(data_root=str(tmp_path / "empty"), out=str(tmp_path / "out")))
    assert time.perf_counter() - start < 2 and not (tmp_path / "out").exists()


def test_paper_recipes_follow_the_spec():
    """spec/grda.md §2: lr 0.1, no momentum/wd, batch 256 (ImageNet) / 128 (CIFAR), the paper's (c, μ, epochs)."""
    expect = {"grda-resnet50-imagenet": (150, 256, 0.005, 0.55), "grda-vgg16-cifar10": (600, 128, 0.0005, 0.6),
              "grda-wrn28x10-cifar100": (200, 128, 0.001, 0.55)}
    for name, (epochs, batch, c, mu) in expect.items():
        r = get_recipe(name)
        assert (r.epochs, r.batch_size, r.lr, r.momentum, r.weight_decay) == (epochs, batch, 0.1, 0.0, 0.0)
        assert r.optimizer == "grda" and r.optimizer_kwargs == {"c": c, "mu": mu}
    assert get_recipe("grda-resnet50-imagenet").lr_at(139) == 0.1
    assert get_recipe("grda-resnet50-imagenet").lr_at(140) == pytest.approx(0.01)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), fraction=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_global_magnitude_prune_zeroes_the_smallest(n, fraction, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, 3), nn.Linear(3, 2))
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    masks = global_magnitude_prune(model, fraction)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    k = round(fraction * before.numel())
    assert int((after == 0).sum()) == k  # random continuous weights: no ties at the cut
    if 0 < k < before.numel():
        assert before[after == 0].abs().max() < before[after != 0].abs().min()
    assert torch.equal(after[after != 0], before[after != 0])
    assert sum(int(m.sum()) for m in masks.values()) == before.numel() - k


def test_keep_mask_keeps_pruned_weights_zero():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    masks = global_magnitude_prune(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(16, 8)).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        KeepMask(masks).after_step(model)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros == 18  # round(0.5 · 36)
    with pytest.raises(ConfigError, match="fraction"):
        global_magnitude_prune(model, 1.5)


def test_head_takes_the_first_images():
    from prunekit.data import get_dataset

    ds = get_dataset("synthetic", "train")
    sub = head(ds, 7)
    assert len(sub) == 7 and torch.equal(sub.images, ds.images[:7]) and torch.equal(sub.labels, ds.labels[:7])
    assert head(ds, None) is ds and head(ds, 10 ** 9) is ds
