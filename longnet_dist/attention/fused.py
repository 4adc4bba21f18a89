"""Dilated attention through the fused Triton kernels (kernels/triton_dilated.py): the one-device
path (FusedDilatedFunction) and the per-branch launches that dilated.LocalBranch runs for sharded ones.

Forward: the merged output starts at 0 and its lse at -inf; each branch's launch reads its rows of
q, k, v in place and folds its (o_i, lse_i) into the fp32 mixture at the same rows (Eq. 9-10). A
branch with r = 1 covers every row: it runs first and writes the accumulators, which then need no
fill (`covering_first`; the same in the backward).
Backward: delta = rowsum(dO * O) once, then per branch one dK/dV and one dQ launch that add into
fp32 gradient accumulators in place (the merged-softmax identity of dilated.py).

Memory: the fp32 accumulators are the only buffers of size N beyond inputs and outputs. For long
sequences they cover a group of heads at a time (`head_group`), so one layer's forward+backward
holds about as much as dense flash attention: q, k, v, out, dO, dq, dk, dv in the input dtype plus
fp32 accumulators no larger than one of those tensors.

How each launch runs (block shapes, how dQ is computed, TMA loads, small launches) is read from
fused_settings.py at every launch.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Sequence

import torch
from torch import Tensor

from . import fused_settings as settings
from .kernels import branch_range
from .kernels import triton_dilated as kern

ACCUMULATOR_BUDGET_BYTES = 512 * 2**20  # below this the accumulators cover all heads at once


def _small(grid: tuple[int, int], causal: bool, multiprocessors: int) -> bool:
    """A causal launch of fewer than settings.SMALL_LAUNCH_WAVES programs per multiprocessor."""
    return causal and grid[0] * grid[1] < settings.SMALL_LAUNCH_WAVES * multiprocessors


def _dkdv_launch(seq_len: int, w: int, r: int, heads: int, batch: int, dtype: torch.dtype, head_dim: int,
                 causal: bool, multiprocessors: int) -> tuple[settings.Blocks, tuple[int, int], int, bool]:
    """(blocks, grid, blocks per (segment, head), small?) of branch (w, r)'s dK/dV launch (SMALL_LAUNCH_WAVES)."""
    blocks = settings.blocks_for("dkdv", dtype, head_dim)
    grid, num_blocks = _branch_grid(seq_len, w, r, heads, blocks.block_n, batch)
    small = _small(grid, causal, multiprocessors)
    if small:
        blocks = settings.blocks_for("dkdv_small", dtype, head_dim)
        grid, num_blocks = _branch_grid(seq_len, w, r, heads, blocks.block_n, batch)
    return blocks, grid, num_blocks, small


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def head_group(batch: int, seq_len: int, heads: int, head_dim: int, element_size: int, buffers: int) -> int:
    """Heads per pass: all when `buffers` fp32 accumulators fit the budget, else as many as keep them
    within the size of one input tensor (B, N, H, D)."""
    per_head = buffers * batch * seq_len * head_dim * 4
    allowed = max(ACCUMULATOR_BUDGET_BYTES, batch * seq_len * heads * head_dim * element_size)
    return max(1, min(heads, allowed // per_head))


def _strides3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _branch_grid(seq_len: int, w: int, r: int, heads: int, block: int, batch: int) -> tuple[tuple[int, int], int]:
    """Grid (blocks * segments * heads, batch) and blocks per (segment, head) of branch (w, r)."""
    w = min(w, seq_len)                           # w > N: one segment of length N
    num_blocks = triton_cdiv(math.ceil(w / r), block)
    return (num_blocks * math.ceil(seq_len / w) * heads, batch), num_blocks


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is ignored for 16-bit inputs


def covering_first(branches: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], bool]:
    """(the branches with the first r = 1 branch moved to the front, whether there is one). A branch
    with r = 1 covers every (position, head) row, so run first it can write the accumulators instead
    of adding to them: they need no zero fill, and its launches read nothing back (FIRST)."""
    order = list(branches)
    first = next((i for i, (_, r) in enumerate(order) if r == 1), None)
    if first is None:
        return order, False
    return [order.pop(first)] + order, True


def _check_first(first: bool, r: int) -> None:
    """`first` (write instead of add) is only right for a branch that covers every row: r = 1."""
    if first and r != 1:
        raise ValueError(f"only a branch with r = 1 covers every row (first=True with r={r})")


def forward_branch(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, acc: Tensor, lse: Tensor, w: int, r: int,
                   head0: int, causal: bool, scale: float, first: bool = False) -> None:
    """Merge branch (w, r) of heads [head0, head0 + H') into `acc` (B, N, H', D) fp32 and `lse` (B, N, H')
    (Eq. 9-10), in place. q, k, v: (B, N, H', D) views of those heads; keep (B, N) uint8 or None.
    `first`: r = 1 and nothing merged yet: write every row (acc and lse may hold garbage)."""
    _check_first(first, r)
    B, N, heads, D = q.shape
    blocks = settings.blocks_for("fwd", q.dtype, D)
    grid, num_blocks = _branch_grid(N, w, r, heads, blocks.block_m, B)
    kern._fwd[grid](
        q, k, v, lse if keep is None else keep, acc, lse, *_strides3(q), *_strides3(k), *_strides3(v),
        *_strides3(acc), *_strides3(lse), N, N, min(w, N), r, head0, heads, num_blocks,  # keep's batch stride = N
        scale * kern.LOG2E, CAUSAL=causal, HAS_KEEP=keep is not None, FIRST=first, D=D, BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n, PRECISION=_precision(q.dtype), num_warps=blocks.num_warps,
        num_stages=blocks.num_stages, BLOCK_MAJOR=_small(grid, causal, _multiprocessors(q.device)),
        TMA=_tma_loads("fwd", k, v))


def backward_prep(out: Tensor, grad_out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """delta = rowsum(dO * O) and lse2 = lse * log2(e) (+inf where lse is not finite), both (B, N, H) fp32,
    once for all branches. out, grad_out (B, N, H, D) and lse (B, N, H) contiguous."""
    B, N, H, D = out.shape
    delta = torch.empty(B, N, H, dtype=torch.float32, device=out.device)
    lse2 = torch.empty_like(delta)
    rows, prep_rows = B * N * H, 16 if kern.interpreted() else 64
    kern._bwd_prep[(triton_cdiv(rows, prep_rows),)](out, grad_out, lse, delta, lse2, rows, D=D, BLOCK=prep_rows)
    return delta, lse2


def backward_branch(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, lse2: Tensor, delta: Tensor,
                    keep: Tensor | None, dq: Tensor, dk: Tensor, dv: Tensor, w: int, r: int, head0: int, causal: bool,
                    scale: float, dq_stream: torch.cuda.Stream | None = None, first: bool = False) -> None:
    """Add branch (w, r)'s gradients of heads [head0, head0 + H') into the fp32 accumulators dq, dk, dv
    (B, N, H', D, one layout), in place; the other arguments are (B, N, H', ...) views of those heads.
    `dq_stream`: launch the dQ kernel there (the caller orders it against the current stream).
    `first`: r = 1 and nothing added yet: write dk, dv (and dq unless settings.DQ_MODE adds it atomically,
    "atomic" or "tma": dq must then hold zeros) instead of adding."""
    _check_first(first, r)
    B, N, heads, D = q.shape
    fuse_dq = _fused_dq(q.device)
    dq_blocks = settings.blocks_for("dq", q.dtype, D)
    common = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(lse2), *_strides3(dq),
              N, N)  # ..., keep's batch stride, sequence length
    meta = dict(CAUSAL=causal, HAS_KEEP=keep is not None, D=D, PRECISION=_precision(q.dtype))
    keep_arg = keep if keep is not None else delta
    multiprocessors = _multiprocessors(q.device)
    dkdv, grid, num_blocks, small = _dkdv_launch(N, w, r, heads, B, q.dtype, D, causal, multiprocessors)
    kern._bwd_dkdv[grid](q, k, v, grad_out, lse2, delta, keep_arg, dk, dv, dq, *common, min(w, N), r, head0, heads,
                         num_blocks, scale * kern.LOG2E, scale, FUSE_DQ=fuse_dq, FIRST=first, BLOCK_M=dkdv.block_m,
                         BLOCK_N=dkdv.block_n, num_warps=dkdv.num_warps, num_stages=dkdv.num_stages,
                         BLOCK_MAJOR=small, TMA=_tma_loads("dkdv", q, grad_out), **meta)
    if fuse_dq == 0:
        grid, num_blocks = _branch_grid(N, w, r, heads, dq_blocks.block_m, B)
        with torch.cuda.stream(dq_stream) if dq_stream is not None else contextlib.nullcontext():
            kern._bwd_dq[grid](q, k, v, grad_out, lse2, delta, keep_arg, dq, *common, min(w, N), r, head0, heads,
                               num_blocks, scale * kern.LOG2E, scale, FIRST=first, BLOCK_M=dq_blocks.block_m,
                               BLOCK_N=dq_blocks.block_n, num_warps=dq_blocks.num_warps,
                               num_stages=dq_blocks.num_stages, BLOCK_MAJOR=_small(grid, causal, multiprocessors),
                               TMA=_tma_loads("dq", k, v), **meta)


def _fused_dq(device: torch.device) -> int:
    """The dK/dV kernel's FUSE_DQ for settings.DQ_MODE on `device`: 0 (a dQ kernel), 1 (atomic adds), 2 (TMA)."""
    if settings.DQ_MODE not in settings.DQ_MODES:
        raise ValueError(f"fused_settings.DQ_MODE={settings.DQ_MODE!r} is not one of {list(settings.DQ_MODES)}")
    if settings.DQ_MODE in ("kernel", "stream"):
        return 0
    if settings.DQ_MODE == "tma" and device.type == "cuda" and not kern.interpreted() and _tma_ready(device):
        return 2
    return 1


def _tma_loads(kernel: str, *rows: Tensor) -> bool:
    """Whether `kernel`'s launch reads these (B, N, H', D) tensors' row tiles through TMA descriptors: listed
    in TMA_LOADS, a GPU with TMA (or the interpreter, which tests the logic), and every base address and
    stride 16-byte aligned as descriptors require (one starts at b * stride_b + h * stride_h + row * stride_n)."""
    if kernel not in settings.TMA_LOADS:
        return False
    device = rows[0].device
    if not kern.interpreted() and not (device.type == "cuda" and _tma_ready(device)):
        return False
    return all(x.data_ptr() % 16 == 0 and all(n * x.element_size() % 16 == 0 for n in (*x.stride()[:3], x.shape[3]))
               for x in rows)


def _tma_ready(device: torch.device) -> bool:
    """Hopper or newer; installs the global-memory allocator Triton needs for in-kernel TMA descriptors
    unless one is installed (Triton keeps it per thread context: the backward may run in autograd's
    device thread, so this checks on every call)."""
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
    return True


def _scratch(size: int, alignment: int, stream) -> Tensor:
    """Global memory Triton asks for at launch (128 bytes per program for its TMA descriptors)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


def _dq_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The second stream for dQ launches when settings.DQ_MODE is "stream" on a CUDA device, else None."""
    _fused_dq(device)  # checks DQ_MODE
    return _side_stream(device) if settings.DQ_MODE == "stream" and device.type == "cuda" else None


def _accumulator(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, filled: bool) -> Tensor:
    """A buffer the branches add into: zeros, or uninitialised when the first branch writes every row."""
    return torch.empty(shape, dtype=dtype, device=device) if filled else torch.zeros(shape, dtype=dtype, device=device)


def fused_forward(q: Tensor, k: Tensor, v: Tensor, branches: Sequence[tuple[int, int]], causal: bool, scale: float,
                  keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """q, k, v (B, N, H, D), last dim contiguous; keep (B, N) uint8 or None.
    -> out (B, N, H, D) in q.dtype (0 where no branch covers a row), lse (B, N, H) float32 (-inf there)."""
    B, N, H, D = q.shape
    branches, covering = covering_first(branches)
    lse = (torch.empty if covering else functools.partial(torch.full, fill_value=float("-inf")))(
        (B, N, H), dtype=torch.float32, device=q.device)
    direct = q.dtype == torch.float32  # accumulate straight into the output
    out = (_accumulator((B, N, H, D), q.dtype, q.device, covering) if direct
           else torch.empty_like(q, memory_format=torch.contiguous_format))
    group = H if direct else head_group(B, N, H, D, q.element_size(), buffers=1)
    acc = out if direct else torch.empty(B, N, group, D, dtype=torch.float32, device=q.device)
    for h0 in range(0, H, group):
        hs = slice(h0, min(h0 + group, H))
        acc_g = out[:, :, hs] if direct else acc[:, :, : hs.stop - h0]
        if not direct and not covering:
            acc_g.zero_()
        for i, (w, r) in enumerate(branches):
            with branch_range("fwd", w, r):
                forward_branch(q[:, :, hs], k[:, :, hs], v[:, :, hs], keep, acc_g, lse[:, :, hs], w, r, h0, causal,
                               scale, first=covering and i == 0)
        if not direct:
            out[:, :, hs].copy_(acc_g)
    return out, lse


def fused_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   branches: Sequence[tuple[int, int]], causal: bool, scale: float,
                   keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) (B, N, H, D) in q.dtype. `out`, `grad_out` contiguous; `lse` (B, N, H)
    float32 with +inf (or -inf) at rows that carry no gradient."""
    B, N, H, D = q.shape
    branches, covering = covering_first(branches)
    delta, lse2 = backward_prep(out, grad_out, lse)
    direct = q.dtype == torch.float32
    grads = [_accumulator((B, N, H, D), q.dtype, q.device, covering) if direct else
             torch.empty(B, N, H, D, dtype=q.dtype, device=q.device) for _ in range(3)]
    group = H if direct else head_group(B, N, H, D, q.element_size(), buffers=3)
    acc = None if direct else torch.empty(3, B, N, group, D, dtype=torch.float32, device=q.device)
    side = _dq_stream(q.device)
    for h0 in range(0, H, group):
        hs = slice(h0, min(h0 + group, H))
        parts = [g[:, :, hs] for g in grads] if direct else acc[:, :, :, : hs.stop - h0].unbind(0)
        if not direct and not covering:
            for part in parts:
                part.zero_()
        if covering and _fused_dq(q.device):  # dQ arrives by atomic adds: it must start at 0
            parts[0].zero_()
        if side is not None:  # dQ launches start after everything queued so far (inputs, zeroed parts)
            side.wait_stream(torch.cuda.current_stream(q.device))
        for i, (w, r) in enumerate(branches):
            with branch_range("bwd", w, r):
                backward_branch(q[:, :, hs], k[:, :, hs], v[:, :, hs], grad_out[:, :, hs], lse2[:, :, hs],
                                delta[:, :, hs], keep, *parts, w, r, h0, causal, scale, dq_stream=side,
                                first=covering and i == 0)
        if side is not None:  # and end before anything queued later (the copy out, frees, the caller)
            torch.cuda.current_stream(q.device).wait_stream(side)
        if not direct:
            for total, part in zip(grads, parts):
                total[:, :, hs].copy_(part)
    return tuple(grads)


def key_bytes(key_padding_mask: Tensor | None) -> Tensor | None:
    """The (B, N) bool mask as the contiguous bytes the kernels read (None: no padding)."""
    return None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()


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
