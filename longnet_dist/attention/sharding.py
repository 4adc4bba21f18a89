"""Which branches stay on one rank and which span several (paper section 3.1), as plain arithmetic.

P ranks hold contiguous shards of l = N / P rows. A branch with (effective) segment length w <= l
lives inside one rank; a branch with w > l spans G = w / l consecutive ranks, and the ranks of one
segment form a subgroup. The trainer calls these at start-up, before any compute.
"""
from __future__ import annotations

from typing import Sequence

from .checks import check_branches


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sequence_parallel_config(seq_len: int, sp_size: int, segment_lengths: Sequence[int],
                                   dilation_rates: Sequence[int]) -> None:
    """Raise a ValueError naming the values when `seq_len` cannot be sharded over `sp_size` ranks
    for these branches; return None when it can."""
    segment_lengths, dilation_rates = check_branches(segment_lengths, dilation_rates)
    _check_shards(seq_len, sp_size)
    if sp_size == 1:
        return
    local = seq_len // sp_size
    for w in segment_lengths:
        w_eff = min(w, seq_len)
        if w_eff <= local and local % w_eff != 0:
            raise ValueError(f"segment length {w} does not tile the per-rank shard of {local} rows "
                             f"(seq_len {seq_len} / sp {sp_size}): segments would straddle ranks; use a segment "
                             f"length that divides {local}, or one that is a multiple of it")
        if w_eff > local and w_eff % local != 0:
            raise ValueError(f"segment length {w} spans ranks but is not a multiple of the per-rank shard of {local} "
                             f"rows (seq_len {seq_len} / sp {sp_size}); use a multiple of {local}, or a divisor")


def _check_shards(seq_len, sp_size) -> None:
    """seq_len rows sharded over sp_size ranks, l = seq_len / sp_size >= 1 rows each."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"sequence_parallel_size must be a positive integer, got {sp_size!r}")
    if seq_len % sp_size != 0:
        raise ValueError(f"seq_len {seq_len} is not divisible by sequence_parallel_size {sp_size}: every rank holds "
                         f"seq_len / sp rows (at least one); valid sp sizes for this seq_len include "
                         f"{[d for d in _divisors(seq_len) if d <= 64]}")


def spanning_ranks(seq_len: int, sp_size: int, segment_length: int) -> int:
    """G: how many ranks one segment of this branch spans (1 = the branch is local)."""
    _check_shards(seq_len, sp_size)
    if not isinstance(segment_length, int) or isinstance(segment_length, bool) or segment_length < 1:
        raise ValueError(f"segment length {segment_length!r} must be a positive integer")
    local = seq_len // sp_size
    return max(1, min(segment_length, seq_len) // local)


def segment_spans(seq_len: int, sp_size: int, segment_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(first sp rank, rank count) of every multi-rank segment group the sharded branches use, sorted;
    the trainer hands them to `SequenceGroup.prepare_segment_subgroups` once at setup."""
    _check_shards(seq_len, sp_size)
    spans: set[tuple[int, int]] = set()
    for w in segment_lengths:
        span = spanning_ranks(seq_len, sp_size, w)
        if span == 1:
            continue
        for first in range(0, sp_size, span):
            count = min(span, sp_size - first)  # the ragged last segment spans fewer ranks
            if count > 1:
                spans.add((first, count))
    return sorted(spans)
