"""Feature-map preservation (prunekit.evidence.preservation): hand-computed values, exact zeros for ratio 0
and for an exact-duplicate Neuron Merging merge, the CLI (`prune --json` and `compare`), and the paper's
merge-vs-prune claim on the official LeNet-300-100 checkpoint (real data; skipped without it)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.evidence import feature_preservation, ware_terms
from prunekit.merging import MergeOptions, merge

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = ("output_relative_l2", "ware", "agreement", "kl")


def linear(weight, bias=None) -> nn.Sequential:
    """Sequential(Linear) with the given weight (out × in) and bias (default 0), float64."""
    w = torch.tensor(weight, dtype=torch.float64)
    layer = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.zeros(w.shape[0]) if bias is None else torch.tensor(bias))
    return nn.Sequential(layer)


def kl(p_logits, q_logits) -> float:
    """KL(softmax(p) ‖ softmax(q)) with the math module (independent of torch)."""
    zp, zq = sum(math.exp(v) for v in p_logits), sum(math.exp(v) for v in q_logits)
    return sum(math.exp(a) / zp * ((a - math.log(zp)) - (b - math.log(zq))) for a, b in zip(p_logits, q_logits))


def test_hand_computed_values():
    original, pruned = linear([[1, 0], [0, 1]]), linear([[1, 0], [0, 2]])
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)
    # logits: original = x = [[1, 2], [3, 2]], pruned = [[1, 4], [3, 4]]; differences [[0, 2], [0, 2]]
    p = feature_preservation(original, pruned, x, batch_size=1)
    assert p["samples"] == 2
    assert p["output_relative_l2"] == pytest.approx(math.sqrt(8 / 18), rel=1e-12)  # ‖(2, 2)‖ / ‖(1, 2, 3, 2)‖
    assert p["ware"] == pytest.approx((0 + 2 / 2 + 0 + 2 / 2) / 4, rel=1e-12)
    assert p["agreement"] == 50.0  # argmax 1 = 1, then 0 ≠ 1
    assert p["kl"] == pytest.approx((kl([1, 2], [1, 4]) + kl([3, 2], [3, 4])) / 2, rel=1e-10)
    assert p["layers"] == [{"name": "0", "relative_l2": pytest.approx(2 / 3, rel=1e-12)}]
    assert p["layers_skipped"] == 0


def test_ware_terms_conventions():
    y = torch.tensor([[0.0, 0.0, -2.0]])
    terms = ware_terms(y, torch.tensor([[0.0, 1.0, -1.0]]))
    assert terms[0, 0] == 0.0 and math.isinf(terms[0, 1]) and terms[0, 2] == 0.5  # 0/0 → 0, x/0 → inf


def test_inplace_ops_do_not_corrupt_the_stored_activations():
    """A ReLU(inplace) overwrites the Linear's output after its hook: the reference must be a copy."""
    def net(scale: float) -> nn.Sequential:
        m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True), nn.Linear(2, 2)).double()
        with torch.no_grad():
            m[0].weight.copy_(torch.eye(2, dtype=torch.float64) * scale)
            m[0].bias.zero_()
            m[2].weight.copy_(torch.eye(2, dtype=torch.float64))
            m[2].bias.zero_()
        return m

    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # pre-activations (1, -1) vs (2, -2)
    p = feature_preservation(net(1.0), net(2.0), x)
    layers = {row["name"]: row["relative_l2"] for row in p["layers"]}
    assert layers["0"] == pytest.approx(1.0)  # ‖(1, −1)‖ / ‖(1, −1)‖, before the ReLU zeroed the −1
    assert layers["1"] == pytest.approx(1.0) and layers["2"] == pytest.approx(1.0)  # (1, 0) vs (2, 0)


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()


