"""Row-wise Triton kernels of the fused path (kernels/triton_dilated.py): the Eq. 9-10 merge of two mixtures
of the same rows, the backward's per-row preparation (delta, lse in base 2), and the store of a head group's
fp32 accumulators into the output's dtype. Rows of HEAD_DIM values, contiguous, in tiles D wide
(triton_columns.py)."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_columns import _columns, _tile_mask


@triton.jit
def _mix(o_a, lse_a, o_b, lse_b):
    """Eq. 9-10 for two mixtures of the same (BLOCK, D) rows: lse = logsumexp(lse_a, lse_b) and
    o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b; rows neither covers (both -inf) get o = 0, lse = -inf."""
    top = tl.maximum(lse_a, lse_b)
    top = tl.where(top == float("-inf"), 0.0, top)
    e_a, e_b = tl.exp(lse_a - top), tl.exp(lse_b - top)
    total = e_a + e_b
    covered = total > 0.0
    total_safe = tl.where(covered, total, 1.0)
    return (o_a * (e_a / total_safe)[:, None] + o_b * (e_b / total_safe)[:, None],
            tl.where(covered, top + tl.log(total_safe), float("-inf")))


@triton.jit
def _merge_chains(OA, LA, OB, LB, OUT, rows, D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Two chains' mixtures of the same rows, (OA, LA) and (OB, LB), (rows, HEAD_DIM) and (rows,) fp32 each ->
    OUT (rows, HEAD_DIM, the output dtype; may be OA) and LA (in place) = their Eq. 9-10 merge."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < rows
    offs_d, cols = _columns(D, HEAD_DIM)
    tile = offs[:, None] * HEAD_DIM + offs_d[None, :]
    real = _tile_mask(ok[:, None], cols[None, :], HEAD_DIM < D)
    merged, lse = _mix(tl.load(OA + tile, mask=real, other=0.0), tl.load(LA + offs, mask=ok, other=0.0),
                       tl.load(OB + tile, mask=real, other=0.0), tl.load(LB + offs, mask=ok, other=0.0))
    tl.store(OUT + tile, merged, mask=real)
    tl.store(LA + offs, lse, mask=ok)


@triton.jit
def _bwd_prep(O, DO, LSE, DELTA, LSE2, FLAGS, rows, N, H, D: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK: tl.constexpr, PLANES: tl.constexpr = 0):
    """Per row (b, n, h) of the merged output: delta = rowsum(dO * O); lse2 = lse * log2(e), +inf if not
    finite; both stored (B, H, N), so that a block of one head's slots reads them from one stretch. FLAGS
    (PLANES, B, H, N) uint8, cleared: the bytes that mark the rows a branch has written (triton_backward._add_rows)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < rows
    offs_d, cols = _columns(D, HEAD_DIM)
    real = _tile_mask(ok[:, None], cols[None, :], HEAD_DIM < D)
    o = tl.load(O + offs[:, None] * HEAD_DIM + offs_d[None, :], mask=real, other=0.0).to(tl.float32)
    do = tl.load(DO + offs[:, None] * HEAD_DIM + offs_d[None, :], mask=real, other=0.0).to(tl.float32)
    head_major = (offs // (N * H) * H + offs % H) * N + offs // H % N  # (b, n, h) -> (b, h, n)
    tl.store(DELTA + head_major, tl.sum(o * do, 1), mask=ok)
    lse = tl.load(LSE + offs, mask=ok, other=0.0)
    finite = (lse == lse) & (lse < float("inf")) & (lse > float("-inf"))
    tl.store(LSE2 + head_major, tl.where(finite, lse * 1.4426950408889634, float("inf")), mask=ok)
    for plane in tl.static_range(PLANES):
        tl.store(FLAGS + plane * rows + head_major, tl.zeros([BLOCK], tl.uint8), mask=ok)


@triton.jit
def _store_heads(SRC, DST, rows, group, src_heads, heads, head0, D: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK: tl.constexpr):
    """A head group's fp32 rows -> their place in the output, in its dtype. SRC (B*N, src_heads, HEAD_DIM) holds
    the group's heads in [0, group) of each position (rows = B*N*group); DST (B*N, heads, HEAD_DIM) takes them at
    [head0, head0 + group). Both contiguous; one program per BLOCK (position, head) rows of HEAD_DIM values (vector
    loads and stores, where torch copies such a strided slice element by element)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < rows
    position, head = offs // group, offs % group
    offs_d, cols = _columns(D, HEAD_DIM)
    real = _tile_mask(ok[:, None], cols[None, :], HEAD_DIM < D)
    x = tl.load(SRC + (position * src_heads + head)[:, None] * HEAD_DIM + offs_d[None, :], mask=real, other=0.0)
    tl.store(DST + (position * heads + head0 + head)[:, None] * HEAD_DIM + offs_d[None, :],
             x.to(DST.dtype.element_ty), mask=real)
