"""Mixing branches by their softmax denominators (paper Eq. 9-10), one branch at a time.

    out(p) = sum_i exp(lse_i(p) - LSE(p)) * o_i(p),    LSE(p) = logsumexp_i lse_i(p)       (Eq. 10)

The running state keeps, per row (position, head), the output normalised over the branches seen so
far and their joint log-sum-exp; adding a branch is the online-softmax update. Rows no branch
covers keep lse = -inf and output 0. All in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _weights(prev_lse: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The online update's per-row weights (keep, take), each (..., 1), and the joint lse (...)."""
    new_lse = torch.logaddexp(prev_lse, lse)                             # Eq. 10, LSE over branches so far
    finite = torch.where(torch.isfinite(new_lse), new_lse, torch.zeros_like(new_lse))
    keep = torch.exp(prev_lse - finite).unsqueeze(-1)                    # weight of the branches merged before
    take = torch.exp(lse - finite).unsqueeze(-1)                         # Eq. 9: s_i / sum_j s_j
    return keep, take, new_lse


def _mix(prev_out: Tensor, prev_lse: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """The online update: (mixture of the branches so far and this one, their joint lse)."""
    keep, take, new_lse = _weights(prev_lse, lse)
    return prev_out * keep + out * take, new_lse


class BranchMerger:
    """Accumulates branch outputs (Eq. 9-10) into dense rows (B, N * H + 1, D); the last row is a spare
    that swallows invalid slots, so scatters need no masking."""

    def __init__(self, batch: int, rows: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.rows = rows
        self.out = torch.zeros(batch, rows + 1, head_dim, dtype=dtype, device=device)
        self.lse = torch.full((batch, rows + 1), float("-inf"), dtype=dtype, device=device)
        self._empty = True

    def add(self, index: Tensor, out: Tensor, lse: Tensor) -> None:
        """Merge one branch: `index` (S,) rows, `out` (B, S, D), `lse` (B, S) for those rows."""
        out, lse = out.to(self.out.dtype), lse.to(self.lse.dtype)
        if self._empty:  # first branch: nothing to mix with
            self.out.index_copy_(1, index, out)
            self.lse.index_copy_(1, index, lse)
            self._empty = False
            return
        mixed, new_lse = _mix(self.out.index_select(1, index), self.lse.index_select(1, index), out, lse)
        self.out.index_copy_(1, index, mixed)
        self.lse.index_copy_(1, index, new_lse)

    def add_into(self, out_view: Tensor, lse_view: Tensor, out: Tensor, lse: Tensor) -> None:
        """Merge part of a branch into rows given as writable views of `self.out` (..., D) and `self.lse`
        (...) (layout.offset_view), with `out`, `lse` of the same shapes: the same update, no index
        copies. A branch may come in several parts; `mark_merged` after its last one."""
        out, lse = out.to(self.out.dtype), lse.to(self.lse.dtype)
        if self._empty:
            out_view.copy_(out)
            lse_view.copy_(lse)
            return
        # In place: the weights are per row (1/D of the data); the rows themselves are scaled and
        # accumulated where they lie, with no output-sized temporary (each would be a fresh,
        # page-faulted allocation once it passes glibc's 32 MiB mmap threshold: 64K -> 256K cost 4.4x).
        keep, take, new_lse = _weights(lse_view, lse)
        out_view.mul_(keep).addcmul_(out, take)
        lse_view.copy_(new_lse)

    def mark_merged(self) -> None:
        """A branch was merged into `out` / `lse` in place (`add_into`, fused_launch.py): later adds must
        mix, not copy."""
        self._empty = False

    def result(self) -> tuple[Tensor, Tensor]:
        """(out (B, N * H, D), lse (B, N * H)) without the spare row."""
        return self.out[:, : self.rows], self.lse[:, : self.rows]
