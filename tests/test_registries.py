"""Every registry loads its built-in entries itself: each public lookup works in a fresh interpreter.

The fresh-interpreter checks run one subprocess per lazily loaded registry; each first proves that the
modules holding the built-ins are not imported yet, then makes the registry's first lookup a
``get``/``create`` and checks real values. The registries whose entries live next to them share one
subprocess. The loader's own rules (load once, on a miss or a listing; optional modules; errors;
re-entrancy) are checked in-process on throwaway modules.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prunekit.errors import UnknownNameError
from prunekit.registry import Registry

SRC = Path(__file__).resolve().parents[1] / "src" / "prunekit"

STUDIES = {
    "nm-lenet300-fmnist", "nm-vgg16-cifar10", "nm-vgg16-cifar100", "nm-resnet56-cifar10", "nm-wrn40-4-cifar10",
    "polarization-resnet20-fmnist", "polarization-resnet56-cifar10", "polarization-resnet56-cifar100",
    "polarization-vgg16-cifar10", "polarization-vgg16-cifar100", "polarization-resnet50-imagenet",
    "polarization-mobilenetv2-imagenet", "grda-lenet300-fmnist", "grda-resnet20-fmnist", "grda-resnet50-imagenet",
    "grda-vgg16-cifar10", "grda-wrn28-10-cifar100", "compensation-resnet20-fmnist", "compensation-vgg16-fmnist",
    "vit-fmnist", "llama-shakespeare",
}

#: registry → (the public lookup functions it covers, a script run in a fresh interpreter)
FRESH: dict[str, tuple[set[str], str]] = {
    "methods": ({"get_method", "list_methods"}, """
        from prunekit.methods import MethodResult, get_method, list_methods
        assert "prunekit.merging.method" not in sys.modules and "prunekit.polarization" not in sys.modules
        merge = get_method("merge")
        assert callable(merge) and merge.__module__ == "prunekit.merging.method"
        pol = get_method("polarization")
        assert callable(pol) and pol.__module__.startswith("prunekit.polarization.")
        assert {"prune", "merge", "lstsq", "polarization"} <= set(list_methods())
        import torch
        from prunekit.methods import PruneOptions
        from prunekit.models import create
        res = get_method("merge")(create("lenet-300-100"), (1, 1, 28, 28), PruneOptions(ratio=0.5))
        assert isinstance(res, MethodResult) and res.model.fc1.out_features == 150
    """),
    "studies": ({"get_study", "list_studies"}, f"""
        from prunekit.reproduce import StudyOptions, get_study, list_studies
        assert not [m for m in sys.modules if m.startswith("prunekit.studies")]
        study = get_study("nm-lenet300-fmnist")
        assert callable(study) and study.__module__ == "prunekit.studies.merging"
        assert sorted(list_studies()) == {sorted(STUDIES)!r}
        assert get_study("grda-lenet300-fmnist").__module__ == "prunekit.studies.grda"
        assert get_study("polarization-resnet56-cifar10").__module__ == "prunekit.studies.polarization"
        assert get_study("compensation-resnet20-fmnist").__module__ == "prunekit.studies.compensation"
        assert get_study("llama-shakespeare").__module__ == "prunekit.studies.transformers"
    """),
    "regularizers": ({"create_regularizer", "list_regularizers"}, """
        import torch
        from prunekit.models import create
        from prunekit.regularizers import Regularizer, create_regularizer, list_regularizers
        assert "prunekit.polarization" not in sys.modules
        model = create("resnet20", widths=[4, 4, 8])
        reg = create_regularizer("polarization", model, lam=1e-4, t=1.2, bn_init=0.5)
        assert isinstance(reg, Regularizer) and type(reg).__name__ == "PolarizationRegularizer"
        pen = reg.penalty(model)
        assert pen.ndim == 0 and torch.isfinite(pen) and pen.requires_grad
        assert {"none", "polarization", "slimming"} <= set(list_regularizers())
    """),
    "recipes": ({"get_recipe", "list_recipes"}, """
        from prunekit.recipes import TrainRecipe, default_recipe_for, get_recipe, list_recipes
        assert "prunekit.polarization" not in sys.modules
        r = get_recipe("polarization-fmnist")
        assert isinstance(r, TrainRecipe) and r.name == "polarization-fmnist" and r.schedule == "cosine"
        assert r.epochs == 5 and r.optimizer == "sgd" and r.momentum == 0.9
        assert {"lenet", "cifar", "imagenet", "fast", "grda", "grda-lenet", "grda-resnet20-fmnist",
                "grda-resnet50-imagenet", "polarization-cifar", "polarization-fmnist-finetune",
                "polarization-imagenet-mobilenetv2"} <= set(list_recipes())
        assert default_recipe_for("resnet56").name == "cifar"
        assert get_recipe("polarization-cifar").lr_at(0) == 0.1 * 0.1  # its warm-up schedule is there too
    """),
    "schedules": ({"create_schedule", "list_schedules"}, """
        import torch
        from prunekit.optim import EpochLR, create_schedule, list_schedules
        assert "prunekit.polarization" not in sys.modules
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        sched = create_schedule("warmup-multistep", opt, epochs=10, milestones=[3], gamma=0.2)
        assert isinstance(sched, EpochLR) and opt.param_groups[0]["lr"] == 0.1  # epoch 0: warm-up at ×0.1
        assert {"step", "multistep", "cosine", "constant", "linear-hold", "warmup-multistep", "cosine-warmup",
                "polarization-ft-resnet", "polarization-ft-vgg"} <= set(list_schedules())
        from prunekit.recipes import TrainRecipe
        assert TrainRecipe(schedule="polarization-ft-vgg", milestones=(2,)).schedule == "polarization-ft-vgg"
    """),
    # registries whose entries are defined next to them (or imported with them): one interpreter for all
    "self-registered": ({"create_optimizer", "list_optimizers", "get_criterion", "list_criteria", "create", "list_models", "get_dataset", "list_datasets", "get_preset", "list_presets"}, """
        import torch
        from prunekit.optim import GRDA, create_optimizer, list_optimizers
        p = torch.nn.Parameter(torch.tensor([0.5, -0.0003, 0.2]))  # τ after one step: 0.005·0.1^1.05 ≈ 4.5e-4
        opt = create_optimizer("grda", [p], lr=0.1, c=0.005, mu=0.55)
        assert isinstance(opt, GRDA) and opt.defaults["c"] == 0.005 and opt.defaults["mu"] == 0.55
        p.grad = torch.zeros(3)
        opt.step()
        assert p[1].item() == 0.0 and p[0].item() > 0.49  # soft-thresholded: the small entry is exactly 0
        assert {"sgd", "adam", "adamw", "grda"} <= set(list_optimizers())

        from prunekit.engine import get_criterion, list_criteria
        assert callable(get_criterion("l2-GM"))
        assert {"l1-norm", "l2-norm", "l2-GM", "bn-scale", "random"} <= set(list_criteria())

        import torch
        from prunekit.models import create, list_models
        model = create("lenet-300-100")
        assert isinstance(model, torch.nn.Module) and sum(p.numel() for p in model.parameters()) == 266_610
        assert model.prunekit_arch["name"] == "lenet-300-100"
        assert {"lenet-300-100", "lenet-5", "vgg16", "resnet20", "resnet56", "resnet50", "mobilenetv2",
                "wrn-40-4", "wrn-28-10"} <= set(list_models())

        from prunekit.data import dataset_info, get_dataset, list_datasets
        ds = get_dataset("synthetic", "test", size=8)
        x, y = ds[0]
        assert len(ds) == 8 and tuple(x.shape) == (1, 28, 28) and 0 <= int(y) < 10
        assert dataset_info("fashion-mnist").num_classes == 10 and dataset_info("cifar100").num_classes == 100
        assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet", "synthetic"} <= set(list_datasets())

        from prunekit.merging import get_preset, list_presets
        preset = get_preset("lenet-300-100")
        assert callable(preset.widths) and preset.threshold == 0.45 and preset.lam == 0.85
        assert {"lenet-300-100", "vgg16-cifar10", "vgg16-cifar100", "resnet56", "wrn-40-4"} <= set(list_presets())
    """),
}


def _run_fresh(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (with ``sys`` imported) in a new interpreter; it prints ``ok`` when it reaches its end."""
    script = "import sys\n" + textwrap.dedent(code) + "\nprint('ok')\n"
    return subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("registry", sorted(FRESH))
