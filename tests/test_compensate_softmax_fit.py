"""The logits' layer refit for the softmax it feeds (``prunekit.compensate.softmax_fit``): the conjugate
gradients reach the minimiser of the weighted objective (checked against a dense least-squares solve built
independently), the layer is found only when its output *is* the logits, and ``reconstruct_plan`` refits it
with ``output_loss="kl"`` to a lower KL than least squares."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.compensate import ReconstructOptions, reconstruct_plan
from prunekit.compensate.reconstruct import _significant_gain
from prunekit.compensate.softmax_fit import logits_layer, softmax_refit
from prunekit.engine import ChannelGraph, GroupPlan, Plan, apply
from prunekit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_minimiser(u, z, prior, lam, temperature, eps, fixed):
    """argmin Σ_n ‖L_nᵀ(Θu_n + f − z_n)‖² + Σ λ_d (Θ − prior)²_{cd}, L_n L_nᵀ = diag(p_n) − p_n p_nᵀ + εI, as
    one stacked least-squares problem in vec(Θ) (rows of Θ concatenated)."""
    n, d = u.shape
    c = z.shape[1]
    p = torch.softmax(z / temperature, 1)
    rows, rhs = [], []
    for i in range(n):
        a = torch.diag(p[i]) - torch.outer(p[i], p[i]) + eps * torch.eye(c, dtype=torch.float64)
        lt = torch.linalg.cholesky(a).t()
        rows.append(torch.kron(lt, u[i][None, :]))  # (C, C·D): L_nᵀ Θ u_n
        rhs.append(lt @ (z[i] - fixed))
    for j in range(c):
        for k in range(d):
            if lam[k] > 0:
                e = torch.zeros(c * d, dtype=torch.float64)
                e[j * d + k] = lam[k].sqrt()
                rows.append(e[None, :])
                rhs.append((lam[k].sqrt() * prior[j, k])[None])
    sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)[:, None]).solution
    return sol.view(c, d)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), intercept=st.booleans(), temperature=st.sampled_from([1.0, 2.0, 4.0]),
       eps=st.sampled_from([1e-3, 1e-2, 1e-1]), ridge=st.sampled_from([0.0, 1e-3, 1e-1]))
def test_conjugate_gradients_reach_the_dense_minimiser(seed, intercept, temperature, eps, ridge):
    g = torch.Generator().manual_seed(seed)
    n, d, c = 40, 5, 4
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    if intercept:
        u = torch.cat([u, torch.ones(n, 1, dtype=torch.float64)], 1)
    z = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    prior = torch.randn(c, u.shape[1], generator=g, dtype=torch.float64)
    theta0 = torch.linalg.lstsq(u, z).solution.t()
    fixed = None if intercept else torch.randn(c, generator=g, dtype=torch.float64)
    theta, report = softmax_refit(u, z, theta0, prior, ridge, fixed_bias=fixed, temperature=temperature, eps=eps,
                                  tol=1e-12, max_iter=500)
    # λ as documented: r · mean_{n,c}(p(1 − p) + ε) · trace(UᵀU)/D, the intercept column not shrunk
    p = torch.softmax(z / temperature, 1)
    lam = torch.full((u.shape[1],), ridge * float((p * (1 - p) + eps).mean()) * float((u * u).sum()) / u.shape[1],
                     dtype=torch.float64)
    if intercept:
        lam[-1] = 0.0
    want = dense_minimiser(u, z, prior, lam, temperature, eps, torch.zeros(c, dtype=torch.float64)
                           if fixed is None else fixed)
    assert torch.allclose(theta, want, atol=1e-6 * (1 + float(want.abs().max())))
    assert report["cg_residual"] <= 1e-12 and report["cg_iterations"] < 500  # converged, not stopped
    f = torch.zeros(c, dtype=torch.float64) if fixed is None else fixed

    def objective(t):
        r = u @ t.t() + f - z
        return float(((p * r * r).sum(1) - (p * r).sum(1) ** 2 + eps * (r * r).sum(1)).sum()
                     + (lam * (t - prior) ** 2).sum())
    assert objective(theta) <= objective(theta0) + 1e-9


def test_an_exact_least_squares_start_is_kept():
    """Logits reproduced exactly (no ridge): the minimiser is the start; no iteration."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(30, 6, generator=g, dtype=torch.float64)
    theta_true = torch.randn(3, 6, generator=g, dtype=torch.float64)
    theta, report = softmax_refit(u, u @ theta_true.t(), theta_true, torch.zeros(3, 6, dtype=torch.float64), 0.0)
    assert report["cg_iterations"] == 0 and torch.equal(theta, theta_true) and report["kl"] < 1e-12


