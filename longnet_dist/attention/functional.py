"""The public function: LongNet dilated attention on one device or sharded over a sequence group."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_branches, check_flag, check_qkv, check_scale
from .dilated import LocalBranch, _DilatedAttentionFunction
from .kernels import select_backend


def dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                      *, causal: bool = False, key_padding_mask: Tensor | None = None, scale: float | None = None,
                      sequence_group=None, backend: str | None = None) -> Tensor:
    """Dilated attention (LongNet, Eq. 9-15) of q, k, v (B, N, H, D); returns (B, N, H, D).

    Branch i keeps, in every segment of `segment_lengths[i]` rows, every `dilation_rates[i]`-th row,
    starting at offset h mod r for head h; branches are mixed by their softmax denominators.
    `key_padding_mask` (B, N) bool marks real tokens (True); padded queries output 0. `scale`
    defaults to head_dim ** -0.5. With `sequence_group` of P ranks (a `longnet_dist.distributed.SequenceGroup`,
    a `torch.distributed.ProcessGroup` or a 1-D `DeviceMesh`), q, k, v are this rank's contiguous shard
    of a sequence of P * N rows and the result is this rank's shard of the single-device result; a
    torch group's segment subgroups are split off it at first use (docs/sequence_parallel.md).
    `backend` forces a kernel family (see kernels/__init__.py); on CUDA the default is the fused
    Triton kernels ("triton"); sharded, the local branches run fused and the spanning ones aten's kernels.
    """
    return _dilated_attention((q, k, v), None, segment_lengths, dilation_rates, causal, key_padding_mask, scale,
                              sequence_group, backend)


def packed_dilated_attention(qkv: Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                             *, causal: bool = False, key_padding_mask: Tensor | None = None,
                             scale: float | None = None, sequence_group=None, backend: str | None = None) -> Tensor:
    """`dilated_attention(*qkv.unbind(2), ...)` of a fused projection's qkv (B, N, 3, H, D): the same result
    and gradient. On the CPU kernels the gradient is accumulated in that packed layout, so no copy joins
    dq, dk and dv (the backward of `unbind`); the fused CUDA kernels take the three views as before."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a torch.Tensor (batch, seq, 3, heads, head_dim), got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seq, 3, heads, head_dim), got {tuple(qkv.shape)}")
    return _dilated_attention(qkv.unbind(2), qkv, segment_lengths, dilation_rates, causal, key_padding_mask, scale,
                              sequence_group, backend)


def _dilated_attention(qkv_views: tuple[Tensor, Tensor, Tensor], packed: Tensor | None, segment_lengths,
                       dilation_rates, causal, key_padding_mask, scale, sequence_group, backend) -> Tensor:
    """Both entry points: `packed` is the (B, N, 3, H, D) tensor whose views `qkv_views` are, or None."""
    q, k, v = qkv_views
    if sequence_group is not None:  # floor 2 -> floor 1 only when sharding is asked for
        from longnet_dist.distributed.group_types import as_sequence_group
        sequence_group = as_sequence_group(sequence_group)  # TypeError/ValueError for anything else
    segment_lengths, dilation_rates = check_branches(segment_lengths, dilation_rates)
    check_qkv(q, k, v, key_padding_mask)
    causal = check_flag("causal", causal)
    scale = check_scale(scale, q.shape[-1], q.dtype)
    if q.shape[1] == 0:  # no rows: an empty output, still part of the graph
        return q * 0
    if any(x.stride(-1) != 1 for x in qkv_views):  # aten's flash kernels read each row's D values as contiguous
        packed, qkv_views = _rows_contiguous(packed, qkv_views)
        q, k, v = qkv_views
    kind = select_backend(q, backend)  # validates a forced backend before any work
    local = sequence_group is None or sequence_group.size == 1
    # Any head dim up to 128 runs fused as it is: the kernels' tiles are the next of 16, 32, 64, 128 wide, their
    # columns past the rows' end masked (kernels/triton_columns.py). Sharded, the spanning branches run aten's CUDA
    # kernels, whose flash kernel takes only head dims that are multiples of 8: those others are padded to one
    if kind == "triton" and not local and q.device.type == "cuda" and q.shape[-1] % 8:
        return _padded(qkv_views, packed, -(-q.shape[-1] // 8) * 8, segment_lengths, dilation_rates, causal,
                       key_padding_mask, scale, sequence_group)
    if local and kind == "triton":  # every branch in one fused kernel family, rows read in place
        from .fused import fused_dilated_attention  # imports triton: only when it runs
        return fused_dilated_attention(q, k, v, list(zip(segment_lengths, dilation_rates)), bool(causal), scale,
                                       key_padding_mask)
    if local:
        branches = [LocalBranch(w, r) for w, r in zip(segment_lengths, dilation_rates)]
    else:
        from .sequence_parallel import plan_branches  # floor 2 -> floor 1 only when sharding is asked for
        branches = plan_branches(q.shape[1], segment_lengths, dilation_rates, sequence_group)
    # sharded with "triton": local branches run fused, spanning ones aten's kernels (kernels.branch_backend)
    q, k, v = (packed, None, None) if packed is not None else (q, k, v)  # packed: one gradient (B, N, 3, H, D)
    return _DilatedAttentionFunction.apply(q, k, v, key_padding_mask, branches, bool(causal), scale, kind)


def _rows_contiguous(packed: Tensor | None, qkv_views: tuple[Tensor, ...]) -> tuple[Tensor | None, tuple[Tensor, ...]]:
    """(packed, views) copied so that the head dim has stride 1 (e.g. views of a (B, N, D, H) buffer): one copy of
    the packed tensor, else of each view that needs it. A fresh tensor's strides, also where D = 1 (where
    `contiguous()` would keep a view whose lone column has another stride)."""
    def fresh(x: Tensor) -> Tensor:
        return x if x.stride(-1) == 1 else x.clone(memory_format=torch.contiguous_format)
    if packed is not None:
        packed = fresh(packed)
        return packed, packed.unbind(2)
    return None, tuple(fresh(x) for x in qkv_views)


def _padded(qkv_views, packed, width, segment_lengths, dilation_rates, causal, key_padding_mask, scale,
            sequence_group) -> Tensor:
    """Dilated attention with the head dim D padded by zero columns to `width` (a sharded run whose aten kernels
    need it): a zero column adds nothing to q.k (the scale stays D's), and the output's padded columns, sums of
    zero values, are cut off; autograd pads dO and cuts the gradients back the same way. Costs the copies."""
    head_dim = qkv_views[0].shape[-1]
    grow = (0, width - head_dim)
    if packed is not None:  # (B, N, 3, H, width): one copy, still one packed gradient
        wide = F.pad(packed, grow)
        views = wide.unbind(2)
    else:
        wide, views = None, tuple(F.pad(x, grow) for x in qkv_views)
    out = _dilated_attention(views, wide, segment_lengths, dilation_rates, causal, key_padding_mask, scale,
                             sequence_group, "triton")
    return out[..., :head_dim]  # (B, N, H, D)
