"""`init_sequence_parallel`: the whole sequence-parallel setup in one call, for your own training loop."""

from __future__ import annotations

from typing import Sequence

from longnet_dist.distributed.mesh import build_mesh, init_distributed
from longnet_dist.distributed.sequence_group import SequenceGroup


def init_sequence_parallel(sequence_parallel_size: int, seq_len: int, segment_lengths: Sequence[int], *,
                           backend: str | None = None) -> SequenceGroup | None:
    """Set up world = dp x sp and return this rank's group to pass as `sequence_group=`.

    Collective: every rank calls it, with the same arguments. Initialises the default process group
    from torchrun's variables if none is (`backend` default: nccl with CUDA, else gloo), splits the
    world into dp x sp (`build_mesh`: sp groups are consecutive ranks, sp rank = rank % sp), and
    creates every segment subgroup that branches `segment_lengths` need for sequences of `seq_len`
    tokens, on every world rank in one order. Returns None when sequence_parallel_size is 1.
    Raises ValueError, before creating any group, when seq_len cannot be sharded that way.
    """
    # The branch arithmetic lives with attention (floor 2); imported at call time so that importing
    # floor 1 never loads floor 2.
    from longnet_dist.attention.sharding import check_sequence_parallel_config, segment_spans

    init_distributed(backend)
    # Dilation rates do not change how a sequence is sharded: check with r = 1.
    check_sequence_parallel_config(seq_len, sequence_parallel_size, segment_lengths, [1] * len(list(segment_lengths)))
    mesh = build_mesh(sequence_parallel_size)
    if mesh.sequence_group is not None:
        mesh.sequence_group.prepare_segment_subgroups(segment_spans(seq_len, sequence_parallel_size,
                                                                    list(segment_lengths)))
    return mesh.sequence_group


__all__ = ["init_sequence_parallel"]
