"""Trainer, recipes, optimizer/schedule registries and the regularizer/callback hooks.

Everything trains a tiny MLP on the synthetic dataset (8×8, 4 classes): each run takes well under a
second on CPU, so the assertions can be exact (bit-identical resume) rather than statistical.
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from prunekit.data import get_dataset
from prunekit.errors import CheckpointError, ConfigError, UnknownNameError
from prunekit.io import load_state, save_state
from prunekit.metrics import count_params
from prunekit.optim import create_optimizer, create_schedule, list_optimizers, list_schedules
from prunekit.recipes import TrainRecipe, default_recipe_for, get_recipe, list_recipes
from prunekit.regularizers import NoRegularizer, Regularizer
from prunekit.train import NonFiniteLossError, Trainer, train

SHAPE = (1, 8, 8)
CLASSES = 4
RECIPE = TrainRecipe(epochs=3, batch_size=32, test_batch_size=128, lr=0.05, momentum=0.9, weight_decay=1e-4,
                     name="test")
LOG_FIELDS = {"epoch", "train_loss", "train_accuracy", "test_loss", "accuracy", "lr", "time_s"}


@pytest.fixture(scope="module")
def data():
    kw = {"num_classes": CLASSES, "input_shape": SHAPE, "seed": 0}
    return get_dataset("synthetic", "train", size=512, **kw), get_dataset("synthetic", "test", size=256, **kw)


def mlp(seed: int = 0, hidden: int = 32, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, CLASSES))


def fit(model, data, out_dir=None, recipe=RECIPE, *, resume=False, **kw):
    kw.setdefault("progress", False)
    return train(model, data[0], data[1], recipe, out_dir=out_dir, seed=kw.pop("seed", 0), resume=resume, **kw)


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


# ------------------------------------------------------------------ training, logging, outputs


def test_training_learns_logs_and_saves(data, tmp_path):
    model = mlp()
    result = fit(model, data, tmp_path, metadata={"dataset": "synthetic"})

    assert result.accuracy > 80.0  # 4 separable classes; chance is 25 %
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for rec in log:
        assert LOG_FIELDS <= rec.keys()
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["accuracy"] == result.accuracy and result.history == log
    assert result.params == count_params(model) == 64 * 32 + 32 + 32 * CLASSES + CLASSES
    assert result.macs == 64 * 32 + 32 * CLASSES

    assert result.checkpoint_path == tmp_path / "model.safetensors"
    saved = load_file(result.checkpoint_path)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    meta = json.loads((tmp_path / "model.json").read_text())["metadata"]
    assert meta["accuracy"] == result.accuracy and meta["epochs"] == 3 and meta["seed"] == 0
    assert meta["dataset"] == "synthetic" and meta["recipe"]["lr"] == RECIPE.lr and meta["macs"] == result.macs
    assert load_state(tmp_path / "last")["epoch"] == 3


def test_same_seed_same_weights_other_seed_differs(data):
    a = fit(mlp(), data, recipe=RECIPE.replace(epochs=1), seed=1).model
    b = fit(mlp(), data, recipe=RECIPE.replace(epochs=1), seed=1).model
    c = fit(mlp(), data, recipe=RECIPE.replace(epochs=1), seed=2).model
    assert_same_weights(a, b)
    assert not torch.equal(a[1].weight, c[1].weight)


def test_without_out_dir_writes_nothing(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = fit(mlp(), data, recipe=RECIPE.replace(epochs=1))
    assert result.checkpoint_path is None and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="out_dir"):
        fit(mlp(), data, recipe=RECIPE.replace(epochs=1), resume=True)


# ------------------------------------------------------------------ resume


class Killed(Exception):
    pass


class KillAfter:
    """Simulates a crash at the end of epoch index ``epoch`` (before its checkpoint is written)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, record):
        if epoch == self.epoch:
            raise Killed(f"killed in epoch {epoch}")


class CountingClamp(Regularizer):
    """L1 penalty on the first layer, clamp to [-bound, bound]; counts calls (resumable state)."""

    def __init__(self, strength=1e-3, bound=0.3):
        self.strength, self.bound = strength, bound
        self.steps, self.epochs = 0, []

    def penalty(self, model):
        return self.strength * model[1].weight.abs().sum()

    def after_step(self, model):
        model[1].weight.clamp_(-self.bound, self.bound)
        self.steps += 1

    def on_epoch_start(self, epoch):
        self.epochs.append(epoch)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


