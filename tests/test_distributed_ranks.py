"""Mesh groups, collectives, segment subgroups and byte counts on 4 gloo ranks (one spawn, shared).

The workers only run the collectives and return what they saw; every expected value is rebuilt
here from the same seeded per-rank inputs with plain torch.cat / slicing / sums. Inputs are
float64 and a sum of at most 4 terms, so comparisons are exact up to 1e-12 (rounding order only).
"""

import pytest
import torch
import torch.distributed as dist

from longnet_dist.distributed import build_mesh, comm_stats
from longnet_dist.distributed.collectives import (
    all_gather_along,
    all_gather_tensor,
    all_gather_tensor_async,
    reduce_scatter_tensor,
)
from longnet_dist.distributed.testing import run_multiprocess, value_error_message

WORLD_SIZE = 4
X_SHAPE = (2, 3, 5)  # gathered along dim -2
TOLERANCE = dict(rtol=0, atol=1e-12)


def _rank_tensor(seed: int, global_rank: int, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * seed + global_rank)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _members(group: dist.ProcessGroup, rank: int) -> list[int]:
    """Global ranks of `group`, found by communication: each member contributes a one-hot row."""
    one_hot = torch.zeros(dist.get_world_size())
    one_hot[rank] = 1.0
    dist.all_reduce(one_hot, group=group)
    return [r for r, present in enumerate(one_hot.tolist()) if present]


def _exercise_collectives(group, rank: int) -> dict:
    """Run each collective once on `group`; return outputs, gradients and byte counts."""
    size = group.size
    seen = {"global_ranks": group.global_ranks, "rank": group.rank, "size": size}

    comm_stats().reset()
    x = _rank_tensor(1, rank, X_SHAPE).requires_grad_()
    gathered = all_gather_along(x, -2, group, tag="gather")
    upstream = _rank_tensor(2, rank, gathered.shape)
    (gathered * upstream).sum().backward()
    seen.update(gathered=gathered.detach(), grad=x.grad, autograd_stats=comm_stats().snapshot())

    # Explicit numbers: x_i = i + 1 on sp rank i, loss_r = sum_i 10**r * (i + 1) * y_i.
    scalar = torch.tensor([float(group.rank + 1)], dtype=torch.float64, requires_grad=True)
    everyone = all_gather_along(scalar, 0, group)
    weights = 10.0**group.rank * torch.arange(1, size + 1, dtype=torch.float64)
    (everyone * weights).sum().backward()
    seen.update(explicit_gathered=everyone.tolist(), explicit_grad=scalar.grad.item())

    comm_stats().reset()
    first = all_gather_tensor_async(_rank_tensor(3, rank, (4, 2)), -1, group, tag="async")
    second = all_gather_tensor_async(_rank_tensor(4, rank, (3,)), 0, group, tag="async")
    local_work = torch.ones(8, 8) @ torch.ones(8, 8)  # overlapped with the gathers in flight
    seen.update(async_second=second.wait(), async_first=first.wait(), local_work=local_work[0, 0].item())
    seen["blocking_gather"] = all_gather_tensor(_rank_tensor(3, rank, (4, 2)), 0, group)
    seen["reduce_scattered"] = reduce_scatter_tensor(_rank_tensor(5, rank, (3, 2 * size)), 1, group, tag="rs")
    seen["plain_stats"] = comm_stats().snapshot()
    try:
        reduce_scatter_tensor(torch.zeros(2 * size + 1), 0, group)
    except ValueError as error:
        seen["indivisible_error"] = str(error)
    return seen


