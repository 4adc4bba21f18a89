"""Single-process checks: mesh layout arithmetic, the sp-size error, subgroup creation order,
collectives over a one-rank group, and CommStats."""

import pytest
import torch
import torch.distributed as dist

from longnet_dist.distributed import (CommStats, SequenceGroup, build_mesh, comm_stats, init_distributed,
                                     leave_distributed, mesh_layout)
from longnet_dist.distributed.collectives import all_gather_along, all_gather_tensor_async, reduce_scatter_tensor
from longnet_dist.distributed.sequence_group import subgroup_rank_lists


def test_layout_world_4():
    assert mesh_layout(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    assert mesh_layout(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert mesh_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])


def test_layout_world_8_sp_4():
    assert mesh_layout(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])


@pytest.mark.parametrize("bad_size", [3, 0, -2, 8, 2.0])
def test_bad_sequence_parallel_size_names_values_and_valid_sizes(bad_size):
    with pytest.raises(ValueError, match=rf"sequence_parallel_size={bad_size}.*world_size=4.*\[1, 2, 4\]"):
        mesh_layout(4, bad_size)


def test_single_process_mesh_needs_no_process_group():
    assert not dist.is_initialized()
    mesh = build_mesh(1)
    assert (mesh.world_size, mesh.rank, mesh.dp_size, mesh.dp_rank, mesh.sp_size, mesh.sp_rank) == (1, 0, 1, 0, 1, 0)
    assert mesh.dp_group is None and mesh.sequence_group is None
    with pytest.raises(ValueError, match=r"valid sizes: \[1\]"):
        build_mesh(2)


def test_subgroups_are_created_for_every_replica_in_one_order():
    # dp 2 x sp 4: span (0, 2) is ranks [0, 1] in replica 0 and [4, 5] in replica 1, etc.
    replicas = [[0, 1, 2, 3], [4, 5, 6, 7]]
    listed = [(2, 2), (0, 2), (0, 1), (0, 4), (2, 2)]  # duplicates, trivial and full spans
    expected = [((0, 2), [0, 1]), ((0, 2), [4, 5]), ((2, 2), [2, 3]), ((2, 2), [6, 7])]
    assert subgroup_rank_lists(replicas, listed) == expected
    assert subgroup_rank_lists(replicas, list(reversed(listed))) == expected


def test_one_rank_group_collectives_are_copies_with_zero_bytes():
    single = SequenceGroup(None, [0], global_rank=0)
    x = torch.arange(6.0).reshape(2, 3).requires_grad_()
    comm_stats().reset()
    y = all_gather_along(x, 1, single, tag="single")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    assert torch.equal(all_gather_tensor_async(x.detach(), 0, single).wait(), x.detach())
    assert torch.equal(reduce_scatter_tensor(x.detach(), 0, single), x.detach())
    assert comm_stats().snapshot() == {"sent_bytes": 0, "received_bytes": 0, "calls": 0, "by_tag": {}}


def test_collective_argument_errors():
    single = SequenceGroup(None, [0], global_rank=0)
    with pytest.raises(ValueError, match=r"dim=2 is out of range for a tensor of shape \(2, 3\)"):
        all_gather_along(torch.zeros(2, 3), 2, single)
    with pytest.raises(ValueError, match="group must be a SequenceGroup"):
        all_gather_along(torch.zeros(2, 3), 0, None)


def test_comm_stats_totals_and_tags():
    stats = CommStats()
    stats.record(10, 20, tag="k")
    stats.record(1, 2, tag="v")
    stats.record(100, 200)
    assert stats.snapshot() == {
        "sent_bytes": 111, "received_bytes": 222, "calls": 3,
        "by_tag": {"k": {"sent_bytes": 10, "received_bytes": 20, "calls": 1},
                   "v": {"sent_bytes": 1, "received_bytes": 2, "calls": 1}},
    }
    stats.reset()
    assert stats.snapshot() == {"sent_bytes": 0, "received_bytes": 0, "calls": 0, "by_tag": {}}


def test_every_rank_makes_the_same_new_group_calls(monkeypatch):
    """Simulate ranks 0 and 6 of world 8 = dp 2 x sp 4; record their torch new_group calls."""
    replicas = [[0, 1, 2, 3], [4, 5, 6, 7]]
    calls, groups = {}, {}
    for global_rank in (0, 6):
        recorded = calls[global_rank] = []
        monkeypatch.setattr(dist, "new_group", lambda ranks: recorded.append(list(ranks)) or f"pg{ranks}")
        replica = replicas[global_rank // 4]
        sp_process_group = dist.ProcessGroup(dist.HashStore(), global_rank % 4, 4)  # stands in for new_group's
        group = SequenceGroup(sp_process_group, replica, global_rank=global_rank, replica_rank_lists=replicas)
        group.prepare_segment_subgroups([(0, 2)])
        sp_rank = global_rank % 4
        group.prepare_segment_subgroups([(2, 2), (0, 2), (sp_rank, 1), (0, 4)])  # (0, 2) again: no new call
        groups[global_rank] = group.segment_subgroup(2 * (sp_rank // 2), 2)
    assert calls[0] == calls[6] == [[0, 1], [4, 5], [2, 3], [6, 7]]
    assert (groups[0].group, groups[0].global_ranks, groups[0].rank) == ("pg[0, 1]", [0, 1], 0)
    assert (groups[6].group, groups[6].global_ranks, groups[6].rank) == ("pg[6, 7]", [6, 7], 0)


def test_init_distributed_single_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")
    init_distributed()
    assert not dist.is_initialized()


def test_init_distributed_names_missing_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 but the environment lacks \['MASTER_ADDR', 'MASTER_PORT'\]"):
        init_distributed()
    assert not dist.is_initialized()


def test_more_nccl_processes_than_gpus_is_one_clear_error_on_every_rank(monkeypatch):
    """`torchrun --nproc_per_node 2` on a one-GPU workstation: every rank (not only the one whose GPU is
    missing) says why and what to do, before any group forms."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(ValueError, match=r"2 processes on this node \(LOCAL_WORLD_SIZE=2, LOCAL_RANK=\d\) but 1 "
                                             r"visible GPU\(s\): NCCL needs a GPU for each; start at most 1 per node "
                                             r"\(torchrun --nproc_per_node 1\), or set distributed.backend=gloo"):
            init_distributed("nccl")
    assert not dist.is_initialized()


def test_leave_distributed_destroys_the_group_and_is_then_a_no_op():
    """The trainer ends a finished run with it (and run_multiprocess each rank): a barrier, then the
    group destroyed, so no rank exits while its gloo peers hold connections (a rank then aborted after
    the run's last line, failing a SLURM job whose training had finished)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    leave_distributed()
    assert not dist.is_initialized()
    leave_distributed()
