"""Sequence-parallel planning, errors and the byte formula, without processes (a stand-in group).

Which branch is local, which spans which ranks (ragged last segments over ranks included), the key
parts a causal rank attends, the ValueErrors raised before any communication, and the closed form
of the bytes per rank (independent of N when N and P grow together).
"""
from __future__ import annotations

import pytest
import torch

from longnet_dist.attention import dilated_attention
from longnet_dist.attention.dilated import LocalBranch
from longnet_dist.attention.sequence_parallel import SpanningBranch, comm_volume, plan_branches


class StandInGroup:
    """Duck-typed SequenceGroup: size, rank, and segment_subgroup over `prepared` spans."""

    def __init__(self, size: int, rank: int, prepared=(), first: int = 0):
        self.size, self.rank, self.prepared, self.first = size, rank, set(prepared), first

    def segment_subgroup(self, first: int, count: int):
        if count != self.size and count != 1 and (first, count) not in self.prepared:
            raise ValueError(f"segment span {(first, count)} was not prepared")
        return StandInGroup(count, self.rank - first, first=first)


def _describe(branch):
    if isinstance(branch, SpanningBranch):
        return ("span", branch.segment_length, branch.dilation, branch.subgroup.first, branch.subgroup.size,
                branch.subgroup.rank)
    assert isinstance(branch, LocalBranch)
    return ("local", branch.segment_length, branch.dilation)


# P = 5, l = 8, N = 40: w=8 local; w=16 spans 2 ([0,2), [2,4), rank 4 alone); w=24 spans 3 ([0,3) and
# the ragged [3,5)); w=64 > N spans all 5.
SEGS, RATES = [8, 16, 24, 64], [1, 2, 4, 8]
SPANS = [(0, 2), (2, 2), (0, 3), (3, 2)]
EXPECTED_PLAN = {
    0: [("local", 8, 1), ("span", 16, 2, 0, 2, 0), ("span", 24, 4, 0, 3, 0), ("span", 64, 8, 0, 5, 0)],
    2: [("local", 8, 1), ("span", 16, 2, 2, 2, 0), ("span", 24, 4, 0, 3, 2), ("span", 64, 8, 0, 5, 2)],
    3: [("local", 8, 1), ("span", 16, 2, 2, 2, 1), ("span", 24, 4, 3, 2, 0), ("span", 64, 8, 0, 5, 3)],
    4: [("local", 8, 1), ("local", 8, 2), ("span", 24, 4, 3, 2, 1), ("span", 64, 8, 0, 5, 4)],
}


@pytest.mark.parametrize("rank", sorted(EXPECTED_PLAN))
def test_plan_local_spanning_and_ragged(rank):
    branches = plan_branches(8, SEGS, RATES, StandInGroup(5, rank, SPANS))
    assert [_describe(b) for b in branches] == EXPECTED_PLAN[rank]


def test_causal_key_parts():
    """Slots of the gathered keys (l/r = 4 per rank): earlier ranks fully, own causally, later never."""
    branch = SpanningBranch(24, 4, StandInGroup(3, 2))
    assert branch.key_parts(4, causal=False) == [(slice(0, 12), False)]
    assert branch.key_parts(4, causal=True) == [(slice(0, 8), False), (slice(8, 12), True)]
    assert SpanningBranch(24, 4, StandInGroup(3, 0)).key_parts(4, causal=True) == [(slice(0, 4), True)]


@pytest.mark.parametrize("local_len, segs, rates, sp, words", [
    (16, [12], [1], 2, ["segment length 12", "does not tile", "16"]),
    (16, [24], [1], 4, ["segment length 24", "not a multiple of the per-rank shard of 16"]),
    (16, [32, 16], [2], 2, ["same length"]),
])
def test_impossible_sharding_is_one_clear_error(local_len, segs, rates, sp, words):
    with pytest.raises(ValueError) as error:
        plan_branches(local_len, segs, rates, StandInGroup(sp, 0, [(0, 2)]))
    for word in words:
        assert word in str(error.value)


def test_errors_come_before_any_communication():
    """dilated_attention with a group whose subgroup is missing fails in planning, naming the spans."""
    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"segment_spans\(32, 4, \[16\]\)\) = \[\(0, 2\), \(2, 2\)\]"):
        dilated_attention(q, q, q, [16], [2], sequence_group=StandInGroup(4, 1))


def test_volume_closed_form():
    """P=5, l=8 plan above, rank 3, B=2, H=3, D=4, fp32, with mask: w=16 (2 ranks, r=2), w=24 (ragged
    2 ranks, r=4) and w=64 (5 ranks, r=8) move (count-1) * 2 * B * (l/r) * H * D * 4 bytes each."""
    volume = comm_volume(batch=2, local_len=8, sp_size=5, sp_rank=3, num_heads=3, head_dim=4, element_size=4,
                         segment_lengths=SEGS, dilation_rates=RATES, key_padding_mask=True)
    rows = [(2 - 1) * 2 * (8 // 2) * 3, (2 - 1) * 2 * (8 // 4) * 3, (5 - 1) * 2 * (8 // 8) * 3]  # counts * B * l/r * H
    assert volume.forward_kv == volume.backward_kv == sum(rows) * 2 * 4 * 4
    assert volume.forward_mask == sum(rows)
    assert volume.total == 2 * volume.forward_kv + volume.forward_mask
    # rank 4 holds w=16 alone (local): only w=24 and w=64 communicate
    alone = comm_volume(batch=2, local_len=8, sp_size=5, sp_rank=4, num_heads=3, head_dim=4, element_size=4,
                        segment_lengths=SEGS, dilation_rates=RATES)
    assert alone.forward_kv == sum(rows[1:]) * 2 * 4 * 4 and alone.forward_mask == 0


@pytest.mark.parametrize("sp", [8, 64, 1024])
def test_volume_independent_of_n_when_n_and_p_double(sp):
    """Paper claim: with w <= N, bytes per rank depend on l = N/P and the branches, not on N."""
    def volume(sp_size):
        return comm_volume(batch=1, local_len=1024, sp_size=sp_size, sp_rank=0, num_heads=16, head_dim=64,
                           element_size=2, segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4])
    assert volume(sp) == volume(2 * sp)
    # and about 2 * (w/r) * H * D * el per spanning branch: exactly 2 * ((w - l)/r) * H * D * el
    assert volume(sp).forward_kv == sum(2 * ((w - 1024) // r) * 16 * 64 * 2 for w, r in [(2048, 1), (4096, 2), (8192, 4)])
