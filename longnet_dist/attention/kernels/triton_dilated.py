"""The fused LongNet kernels (Triton): every branch's rows read in place, Eq. 9-10 merged in-kernel.

Branch (w, r) on a sequence of N rows: segment j covers positions [j*w, min((j+1)*w, N)); head h
keeps slots k = 0, 1, ... at positions p = j*w + s + k*r with s = h mod r (Eq. 13-15), while
p lies inside the segment. A program of the forward kernel owns BLOCK_M consecutive slots of one
(batch, segment, head): it loads their q rows straight from the (B, N, H, D) tensor through strides
(row stride r * stride_n, each row's D values contiguous), streams the key slots of the same segment
through an online softmax (the flash-attention recurrence, in base 2), and merges its result into
the running fp32 mixture of the branches already done (Eq. 9-10) at the same rows. A branch touches
each (position, head) row at most once and branches run one launch after another, so the merge
needs no atomics. Ragged tails, r not dividing w and H not a multiple of r are all "slot k exists
iff s + k*r < segment length": per-(segment, head) slot counts, never copies or padding.

The backward kernels, `_bwd_dkdv` and `_bwd_dq`, live in triton_backward.py (imported here: callers launch
every fused kernel as triton_dilated._name).

A branch with r = 1 covers every row. Run first, its launches store instead of adding (FIRST); run last in 16-bit,
it writes the merged rows into the output in its dtype (LAST: the fp32 accumulator needs no fill, as the other
branches read a row's accumulator only where its lse is finite, and no store pass after the branches; the backward
does the same for dK and dV, triton_backward.py); two
chains of branches (fused_settings.SIDE_BRANCHES) are joined by `_merge_chains` (triton_rows.py).
Nested branches may share keys (fused_settings.SHARE_KEYS, triton_nesting.py): a nested branch (CHILD)
skips the pairs inside its queries' parent segment, and the parent scores them once with weight 1 + c
(NESTED branches nested in it). Every loop over the other side's slots runs in up to four stretches
(triton_nesting._regions): unmasked, masked, masked, unmasked, with the skipped blocks between the two
masked ones. Which slots a program owns: triton_slots.py. Row tiles arrive
through pointers or (TMA_LOADS) one descriptor per (segment, head): (n_slots, HEAD_DIM), row stride r rows.
WS (fused_settings.WARP_SPECIALIZE): the same stretches as one loop, every block masked (the masks keep the
unmasked stretches whole: the same numbers), every tile through descriptors and no early return, the form in which
Triton's Hopper pass splits a loop into warp groups that load, multiply and do the softmax concurrently.

Masks are computed, never materialised: slot validity and causality from slot indices, key padding
from one (B, N) byte per position. Blocks that need no mask skip it (MASKED is a constexpr).
Row tiles are D columns wide (16, 32, 64 or 128) and rows HEAD_DIM (80 in tiles of 128): the columns past
HEAD_DIM are masked on every load (0) and store (triton_columns.py), and no mask is built when HEAD_DIM == D.
All row offsets are int64: at N = 4M, H = 12, D = 64 a tensor has more than 2^31 elements.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .triton_backward import _bwd_dkdv, _bwd_dq  # noqa: F401  (launched as triton_dilated._bwd_*)
from .triton_columns import _columns, _load_tile, _tile_mask
from .triton_nesting import _apart, _nest_factor, _nest_flags
from .triton_rows import _mix
from .triton_slots import _key_stretches, _own_block, _own_rows, _past_gap, _program_block, _slot_rows, placement

LOG2E = 1.4426950408889634
# Whether the kernels below run in Triton's interpreter: triton.jit reads TRITON_INTERPRET when it decorates
# them, so the value at import is the one that holds (and reading it once keeps it off every launch's host path)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, lo, hi, gap_at, gap,
               n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               HAS_KEEP: tl.constexpr, CHILD: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
               WS: tl.constexpr):
    """k_src, v_src: this (batch, head)'s base pointers, or (TMA) its slots' descriptors (_slot_rows).
    CHILD, NESTED: shared keys (triton_nesting.py; flags_m, c_j, m_j, inv from _nest_flags / _nest_phases).
    WS: Triton's automatic warp specialisation of the loop (its loads, products and softmax in warp groups)."""
    offs_d, cols = _columns(D, HEAD_DIM)
    for step in tl.range(lo, hi - gap, BLOCK_N, warp_specialize=WS):
        start = _past_gap(step, gap_at, gap, CHILD and not CAUSAL)
        offs_n = start + tl.arange(0, BLOCK_N)
        pos_n = (row0 + offs_n * r).to(tl.int64)
        n_ok = offs_n < n_slots
        if TMA:
            k = tl.trans(k_src.load([start, 0]))                                                # (D, BN)
        else:
            k = _load_tile(k_src + pos_n[None, :] * stride_kn + offs_d[:, None], n_ok[None, :], cols[:, None],
                           MASKED, HEAD_DIM < D)
        qk = tl.dot(q, k, input_precision=PRECISION) * scale2                     # (BM, BN), log2 units
        if MASKED:
            allowed = n_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
            if CHILD:
                allowed = allowed & _apart(seg_m, row0, offs_n, r, parent_w)
            qk = tl.where(allowed, qk, float("-inf"))
        if HAS_KEEP:
            real = tl.load(keep_base + pos_n, mask=n_ok, other=0)
            qk = tl.where(real[None, :] != 0, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED or HAS_KEEP:
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf) = 0
        else:
            m_new_safe = m_new
        alpha = tl.exp2(m_i - m_new_safe)
        p = tl.exp2(qk - m_new_safe[:, None])
        if NESTED > 0:  # each pair once, weighted by the branches nested here that keep it
            p = p * _nest_factor(flags_m, _nest_flags(start, BLOCK_N, c_j, m_j, inv))
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = v_src.load([start, 0])                                                          # (BN, D)
        else:
            v = _load_tile(v_src + pos_n[:, None] * stride_vn + offs_d[None, :], n_ok[:, None], cols[None, :],
                           MASKED, HEAD_DIM < D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=placement("num_m_blocks"))
