"""Dilated-attention branches from the LongNet paper's geometric rule instead of hand-written lists.

The paper (sec. 2.2, 4) grows segment length and dilation together: w_i = w0 * a^i and r_i = a^i,
"up to the sequence length". Here the branches run i = 0, 1, ... and stop at the first w_i that
reaches seq_len; that last one is capped at seq_len (one segment of the whole sequence), so every
listed w is the length the kernel really uses. Each branch costs w_i / r_i^2 = w0 / a^i keys per
query and head: the total stays below w0 * a / (a - 1) for any seq_len.
"""
from __future__ import annotations


def _integer(name: str, value, minimum: int, valid: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {minimum} ({valid})")
    return value


def geometric_branches(seq_len: int, base_segment_length: int = 2048, growth: int = 2) -> tuple[list[int], list[int]]:
    """(segment_lengths, dilation_rates) with w_i = min(w0 * a^i, seq_len), r_i = a^i; the last w_i = seq_len.

    >>> geometric_branches(8192, 2048, 2)
    ([2048, 4096, 8192], [1, 2, 4])
    >>> geometric_branches(100000, 2048, 2)[0][-2:]
    [65536, 100000]
    """
    seq_len = _integer("seq_len", seq_len, 1, "tokens per sample")
    w0 = _integer("base_segment_length", base_segment_length, 1, f"w0, at most seq_len={seq_len}")
    a = _integer("growth", growth, 2, "a: each branch's segment and dilation are a times the previous")
    if w0 > seq_len:
        raise ValueError(f"base_segment_length={w0} is larger than seq_len={seq_len}: the first branch must fit "
                         f"in the sequence; use a base_segment_length in 1..{seq_len}")
    if a > w0:
        raise ValueError(f"growth={a} is larger than base_segment_length={w0}: the last (capped) branch's dilation "
                         f"could exceed its segment length; use growth <= base_segment_length")
    segment_lengths, dilation_rates = [w0], [1]
    while segment_lengths[-1] < seq_len:
        segment_lengths.append(min(segment_lengths[-1] * a, seq_len))
        dilation_rates.append(dilation_rates[-1] * a)
    return segment_lengths, dilation_rates
