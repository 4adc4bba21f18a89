"""The columns of the fused kernels' row tiles (kernels/triton_dilated.py, triton_backward.py, triton_rows.py).

A tile is D values wide, D (a constexpr) a power of two >= 16 as tl.arange and tl.dot need (kernels.triton_width),
while a row holds HEAD_DIM (a constexpr too) real values: 80 and 96 run in tiles of 128, 24 in tiles of 32. The
D - HEAD_DIM columns past a row's end are never read nor written: loads mask them with 0 (a zero column adds
nothing to q.k, and P V or dS K over zero columns gives zero columns), and every store of a tile masks them, so
the tensors and accumulators hold HEAD_DIM columns (no padded copies). Where HEAD_DIM == D (`COLS` False) no
column mask is built: the code is the plain one.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _columns(D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(D,) column offsets of a tile and which of them a row holds (the first HEAD_DIM)."""
    offs = tl.arange(0, D)
    return offs, offs < HEAD_DIM


@triton.jit
def _tile_mask(rows_ok, cols_ok, COLS: tl.constexpr):
    """A tile's mask: rows_ok, and cols_ok too when some columns lie past the rows' end (COLS: HEAD_DIM < D),
    each already shaped to broadcast against the tile ((BLOCK, 1) and (1, D), or transposed)."""
    if COLS:
        return rows_ok & cols_ok
    else:
        return rows_ok


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, ROWS: tl.constexpr, COLS: tl.constexpr):
    """tl.load(ptrs), 0 where rows_ok (ROWS) or cols_ok (COLS) is false (as in _tile_mask); an unmasked load when
    neither is asked for (the loops' blocks that need no row mask, at HEAD_DIM == D)."""
    if ROWS:
        return tl.load(ptrs, mask=_tile_mask(rows_ok, cols_ok, COLS), other=0.0)
    elif COLS:
        return tl.load(ptrs, mask=cols_ok, other=0.0)
    else:
        return tl.load(ptrs)
