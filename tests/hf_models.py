"""Small ``transformers`` models (random weights) for the engine's transformer tests.

Every family the engine claims to handle, built from a config small enough for a 2-core CPU: hidden 64,
2 layers, 4 heads (2 key/value heads for the grouped-query decoders), intermediate 128, vocab 1000.
``SIZES`` overrides them (the issue's must-reach configuration is hidden 128 / intermediate 256).
"""
from __future__ import annotations

import torch

FAMILIES = ("vit", "deit", "swin", "bert", "distilbert", "gpt2", "llama", "mistral", "qwen2", "t5", "convnext")

#: the projection names an override may use to select a family's heads and its MLP neurons
HEAD_AND_MLP = {
    "vit": ("*.attention.q_proj", "*.mlp.fc1"),
    "deit": ("*.attention.q_proj", "*.mlp.fc1"),
    "swin": ("*.attention.q_proj", "*.mlp.fc1"),
    "bert": ("*.attention.self.query", "*.intermediate.dense"),
    "distilbert": ("*.attention.q_lin", "*.ffn.lin1"),
    "gpt2": ("*.attn.c_attn", "*.mlp.c_fc"),
    "llama": ("*.self_attn.q_proj", "*.mlp.gate_proj"),
    "mistral": ("*.self_attn.q_proj", "*.mlp.gate_proj"),
    "qwen2": ("*.self_attn.q_proj", "*.mlp.gate_proj"),
    "t5": ("*.SelfAttention.q", "*.DenseReluDense.wi"),
    "convnext": (None, "*.pwconv1"),
}


def build(name: str, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
          vocab: int = 1000, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """``(model in eval mode, example input)`` for family ``name``."""
    import transformers as T

    torch.manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate)
    if name in ("vit", "deit"):
        cls, cfg = {"vit": (T.ViTForImageClassification, T.ViTConfig),
                    "deit": (T.DeiTForImageClassification, T.DeiTConfig)}[name]
        model, x = cls(cfg(**common, image_size=32, patch_size=8, num_labels=10)), image
    elif name == "swin":
        model = T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=hidden // 2, depths=[2, 2], num_heads=[2, heads], window_size=4,
            num_labels=10))
        x = image
    elif name == "bert":
        model, x = T.BertForSequenceClassification(T.BertConfig(vocab_size=vocab, **common)), ids
    elif name == "distilbert":
        model = T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate))
        x = ids
    elif name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                               n_inner=intermediate, bos_token_id=0, eos_token_id=0))
        x = ids
    elif name in ("llama", "mistral", "qwen2"):
        cls, cfg = {"llama": (T.LlamaForCausalLM, T.LlamaConfig), "mistral": (T.MistralForCausalLM, T.MistralConfig),
                    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config)}[name]
        model, x = cls(cfg(vocab_size=vocab, num_key_value_heads=max(1, heads // 2), **common)), ids
    elif name == "t5":
        model = T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=vocab, d_model=hidden, num_layers=layers, num_heads=heads, d_ff=intermediate,
            d_kv=hidden // heads, decoder_start_token_id=0))
        x = {"input_ids": ids, "decoder_input_ids": ids}
    elif name == "convnext":
        model = T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10, layer_scale_init_value=0.0))
        x = image
    else:
        raise KeyError(name)
    return model.eval(), x


def logits(model: torch.nn.Module, x: object) -> torch.Tensor:
    """The model's logits for ``x`` (a tensor of token ids or pixels, or a dict of inputs)."""
    with torch.no_grad():
        if isinstance(x, dict):
            out = model(**x)
        elif x.dtype == torch.long:
            out = model(input_ids=x)
        else:
            out = model(pixel_values=x)
    return out.logits