def _rank_worker(rank, world_size):
    result = {"mesh": {}, "collectives": {}}
    meshes = {}
    for sp_size in (1, 2, 4):
        mesh = meshes[sp_size] = build_mesh(sp_size)
        group = mesh.sequence_group
        result["mesh"][sp_size] = {
            "coords": (mesh.world_size, mesh.rank, mesh.dp_size, mesh.dp_rank, mesh.sp_size, mesh.sp_rank),
            "dp_global_ranks": mesh.dp_global_ranks,
            "dp_members": _members(mesh.dp_group, rank),
            "sp": None if group is None else (group.global_ranks, group.rank, group.size, _members(group.group, rank)),
        }
    result["mesh"]["error"] = value_error_message(lambda: build_mesh(3))

    # dp 2 x sp 2: each replica's sp group is its own; spans (0,2) is the group, (i,1) trivial.
    pairs = meshes[2].sequence_group
    pairs.prepare_segment_subgroups([(0, 1), (1, 1), (0, 2)])
    result["pair_full_span_is_group"] = pairs.segment_subgroup(0, 2) is pairs
    result["collectives"]["dp2_sp2"] = _exercise_collectives(pairs, rank)

    # dp 1 x sp 4: subgroups (0,2) and (2,2); preparing twice must not create groups twice.
    quad = meshes[4].sequence_group
    quad.prepare_segment_subgroups([(0, 2)])
    quad.prepare_segment_subgroups([(2, 2), (0, 2), (0, 4), (rank, 1)])
    half = quad.segment_subgroup(2 * (rank // 2), 2)
    result["collectives"]["sp4"] = _exercise_collectives(quad, rank)
    result["collectives"]["sp4_half"] = _exercise_collectives(half, rank)
    result["collectives"]["sp4_single"] = _exercise_collectives(quad.segment_subgroup(rank, 1), rank)
    result["quad_full_span_is_group"] = quad.segment_subgroup(0, 4) is quad
    result["half_is_cached"] = quad.segment_subgroup(2 * (rank // 2), 2) is half
    result["unprepared_error"] = value_error_message(lambda: quad.segment_subgroup(min(rank, 1), 3))
    result["not_member_error"] = value_error_message(lambda: quad.segment_subgroup(2 * (1 - rank // 2), 2))
    result["bad_span_error"] = value_error_message(lambda: quad.prepare_segment_subgroups([(3, 2)]))
    return result


@pytest.fixture(scope="module")
def rank_results():
    return run_multiprocess(_rank_worker, WORLD_SIZE, timeout=300)


def test_mesh_groups(rank_results):
    for rank, result in enumerate(rank_results):
        layouts = result["mesh"]
        # sp 1: dp over all ranks, no sequence group
        assert layouts[1]["coords"] == (4, rank, 4, rank, 1, 0)
        assert layouts[1]["dp_global_ranks"] == layouts[1]["dp_members"] == [0, 1, 2, 3]
        assert layouts[1]["sp"] is None
        # sp 2: sp groups {0,1}, {2,3}; dp groups {0,2}, {1,3}
        sp_ranks = [0, 1] if rank < 2 else [2, 3]
        dp_ranks = [0, 2] if rank % 2 == 0 else [1, 3]
        assert layouts[2]["coords"] == (4, rank, 2, rank // 2, 2, rank % 2)
        assert layouts[2]["dp_global_ranks"] == layouts[2]["dp_members"] == dp_ranks
        assert layouts[2]["sp"] == (sp_ranks, rank % 2, 2, sp_ranks)
        # sp 4: one sp group of all ranks; dp groups are single ranks
        assert layouts[4]["coords"] == (4, rank, 1, 0, 4, rank)
        assert layouts[4]["dp_global_ranks"] == layouts[4]["dp_members"] == [rank]
        assert layouts[4]["sp"] == ([0, 1, 2, 3], rank, 4, [0, 1, 2, 3])
        assert "sequence_parallel_size=3" in layouts["error"] and "world_size=4" in layouts["error"]
        assert "[1, 2, 4]" in layouts["error"]


def _expected_members(kind: str, rank: int) -> list[int]:
    return {"dp2_sp2": [2 * (rank // 2), 2 * (rank // 2) + 1], "sp4": [0, 1, 2, 3],
            "sp4_half": [2 * (rank // 2), 2 * (rank // 2) + 1], "sp4_single": [rank]}[kind]


KINDS = ["dp2_sp2", "sp4", "sp4_half", "sp4_single"]


@pytest.mark.parametrize("kind", KINDS)
def test_all_gather_along_forward_and_backward(rank_results, kind):
    for rank, result in enumerate(rank_results):
        seen = result["collectives"][kind]
        members = _expected_members(kind, rank)
        assert seen["global_ranks"] == members and seen["rank"] == members.index(rank)
        inputs = [_rank_tensor(1, member, X_SHAPE) for member in members]
        torch.testing.assert_close(seen["gathered"], torch.cat(inputs, dim=1), **TOLERANCE)
        # d(sum_s <y_s, u_s>)/dx_i = sum over members s of u_s[:, rows of member i, :]
        rows = slice(3 * seen["rank"], 3 * seen["rank"] + 3)
        upstream = [_rank_tensor(2, member, (2, 3 * len(members), 5)) for member in members]
        torch.testing.assert_close(seen["grad"], sum(u[:, rows, :] for u in upstream), **TOLERANCE)


@pytest.mark.parametrize("kind", KINDS)
def test_all_gather_along_explicit_numbers(rank_results, kind):
    explicit_grads = {1: [1.0], 2: [11.0, 22.0], 4: [1111.0, 2222.0, 3333.0, 4444.0]}
    for result in rank_results:
        seen = result["collectives"][kind]
        assert seen["explicit_gathered"] == [float(i + 1) for i in range(seen["size"])]
        assert seen["explicit_grad"] == explicit_grads[seen["size"]][seen["rank"]]


@pytest.mark.parametrize("kind", KINDS)
def test_gather_and_reduce_scatter_building_blocks(rank_results, kind):
    for rank, result in enumerate(rank_results):
        seen = result["collectives"][kind]
        members = _expected_members(kind, rank)
        first = [_rank_tensor(3, member, (4, 2)) for member in members]
        torch.testing.assert_close(seen["async_first"], torch.cat(first, dim=1), **TOLERANCE)
        torch.testing.assert_close(seen["blocking_gather"], torch.cat(first, dim=0), **TOLERANCE)
        second = [_rank_tensor(4, member, (3,)) for member in members]
        torch.testing.assert_close(seen["async_second"], torch.cat(second), **TOLERANCE)
        assert seen["local_work"] == 8.0
        columns = slice(2 * seen["rank"], 2 * seen["rank"] + 2)
        summed = sum(_rank_tensor(5, member, (3, 2 * len(members)))[:, columns] for member in members)
        torch.testing.assert_close(seen["reduce_scattered"], summed, **TOLERANCE)
        if len(members) > 1:
            assert "not divisible by the group size" in seen["indivisible_error"]


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_follow_the_formula(rank_results, kind):
    float64 = 8
    for result in rank_results:
        seen = result["collectives"][kind]
        peers = seen["size"] - 1  # each rank sends its b bytes to, and receives b from, every peer
        calls = 1 if peers else 0  # one-rank groups move nothing and are not counted

        # all_gather_along: forward gather of b = 2*3*5*8 bytes, backward reduce-scatter of as many
        moved = 2 * peers * 30 * float64
        totals = {"sent_bytes": moved, "received_bytes": moved, "calls": 2 * calls}
        assert seen["autograd_stats"] == {**totals, "by_tag": {"gather": totals} if peers else {}}

        # async gathers of 8 and 3 elements (tag "async"), an untagged gather of 8, a reduce-scatter
        # whose output slice is 3*2 elements (tag "rs")
        async_bytes = peers * (8 + 3) * float64
        rs_bytes = peers * 6 * float64
        total_bytes = async_bytes + peers * 8 * float64 + rs_bytes
        by_tag = {"async": {"sent_bytes": async_bytes, "received_bytes": async_bytes, "calls": 2 * calls},
                  "rs": {"sent_bytes": rs_bytes, "received_bytes": rs_bytes, "calls": calls}}
        assert seen["plain_stats"] == {"sent_bytes": total_bytes, "received_bytes": total_bytes,
                                       "calls": 4 * calls, "by_tag": by_tag if peers else {}}


def test_segment_subgroup_lookup(rank_results):
    for rank, result in enumerate(rank_results):
        assert result["pair_full_span_is_group"] and result["quad_full_span_is_group"]
        assert result["half_is_cached"]
        assert f"segment span ({min(rank, 1)}, 3) was not prepared" in result["unprepared_error"]
        assert f"sp rank {rank} is not in the segment span" in result["not_member_error"]
        assert "first=3, count=2" in result["bad_span_error"] and "first + count <= 4" in result["bad_span_error"]
