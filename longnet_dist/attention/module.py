"""DilatedAttention: multi-head self-attention layer built on `dilated_attention`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .checks import check_branches
from .functional import dilated_attention
from .rotary import apply_rotary


class DilatedAttention(nn.Module):
    """q/k/v and output projections around LongNet dilated attention, with optional rotary positions."""

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 *, causal: bool = True, rotary: bool = True, rotary_base: float = 10000.0, bias: bool = False,
                 backend: str | None = None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.segment_lengths, self.dilation_rates = check_branches(segment_lengths, dilation_rates)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal, self.rotary, self.rotary_base, self.backend = causal, rotary, rotary_base, backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor, *, positions: Tensor | None = None, key_padding_mask: Tensor | None = None,
                sequence_group=None) -> Tensor:
        """x (B, N, E) -> (B, N, E); `positions` (N,) are the global positions of x's rows (rotary)."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, D) each
        if self.rotary:
            if positions is None:
                positions = torch.arange(N, device=x.device)
            q, k = apply_rotary(q, positions, self.rotary_base), apply_rotary(k, positions, self.rotary_base)
        attn = dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, causal=self.causal,
                                 key_padding_mask=key_padding_mask, sequence_group=sequence_group,
                                 backend=self.backend)
        return self.out(attn.reshape(B, N, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, segment_lengths={self.segment_lengths}, "
                f"dilation_rates={self.dilation_rates}, causal={self.causal}, rotary={self.rotary}")
