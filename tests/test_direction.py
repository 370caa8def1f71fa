"""Directional-pruning diagnostics (docs/grda.md, "Directional pruning diagnostics"): HVP, Lanczos, projections, paths, NormRatioLogger, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.cli import main
from prunekit.data import get_dataset
from prunekit.errors import ConfigError
from prunekit.evidence.direction import norm_ratio_from_log
from prunekit.evidence.hessian import (
    HessianOperator,
    eigen_residuals,
    flat_parameters,
    lanczos,
    loss_of_flat,
    projection_fraction,
    random_projection_fractions,
    set_flat_parameters,
    top_hessian_eigenpairs,
)
from prunekit.evidence.paths import PathEvaluator, bezier_point, linear_point, train_bezier
from prunekit.io import save_model
from prunekit.metrics import evaluate
from prunekit.models import create
from prunekit.optim.grda import NormRatioLogger, norm_ratio
from prunekit.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 models: one thread is ~8× faster on 2 cores

def tiny(seed: int, bn: bool = False) -> nn.Module:
    """6 → 5 → 3 MLP in float64 (d = 53, or 63 with BN)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 5)] + ([nn.BatchNorm1d(5)] if bn else []) + [nn.Tanh(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def data(n_batches: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
            for _ in range(n_batches)]


def dense_hessian(model, batches) -> torch.Tensor:
    return torch.autograd.functional.hessian(loss_of_flat(model, batches), flat_parameters(model))


@pytest.mark.parametrize("bn", [False, True])
def test_hvp_equals_dense_hessian_times_vector(bn):
    model, batches = tiny(0, bn), data()
    H = dense_hessian(model, batches)
    op = HessianOperator(model, batches)
    assert op.dim == H.shape[0] == (63 if bn else 53)
    assert torch.allclose(H, H.T, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(op.dim, 4, generator=g, dtype=torch.float64)
    HV = torch.stack([op(V[:, i]) for i in range(4)], dim=1)
    torch.testing.assert_close(HV, H @ V, rtol=1e-10, atol=1e-12)
    # the full Hessian column by column (unit vectors) is H itself
    cols = torch.stack([op(e) for e in torch.eye(op.dim, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(cols, H, rtol=1e-10, atol=1e-12)
    assert model.training is False and op.calls == 4 + op.dim


def test_hvp_rejects_a_wrong_shape():
    op = HessianOperator(tiny(0), data())
    with pytest.raises(ConfigError, match=r"shape \(53,\)"):
        op(torch.zeros(52, dtype=torch.float64))


def test_lanczos_top_k_matches_eigvalsh_of_the_dense_hessian():
    model, batches = tiny(3), data(seed=4)
    H = dense_hessian(model, batches)
    exact = torch.linalg.eigvalsh(H).flip(0)
    full = top_hessian_eigenpairs(model, batches, 8, iterations=H.shape[0])
    torch.testing.assert_close(full.values, exact[:8], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(H @ full.vectors, full.vectors * full.values, rtol=0, atol=1e-8)
    torch.testing.assert_close(full.vectors.T @ full.vectors, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.all(eigen_residuals(HessianOperator(model, batches), full) < 1e-8)
    # fewer iterations than d: the largest ones converge first, and the residual bound says so
    short = top_hessian_eigenpairs(model, batches, 3, iterations=40)
    assert torch.all(short.residuals < 1e-6)
    torch.testing.assert_close(short.values, exact[:3], rtol=1e-8, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), k=st.integers(1, 24), seed=st.integers(0, 2**16), repeated=st.booleans())
def test_lanczos_with_full_krylov_space_is_exact(n, k, seed, repeated):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.randn(n, generator=g, dtype=torch.float64)
    if repeated:  # few distinct eigenvalues: the Krylov space is exhausted early and Lanczos must restart
        lam = torch.round(lam)
    A = Q @ torch.diag(lam) @ Q.T
    pairs = lanczos(lambda v: A @ v, n, k, iterations=n, seed=seed)
    torch.testing.assert_close(pairs.values, torch.linalg.eigvalsh(A).flip(0)[:k], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(A @ pairs.vectors, pairs.vectors * pairs.values, atol=1e-8, rtol=0)


def test_lanczos_rejects_bad_k():
    with pytest.raises(ConfigError, match="1 <= k <= dim"):
        lanczos(lambda v: v, 5, 6)


def test_projection_fraction_of_eigenvector_is_one_and_of_orthogonal_vector_zero():
    model, batches = tiny(5), data(seed=6)
    pairs = top_hessian_eigenpairs(model, batches, 4, iterations=53)
    Q = pairs.vectors
    assert projection_fraction(3.7 * Q[:, 1], Q) == pytest.approx(1.0, abs=1e-12)
    r = torch.randn(53, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    orth = r - Q @ (Q.T @ r)
    assert projection_fraction(orth, Q) == pytest.approx(0.0, abs=1e-12)
    mixed = Q[:, 0] + orth / orth.norm()  # 45° from the eigenspace
    assert projection_fraction(mixed, Q) == pytest.approx(2 ** -0.5, abs=1e-12)
    with pytest.raises(ConfigError, match="zero direction"):
        projection_fraction(torch.zeros(53, dtype=torch.float64), Q)


def test_random_projection_fraction_is_about_sqrt_k_over_d():
    d, k = 20_000, 16
    Q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    fr = random_projection_fractions(Q, 5.0, 30, seed=2)
    assert len(fr) == 30 and len(set(fr)) == 30
    assert sum(fr) / 30 == pytest.approx((k / d) ** 0.5, rel=0.1)


def test_flat_parameter_roundtrip():
    model = tiny(0)
    w = flat_parameters(model)
    set_flat_parameters(model, 2 * w)
    torch.testing.assert_close(flat_parameters(model), 2 * w, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="shape"):
        set_flat_parameters(model, w[:-1])


@pytest.mark.parametrize("bn", [False, True])
def test_path_ends_equal_the_endpoint_models_numbers_exactly(bn):
    a_model, b_model, batches = tiny(0, bn), tiny(1, bn), data()
    test = data(seed=9)
    a, b = flat_parameters(a_model), flat_parameters(b_model)
    assert torch.equal(linear_point(a, b, 0.0), a) and torch.equal(linear_point(a, b, 1.0), b)
    path = PathEvaluator(tiny(7, bn), batches, test).path(lambda t: linear_point(a, b, t), [0.0, 0.25, 0.5, 1.0])
    for model, i in ((a_model, 0), (b_model, -1)):
        if bn:  # the path recomputes BN statistics everywhere, the ends included
            torch.optim.swa_utils.update_bn(batches, model)
        assert path.train_loss[i] == evaluate(model, batches)["loss"]
        assert path.test_accuracy[i] == evaluate(model, test)["accuracy"]
        assert path.test_loss[i] == evaluate(model, test)["loss"]
    assert path.alpha == [0.0, 0.25, 0.5, 1.0]
    assert path.train_loss[1] != path.train_loss[0]


def test_bezier_without_training_is_the_linear_path():
    a_model, b_model, batches = tiny(0), tiny(1), data()
    a, b = flat_parameters(a_model), flat_parameters(b_model)
    theta = train_bezier(tiny(2), a, b, batches, epochs=0)
    torch.testing.assert_close(theta, (a + b) / 2, rtol=0, atol=0)
    ts = [i / 8 for i in range(9)]
    for t in ts:
        torch.testing.assert_close(bezier_point(a, theta, b, t), linear_point(a, b, t), rtol=0, atol=1e-15)
    evaluator = PathEvaluator(tiny(2), batches, batches)
    line = evaluator.path(lambda t: linear_point(a, b, t), ts)
    curve = evaluator.path(lambda t: bezier_point(a, theta, b, t), ts)
    assert curve.train_loss[0] == line.train_loss[0] and curve.train_loss[-1] == line.train_loss[-1]
    torch.testing.assert_close(torch.tensor(curve.train_loss), torch.tensor(line.train_loss), rtol=1e-12, atol=0)


def test_bezier_training_lowers_the_loss_in_the_middle():
    batches = data(8, seed=3)
    ends = []
    for seed in (0, 1):  # two different minima of the same small problem
        model = tiny(seed).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(150):
            for x, y in batches:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        ends.append(flat_parameters(model))
    a, b = ends
    evaluator = PathEvaluator(tiny(2), batches, batches)
    line = evaluator.path(lambda t: linear_point(a, b, t), [0.5])
    theta = train_bezier(tiny(2), a, b, batches, epochs=40, lr=0.1, seed=0)
    curve = evaluator.path(lambda t: bezier_point(a, theta, b, t), [0.5])
    assert curve.train_loss[0] < 0.5 * line.train_loss[0]


def test_norm_ratio_values_and_logger():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -4.0]]))
    assert norm_ratio(model) == pytest.approx(5 / 7, rel=1e-12)
    dense = nn.Linear(100, 1, bias=True)
    with torch.no_grad():
        for p in dense.parameters():
            p.fill_(-0.3)
    assert norm_ratio(dense) == pytest.approx(101 ** -0.5, rel=1e-12)
    sparse = nn.Linear(100, 1, bias=False)
    with torch.no_grad():
        sparse.weight.zero_()
        sparse.weight[0, 7] = 2.0
    assert norm_ratio(sparse) == 1.0


def test_norm_ratio_logger_in_training(tmp_path):
    ds_train = get_dataset("synthetic", "train", train_size=256, test_size=64)
    ds_test = get_dataset("synthetic", "test", train_size=256, test_size=64)
    torch.manual_seed(0)
    model = create("lenet-300-100", widths=(8, 4))
    initial = norm_ratio(model)
    res = train(model, ds_train, ds_test, "fast", out_dir=tmp_path, progress=False,
                callbacks=[NormRatioLogger(initial=model)])
    assert [h["norm_ratio"] for h in res.history][-1] == norm_ratio(res.model)
    assert res.history[0]["norm_ratio_initial"] == initial
    values, first = norm_ratio_from_log(tmp_path)
    assert values == [h["norm_ratio"] for h in res.history] and first == initial
    assert norm_ratio_from_log(tmp_path / "model.safetensors") == (values, first)
    (tmp_path / "empty").mkdir()
    assert norm_ratio_from_log(tmp_path / "empty") == (None, None)


# ------------------------------------------------------------------ CLI


def _pair(tmp_path):
    cfg = {"widths": (8, 4)}
    torch.manual_seed(0)
    a = create("lenet-300-100", **cfg)
    b = create("lenet-300-100", **cfg)
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.copy_(pa + 0.05 * torch.randn_like(pa))
            pb.mul_(pb.abs() > 0.02)  # a sparser B
    for name, m in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_model(tmp_path / name, m)
        (tmp_path / name / "log.jsonl").write_text(
            json.dumps({"epoch": 0, "norm_ratio": 0.01, "norm_ratio_initial": 0.009}) + "\n"
            + json.dumps({"epoch": 1, "norm_ratio": norm_ratio(m)}) + "\n")
    return a, b


def test_cli_analyze_direction_end_to_end(capsys, tmp_path):
    a, b = _pair(tmp_path)
    code = main(["analyze", "direction", "--sgd", str(tmp_path / "a"), "--grda", str(tmp_path / "b"),
                 "--dataset", "synthetic", "--points", "5", "--top-k", "3", "--samples", "200",
                 "--lanczos-iters", "12", "--random-draws", "4", "--bezier-epochs", "1", "--device", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["kind"] == "direction"
    for key in ("path", "bezier"):
        assert r[key]["alpha"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert len(r[key]["train_loss"]) == len(r[key]["test_accuracy"]) == 5
    train_set = get_dataset("synthetic", "train", augment=False)
    test_set = get_dataset("synthetic", "test")
    assert r["path"]["test_accuracy"][0] == evaluate(a, [test_set.get_batch(torch.arange(len(test_set)))])["accuracy"]
    assert r["bezier"]["train_loss"][0] == r["path"]["train_loss"][0]
    assert r["bezier"]["train_loss"][-1] == r["path"]["train_loss"][-1]
    ev = r["eigenvalues"]
    assert len(ev) == 3 and ev == sorted(ev, reverse=True)
    assert 0 <= r["projection_fraction"] <= 1 and 0 < r["random_projection_fraction"] < 1
    assert r["distance"] == pytest.approx(float((flat_parameters(b) - flat_parameters(a)).double().norm()), rel=1e-9)
    assert r["norm_ratio"] == {"sgd": [0.01, norm_ratio(a)], "grda": [0.01, norm_ratio(b)]}
    assert r["norm_ratio_initial"] == {"sgd": 0.009, "grda": 0.009}
    assert r["samples"] == 200 and r["parameters"] == 784 * 8 + 8 + 8 * 4 + 4 + 4 * 10 + 10
    assert len(train_set) == 2048


def test_cli_analyze_direction_legacy_checkpoints_and_errors(capsys, tmp_path):
    a, b = _pair(tmp_path)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    code = main(["analyze", "direction", "--sgd", str(tmp_path / "a.pt"), "--grda", str(tmp_path / "b.pt"),
                 "--model", "lenet-300-100", "--model-config", "widths=[8,4]", "--dataset", "synthetic",
                 "--points", "2", "--top-k", "2", "--samples", "100", "--random-draws", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["bezier"] is None and r["norm_ratio"] is None and len(r["path"]["alpha"]) == 2

    (tmp_path / "c").mkdir()
    save_model(tmp_path / "c", create("lenet-300-100", widths=(8, 5)))
    code = main(["analyze", "direction", "--sgd", str(tmp_path / "a"), "--grda", str(tmp_path / "c"),
                 "--dataset", "synthetic"])
    assert code == 2 and "different parameters" in capsys.readouterr().err
    code = main(["analyze", "direction", "--sgd", str(tmp_path / "a"), "--grda", str(tmp_path / "b"),
                 "--dataset", "synthetic", "--points", "1"])
    assert code == 2 and "points=1" in capsys.readouterr().err