@pytest.mark.parametrize("how", ["kill", "extend"])
def test_resume_is_bit_identical_to_uninterrupted(data, tmp_path, how):
    recipe = RECIPE.replace(epochs=4, schedule="step", step_size=2, gamma=0.5)
    full_reg = CountingClamp()
    full = fit(mlp(dropout=0.3), data, tmp_path / "full", recipe, regularizers=[full_reg])

    out = tmp_path / "resumed"
    reg = CountingClamp()
    if how == "kill":  # crash at the end of the 2nd epoch; its checkpoint was not written
        with pytest.raises(Killed):
            fit(mlp(dropout=0.3), data, out, recipe, regularizers=[reg], callbacks=[KillAfter(1)])
        assert len(read_log(out)) == 1 and load_state(out / "last")["epoch"] == 1
    else:  # a finished 2-epoch run extended to 4 epochs (the step schedule does not depend on epochs)
        fit(mlp(dropout=0.3), data, out, recipe.replace(epochs=2), regularizers=[reg])
    reg = CountingClamp()
    resumed = fit(mlp(seed=123, dropout=0.3), data, out, recipe, resume=True, regularizers=[reg])

    assert_same_weights(full.model, resumed.model)
    assert reg.steps == full_reg.steps == 4 * 16
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2, 3]
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in full.history]
    assert resumed.accuracy == full.accuracy


def test_resume_of_a_finished_run_trains_nothing(data, tmp_path):
    first = fit(mlp(), data, tmp_path, RECIPE.replace(epochs=1))
    again = fit(mlp(seed=5), data, tmp_path, RECIPE.replace(epochs=1), resume=True)
    assert_same_weights(first.model, again.model)
    assert again.accuracy == first.accuracy and len(read_log(tmp_path)) == 1


def test_fresh_run_discards_a_stale_checkpoint(data, tmp_path):
    fit(mlp(), data, tmp_path, RECIPE.replace(epochs=1))
    with pytest.raises(Killed):
        fit(mlp(), data, tmp_path, RECIPE.replace(lr=0.01), callbacks=[KillAfter(0)])
    assert not (tmp_path / "last.json").exists() and read_log(tmp_path) == []


def test_resume_with_mismatched_model_recipe_or_seed_is_refused(data, tmp_path):
    fit(mlp(), data, tmp_path, RECIPE.replace(epochs=1))
    recipe = RECIPE.replace(epochs=2)
    with pytest.raises(CheckpointError, match=r"different model.*1\.weight.*\(32, 64\).*\(16, 64\)"):
        fit(mlp(hidden=16), data, tmp_path, recipe, resume=True)
    with pytest.raises(ConfigError, match="lr: checkpoint 0.05 vs now 0.1"):
        fit(mlp(), data, tmp_path, recipe.replace(lr=0.1), resume=True)
    with pytest.raises(ConfigError, match="seed=0.*seed=7"):
        fit(mlp(), data, tmp_path, recipe, resume=True, seed=7)
    with pytest.raises(ConfigError, match="regularizer"):
        fit(mlp(), data, tmp_path, recipe, resume=True, regularizers=[NoRegularizer()])
    # cosine is shaped by the run length: epoch 1 had lr factor 0.5 of a 2-epoch run, 0.75 of a 3-epoch one
    fit(mlp(), data, tmp_path / "cos", RECIPE.replace(epochs=2, schedule="cosine"))
    with pytest.raises(ConfigError, match="epochs: checkpoint 2 vs now 3"):
        fit(mlp(), data, tmp_path / "cos", RECIPE.replace(epochs=3, schedule="cosine"), resume=True)


