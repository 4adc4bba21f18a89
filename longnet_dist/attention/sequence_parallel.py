"""Sequence-parallel dilated attention (paper section 3.1): local branches + sparse K/V all-gather.

Rank j of a sequence group of P ranks holds rows [j*l, (j+1)*l) of a sequence of N = P*l rows.
A branch (w, r) with w <= l lives inside one rank: `LocalBranch`, no communication. A branch with
w > l (w capped at N) spans G = w/l ranks, and the ranks of one segment, sp ranks
[first, first + count) with first = (j // G) * G and count = min(G, P - first) (the last segment may
be ragged over ranks), form a subgroup:

- This rank's rows of that branch are a one-segment `BranchLayout(l, H, l, r, phase)` of its shard:
  the segment starts (j - first) * l rows earlier, so head h keeps the local rows p with
  (p + phase) % r == h mod r (Eq. 13-15), phase = (j - first) * l mod r. Every rank uses
  ceil(l/r) slots; when r does not divide l some are empty, and their key validity travels with K/V.
- `prefetch` sparsifies the local K and V FIRST (l/r rows per head), then starts one async
  all-gather of them (and of the sparse key-padding validity, when a mask is given) inside the
  segment subgroup only. Queries never move.
- `forward` waits, then attends local sparse queries to the gathered keys: all of them
  (non-causal), or earlier ranks' keys fully plus own keys causally, later ranks' never (causal).
  Each key part adds its (out, lse) to the Eq. 9-10 merger; splitting one key set into disjoint
  parts merged by log-sum-exp is exact.
- `backward` runs the kernel backward with the merged out/lse (as `LocalBranch`), on the gathered
  K/V kept from forward (2 * count * l/r rows per head: independent of N, no second gather), then
  reduce-scatters the sparse dK, dV to their owners.

Bytes per rank and spanning branch (count > 1), per call, with el = element size of q:
    forward  K/V : sent = received = (count - 1) * 2 * B * (l/r) * H * D * el   (~ 2 (w/r) H D el)
    forward mask : sent = received = (count - 1) * B * (l/r) * H    (uint8; with a mask, or when r does not divide l)
(l/r rounded up when r does not divide l.)
    backward dK/dV (reduce-scatter): the same as forward K/V.
`comm_volume` computes exactly this; tests compare it with the measured `comm_stats()` by tag.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from longnet_dist.distributed.collectives import all_gather_tensor_async, reduce_scatter_tensor

from .checks import check_branches
from .dilated import AttentionInputs, LocalBranch, MergedRows
from .kernels import attention_backward, attention_forward, lse_dtype
from .layout import BranchLayout, branch_layout
from .merge import BranchMerger
from .sharding import check_sequence_parallel_config, segment_spans, spanning_ranks

# comm_stats() tags of the collectives issued here (per call: snapshot before and after).
FORWARD_KV_TAG = "attention/forward_kv"
FORWARD_MASK_TAG = "attention/forward_mask"
BACKWARD_KV_TAG = "attention/backward_dkv"


def segment_span(seq_len: int, sp_size: int, sp_rank: int, segment_length: int) -> tuple[int, int]:
    """(first sp rank, rank count) of the segment of branch `segment_length` that holds `sp_rank`."""
    span = spanning_ranks(seq_len, sp_size, segment_length)
    first = (sp_rank // span) * span
    return first, min(span, sp_size - first)  # the ragged last segment spans fewer ranks


class SpanningBranch:
    """A branch (w, r) whose segment spans the ranks of `subgroup` (size >= 2); see the module doc."""

    def __init__(self, segment_length: int, dilation: int, subgroup):
        self.segment_length, self.dilation, self.subgroup = segment_length, dilation, subgroup
        self._pending_kv = self._pending_key_valid = None
        self.gathered_kv: torch.Tensor | None = None         # (2, B, count * l/r, H, D), kept for backward
        self.gathered_key_valid: torch.Tensor | None = None  # (B, count * l/r, H) bool, or None

    def layout(self, inputs: AttentionInputs) -> BranchLayout:
        """This rank's rows of the branch: one segment of the whole shard, every r-th row per head."""
        phase = (self.subgroup.rank * inputs.seq_len) % self.dilation  # rows since the segment start, mod r
        return branch_layout(inputs.seq_len, inputs.num_heads, inputs.seq_len, self.dilation, inputs.device, phase)

    def key_parts(self, slots: int, causal: bool) -> list[tuple[slice, bool]]:
        """(slice of gathered key slots, causal?) that the local queries attend; `slots` = l/r per rank."""
        if not causal:
            return [(slice(0, self.subgroup.size * slots), False)]
        position = self.subgroup.rank
        parts = [(slice(0, position * slots), False)] if position > 0 else []  # earlier ranks: every key
        parts.append((slice(position * slots, (position + 1) * slots), True))  # own keys: causally
        return parts                                                            # later ranks: never

    def prefetch(self, inputs: AttentionInputs) -> None:
        """Sparsify local K, V (and key validity), then start their all-gather in the segment subgroup."""
        layout = self.layout(inputs)
        kv = torch.stack([layout.gather(inputs.k), layout.gather(inputs.v)])  # (2, B, l/r, H, D)
        self._pending_kv = all_gather_tensor_async(kv, 2, self.subgroup, tag=FORWARD_KV_TAG)
        key_valid = layout.key_valid(inputs.key_padding_mask, False, inputs.batch)  # (B, l/r, H) or None
        if key_valid is None and inputs.seq_len % self.dilation != 0:  # other ranks have empty slots: all send
            key_valid = layout.slot_valid(inputs.batch)
        self._pending_key_valid = None
        if key_valid is not None:  # gloo has no bool collectives: one byte per flag
            self._pending_key_valid = all_gather_tensor_async(key_valid.to(torch.uint8), 1, self.subgroup,
                                                              tag=FORWARD_MASK_TAG)

    def forward(self, inputs: AttentionInputs, merger: BranchMerger) -> None:
        if self._pending_kv is None:
            self.prefetch(inputs)
        self.gathered_kv = self._pending_kv.wait()                           # (2, B, count * l/r, H, D)
        pending_valid = self._pending_key_valid
        self.gathered_key_valid = None if pending_valid is None else pending_valid.wait().bool()
        self._pending_kv = self._pending_key_valid = None
        layout = self.layout(inputs)
        q = layout.gather(inputs.q)                                           # (B, l/r, H, D)
        k, v = self.gathered_kv
        for keys, causal in self.key_parts(layout.slots, inputs.causal):
            out, lse = attention_forward(q, k[:, keys], v[:, keys], causal=causal, scale=inputs.scale,
                                         key_valid=self._key_valid(keys), backend=inputs.backend)
            merger.add(layout.scatter_index, layout.sparse_to_rows(out, inputs.batch),
                       layout.sparse_to_rows(lse, inputs.batch))              # Eq. 9-10, per key part

    def backward(self, inputs: AttentionInputs, merged: MergedRows, grads: list[torch.Tensor]) -> None:
        layout = self.layout(inputs)
        q, grad_out, out = (layout.gather(x) for x in (inputs.q, merged.grad_out, merged.out))  # (B, l/r, H, D)
        lse = layout.gather_lse(merged.lse, inputs.batch)                    # (B, l/r, H), +inf at empty slots
        k, v = self.gathered_kv
        d_kv = torch.zeros_like(self.gathered_kv)                            # (2, B, count * l/r, H, D)
        dq = torch.zeros(q.shape, dtype=lse_dtype(q.dtype), device=q.device)
        for keys, causal in self.key_parts(layout.slots, inputs.causal):     # disjoint key parts
            dq_part, dk_part, dv_part = attention_backward(
                grad_out, q, k[:, keys], v[:, keys], out, lse, causal=causal, scale=inputs.scale,
                key_valid=self._key_valid(keys), backend=inputs.backend)
            dq += dq_part
            d_kv[0, :, keys] = dk_part
            d_kv[1, :, keys] = dv_part
        own_kv = reduce_scatter_tensor(d_kv, 2, self.subgroup, tag=BACKWARD_KV_TAG)  # (2, B, l/r, H, D), summed
        for total, part in zip(grads, (dq, own_kv[0], own_kv[1])):
            total.index_add_(1, layout.scatter_index, layout.sparse_to_rows(part, inputs.batch).to(total.dtype))

    def _key_valid(self, keys: slice) -> torch.Tensor | None:
        return None if self.gathered_key_valid is None else self.gathered_key_valid[:, keys]


