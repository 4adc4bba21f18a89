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

Backward (the merged softmax identity, see dilated.py): `_bwd_prep` (triton_rows.py) computes delta = rowsum(dO * O)
and lse*log2(e) once for all branches; per branch `_bwd_dkdv` (a program per key block, looping
over query blocks) recomputes P = exp2(q.k*scale*log2e - lse2) and adds dK, dV into fp32
accumulators in place. dQ either comes from the same loop (FUSE_DQ: dS K added atomically to the
query rows, as flash-attention 2 does: 5 matrix products per block pair; FUSE_DQ = 1 one atomic
per element, 2 one TMA bulk reduction per tile through a per-program tensor descriptor, as
flash-attention 3 does, Hopper and newer) or from `_bwd_dq` (a program per query block, looping
over key blocks: 7 products, no atomics).

A branch with r = 1 covers every row. Run first, its launches store instead of adding (FIRST); run last in a 16-bit
forward, it writes the merged rows into the output in its dtype (LAST: the fp32 accumulator needs no fill, as the
other branches read a row's accumulator only where its lse is finite, and no store pass after the branches); two
chains of branches (fused_settings.SIDE_BRANCHES) are joined by `_merge_chains` (triton_rows.py).
Nested branches may share keys (fused_settings.SHARE_KEYS, triton_nesting.py): a nested branch (CHILD)
skips the pairs inside its queries' parent segment, and the parent scores them once with weight 1 + c
(NESTED branches nested in it). Every loop over the other side's slots runs in up to four stretches
(triton_nesting._regions): unmasked, masked, masked, unmasked, with the skipped blocks between the two
masked ones. Which slots a program owns: triton_slots.py. Row tiles arrive
through pointers or (TMA_LOADS) one descriptor per (segment, head): (n_slots, D), row stride r rows.

Masks are computed, never materialised: slot validity and causality from slot indices, key padding
from one (B, N) byte per position. Blocks that need no mask skip it (MASKED is a constexpr).
All row offsets are int64: at N = 4M, H = 12, D = 64 a tensor has more than 2^31 elements.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .triton_nesting import _apart, _nest_factor, _nest_flags, _nest_setup, _regions
from .triton_slots import _block_rows, _key_range, _program_block, placement
from .triton_rows import _mix

LOG2E = 1.4426950408889634
# Whether the kernels below run in Triton's interpreter: triton.jit reads TRITON_INTERPRET when it decorates
# them, so the value at import is the one that holds (and reading it once keeps it off every launch's host path)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_rows(base, pos, ok, stride_n, D: tl.constexpr):
    """(BLOCK, D) rows at positions `pos` of one (batch, head): each row's D values are contiguous."""
    return tl.load(base + pos[:, None] * stride_n + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _slot_rows(base, row0, r, stride_n, n_slots, BLOCK: tl.constexpr, D: tl.constexpr):
    """One (segment, head)'s slots of a (B, N, H, D) tensor as a TMA descriptor: an (n_slots, D) matrix with
    row stride r * stride_n, read in (BLOCK, D) tiles by the tensor-memory accelerator, which fills slots past
    the end with zeros (what the masked pointer loads give)."""
    return tl.make_tensor_descriptor(base + row0.to(tl.int64) * stride_n, shape=[n_slots, D],
                                     strides=[r * stride_n, 1], block_shape=[BLOCK, D])


@triton.jit
def _key_stretches(pid_m, n_slots, row0, r, parent_w, CAUSAL: tl.constexpr, CHILD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """How query block pid_m (_fwd, _bwd_dq) loops over its key slots: (a, m0, m1, gap_at, gap), keys [0, a)
    unmasked, [m0, m1) masked less the `gap` slots from gap_at on (triton_nesting._regions; its unmasked tail
    is empty here, the masked stretch reaching the last key)."""
    full, hi = _key_range(pid_m, n_slots, CAUSAL, BLOCK_M, BLOCK_N)
    a, m0, m1, gap_at, gap, _ = _regions(pid_m * BLOCK_M, tl.minimum((pid_m + 1) * BLOCK_M, n_slots) - 1, row0, r,
                                         parent_w, 0, hi, full, hi, CAUSAL, False, CHILD, BLOCK_N)
    return a, m0, m1, gap_at, gap


@triton.jit
def _past_gap(step, gap_at, gap, GAP: tl.constexpr):
    """A loop over [lo, hi) that skips the `gap` slots from `gap_at` on (a nested branch's skipped blocks when
    not causal, triton_nesting._regions) steps through [lo, hi - gap): its block start. Only GAP kernels select
    (a select on the loop counter costs the software pipeline some 40 registers)."""
    if GAP:
        return tl.where(step < gap_at, step, step + gap)
    else:
        return step


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, lo, hi, gap_at, gap,
               n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               HAS_KEEP: tl.constexpr, CHILD: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr,
               D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """k_src, v_src: this (batch, head)'s base pointers, or (TMA) its slots' descriptors (_slot_rows).
    CHILD, NESTED: shared keys (triton_nesting.py; flags_m, c_j, m_j, inv from _nest_flags / _nest_phases).
    WS: Triton's automatic warp specialisation of the loop (its loads, products and softmax in warp groups)."""
    offs_d = tl.arange(0, D)
    for step in tl.range(lo, hi - gap, BLOCK_N, warp_specialize=WS):
        start = _past_gap(step, gap_at, gap, CHILD and not CAUSAL)
        offs_n = start + tl.arange(0, BLOCK_N)
        pos_n = (row0 + offs_n * r).to(tl.int64)
        n_ok = offs_n < n_slots
        if TMA:
            k = tl.trans(k_src.load([start, 0]))                                                # (D, BN)
        elif MASKED:
            k = tl.load(k_src + pos_n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        else:
            k = tl.load(k_src + pos_n[None, :] * stride_kn + offs_d[:, None])
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
            v = v_src.load([start, 0])
        elif MASKED:
            v = tl.load(v_src + pos_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        else:
            v = tl.load(v_src + pos_n[:, None] * stride_vn + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=placement("num_m_blocks"))
def _fwd(Q, K, V, KEEP, NEST, OA, LA, OUT,
         stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
         stride_ob, stride_on, stride_oh, stride_lb, stride_ln, stride_lh, stride_yb, stride_yn, stride_yh,
         stride_keep, N, w, r, head0, heads, num_m_blocks, scale2, parent_w,
         CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, FIRST: tl.constexpr, D: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, BLOCK_MAJOR: tl.constexpr,
         TMA: tl.constexpr, CHILD: tl.constexpr = False, NESTED: tl.constexpr = 0, WS: tl.constexpr = False,
         LAST: tl.constexpr = False):
    pid, b = tl.program_id(0), tl.program_id(1)
    pid_m, hh, row0, n_slots = _program_block(pid, num_m_blocks, heads, N, w, r, head0, True, BLOCK_MAJOR)
    if not WS:  # (Triton's warp specialisation refuses a kernel that returns early: see the loop below)
        if pid_m * BLOCK_M >= n_slots:
            return
    a, m0, m1, gap_at, gap = _key_stretches(pid_m, n_slots, row0, r, parent_w, CAUSAL, CHILD, BLOCK_M, BLOCK_N)
    if CHILD and not FIRST and not LAST and not WS:
        if a + (m1 - m0 - gap) == 0:  # every key lies in these queries' parent segment: nothing to merge
            return
    offs_m, m_ok, pos_m = _block_rows(pid_m * BLOCK_M, BLOCK_M, row0, r, n_slots)
    flags_m, c_j, m_j, inv = _nest_setup(NEST, head0 + hh, row0, r, pid_m * BLOCK_M, BLOCK_M, NESTED)
    seg_m = (row0 + offs_m * r) // parent_w  # the rows' parent segments (CHILD)
    offs_d = tl.arange(0, D)
    b64 = b.to(tl.int64)
    if WS:  # (the warp-specialised loop's partitions take their inputs from TMA loads only)
        q = _slot_rows(Q + b64 * stride_qb + hh * stride_qh, row0, r, stride_qn, n_slots, BLOCK_M, D).load(
            [pid_m * BLOCK_M, 0])
    else:
        q = _load_rows(Q + b64 * stride_qb + hh * stride_qh, pos_m, m_ok, stride_qn, D)
    k_src = K + b64 * stride_kb + hh * stride_kh
    v_src = V + b64 * stride_vb + hh * stride_vh
    if TMA:  # the key loop's tiles through descriptors: no per-row address math, loads off the threads
        k_src = _slot_rows(k_src, row0, r, stride_kn, n_slots, BLOCK_N, D)
        v_src = _slot_rows(v_src, row0, r, stride_vn, n_slots, BLOCK_N, D)
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
                                   True, HAS_KEEP, CHILD, NESTED, BLOCK_N, D, PRECISION, TMA, True)
    else:  # keys [0, a) unmasked, [m0, m1) masked less the gap (_regions)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, 0,
                                   a, a, 0, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL, False,
                                   HAS_KEEP, CHILD, NESTED, BLOCK_N, D, PRECISION, TMA, False)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m,
                                   m0, m1, gap_at, gap, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv,
                                   CAUSAL, True, HAS_KEEP, CHILD, NESTED, BLOCK_N, D, PRECISION, TMA, False)
    # this branch: o_i = acc / l, lse_i = ln(sum exp) (-inf and o_i = 0 where no key was left)
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o_i = acc / l_safe[:, None]
    lse_i = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    # Eq. 10: LSE = logsumexp(lse_prev, lse_i); Eq. 9: out = sum_i exp(lse_i - LSE) * o_i
    l_ptrs = LA + b64 * stride_lb + hh * stride_lh + pos_m * stride_ln
    o_ptrs = OA + b64 * stride_ob + hh * stride_oh + pos_m[:, None] * stride_on + offs_d[None, :]
    if FIRST:  # the first branch, r = 1, writes every row: nothing to merge with, nothing to read
        merged, lse_new = o_i, lse_i  # (what _mix gives with o_prev = 0, lse_prev = -inf)
    else:
        lse_prev = tl.load(l_ptrs, mask=m_ok, other=float("-inf"))
        o_prev = tl.load(o_ptrs, mask=m_ok[:, None], other=0.0)
        # a row no branch has written holds lse -inf and, in an unfilled accumulator, anything: it weighs 0
        o_prev = tl.where(lse_prev[:, None] == float("-inf"), 0.0, o_prev)
        merged, lse_new = _mix(o_prev, lse_prev, o_i, lse_i)
    if LAST:  # the last branch, r = 1, writes the merged rows into the output (its dtype): no accumulator store
        y_ptrs = OUT + b64 * stride_yb + hh * stride_yh + pos_m[:, None] * stride_yn + offs_d[None, :]
        tl.store(y_ptrs, merged.to(OUT.dtype.element_ty), mask=m_ok[:, None])
    else:
        tl.store(o_ptrs, merged, mask=m_ok[:, None])
    tl.store(l_ptrs, lse_new, mask=m_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don, stride_ln,
                stride_gn, row0, r, offs_n, key_ok, lo, hi, gap_at, gap, n_slots, scale2, scale, seg_n, parent_w,
                flags_n, c_j, m_j, inv, CAUSAL: tl.constexpr, MASKED: tl.constexpr, FUSE_DQ: tl.constexpr,
                HAS_KEEP: tl.constexpr, CHILD: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
                D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    offs_d = tl.arange(0, D)
    for step in range(lo, hi - gap, BLOCK_M):
        start = _past_gap(step, gap_at, gap, CHILD and not CAUSAL)
        offs_m, m_ok, pos_m = _block_rows(start, BLOCK_M, row0, r, n_slots)
        if TMA:  # q_src, do_src: descriptors (_slot_rows)
            q, do = q_src.load([start, 0]), do_src.load([start, 0])
        else:
            q, do = _load_rows(q_src, pos_m, m_ok, stride_qn, D), _load_rows(do_src, pos_m, m_ok, stride_don, D)
        lse2 = tl.load(lse_base + pos_m * stride_ln, mask=m_ok, other=float("inf"))  # missing rows: P = 0
        delta = tl.load(delta_base + pos_m * stride_ln, mask=m_ok, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale2 - lse2[None, :])  # (BN, BM)
        if MASKED:  # the causal diagonal, a nested branch's own parent segment; invalid or padded keys are dropped
            if CAUSAL:  # at the store
                p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
            if CHILD:
                p_t = tl.where(_apart(seg_n, row0, offs_m, r, parent_w), p_t, 0.0)
        if NESTED > 0:  # each pair once, weighted by the branches nested here that keep it
            p_t = p_t * _nest_factor(flags_n, _nest_flags(start, BLOCK_M, c_j, m_j, inv))
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)                                 # (BN, BM)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        if FUSE_DQ != 0:  # dQ += dS K for these queries, added atomically (other key blocks add to the same rows)
            if HAS_KEEP:  # padded keys must not reach dQ (invalid slots loaded k = 0: they add nothing)
                ds_t = tl.where(key_ok[:, None], ds_t, 0.0)
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION) * scale       # (BM, D)
            if FUSE_DQ == 2:  # one bulk reduction of the tile (TMA); slots past the end are out of bounds
                dq_out.atomic_add([start, 0], dq)
            else:  # an atomic add per element (dq_out: this (batch, head)'s fp32 dQ rows)
                tl.atomic_add(dq_out + pos_m[:, None] * stride_gn + offs_d[None, :], dq, mask=m_ok[:, None],
                              sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=placement("num_n_blocks"))
def _bwd_dkdv(Q, K, V, DO, LSE2, DELTA, KEEP, NEST, DKA, DVA, DQA,
              stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
              stride_dob, stride_don, stride_doh, stride_lb, stride_ln, stride_lh,
              stride_gb, stride_gn, stride_gh, stride_keep,
              N, w, r, head0, heads, num_n_blocks, scale2, scale, parent_w,
              CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, FUSE_DQ: tl.constexpr, FIRST: tl.constexpr,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_MAJOR: tl.constexpr, TMA: tl.constexpr, CHILD: tl.constexpr = False, NESTED: tl.constexpr = 0):
    pid, b = tl.program_id(0), tl.program_id(1)
    pid_n, hh, row0, n_slots = _program_block(pid, num_n_blocks, heads, N, w, r, head0, False, BLOCK_MAJOR)
    if pid_n * BLOCK_N >= n_slots:
        return
    if CAUSAL:  # queries from the block's first key on; past its last key no causal mask is needed
        lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
        diag = tl.minimum(((pid_n + 1) * BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M, n_slots)
        m_lo = lo
    else:  # no query needs the causal mask
        lo, m_lo, diag = 0, n_slots, n_slots
    # queries [lo, a) unmasked, [m0, m1) masked less the gap, [d, n_slots) unmasked (_regions)
    a, m0, m1, gap_at, gap, d = _regions(pid_n * BLOCK_N, tl.minimum((pid_n + 1) * BLOCK_N, n_slots) - 1, row0, r,
                                         parent_w, lo, n_slots, m_lo, diag, CAUSAL, True, CHILD, BLOCK_M)
    if CHILD and not FIRST:
        if (a - lo) + (m1 - m0 - gap) + (n_slots - d) == 0:  # no query outside these keys' parent segment
            return
    offs_n, n_ok, pos_n = _block_rows(pid_n * BLOCK_N, BLOCK_N, row0, r, n_slots)
    flags_n, c_j, m_j, inv = _nest_setup(NEST, head0 + hh, row0, r, pid_n * BLOCK_N, BLOCK_N, NESTED)
    seg_n = (row0 + offs_n * r) // parent_w  # the keys' parent segments (CHILD)
    offs_d = tl.arange(0, D)
    b64 = b.to(tl.int64)
    k = _load_rows(K + b64 * stride_kb + hh * stride_kh, pos_n, n_ok, stride_kn, D)
    v = _load_rows(V + b64 * stride_vb + hh * stride_vh, pos_n, n_ok, stride_vn, D)
    q_src = Q + b64 * stride_qb + hh * stride_qh
    do_src = DO + b64 * stride_dob + hh * stride_doh
    if TMA:  # the query loop's tiles through descriptors
        q_src = _slot_rows(q_src, row0, r, stride_qn, n_slots, BLOCK_M, D)
        do_src = _slot_rows(do_src, row0, r, stride_don, n_slots, BLOCK_M, D)
    lse_base = LSE2 + b64 * stride_lb + hh * stride_lh
    delta_base = DELTA + b64 * stride_lb + hh * stride_lh
    dq_out = DQA + b64 * stride_gb + hh * stride_gh
    if FUSE_DQ == 2:  # this (segment, head)'s dQ slots as a TMA descriptor: (n_slots, D), row stride r rows
        dq_out = tl.make_tensor_descriptor(dq_out + row0.to(tl.int64) * stride_gn, shape=[n_slots, D],
                                           strides=[r * stride_gn, 1], block_shape=[BLOCK_M, D])
    keep = n_ok
    if HAS_KEEP:  # a padded key is attended by no query: its gradient is 0
        keep = keep & (tl.load(KEEP + b64 * stride_keep + pos_n, mask=n_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    # queries [lo, a) unmasked, [m0, m1) masked less the gap, [d, n_slots) unmasked (_regions).
    # Without sharing: causal, [lo, diag) masked then [diag, n_slots) unmasked; else [0, n_slots) unmasked
    if not CAUSAL:  # (causal: a = lo)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don,
                             stride_ln, stride_gn, row0, r, offs_n, keep, lo, a, a, 0, n_slots, scale2,
                             scale, seg_n, parent_w, flags_n, c_j, m_j, inv, CAUSAL, False, FUSE_DQ, HAS_KEEP, CHILD,
                             NESTED, BLOCK_M, D, PRECISION, TMA)
    if CHILD or CAUSAL:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don,
                             stride_ln, stride_gn, row0, r, offs_n, keep, m0, m1, gap_at, gap, n_slots, scale2,
                             scale, seg_n, parent_w, flags_n, c_j, m_j, inv, CAUSAL, True, FUSE_DQ, HAS_KEEP, CHILD,
                             NESTED, BLOCK_M, D, PRECISION, TMA)
    if CHILD or CAUSAL:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don,
                             stride_ln, stride_gn, row0, r, offs_n, keep, d, n_slots, n_slots, 0, n_slots, scale2,
                             scale, seg_n, parent_w, flags_n, c_j, m_j, inv, CAUSAL, False, FUSE_DQ, HAS_KEEP, CHILD,
                             NESTED, BLOCK_M, D, PRECISION, TMA)
    g_off = b64 * stride_gb + hh * stride_gh + pos_n[:, None] * stride_gn + offs_d[None, :]
    store = n_ok[:, None]
    dk = tl.where(keep[:, None], dk * scale, 0.0)
    dv = tl.where(keep[:, None], dv, 0.0)
    if not FIRST:  # add to the branches before; the first (r = 1) writes every row
        dk += tl.load(DKA + g_off, mask=store, other=0.0)
        dv += tl.load(DVA + g_off, mask=store, other=0.0)
    tl.store(DKA + g_off, dk, mask=store)
    tl.store(DVA + g_off, dv, mask=store)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, lo, hi, gap_at,
              gap, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              HAS_KEEP: tl.constexpr, CHILD: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr,
              D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    offs_d = tl.arange(0, D)
    for step in range(lo, hi - gap, BLOCK_N):
        start = _past_gap(step, gap_at, gap, CHILD and not CAUSAL)
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_slots
        pos_n = (row0 + offs_n * r).to(tl.int64)
        if TMA:  # k_src, v_src: descriptors (_slot_rows)
            k_t, v_t = tl.trans(k_src.load([start, 0])), tl.trans(v_src.load([start, 0]))            # (D, BN)
        elif MASKED:
            k_t = tl.load(k_src + pos_n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :], other=0.0)
            v_t = tl.load(v_src + pos_n[None, :] * stride_vn + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        else:  # [0, full): every key slot exists
            k_t = tl.load(k_src + pos_n[None, :] * stride_kn + offs_d[:, None])
            v_t = tl.load(v_src + pos_n[None, :] * stride_vn + offs_d[:, None])
        p = tl.exp2(tl.dot(q, k_t, input_precision=PRECISION) * scale2 - lse2[:, None])     # (BM, BN)
        if MASKED:
            allowed = n_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
            if CHILD:
                allowed = allowed & _apart(seg_m, row0, offs_n, r, parent_w)
            p = tl.where(allowed, p, 0.0)
        if HAS_KEEP:
            real = tl.load(keep_base + pos_n, mask=n_ok, other=0)
            p = tl.where(real[None, :] != 0, p, 0.0)
        if NESTED > 0:
            p = p * _nest_factor(flags_m, _nest_flags(start, BLOCK_N, c_j, m_j, inv))
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=placement("num_m_blocks"))
def _bwd_dq(Q, K, V, DO, LSE2, DELTA, KEEP, NEST, DQA,
            stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
            stride_dob, stride_don, stride_doh, stride_lb, stride_ln, stride_lh,
            stride_gb, stride_gn, stride_gh, stride_keep,
            N, w, r, head0, heads, num_m_blocks, scale2, scale, parent_w,
            CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, FIRST: tl.constexpr, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, BLOCK_MAJOR: tl.constexpr,
            TMA: tl.constexpr, CHILD: tl.constexpr = False, NESTED: tl.constexpr = 0):
    pid, b = tl.program_id(0), tl.program_id(1)
    pid_m, hh, row0, n_slots = _program_block(pid, num_m_blocks, heads, N, w, r, head0, True, BLOCK_MAJOR)
    if pid_m * BLOCK_M >= n_slots:
        return
    a, m0, m1, gap_at, gap = _key_stretches(pid_m, n_slots, row0, r, parent_w, CAUSAL, CHILD, BLOCK_M, BLOCK_N)
    if CHILD and not FIRST:
        if a + (m1 - m0 - gap) == 0:
            return
    offs_m, m_ok, pos_m = _block_rows(pid_m * BLOCK_M, BLOCK_M, row0, r, n_slots)
    flags_m, c_j, m_j, inv = _nest_setup(NEST, head0 + hh, row0, r, pid_m * BLOCK_M, BLOCK_M, NESTED)
    seg_m = (row0 + offs_m * r) // parent_w  # the rows' parent segments (CHILD)
    offs_d = tl.arange(0, D)
    b64 = b.to(tl.int64)
    q = _load_rows(Q + b64 * stride_qb + hh * stride_qh, pos_m, m_ok, stride_qn, D)
    do = _load_rows(DO + b64 * stride_dob + hh * stride_doh, pos_m, m_ok, stride_don, D)
    l_off = b64 * stride_lb + hh * stride_lh + pos_m * stride_ln
    lse2 = tl.load(LSE2 + l_off, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + l_off, mask=m_ok, other=0.0)
    k_src = K + b64 * stride_kb + hh * stride_kh
    v_src = V + b64 * stride_vb + hh * stride_vh
    if TMA:  # the key loop's tiles through descriptors
        k_src = _slot_rows(k_src, row0, r, stride_kn, n_slots, BLOCK_N, D)
        v_src = _slot_rows(v_src, row0, r, stride_vn, n_slots, BLOCK_N, D)
    keep_base = KEEP + b64 * stride_keep
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, 0, a, a, 0,
                   n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL, False, HAS_KEEP, CHILD, NESTED,
                   BLOCK_N, D, PRECISION, TMA)
    dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, m0, m1,
                   gap_at, gap, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL, True, HAS_KEEP, CHILD,
                   NESTED, BLOCK_N, D, PRECISION, TMA)
    g_ptrs = DQA + b64 * stride_gb + hh * stride_gh + pos_m[:, None] * stride_gn + offs_d[None, :]
    dq = dq * scale
    if not FIRST:
        dq += tl.load(g_ptrs, mask=m_ok[:, None], other=0.0)
    tl.store(g_ptrs, dq, mask=m_ok[:, None])


def interpreted() -> bool:
    return _INTERPRETED