def test_ratio_zero_is_exactly_zero():
    model = _mlp(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    for model_type in ("prune", "merge"):
        same = merge(model, x[:1], MergeOptions(ratio=0.0, model_type=model_type)).model
        p = feature_preservation(model, same, x, batch_size=10)
        assert p["output_relative_l2"] <= 1e-6 and p["ware"] <= 1e-6 and p["kl"] <= 1e-6
        assert p["agreement"] == 100.0 and p["layers_skipped"] == 0
        assert [r["name"] for r in p["layers"]] == ["0", "1", "2", "3", "4"]
        assert max(r["relative_l2"] for r in p["layers"]) <= 1e-6


def test_exact_duplicate_merge_is_exactly_zero_and_pruning_it_is_not():
    """Neuron 4 of layer 0 = 0.1 × neuron 0 ([w | b]): l1-norm removes it, Neuron Merging folds it back."""
    model = _mlp(1)
    with torch.no_grad():
        model[0].weight[4] = 0.1 * model[0].weight[0]
        model[0].bias[4] = 0.1 * model[0].bias[0]
    x = torch.randn(200, 6, dtype=torch.float64)
    opts = MergeOptions(ratio=0.0, overrides={"0": 0.2})  # one of layer 0's five neurons, nothing else
    merged = merge(model, x[:1], opts)
    assert merged.report["merged"] == 1 and merged.model[0].out_features == 4
    p = feature_preservation(model, merged.model, x)
    assert [r["name"] for r in p["layers"]] == ["2", "3", "4"] and p["layers_skipped"] == 2  # 0, 1 lost width
    assert max(r["relative_l2"] for r in p["layers"]) <= 1e-6
    assert p["output_relative_l2"] <= 1e-6 and p["ware"] <= 1e-6 and p["kl"] <= 1e-6 and p["agreement"] == 100.0

    pruned = merge(model, x[:1], opts.replace(model_type="prune")).model
    q = feature_preservation(model, pruned, x)
    assert q["output_relative_l2"] > 1e-3 and q["ware"] > 1e-3 and q["kl"] > 0
    assert min(r["relative_l2"] for r in q["layers"]) > 1e-3


def test_inputs_as_tensor_dataset_or_loader_agree_and_max_samples_is_exact():
    from prunekit.data import make_loader, make_synthetic
    from prunekit.data.base import ArrayDataset

    model, other = _mlp(2).float(), _mlp(3).float()
    images, labels = make_synthetic("test", num_classes=3, input_shape=(1, 2, 3), size=50, seed=0)
    data = ArrayDataset(images, labels, mean=(0.5,), std=(0.5,))
    inputs = data.get_batch(torch.arange(37))[0].flatten(1)
    model_flat, other_flat = nn.Sequential(nn.Flatten(), model), nn.Sequential(nn.Flatten(), other)
    a = feature_preservation(model_flat, other_flat, data, max_samples=37, batch_size=8)
    b = feature_preservation(model_flat, other_flat, make_loader(data, 16, shuffle=False), max_samples=37)
    c = feature_preservation(model, other, inputs, batch_size=37)
    assert a["samples"] == b["samples"] == c["samples"] == 37
    for k in METRICS:
        assert a[k] == pytest.approx(b[k], rel=1e-6) and a[k] == pytest.approx(c[k], rel=1e-6)


def test_models_are_restored_and_bad_input_is_rejected():
    model, other = _mlp(4), _mlp(5)
    model.train()
    feature_preservation(model, other, torch.randn(4, 6, dtype=torch.float64))
    assert model.training and not other.training
    with pytest.raises(ConfigError, match="max_samples"):
        feature_preservation(model, other, torch.randn(4, 6, dtype=torch.float64), max_samples=0)
    with pytest.raises(ConfigError, match="logits"):
        feature_preservation(model, nn.Linear(6, 4).double(), torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ConfigError, match="no inputs"):
        feature_preservation(model, other, torch.empty(0, 6, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ CLI


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    from prunekit.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prune_json_and_compare_end_to_end(capsys, tmp_path):
    from prunekit.io import save_model
    from prunekit.models import create

    torch.manual_seed(0)
    save_model(tmp_path / "dense", create("lenet-300-100", widths=(40, 20)))
    common = ("--dataset", "synthetic", "--latency-runs", "1")
    code, out, err = _run(capsys, "prune", "--checkpoint", str(tmp_path / "dense"), *common, "--method", "merge",
                          "--ratio", "0.5", "--threshold", "0", "--evidence-samples", "100",
                          "--out", str(tmp_path / "small"), "--json")
    assert code == 0, err
    report = json.loads(out)
    pres = report["preservation"]
    assert set(pres) == {"samples", *METRICS, "layers", "layers_skipped"} and pres["samples"] == 100
    assert [r["name"] for r in pres["layers"]] == ["flatten", "fc3"]  # fc1, relu1, fc2, relu2 are narrower
    assert pres["layers"][1]["relative_l2"] == pres["output_relative_l2"] > 0

    code, out, err = _run(capsys, "compare", str(tmp_path / "dense"), str(tmp_path / "small"), "--dataset",
                          "synthetic", "--samples", "100", "--json")
    assert code == 0, err
    cmp = json.loads(out)
    assert cmp["kind"] == "compare" and cmp["a"] == str(tmp_path / "dense") and cmp["b"] == str(tmp_path / "small")
    for k in ("samples", *METRICS):
        assert cmp[k] == pytest.approx(pres[k], rel=1e-9)  # the same 100 inputs, the same models
    assert 0 <= cmp["accuracy_a"] <= 100 and 0 <= cmp["accuracy_b"] <= 100

    code, out, _ = _run(capsys, "compare", str(tmp_path / "dense"), str(tmp_path / "dense"), "--dataset",
                        "synthetic", "--json")
    same = json.loads(out)
    assert same["samples"] == 512 and same["output_relative_l2"] == 0.0 and same["agreement"] == 100.0
    assert same["accuracy_a"] == same["accuracy_b"]

    code, out, err = _run(capsys, "prune", "--checkpoint", str(tmp_path / "dense"), *common, "--ratio", "0.5",
                          "--evidence-samples", "0", "--json")
    assert code == 0 and "preservation" not in json.loads(out)
    code, out, err = _run(capsys, "prune", "--checkpoint", str(tmp_path / "dense"), *common, "--ratio", "0.5",
                          "--evidence-samples", "50")  # human table of plain pruning
    assert code == 0, err
    assert "feature preservation on 50 inputs" in out and "fc3" in out

    code, out, err = _run(capsys, "compare", str(tmp_path / "dense"), str(tmp_path / "small"), "--dataset",
                          "synthetic", "--samples", "0")
    assert code == 2 and "--samples" in err
    code, out, err = _run(capsys, "compare", str(tmp_path / "dense"), str(tmp_path / "small"), "--dataset",
                          "synthetic", "--samples", "20")
    assert code == 0 and "output_relative_l2" in out and "fc3" in out


# -------------------------------------------------------------------------------------- real checkpoint


@pytest.mark.realdata
def test_merged_preserves_the_output_better_than_pruned_at_every_published_ratio(fashion_mnist_root,
                                                                                 official_lenet_checkpoint):
    """The paper's claim on the official checkpoint, first 2,000 test inputs, l1-norm ratios 0.5–0.8."""
    from prunekit.data import get_dataset
    from prunekit.io import load_model
    from prunekit.studies.merging import LENET_PAPER

    model, _ = load_model(official_lenet_checkpoint, model_name="lenet-300-100")
    test = get_dataset("fashion-mnist", "test", root=fashion_mnist_root)
    for ratio in sorted(LENET_PAPER):
        opts = MergeOptions(ratio=ratio, criterion="l1-norm", preset="lenet-300-100")
        res = {kind: feature_preservation(model, merge(model, (1, 1, 28, 28), opts.replace(model_type=kind)).model,
                                          test, max_samples=2000, batch_size=1000) for kind in ("prune", "merge")}
        p, m = res["prune"], res["merge"]
        assert m["output_relative_l2"] < p["output_relative_l2"], ratio
        assert m["agreement"] > p["agreement"], ratio
        assert m["kl"] < p["kl"], ratio
        if ratio in PINNED:  # measured once on these 2,000 inputs (regression check of the whole pipeline)
            for kind, (rel_l2, agreement) in PINNED[ratio].items():
                assert res[kind]["output_relative_l2"] == pytest.approx(rel_l2, rel=1e-4), (ratio, kind)
                assert res[kind]["agreement"] == pytest.approx(agreement, abs=1e-9), (ratio, kind)


#: ratio -> {kind: (output relative L2, agreement %)} on the first 2,000 Fashion-MNIST test inputs
PINNED = {0.5: {"prune": (0.324835, 94.90), "merge": (0.215565, 95.40)},
          0.8: {"prune": (0.805826, 71.90), "merge": (0.640353, 84.15)}}
