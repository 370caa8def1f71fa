"""The published LeNet-300-100 / Fashion-MNIST table from the official checkpoint (real data; skipped
without it), least-squares compensation on 1,000 unlabeled training images, and the CLI contract."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit.merging import MergeOptions, merge
from prunekit.studies.merging import LENET_PAPER

# Every test needs the official checkpoint and Fashion-MNIST: both come from the conftest fixtures, which skip
# with a reason (how to get them) when either is absent.
pytestmark = [pytest.mark.realdata, pytest.mark.usefixtures("fashion_mnist_root", "official_lenet_checkpoint")]


@pytest.fixture(scope="module")
def setup(official_lenet_checkpoint):
    from prunekit.data import get_dataset, make_loader
    from prunekit.io import load_model

    torch.set_num_threads(1)
    model, _ = load_model(official_lenet_checkpoint, model_name="lenet-300-100")
    test = make_loader(get_dataset("fashion-mnist", "test"), 2000, shuffle=False)
    train = get_dataset("fashion-mnist", "train", augment=False)
    return model.eval(), test, train


def accuracy(model, loader) -> float:
    from prunekit.metrics import evaluate

    return evaluate(model, loader)["accuracy"]


@pytest.mark.parametrize("ratio", sorted(LENET_PAPER))
def test_published_l1_table_cells(setup, ratio):
    model, test, _ = setup
    prune_pub, merge_pub = LENET_PAPER[ratio]
    opts = MergeOptions(ratio=ratio, criterion="l1-norm", preset="lenet-300-100")
    pruned = merge(model, (1, 1, 28, 28), opts.replace(model_type="prune"))
    merged = merge(model, (1, 1, 28, 28), opts)
    assert accuracy(pruned.model, test) == pytest.approx(prune_pub, abs=0.05)
    assert accuracy(merged.model, test) == pytest.approx(merge_pub, abs=0.05)
    # the official code merges 49 of 200 pruned neurons at r = 0.5 and 75 of 320 at 0.8
    # (docs/neuron-merging.md, Results)
    if ratio in (0.5, 0.8):
        assert (merged.report["merged"], merged.report["channels_removed"]) == {0.5: (49, 200), 0.8: (75, 320)}[ratio]


@pytest.mark.parametrize("ratio, floor", [(0.7, 86.5), (0.8, 83.5)])
def test_lstsq_with_1000_unlabeled_images(setup, ratio, floor):
    from prunekit.merging import LstsqOptions, compensate

    model, test, train = setup
    opts = MergeOptions(ratio=ratio, preset="lenet-300-100")
    greedy = compensate(model, (1, 1, 28, 28), train, LstsqOptions(calibration=1000, select="greedy"), opts)
    assert accuracy(greedy.model, test) >= floor + 0.5
    same = compensate(model, (1, 1, 28, 28), train, LstsqOptions(calibration=1000), opts)  # l1 survivors
    assert accuracy(same.model, test) >= floor
    assert accuracy(same.model, test) >= LENET_PAPER[ratio][1] + 3.0  # well above the paper's merge


def test_cli_prune_merge_lstsq_json(capsys, official_lenet_checkpoint):
    from prunekit.cli import main

    reports = {}
    for method in ("prune", "merge", "lstsq"):
        code = main(["prune", "--model", "lenet-300-100", "--checkpoint", str(official_lenet_checkpoint), "--dataset",
                     "fashion-mnist", "--method", method, "--criterion", "l1-norm", "--ratio", "0.7",
                     "--threshold", "0.45", "--calibration", "1000", "--include-bias", "--latency-runs", "1", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        reports[method] = json.loads(out)
    for r in reports.values():
        assert {"accuracy", "params", "macs", "merged", "pruned"} <= set(r) and r["params"] == 73_690
    assert reports["prune"]["accuracy"] == pytest.approx(71.26, abs=0.05)
    assert reports["merge"]["accuracy"] == pytest.approx(82.75, abs=0.05)
    assert (reports["merge"]["merged"], reports["merge"]["pruned"]) == (64, 216)
    assert reports["lstsq"]["accuracy"] >= 86.5 and reports["lstsq"]["merged"] == 280


def test_reproduce_study_one_ratio(official_lenet_checkpoint):
    from prunekit.reproduce import StudyOptions, get_study

    report, table = get_study("nm-lenet300-fmnist")(StudyOptions(checkpoint=str(official_lenet_checkpoint),
                                                                 extra={"ratios": [0.7], "calibration": 200}))
    (row,) = report["rows"]
    assert report["baseline"] == pytest.approx(89.80, abs=0.05)
    assert (row["prune"], row["merge"]) == (pytest.approx(71.26, abs=0.05), pytest.approx(82.75, abs=0.05))
    assert row["lstsq"] > row["merge"] and "| l1-norm | 0.7 |" in table
