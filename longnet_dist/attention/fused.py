"""Dilated attention through the fused Triton kernels (kernels/triton_dilated.py) on one device: the
branches' launches (fused_launch.py) chained over shared accumulators, and their autograd Function.

Forward: the merged output starts at 0 and its lse at -inf; each branch's launch reads its rows of
q, k, v in place and folds its (o_i, lse_i) into the fp32 mixture at the same rows (Eq. 9-10). A
branch with r = 1 covers every row: it runs first and writes the accumulators, which then need no
fill (`covering_first`; the same in the backward); in a 16-bit forward it runs last instead and writes the
merged rows straight into the output (`covering_last`).
Backward: delta = rowsum(dO * O) once, then per branch one dK/dV launch that adds into fp32 gradient
accumulators in place (the merged-softmax identity of dilated.py), dQ included by default (fused_settings.DQ_MODE
"tma": TMA bulk reductions from the dK/dV loop), else by a dQ launch of its own. In 16-bit the covering branch runs
last there too and writes dK and dV (and a dQ launch's dQ) in the gradients' dtype; the branches before it mark
the rows they write in a byte each, so the accumulators need no fill.

Memory: the fp32 accumulators are the only buffers of size N beyond inputs and outputs. For long
sequences they cover a group of heads at a time (`head_group`), so one layer's forward+backward
holds about as much as dense flash attention: q, k, v, out, dO, dq, dk, dv in the input dtype plus
fp32 accumulators no larger than one of those tensors, all at the rows' head dim (one between the kernels' widths,
e.g. 80, runs in tiles of the next, 128, whose extra columns the kernels mask: no padded copies). Without an r = 1
branch (or with a second chain) a 16-bit pass stores each group's accumulators into its heads of the outputs with one
row-wise launch per tensor (fused_launch.store_heads); with one, that branch writes the output, dK and dV (dQ too when
a dQ launch computes it).

How each launch runs (block shapes, how dQ is computed, TMA loads, small launches, a second chain of
branches on side streams) is read from fused_settings.py at every call.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
from torch import Tensor

from . import fused_settings as settings
from . import nesting
from .fused_launch import (_fused_dq, backward_branch, backward_prep, forward_branch, key_bytes, merge_chains,
                           store_heads)
from .kernels import branch_range

ACCUMULATOR_BUDGET_BYTES = 512 * 2**20  # below this the accumulators cover all heads at once


def head_group(batch: int, seq_len: int, heads: int, head_dim: int, element_size: int, buffers: int) -> int:
    """Heads per pass: all when `buffers` fp32 accumulators fit the budget, else as many as keep them
    within the size of one input tensor (B, N, H, D)."""
    per_head = buffers * batch * seq_len * head_dim * 4
    allowed = max(ACCUMULATOR_BUDGET_BYTES, batch * seq_len * heads * head_dim * element_size)
    return max(1, min(heads, allowed // per_head))


def covering_first(branches: Sequence[tuple]) -> tuple[list[tuple], bool]:
    """(the branches, (w, r, ...) each, with the first r = 1 branch moved to the front, whether there is one).
    A branch with r = 1 covers every (position, head) row, so run first it can write the accumulators instead
    of adding to them: they need no zero fill, and its launches read nothing back (FIRST)."""
    order = list(branches)
    first = next((i for i, branch in enumerate(order) if branch[1] == 1), None)
    if first is None:
        return order, False
    return [order.pop(first)] + order, True


def covering_last(branches: Sequence[tuple]) -> list[tuple]:
    """The branches with the covering r = 1 branch that covering_first put in front moved to the end.
    Run last, it covers every row, so it can write the merged output in the output's dtype (LAST): the 16-bit
    forward then needs no store pass of its fp32 accumulator, and no fill of it either (the branches before read
    a row's accumulator only where its lse, filled with -inf, is finite). The forward's merge order only changes
    rounding. The 16-bit backward does the same: its branches before mark the rows they write (no fill either)."""
    order = list(branches)
    return order[1:] + order[:1]


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device, index: int = 0) -> torch.cuda.Stream:
    """Side stream `index` of a CUDA device: 0 the first chain's dQ launches, 1 and 2 the second chain's."""
    return torch.cuda.Stream(device=device)


def _dq_stream(device: torch.device, index: int = 0) -> torch.cuda.Stream | None:
    """Side stream `index` for dQ launches when settings.DQ_MODE is "stream" on a CUDA device, else None."""
    _fused_dq(device)  # checks DQ_MODE
    return _side_stream(device, index) if settings.DQ_MODE == "stream" and device.type == "cuda" else None


@functools.lru_cache(maxsize=64)
def _kernel_plan(pairs: tuple[tuple[int, int], ...]) -> list[nesting.KernelFold]:
    return nesting.kernel_plan(pairs)


def with_folds(branches: Sequence[tuple[int, int]], seq_len: int) -> list[tuple[int, int, nesting.KernelFold | None]]:
    """(w, r, fold) of each branch: how it shares keys with the others (nesting.kernel_plan on the effective
    (min(w, N), r)) when settings.SHARE_KEYS is on and no branch has more than 16 nested in it, else None."""
    folds = [None] * len(branches)
    if settings.SHARE_KEYS:
        plan = _kernel_plan(tuple((min(w, seq_len), r) for w, r in branches))
        if all(len(f.nested) <= 16 for f in plan):
            folds = [f if f != nesting.KernelFold() else None for f in plan]
    return [(w, r, f) for (w, r), f in zip(branches, folds)]


def _chains(branches: Sequence[tuple], batch: int, seq_len: int, heads: int, head_dim: int,
            element_size: int, buffers: int) -> tuple[list[tuple], list[tuple], bool]:
    """(first chain, second chain, covering): the branches ((w, r, fold), with_folds) in two chains
    (settings.SIDE_BRANCHES), the first
    led by a covering r = 1 branch if there is one (`covering`, see covering_first). The second chain takes
    the branches of largest r (fewest programs), only while its `buffers` accumulators fit the budget and
    the first chain's cover all heads at once; it keeps at least one branch in the first chain."""
    first, covering = covering_first(branches)
    count = min(settings.SIDE_BRANCHES, len(first) - 1)
    fits = buffers * batch * seq_len * heads * head_dim * 4 <= ACCUMULATOR_BUDGET_BYTES
    if count <= 0 or not fits or head_group(batch, seq_len, heads, head_dim, element_size, buffers) < heads:
        return first, [], covering
    movable = range(1 if covering else 0, len(first))
    moved = sorted(movable, key=lambda i: (-first[i][1], -first[i][0]))[:count]
    return [b for i, b in enumerate(first) if i not in moved], [first[i] for i in sorted(moved)], covering


def _plan(branches: Sequence[tuple[int, int]], batch: int, seq_len: int, heads: int, head_dim: int, element_size: int,
          buffers: int) -> tuple[tuple, tuple, bool]:
    """_chains(with_folds(branches, seq_len), ...) as tuples, made once per shape and settings: a layer calls
    it twice a step, and the host time of a 32K call is what paces the GPU there."""
    return _cached_plan(tuple(branches), batch, seq_len, heads, head_dim, element_size, buffers, settings.SHARE_KEYS,
                        settings.SIDE_BRANCHES, ACCUMULATOR_BUDGET_BYTES)


@functools.lru_cache(maxsize=256)
def _cached_plan(branches, batch, seq_len, heads, head_dim, element_size, buffers, share_keys, side_branches, budget):
    """The settings in the key (share_keys, side_branches, budget) are the ones with_folds and _chains read."""
    first, second, covering = _chains(with_folds(branches, seq_len), batch, seq_len, heads, head_dim, element_size,
                                      buffers)
    return tuple(first), tuple(second), covering


def _heads(hs: slice, heads: int, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The (B, N, H, ...) tensors' views of heads `hs`; the tensors themselves when hs covers all heads."""
    if hs.start == 0 and hs.stop == heads:
        return tensors
    return tuple(x[:, :, hs] for x in tensors)


@contextlib.contextmanager
def _beside(device: torch.device):
    """Launches inside run on side stream 1 (CUDA) after everything queued so far; elsewhere in order.
    The caller joins with `_join` before it reads their results."""
    if device.type != "cuda":
        yield
        return
    stream = _side_stream(device, 1)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield


def _join(device: torch.device) -> None:
    """The current stream waits for the second chain's streams (1, 2)."""
    if device.type == "cuda":
        for index in (1, 2):
            torch.cuda.current_stream(device).wait_stream(_side_stream(device, index))


def _second_forward(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, branches: list[tuple],
                    causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """The second chain's mixture (acc (B, N, H, D) fp32, lse (B, N, H)), launched beside the first chain."""
    B, N, H, D = q.shape
    acc = torch.zeros(B, N, H, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, N, H), float("-inf"), dtype=torch.float32, device=q.device)
    with _beside(q.device):
        for w, r, fold in branches:
            with branch_range("fwd", w, r):
                forward_branch(q, k, v, keep, acc, lse, w, r, 0, causal, scale, fold=fold)
    return acc, lse


def _second_backward(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, lse2: Tensor, delta: Tensor,
                     keep: Tensor | None, branches: list[tuple], causal: bool,
                     scale: float) -> tuple[Tensor, ...]:
    """The second chain's gradients (dq, dk, dv), (B, N, H, D) fp32 each, launched beside the first chain."""
    acc = torch.zeros(3, *q.shape, dtype=torch.float32, device=q.device)
    dq_stream = _dq_stream(q.device, 2)
    if dq_stream is not None:
        dq_stream.wait_stream(torch.cuda.current_stream(q.device))
    with _beside(q.device):
        for w, r, fold in branches:
            with branch_range("bwd", w, r):
                backward_branch(q, k, v, grad_out, lse2, delta, keep, *acc.unbind(0), w, r, 0, causal, scale,
                                dq_stream=dq_stream, fold=fold)
    return acc.unbind(0)


def _covering_order(branches: tuple, covering: bool, direct: bool, second: tuple) -> tuple[list, bool, bool]:
    """(the first chain's branches in launch order, whether the covering branch runs first, whether it runs last).
    Last (covering_last) when there is one, the inputs are 16-bit (fp32 adds into the outputs directly), one chain
    (a second is joined after) and settings.COVERING_LAST; else first (covering_first ordered them). Alone, both."""
    if covering and not direct and not second and settings.COVERING_LAST:
        branches = covering_last(branches)
        return branches, len(branches) == 1, True
    return list(branches), covering, False


def _accumulator(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, filled: bool) -> Tensor:
    """A buffer the branches add into: zeros, or uninitialised when the first branch writes every row (or when
    the forward's branches read it only where they wrote before: covering_last)."""
    return torch.empty(shape, dtype=dtype, device=device) if filled else torch.zeros(shape, dtype=dtype, device=device)


def fused_forward(q: Tensor, k: Tensor, v: Tensor, branches: Sequence[tuple[int, int]], causal: bool, scale: float,
                  keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """q, k, v (B, N, H, D), last dim contiguous; keep (B, N) uint8 or None.
    -> out (B, N, H, D) in q.dtype (0 where no branch covers a row), lse (B, N, H) float32 (-inf there)."""
    B, N, H, D = q.shape
    branches, second, covering = _plan(branches, B, N, H, D, q.element_size(), buffers=1)
    direct = q.dtype == torch.float32  # accumulate straight into the output
    # 16-bit, one chain: the covering branch runs last and writes the output itself (covering_last)
    branches, first, last = _covering_order(branches, covering, direct, second)
    lse = (torch.empty if first else functools.partial(torch.full, fill_value=float("-inf")))(
        (B, N, H), dtype=torch.float32, device=q.device)
    out = (_accumulator((B, N, H, D), q.dtype, q.device, covering) if direct
           else torch.empty_like(q, memory_format=torch.contiguous_format))
    group = H if direct or second else head_group(B, N, H, D, q.element_size(), buffers=1)
    acc = out if direct else _accumulator((B, N, group, D), torch.float32, q.device, filled=True)  # zeroed below
    beside = _second_forward(q, k, v, keep, second, causal, scale) if second else None
    for h0 in range(0, H, group):
        hs = slice(h0, min(h0 + group, H))
        acc_g = _heads(hs, H, out)[0] if direct else acc[:, :, : hs.stop - h0]
        if not direct and not covering:  # rows no branch covers must come out 0
            acc_g.zero_()
        q_g, k_g, v_g, lse_g, out_g = _heads(hs, H, q, k, v, lse, out)  # (B, N, g, ...) views, made once per group
        for i, (w, r, fold) in enumerate(branches):
            with branch_range("fwd", w, r):
                forward_branch(q_g, k_g, v_g, keep, acc_g, lse_g, w, r, h0, causal, scale, first=first and i == 0,
                               fold=fold, out=out_g if last and i == len(branches) - 1 else None)
        if not direct and beside is None and not last:
            store_heads(acc_g, out, h0)
    if beside is not None:  # Eq. 9-10 once more, over the two chains
        _join(q.device)
        merge_chains(acc, lse, *beside, out)
    return out, lse


def fused_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   branches: Sequence[tuple[int, int]], causal: bool, scale: float,
                   keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) (B, N, H, D) in q.dtype. `out`, `grad_out` contiguous; `lse` (B, N, H)
    float32 with +inf (or -inf) at rows that carry no gradient."""
    B, N, H, D = q.shape
    branches, second, covering = _plan(branches, B, N, H, D, q.element_size(), buffers=3)
    direct = q.dtype == torch.float32
    fused_dq = _fused_dq(q.device) != 0  # dQ arrives by atomic adds: its accumulator must start at 0
    # 16-bit, one chain: the covering branch runs last and writes dK, dV (and dQ but fused) in the gradients' dtype
    branches, first, last = _covering_order(branches, covering, direct, second)
    marked = last and not first  # the branches before it mark the rows they write (dK/dV's and dQ's)
    delta, lse2, *marks = backward_prep(out, grad_out, lse, marks=2 if marked else 0)
    grads = [_accumulator((B, N, H, D), q.dtype, q.device, covering) if direct else
             torch.empty(B, N, H, D, dtype=q.dtype, device=q.device) for _ in range(3)]
    group = H if direct or second else head_group(B, N, H, D, q.element_size(), buffers=3)
    acc = None if direct else _accumulator((3, B, N, group, D), torch.float32, q.device, filled=True)  # zeroed below
    beside = _second_backward(q, k, v, grad_out, lse2, delta, keep, second, causal, scale) if second else None
    side = _dq_stream(q.device)
    for h0 in range(0, H, group):
        hs = slice(h0, min(h0 + group, H))
        parts = _heads(hs, H, *grads) if direct else acc[:, :, :, : hs.stop - h0].unbind(0)
        if not direct and not covering:
            for part in parts:
                part.zero_()
        if covering and fused_dq:
            parts[0].zero_()
        if side is not None:  # dQ launches start after everything queued so far (inputs, zeroed parts)
            side.wait_stream(torch.cuda.current_stream(q.device))
        views = _heads(hs, H, q, k, v, grad_out, lse2, delta)  # (B, N, g, ...), made once per group
        marks_g = _heads(hs, H, *marks) if marked else None
        for i, (w, r, fold) in enumerate(branches):
            with branch_range("bwd", w, r):
                backward_branch(*views, keep, *parts, w, r, h0, causal, scale, dq_stream=side, first=first and i == 0,
                                fold=fold, marks=marks_g,
                                out=_heads(hs, H, *grads) if last and i == len(branches) - 1 else None)
        if side is not None:  # and end before anything queued later (the copy out, frees, the caller)
            torch.cuda.current_stream(q.device).wait_stream(side)
        if not direct and beside is None:  # run last, the covering branch wrote dK, dV, and dQ unless fused
            unwritten = (grads[:1] if fused_dq else []) if last else grads
            for total, part in zip(unwritten, parts):
                store_heads(part, total, h0)
    if beside is not None:  # the two chains' sums (one head group: parts cover all heads)
        _join(q.device)
        for total, part, extra in zip(grads, parts, beside):
            torch.add(part, extra, out=total)
    return tuple(grads)


class FusedDilatedFunction(torch.autograd.Function):
    """Autograd over the fused kernels; q, k, v (B, N, H, D) with a contiguous last dimension."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, branches, causal, scale):
        keep = key_bytes(key_padding_mask)
        out, lse = fused_forward(q, k, v, branches, causal, scale, keep)
        if keep is not None:  # padded queries output 0 and carry no gradient
            out.mul_(key_padding_mask[:, :, None, None])
            lse.masked_fill_(~key_padding_mask[:, :, None], float("inf"))
        ctx.save_for_backward(q, k, v, out, lse, keep)
        ctx.settings = (branches, causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, keep = ctx.saved_tensors
        branches, causal, scale = ctx.settings
        dq, dk, dv = fused_backward(grad_out.to(q.dtype).contiguous(), q, k, v, out, lse, branches, causal, scale,
                                    keep)
        return dq, dk, dv, None, None, None, None


def fused_dilated_attention(q: Tensor, k: Tensor, v: Tensor, branches: Sequence[tuple[int, int]], causal: bool,
                            scale: float, key_padding_mask: Tensor | None) -> Tensor:
    """(B, N, H, D) -> (B, N, H, D); inputs already checked by `dilated_attention`."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return FusedDilatedFunction.apply(q, k, v, key_padding_mask, tuple(branches), causal, scale)
