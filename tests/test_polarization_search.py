"""Algorithm 1 (λ bisection, then t steps) on synthetic FLOPs-reduction functions, recipes, the study."""
from __future__ import annotations

import math

import pytest
import torch

from prunekit.errors import ConfigError
from prunekit.polarization.search import search_lambda_t


def flops(lam: float, t: float) -> float:
    """Monotone in λ and t, like Fig. 3 of the paper: F = (1 − e^{−λ/1e-4})·(0.55 + 0.25·(t − 1))."""
    return (1 - math.exp(-lam / 1e-4)) * (0.55 + 0.25 * (t - 1.0))


def test_coarse_bisection_then_fine_t_steps_reach_the_target():
    seen = []
    res = search_lambda_t(flops, 0.5, delta=0.02, on_trial=seen.append)
    assert res.converged and abs(res.flops_reduction - 0.5) < 0.02
    assert [t.index for t in res.trials] == list(range(len(res.trials))) and seen == res.trials
    coarse = [t for t in res.trials if t.phase == "coarse"]
    assert coarse[0].lam == pytest.approx(1e-4) and coarse[0].t == 1.2  # (0 + 2e-4)/2 at t₀ = 1.2
    assert all(t.lam == coarse[-1].lam for t in res.trials if t.phase == "fine")
    assert res.to_dict()["trials"][0]["flops_reduction"] == pytest.approx(flops(1e-4, 1.2))


def test_fine_phase_moves_t_in_the_right_direction():
    def f(lam, t):  # λ alone saturates below the target band: only a larger t gets there
        return 0.48 * (1 - math.exp(-lam / 1e-4)) + 0.2 * (t - 1.2)

    res = search_lambda_t(f, 0.5, delta=0.015, max_trials=12)
    fine = [t for t in res.trials if t.phase == "fine"]
    assert fine and res.converged and res.t == pytest.approx(1.3)
    assert all((b.t - a.t) * (0.5 - a.flops_reduction) > 0 for a, b in zip(res.trials, res.trials[1:])
               if b.phase == "fine")


def test_bracket_expands_when_lambda_max_is_too_small():
    res = search_lambda_t(flops, 0.5, delta=0.05, lam_max=1e-5, max_trials=12)
    assert res.converged and res.lam > 1e-5


def test_stops_on_budget_and_on_a_t_cycle():
    res = search_lambda_t(lambda lam, t: 0.1, 0.5, max_trials=3)  # unreachable
    assert not res.converged and len(res.trials) == 3 and "max_trials" in res.reason
    # F jumps over the target band as t moves by 0.1: the t loop would cycle forever
    res = search_lambda_t(lambda lam, t: 0.46 if t < 1.25 else 0.58, 0.5, delta=0.03, max_trials=20)
    assert not res.converged and "cycles" in res.reason and len(res.trials) < 20
    with pytest.raises(ConfigError):
        search_lambda_t(flops, 1.5)


def test_trial_dicts_keep_extra_numbers():
    res = search_lambda_t(lambda lam, t: {"flops_reduction": 0.5, "accuracy_pruned": 91.0}, 0.5)
    assert res.converged and res.trials[0].to_dict()["accuracy_pruned"] == 91.0


def test_paper_recipes_and_schedules():
    import prunekit.polarization  # noqa: F401
    from prunekit.recipes import get_recipe

    r = get_recipe("polarization-cifar")
    assert [round(r.lr_at(e), 6) for e in (0, 1, 59, 60, 120, 160)] == [0.01, 0.1, 0.1, 0.02, 0.004, 0.0008]
    ft = get_recipe("polarization-cifar-finetune-resnet")
    assert [round(ft.lr_at(e), 6) for e in (0, 30, 80, 150)] == [1e-3, 5e-4, 2.5e-4, 1e-4]
    assert [round(get_recipe("polarization-cifar-finetune-vgg").lr_at(e), 6) for e in (0, 60, 150)] == \
        [5e-4, 2.5e-4, 1e-4]
    mb = get_recipe("polarization-imagenet-mobilenetv2")
    assert mb.lr_at(0) == pytest.approx(0.08) and mb.lr_at(4) == pytest.approx(0.4) and mb.lr_at(255) < 0.001
    assert get_recipe("polarization-imagenet-resnet50").lr_at(80) == pytest.approx(0.001)


