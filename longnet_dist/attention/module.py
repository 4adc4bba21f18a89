"""DilatedAttention: multi-head self-attention layer built on `dilated_attention`."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from .checks import check_branches, check_flag
from .decode import dilated_attention_step
from .kernels import BACKENDS
from .functional import dilated_attention, packed_dilated_attention
from .rotary import rotary_angles, rotate_packed, rotate_qk


class DilatedAttention(nn.Module):
    """q/k/v and output projections around LongNet dilated attention, with optional rotary positions."""

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 *, causal: bool = True, rotary: bool = True, rotary_base: float = 10000.0, bias: bool = False,
                 backend: str | None = None):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        causal, rotary, bias = (check_flag(name, value) for name, value in
                                (("causal", causal), ("rotary", rotary), ("bias", bias)))
        if rotary and (embed_dim // num_heads) % 2:
            raise ValueError(f"rotary positions rotate pairs of columns: head_dim = embed_dim / num_heads = "
                             f"{embed_dim} / {num_heads} = {embed_dim // num_heads} must be even (or rotary=False)")
        if rotary and (isinstance(rotary_base, bool) or not isinstance(rotary_base, numbers.Real)
                       or not math.isfinite(rotary_base) or rotary_base <= 0):
            raise ValueError(f"rotary_base must be a finite number > 0 (e.g. 10000.0), got {rotary_base!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)} or None (the fastest for the device)")
        self.segment_lengths, self.dilation_rates = check_branches(segment_lengths, dilation_rates)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal, self.rotary, self.rotary_base, self.backend = causal, rotary, rotary_base, backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor, *, positions: Tensor | None = None, key_padding_mask: Tensor | None = None,
                sequence_group=None, rotary_tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, N, E) -> (B, N, E); `positions` (N,) are the global positions of x's rows (rotary).

        `rotary_tables` (cos, sin from `rotary_angles`, shared by all layers) replace `positions`.
        q, k, v stay one packed tensor throughout, so their gradient is accumulated as one (no copy joins
        dq, dk and dv on the CPU kernels).
        """
        qkv = self.project(x, positions=positions, rotary_tables=rotary_tables, packed=True)
        attn = self.attend_packed(qkv, key_padding_mask=key_padding_mask, sequence_group=sequence_group)
        return self.out(attn.flatten(2))

    def project(self, x: Tensor, *, positions: Tensor | None = None, rotary_tables: tuple[Tensor, Tensor] | None = None,
                packed: bool = False) -> tuple[Tensor, Tensor, Tensor] | Tensor:
        """x (B, N, E) -> q, k, v (B, N, H, D), q and k rotated: the token-wise part before attention.
        `packed`: one (B, N, 3, H, D) tensor instead (`rotate_packed`), for `attend_packed`."""
        self._check_input(x, positions)
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, N, 3, H, D)
        if self.rotary:
            if rotary_tables is None:
                positions = torch.arange(N, device=x.device) if positions is None else positions
                rotary_tables = rotary_angles(positions, D, self.rotary_base)
            if packed:
                return rotate_packed(qkv, rotary_tables)
            q, k = rotate_qk(qkv, rotary_tables).unbind(2)
            return q, k, qkv[:, :, 2]
        return qkv if packed else qkv.unbind(2)

    def _check_input(self, x: Tensor, positions: Tensor | None) -> None:
        """x (B, N, embed_dim) in the weights' dtype; positions (N,) integers: one clear error before the projection."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (batch, seq, embed_dim={self.embed_dim}), got {shape}")
        if x.dtype != self.qkv.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x is {x.dtype} but the layer's weights are {self.qkv.weight.dtype}: cast x, or the layer "
                             f"(.to({x.dtype}))")
        if positions is not None and (not isinstance(positions, Tensor) or positions.shape != (x.shape[1],)
                                      or positions.is_floating_point() or positions.dtype == torch.bool):
            got = f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, Tensor) else type(positions).__name__
            raise ValueError(f"positions must be an integer tensor of shape (seq,) = ({x.shape[1]},), got {got}")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
               sequence_group=None) -> Tensor:
        """Dilated attention (B, N, H, D) of projected q, k, v (B, N, H, D)."""
        return dilated_attention(q, k, v, **self._options(key_padding_mask, sequence_group))

    def attend_packed(self, qkv: Tensor, *, key_padding_mask: Tensor | None = None, sequence_group=None) -> Tensor:
        """`attend(*qkv.unbind(2))` of a packed projection qkv (B, N, 3, H, D), its gradient kept packed."""
        return packed_dilated_attention(qkv, **self._options(key_padding_mask, sequence_group))

    def attend_step(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, position: int) -> Tensor:
        """Row `position` (B, H, D) of causal attention, its query q (B, H, D) against the cached rows 0..position
        (B, >= position + 1, H, D) each: generation with a key/value cache (attention/decode.py)."""
        if not self.causal:
            raise ValueError("attend_step computes causal attention; this layer has causal=False")
        return dilated_attention_step(q, k_cache, v_cache, position, self.segment_lengths, self.dilation_rates)

    def _options(self, key_padding_mask: Tensor | None, sequence_group) -> dict:
        return dict(segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates, causal=self.causal,
                    key_padding_mask=key_padding_mask, sequence_group=sequence_group, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, segment_lengths={self.segment_lengths}, "
                f"dilation_rates={self.dilation_rates}, causal={self.causal}, rotary={self.rotary}")
