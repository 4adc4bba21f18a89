"""One launch of a fused kernel (kernels/triton_dilated.py) per branch: grids, block shapes and the
meta-parameters each launch takes from fused_settings.py (how dQ is computed, TMA loads, small
launches). fused.py chains these launches over the branches for one device; dilated.LocalBranch runs
them for a rank's local branches when the sequence is sharded. Rows of any head dim up to 128 are read and written
in place: the kernels' tiles are the next width of kernels.TRITON_HEAD_DIMS, their columns past the rows' end
masked (`_columns`), so every buffer here has the rows' head dim.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources

from . import fused_settings as settings
from .kernels import triton_dilated as kern
from .kernels import triton_rows, triton_width
from .kernels.launch import launch
from .nesting import KernelFold


@functools.lru_cache(maxsize=None)
def _columns(head_dim: int) -> dict[str, int]:
    """A launch's D, the width of its tiles (kernels.triton_width: 80 and 96 run in tiles of 128), and HEAD_DIM, that
    of its rows (kernels/triton_columns.py). (Cached: one dict per head dim; launches only read it.)"""
    width = triton_width(head_dim)
    if width is None:
        raise ValueError(f"the fused kernels take head dims up to 128, not {head_dim}")
    return {"D": width, "HEAD_DIM": head_dim}


def _small(grid: tuple[int, int], causal: bool, multiprocessors: int) -> bool:
    """A causal launch of fewer than settings.SMALL_LAUNCH_WAVES programs per multiprocessor."""
    return causal and grid[0] * grid[1] < settings.SMALL_LAUNCH_WAVES * multiprocessors


def _dkdv_key(seq_len: int, w: int, r: int, heads: int, batch: int, dtype: torch.dtype, head_dim: int,
              causal: bool, multiprocessors: int, device: torch.device | None = None, fuse_dq: bool = False
              ) -> tuple[str, bool]:
    """(fused_settings blocks key, small?) of branch (w, r)'s dK/dV launch on `device`: "dkdv", "dkdv_dq" when the
    kernel computes dQ too (`fuse_dq`), or "dkdv_small" for a small causal launch (SMALL_LAUNCH_WAVES)."""
    key = "dkdv_dq" if fuse_dq else "dkdv"
    blocks = settings.blocks_for(key, dtype, head_dim, device)
    grid, _ = _branch_grid(seq_len, w, r, heads, blocks.block_n, batch)
    small = _small(grid, causal, multiprocessors)
    return ("dkdv_small" if small else key), small


def _fitted(key: str, dtype: torch.dtype, head_dim: int, device: torch.device, go) -> None:
    """go(blocks) with `key`'s blocks on `device`. When the GPU refuses them for lack of shared memory (Triton's
    OutOfResources, raised at a kernel's first launch on a device, before it runs), go again with
    settings.smaller_blocks, which that device then keeps (settings.FITTED), and say so once (unless
    settings.FIT_REFUSED_BLOCKS is off: a tuning sweep's). Blocks go by the tiles' width (settings.blocks_for)."""
    first = blocks = settings.blocks_for(key, dtype, head_dim, device)
    while True:
        try:
            go(blocks)
            break
        except OutOfResources as error:
            if not settings.FIT_REFUSED_BLOCKS:
                raise
            smaller = settings.smaller_blocks(blocks)
            if smaller is None:
                raise RuntimeError(f"the fused attention kernel {key!r} ({dtype}, head_dim {head_dim}) does not fit "
                                   f"{device}'s shared memory even with blocks {_shape(blocks)}: {error}. Use "
                                   "backend='cuda_flash' (aten's kernels) or a head_dim of 64 or less") from error
            settings.FITTED[(key, dtype == torch.float32, triton_width(head_dim), device)] = blocks = smaller
    if blocks is not first:
        warnings.warn(f"fused attention: {device} refused the {key!r} kernel's blocks {_shape(first)} ({dtype}, "
                      f"head_dim {head_dim}) for lack of shared memory; it runs with {_shape(blocks)} instead",
                      stacklevel=2)


def _shape(blocks: settings.Blocks) -> str:
    return f"{blocks.block_m}x{blocks.block_n}, {blocks.num_warps} warps, {blocks.num_stages} stages"


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _strides3(x: Tensor) -> tuple[int, int, int]:
    return x.stride()[:3]


def _branch_grid(seq_len: int, w: int, r: int, heads: int, block: int, batch: int) -> tuple[tuple[int, int], int]:
    """Grid (blocks * segments * heads, batch) and blocks per (segment, head) of branch (w, r)."""
    w = min(w, seq_len)                           # w > N: one segment of length N
    num_blocks = triton_cdiv(math.ceil(w / r), block)
    return (num_blocks * math.ceil(seq_len / w) * heads, batch), num_blocks


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_launch(rows: int) -> tuple[tuple[int], int]:
    """(grid, rows per program) of a row-wise kernel over `rows` rows (_bwd_prep, _merge_chains)."""
    block = 16 if kern.interpreted() else 64
    return (triton_cdiv(rows, block),), block


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is ignored for 16-bit inputs


def _check_covering(r: int, **flags: bool) -> None:
    """`first` (write instead of add) and `last` (write the output) are only right for a branch that covers every
    row: r = 1."""
    for name, on in flags.items():
        if on and r != 1:
            raise ValueError(f"only a branch with r = 1 covers every row ({name}=True with r={r})")


@functools.lru_cache(maxsize=64)
def _nest_table(nested: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """The kernels' NEST argument: int32 w_0, r_0, w_1, r_1, ... of the branches nested in a branch. Made once;
    the copy completes before any stream (a dQ side stream too) can launch a kernel that reads it."""
    table = torch.tensor([x for pair in nested for x in pair], dtype=torch.int32, device=device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return table


def _nest_args(fold: KernelFold | None, device: torch.device, dummy: Tensor) -> tuple[Tensor, int, dict]:
    """(NEST, parent_w, {CHILD, NESTED}) of a launch for `fold` (nesting.kernel_plan; None: shares nothing)."""
    fold = fold or KernelFold()
    if len(fold.nested) > 16:
        raise ValueError(f"a branch shares keys with at most 16 nested branches, not {len(fold.nested)}")
    table = _nest_table(fold.nested, device) if fold.nested else dummy
    return table, fold.parent or 1, dict(CHILD=fold.parent is not None, NESTED=len(fold.nested))


def forward_branch(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, acc: Tensor, lse: Tensor, w: int, r: int,
                   head0: int, causal: bool, scale: float, first: bool = False, fold: KernelFold | None = None,
                   out: Tensor | None = None) -> None:
    """Merge branch (w, r) of heads [head0, head0 + H') into `acc` (B, N, H', D) fp32 and `lse` (B, N, H')
    (Eq. 9-10), in place. q, k, v: (B, N, H', D) views of those heads; keep (B, N) uint8 or None. Rows whose lse
    is -inf count as empty whatever acc holds there.
    `first`: r = 1 and nothing merged yet: write every row (acc and lse may hold garbage).
    `fold`: how the branch shares keys with the others (nesting.kernel_plan; None: it does not).
    `out`: r = 1, the last branch: the merged rows go into `out` (B, N, H', D), in its dtype, instead of acc."""
    _check_covering(r, first=first, last=out is not None)
    B, N, heads, D = q.shape
    nest, parent_w, nest_meta = _nest_args(fold, q.device, lse)
    target = acc if out is None else out
    loads = _loop_loads("fwd", (k, v), (q,), keep is None)

    def go(blocks: settings.Blocks) -> None:
        grid, num_blocks = _branch_grid(N, w, r, heads, blocks.block_m, B)
        launch(
            kern._fwd, grid, (q, k, v, lse if keep is None else keep, nest, acc, lse, target), *_strides3(q),
            *_strides3(k), *_strides3(v), *_strides3(acc), *_strides3(lse), *_strides3(target), N, N, min(w, N), r,
            head0, heads, num_blocks, scale * kern.LOG2E, parent_w, **nest_meta,  # keep's batch stride: N
            CAUSAL=causal, HAS_KEEP=keep is not None, FIRST=first, LAST=out is not None, **_columns(D),
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, PRECISION=_precision(q.dtype),
            num_warps=blocks.num_warps, num_stages=blocks.num_stages,
            BLOCK_MAJOR=_small(grid, causal, _multiprocessors(q.device)), **loads)

    _fitted("fwd", q.dtype, D, q.device, go)


def backward_prep(out: Tensor, grad_out: Tensor, lse: Tensor, marks: int = 0) -> tuple[Tensor, ...]:
    """delta = rowsum(dO * O) and lse2 = lse * log2(e) (+inf where lse is not finite), once for all branches:
    (B, N, H) fp32 views of (B, H, N) storage, in which the dK/dV loop reads a block of one head's slots from
    one stretch (contiguous for r = 1) instead of one sector per row. out, grad_out (B, N, H, D) and lse
    (B, N, H) contiguous. `marks` > 0: also that many planes of zero bytes, (B, N, H) uint8 views with lse2's
    strides, that mark the rows a branch has written (backward_branch's `marks`)."""
    B, N, H, D = out.shape
    delta, lse2 = (torch.empty(B, H, N, dtype=torch.float32, device=out.device) for _ in range(2))
    flags = torch.empty(marks, B, H, N, dtype=torch.uint8, device=out.device) if marks else delta  # (unread: 0)
    grid, block = _row_launch(B * N * H)
    launch(triton_rows._bwd_prep, grid, (out, grad_out, lse, delta, lse2, flags), B * N * H, N, H, **_columns(D),
           BLOCK=block, PLANES=marks)
    planes = flags.transpose(2, 3).unbind(0) if marks else ()
    return delta.transpose(1, 2), lse2.transpose(1, 2), *planes  # (B, N, H) views


def backward_branch(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, lse2: Tensor, delta: Tensor,
                    keep: Tensor | None, dq: Tensor, dk: Tensor, dv: Tensor, w: int, r: int, head0: int, causal: bool,
                    scale: float, dq_stream: torch.cuda.Stream | None = None, first: bool = False,
                    fold: KernelFold | None = None, marks: tuple[Tensor, Tensor] | None = None,
                    out: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """Add branch (w, r)'s gradients of heads [head0, head0 + H') into the fp32 accumulators dq, dk, dv
    (B, N, H', D, one layout), in place; the other arguments are (B, N, H', ...) views of those heads.
    `dq_stream`: launch the dQ kernel there (the caller orders it against the current stream).
    `first`: r = 1 and nothing added yet: write dk, dv (and dq unless settings.DQ_MODE adds it atomically,
    "atomic" or "tma": dq must then hold zeros) instead of adding. `fold`: as in forward_branch.
    `marks`: (dK/dV's, dQ's) uint8 (B, N, H') views with lse2's strides (backward_prep): the accumulators are not
    filled; a launch adds to a row only where its byte says a branch before wrote it, and sets the byte.
    `out`: r = 1, the last branch: (dq, dk, dv) (B, N, H', D) views of the gradients, which take the sums in their
    dtype instead of the accumulators (dq only from a dQ kernel; fused dQ still adds into `dq` atomically)."""
    _check_covering(r, first=first, last=out is not None)
    B, N, heads, D = q.shape
    fuse_dq = _fused_dq(q.device)
    if fuse_dq == 2 and not _aligned(dq):  # e.g. a head dim of 10: fp32 rows of 40 bytes; TMA wants 16-byte steps
        fuse_dq = 1
    flags_kv, flags_q = marks if marks is not None else (delta, delta)  # (unread without marks)
    out_q, out_k, out_v = out if out is not None else (dq, dk, dv)
    # the strides both launches share; each adds its output's, keep's batch stride N and the sequence length N
    inputs = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(lse2), *_strides3(dq))
    nest, parent_w, nest_meta = _nest_args(fold, q.device, delta)
    meta = dict(CAUSAL=causal, HAS_KEEP=keep is not None, **_columns(D), PRECISION=_precision(q.dtype),
                FIRST=first, MARKED=marks is not None, LAST=out is not None, **nest_meta)
    keep_arg = keep if keep is not None else delta
    multiprocessors = _multiprocessors(q.device)
    key, small = _dkdv_key(N, w, r, heads, B, q.dtype, D, causal, multiprocessors, q.device, fuse_dq != 0)
    loads = _loop_loads("dkdv", (q, grad_out), (k, v), keep is None and fuse_dq == 0)

    def dkdv(blocks: settings.Blocks) -> None:
        grid, num_blocks = _branch_grid(N, w, r, heads, blocks.block_n, B)
        launch(kern._bwd_dkdv, grid, (q, k, v, grad_out, lse2, delta, keep_arg, nest, dk, dv, dq, flags_kv, out_k,
                                      out_v),
               *inputs, *_strides3(out_k), N, N, min(w, N), r, head0, heads, num_blocks, scale * kern.LOG2E, scale,
               parent_w, FUSE_DQ=fuse_dq, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
               num_warps=blocks.num_warps, num_stages=blocks.num_stages, BLOCK_MAJOR=small, **loads, **meta)

    def dq_kernel(blocks: settings.Blocks) -> None:
        grid, num_blocks = _branch_grid(N, w, r, heads, blocks.block_m, B)
        launch(kern._bwd_dq, grid, (q, k, v, grad_out, lse2, delta, keep_arg, nest, dq, flags_q, out_q), *inputs,
               *_strides3(out_q), N, N, min(w, N), r, head0, heads, num_blocks, scale * kern.LOG2E, scale, parent_w,
               BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, num_warps=blocks.num_warps,
               num_stages=blocks.num_stages, BLOCK_MAJOR=_small(grid, causal, multiprocessors),
               **_loop_loads("dq", (k, v), (q, grad_out), keep is None), **meta)

    _fitted(key, q.dtype, D, q.device, dkdv)
    if fuse_dq == 0:
        with torch.cuda.stream(dq_stream) if dq_stream is not None else contextlib.nullcontext():
            _fitted("dq", q.dtype, D, q.device, dq_kernel)


def _fused_dq(device: torch.device) -> int:
    """The dK/dV kernel's FUSE_DQ for settings.DQ_MODE on `device`: 0 (a dQ kernel), 1 (atomic adds), 2 (TMA)."""
    if settings.DQ_MODE not in settings.DQ_MODES:
        raise ValueError(f"fused_settings.DQ_MODE={settings.DQ_MODE!r} is not one of {list(settings.DQ_MODES)}")
    if settings.DQ_MODE in ("kernel", "stream"):
        return 0
    if settings.DQ_MODE == "tma" and device.type == "cuda" and not kern.interpreted() and _tma_ready(device):
        return 2
    return 1


def _tma_ok(*rows: Tensor) -> bool:
    """A GPU with TMA (or the interpreter, which tests the logic), and every base address and stride of these
    (B, N, H', D) tensors 16-byte aligned as descriptors require (one starts at b * stride_b + h * stride_h +
    row * stride_n)."""
    device = rows[0].device
    if not kern.interpreted() and not (device.type == "cuda" and _tma_ready(device)):
        return False
    return all(_aligned(x) for x in rows)


def _aligned(x: Tensor) -> bool:
    """Whether a (B, N, H', D) tensor's base address, strides and rows are 16-byte multiples (TMA descriptors)."""
    return x.data_ptr() % 16 == 0 and all(n * x.element_size() % 16 == 0 for n in (*x.stride()[:3], x.shape[3]))


def _loop_loads(kernel: str, loop_rows: tuple[Tensor, ...], own_rows: tuple[Tensor, ...], splittable: bool) -> dict:
    """The TMA and WS meta-parameters of `kernel`'s launch. Warp-specialised (WS, settings.WARP_SPECIALIZE) when
    listed and Triton can split its loop: `splittable` (no key padding, whose bytes are pointer loads; for dK/dV no
    dQ reductions in the loop), and the loop's tiles (loop_rows) and the program's own rows (own_rows) all through
    TMA descriptors (_tma_ok). The loop's tiles go through descriptors then, or when listed in settings.TMA_LOADS.
    Without WS the meta leaves it out (the kernel's default): such a launch keeps its key and compiled kernel."""
    tma = _tma_ok(*loop_rows)
    split = kernel in settings.WARP_SPECIALIZE and splittable and tma and _tma_ok(*own_rows)
    return {"TMA": split or (tma and kernel in settings.TMA_LOADS), **({"WS": True} if split else {})}


def _tma_ready(device: torch.device) -> bool:
    """Hopper or newer; installs the global-memory allocator Triton needs for in-kernel TMA descriptors
    unless one is installed (Triton keeps it per thread context: the backward may run in autograd's
    device thread, so this checks on every call)."""
    if not _hopper(device):
        return False
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        _allocation.set_allocator(_scratch)
    return True


@functools.lru_cache(maxsize=None)
def _hopper(device: torch.device) -> bool:
    """Compute capability >= 9 (asked once per device: the question cost ~10 us a launch on an H200 host)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


_SCRATCH: dict[int, Tensor] = {}  # CUDA stream -> the largest scratch buffer asked for on it so far


def _scratch(size: int, alignment: int, stream: int) -> Tensor:
    """Global memory Triton asks for at launch (128 bytes per program for its TMA descriptors): one buffer
    per stream, kept and grown. Launches on one stream run in order, so they can share it; another stream's
    launches, which may run at the same time, get a buffer of their own."""
    buffer = _SCRATCH.get(stream)
    if buffer is None or buffer.numel() < size:
        buffer = _SCRATCH[stream] = torch.empty(max(size, 1 << 20), dtype=torch.int8, device="cuda")
    return buffer


def merge_chains(acc: Tensor, lse: Tensor, side_acc: Tensor, side_lse: Tensor, out: Tensor) -> None:
    """out = the Eq. 9-10 merge of two chains' mixtures of the same rows, and lse updated to match, in one
    launch. acc, side_acc (B, N, H, D) fp32 and lse, side_lse (B, N, H), contiguous; out may be acc."""
    grid, block = _row_launch(lse.numel())
    launch(triton_rows._merge_chains, grid, (acc, lse, side_acc, side_lse, out), lse.numel(),
           **_columns(acc.shape[-1]), BLOCK=block)


def store_heads(part: Tensor, total: Tensor, head0: int) -> None:
    """total[:, :, head0 : head0 + g] = part (B, N, g, D) fp32, in total's dtype, in one launch: a view of the
    first g heads of a contiguous (B, N, G, D) accumulator into a contiguous (B, N, H, D) output."""
    B, N, group, D = part.shape
    if part.stride() != (N * part.stride(1), part.stride(1), D, 1) or not total.is_contiguous():
        raise ValueError(f"store_heads wants a head slice of a contiguous accumulator and a contiguous output, "
                         f"not strides {part.stride()} and {total.stride()}")
    grid, block = _row_launch(B * N * group)
    launch(triton_rows._store_heads, grid, (part, total), B * N * group, group, part.stride(1) // D, total.shape[2],
           head0, **_columns(D), BLOCK=block)


def key_bytes(key_padding_mask: Tensor | None) -> Tensor | None:
    """The (B, N) bool mask as the contiguous bytes the kernels read (None: no padding)."""
    return None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