class DictOut(nn.Module):
    def __init__(self, head: nn.Module, after: nn.Module | None = None):
        super().__init__()
        self.body, self.head, self.after = nn.Linear(4, 6), head, after

    def forward(self, x):
        y = self.head(torch.relu(self.body(x)))
        return {"logits": y if self.after is None else self.after(y)}


def test_the_logits_layer_is_the_one_whose_output_is_the_models():
    x = torch.randn(2, 4)
    seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    assert logits_layer(seq, x, ["0", "2"]) == ("2", 1)  # one logit vector per input
    assert logits_layer(seq, x[:, None].expand(2, 7, 4), ["0", "2"]) == ("2", 7)  # one per position
    assert logits_layer(seq, x, ["0"]) is None  # not among the candidates
    assert logits_layer(nn.Sequential(*seq, nn.LogSoftmax(1)), x, ["0", "2"]) is None  # something follows it
    assert logits_layer(DictOut(nn.Linear(6, 3)), x, ["body", "head"]) == ("head", 1)  # out["logits"]
    assert logits_layer(DictOut(nn.Linear(6, 3), nn.Tanh()), x, ["body", "head"]) is None


def teacher_mlp() -> tuple[nn.Module, torch.Tensor]:
    """An MLP whose logits are confident on some inputs and hesitant on others."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    with torch.no_grad():
        net[2].weight.mul_(4)
    return net, torch.randn(400, 8, generator=torch.Generator().manual_seed(1))


def kl_to(net: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        logp, logq = torch.log_softmax(net(x), 1), torch.log_softmax(other(x), 1)
    return float((logp.exp() * (logp - logq)).sum(1).mean())


def test_reconstruct_refits_the_logits_layer_to_a_lower_kl_than_least_squares():
    net, x = teacher_mlp()
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=list(range(0, 24, 3)), size=24)])
    options = ReconstructOptions(calibration=400, ridge=1e-4)
    kl_plan, kl_reports = reconstruct_plan(net, graph, plan, x, options)
    mse_plan, mse_reports = reconstruct_plan(net, graph, plan, x, options.replace(output_loss="mse"))
    (rep,) = kl_reports
    assert rep["module"] == "2" and rep["output_loss"] == "kl" and rep["cg_residual"] < 1e-6
    assert "output_loss" not in mse_reports[0]
    assert rep["kl"] < rep["kl_least_squares"]
    kl_net, mse_net = apply(net, graph, kl_plan), apply(net, graph, mse_plan)
    assert rep["kl_least_squares"] == pytest.approx(kl_to(net, mse_net, x), rel=1e-4)  # the report measures
    assert rep["kl"] == pytest.approx(kl_to(net, kl_net, x), rel=1e-4)  # what the applied models output
    assert kl_plan.refit("2").provenance["output_loss"] == "kl"
    held_out = torch.randn(2000, 8, generator=torch.Generator().manual_seed(2))
    assert kl_to(net, kl_net, held_out) < kl_to(net, mse_net, held_out)


def test_without_intercept_the_bias_stays_and_only_the_weight_moves():
    net, x = teacher_mlp()
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=list(range(0, 24, 3)), size=24)])
    fitted, (rep,) = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=400, intercept=False,
                                                                              ridge=1e-4))
    assert torch.equal(fitted.refit("2").bias.double(), net[2].bias.detach().double())
    assert rep["kl"] < rep["kl_least_squares"]
    assert rep["kl"] == pytest.approx(kl_to(net, apply(net, graph, fitted), x), rel=1e-4)


@pytest.mark.parametrize("bad", [{"output_loss": "ce"}, {"temperature": 0}, {"kl_mix": -1.0}])
def test_bad_softmax_options_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ReconstructOptions(**bad)


def test_the_ridge_is_the_largest_within_one_standard_error_and_kept_only_when_two_errors_better():
    g = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(200, generator=g, dtype=torch.float64)
    clear = {1e-3: -0.05 + noise, 1e-2: -0.0495 + noise, 1e-1: -0.02 + noise}
    assert _significant_gain(clear) == (1e-2, True)  # 1e-2 is within one error of the best, 1e-1 is not
    unclear = {1e-3: -0.001 + 10 * noise, 1e-1: 0.002 + 10 * noise}
    assert _significant_gain(unclear) == (1e-1, False)
    worse = {r: 0.01 + noise for r in (1e-3, 1e-1)}
    assert _significant_gain(worse)[1] is False


@pytest.mark.parametrize("n", [30, 400])
def test_held_out_inputs_choose_the_ridge_and_whether_the_softmax_fit_is_kept(n):
    """Kept only when its held-out KL beats the least-squares refit's on the same split (with few inputs the
    weighted fit, which leans on the rows the model hesitates on, may not)."""
    net, x = teacher_mlp()
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=list(range(0, 24, 3)), size=24)])
    options = ReconstructOptions(calibration=n)
    fitted, (rep,) = reconstruct_plan(net, graph, plan, x, options)
    mse, _ = reconstruct_plan(net, graph, plan, x, options.replace(output_loss="mse"))
    assert rep["kl_ridge"] in options.ridge_grid
    assert rep["output_loss"] == ("mse" if n == 30 else "kl")  # 6 held-out inputs cannot show a gain; 80 do
    if rep["output_loss"] == "kl":
        assert rep["kl_held_out"] < rep["kl_held_out_least_squares"]
        assert not torch.equal(fitted.refit("2").weight, mse.refit("2").weight)
    else:
        assert rep["output_loss"] == "mse"
        assert torch.equal(fitted.refit("2").weight, mse.refit("2").weight)


def test_rows_beyond_the_cache_limit_are_subsampled_for_the_softmax_fit():
    net, x = teacher_mlp()
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=list(range(0, 24, 3)), size=24)])
    options = ReconstructOptions(calibration=400, ridge=1e-4)
    _, (full,) = reconstruct_plan(net, graph, plan, x, options)
    row_bytes = 8 * (8 + 5 + 1)  # float64: 8 kept inputs, 5 logits, one more column
    _, (part,) = reconstruct_plan(net, graph, plan, x, options.replace(max_cache_bytes=100 * row_bytes))
    assert full["kl_rows"] == 400 and part["kl_rows"] == 100  # a quarter of each batch of 100
    assert part["output_loss"] == "kl" and part["kl"] < part["kl_least_squares"]


def test_auto_fits_a_classifier_for_its_softmax_but_leaves_a_token_models_head_to_least_squares():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6)).eval()
    ids = torch.randint(0, 30, (200, 12), generator=torch.Generator().manual_seed(3))
    graph = ChannelGraph.build(model, ids[:1])
    plan = Plan([GroupPlan(group_id=graph.group("1").id, keep=list(range(0, 16, 2)), size=16)])
    options = ReconstructOptions(calibration=200, ridge=1e-4)
    auto, (auto_rep,) = reconstruct_plan(model, graph, plan, ids, options)
    forced, (forced_rep,) = reconstruct_plan(model, graph, plan, ids, options.replace(output_loss="kl"))
    mse, _ = reconstruct_plan(model, graph, plan, ids, options.replace(output_loss="mse"))
    assert "output_loss" not in auto_rep and torch.equal(auto.refit("3").weight, mse.refit("3").weight)
    assert forced_rep["output_loss"] == "kl" and forced_rep["kl_rows"] == 200 * 12  # a row per token
    assert forced_rep["kl"] < forced_rep["kl_least_squares"]
    assert not torch.equal(forced.refit("3").weight, mse.refit("3").weight)


def test_a_head_too_large_for_the_work_bound_is_left_to_least_squares_and_says_why(monkeypatch):
    from prunekit.compensate import softmax_fit

    net, x = teacher_mlp()
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=list(range(0, 24, 3)), size=24)])
    options = ReconstructOptions(calibration=400, ridge=1e-4)
    mse, _ = reconstruct_plan(net, graph, plan, x, options.replace(output_loss="mse"))
    monkeypatch.setattr(softmax_fit, "MAX_PRODUCT_MACS", 5 * 9 * 8)  # 8 rows for 9 inputs per class
    fitted, (rep,) = reconstruct_plan(net, graph, plan, x, options)
    assert rep["output_loss"] == "mse" and "5 classes × 9 inputs allow 8 rows" in rep["softmax_skipped"]
    assert torch.equal(fitted.refit("2").weight, mse.refit("2").weight)
    monkeypatch.setattr(softmax_fit, "MAX_PRODUCT_MACS", 5 * 9 * 150)  # 150 of the 400 rows
    _, (rep,) = reconstruct_plan(net, graph, plan, x, options)
    assert rep["output_loss"] == "kl" and rep["kl_rows"] == 152  # round(37.5) = 38 of each batch of 100
