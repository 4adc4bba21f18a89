"""The fused LongNet kernels' backward (Triton; the forward and the design: triton_dilated.py).

The merged softmax identity (see dilated.py): `_bwd_prep` (triton_rows.py) computes delta = rowsum(dO * O) and
lse*log2(e) once for all branches; per branch `_bwd_dkdv` (a program per key block, looping over query blocks)
recomputes P = exp2(q.k*scale*log2e - lse2) and adds dK, dV into fp32 accumulators in place. dQ either comes from
the same loop (FUSE_DQ: dS K added atomically to the query rows, 1 one atomic per element, 2 one TMA bulk reduction
per tile) or from `_bwd_dq` (a program per query block, looping over key blocks: 7 products, no atomics). WS: one
loop over every block, all masked, for Triton's warp specialisation (as `_fwd`; dK/dV only with FUSE_DQ = 0, whose
in-loop reductions the pass refuses).
In a 16-bit backward the covering r = 1 branch runs last and writes dK, dV (and dQ from `_bwd_dq`) in the
gradients' dtype (LAST); the branches before it mark each row they write in a byte per (position, head) that
`_bwd_prep` cleared (MARKED), so the fp32 accumulators need no fill and no store pass follows (`_add_rows`).
Tiles are D columns wide, rows HEAD_DIM (triton_columns.py): the gradients' columns past HEAD_DIM are products
of zero columns (0), and never stored.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_columns import _columns, _load_tile, _tile_mask
from .triton_nesting import _apart, _nest_factor, _nest_flags, _regions
from .triton_slots import (_block_rows, _key_stretches, _load_rows, _own_block, _own_rows, _past_gap, _program_block,
                           _slot_rows, placement)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don, stride_ln,
                stride_gn, row0, r, offs_n, key_ok, lo, hi, gap_at, gap, n_slots, scale2, scale, seg_n, parent_w,
                flags_n, c_j, m_j, inv, CAUSAL: tl.constexpr, MASKED: tl.constexpr, FUSE_DQ: tl.constexpr,
                HAS_KEEP: tl.constexpr, CHILD: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
                D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                WS: tl.constexpr = False):
    offs_d, cols = _columns(D, HEAD_DIM)
    for step in tl.range(lo, hi - gap, BLOCK_M, warp_specialize=WS):
        start = _past_gap(step, gap_at, gap, CHILD and not CAUSAL)
        offs_m, m_ok, pos_m = _block_rows(start, BLOCK_M, row0, r, n_slots)
        if TMA:  # q_src, do_src: descriptors (_slot_rows)
            q, do = q_src.load([start, 0]), do_src.load([start, 0])
        else:
            q = _load_rows(q_src, pos_m, m_ok, stride_qn, D, HEAD_DIM)
            do = _load_rows(do_src, pos_m, m_ok, stride_don, D, HEAD_DIM)
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
                tl.atomic_add(dq_out + pos_m[:, None] * stride_gn + offs_d[None, :], dq,
                              mask=_tile_mask(m_ok[:, None], cols[None, :], HEAD_DIM < D), sem="relaxed")
    return dk, dv


@triton.jit
def _add_rows(x, y, XA, YA, FLAGS, XO, YO, b64, hh, pos, ok, stride_gb, stride_gn, stride_gh, stride_lb, stride_ln,
              stride_lh, stride_yb, stride_yn, stride_yh, D: tl.constexpr, HEAD_DIM: tl.constexpr, TWO: tl.constexpr,
              FIRST: tl.constexpr, MARKED: tl.constexpr, LAST: tl.constexpr):
    """A program's gradient rows of this branch, x (and y: TWO) (BLOCK, D) fp32 at positions `pos` (existing where
    `ok`) of one (batch, head), into the fp32 accumulators XA (YA), added to what the branches before put there.
    FIRST: the covering r = 1 branch, run first, writes them (nothing before). MARKED: the accumulators are not
    filled; a row's byte in FLAGS (the layout of LSE2) says whether a branch before wrote it, and this one sets it.
    LAST: the covering branch, run last, writes the sums into XO (YO), the gradients in their dtype, instead: no
    store pass after the branches. Only the first HEAD_DIM of the D columns are read and written."""
    offs_d, cols = _columns(D, HEAD_DIM)
    g_off = b64 * stride_gb + hh * stride_gh + pos[:, None] * stride_gn + offs_d[None, :]
    f_ptrs = FLAGS + b64 * stride_lb + hh * stride_lh + pos * stride_ln
    rows = _tile_mask(ok[:, None], cols[None, :], HEAD_DIM < D)
    if not FIRST:
        earlier = rows
        if MARKED:  # unwritten rows hold anything: not read
            earlier = earlier & (tl.load(f_ptrs, mask=ok, other=0) != 0)[:, None]
        x += tl.load(XA + g_off, mask=earlier, other=0.0)
        if TWO:
            y += tl.load(YA + g_off, mask=earlier, other=0.0)
    if LAST:
        y_off = b64 * stride_yb + hh * stride_yh + pos[:, None] * stride_yn + offs_d[None, :]
        tl.store(XO + y_off, x.to(XO.dtype.element_ty), mask=rows)
        if TWO:
            tl.store(YO + y_off, y.to(YO.dtype.element_ty), mask=rows)
    else:
        tl.store(XA + g_off, x, mask=rows)
        if TWO:
            tl.store(YA + g_off, y, mask=rows)
        if MARKED:
            tl.store(f_ptrs, ok.to(tl.uint8), mask=ok)


@triton.jit(do_not_specialize=placement("num_n_blocks"))
def _bwd_dkdv(Q, K, V, DO, LSE2, DELTA, KEEP, NEST, DKA, DVA, DQA, FLAGS, DKO, DVO,
              stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
              stride_dob, stride_don, stride_doh, stride_lb, stride_ln, stride_lh,
              stride_gb, stride_gn, stride_gh, stride_yb, stride_yn, stride_yh, stride_keep,
              N, w, r, head0, heads, num_n_blocks, scale2, scale, parent_w,
              CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, FUSE_DQ: tl.constexpr, FIRST: tl.constexpr,
              D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_MAJOR: tl.constexpr, TMA: tl.constexpr, CHILD: tl.constexpr = False,
              NESTED: tl.constexpr = 0, WS: tl.constexpr = False, MARKED: tl.constexpr = False,
              LAST: tl.constexpr = False):
    pid, b = tl.program_id(0), tl.program_id(1)
    pid_n, hh, row0, n_slots = _program_block(pid, num_n_blocks, heads, N, w, r, head0, False, BLOCK_MAJOR)
    if not WS:  # (no early return under warp specialisation: see the loop below)
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
    if CHILD and not FIRST and not LAST and not WS:
        if (a - lo) + (m1 - m0 - gap) + (n_slots - d) == 0:  # no query outside these keys' parent segment
            return
    offs_n, n_ok, pos_n, flags_n, c_j, m_j, inv, seg_n = _own_block(pid_n * BLOCK_N, BLOCK_N, row0, r, n_slots, NEST,
                                                                    head0 + hh, parent_w, NESTED)
    b64 = b.to(tl.int64)
    k = _own_rows(K + b64 * stride_kb + hh * stride_kh, row0, r, stride_kn, n_slots, pid_n * BLOCK_N, pos_n, n_ok,
                  BLOCK_N, D, HEAD_DIM, WS)
    v = _own_rows(V + b64 * stride_vb + hh * stride_vh, row0, r, stride_vn, n_slots, pid_n * BLOCK_N, pos_n, n_ok,
                  BLOCK_N, D, HEAD_DIM, WS)
    q_src = Q + b64 * stride_qb + hh * stride_qh
    do_src = DO + b64 * stride_dob + hh * stride_doh
    if TMA:  # the query loop's tiles through descriptors
        q_src = _slot_rows(q_src, row0, r, stride_qn, n_slots, BLOCK_M, D, HEAD_DIM)
        do_src = _slot_rows(do_src, row0, r, stride_don, n_slots, BLOCK_M, D, HEAD_DIM)
    lse_base = LSE2 + b64 * stride_lb + hh * stride_lh
    delta_base = DELTA + b64 * stride_lb + hh * stride_lh
    dq_out = DQA + b64 * stride_gb + hh * stride_gh
    if FUSE_DQ == 2:  # this (segment, head)'s dQ slots as a TMA descriptor: (n_slots, HEAD_DIM), row stride r rows;
        # the reductions leave out what lies past its bounds (slots past the end, columns past HEAD_DIM)
        dq_out = _slot_rows(dq_out, row0, r, stride_gn, n_slots, BLOCK_M, D, HEAD_DIM)
    keep = n_ok
    if HAS_KEEP:  # a padded key is attended by no query: its gradient is 0
        keep = keep & (tl.load(KEEP + b64 * stride_keep + pos_n, mask=n_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    # queries [lo, a) unmasked, [m0, m1) masked less the gap, [d, n_slots) unmasked (_regions).
    # Without sharing: causal, [lo, diag) masked then [diag, n_slots) unmasked; else [0, n_slots) unmasked
    if WS:  # one loop over what the three cover, every block masked (the masks keep the unmasked stretches whole):
        # causal [m0, n_slots) ([lo, a) is empty), else [0, n_slots) less the gap; a program past its slots loops
        # over nothing and stores nothing (n_ok is all false)
        q_lo = m0 if CAUSAL else lo
        q_hi = tl.where(pid_n * BLOCK_N >= n_slots, q_lo + gap, n_slots)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don,
                             stride_ln, stride_gn, row0, r, offs_n, keep, q_lo, q_hi, gap_at, gap, n_slots, scale2,
                             scale, seg_n, parent_w, flags_n, c_j, m_j, inv, CAUSAL, True, FUSE_DQ, HAS_KEEP, CHILD,
                             NESTED, BLOCK_M, D, HEAD_DIM, PRECISION, TMA, True)
    else:
        if not CAUSAL:  # (causal: a = lo)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don,
                                 stride_ln, stride_gn, row0, r, offs_n, keep, lo, a, a, 0, n_slots, scale2, scale,
                                 seg_n, parent_w, flags_n, c_j, m_j, inv, CAUSAL, False, FUSE_DQ, HAS_KEEP, CHILD,
                                 NESTED, BLOCK_M, D, HEAD_DIM, PRECISION, TMA)
        if CHILD or CAUSAL:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don,
                                 stride_ln, stride_gn, row0, r, offs_n, keep, m0, m1, gap_at, gap, n_slots, scale2,
                                 scale, seg_n, parent_w, flags_n, c_j, m_j, inv, CAUSAL, True, FUSE_DQ, HAS_KEEP,
                                 CHILD, NESTED, BLOCK_M, D, HEAD_DIM, PRECISION, TMA)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_out, stride_qn, stride_don,
                                 stride_ln, stride_gn, row0, r, offs_n, keep, d, n_slots, n_slots, 0, n_slots, scale2,
                                 scale, seg_n, parent_w, flags_n, c_j, m_j, inv, CAUSAL, False, FUSE_DQ, HAS_KEEP,
                                 CHILD, NESTED, BLOCK_M, D, HEAD_DIM, PRECISION, TMA)
    dk = tl.where(keep[:, None], dk * scale, 0.0)
    dv = tl.where(keep[:, None], dv, 0.0)
    _add_rows(dk, dv, DKA, DVA, FLAGS, DKO, DVO, b64, hh, pos_n, n_ok, stride_gb, stride_gn, stride_gh, stride_lb,
              stride_ln, stride_lh, stride_yb, stride_yn, stride_yh, D, HEAD_DIM, True, FIRST, MARKED, LAST)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, lo, hi, gap_at,
              gap, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              HAS_KEEP: tl.constexpr, CHILD: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr,
              D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
              WS: tl.constexpr = False):
    offs_d, cols = _columns(D, HEAD_DIM)
    for step in tl.range(lo, hi - gap, BLOCK_N, warp_specialize=WS):
        start = _past_gap(step, gap_at, gap, CHILD and not CAUSAL)
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_slots
        pos_n = (row0 + offs_n * r).to(tl.int64)
        if TMA:  # k_src, v_src: descriptors (_slot_rows)
            k_t, v_t = tl.trans(k_src.load([start, 0])), tl.trans(v_src.load([start, 0]))            # (D, BN)
        else:  # MASKED or not ([0, full): every key slot exists)
            k_t = _load_tile(k_src + pos_n[None, :] * stride_kn + offs_d[:, None], n_ok[None, :], cols[:, None],
                             MASKED, HEAD_DIM < D)
            v_t = _load_tile(v_src + pos_n[None, :] * stride_vn + offs_d[:, None], n_ok[None, :], cols[:, None],
                             MASKED, HEAD_DIM < D)
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
def _bwd_dq(Q, K, V, DO, LSE2, DELTA, KEEP, NEST, DQA, FLAGS, DQO,
            stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
            stride_dob, stride_don, stride_doh, stride_lb, stride_ln, stride_lh,
            stride_gb, stride_gn, stride_gh, stride_yb, stride_yn, stride_yh, stride_keep,
            N, w, r, head0, heads, num_m_blocks, scale2, scale, parent_w,
            CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, FIRST: tl.constexpr, D: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_MAJOR: tl.constexpr, TMA: tl.constexpr, CHILD: tl.constexpr = False, NESTED: tl.constexpr = 0,
            WS: tl.constexpr = False, MARKED: tl.constexpr = False, LAST: tl.constexpr = False):
    pid, b = tl.program_id(0), tl.program_id(1)
    pid_m, hh, row0, n_slots = _program_block(pid, num_m_blocks, heads, N, w, r, head0, True, BLOCK_MAJOR)
    if not WS:  # (no early return under warp specialisation: see _fwd)
        if pid_m * BLOCK_M >= n_slots:
            return
    a, m0, m1, gap_at, gap = _key_stretches(pid_m, n_slots, row0, r, parent_w, CAUSAL, CHILD, BLOCK_M, BLOCK_N)
    if CHILD and not FIRST and not LAST and not WS:
        if a + (m1 - m0 - gap) == 0:
            return
    offs_m, m_ok, pos_m, flags_m, c_j, m_j, inv, seg_m = _own_block(pid_m * BLOCK_M, BLOCK_M, row0, r, n_slots, NEST,
                                                                    head0 + hh, parent_w, NESTED)
    b64 = b.to(tl.int64)
    q = _own_rows(Q + b64 * stride_qb + hh * stride_qh, row0, r, stride_qn, n_slots, pid_m * BLOCK_M, pos_m, m_ok,
                  BLOCK_M, D, HEAD_DIM, WS)
    do = _own_rows(DO + b64 * stride_dob + hh * stride_doh, row0, r, stride_don, n_slots, pid_m * BLOCK_M, pos_m,
                   m_ok, BLOCK_M, D, HEAD_DIM, WS)
    l_off = b64 * stride_lb + hh * stride_lh + pos_m * stride_ln
    lse2 = tl.load(LSE2 + l_off, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + l_off, mask=m_ok, other=0.0)
    k_src = K + b64 * stride_kb + hh * stride_kh
    v_src = V + b64 * stride_vb + hh * stride_vh
    if TMA:  # the key loop's tiles through descriptors
        k_src = _slot_rows(k_src, row0, r, stride_kn, n_slots, BLOCK_N, D, HEAD_DIM)
        v_src = _slot_rows(v_src, row0, r, stride_vn, n_slots, BLOCK_N, D, HEAD_DIM)
    keep_base = KEEP + b64 * stride_keep
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    if WS:  # one loop, every block masked, as in _fwd
        hi = tl.where(pid_m * BLOCK_M >= n_slots, gap, m1)
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, 0, hi,
                       gap_at, gap, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL, True, HAS_KEEP,
                       CHILD, NESTED, BLOCK_N, D, HEAD_DIM, PRECISION, TMA, True)
    else:
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, 0, a, a,
                       0, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL, False, HAS_KEEP, CHILD,
                       NESTED, BLOCK_N, D, HEAD_DIM, PRECISION, TMA)
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, keep_base, stride_kn, stride_vn, row0, r, offs_m, m0, m1,
                       gap_at, gap, n_slots, scale2, seg_m, parent_w, flags_m, c_j, m_j, inv, CAUSAL, True, HAS_KEEP,
                       CHILD, NESTED, BLOCK_N, D, HEAD_DIM, PRECISION, TMA)
    dq = dq * scale  # (the second pair of arguments is unused: TWO False)
    _add_rows(dq, dq, DQA, DQA, FLAGS, DQO, DQO, b64, hh, pos_m, m_ok, stride_gb, stride_gn, stride_gh, stride_lb,
              stride_ln, stride_lh, stride_yb, stride_yn, stride_yh, D, HEAD_DIM, False, FIRST, MARKED, LAST)
