"""Whole-layer reconstruction on real ``transformers`` classes: heads and MLP neurons removed, the output
projections refit from unlabeled inputs (nn.Linear and GPT-2's transposed Conv1D)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import HEAD_AND_MLP, build, logits  # noqa: E402

from prunekit.compensate import ReconstructOptions, reconstruct_plan  # noqa: E402
from prunekit.engine import ChannelGraph, apply, make_plan  # noqa: E402


@pytest.mark.parametrize("family", ["vit", "gpt2", "llama"])
def test_reconstruction_refits_output_projections_and_cuts_the_error(family):
    model, x = build(family)
    heads, mlp = HEAD_AND_MLP[family]
    graph = ChannelGraph.build(model, x)
    plan = make_plan(model, graph, ratio=0.0, overrides={heads: 0.5, mlp: 0.5})
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        calib, held = torch.randn(96, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)
    else:
        calib, held = torch.randint(0, 1000, (96, 12), generator=g), torch.randint(0, 1000, (16, 12), generator=g)
    refit_plan, reports = reconstruct_plan(model, graph, plan, calib,
                                           ReconstructOptions(calibration=96, select="criterion", residual=False))
    refit = {r.module for r in refit_plan.refits}
    assert refit and all(r["action"] == "refit" for r in reports if r["module"] in refit)
    out_proj = {"vit": "vit.layers.0.attention.o_proj", "gpt2": "transformer.h.0.attn.c_proj",
                "llama": "model.layers.0.self_attn.o_proj"}[family]
    assert out_proj in refit
    dense = logits(model, held)
    err_pruned = (logits(apply(model, graph, plan), held) - dense).pow(2).mean()
    err_refit = (logits(apply(model, graph, refit_plan), held) - dense).pow(2).mean()
    assert err_refit < 0.6 * err_pruned, (err_refit, err_pruned)


def test_add_bias_gives_bias_free_projections_an_intercept_that_reloads(tmp_path):
    from prunekit.errors import ConfigError
    from prunekit.io import load_model, save_model

    model, x = build("llama")
    graph = ChannelGraph.build(model, x)
    plan = make_plan(model, graph, ratio=0.0, overrides={"*.self_attn.q_proj": 0.5, "*.mlp.gate_proj": 0.5})
    calib = torch.randint(0, 1000, (64, 12), generator=torch.Generator().manual_seed(2)) % 7  # few, skewed tokens
    refit_plan, _ = reconstruct_plan(model, graph, plan, calib, ReconstructOptions(calibration=64, residual=False,
                                                                                   add_bias=True))
    small = apply(model, graph, refit_plan)
    o_proj = small.model.layers[0].self_attn.o_proj
    assert o_proj.bias is not None and o_proj.bias.abs().max() > 0
    with pytest.raises(ConfigError, match="save_model"):
        small.save_pretrained(tmp_path / "hf")
    save_model(tmp_path / "m", small)
    again, _ = load_model(tmp_path / "m", model=build("llama", seed=3)[0])
    torch.testing.assert_close(logits(again, x), logits(small, x), atol=0, rtol=0)
