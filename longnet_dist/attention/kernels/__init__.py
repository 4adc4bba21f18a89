"""Attention kernels that return the log-sum-exp, forward and backward, chosen in one place.

Every per-branch kernel here works on the same layout and contract, so the dilated and the
sequence-parallel code never care which one runs:

    q: (B, Lq, H, D), k, v: (B, Lk, H, D)       any strides, same dtype
    key_valid: (B, Lk, H) bool or None          False = this key may not be attended
    bias: (B or 1, H or 1, Lq, Lk) or None       added to the scaled scores (CPU kernels only; nesting.py)
    causal: top-left aligned, query i sees keys j <= i
    -> out (B, Lq, H, D) in q.dtype, lse (B, Lq, H) in float32 (float64 for float64 input)

A query row with no key left (all masked) gets out = 0 and lse = -inf ("not covered"). The backward
takes the output and lse of the *merged* softmax (see dilated.py); a row whose lse is not finite
carries no gradient.

Families (one module each):
- `aten.py`: "cpu_flash" (aten's CPU flash kernel) and "cuda_flash" (aten's CUDA flash kernel, or
  the memory-efficient kernel when a mask is needed).
- `chunked.py`: "chunked", portable (any device and dtype), blocks of queries in plain torch ops.
- `triton_dilated.py`: "triton", the fused LongNet kernel. It is not a per-branch kernel: it reads
  every branch's rows in place through strides and merges the branches (Eq. 9-10) inside the
  kernel; `attention/fused.py` and `attention/fused_launch.py` drive it. Its plain-torch twin is the
  gather path above.

`backend=None` picks the fastest family available for the tensors (`select_backend`).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from . import aten, chunked

BACKENDS = ("cpu_flash", "cuda_flash", "chunked", "triton")
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # the fused kernel's tile widths (tl.dot blocks are powers of two >= 16)


def triton_width(head_dim: int) -> int | None:
    """The width of the fused kernels' tiles for rows of `head_dim` values: itself, or the next of TRITON_HEAD_DIMS,
    the columns past the rows' end masked in the kernels (triton_columns.py: the rows are read and written in place,
    never padded); None above 128."""
    return next((width for width in TRITON_HEAD_DIMS if width >= head_dim), None)


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(q: Tensor, backend: str | None = None) -> str:
    """The kernel family that will run for `q`: `backend` when given (checked), else the fastest available."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)} or None (auto)")
        if backend == "cpu_flash" and q.device.type != "cpu":
            raise ValueError(f"backend 'cpu_flash' needs CPU tensors, got device {q.device}")
        if backend == "cuda_flash" and q.device.type != "cuda":
            raise ValueError(f"backend 'cuda_flash' needs CUDA tensors, got device {q.device}")
        if backend == "triton":
            if not triton_available(q.device):
                raise ValueError(f"backend 'triton' needs CUDA tensors and the triton package (or TRITON_INTERPRET=1 "
                                 f"on CPU), got device {q.device}")
            if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"backend 'triton' runs float16, bfloat16 and float32, got {q.dtype}")
            if triton_width(q.shape[-1]) is None:
                raise ValueError(f"backend 'triton' needs head_dim <= {TRITON_HEAD_DIMS[-1]} (it runs {TRITON_HEAD_DIMS} "
                                 f"and pads the others up to the next in its tiles, masked), got {q.shape[-1]}")
        return backend
    if q.device.type == "cpu" and q.dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        return "cpu_flash"
    if q.device.type == "cuda" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if triton_width(q.shape[-1]) is not None and triton_available(q.device):
            return "triton"
        return "cuda_flash"
    return "chunked"


def branch_backend(kind: str, q: Tensor) -> str:
    """The per-branch kernel behind a family: "triton" fuses whole branches, so a branch that must
    run on its own (a sequence-parallel spanning branch) uses the aten kernel of the same device."""
    if kind != "triton":
        return kind
    return "cuda_flash" if q.device.type == "cuda" else "chunked"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of log-sum-exps and of the branch merge: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _covered_rows(key_valid: Tensor, lq: int, causal: bool) -> Tensor:
    """(B, Lq, H) bool: does query row i have at least one valid key?"""
    if not causal:
        return key_valid.any(dim=1, keepdim=True).expand(-1, lq, -1)
    seen = key_valid.to(torch.uint8).cummax(dim=1).values.bool()  # (B, Lk, H): any valid key at <= j
    if lq <= seen.shape[1]:
        return seen[:, :lq]
    tail = seen[:, -1:].expand(-1, lq - seen.shape[1], -1)  # rows past Lk see every key
    return torch.cat([seen, tail], dim=1)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float,
                      key_valid: Tensor | None = None, backend: str | None = None,
                      bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention of q over k, v. Returns (out (B, Lq, H, D), lse (B, Lq, H))."""
    kind = branch_backend(select_backend(q, backend), q)
    if kind == "chunked":
        return chunked.forward(q, k, v, causal, scale, key_valid, bias)
    out, lse = aten.forward(kind, q, k, v, causal, scale, key_valid, bias)
    lse = lse.to(lse_dtype(q.dtype))
    if key_valid is not None:  # the kernels return lse = 0 for fully masked rows: mark them uncovered
        covered = _covered_rows(key_valid, q.shape[1], causal)
        lse = lse.masked_fill(~covered, float("-inf"))
        out = out.masked_fill(~covered.unsqueeze(-1), 0.0)
    return out, lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       causal: bool, scale: float, key_valid: Tensor | None = None,
                       backend: str | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of softmax attention, given the output and lse of the softmax that
    this attention is part of. Rows whose lse is not finite get no gradient."""
    kind = branch_backend(select_backend(q, backend), q)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # exp(s - inf) = 0
    if kind == "chunked":
        return chunked.backward(grad_out, q, k, v, out, lse, causal, scale, key_valid, bias)
    return aten.backward(kind, grad_out, q, k, v, out, lse, causal, scale, key_valid, bias)


def dense_flops(lq: int, lk: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward multiply-add FLOPs of one attention: 2 matmuls of 2*Lq*Lk*D each per head."""
    if not causal:
        pairs = lq * lk
    elif lq <= lk:  # top-left causal: query i sees i + 1 keys
        pairs = lq * (lq + 1) / 2
    else:
        pairs = lk * (lk + 1) / 2 + (lq - lk) * lk
    return 4.0 * pairs * heads * head_dim


def dilated_flops(seq_len: int, heads: int, head_dim: int, segment_lengths, dilation_rates, causal: bool) -> float:
    """Forward FLOPs of dilated attention: per branch, one attention of m = ceil(w/r) slots per segment."""
    from ..layout import BranchLayout

    total = 0.0
    for w, r in zip(segment_lengths, dilation_rates):
        layout = BranchLayout(seq_len, heads, w, r)
        total += layout.num_segments * dense_flops(layout.slots, layout.slots, heads, head_dim, causal)
    return total


def branch_range(direction: str, segment_length: int, dilation: int):
    """A torch.profiler range around one branch's work ("dilated fwd w=2048 r=1"; direction fwd or
    bwd), so a profile (benchmarks/gpu_profile.py) splits the attention time by branch. Nothing at
    all while no profiler runs (a range costs microseconds of host time)."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"dilated {direction} w={segment_length} r={dilation}")


__all__ = ["BACKENDS", "TRITON_HEAD_DIMS", "triton_width", "attention_backward", "attention_forward", "branch_backend", "branch_range",
           "dense_flops", "dilated_flops", "lse_dtype", "select_backend", "triton_available"]
