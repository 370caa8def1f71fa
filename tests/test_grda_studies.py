"""gRDA studies (``prunekit reproduce grda-...``): schema, cache reuse, magnitude pruning, missing data.

The two end-to-end studies run on tiny settings (1 epoch, a few thousand Fashion-MNIST images) in the
default run; they skip, saying how to get the data, where Fashion-MNIST is absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.cli import main
from prunekit.errors import ConfigError, DatasetError
from prunekit.io import load_model
from prunekit.recipes import get_recipe
from prunekit.reproduce import StudyOptions, get_study, list_studies
from prunekit.studies.grda import KeepMask, global_magnitude_prune, head, plot_study

TINY = ["--epochs", "1", "--set", "subset=2000", "--set", "test_subset=1000", "--set", "mus=[0.4,0.7]",
        "--set", "cs=[0.02]", "--set", "pairs=[]", "--set", "finetune_epochs=1", "--set", "plot=false"]


def _reproduce(capsys, *args: str) -> dict:
    assert main(["reproduce", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_lenet_study_schema_and_cache(tmp_path, capsys, fashion_mnist_root):
    data = ["--data-root", str(fashion_mnist_root)]
    report = _reproduce(capsys, "grda-lenet300-fmnist", "--out", str(tmp_path), *data, *TINY)
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
    # second invocation: every run comes from OUT/results.json (identical numbers, no training: not one
    # file under OUT is written, neither a checkpoint nor a log line nor the cache itself)
    before = _files(tmp_path)
    again = _reproduce(capsys, "grda-lenet300-fmnist", "--out", str(tmp_path), *data, *TINY)
    assert _files(tmp_path) == before
    assert again["rows"] == rows and again["sgd_accuracy"] == report["sgd_accuracy"]
    assert report["plot"] is None and not (tmp_path / "sparsity_accuracy.png").exists()


def test_grda_run_is_sgd_at_c_zero(tmp_path, fashion_mnist_root):
    """c = 0 is plain SGD: the gRDA run and the SGD baseline start from the same weights and agree exactly."""
    study = get_study("grda-lenet300-fmnist")
    extra = {"subset": 1000, "test_subset": 500, "mus": [0.55], "cs": [0.0], "pairs": [], "mp": False}
    report, table = study(StudyOptions(epochs=1, out=str(tmp_path), data_root=str(fashion_mnist_root),
                                       progress=False, extra=extra))
    (row,) = report["rows"]
    assert row["accuracy"] == report["sgd_accuracy"] and row["sparsity"] == 0 and row["c"] == 0
    assert "| 0.55 | 0 | 0.00 |" in table
    (sgd_dir,), (grda_dir,) = tmp_path.glob("sgd_*"), tmp_path.glob("grda_c_0.0_mu_0.55_*")
    sgd, grda = (load_model(d / "model.safetensors")[0].state_dict() for d in (sgd_dir, grda_dir))
    assert all(torch.equal(sgd[k], grda[k]) for k in sgd)


def test_study_end_to_end_on_synthetic_data(tmp_path):
    """The whole study (SGD, a gRDA grid, MP + fine-tune, table, figure) without any downloaded data."""
    from prunekit.studies.grda import GrdaStudySpec, run_study

    spec = GrdaStudySpec(model="lenet-300-100", dataset="synthetic", recipe="grda-lenet", mus=(0.6,), cs=(0.05,),
                         subset=512, test_subset=256, finetune_epochs=1, model_config={"widths": [32, 16]})
    report, table = run_study(spec, StudyOptions(epochs=1, out=str(tmp_path), progress=False), title="tiny")
    (row,) = report["rows"]
    assert report["train_images"] == 512 and report["test_images"] == 256 and report["sgd_accuracy"] is not None
    assert 0 < row["sparsity"] < 100 and row["mp_accuracy"] is not None and row["mp_ft_accuracy"] is not None
    assert "| 0.6 | 0.05 |" in table
    assert report["plot"] == str(tmp_path / "sparsity_accuracy.png") or report["plot"] is None  # None: no matplotlib
    assert json.loads((tmp_path / "results.json").read_text())  # every run summarised for reuse


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
    """A missing dataset stops the study before any model, folder or download: nothing is built or fetched."""
    import prunekit.data.roots
    import prunekit.models

    def forbidden(*args, **kw):
        raise AssertionError("the study went past the missing dataset")

    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(prunekit.data.roots, "download", forbidden)
    monkeypatch.setattr(prunekit.models.MODELS, "get", forbidden)
    assert name in list_studies()
    with pytest.raises(DatasetError, match=f"dataset '{dataset}'"):
        get_study(name)(StudyOptions(data_root=str(tmp_path / "empty"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_paper_recipes_follow_the_paper():
    """docs/grda.md, "Recipes": lr 0.1, no momentum/wd, batch 256 (ImageNet) / 128 (CIFAR), the paper's (c, μ, epochs)."""
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


def test_plot_study_draws_headless_without_touching_the_backend(tmp_path, monkeypatch):
    """The study figure needs no display and no pyplot: the user's backend is never switched."""
    pytest.importorskip("matplotlib")
    import matplotlib

    def no_switch(*args, **kw):
        raise AssertionError("library code chose a matplotlib backend")

    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setattr(matplotlib, "use", no_switch)
    curve = [[1, 80.0, 0.5], [2, 85.0, 0.9]]
    report = {"rows": [{"mu": mu, "c": 0.02, "sparsity": s, "accuracy": a, "mp_accuracy": a - 5,
                        "mp_ft_accuracy": a - 1, "curve": curve} for mu, s, a in ((0.4, 50.0, 86.0), (0.7, 90.0, 84.0))],
              "sgd_accuracy": 87.0, "finetune_epochs": 1, "model": "lenet-300-100", "dataset": "fashion-mnist",
              "epochs": 2}
    png = plot_study(report, tmp_path / "plot.png")
    assert png == tmp_path / "plot.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
