"""End-to-end tests of the CLI contract (later issues and external checks rely on it)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from prunekit.cli import main
from prunekit.data import dataset_info


def run_json(capsys, *argv: str) -> dict:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def run_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    return err


def test_models_lists_zoo_with_param_counts(capsys):
    report = run_json(capsys, "models")
    counts = {row["name"]: row["params"] for row in report["models"]}
    assert counts["lenet-300-100"] == 266_610
    assert counts["resnet50"] == 25_557_032
    assert counts["wrn-40-4"] == 8_949_210


def test_train_then_eval_roundtrip(capsys, tmp_path):
    out = tmp_path / "run"
    trained = run_json(capsys, "train", "--model", "lenet-300-100", "--dataset", "synthetic", "--recipe", "fast",
                       "--epochs", "2", "--seed", "3", "--out", str(out))
    assert trained["epochs"] == 2
    c, h, w = dataset_info("synthetic").input_shape
    hidden = c * h * w
    assert trained["params"] == hidden * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert trained["accuracy"] > 50.0  # synthetic classes are separable; chance is 10 %
    assert (out / "model.safetensors").exists() and (out / "log.jsonl").exists()
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2

    evaluated = run_json(capsys, "eval", "--checkpoint", str(out), "--dataset", "synthetic")
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)
    assert evaluated["params"] == trained["params"]
    assert evaluated["macs"] == trained["macs"]


def test_same_seed_same_weights_different_seed_different_init(capsys, tmp_path):
    from prunekit.io import load_model

    def trained_weights(seed: int, name: str):
        run_json(capsys, "train", "--model", "lenet-300-100", "--dataset", "synthetic", "--recipe", "fast",
                 "--epochs", "1", "--seed", str(seed), "--out", str(tmp_path / name))
        return load_model(tmp_path / name)[0].state_dict()

    first, again, other = trained_weights(5, "a"), trained_weights(5, "b"), trained_weights(6, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["fc1.weight"], other["fc1.weight"])


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    err = run_error(capsys, "train", "--model", "resnet-56", "--dataset", "synthetic", "--out", str(tmp_path))
    assert "unknown model 'resnet-56'" in err and "resnet56" in err


def test_negative_epochs_is_a_clear_error(capsys, tmp_path):
    err = run_error(capsys, "train", "--model", "lenet-300-100", "--dataset", "synthetic", "--epochs", "-1",
                    "--out", str(tmp_path))
    assert "epochs" in err and "-1" in err


def test_missing_checkpoint_names_the_file(capsys, tmp_path):
    missing = tmp_path / "nope.safetensors"
    err = run_error(capsys, "eval", "--checkpoint", str(missing), "--dataset", "synthetic")
    assert "nope.safetensors" in err


def _argparse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as ei:
        main(list(argv))
    assert ei.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval", "--checkpoint", "unused"], ["train", "--model", "lenet-300-100"]])
def test_missing_or_incomplete_data_root_is_an_error_naming_it(capsys, tmp_path, command):
    """An explicit --data-root is used as given: never silently replaced by another copy of the data."""
    missing = tmp_path / "no-such-dir"
    err = _argparse_error(capsys, *command, "--dataset", "fashion-mnist", "--data-root", str(missing))
    assert str(missing) in err and "does not exist" in err and "prunekit data fetch fashion-mnist" in err
    assert not missing.exists()

    half = tmp_path / "half"
    (half / "fashion-mnist").mkdir(parents=True)
    (half / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    # Either order of the options: the check runs once both are known.
    err = _argparse_error(capsys, *command, "--data-root", str(half), "--dataset", "fashion-mnist")
    assert f"{half / 'fashion-mnist'}: missing train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz]" in err
    assert "train-images-idx3-ubyte[.gz]," not in err.split(str(half / "fashion-mnist") + ":")[1].splitlines()[0]


def test_data_fetch_installs_system_packages_only_with_apt(capsys, tmp_path, monkeypatch):
    import prunekit.data.roots as roots_mod

    calls = []
    monkeypatch.setattr(roots_mod, "_run", lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    monkeypatch.setattr(roots_mod, "_is_root", lambda: True)
    monkeypatch.setattr(roots_mod.shutil, "which", lambda _name: "/usr/bin/apt-get")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.setitem(roots_mod.LAYOUTS, "fashion-mnist", dataclasses.replace(
        roots_mod.LAYOUTS["fashion-mnist"], system=(str(tmp_path / "system"),), sources=()))
    assert run_error(capsys, "data", "fetch", "fashion-mnist")
    assert calls == []
    err = run_error(capsys, "data", "fetch", "fashion-mnist", "--apt")
    assert calls[0] == ["apt-get", "install", "-y", "dataset-fashion-mnist"]
    assert "apt-get install -y dataset-fashion-mnist` failed" in err


def test_console_script_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "prunekit", "datasets", "--json"], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = {row["name"] for row in json.loads(proc.stdout)["datasets"]}
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet", "synthetic"} <= names


@pytest.mark.realdata
def test_eval_official_lenet_checkpoint_reports_89_80(capsys, fashion_mnist_root, official_lenet_checkpoint):
    report = run_json(capsys, "eval", "--model", "lenet-300-100", "--checkpoint", str(official_lenet_checkpoint),
                      "--dataset", "fashion-mnist", "--data-root", str(fashion_mnist_root))
    assert report["accuracy"] == pytest.approx(89.80, abs=1e-9)
    assert report["params"] == 266_610
    assert report["macs"] == 784 * 300 + 300 * 100 + 100 * 10
    assert report["samples"] == 10_000


def test_prune_reports_contract_and_saves_a_reloadable_model(capsys, tmp_path):
    run_json(capsys, "train", "--model", "lenet-300-100", "--dataset", "synthetic", "--recipe", "fast",
             "--epochs", "1", "--out", str(tmp_path / "dense"))
    report = run_json(capsys, "prune", "--checkpoint", str(tmp_path / "dense"), "--dataset", "synthetic",
                      "--ratio", "0.5", "--latency-runs", "3", "--out", str(tmp_path / "small"))
    for key in ("accuracy", "params", "macs", "params_before", "macs_before", "latency_ms", "latency_ms_before"):
        assert key in report
    c, h, w = dataset_info("synthetic").input_shape
    assert report["params"] == c * h * w * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    assert report["macs"] < report["macs_before"] and report["pruned"] == 200
    evaluated = run_json(capsys, "eval", "--checkpoint", str(tmp_path / "small"), "--dataset", "synthetic")
    assert evaluated["accuracy"] == pytest.approx(report["accuracy"], abs=1e-9)
    assert evaluated["params"] == report["params"]


def test_prune_rejects_a_ratio_outside_unit_interval(capsys, tmp_path):
    run_json(capsys, "train", "--model", "lenet-300-100", "--dataset", "synthetic", "--recipe", "fast",
             "--epochs", "1", "--out", str(tmp_path / "dense"))
    err = run_error(capsys, "prune", "--checkpoint", str(tmp_path / "dense"), "--dataset", "synthetic",
                    "--ratio", "1.0")
    assert "ratio" in err and "1.0" in err


@pytest.mark.realdata
@pytest.mark.parametrize(("ratio", "published", "params"),
                         [(0.5, 88.40, 125_810), (0.6, 85.17, 99_450), (0.7, 71.26, 73_690), (0.8, 66.76, 48_530)])
def test_prune_official_lenet_reproduces_published_prune_column(capsys, ratio, published, params, fashion_mnist_root,
                                                                official_lenet_checkpoint):
    """Neuron Merging's 'prune' column (l1-norm on [w | b], round, no data) through the general engine."""
    report = run_json(capsys, "prune", "--model", "lenet-300-100", "--checkpoint", str(official_lenet_checkpoint),
                      "--dataset", "fashion-mnist", "--ratio", str(ratio), "--include-bias", "--latency-runs", "1")
    assert report["accuracy"] == pytest.approx(published, abs=0.05)
    assert report["params"] == params


@pytest.mark.realdata
@pytest.mark.parametrize(("ratio", "floor"), [(0.7, 87.5), (0.8, 85.5)])
def test_reconstruct_with_defaults_keeps_the_official_lenets_accuracy(capsys, ratio, floor, fashion_mnist_root,
                                                                      official_lenet_checkpoint):
    """Issue 11's floor for ``--method reconstruct`` with its defaults (1,000 unlabeled images, no fine-tuning);
    measured 87.83 / 86.04, against 87.37 / 85.45 when the logits' layer is fit by least squares."""
    report = run_json(capsys, "prune", "--model", "lenet-300-100", "--checkpoint", str(official_lenet_checkpoint),
                      "--dataset", "fashion-mnist", "--method", "reconstruct", "--ratio", str(ratio),
                      "--latency-runs", "1")
    assert report["accuracy"] >= floor
    (logits,) = [g for g in report["groups"] if g.get("output_loss") == "kl"]
    assert logits["module"] == "fc3" and logits["kl"] < logits["kl_least_squares"]
