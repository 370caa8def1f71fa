"""Attention written in plain torch (Linear + SDPA or matmul/softmax, fused or separate q/k/v, grouped-query
attention): heads are pruned whole, and the pruned model equals the dense one with those heads zeroed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.engine import ChannelGraph, apply, make_plan, mask


class Block(nn.Module):
    def __init__(self, c: int, heads: int, kv_heads: int, head_dim: int, ffn: int, fused: bool, sdpa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.d = heads, kv_heads, head_dim  # followed by a prune
        self.fused, self.sdpa = fused, sdpa
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        if fused:
            self.qkv = nn.Linear(c, 3 * heads * head_dim)
        else:
            self.q = nn.Linear(c, heads * head_dim)
            self.k, self.v = nn.Linear(c, kv_heads * head_dim), nn.Linear(c, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, c)
        self.fc1, self.fc2 = nn.Linear(c, ffn), nn.Linear(ffn, c)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1) if self.fused else (self.q(h), self.k(h), self.v(h))
        q, k, v = (y.view(b, t, -1, self.d).transpose(1, 2) for y in (q, k, v))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            g = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            causal = torch.ones(t, t, dtype=torch.bool).triu(1)
            att = ((q @ k.transpose(-2, -1)) * self.d ** -0.5).masked_fill(causal, float("-inf")).softmax(-1)
            out = att @ v
        x = x + self.o(out.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.blocks = nn.Sequential(Block(16, **kw), Block(16, **kw))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


@settings(max_examples=12, deadline=None)
@given(heads=st.sampled_from([2, 4, 6]), group=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([2, 4]),
       fused=st.booleans(), sdpa=st.booleans(), head_ratio=st.floats(0.2, 0.7), mlp_ratio=st.floats(0.0, 0.8),
       seed=st.integers(0, 3))
def test_heads_are_pruned_whole_and_pruning_equals_masking(heads, group, head_dim, fused, sdpa, head_ratio,
                                                           mlp_ratio, seed):
    kv = heads if fused or heads % group or heads == group else heads // group  # ≥ 2 kv heads (see docs)
    torch.manual_seed(seed)
    model = Net(heads=heads, kv_heads=kv, head_dim=head_dim, ffn=12, fused=fused, sdpa=sdpa).eval()
    x = torch.randn(2, 7, 5)
    graph = ChannelGraph.build(model, x)
    q = "blocks.0.qkv" if fused else "blocks.0.q"
    g = graph.group(q)
    assert g.size == kv and not g.protected  # one channel per kv head (with its query heads)
    plan = make_plan(model, graph, ratio=0.0, overrides={"blocks.*.qkv" if fused else "blocks.*.k": head_ratio,
                                                         "blocks.*.fc1": mlp_ratio})
    small = apply(model, graph, plan)
    kept = len(plan.group(g.id).keep)
    blk = small.blocks[0]
    assert (blk.num_heads, blk.num_kv_heads) == (kept * (heads // kv), kept)
    if fused:
        assert blk.qkv.out_features == 3 * kept * head_dim
    else:
        assert blk.q.out_features == kept * (heads // kv) * head_dim and blk.k.out_features == kept * head_dim
    assert blk.o.in_features == kept * (heads // kv) * head_dim
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask(model, graph, plan)(x), atol=1e-5, rtol=0)


def test_a_channel_dim_contracted_by_matmul_stays_protected():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

        def forward(self, x):
            return self.a(x) @ self.b(x).transpose(-2, -1)

    g = ChannelGraph.build(Bilinear(), torch.randn(2, 3, 4))
    for name in "ab":
        assert "contracts the channel dim" in next(iter(g.group(name).blocked.values()))


@pytest.mark.parametrize("capture", ["fx", "record"])
def test_head_split_records_owner_and_head_dim(capture):
    model = Net(heads=4, kv_heads=2, head_dim=4, ffn=12, fused=False, sdpa=True).eval()
    graph = ChannelGraph.build(model, torch.randn(2, 7, 5), capture=capture)
    splits = [s for s in graph.head_splits if s.kind == "heads"]
    assert {(s.owner, s.heads, s.head_dim) for s in splits} >= {("blocks.0", 4, 4), ("blocks.0", 2, 4)}