def test_public_lookups_work_in_a_fresh_interpreter(registry):
    proc = _run_fresh(FRESH[registry][1])
    # the script's own asserts (modules not yet imported, real values) all passed and it ran to the end
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok"), proc.stdout[-3000:]


def test_every_public_lookup_function_is_checked():
    """Every module-level ``get_*`` / ``list_*`` / ``create_*`` (and ``create``) of the library is covered above."""
    found = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] in ("studies", "cli"):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and (node.name == "create" or
                                                      node.name.startswith(("get_", "list_", "create_"))):
                found[node.name] = str(rel)
    covered = set().union(*(names for names, _ in FRESH.values()))
    missing = {name: where for name, where in found.items() if name not in covered}
    assert not missing, f"public lookups without a fresh-interpreter check: {missing}"
    assert covered <= set(found), f"checked functions that no longer exist: {covered - set(found)}"


# ----------------------------------------------------------------------------------------------
# the loader's rules, on throwaway modules


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """Write ``{name: source}`` as importable top-level modules (removed from sys.modules afterwards)."""
    written: list[str] = []

    def write(files: dict[str, str]) -> None:
        for name, text in files.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
            written.append(name)

    monkeypatch.syspath_prepend(str(tmp_path))
    yield write
    for name in written:
        sys.modules.pop(name, None)


