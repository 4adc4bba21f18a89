"""Shared keys inside the fused kernels (the algebra: attention/nesting.py; the plan: nesting.kernel_plan).

Branch d = (w_d, r_d) nests in a = (w_a, r_a) when w_a | w_d, r_a | r_d and r_a | w_a. Then a (query, key)
pair that d gives inside one a-segment is a pair that a gives too (same head, same causal order), so
- d's programs skip it: a query attends only the keys outside its own a-segment (CHILD, `_regions`: whole
  blocks skipped when the block lies in one a-segment, an element mask `_apart` on the blocks at its edges);
- a's programs score it with weight 1 + c, c the number of branches nested in a (directly or through others)
  that keep both rows (NESTED): p = exp2(s - m) (1 + F_q F_k^T), F the (rows, 16) 0/1 flags of "kept by
  nested branch j" (`_nest_flags`), the product one small tensor-core dot.
The softmax over the multiset of keys is unchanged (Eq. 9-10), so the result is exact.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _nest_phases(NEST, h, row0, r, NESTED: tl.constexpr):
    """For the nested branches j = (w_j, r_j) (NEST: int32 w_0, r_0, w_1, r_1, ...; 16 columns, the first
    NESTED used): (c_j, m_j, 1 / m_j) such that slot k of this (segment, head h) of branch (w, r) is a row of j
    iff (k + c_j) % m_j == 0, m_j = r_j / r. Slot k is position row0 + k r, which j keeps for h iff
    (position mod w_j) mod r_j = h mod r_j; row0 mod w_j = (our segment start mod w_j) + s, a multiple of r plus
    s = h mod r, so the gap below is a multiple of r."""
    j = tl.arange(0, 16)
    used = j < NESTED
    w_j = tl.load(NEST + 2 * j, mask=used, other=1)
    r_j = tl.load(NEST + 2 * j + 1, mask=used, other=1)
    m_j = tl.maximum(r_j // r, 1)
    gap = (h % r_j) - (row0 % w_j) % r_j
    gap = tl.where(gap < 0, gap + r_j, gap)  # [0, r_j): slot k is kept iff k r = gap (mod r_j)
    c_j = (m_j - gap // r % m_j) % m_j
    inv = tl.where(used, 1.0 / m_j.to(tl.float32), 0.0)
    return c_j, m_j, inv


@triton.jit
def _nest_flags(first, BLOCK: tl.constexpr, c_j, m_j, inv):
    """(BLOCK, 16) float16: 1 where slot first + i is a row of nested branch j (phases from _nest_phases).
    (i + phase) % m == 0 without an integer division per element: the fraction of (i + phase + 0.5) / m is
    0.5 / m exactly then, else at least 1.5 / m (i + phase < 2^13: fp32 rounding is far below 0.5 / m)."""
    phase = (first + c_j) % m_j
    x = ((tl.arange(0, BLOCK)[:, None] + phase[None, :]).to(tl.float32) + 0.5) * inv[None, :]
    return tl.where(x - tl.floor(x) < inv[None, :], 1.0, 0.0).to(tl.float16)


@triton.jit
def _nest_setup(NEST, h, row0, r, first, BLOCK: tl.constexpr, NESTED: tl.constexpr):
    """(flags of slots first.., c_j, m_j, 1 / m_j) of the branches nested in this one (triton_nesting.py); zeros
    when none is (NESTED = 0: never read)."""
    if NESTED > 0:
        c_j, m_j, inv = _nest_phases(NEST, h, row0, r, NESTED)
        return _nest_flags(first, BLOCK, c_j, m_j, inv), c_j, m_j, inv
    else:
        return 0, 0, 0, 0.0


@triton.jit
def _nest_factor(flags_a, flags_b):
    """(A, B) fp32 weights 1 + c of the pairs of two row blocks, from their (A, 16) and (B, 16) flags."""
    return 1.0 + tl.dot(flags_a, tl.trans(flags_b))


@triton.jit
def _apart(seg_a, row0, slots_b, r, parent_w):
    """(A, B): rows of parent segments seg_a and the slots slots_b (positions row0 + slot r) lie in different
    parent segments (a nested branch keeps only these pairs). 32-bit: positions are below 2^31."""
    return seg_a[:, None] != ((row0 + slots_b * r) // parent_w)[None, :]


@triton.jit
def _regions(first, last, row0, r, parent_w, lo, hi, m_lo, m_hi, CAUSAL: tl.constexpr, OWN_KEYS: tl.constexpr,
             CHILD: tl.constexpr, BLOCK: tl.constexpr):
    """How a program whose own block holds slots first..last (queries; OWN_KEYS: keys) loops over the other side's
    slots [lo, hi) in BLOCK steps, when [m_lo, m_hi) needs the kernel's own mask (causal diagonal, last partial
    block): (a, m0, m1, gap_at, gap, d): unmasked [lo, a), masked [m0, m1) less the `gap` slots from gap_at on,
    unmasked [d, hi); the rest skipped.
    A nested branch (CHILD) masks, too, the slots [near_lo, near_hi) of the parent segments its block touches,
    and skips the whole blocks of them when its block lies in one parent segment. Causal, those lie at one end
    of the masked stretch (queries: every key from the block's parent segment on is skipped; keys: every query
    before the end of it is skipped or causally masked), so the loop needs no gap; otherwise they may lie inside."""
    if CHILD:
        seg_first = (row0 + first * r) // parent_w
        seg_last = (row0 + last * r) // parent_w
        near_lo = tl.maximum(seg_first * parent_w - row0 + r - 1, 0) // r  # first slot in seg_first
        near_hi = tl.maximum((seg_last + 1) * parent_w - row0 + r - 1, 0) // r  # first slot past seg_last
        a = tl.maximum(lo, tl.minimum(m_lo, near_lo // BLOCK * BLOCK))
        d = tl.minimum(hi, tl.maximum(m_hi, (near_hi + BLOCK - 1) // BLOCK * BLOCK))
        skip_lo = (near_lo + BLOCK - 1) // BLOCK * BLOCK
        skip_hi = tl.where(near_hi >= hi, hi, near_hi // BLOCK * BLOCK)
        whole = (seg_first == seg_last) & (skip_lo < skip_hi)
        b = tl.where(whole, tl.minimum(tl.maximum(skip_lo, a), d), d)  # skipped: [b, c)
        c = tl.where(whole, tl.minimum(tl.maximum(skip_hi, b), d), d)
        if CAUSAL:
            if OWN_KEYS:  # the queries in [a, c) are in the keys' parent segment or before them
                m0, m1 = tl.where(whole, c, a), d
            else:  # c = d = hi: the keys from b on are in the queries' parent segment
                m0, m1 = a, b
            gap_at, gap = m1, 0
        else:
            m0, m1, gap_at, gap = a, d, b, c - b
    else:
        a, m0, m1, gap_at, gap, d = m_lo, m_lo, m_hi, m_hi, 0, m_hi
    return a, m0, m1, gap_at, gap, d
