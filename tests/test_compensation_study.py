"""``prunekit reproduce compensation-*``: the study's JSON contract on tiny settings (real data)."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit.cli import main
from prunekit.errors import ConfigError
from prunekit.io import save_model
from prunekit.models import create
from prunekit.reproduce import StudyOptions, get_study

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resnet20_study_rows_on_a_tiny_run(fashion_mnist_root, tmp_path, capsys):
    torch.manual_seed(0)
    save_model(tmp_path / "r20", create("resnet20", in_channels=1, input_size=28).eval())
    code = main(["reproduce", "compensation-resnet20-fmnist", "--checkpoint", str(tmp_path / "r20"), "--out",
                 str(tmp_path / "out"), "--data-root", str(fashion_mnist_root), "--json",
                 "--set", "ratios=[0.5]", "--set", 'methods=["prune","reconstruct"]', "--set", "sweep=[32]",
                 "--set", "finetune=0", "--set", "test_size=100", "--set", "calibration=32", "--set", "repeats=2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["study"] == "compensation-resnet20-fmnist" and 0 <= report["baseline_accuracy"] <= 100
    by_method = {r["method"]: r for r in report["rows"] if "seed" not in r}
    (again,) = [r for r in report["rows"] if "seed" in r]  # reconstruct on calibration subset 1
    assert again["method"] == "reconstruct" and again["seed"] == 1
    (summary,) = report["repeats"]
    pair = [by_method["reconstruct"]["accuracy"], again["accuracy"]]
    assert summary["n"] == 2 and summary["accuracies"] == pair and summary["mean"] == pytest.approx(sum(pair) / 2)
    assert set(by_method) == {"prune", "reconstruct"}
    for r in by_method.values():  # the preset prunes every block's conv1 to floor(c/2): 49.8 % of the MACs
        assert r["macs_reduction"] == pytest.approx(0.498, abs=0.002) and r["removed"] == 0.5
    assert by_method["reconstruct"]["calibration"] == 32 and by_method["reconstruct"]["method_seconds"] > 0
    assert [r["calibration"] for r in report["sweep"]] == [32]
    assert (tmp_path / "out" / "results.json").exists()


def test_vgg_study_needs_a_checkpoint_and_says_how_to_get_one(tmp_path):
    with pytest.raises(ConfigError, match="nm_train_convnets.py --models vgg16"):
        get_study("compensation-vgg16-fmnist")(StudyOptions(out=str(tmp_path / "never-written")))
    assert not (tmp_path / "never-written").exists()  # refused before anything is written
