"""Rotary position embedding (RoPE), applied at global token positions."""
from __future__ import annotations

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, head_dim: int, base: float = 10000.0,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (1, N, 1, head_dim / 2) in `dtype` for integer `positions` (N,).

    Angles are formed in float64 (exact at 1e9 tokens) and rounded once to `dtype`; build them once
    per forward and share them across layers (`apply_rotary(..., tables=...)`).
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (N, D/2)
    return angles.cos().to(dtype)[None, :, None], angles.sin().to(dtype)[None, :, None]


def apply_rotary(x: Tensor, positions: Tensor | None = None, base: float = 10000.0, *,
                 tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, N, H, D) by position-dependent angles.

    `tables` (cos, sin from rotary_angles) skip rebuilding them; the rotation runs in their dtype
    (float32 tables: as without tables; tables in x.dtype: no float32 round trip).
    """
    cos, sin = tables if tables is not None else rotary_angles(positions, x.shape[-1], base)
    first, second = x.to(cos.dtype).chunk(2, dim=-1)  # (B, N, H, D/2) each
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)
