"""Which slots a program of the fused kernels (kernels/triton_dilated.py, triton_backward.py) owns, which it loops
over and in which stretches, and how it reads their rows (pointers, or TMA descriptors over one (segment, head)).

Branch (w, r): segment j covers positions [j*w, min((j+1)*w, N)); head h keeps slots k = 0, 1, ... at
positions j*w + s + k*r, s = h mod r (Eq. 13-15), while they lie inside the segment. A row tile is D columns wide
and a row HEAD_DIM (triton_columns.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_columns import _columns, _load_tile
from .triton_nesting import _nest_setup, _regions


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


@triton.jit
def _load_rows(base, pos, ok, stride_n, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(BLOCK, D) tile of the rows at positions `pos` of one (batch, head): each row's HEAD_DIM values are
    contiguous; missing rows and the columns past HEAD_DIM read 0."""
    offs_d, cols = _columns(D, HEAD_DIM)
    return _load_tile(base + pos[:, None] * stride_n + offs_d[None, :], ok[:, None], cols[None, :], True,
                      HEAD_DIM < D)


@triton.jit
def _slot_rows(base, row0, r, stride_n, n_slots, BLOCK: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One (segment, head)'s slots of a (B, N, H, HEAD_DIM) tensor as a TMA descriptor: an (n_slots, HEAD_DIM)
    matrix with row stride r * stride_n, read in (BLOCK, D) tiles by the tensor-memory accelerator, which fills
    what lies out of bounds, slots past the end and columns past HEAD_DIM, with zeros (what the masked pointer
    loads give), and leaves it out of a store or reduction (FUSE_DQ 2) through the descriptor."""
    return tl.make_tensor_descriptor(base + row0.to(tl.int64) * stride_n, shape=[n_slots, HEAD_DIM],
                                     strides=[r * stride_n, 1], block_shape=[BLOCK, D])


@triton.jit
def _own_block(first, BLOCK: tl.constexpr, row0, r, n_slots, NEST, h, parent_w, NESTED: tl.constexpr):
    """A program's own slots first.. (_block_rows: indices, which exist, positions), their flags for the branches
    nested in this one (triton_nesting._nest_setup: flags, c_j, m_j, inv) and their parent segments (a nested
    branch's, CHILD)."""
    offs, ok, pos = _block_rows(first, BLOCK, row0, r, n_slots)
    flags, c_j, m_j, inv = _nest_setup(NEST, h, row0, r, first, BLOCK, NESTED)
    return offs, ok, pos, flags, c_j, m_j, inv, (row0 + offs * r) // parent_w


@triton.jit
def _own_rows(base, row0, r, stride_n, n_slots, first, pos, ok, BLOCK: tl.constexpr, D: tl.constexpr,
              HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """A program's own (BLOCK, D) rows, slots first.. (positions `pos`, existing where `ok`) of one (batch, head):
    through a TMA descriptor (TMA: what a warp-specialised loop's partitions need, _slot_rows) or pointer loads."""
    if TMA:
        return _slot_rows(base, row0, r, stride_n, n_slots, BLOCK, D, HEAD_DIM).load([first, 0])
    else:
        return _load_rows(base, pos, ok, stride_n, D, HEAD_DIM)


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
