"""Which rows one dilated branch keeps: sparsify (gather) and scatter back (paper Eq. 13-15).

A branch (segment length w, dilation r) on a sequence of N rows cuts it into segments [a, a + w)
(the last one shorter when N % w != 0; w > N means one segment of length N). Inside each segment,
head h keeps the rows a + s + k*r with s = h mod r (Eq. 13-15), stopping at the segment's end.

The sparse rows of all heads are stored as one batch of short sequences, (B * n_seg, m, H, D) with
m = ceil(w / r) slots per segment and head, so a standard attention kernel can run on it. Slots
past a segment's end (ragged tail, or offset s pushing the last row out) are *invalid*: as keys they
are masked, as queries their results are dropped. Rows are addressed in the flattened (N * H) view
of a contiguous (B, N, H, D) tensor: row index = position * H + head.

With whole segments (w divides N, or w >= N) no copy is needed: the rows the heads h = s (mod r) keep
are one strided view of q, k or v as given (`offset_view`: segment stride w rows, slot stride r rows,
head stride r), with exactly ceil((w - s) / r) slots, so nothing is invalid and r need not divide w.
A ragged last segment is a layout of its own (N = its length: one segment), viewable the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class BranchLayout:
    """Sparse layout of branch (segment_length, dilation) over `seq_len` rows and `num_heads` heads."""

    seq_len: int
    num_heads: int
    segment_length: int
    dilation: int
    device: torch.device = torch.device("cpu")
    phase: int = 0  # row 0 lies `phase` rows into its segment (a shard of a longer segment); one segment only

    def __post_init__(self):
        if self.phase and self.num_segments != 1:
            raise ValueError(f"phase {self.phase} needs a single segment, got {self.num_segments}")

    @property
    def effective_segment(self) -> int:
        return min(self.segment_length, self.seq_len)  # w > N: one segment of length N

    @property
    def num_segments(self) -> int:
        return math.ceil(self.seq_len / self.effective_segment)

    @property
    def slots(self) -> int:
        """m: sparse rows per segment and head (the longest head's count)."""
        return math.ceil(self.effective_segment / self.dilation)

    @cached_property
    def _positions(self) -> tuple[Tensor, Tensor]:
        w, r, H = self.effective_segment, self.dilation, self.num_heads
        start = torch.arange(self.num_segments, device=self.device).view(-1, 1, 1) * w  # (n_seg, 1, 1)
        step = torch.arange(self.slots, device=self.device).view(1, -1, 1) * r          # (1, m, 1)
        offset = (torch.arange(H, device=self.device).view(1, 1, -1) % r - self.phase) % r  # (1, 1, H): s = h mod r
        in_segment = offset + step                                                       # (1, m, H)
        position = start + in_segment                                                    # (n_seg, m, H)
        valid = (in_segment < w) & (position < self.seq_len)
        return position, valid

    @cached_property
    def valid(self) -> Tensor:
        """(n_seg, m, H) bool: slot holds a real row of this branch."""
        return self._positions[1]

    @cached_property
    def all_valid(self) -> bool:
        return bool(self.valid.all())

    @cached_property
    def gather_index(self) -> Tensor:
        """(n_seg * m * H,) row indices into the (N * H) rows; invalid slots read row 0 (masked later)."""
        position, valid = self._positions
        heads = torch.arange(self.num_heads, device=self.device)
        rows = position * self.num_heads + heads
        return torch.where(valid, rows, torch.zeros_like(rows)).reshape(-1)

    @cached_property
    def scatter_index(self) -> Tensor:
        """(n_seg * m * H,) row indices for writing back; invalid slots go to the spare row N * H."""
        position, valid = self._positions
        heads = torch.arange(self.num_heads, device=self.device)
        rows = position * self.num_heads + heads
        return torch.where(valid, rows, torch.full_like(rows, self.seq_len * self.num_heads)).reshape(-1)

    @property
    def is_dense(self) -> bool:
        """r = 1 and whole segments: the sparse batch is just a reshape of the rows, no copy."""
        return self.dilation == 1 and self.seq_len % self.effective_segment == 0

    @property
    def viewable(self) -> bool:
        """Whole segments: each head offset's rows are a strided view, no copy needed (any r, dividing w or not)."""
        return self.phase == 0 and self.seq_len % self.effective_segment == 0

    @property
    def in_place(self) -> bool:
        """A local branch reads its rows in place, a chunk of whole segments at a time, a ragged last segment
        as a chunk of its own (its own layout: one segment, viewable); only a shard of a longer segment
        (phase) cannot."""
        return self.phase == 0

    @property
    def offsets(self) -> range:
        """The head offsets s in use: heads h = s, s + r, ... keep rows a + s + k*r (Eq. 13-15)."""
        return range(min(self.dilation, self.num_heads))

    def offset_slots(self, offset: int) -> int:
        """Slots per segment of the heads h = offset (mod r): positions s + k*r < w, s = offset mod r (w/r when
        r divides w; otherwise the first w mod r offsets keep one row more)."""
        return -(-(self.effective_segment - offset % self.dilation) // self.dilation)

    def _slot_view(self, x: Tensor, offset: int) -> Tensor:
        """(B, N, ...) with any strides -> (B, n_seg, m_s, ...) view of the positions j*w + s + k*r that heads
        h = offset (mod r) keep: segment stride w, slot stride r (m_s = offset_slots(offset))."""
        w, r = self.effective_segment, self.dilation
        stride_b, stride_n, *rest = x.stride()
        return x.as_strided((x.shape[0], self.seq_len // w, self.offset_slots(offset), *x.shape[2:]),
                            (stride_b, w * stride_n, r * stride_n, *rest), x.storage_offset() + (offset % r) * stride_n)

    def offset_view(self, rows: Tensor, offset: int, flat: bool = True, heads: bool = False,
                    head_step: int | None = None) -> Tensor:
        """(B, N * H [+ 1], ...) rows, or with `heads` (B, N, H, ...) with any strides -> the rows that heads
        h = offset (mod r) keep, without copying: (B * n_seg, m_s, H_s, ...) (`flat`; a copy only when the
        batch cannot merge with the segments, e.g. rows with a spare row), or the writable view
        (B, n_seg, m_s, H_s, ...), m_s = offset_slots(offset): segment j's rows j*w + s + k*r, strides w and
        r rows, so r need not divide w. `head_step` (a multiple of r) takes only heads h = offset (mod
        head_step). Needs `viewable`."""
        H, n = self.num_heads, self.seq_len
        grid = rows if heads else rows[:, : n * H].view(rows.shape[0], n, H, *rows.shape[2:])  # (B, N, H, ...)
        picked = self._slot_view(grid, offset)[:, :, :, offset::head_step or self.dilation]  # (B, n_seg, m_s, H_s, ...)
        return picked.flatten(0, 1) if flat else picked

    def offset_key_valid(self, key_padding_mask: Tensor | None, offset: int,
                         head_step: int | None = None) -> Tensor | None:
        """(B * n_seg, m_s, H_s) keys of `offset_view`'s heads that may be attended, or None (no padding)."""
        if key_padding_mask is None:
            return None
        real = self._slot_view(key_padding_mask, offset).flatten(0, 1)              # (B * n_seg, m_s)
        heads = len(range(offset, self.num_heads, head_step or self.dilation))
        return real.unsqueeze(-1).expand(-1, -1, heads)                          # (B * n_seg, m_s, H_s)

    def gather(self, rows: Tensor) -> Tensor:
        """(B, N * H [+ 1], ...) rows -> (B * n_seg, m, H, ...) sparse batch of this branch."""
        batch = rows.shape[0]
        if self.is_dense:
            picked = rows[:, : self.seq_len * self.num_heads]
        else:
            picked = rows.index_select(1, self.gather_index)           # (B, n_seg * m * H, ...)
        return picked.reshape(batch * self.num_segments, self.slots, self.num_heads, *rows.shape[2:])

    def sparse_to_rows(self, sparse: Tensor, batch: int) -> Tensor:
        """(B * n_seg, m, H, ...) -> (B, n_seg * m * H, ...), aligned with scatter_index."""
        return sparse.reshape(batch, -1, *sparse.shape[3:])

    def gather_lse(self, lse_rows: Tensor, batch: int) -> Tensor:
        """(B, N * H) merged lse -> (B * n_seg, m, H), +inf at invalid slots: they carry no gradient."""
        lse = self.gather(lse_rows)
        return lse if self.all_valid else lse.masked_fill(~self.slot_valid(batch), float("inf"))

    def slot_valid(self, batch: int) -> Tensor:
        """(B * n_seg, m, H) bool: `valid`, repeated for every batch element."""
        return self.valid.unsqueeze(0).expand(batch, -1, -1, -1).reshape(-1, self.slots, self.num_heads)

    def key_valid(self, key_padding_mask: Tensor | None, causal: bool, batch: int) -> Tensor | None:
        """(B * n_seg, m, H) bool keys that may be attended, or None when no key needs masking.

        Invalid slots are always the trailing ones of a segment, so a causal query (which sees only
        earlier slots) never reaches them: causal attention needs a mask only for padding."""
        if key_padding_mask is None:
            if self.all_valid or causal:
                return None
            return self.slot_valid(batch)
        real = key_padding_mask.repeat_interleave(self.num_heads, dim=1)               # (B, N * H)
        picked = real.index_select(1, self.gather_index).view(batch, *self.valid.shape)  # (B, n_seg, m, H)
        return (picked & self.valid).reshape(batch * self.num_segments, self.slots, self.num_heads)


def to_rows(x: Tensor) -> Tensor:
    """(B, N, H, D) -> (B, N * H, D) row view (copies only when x is not contiguous)."""
    return x.contiguous().view(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


@lru_cache(maxsize=256)
def branch_layout(seq_len: int, num_heads: int, segment_length: int, dilation: int,
                  device: torch.device, phase: int = 0) -> BranchLayout:
    """Layouts are reused across calls and layers (their index tensors are built once)."""
    return BranchLayout(seq_len, num_heads, segment_length, dilation, device, phase)