# ------------------------------------------------------------------ recipes


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", -1), ("batch_size", 0), ("test_batch_size", -8), ("lr", 0.0), ("lr", -0.1),
    ("momentum", 1.5), ("weight_decay", -1e-4), ("gamma", 0.0), ("step_size", 0), ("milestones", (150, 100)),
    ("schedule", "exponential"), ("optimizer", "lbfgs"), ("nesterov", "yes"), ("epochs", 2.5),
])
def test_recipe_rejects_invalid_values_naming_field_and_value(field, value):
    with pytest.raises(ConfigError) as err:
        get_recipe("lenet").replace(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_recipe_rejects_unknown_fields_and_misplaced_optimizer_options():
    with pytest.raises(ConfigError, match=r"unknown field learning_rate=0\.1"):
        get_recipe("cifar").replace(learning_rate=0.1)
    with pytest.raises(ConfigError, match=r"optimizer_kwargs\['mu'\]=0\.5.*'sgd'"):
        get_recipe("cifar").replace(optimizer_kwargs={"mu": 0.5})
    with pytest.raises(ConfigError, match="set 'lr' as a recipe field"):
        get_recipe("cifar").replace(optimizer_kwargs={"lr": 0.5})
    with pytest.raises(ConfigError, match="momentum=0.9 but optimizer 'adam' has no 'momentum'"):
        get_recipe("cifar").replace(optimizer="adam")
    with pytest.raises(ConfigError, match="nesterov"):
        TrainRecipe(nesterov=True, momentum=0.0)
    with pytest.raises(UnknownNameError, match="unknown recipe 'lenet5'.*Known: cifar, fast"):
        get_recipe("lenet5")


def test_named_recipes_match_the_papers():
    lenet, cifar = get_recipe("lenet"), get_recipe("cifar")
    assert {"lenet", "cifar", "fast"} <= set(list_recipes())
    assert (lenet.epochs, lenet.batch_size, lenet.test_batch_size, lenet.optimizer, lenet.momentum,
            lenet.weight_decay) == (60, 128, 256, "sgd", 0.9, 1e-4)
    assert (cifar.epochs, cifar.batch_size, cifar.momentum, cifar.weight_decay) == (200, 128, 0.9, 5e-4)
    assert get_recipe("fast").epochs <= 5
    assert default_recipe_for("lenet-300-100") is lenet and default_recipe_for("resnet56") is cifar
    r = cifar.replace(epochs=3, milestones=[1, 2])
    assert r.milestones == (1, 2) and r.name == "cifar" and cifar.epochs == 200
    assert TrainRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert adam_recipe().optimizer_config() == {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.99)}


def adam_recipe():
    return TrainRecipe(optimizer="adam", lr=1e-3, optimizer_kwargs={"betas": (0.9, 0.99)})


# ------------------------------------------------------------------ optimizers and schedules


