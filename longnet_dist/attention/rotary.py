"""Rotary position embedding (RoPE), applied at global token positions."""
from __future__ import annotations

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (N, 1, head_dim / 2) for integer `positions` (N,)."""
    if head_dim % 2 != 0:
        raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (N, D/2), float64: exact at 1e9 tokens
    return angles.cos().float().unsqueeze(1), angles.sin().float().unsqueeze(1)


def apply_rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, N, H, D) by position-dependent angles."""
    cos, sin = rotary_angles(positions, x.shape[-1], base)
    first, second = x.float().chunk(2, dim=-1)  # (B, N, H, D/2) each
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)
