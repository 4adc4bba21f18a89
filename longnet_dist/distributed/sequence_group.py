"""A rank's sequence-parallel group and the segment subgroups that sharded attention branches use."""

from __future__ import annotations

import torch.distributed as dist

Span = tuple[int, int]  # (first sp rank, number of sp ranks)


def subgroup_rank_lists(replica_rank_lists: list[list[int]], spans: list[Span]) -> list[tuple[Span, list[int]]]:
    """Every process group that `spans` need, in the one order all world ranks create them.

    Spans are de-duplicated and sorted so the order does not depend on how the caller listed them;
    each span yields one group per dp replica (the same sp ranks of that replica's sp group).
    Spans of one rank need no process group; the full span reuses the sp group itself.
    """
    size = len(replica_rank_lists[0])
    to_create = []
    for first, count in sorted(set(spans)):
        if count == 1 or count == size:
            continue
        for replica_ranks in replica_rank_lists:
            to_create.append(((first, count), replica_ranks[first : first + count]))
    return to_create


class SequenceGroup:
    """The sequence-parallel group of this rank, or a segment subgroup of it.

    Attributes: `group` (ProcessGroup; None for a group of one rank, whose collectives are
    local copies), `rank` (this process's rank inside the group), `size`, `global_ranks`.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        global_ranks: list[int],
        *,
        global_rank: int,
        replica_rank_lists: list[list[int]] | None = None,
    ) -> None:
        if global_rank not in global_ranks:
            raise ValueError(f"global rank {global_rank} is not a member of ranks {global_ranks}")
        if group is None and len(global_ranks) != 1:
            raise ValueError(f"a group of {len(global_ranks)} ranks {global_ranks} needs a ProcessGroup")
        self.group = group
        self.global_ranks = list(global_ranks)
        self.size = len(global_ranks)
        self.rank = global_ranks.index(global_rank)
        self._global_rank = global_rank
        # Rank lists of the sp groups of every dp replica (same order on every rank); None for a
        # subgroup, which cannot be split further.
        self._replica_rank_lists = replica_rank_lists
        self._prepared_spans: set[Span] = set()
        self._subgroups: dict[Span, SequenceGroup] = {}

    def __repr__(self) -> str:
        return f"SequenceGroup(rank={self.rank}, size={self.size}, global_ranks={self.global_ranks})"

    def _check_span(self, first: int, count: int) -> None:
        valid = isinstance(first, int) and isinstance(count, int) and first >= 0 and count >= 1
        if not valid or first + count > self.size:
            raise ValueError(
                f"segment span (first={first!r}, count={count!r}) is not inside this sequence group "
                f"of size {self.size}; need first >= 0, count >= 1, first + count <= {self.size}"
            )

    def prepare_segment_subgroups(self, spans: list[Span]) -> None:
        """Create the subgroups of all `spans` once, at setup.

        Collective over the WHOLE world: every rank calls it with the same spans, because torch's
        new_group must be called by every rank for every group (other dp replicas' ones included).
        Calling again with spans already prepared creates nothing new.
        """
        if self._replica_rank_lists is None:
            raise ValueError(f"{self!r} is a segment subgroup; prepare spans on the full sequence group")
        for first, count in spans:
            self._check_span(first, count)
        new_spans = [tuple(span) for span in spans if tuple(span) not in self._prepared_spans]
        for span, ranks in subgroup_rank_lists(self._replica_rank_lists, new_spans):
            process_group = dist.new_group(ranks)
            if self._global_rank in ranks:
                self._subgroups[span] = SequenceGroup(process_group, ranks, global_rank=self._global_rank)
        self._prepared_spans.update(new_spans)

    def segment_subgroup(self, first: int, count: int) -> SequenceGroup:
        """The subgroup of sp ranks [first, first + count), which must include this rank.

        Needs `prepare_segment_subgroups` for that span, except count == 1 (no process group)
        and count == size (the sequence group itself).
        """
        self._check_span(first, count)
        if not first <= self.rank < first + count:
            raise ValueError(
                f"sp rank {self.rank} is not in the segment span of sp ranks [{first}, {first + count}); "
                f"ask for the span that contains it"
            )
        if count == self.size:
            return self
        span = (first, count)
        if span not in self._subgroups:
            if count != 1:
                raise ValueError(
                    f"segment span {span} was not prepared (prepared: {sorted(self._prepared_spans)}); "
                    f"call prepare_segment_subgroups with it on every rank at setup"
                )
            self._subgroups[span] = SequenceGroup(None, [self._global_rank], global_rank=self._global_rank)
        return self._subgroups[span]
