"""gRDA optimizer (docs/grda.md), its soft-threshold paths, recipes, the SparsityLogger callback and the CLI flags."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from ddp_util import ddp_and_single
from torch import nn

from prunekit.cli import main
from prunekit.data import get_dataset
from prunekit.errors import ConfigError
from prunekit.io import load_state, save_state
from prunekit.metrics import sparsity
from prunekit.optim import GRDA, create_optimizer, create_schedule, list_optimizers
from prunekit.optim.grda import SparsityLogger, soft_threshold, threshold_increment
from prunekit.optim.grda import optimizer as grda_optimizer
from prunekit.recipes import TrainRecipe, get_recipe
from prunekit.train import train


def mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)


def batches(n: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 4, (16,), generator=g))
            for _ in range(n)]


def train_steps(model, opt, data, lrs=None):
    for i, (x, y) in enumerate(data):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(u, v), f"{k} differs (max {(u.float() - v.float()).abs().max():.3g})"


# ------------------------------------------------------------------ the update rule


@pytest.mark.parametrize("foreach", [True, False])
def test_c_zero_is_exactly_plain_sgd(foreach):
    data = batches(25)
    lrs = [0.1] * 10 + [0.03] * 15
    ref, model = mlp(), mlp()
    train_steps(ref, torch.optim.SGD(ref.parameters(), lr=0.1), data, lrs)
    train_steps(model, GRDA(model.parameters(), lr=0.1, c=0.0, mu=0.55, foreach=foreach), data, lrs)
    assert_same(model, ref)


def test_threshold_and_soft_threshold_against_hand_computation():
    c, mu = 0.1, 0.6
    lrs = [0.1, 0.1, 0.05, 0.2]
    # τ_k = Σ_i c·γ_i^{μ+½}·(i^μ − (i−1)^μ), each increment with that step's lr (docs/grda.md)
    taus = [0.007943282347242814, 0.012039764646185534, 0.013586754883040467, 0.019788164577742025]
    assert taus[0] == pytest.approx(c * 0.1 ** 1.1, rel=1e-15)
    w0 = [0.30, -0.30, 0.010, -0.004, 0.0, 0.02]
    g = [0.1, -0.1, 0.0, 0.0, 0.05, -0.1]
    p = nn.Parameter(torch.tensor(w0))
    opt = GRDA([p], lr=0.1, c=c, mu=mu)
    v = list(w0)
    for k, (lr, tau) in enumerate(zip(lrs, taus), 1):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(g)
        opt.step()
        state = opt.state[p]
        assert state["step"] == k
        assert state["threshold"] == pytest.approx(tau, rel=1e-14)
        v = [vj - lr * gj for vj, gj in zip(v, g)]
        expected = [math.copysign(max(abs(vj) - tau, 0.0), vj) for vj in v]
        torch.testing.assert_close(state["accumulator"], torch.tensor(v), rtol=0, atol=1e-7)
        torch.testing.assert_close(p.detach(), torch.tensor(expected), rtol=0, atol=1e-7)
        assert ((p == 0) == torch.tensor([abs(vj) <= tau for vj in v])).all()  # exact zeros
    # after 4 steps |v| = [0.255, 0.255, 0.01, 0.004, 0.0225, 0.065] against τ ≈ 0.0198; entry 4 was zero
    # for three steps (|v| = 0.005, 0.01, 0.0125 ≤ τ) and comes back now: there is no mask
    assert (p.detach() == 0).tolist() == [False, False, True, True, False, False]


def test_constant_lr_threshold_is_the_closed_form():
    c, mu, lr = 0.005, 0.55, 0.1
    p = nn.Parameter(torch.zeros(3))
    opt = GRDA([p], lr=lr, c=c, mu=mu)
    for k in range(1, 2001):
        p.grad = torch.ones(3)
        opt.step()
        if k in (1, 2, 10, 2000):
            assert opt.state[p]["threshold"] == pytest.approx(c * lr ** (mu + 0.5) * k ** mu, rel=1e-12)
    big = 10**9  # the increment stays accurate where k^μ − (k−1)^μ would cancel
    assert threshold_increment(big, mu) == pytest.approx(mu * (big - 0.5) ** (mu - 1), rel=1e-9)
    assert threshold_increment(1, mu) == 1.0


def test_parameters_without_gradients_are_skipped():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = GRDA([a, b], lr=0.1, c=0.1, mu=0.6)
    a.grad = torch.zeros(2)
    opt.step()
    opt.step()
    b.grad = torch.zeros(2)
    opt.step()
    assert opt.state[a]["step"] == 3 and opt.state[b]["step"] == 1  # per-tensor counters
    assert opt.state[b]["threshold"] == pytest.approx(0.1 * 0.1 ** 1.1)


def test_foreach_and_reference_paths_agree():
    models = [mlp(), mlp()]
    opts = []
    for m, foreach in zip(models, (True, False)):
        groups = [{"params": [m[1].weight, m[3].weight]},
                  {"params": [m[1].bias], "c": 0.0},
                  {"params": [m[3].bias], "lr": 0.05, "c": 0.02, "mu": 0.7}]
        opts.append(GRDA(groups, lr=0.1, c=0.05, mu=0.55, foreach=foreach))
    data = batches(30)
    lrs = [0.1] * 10 + [0.2] * 10 + [0.01] * 10
    for i, (x, y) in enumerate(data):
        for m, opt in zip(models, opts):
            opt.param_groups[0]["lr"] = lrs[i]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            if i % 7 == 3:
                m[3].bias.grad = None  # a tensor without gradient this step
            opt.step()
    assert_same(models[0], models[1])
    fast, ref = opts
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(fast.state[p]["accumulator"], ref.state[q]["accumulator"])
        assert fast.state[p]["threshold"] == ref.state[q]["threshold"]
        assert fast.state[p]["step"] == ref.state[q]["step"]
    assert (models[0][1].weight == 0).float().mean() > 0.2  # the test exercised the threshold
    assert fast.state[models[0][3].bias]["step"] == 30 - 4  # skipped on steps 3, 10, 17, 24
    assert (models[0][1].bias != 0).all()  # c = 0 group: never thresholded


# ------------------------------------------------------------------ soft-threshold: fused and public paths


def _values_with_ties(n: int, tau: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random values plus exact ties at ±τ (τ as rounded to ``dtype``, the value the kernels compare with),
    the neighbouring floats on both sides, ±0 and ±inf."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(tau, dtype=dtype)
    beside = [torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)), torch.nextafter(t, torch.tensor(0, dtype=dtype))]
    special = torch.stack([t, -t, *beside, *(-b for b in beside)]).to(dtype)
    extra = torch.tensor([0.0, -0.0, math.inf, -math.inf], dtype=dtype)
    return torch.cat([torch.randn(n, generator=g, dtype=torch.float32).to(dtype) * 3 * tau, special, extra])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.0, 1e-3, 0.25, 1.0])
def test_soft_threshold_fused_public_and_formula_agree(monkeypatch, dtype, tau):
    v = _values_with_ties(5000, tau, seed=int(tau * 1000), dtype=dtype)
    expected = torch.where(v.abs() <= tau, torch.zeros_like(v), v - torch.sign(v) * tau)  # S_τ by definition
    fused = soft_threshold(v, tau, out=torch.empty_like(v))
    public = nn.functional.softshrink(v, tau)
    tensor_tau = soft_threshold(v, torch.full_like(v, tau))  # per-element τ: sign(v)·clamp(|v| − τ, min=0)
    monkeypatch.setattr(grda_optimizer, "_FUSED_SOFTSHRINK", None)  # a torch without the private binding
    fallback = soft_threshold(v, tau, out=torch.empty_like(v))
    for got in (fused, public, tensor_tau, fallback):
        assert got.dtype == dtype
        assert torch.equal(got, expected), (got - expected).abs().max()
        assert ((got == 0) == (v.abs() <= tau)).all()  # ties at the threshold are exact zeros on every path


def test_soft_threshold_per_element_tau():
    v = torch.tensor([0.5, -0.5, 0.2, -0.2, 0.0, 3.0])
    tau = torch.tensor([0.5, 0.4, 0.1, 0.3, 0.1, 0.0])
    torch.testing.assert_close(soft_threshold(v, tau), torch.tensor([0.0, -0.1, 0.1, 0.0, 0.0, 3.0]), rtol=0,
                               atol=1e-7)
    out = torch.empty(6, dtype=torch.float64)
    assert soft_threshold(v, tau, out=out) is out and out.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grda_without_the_private_softshrink_is_bit_identical(monkeypatch, dtype):
    """The public fallback of the fused kernel gives the same weights, accumulators and zeros."""
    models, opts = [mlp(dtype=dtype), mlp(dtype=dtype)], []
    for m in models:
        opts.append(GRDA(m.parameters(), lr=0.1, c=0.05, mu=0.55))
    data = batches(20, dtype=dtype)
    for (x, y) in data:
        for j, (m, opt) in enumerate(zip(models, opts)):
            if j == 1:
                monkeypatch.setattr(grda_optimizer, "_FUSED_SOFTSHRINK", None)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x).float(), y).backward()
            opt.step()
            monkeypatch.undo()
    assert_same(models[0], models[1])
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(opts[0].state[p]["accumulator"], opts[1].state[q]["accumulator"])
    assert (models[0][1].weight == 0).float().mean() > 0.1  # the threshold was exercised


# ------------------------------------------------------------------ state, precision


def test_resume_through_save_state_is_identical_and_zeros_stay_zero(tmp_path):
    data = batches(20)
    lrs = [0.1] * 12 + [0.05] * 8
    full = mlp()
    train_steps(full, GRDA(full.parameters(), lr=0.1, c=0.2, mu=0.6), data, lrs)

    first = mlp()
    opt = GRDA(first.parameters(), lr=0.1, c=0.2, mu=0.6)
    train_steps(first, opt, data[:10], lrs[:10])
    save_state(tmp_path / "ckpt", {"model": first.state_dict(), "optimizer": opt.state_dict()})
    state = load_state(tmp_path / "ckpt")

    resumed = mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(state["model"])
    opt2 = GRDA(resumed.parameters(), lr=0.5, c=0.0, mu=0.9)  # group values come from the checkpoint
    opt2.load_state_dict(state["optimizer"])
    assert opt2.param_groups[0]["c"] == 0.2 and opt2.param_groups[0]["mu"] == 0.6
    zeros_before = resumed[1].weight == 0
    assert zeros_before.float().mean() > 0.3
    train_steps(resumed, opt2, data[10:], lrs[10:])
    assert_same(resumed, full)

    # The pitfall the optimizer state prevents: a fresh gRDA restarts τ at 0 and regrows.
    naive = mlp()
    naive.load_state_dict(state["model"])
    train_steps(naive, GRDA(naive.parameters(), lr=0.1, c=0.2, mu=0.6), data[10:11], lrs[10:11])
    assert (naive[1].weight == 0).sum() < (resumed[1].weight == 0).sum()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_an_fp32_accumulator(tmp_path, dtype):
    p = nn.Parameter(torch.ones(4, dtype=dtype))
    q = nn.Parameter(torch.ones(4, dtype=dtype))
    fast, ref = GRDA([p], lr=1e-2, c=0.0, mu=0.6), GRDA([q], lr=1e-2, c=0.0, mu=0.6, foreach=False)
    for _ in range(100):  # increments of 1e-5: below bf16/fp16 resolution at 1.0
        for t, opt in ((p, fast), (q, ref)):
            t.grad = torch.full((4,), 1e-3, dtype=dtype)
            opt.step()
    acc = fast.state[p]["accumulator"]
    assert acc.dtype == torch.float32 and p.dtype == dtype
    g = torch.tensor(1e-3, dtype=dtype).item()  # the gradient as the low-precision grad holds it
    torch.testing.assert_close(acc, torch.full((4,), 1 - 100 * 1e-2 * g), rtol=0, atol=5e-6)  # fp32 rounding
    assert (acc < 1 - 9e-4).all()  # in bf16/fp16 every one of these increments would have rounded away
    assert torch.equal(p.detach(), acc.to(dtype)) and torch.equal(p, q)
    assert torch.equal(acc, ref.state[q]["accumulator"])

    # torch.optim would cast a loaded state to the parameter dtype; gRDA must not
    save_state(tmp_path / "opt", fast.state_dict())
    again = GRDA([nn.Parameter(p.detach().clone())], lr=1e-2, c=0.0, mu=0.6)
    again.load_state_dict(load_state(tmp_path / "opt"))
    restored = next(iter(again.state.values()))["accumulator"]
    assert restored.dtype == torch.float32 and torch.equal(restored, acc)
    assert restored.data_ptr() != acc.data_ptr()


def test_bf16_model_trains_with_foreach_and_reference_alike():
    models = [mlp(dtype=torch.bfloat16), mlp(dtype=torch.bfloat16)]
    opts = [GRDA(m.parameters(), lr=0.1, c=0.1, mu=0.6, foreach=f) for m, f in zip(models, (True, False))]
    data = batches(8, dtype=torch.bfloat16)
    for m, opt in zip(models, opts):
        train_steps(m, opt, data)
    assert_same(*models)
    assert all(s["accumulator"].dtype == torch.float32 for s in opts[0].state.values())


def test_load_state_dict_rejects_a_mismatched_accumulator():
    m = mlp()
    opt = GRDA(m.parameters(), lr=0.1, c=0.1, mu=0.6)
    train_steps(m, opt, batches(1))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["accumulator"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"accumulator \(3,\) does not match .*\(32, 64\)"):
        GRDA(mlp().parameters(), lr=0.1).load_state_dict(sd)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("kw, text", [
    ({"lr": 0.0}, "lr=0.0"), ({"lr": -0.1}, "lr=-0.1"), ({"lr": float("nan")}, "lr=nan"),
    ({"c": -0.001}, "c=-0.001"), ({"c": float("inf")}, "c=inf"),
    ({"mu": 0.0}, "mu=0.0"), ({"mu": -0.5}, "mu=-0.5"), ({"mu": 1.5}, "mu=1.5"), ({"mu": "0.5"}, "mu='0.5'"),
])
def test_invalid_hyperparameters_name_the_value(kw, text):
    params = {"lr": 0.1, "c": 0.005, "mu": 0.55, **kw}
    with pytest.raises(ConfigError, match=text.replace("(", r"\(")):
        GRDA(mlp().parameters(), **params)
    with pytest.raises(ConfigError, match="(?i)grda"):
        create_optimizer("grda", mlp().parameters(), **params)
    opt = GRDA([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ConfigError, match=text.replace("(", r"\(")):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], **kw})
    assert len(opt.param_groups) == 1


def test_valid_edge_values_and_registry():
    assert "grda" in list_optimizers()
    GRDA(mlp().parameters(), lr=0.1, c=0.0, mu=1.0)  # c = 0 (SGD) and mu = 1 are allowed
    GRDA(mlp().parameters(), lr=0.1, c=0.01, mu=0.4)  # mu = 0.4: the paper's low-sparsity setting
    opt = create_optimizer("grda", mlp().parameters(), lr=0.1, c=0.005, mu=0.51, foreach=False)
    assert isinstance(opt, GRDA) and opt.defaults == {"lr": 0.1, "c": 0.005, "mu": 0.51, "foreach": False}
    with pytest.raises(ConfigError, match="momentum"):
        create_optimizer("grda", mlp().parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ConfigError, match="momentum=0.9 but optimizer 'grda' has no 'momentum'"):
        TrainRecipe(optimizer="grda", momentum=0.9)


def test_paper_recipes():
    for name, (c, mu, epochs) in {"grda-resnet50-imagenet": (0.005, 0.55, 150),
                                  "grda-vgg16-cifar10": (0.0005, 0.6, 600),
                                  "grda-wrn28x10-cifar100": (0.001, 0.55, 200)}.items():
        r = get_recipe(name)
        assert (r.optimizer, r.lr, r.momentum, r.weight_decay) == ("grda", 0.1, 0.0, 0.0)
        assert (r.optimizer_kwargs, r.epochs) == ({"c": c, "mu": mu}, epochs)
    imagenet = get_recipe("grda-resnet50-imagenet")
    assert imagenet.batch_size == 256 and imagenet.lr_at(139) == 0.1 and imagenet.lr_at(140) == pytest.approx(0.01)
    wrn = get_recipe("grda-wrn28x10-cifar100")  # constant to 50 %, linear to 1 % at 90 %, then held
    assert [round(wrn.lr_at(e), 6) for e in (0, 100, 140, 180, 199)] == [0.1, 0.1, 0.0505, 0.001, 0.001]
    lenet = get_recipe("grda-lenet")
    assert lenet.epochs <= 30 and lenet.optimizer == "grda" and get_recipe("grda").optimizer_kwargs == \
        lenet.optimizer_kwargs
    opt = GRDA([nn.Parameter(torch.ones(1))], lr=1.0)
    sched = create_schedule("linear-hold", opt, epochs=10, gamma=0.01)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()  # no gradients: a no-op, keeps torch's "scheduler before optimizer" check quiet
        sched.step()
    assert lrs == pytest.approx([1, 1, 1, 1, 1, 1, 0.7525, 0.505, 0.2575, 0.01])


# ------------------------------------------------------------------ Trainer, callback, CLI, DDP


def synthetic(train_size=256, test_size=128):
    kw = {"num_classes": 4, "input_shape": (1, 8, 8), "seed": 0}
    return (get_dataset("synthetic", "train", size=train_size, **kw),
            get_dataset("synthetic", "test", size=test_size, **kw))


def test_sparsity_logger_adds_the_keys(tmp_path):
    train_set, test_set = synthetic()
    recipe = TrainRecipe(epochs=2, batch_size=32, optimizer="grda", lr=0.1,
                         optimizer_kwargs={"c": 0.2, "mu": 0.6})
    result = train(mlp(), train_set, test_set, recipe, out_dir=tmp_path, progress=False,
                   callbacks=[SparsityLogger()])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for rec in log:
        assert {"sparsity", "weight_sparsity", "nonzero_params", "layer_sparsity", "grda_threshold"} <= set(rec)
        assert set(rec["layer_sparsity"]) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert log[1]["sparsity"] > log[0]["sparsity"] > 0.05
    report = sparsity(result.model, kinds=None, modules=None)
    assert log[-1]["sparsity"] == report.fraction and log[-1]["nonzero_params"] == report.numel - report.zeros
    assert log[-1]["weight_sparsity"] == sparsity(result.model).fraction
    assert result.history[-1]["layer_sparsity"]["1.weight"] == float((result.model[1].weight == 0).float().mean())
    # 2 epochs × 8 steps at constant lr: τ = c·lr^{μ+½}·16^μ
    assert log[-1]["grda_threshold"] == pytest.approx(0.2 * 0.1 ** 1.1 * 16 ** 0.6)


def test_cli_train_with_grda_flags_logs_sparsity(capsys, tmp_path):
    code = main(["train", "--model", "lenet-300-100", "--dataset", "synthetic", "--recipe", "grda", "--epochs", "1",
                 "--grda-c", "0.05", "--grda-mu", "0.6", "--out", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["recipe"] == "grda" and 0 < report["sparsity"] < 1 and "weight_sparsity" in report
    (rec,) = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rec["sparsity"] == report["sparsity"] and "fc1.weight" in rec["layer_sparsity"]
    ckpt = json.loads((tmp_path / "last.json").read_text())
    assert '"c": 0.05' in json.dumps(ckpt) and '"mu": 0.6' in json.dumps(ckpt)


# Run by torchrun (2 ranks) and, via runpy, in this process (1 rank). No BatchNorm: batch statistics
# are per rank. The lr schedule changes mid-run, so the threshold increments use two learning rates.
DDP_SCRIPT = r'''
import sys
import torch
from torch import nn
from prunekit import distributed
from prunekit.optim.grda import SparsityLogger
from prunekit.data import get_dataset
from prunekit.recipes import TrainRecipe
from prunekit.train import train


def run(out_dir):
    kw = dict(num_classes=4, input_shape=(1, 8, 8), seed=0)
    train_set = get_dataset("synthetic", "train", size=500, **kw)
    test_set = get_dataset("synthetic", "test", size=201, **kw)
    recipe = TrainRecipe(epochs=2, batch_size=32, test_batch_size=64, optimizer="grda", lr=0.1,
                         optimizer_kwargs={"c": 0.2, "mu": 0.6}, schedule="step", step_size=1, gamma=0.5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    return train(model, train_set, test_set, recipe, out_dir=out_dir, seed=3, device="cpu", progress=False,
                 callbacks=[SparsityLogger()])


if __name__ == "__main__":
    distributed.init_from_env()
    run(sys.argv[1])
    distributed.cleanup()
'''


def test_two_gloo_ranks_match_one_process(tmp_path):
    ddp_weights, ddp_log, single = ddp_and_single(DDP_SCRIPT, tmp_path, "ddp_grda.py")
    for k, v in single.model.state_dict().items():
        # the zero pattern agrees up to weights sitting within float-summation noise of the threshold
        flipped = ((ddp_weights[k] == 0) != (v == 0)).sum().item()
        assert flipped <= max(1, v.numel() // 1000), f"{k}: {flipped} zeros differ"
    assert [r["lr"] for r in ddp_log] == [0.1, 0.05]
    for d, s in zip(ddp_log, single.history):
        assert d["sparsity"] == pytest.approx(s["sparsity"], abs=1e-3) and s["sparsity"] > 0.1
        assert d["grda_threshold"] == s["grda_threshold"]  # same step counts and lrs on every rank
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)
