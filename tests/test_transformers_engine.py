"""The engine on real ``transformers`` classes (small configs, random weights): heads, GQA, hidden size,
decoders, tied weights, Hugging Face round-trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import prunekit  # noqa: E402
from prunekit.engine import ChannelGraph, apply, make_plan, mask  # noqa: E402
from prunekit.errors import ConfigError  # noqa: E402

from hf_models import FAMILIES, HEAD_AND_MLP, build, logits  # noqa: E402

ATTENTION = [f for f in FAMILIES if HEAD_AND_MLP[f][0] is not None]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_mlp_prune_equals_mask(family):
    """Heads + MLP neurons alone (hidden size kept): the physically pruned model computes what the dense
    model computes with the removed heads / neurons zeroed at their producers."""
    model, x = build(family)
    heads, mlp = HEAD_AND_MLP[family]
    graph = ChannelGraph.build(model, x)
    overrides = {mlp: 0.5} | ({heads: 0.5} if heads else {})
    plan = make_plan(model, graph, ratio=0.0, overrides=overrides)
    assert any(gp.pruned for gp in plan.groups)
    small, masked = apply(model, graph, plan), mask(model, graph, plan)
    assert _params(small) < _params(model)
    torch.testing.assert_close(logits(small, x), logits(masked, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ATTENTION)
def test_an_override_on_any_projection_of_a_head_selects_the_head_group(family):
    model, x = build(family)
    graph = ChannelGraph.build(model, x)
    q = HEAD_AND_MLP[family][0]
    group = graph.group(next(n for n in graph.module_kinds if __import__("fnmatch").fnmatchcase(n, q)))
    assert len(group.prunable) in (1, 2, 4), group  # heads (or kv groups), not head_dim channels
    producers = group.producers
    if family == "t5":  # one relative position bias (an Embedding with one column per head) feeds every layer
        assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias" in producers
        assert {f"encoder.block.{i}.layer.0.SelfAttention.{p}" for i in (0, 1) for p in "qkv"} <= set(producers)
    else:
        assert producers and all(p.rsplit(".", 1)[0] == producers[0].rsplit(".", 1)[0] for p in producers)


@pytest.mark.parametrize("family", ["vit", "bert", "gpt2", "llama"])
def test_must_reach_half_the_parameters_and_two_of_four_heads(family):
    model, x = build(family, hidden=128, intermediate=256)
    small = prunekit.prune(model, x, ratio=0.5)
    removed = 1 - _params(small) / _params(model)
    assert removed >= 0.45, removed
    assert small.config.num_attention_heads == 2
    if family == "llama":
        assert small.config.num_key_value_heads == 1
    q_widths = {m.weight.shape[0] if type(m).__name__ != "Conv1D" else m.weight.shape[1] // 3
                for n, m in small.named_modules() if n.endswith(("q_proj", "query", "c_attn"))}
    assert q_widths == {2 * 32}


def test_gqa_removes_a_kv_head_with_the_query_heads_that_share_it():
    model, x = build("llama", heads=4)
    graph = ChannelGraph.build(model, x)
    g = graph.group("model.layers.0.self_attn.q_proj")
    assert g.size == 2  # 2 kv heads, each with its 2 query heads
    assert {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
            "model.layers.0.self_attn.q_proj"} <= set(g.producers)
    plan = make_plan(model, graph, ratio=0.0, overrides={"model.layers.0.self_attn.k_proj": 0.5})
    small = apply(model, graph, plan)
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 16
    assert attn.o_proj.in_features == 2 * 16
    torch.testing.assert_close(logits(small, x), logits(mask(model, graph, plan), x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["vit", "bert", "gpt2", "llama"])
def test_uniform_prune_round_trips_through_save_pretrained(family, tmp_path):
    model, x = build(family)
    small = prunekit.prune(model, x, ratio=0.5)
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert (logits(again, x) - logits(small, x)).abs().max().item() <= 1e-5


def test_per_layer_widths_refuse_save_pretrained_with_the_fix(tmp_path):
    model, x = build("bert")
    graph = ChannelGraph.build(model, x)
    plan = make_plan(model, graph, ratio=0.0, overrides={"bert.encoder.layer.0.intermediate.dense": 0.5})
    small = apply(model, graph, plan)
    with pytest.raises(ConfigError, match="prunekit.io.save_model"):
        small.save_pretrained(tmp_path)
    assert small.config.intermediate_size == 128  # left alone


def test_gpt2_keeps_its_tied_embedding_tied():
    model, x = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    small = prunekit.prune(model, x, ratio=0.5)
    assert small.lm_head.weight is small.transformer.wte.weight
    assert small.lm_head.weight.shape == (1000, 32)


def test_gpt2_split_size_follows_the_heads():
    model, x = build("gpt2")
    small = prunekit.prune(model, x, ratio=0.5)
    attn = small.transformer.h[0].attn
    assert attn.split_size == 32 and attn.num_heads == 2
    assert attn.c_attn.weight.shape == (32, 96)


def test_convnext_channels_first_layernorm_is_sliced():
    model, x = build("convnext")
    small = prunekit.prune(model, x, ratio=0.5)
    norms = [m for m in small.modules() if type(m).__name__ == "ConvNextLayerNorm"]
    assert norms and all(m.weight.shape[0] == m.normalized_shape[0] for m in norms)
    assert any(m.data_format == "channels_first" and m.weight.shape[0] < 16 for m in norms)
    assert logits(small, x).shape == (2, 10)


def test_convnext_layer_scale_parameter_follows_its_channels():
    import transformers as T

    model = T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                              num_labels=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = ChannelGraph.build(model, x)
    params = [m for m in graph.members if m.role == "param"]
    assert any(m.param == "layer_scale_parameter" and m.group.min() >= 0 for m in params)
    small = prunekit.prune(model, x, ratio=0.5)
    scale = small.convnext.encoder.stages[0].layers[0].layer_scale_parameter
    assert scale.shape[0] == small.convnext.encoder.stages[0].layers[0].pwconv2.out_features < 16


def test_vit_cls_token_and_position_embeddings_are_sliced_with_the_hidden_size():
    model, x = build("vit")
    small = prunekit.prune(model, x, ratio=0.5)
    emb = small.vit.embeddings
    assert emb.cls_token.shape == (1, 1, 32) and emb.position_embeddings.shape[-1] == 32


def test_override_on_a_protected_group_is_an_error_naming_the_reason():
    model, x = build("bert")
    graph = ChannelGraph.build(model, x, ignored=["bert.encoder.layer.0.attention.self"])
    with pytest.raises(ConfigError, match="protected.*ignored"):
        make_plan(model, graph, ratio=0.0, overrides={"bert.encoder.layer.0.attention.self.query": 0.5})


def test_decoder_graph_from_input_ids_alone():
    model, x = build("llama")
    graph = ChannelGraph.build(model, x)  # no use_cache=False from the caller
    assert graph.example_inputs[1].get("use_cache") is False
    assert len(graph.prunable_groups) >= 5  # hidden, 2 × (kv groups, MLP)


def test_head_groups_score_the_sum_of_their_rows():
    model, x = build("bert")
    graph = ChannelGraph.build(model, x)
    g = graph.group("bert.encoder.layer.0.attention.self.query")
    from prunekit.engine.criteria import ScoreContext, get_criterion

    scores = get_criterion("l1-norm")(ScoreContext(model, graph), g)
    attn = model.bert.encoder.layer[0].attention.self
    expected = sum(lin.weight.detach().abs().sum(1).view(4, 16).sum(1).double()
                   for lin in (attn.query, attn.key, attn.value))
    np.testing.assert_allclose(scores.numpy(), expected.numpy(), rtol=1e-6)


def test_t5_shared_embedding_couples_encoder_and_decoder_hidden_size():
    """T5's encoder and decoder read one embedding: their hidden sizes are one group, which the encoder's
    output (``encoder_last_hidden_state``, a model output) protects; heads and MLP still shrink."""
    model, x = build("t5")
    graph = ChannelGraph.build(model, x)
    enc = graph.group("encoder.embed_tokens")
    assert enc is graph.group("decoder.embed_tokens") and enc.protected
    small = prunekit.prune(model, x, ratio=0.5)
    assert small.encoder.embed_tokens.weight is small.decoder.embed_tokens.weight
    assert small.encoder.block[0].layer[1].DenseReluDense.wi.out_features == 64
    assert logits(small, x).shape == logits(model, x).shape


@pytest.mark.parametrize("family", ["gpt2", "llama", "swin"])
def test_save_model_reloads_into_the_dense_model(family, tmp_path):
    """prunekit.io reloads any pruned model given its dense model: shapes, head-count attributes,
    functional parameters, the config and tied weights come back."""
    from prunekit.io import load_model, save_model

    model, x = build(family)
    small = prunekit.prune(model, x, ratio=0.5)
    save_model(tmp_path / "m", small)
    dense, _ = build(family, seed=1)
    again, _ = load_model(tmp_path / "m", model=dense)
    assert again is dense
    torch.testing.assert_close(logits(again, x), logits(small, x), atol=0, rtol=0)
    if family == "gpt2":
        assert again.lm_head.weight is again.transformer.wte.weight
        assert again.transformer.h[0].attn.split_size == 32 and again.config.num_attention_heads == 2


def test_a_config_that_refuses_the_new_sizes_only_refuses_save_pretrained(tmp_path):
    """8 query / 4 kv heads, one kv group of 4 removed: 6 heads do not divide hidden 64, which Llama's config
    validation rejects — the prune still works and save_pretrained says why."""
    model, x = build("llama", heads=8)
    small = prunekit.prune(model, x, ratio=0.0, overrides={"*.self_attn.k_proj": 0.25})
    assert small.model.layers[0].self_attn.q_proj.out_features == 6 * 8
    assert logits(small, x).shape == logits(model, x).shape
    with pytest.raises(ConfigError, match="cannot be described by its Hugging Face config"):
        small.save_pretrained(tmp_path)
