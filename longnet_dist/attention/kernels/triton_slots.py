"""Which slots a program of the fused kernels (kernels/triton_dilated.py) owns, and which it loops over.

Branch (w, r): segment j covers positions [j*w, min((j+1)*w, N)); head h keeps slots k = 0, 1, ... at
positions j*w + s + k*r, s = h mod r (Eq. 13-15), while they lie inside the segment.
"""
from __future__ import annotations

import triton
import triton.language as tl


def placement(count: str) -> list[str]:
    """The kernels' integers that only place a program (its segment, head and slot block, once per program):
    left unspecialised (`do_not_specialize`). Triton's JIT would otherwise compile a variant per class of value
    (divisible by 16, equal to 1), so per head group start and size; one serves them all."""
    return ["head0", "heads", count]


@triton.jit
def _slots(N, w, r, seg, h):
    """(position of slot 0, number of slots) of head h in segment `seg` (Eq. 13-15)."""
    seg_start = seg * w
    seg_len = tl.minimum(w, N - seg_start)
    s = h % r
    return seg_start + s, (seg_len - s + r - 1) // r


@triton.jit
def _program_block(pid, num_blocks, heads, N, w, r, head0, LONGEST_FIRST: tl.constexpr,
                   BLOCK_MAJOR: tl.constexpr):
    """Which slot block this program owns: (block, head in the group, position of slot 0, slot count).
    A (segment, head)'s programs are adjacent (they share its rows in L2), causal query blocks longest first
    (LONGEST_FIRST; key blocks are so as they come). BLOCK_MAJOR (a launch of few programs): block 0 of
    every (segment, head) first, then block 1, ...: the whole launch's longest programs start first."""
    if BLOCK_MAJOR:
        seg_heads = tl.cdiv(N, w) * heads
        block, seg_head = pid // seg_heads, pid % seg_heads
    else:
        block, seg_head = pid % num_blocks, pid // num_blocks
    if LONGEST_FIRST:
        block = num_blocks - 1 - block
    hh = seg_head % heads
    row0, n_slots = _slots(N, w, r, seg_head // heads, head0 + hh)
    return block, hh, row0, n_slots


@triton.jit
def _block_rows(first, BLOCK: tl.constexpr, row0, r, n_slots):
    """Slots [first, first + BLOCK): (slot indices, which exist, their positions as int64)."""
    offs = first + tl.arange(0, BLOCK)
    return offs, offs < n_slots, (row0 + offs * r).to(tl.int64)


@triton.jit
def _key_range(pid_m, n_slots, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key slots a query block attends: [0, full) need no mask, [full, hi) do (the causal diagonal,
    or the last partial block)."""
    if CAUSAL:  # keys before the block's first query need no causal mask
        hi = tl.minimum(n_slots, (pid_m + 1) * BLOCK_M)
        full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
    else:
        hi = n_slots
        full = n_slots // BLOCK_N * BLOCK_N
    return full, hi