def plan_branches(local_len: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                  sequence_group) -> list:
    """The branches this rank runs for a shard of `local_len` rows of a group of `sequence_group.size`.

    A group split from a torch ProcessGroup creates the segment subgroups it lacks here. Raises
    ValueError (before any communication) when the sharding is impossible, or when a segment
    subgroup was not prepared at setup."""
    segment_lengths, dilation_rates = check_branches(segment_lengths, dilation_rates)
    sp_size, sp_rank = sequence_group.size, sequence_group.rank
    seq_len = local_len * sp_size
    check_sequence_parallel_config(seq_len, sp_size, segment_lengths, dilation_rates)  # before any communication
    prepare = getattr(sequence_group, "prepare_at_first_use", None)  # duck-typed stand-ins have none
    if prepare is not None:
        prepare(segment_spans(seq_len, sp_size, segment_lengths))  # a torch group's subgroups, split now
    branches = []
    for w, r in zip(segment_lengths, dilation_rates):
        first, count = segment_span(seq_len, sp_size, sp_rank, w)
        if spanning_ranks(seq_len, sp_size, w) == 1:
            branches.append(LocalBranch(w, r))
        elif count == 1:  # a ragged last segment that only this rank holds: its whole shard, locally
            branches.append(LocalBranch(local_len, r))
        else:
            branches.append(SpanningBranch(w, r, _subgroup(sequence_group, first, count, w, seq_len, segment_lengths)))
    return branches


