"""Input checks: one clear ValueError, naming the bad value and what would be valid, before compute."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def _is_positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def check_branches(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> tuple[list[int], list[int]]:
    """Validate the (w_i, r_i) lists; returns them as plain int lists."""
    segment_lengths, dilation_rates = list(segment_lengths), list(dilation_rates)
    if len(segment_lengths) == 0:
        raise ValueError("segment_lengths is empty; give at least one branch, e.g. segment_lengths=[2048], "
                         "dilation_rates=[1]")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(f"segment_lengths {segment_lengths} and dilation_rates {dilation_rates} must have the same "
                         f"length (one dilation rate per segment length), got {len(segment_lengths)} and "
                         f"{len(dilation_rates)}")
    for w, r in zip(segment_lengths, dilation_rates):
        if not _is_positive_int(w):
            raise ValueError(f"segment length {w!r} in {segment_lengths} must be a positive integer")
        if not _is_positive_int(r):
            raise ValueError(f"dilation rate {r!r} in {dilation_rates} must be a positive integer")
        if r > w:
            raise ValueError(f"dilation rate {r} is larger than its segment length {w}: a segment of {w} rows "
                             f"keeps every r-th row, so r must be in 1..{w}")
    return segment_lengths, dilation_rates


def check_qkv(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    """q, k, v: same (B, N, H, D) shape, dtype and device; mask (B, N) bool."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape (batch, seq, heads, head_dim) for self-attention, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
            raise ValueError(f"key_padding_mask must have shape (batch, seq) = {tuple(q.shape[:2])}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (default head_dim ** -0.5 = {head_dim ** -0.5:.4g}), "
                         f"got {scale!r}")
    return float(scale)