def test_optimizer_registry():
    w = [nn.Parameter(torch.zeros(3))]
    sgd = create_optimizer("sgd", w, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = sgd.param_groups[0]
    assert isinstance(sgd, torch.optim.SGD) and (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == \
        (0.1, 0.9, True, 5e-4)
    assert isinstance(create_optimizer("adam", w, lr=1e-3), torch.optim.Adam)
    assert isinstance(create_optimizer("adamw", w, lr=1e-3, weight_decay=0.05), torch.optim.AdamW)
    assert {"sgd", "adam", "adamw"} <= set(list_optimizers())
    with pytest.raises(UnknownNameError, match="unknown optimizer 'sdg'.*Did you mean 'sgd'.*adamw"):
        create_optimizer("sdg", w, lr=0.1)
    with pytest.raises(ConfigError, match=r"'adam' does not accept momentum=0\.9"):
        create_optimizer("adam", w, lr=0.1, momentum=0.9)
    with pytest.raises(ConfigError, match="nesterov=True needs momentum"):
        create_optimizer("sgd", w, lr=0.1, nesterov=True)
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        create_optimizer("sgd", w, lr=-1.0)
    with pytest.raises(ConfigError, match="optimizer 'adam'"):  # torch's own range check, renamed
        create_optimizer("adam", w, lr=0.1, betas=(1.5, 0.9))


class DualAveraging(torch.optim.Optimizer):
    """Stand-in with gRDA's constructor (lr, c, mu) and its per-tensor resumable state (accumulator, step)."""

    def __init__(self, params, lr=0.01, c=0.0, mu=0.7):
        super().__init__(params, {"lr": lr, "c": c, "mu": mu})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["acc"], st["k"] = p.detach().clone(), 0
                st["k"] += 1
                st["acc"].add_(p.grad, alpha=-group["lr"])
                tau = group["c"] * group["lr"] ** (group["mu"] + 0.5) * st["k"] ** group["mu"]
                p.copy_(st["acc"].sign() * (st["acc"].abs() - tau).clamp_min(0))


@pytest.fixture
def dual_averaging():
    from prunekit.optim import OPTIMIZERS, register_optimizer

    register_optimizer("test-dual-averaging", DualAveraging)
    yield "test-dual-averaging"
    OPTIMIZERS._items.pop("test-dual-averaging")


def test_a_registered_optimizer_plugs_into_recipes_and_resumes(data, tmp_path, dual_averaging):
    recipe = RECIPE.replace(optimizer=dual_averaging, momentum=0.0, weight_decay=0.0, epochs=3,
                            optimizer_kwargs={"c": 0.05, "mu": 0.6})
    assert recipe.optimizer_config() == {"lr": 0.05, "c": 0.05, "mu": 0.6}
    with pytest.raises(ConfigError, match="momentum=0.9 but optimizer 'test-dual-averaging' has no 'momentum'"):
        recipe.replace(momentum=0.9)
    with pytest.raises(ConfigError, match=r"optimizer_kwargs\['nu'\]=1 is not accepted.*c, lr, mu"):
        recipe.replace(optimizer_kwargs={"nu": 1})
    full = fit(mlp(), data, tmp_path / "full", recipe)
    assert (full.model[1].weight == 0).any() and full.accuracy > 50.0
    with pytest.raises(Killed):
        fit(mlp(), data, tmp_path / "resumed", recipe, callbacks=[KillAfter(1)])
    assert_same_weights(full.model, fit(mlp(), data, tmp_path / "resumed", recipe, resume=True).model)


def lr_sequence(recipe: TrainRecipe) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    sched = recipe.build_schedule(opt)
    lrs = []
    for _ in range(recipe.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedules_give_the_papers_lr_sequences():
    lenet = lr_sequence(get_recipe("lenet"))
    assert lenet == pytest.approx([0.1] * 15 + [0.01] * 15 + [1e-3] * 15 + [1e-4] * 15, rel=1e-12)
    cifar = lr_sequence(get_recipe("cifar"))
    assert cifar == pytest.approx([0.1] * 100 + [0.01] * 50 + [1e-3] * 50, rel=1e-12)
    assert cifar[99] == 0.1 and cifar[100] == pytest.approx(0.01) and cifar[150] == pytest.approx(0.001)
    cos = lr_sequence(TrainRecipe(epochs=10, lr=0.2, schedule="cosine"))
    assert cos[0] == 0.2 and cos[5] == pytest.approx(0.1) and all(a > b for a, b in itertools.pairwise(cos))
    assert lr_sequence(TrainRecipe(epochs=4, lr=0.3)) == [0.3] * 4
    assert [get_recipe("cifar").lr_at(e) for e in (99, 100, 150)] == pytest.approx([0.1, 0.01, 0.001])
    assert {"step", "multistep", "cosine", "constant"} <= set(list_schedules())


def test_schedule_state_resumes_through_a_checkpoint(tmp_path):
    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, create_schedule("multistep", opt, epochs=10, milestones=[3, 6], gamma=0.5)

    opt, sched = make()
    for _ in range(4):
        opt.step()
        sched.step()
    save_state(tmp_path / "s", {"opt": opt.state_dict(), "sched": sched.state_dict()})
    expected = []
    for _ in range(5):
        opt.step()
        sched.step()
        expected.append(opt.param_groups[0]["lr"])

    opt2, sched2 = make()
    state = load_state(tmp_path / "s")
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    got = []
    for _ in range(5):
        opt2.step()
        sched2.step()
        got.append(opt2.param_groups[0]["lr"])
    assert got == expected == pytest.approx([0.05, 0.025, 0.025, 0.025, 0.025], rel=1e-12)


def test_logged_lr_follows_the_schedule(data, tmp_path):
    recipe = RECIPE.replace(epochs=3, schedule="step", step_size=1, gamma=0.5, lr=0.08)
    fit(mlp(), data, tmp_path, recipe)
    assert [r["lr"] for r in read_log(tmp_path)] == pytest.approx([0.08, 0.04, 0.02])


# ------------------------------------------------------------------ hooks


class ConstantPull(Regularizer):
    """penalty = c · Σ w over one parameter: its gradient is exactly c everywhere."""

    def __init__(self, c):
        self.c = c

    def penalty(self, model):
        return self.c * model[1].bias.sum()


def test_penalty_gradient_reaches_the_optimizer(data):
    # The task loss is 0·logits, so the only gradient is the penalty's: plain SGD moves the bias by
    # exactly -lr·c per step and leaves every other parameter where it was.
    recipe = RECIPE.replace(epochs=1, momentum=0.0, weight_decay=0.0, lr=0.125)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, recipe, train_set=data[0], test_set=data[1], regularizers=[ConstantPull(0.5)],
                      loss_fn=lambda out, y: 0.0 * out.sum(), progress=False)
    record = trainer.fit().history[0]
    steps = 512 // 32
    torch.testing.assert_close(model[1].bias, before["1.bias"] - steps * 0.125 * 0.5, rtol=0, atol=1e-6)
    assert torch.equal(model[1].weight, before["1.weight"]) and torch.equal(model[4].weight, before["4.weight"])
    assert record["train_penalty"] == pytest.approx(
        sum(0.5 * (before["1.bias"] - s * 0.0625).sum().item() for s in range(steps)) / steps, rel=1e-5)


def test_after_step_runs_every_step_and_keeps_the_bound(data):
    unclamped = fit(mlp(), data, recipe=RECIPE.replace(lr=0.2)).model
    assert unclamped[1].weight.abs().max() > 0.3  # the bound below is active
    reg = CountingClamp(strength=0.0, bound=0.3)
    model = fit(mlp(), data, recipe=RECIPE.replace(lr=0.2), regularizers=[reg]).model
    assert reg.steps == 3 * (512 // 32) and reg.epochs == [0, 1, 2]
    assert model[1].weight.abs().max() <= 0.3


class SparsityLog:
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, trainer, epoch, record):
        self.seen.append((epoch, trainer.epoch, record["accuracy"]))
        record["sparsity"] = (trainer.module[1].weight == 0).float().mean()  # a tensor: logged as a float
        record["note"] = f"epoch {epoch}"

    def on_train_end(self, trainer, result):
        self.result = result


def test_callbacks_add_keys_to_the_log(data, tmp_path):
    cb = SparsityLog()
    result = fit(mlp(), data, tmp_path, RECIPE.replace(epochs=2), callbacks=[cb])
    log = read_log(tmp_path)
    assert [r["note"] for r in log] == ["epoch 0", "epoch 1"]
    assert all(r["sparsity"] == 0.0 for r in log) and result.history == log
    assert [(e, done) for e, done, _ in cb.seen] == [(0, 1), (1, 2)] and cb.result is result


class NaNAfter:
    """Cross-entropy that returns NaN from its ``n``-th call on."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, out, y):
        self.calls += torch.is_grad_enabled()  # training steps only, not evaluation
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if self.calls >= self.n else loss


def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(data, tmp_path):
    model = mlp()
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 \(0-based\), step 5/16.*after 1 epochs"):
        fit(model, data, tmp_path, loss_fn=NaNAfter(16 + 5))
    assert len(read_log(tmp_path)) == 1
    assert torch.isfinite(model[1].weight).all()  # the NaN step never reached the weights
    state = load_state(tmp_path / "last")
    assert state["epoch"] == 1
    resumed = fit(mlp(), data, tmp_path, resume=True)  # the last good checkpoint still resumes
    assert len(resumed.history) == 3


def test_amp_options(data):
    result = fit(mlp(), data, recipe=RECIPE.replace(epochs=1), amp="bf16")
    assert result.accuracy > 25.0 and torch.isfinite(result.model[1].weight).all()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        fit(mlp(), data, recipe=RECIPE.replace(epochs=1), amp="fp16", device="cpu")
