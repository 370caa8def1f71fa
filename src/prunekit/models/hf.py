"""Zoo entries that are real Hugging Face ``transformers`` models (optional dependency).

* ``vit-fmnist``: ``transformers.ViTForImageClassification`` for 1×28×28 Fashion-MNIST. ``model(x)`` with
  x (B, 1, 28, 28) returns an ``ImageClassifierOutput`` whose ``.logits`` are (B, 10).
* ``llama-shakespeare``: ``transformers.LlamaForCausalLM`` over bytes (vocab 256; GQA, RoPE, SiLU-gated MLP).
  ``model(input_ids)`` with ids (B, T) returns a ``CausalLMOutputWithPast`` whose ``.logits`` are (B, T, 256).

The models are the HF classes themselves (no wrapper): the pruning engine relies on their module names and
``model.config``. ``prunekit_arch`` records the factory's cfg, so ``prunekit.io.save_model`` / ``load_model``
rebuild them by name. Importing this module does not import ``transformers``; building a model without it
raises :class:`TransformersMissingError` (a ConfigError and an ImportError).
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .registry import check_common, check_float, check_int, register_model

__all__ = ["TRANSFORMERS_MODELS", "TransformersMissingError"]

#: the zoo names this module registers (not image classifiers returning plain logits: HF outputs, token inputs)
TRANSFORMERS_MODELS = ("llama-shakespeare", "vit-fmnist")


class TransformersMissingError(ConfigError, ImportError):
    """A zoo model needs the optional ``transformers`` package."""


def _transformers(model: str) -> Any:
    try:
        import transformers
    except ImportError as e:
        raise TransformersMissingError(f"model '{model}' is a Hugging Face transformers model; install it with "
                                       f"`pip install prunekit[transformers]` ({e})") from e
    return transformers


def _check_heads(hidden: int, heads: int, kv_heads: int | None = None) -> None:
    if hidden % heads:
        raise ConfigError(f"model cfg 'hidden_size'={hidden} must be divisible by num_attention_heads={heads}")
    if kv_heads is not None and heads % kv_heads:
        raise ConfigError(f"model cfg 'num_attention_heads'={heads} must be divisible by "
                          f"num_key_value_heads={kv_heads}")


@register_model("vit-fmnist")
def vit_fmnist(*, num_classes=10, in_channels=1, input_size=28, patch_size=7, hidden_size=128,
               num_hidden_layers=6, num_attention_heads=4, intermediate_size=None, dropout=0.0,
               attention_dropout=0.0):
    """ViT for small grayscale images: (B, C, S, S) → ``.logits`` (B, num_classes).

    Defaults: patch 7 on 28×28 (16 patches + CLS = 17 tokens), hidden 128, 6 layers, 4 heads, MLP 512
    (``intermediate_size=None`` → 4 × hidden); 1.2 M parameters. Patch 7 rather than 4: a third of the
    tokens, so about 3× cheaper per image, which is what fits the ``vit-fmnist`` recipe into a 2-core CPU budget.
    """
    nc, ic, size = check_common(num_classes, in_channels, input_size)
    patch, hidden = check_int("patch_size", patch_size), check_int("hidden_size", hidden_size)
    layers, heads = check_int("num_hidden_layers", num_hidden_layers), check_int("num_attention_heads",
                                                                                  num_attention_heads)
    inter = check_int("intermediate_size", 4 * hidden if intermediate_size is None else intermediate_size)
    drop, attn_drop = check_float("dropout", dropout, 0, 1, False), check_float("attention_dropout",
                                                                               attention_dropout, 0, 1, False)
    if size % patch:
        raise ConfigError(f"model cfg 'input_size'={size} must be divisible by patch_size={patch}")
    _check_heads(hidden, heads)
    T = _transformers("vit-fmnist")
    config = T.ViTConfig(image_size=size, patch_size=patch, num_channels=ic, num_labels=nc, hidden_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                         hidden_dropout_prob=drop, attention_probs_dropout_prob=attn_drop)
    model = T.ViTForImageClassification(config)
    model.input_shape = (ic, size, size)
    return model, {"intermediate_size": inter}


@register_model("llama-shakespeare")
def llama_shakespeare(*, vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=688, max_position_embeddings=256,
                      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5):
    """Byte-level Llama: ids (B, T ≤ max_position_embeddings) → ``.logits`` (B, T, vocab_size).

    Defaults: hidden 256, 4 layers, 8 query / 4 key-value heads (head_dim 32), SiLU-gated MLP 688
    (≈ 8/3 × hidden, a multiple of 16), RoPE θ 1e4, untied embeddings; 3.0 M parameters. Untied: at vocab
    256 tying saves only 65 k parameters, and separate ``embed_tokens`` / ``lm_head`` keep pruning and
    reloading free of shared tensors.
    """
    vocab, hidden = check_int("vocab_size", vocab_size, 2), check_int("hidden_size", hidden_size)
    layers = check_int("num_hidden_layers", num_hidden_layers)
    heads, kv = check_int("num_attention_heads", num_attention_heads), check_int("num_key_value_heads",
                                                                                   num_key_value_heads)
    inter, positions = check_int("intermediate_size", intermediate_size), check_int("max_position_embeddings",
                                                                                     max_position_embeddings)
    if not isinstance(tie_word_embeddings, bool):
        raise ConfigError(f"model cfg 'tie_word_embeddings' must be True or False, got {tie_word_embeddings!r}")
    theta, eps = check_float("rope_theta", rope_theta, 1.0), check_float("rms_norm_eps", rms_norm_eps, 0.0)
    _check_heads(hidden, heads, kv)
    T = _transformers("llama-shakespeare")
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                           max_position_embeddings=positions, tie_word_embeddings=tie_word_embeddings,
                           rope_theta=theta, rms_norm_eps=eps, bos_token_id=None, eos_token_id=None,
                           pad_token_id=None, use_cache=False)
    return T.LlamaForCausalLM(config)