def test_study_registry_and_pipeline_on_synthetic_data(tmp_path):
    from prunekit.reproduce import StudyOptions, list_studies
    from prunekit.studies.polarization import StudySpec, run_study

    names = set(list_studies())
    assert {"polarization-resnet20-fmnist", "polarization-resnet56-cifar10", "polarization-vgg16-cifar10",
            "polarization-resnet56-cifar100", "polarization-vgg16-cifar100", "polarization-resnet50-imagenet",
            "polarization-mobilenetv2-imagenet"} <= names
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = StudySpec(model="resnet20", dataset="synthetic", lam=0.02, t=1.2, baseline_recipe="fast",
                         sparse_recipe="fast", finetune_recipe="fast", model_config={"widths": [4, 4, 8]},
                         dataset_options={"size": 192, "input_shape": [1, 12, 12], "num_classes": 4},
                         slimming_lam=0.02, compare_l1=True)
        opts = StudyOptions(epochs=1, finetune_epochs=1, out=str(tmp_path), progress=False, extra={"lam": 0.05})
        rep, table = run_study(spec, opts, title="tiny")
        again, _ = run_study(spec, opts, title="tiny")  # every stage is reused from tmp_path
    finally:
        torch.set_num_threads(n)
    for key in ("accuracy_baseline", "accuracy_regularized", "accuracy_pruned", "accuracy_finetuned",
                "macs_reduction"):
        assert key in rep and again[key] == rep[key], key
    assert rep["lam"] == 0.05 and len(rep["macs_reduction_per_epoch"]) == 1
    assert abs(rep["slimming"]["macs_reduction"] - rep["macs_reduction"]) < 0.05 or rep["macs_reduction"] < 0.05
    assert "| polarization |" in table and (tmp_path / "factors.json").exists()
    with pytest.raises(ConfigError, match="unknown study option"):
        run_study(spec, StudyOptions(out=str(tmp_path), extra={"lamda": 1}), title="tiny")


def test_cli_search_reports_every_trial(tmp_path, capsys):
    import json

    from prunekit.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["search", "--method", "polarization", "--flops-target", "0.5", "--model", "resnet20",
                   "--model-config", "widths=[2,2,4]", "--dataset", "synthetic", "--recipe", "fast", "--epochs", "1",
                   "--batch-size", "256", "--lam-max", "0.04", "--max-trials", "1", "--out", str(tmp_path), "--json"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["trials"]) == 1 and rep["target"] == 0.5 and rep["reason"]
    first = rep["trials"][0]
    assert first["lam"] == pytest.approx(0.02) and first["t"] == 1.2 and first["phase"] == "coarse"
    for key in ("flops_reduction", "accuracy_regularized", "accuracy_pruned", "macs_reduction_per_epoch"):
        assert key in first, key
    assert (tmp_path / "lam0.02_t1.2" / "model.json").exists()


def test_paper_study_specs_are_consistent():
    from prunekit.data import dataset_info
    from prunekit.models import create
    from prunekit.polarization import PRESETS, add_gates, select_factors
    from prunekit.recipes import get_recipe
    from prunekit.studies.polarization import PAPER_STUDIES
    from prunekit.studies.polarization import paper_studies as _paper_studies

    specs = _paper_studies()
    assert set(specs) == set(PAPER_STUDIES)
    for name, spec in specs.items():
        for r in (spec.baseline_recipe, spec.sparse_recipe, spec.finetune_recipe):
            get_recipe(r)
        info = dataset_info(spec.dataset)
        model = create(spec.model, num_classes=info.num_classes)
        if spec.gates:
            add_gates(model)
        assert spec.preset in PRESETS and select_factors(model, spec.preset).numel(model) > 0, name
        assert spec.paper["macs_reduction"] > 0
