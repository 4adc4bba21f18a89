"""`sequence_group=` as a torch ProcessGroup, a DeviceMesh, or the group of `init_sequence_parallel`.

Gloo workers (2 and 4 ranks) run their shard through `_run_case` of test_sequence_parallel.py; the
expected values are that file's single-device results for the same seeded full-length inputs, in
float64. A hang in subgroup creation shows up as run_multiprocess's TimeoutError.
"""
from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist

import longnet_dist.distributed.group_types as group_types
from longnet_dist.attention import DilatedAttention, dilated_attention
from longnet_dist.distributed import SequenceGroup, as_sequence_group, init_sequence_parallel
from longnet_dist.distributed.objects import broadcast_from_rank0
from longnet_dist.distributed.testing import free_port, run_multiprocess, value_error_message
from longnet_dist.model import LongNetConfig, LongNetLM
from test_sequence_parallel import CASES, F64_TOL, _assert_shards_match, _run_case

TIMEOUT = 60  # seconds per spawn; a deadlock fails the test instead of hanging it
SP4 = CASES["sp4_causal_mask"]  # l = 16, N = 64: spans (0,2), (2,2), (0,3), ragged (3,1), and the whole group
PAIRS = CASES["dp2sp2_causal_mask"]  # sp 2: the long branches span the whole group
# sp 3 of a world of 4, l = 8: w = 16 spans (0,2) and the ragged (2,1); w = 32 > N = 24 spans all 3.
TRIPLE = dict(sp=3, batch=1, local_len=8, heads=2, head_dim=4, segs=[8, 16, 32], rates=[1, 2, 4], causal=True,
              mask=True, dtype=torch.float64)
MODULE = dict(embed_dim=8, num_heads=2, segment_lengths=[8, 32, 64], dilation_rates=[1, 2, 4])  # sp 4, l = 16
LM = LongNetConfig(vocab_size=32, dim=8, num_layers=1, num_heads=2, segment_lengths=[8, 32, 64],
                   dilation_rates=[1, 2, 4])


def _shard(sequence_group, sp_rank: int, dp_rank: int = 0):
    """The fields of a mesh that `_run_case` reads, with any sequence_group object."""
    return types.SimpleNamespace(sequence_group=sequence_group, sp_rank=sp_rank, dp_rank=dp_rank)


def _module_inputs():
    torch.manual_seed(5)
    module = DilatedAttention(**MODULE).double()
    x = torch.randn(1, 64, MODULE["embed_dim"], dtype=torch.float64)
    return module, x, torch.randn_like(x)


def _run_module(sequence_group, sp_rank: int) -> dict:
    """DilatedAttention on this rank's 16 rows: output and input gradient."""
    module, x, grad = _module_inputs()
    rows = slice(16 * sp_rank, 16 * (sp_rank + 1))
    local = x[:, rows].clone().requires_grad_()
    out = module(local, positions=torch.arange(64)[rows], sequence_group=sequence_group)
    out.backward(grad[:, rows])
    return dict(out=out.detach(), grad=local.grad)


def _lm_inputs():
    torch.manual_seed(6)
    return LongNetLM(LM).double(), torch.randint(0, LM.vocab_size, (1, 64))


def _run_lm(sequence_group, sp_rank: int) -> torch.Tensor:
    model, ids = _lm_inputs()
    rows = slice(16 * sp_rank, 16 * (sp_rank + 1))
    with torch.no_grad():
        return model(ids[:, rows], positions=torch.arange(64)[rows], sequence_group=sequence_group)


def _two_rank_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.group.WORLD
    results = {"process_group": _run_case(PAIRS, _shard(world, rank))}
    mesh = init_device_mesh("cpu", (2,))
    results["device_mesh"] = _run_case(PAIRS, _shard(mesh, rank))
    results["mesh_and_group_share_one_conversion"] = as_sequence_group(mesh) is as_sequence_group(world)
    # The one call from scratch: a fresh default group from torchrun's variables (on a new port).
    port = broadcast_from_rank0(free_port())
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)
    group = init_sequence_parallel(2, 64, PAIRS["segs"], backend="gloo")
    results["one_call_initialized"] = dist.is_initialized() and dist.get_world_size() == 2
    results["one_call"] = _run_case(PAIRS, _shard(group, group.rank))
    return results