def _holder(name: str, builtins: tuple[str, ...]) -> str:
    return f"from prunekit.registry import Registry\nREG = Registry('thing', builtins={builtins!r})\n"


@pytest.mark.parametrize("first", ["get", "contains", "names", "iter"])
def test_builtins_load_once_on_the_first_lookup(modules, first):
    mod = f"pk_reg_builtin_{first}"
    modules({f"{mod}_holder": _holder(mod, (f"{mod}_a", f"{mod}_b")),
             f"{mod}_a": f"from {mod}_holder import REG\nREG.register('a', 1)\nLOADS = 1\n",
             f"{mod}_b": f"from {mod}_holder import REG\nREG.register('b', 2)\n"})
    reg = __import__(f"{mod}_holder").REG
    assert f"{mod}_a" not in sys.modules  # nothing at construction
    reg.register("own", 0)
    assert reg.get("own") == 0 and f"{mod}_a" not in sys.modules  # a hit needs no import
    result = {"get": lambda: reg.get("b"), "contains": lambda: "a" in reg, "names": reg.names,
              "iter": lambda: list(reg)}[first]()
    assert result in (2, True, ["a", "b", "own"])
    assert reg.names() == ["a", "b", "own"] and sys.modules[f"{mod}_a"].LOADS == 1
    with pytest.raises(UnknownNameError, match="unknown thing 'c'.*Known: a, b, own"):
        reg.get("c")


def test_a_missing_optional_module_is_skipped_but_a_broken_one_raises(modules):
    modules({"pk_reg_opt_holder": _holder("pk_reg_opt", ("pk_reg_opt_absent", "pk_reg_opt_absent_pkg.sub",
                                                         "pk_reg_opt_ok")),
             "pk_reg_opt_ok": "from pk_reg_opt_holder import REG\nREG.register('ok', 1)\n"})
    reg = __import__("pk_reg_opt_holder").REG
    assert reg.get("ok") == 1 and reg.names() == ["ok"]

    modules({"pk_reg_bad_holder": _holder("pk_reg_bad", ("pk_reg_bad_mod",)),
             "pk_reg_bad_mod": "import pk_reg_bad_dependency_that_is_not_installed\n"})
    bad = __import__("pk_reg_bad_holder").REG
    with pytest.raises(ModuleNotFoundError, match="pk_reg_bad_dependency_that_is_not_installed"):
        bad.get("x")

    modules({"pk_reg_err_holder": _holder("pk_reg_err", ("pk_reg_err_mod",)),
             "pk_reg_err_mod": "raise ImportError('cannot import name X')\n"})
    err = __import__("pk_reg_err_holder").REG
    with pytest.raises(ImportError, match="cannot import name X"):
        err.names()
    # fixed on disk: the next lookup tries again and succeeds
    modules({"pk_reg_err_mod": "from pk_reg_err_holder import REG\nREG.register('fixed', 3)\n"})
    assert err.get("fixed") == 3


def test_a_builtin_module_may_look_up_its_registry_while_loading(modules):
    modules({"pk_reg_re_holder": _holder("pk_reg_re", ("pk_reg_re_a", "pk_reg_re_b")),
             "pk_reg_re_a": """
                 from pk_reg_re_holder import REG
                 if "a" not in REG:                     # the usual guard: must not recurse into the loader
                     REG.register("a", 1)
                 SEEN = (REG.get("a"), REG.names())     # sees what is registered so far
             """,
             "pk_reg_re_b": "from pk_reg_re_holder import REG\nREG.register('b', REG.get('a') + 1)\n"})
    reg = __import__("pk_reg_re_holder").REG
    assert reg.get("b") == 2
    assert sys.modules["pk_reg_re_a"].SEEN == (1, ["a"])
    assert reg.names() == ["a", "b"]


def test_every_library_registry_declares_where_its_builtins_are():
    from prunekit.methods import METHODS
    from prunekit.models.registry import MODELS
    from prunekit.optim import OPTIMIZERS, SCHEDULES
    from prunekit.recipes import RECIPES
    from prunekit.regularizers import REGULARIZERS
    from prunekit.reproduce import STUDIES

    assert METHODS.builtins == ("prunekit.merging.method", "prunekit.polarization", "prunekit.baselines")
    assert STUDIES.builtins == ("prunekit.studies.merging", "prunekit.studies.polarization", "prunekit.studies.grda",
                                "prunekit.studies.compensation", "prunekit.studies.transformers")
    assert REGULARIZERS.builtins == ("prunekit.polarization",)
    assert RECIPES.builtins == ("prunekit.polarization.recipes",)
    assert "prunekit.polarization.recipes" in SCHEDULES.builtins and "prunekit.optim.grda" in SCHEDULES.builtins
    assert OPTIMIZERS.builtins == ("prunekit.optim.grda",) and MODELS.builtins == ("prunekit.models",)
    assert all(isinstance(r, Registry) for r in (METHODS, MODELS, OPTIMIZERS, SCHEDULES, RECIPES, REGULARIZERS,
                                                 STUDIES))
