"""Input checks: one clear ValueError, naming the bad value and what would be valid, before compute."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Set as AbstractSet
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def _is_positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def check_flag(name: str, value) -> bool:
    """A bool (numpy's too), else TypeError: `bool("False")` would be True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _int_list(name: str, values) -> list:
    """`values` as a list, its integers (numpy's too) as Python ints; TypeError for a lone value, a string, a
    mapping or a set (whose iteration order or keys would be taken silently)."""
    if isinstance(values, (str, bytes, Mapping, AbstractSet, Tensor, np.ndarray)) or not isinstance(values, Iterable):
        hint = " (e.g. .tolist())" if isinstance(values, (Tensor, np.ndarray)) else ""
        raise TypeError(f"{name} must be a list of integers, e.g. [2048, 4096], got {type(values).__name__} "
                        f"{values!r}{hint}")
    return [int(x) if isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) else x for x in values]


def check_branches(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> tuple[list[int], list[int]]:
    """Validate the (w_i, r_i) lists; returns them as plain int lists."""
    segment_lengths, dilation_rates = _int_list("segment_lengths", segment_lengths), _int_list("dilation_rates",
                                                                                                dilation_rates)
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
    for name, x in (("q", q), ("k", k), ("v", v), ("key_padding_mask", key_padding_mask)):
        if not isinstance(x, Tensor) and not (x is None and name == "key_padding_mask"):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
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


def check_scale(scale, head_dim: int, dtype: torch.dtype = torch.float64) -> float:
    """The softmax scale: `scale`, or head_dim ** -0.5 by default; a positive number that `dtype` holds."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim} (q, k, v of shape (batch, seq, heads, head_dim))")
    if scale is None:
        return head_dim ** -0.5
    largest = torch.finfo(dtype).max
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) \
            or not 0 < scale <= largest:
        raise ValueError(f"scale must be a positive finite number (default head_dim ** -0.5 = {head_dim ** -0.5:.4g}) "
                         f"that {dtype} holds (at most {largest:.3g}), got {scale!r}")
    return float(scale)