def _subgroup(sequence_group, first: int, count: int, segment_length: int, seq_len: int,
              segment_lengths: list[int]):
    try:
        return sequence_group.segment_subgroup(first, count)
    except ValueError as error:
        spans = segment_spans(seq_len, sequence_group.size, segment_lengths)
        raise ValueError(f"segment length {segment_length} (seq_len {seq_len}, sp {sequence_group.size}) needs the "
                         f"subgroup of sp ranks [{first}, {first + count}): {error}. At setup, on every rank, call "
                         f"sequence_group.prepare_segment_subgroups(segment_spans({seq_len}, {sequence_group.size}, "
                         f"{segment_lengths})) = {spans}") from error


@dataclass(frozen=True)
class CommVolume:
    """Bytes one rank sends, and as many it receives, in one call of sharded dilated attention."""

    forward_kv: int    # all-gather of the sparse K and V
    forward_mask: int  # all-gather of the sparse key-padding validity (0 without a mask)
    backward_kv: int   # reduce-scatter of the sparse dK and dV

    @property
    def forward(self) -> int:
        return self.forward_kv + self.forward_mask

    @property
    def total(self) -> int:
        return self.forward + self.backward_kv


def comm_volume(*, batch: int, local_len: int, sp_size: int, sp_rank: int, num_heads: int, head_dim: int,
                element_size: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                key_padding_mask: bool = False) -> CommVolume:
    """Exact bytes per rank for one forward+backward (module doc formula); pure arithmetic."""
    seq_len = local_len * sp_size
    check_sequence_parallel_config(seq_len, sp_size, segment_lengths, dilation_rates)
    kv = mask = 0
    for w, r in zip(segment_lengths, dilation_rates):
        if sp_size == 1 or spanning_ranks(seq_len, sp_size, w) == 1:
            continue
        _, count = segment_span(seq_len, sp_size, sp_rank, w)
        flags = batch * -(-local_len // r) * num_heads       # sparse slots this rank contributes: ceil(l/r) per head
        kv += (count - 1) * 2 * flags * head_dim * element_size
        mask += (count - 1) * flags if key_padding_mask or local_len % r else 0
    return CommVolume(forward_kv=kv, forward_mask=mask, backward_kv=kv)


__all__ = ["BACKWARD_KV_TAG", "FORWARD_KV_TAG", "FORWARD_MASK_TAG", "CommVolume", "SpanningBranch", "comm_volume",
           "plan_branches", "segment_span"]
