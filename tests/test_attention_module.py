"""DilatedAttention layer and rotary positions."""
from __future__ import annotations

import torch

from longnet_dist.attention import DilatedAttention, apply_rotary, dilated_attention


def test_rotary_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16, generator=g), torch.randn(1, 1, 2, 16, generator=g)
    def score(pq, pk):
        rq = apply_rotary(q, torch.tensor([pq]))
        rk = apply_rotary(k, torch.tensor([pk]))
        return (rq * rk).sum(-1)
    torch.testing.assert_close(score(5, 2), score(1_000_003, 1_000_000), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4))
    torch.testing.assert_close(apply_rotary(q, torch.tensor([0])), q)  # position 0 is the identity


def test_layer_matches_function_and_trains():
    torch.manual_seed(0)
    layer = DilatedAttention(32, 4, [8, 16], [1, 2], causal=True, rotary=False).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    q, k, v = layer.qkv(x).view(2, 40, 3, 4, 8).unbind(2)
    expected = layer.out(dilated_attention(q, k, v, [8, 16], [1, 2], causal=True).reshape(2, 40, 32))
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()
    assert x.grad is not None and layer.qkv.weight.grad.abs().sum() > 0
    assert "segment_lengths=[8, 16]" in repr(layer)


def test_positions_shift_rotary_like_a_global_offset():
    """A shard given its global positions sees the same rotary phases as the full sequence."""
    torch.manual_seed(0)
    layer = DilatedAttention(16, 2, [8], [1], causal=True)
    x = torch.randn(1, 32, 16)
    full = layer(x)
    second_half = layer(x[:, 16:], positions=torch.arange(16, 32))
    torch.testing.assert_close(second_half, full[:, 16:], rtol=1e-5, atol=1e-6)  # w = 8 divides 16: same segments