def _fwd(Q, K, V, KEEP, NEST, OA, LA, OUT,
         stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
         stride_ob, stride_on, stride_oh, stride_lb, stride_ln, stride_lh, stride_yb, stride_yn, stride_yh,
         stride_keep, N, w, r, head0, heads, num_m_blocks, scale2, parent_w,
         CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, FIRST: tl.constexpr, D: tl.constexpr,
         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
         BLOCK_MAJOR: tl.constexpr, TMA: tl.constexpr, CHILD: tl.constexpr = False, NESTED: tl.constexpr = 0,
         WS: tl.constexpr = False, LAST: tl.constexpr = False):
    """OA, OUT: (B, N, H', HEAD_DIM) rows, the fp32 mixture and the output; LA: (B, N, H') its lse. D: the tiles'
    width, HEAD_DIM <= D the rows' (triton_columns.py)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    pid_m, hh, row0, n_slots = _program_block(pid, num_m_blocks, heads, N, w, r, head0, True, BLOCK_MAJOR)
    if not WS:  # (Triton's warp specialisation refuses a kernel that returns early: see the loop below)
        if pid_m * BLOCK_M >= n_slots:
            return
    a, m0, m1, gap_at, gap = _key_stretches(pid_m, n_slots, row0, r, parent_w, CAUSAL, CHILD, BLOCK_M, BLOCK_N)
    if CHILD and not FIRST and not LAST and not WS:
        if a + (m1 - m0 - gap) == 0:  # every key lies in these queries' parent segment: nothing to merge
            return
    offs_m, m_ok, pos_m, flags_m, c_j, m_j, inv, seg_m = _own_block(pid_m * BLOCK_M, BLOCK_M, row0, r, n_slots, NEST,
                                                                    head0 + hh, parent_w, NESTED)
    offs_d, cols = _columns(D, HEAD_DIM)
    b64 = b.to(tl.int64)
    q = _own_rows(Q + b64 * stride_qb + hh * stride_qh, row0, r, stride_qn, n_slots, pid_m * BLOCK_M, pos_m, m_ok,
                  BLOCK_M, D, HEAD_DIM, WS)
    k_src = K + b64 * stride_kb + hh * stride_kh
    v_src = V + b64 * stride_vb + hh * stride_vh
    if TMA:  # the key loop's tiles through descriptors: no per-row address math, loads off the threads
        k_src = _slot_rows(k_src, row0, r, stride_kn, n_slots, BLOCK_N, D, HEAD_DIM)
        v_src = _slot_rows(v_src, row0, r, stride_vn, n_slots, BLOCK_N, D, HEAD_DIM)
    keep_base = KEEP + b64 * stride_keep
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if WS:  # one loop over [0, m1) less the gap (m0 = a), every block masked (the masks keep all of [0, a)):
        # Triton's Hopper warp specialisation takes a kernel with one loop and no early return. A program past its
        # (segment, head)'s slots loops over nothing and stores nothing (m_ok is all false); a nested branch's
        # queries with every key in their parent segment merge an empty branch (o_i = 0, lse_i = -inf)
        hi = tl.where(pid_m * BLOCK_M >= n_slots, gap, m1)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, 0,
                                   hi, gap_at, gap, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL,
                                   True, HAS_KEEP, CHILD, NESTED, BLOCK_N, D, HEAD_DIM, PRECISION, TMA, True)
    else:  # keys [0, a) unmasked, [m0, m1) masked less the gap (_regions)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, 0,
                                   a, a, 0, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL, False,
                                   HAS_KEEP, CHILD, NESTED, BLOCK_N, D, HEAD_DIM, PRECISION, TMA, False)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m,
                                   m0, m1, gap_at, gap, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv,
                                   CAUSAL, True, HAS_KEEP, CHILD, NESTED, BLOCK_N, D, HEAD_DIM, PRECISION, TMA,
                                   False)
    # this branch: o_i = acc / l, lse_i = ln(sum exp) (-inf and o_i = 0 where no key was left)
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o_i = acc / l_safe[:, None]
    lse_i = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    # Eq. 10: LSE = logsumexp(lse_prev, lse_i); Eq. 9: out = sum_i exp(lse_i - LSE) * o_i
    l_ptrs = LA + b64 * stride_lb + hh * stride_lh + pos_m * stride_ln
    o_ptrs = OA + b64 * stride_ob + hh * stride_oh + pos_m[:, None] * stride_on + offs_d[None, :]
    rows = _tile_mask(m_ok[:, None], cols[None, :], HEAD_DIM < D)  # this program's rows, their real columns
    if FIRST:  # the first branch, r = 1, writes every row: nothing to merge with, nothing to read
        merged, lse_new = o_i, lse_i  # (what _mix gives with o_prev = 0, lse_prev = -inf)
    else:
        lse_prev = tl.load(l_ptrs, mask=m_ok, other=float("-inf"))
        # a row no branch has written holds lse -inf and, in an unfilled accumulator, anything: not read (weight 0)
        o_prev = tl.load(o_ptrs, mask=rows & (lse_prev[:, None] > float("-inf")), other=0.0)
        merged, lse_new = _mix(o_prev, lse_prev, o_i, lse_i)
    if LAST:  # the last branch, r = 1, writes the merged rows into the output (its dtype): no accumulator store
        y_ptrs = OUT + b64 * stride_yb + hh * stride_yh + pos_m[:, None] * stride_yn + offs_d[None, :]
        tl.store(y_ptrs, merged.to(OUT.dtype.element_ty), mask=rows)
    else:
        tl.store(o_ptrs, merged, mask=rows)
    tl.store(l_ptrs, lse_new, mask=m_ok)


def interpreted() -> bool:
    return _INTERPRETED