def _four_rank_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    # sp 4 over a plain ProcessGroup: subgroups (0,2), (2,2), (0,3) are split off it at first use.
    everyone = dist.new_group([0, 1, 2, 3])
    results["process_group_sp4"] = _run_case(SP4, _shard(everyone, rank))
    converted = as_sequence_group(everyone)
    subgroups = dict(converted._subgroups)
    _run_case(SP4, _shard(everyone, rank))
    results["converted_once"] = as_sequence_group(everyone) is converted and all(
        converted._subgroups[span] is subgroup for span, subgroup in subgroups.items())
    results["subgroup_ranks"] = {span: subgroup.global_ranks for span, subgroup in converted._subgroups.items()}
    results["module"] = _run_module(everyone, rank)
    results["lm_1d_mesh"] = _run_lm(init_device_mesh("cpu", (4,)), rank)

    # dp 2 x sp 2: each rank passes its own replica's sp group, as a ProcessGroup or a DeviceMesh slice.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results["dp2sp2_process_group"] = _run_case(PAIRS, _shard(pairs[rank // 2], rank % 2, rank // 2))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    results["dp2sp2_device_mesh"] = _run_case(PAIRS, _shard(mesh["sp"], rank % 2, rank // 2))
    results["mesh_2d_error"] = value_error_message(lambda: _run_case(PAIRS, _shard(mesh, rank % 2, rank // 2)))

    # The one call, when a default group exists: subgroups made over the world at setup.
    results["one_call_sp4"] = _run_case(SP4, _shard(init_sequence_parallel(4, 64, SP4["segs"]), rank))
    group = init_sequence_parallel(2, 64, PAIRS["segs"])
    results["one_call_dp2sp2"] = _run_case(PAIRS, _shard(group, group.rank, rank // 2))

    # Ranks 0-2 form an sp group; rank 3 never calls attention: splitting (0,2) must not need it.
    triple, other = dist.new_group([0, 1, 2]), dist.new_group([0, 1, 2])
    if rank < 3:
        results["partial_world"] = _run_case(TRIPLE, _shard(triple, rank))
        # A backend that cannot split (simulated): a clear error before any communication.
        group_types.can_split, can_split = (lambda group: False), group_types.can_split
        try:
            results["unsplittable_error"] = value_error_message(lambda: _run_case(TRIPLE, _shard(other, rank)))
        finally:
            group_types.can_split = can_split
    return results


@pytest.fixture(scope="module")
def two_ranks():
    return run_multiprocess(_two_rank_worker, 2, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def four_ranks():
    return run_multiprocess(_four_rank_worker, 4, timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["process_group", "device_mesh", "one_call"])
def test_two_ranks_equal_single_device(two_ranks, name):
    """sp 2 = world 2 via dist.group.WORLD, a 1-D DeviceMesh, and init_sequence_parallel from torchrun's
    variables: outputs and dq, dk, dv equal the single-device slices (float64)."""
    _assert_shards_match(two_ranks, name, PAIRS, dense=False, tol=F64_TOL)


@pytest.mark.slow
def test_two_ranks_conversion_and_setup(two_ranks):
    assert all(result["mesh_and_group_share_one_conversion"] for result in two_ranks)
    assert all(result["one_call_initialized"] for result in two_ranks)


@pytest.mark.slow
@pytest.mark.parametrize("name,case", [("process_group_sp4", SP4), ("dp2sp2_process_group", PAIRS),
                                       ("dp2sp2_device_mesh", PAIRS), ("one_call_sp4", SP4),
                                       ("one_call_dp2sp2", PAIRS)])
def test_four_ranks_equal_single_device(four_ranks, name, case):
    """sp 4 over a ProcessGroup (subgroups split at first use, a ragged segment included), dp 2 x sp 2
    with each replica's own ProcessGroup or DeviceMesh slice, and the one-call setup."""
    _assert_shards_match(four_ranks, name, case, dense=False, tol=F64_TOL)


@pytest.mark.slow
def test_split_needs_only_the_groups_own_ranks(four_ranks):
    """sp 3 on ranks 0-2 while rank 3 does something else: finishing at all shows the subgroup of
    (0, 2) was made without rank 3; the result equals the single-device one."""
    _assert_shards_match(four_ranks[:3], "partial_world", TRIPLE, dense=False, tol=F64_TOL)
    assert "partial_world" not in four_ranks[3]


@pytest.mark.slow
def test_conversion_and_subgroups_are_made_once(four_ranks):
    for rank, result in enumerate(four_ranks):
        assert result["converted_once"]
        own = {(0, 2): [0, 1], (0, 3): [0, 1, 2]} if rank < 2 else {(2, 2): [2, 3]}
        if rank == 2:
            own[(0, 3)] = [0, 1, 2]
        assert result["subgroup_ranks"] == own


@pytest.mark.slow
def test_module_and_model_accept_torch_groups(four_ranks):
    """DilatedAttention with a ProcessGroup (output, input gradient) and LongNetLM with a 1-D DeviceMesh
    (logits) equal the single-device module and model on the full sequence."""
    module, x, grad = _module_inputs()
    x.requires_grad_()
    out = module(x)
    out.backward(grad)
    model, ids = _lm_inputs()
    with torch.no_grad():
        logits = model(ids)
    for rank, result in enumerate(four_ranks):
        rows = slice(16 * rank, 16 * (rank + 1))
        torch.testing.assert_close(result["module"]["out"], out.detach()[:, rows], **F64_TOL)
        torch.testing.assert_close(result["module"]["grad"], x.grad[:, rows], **F64_TOL)
        torch.testing.assert_close(result["lm_1d_mesh"], logits[:, rows], **F64_TOL)


@pytest.mark.slow
def test_two_dimensional_mesh_and_unsplittable_backend_errors(four_ranks):
    for rank, result in enumerate(four_ranks):
        message = result["mesh_2d_error"]
        assert "2-D DeviceMesh" in message and "('dp', 'sp')" in message and "mesh['sp']" in message
        if rank < 3:
            message = result["unsplittable_error"]
            assert "[(0, 2)]" in message and "init_sequence_parallel(" in message


@pytest.mark.parametrize("bad", [2, "sp", [0, 1], True, 2.0, object()])
def test_other_types_are_one_clear_type_error(bad):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(TypeError) as caught:
        dilated_attention(q, q, q, [8], [1], sequence_group=bad)
    message = str(caught.value)
    assert f"got {type(bad).__name__} {bad!r}" in message and group_types.ACCEPTED in message


def test_module_and_model_pass_bad_types_to_the_same_check():
    with pytest.raises(TypeError, match="sequence_group must be None, a longnet_dist SequenceGroup"):
        DilatedAttention(**MODULE)(torch.randn(1, 8, 8), sequence_group="sp")
    with pytest.raises(TypeError, match=r"got list \[0, 1\]"):
        LongNetLM(LM)(torch.zeros(1, 8, dtype=torch.long), sequence_group=[0, 1])


def test_non_group_member_gets_a_hint():
    with pytest.raises(TypeError, match="NON_GROUP_MEMBER"):
        as_sequence_group(dist.GroupMember.NON_GROUP_MEMBER)


class _RecordingGroup:
    """Stands in for a ProcessGroup: records the splits asked of it."""

    group_name = "7"

    def __init__(self):
        self.calls = []

    _device_types: list = []

    def split_group(self, ranks, group_name, device_types):
        self.calls.append((ranks, group_name))
        return f"pg{ranks}"


def test_every_rank_of_the_group_makes_the_same_splits():
    """Ranks 0..3 of a group of global ranks 10..13 (each listing spans its own way) enter the same
    splits in the same sorted order, members or not; each keeps only the subgroups it is in."""
    calls, kept = [], []
    for sp_rank in range(4):
        parent = _RecordingGroup()
        group = SequenceGroup(parent, [10, 11, 12, 13], global_rank=10 + sp_rank, split_from_group=True)
        spans = [(2, 2), (sp_rank, 1), (0, 3), (0, 4), (0, 2)]
        group.prepare_at_first_use(spans[sp_rank:] + spans[:sp_rank])
        group.prepare_at_first_use([(0, 2), (2, 2)])  # already made: no new split
        calls.append(parent.calls)
        kept.append({span: (sub.group, sub.global_ranks, sub.rank) for span, sub in group._subgroups.items()})
    expected = [([0, 1], "7:longnet_segment:0+2"), ([0, 1, 2], "7:longnet_segment:0+3"),
                ([2, 3], "7:longnet_segment:2+2")]
    assert calls == [expected] * 4
    assert kept[0] == {(0, 2): ("pg[0, 1]", [10, 11], 0), (0, 3): ("pg[0, 1, 2]", [10, 11, 12], 0)}
    assert kept[3] == {(2, 2): ("pg[2, 3]", [12, 13], 1)}
