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


def rotate_packed(qkv: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
    """A fused projection's qkv (B, N, 3, H, D) with q and k rotated (`apply_rotary`) and v as it is, as one
    new packed tensor: the input `packed_dilated_attention` takes, so the gradient stays packed too.

    The rotation writes straight into the result, forward and backward (a few passes, no concatenation),
    in the tables' dtype: with tables in qkv's dtype no float32 copy at all, else through one buffer for
    q and k in the tables' dtype, rounded once. Its bits equal `apply_rotary`'s (the same products and sums in the
    same order). Code being compiled takes the composition (inductor fuses it itself).
    """
    if torch.compiler.is_compiling():
        return torch.cat([rotate_qk(qkv, tables), qkv[:, :, 2:]], dim=2)
    return _RotatePacked.apply(qkv, *tables)


def rotate_qk(qkv: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
    """q and k of a fused projection's qkv (B, N, 3, H, D), rotated by `apply_rotary` as 2H heads at once:
    (B, N, 2, H, D)."""
    B, N, _, H, D = qkv.shape
    return apply_rotary(qkv[:, :, :2].reshape(B, N, 2 * H, D), tables=tables).view(B, N, 2, H, D)


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> None:
    """out[:, :, :2] = x[:, :, :2] rotated by the angles (by minus them: `inverse`), out[:, :, 2] = x[:, :, 2].
    x, out (B, N, 3, H, D); cos, sin (1, N, 1, D/2), broadcast as (1, N, 1, 1, D/2) over the 2 x H heads."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    first, second = x[:, :, :2, :, :half], x[:, :, :2, :, half:]  # (B, N, 2, H, D/2) views
    direct = out.dtype == cos.dtype  # else through a buffer in the tables' dtype
    qk = out[:, :, :2] if direct else torch.empty(x[:, :, :2].shape, dtype=cos.dtype, device=x.device)
    out_first, out_second = qk[..., :half], qk[..., half:]
    if not inverse:  # (first cos - second sin, first sin + second cos), as apply_rotary computes them
        torch.mul(first, cos, out=out_first).sub_(second * sin)
        torch.mul(first, sin, out=out_second).add_(second * cos)
    else:  # autograd's gradient of that: (g1 cos + g2 sin, g2 cos - g1 sin)
        torch.mul(first, cos, out=out_first).add_(second * sin)
        torch.mul(second, cos, out=out_second).sub_(first * sin)
    if not direct:
        out[:, :, :2].copy_(qk)  # rounded once to out's dtype
    out[:, :, 2].copy_(x[:, :, 2])


class _RotatePacked(torch.autograd.Function):
    """rotate_packed's rotation in place in its output; the backward applies the inverse rotation."""

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        out = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _rotate_into(out, qkv, cos, sin, inverse=False)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        grad_qkv = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _rotate_into(grad_qkv, grad, cos, sin, inverse=True)
        return grad_qkv, None, None
