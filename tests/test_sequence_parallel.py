"""Sharded dilated attention on 4 gloo ranks (one spawn, shared) against the single-device function.

The workers run `dilated_attention(..., sequence_group=...)` on their shard and return outputs,
gradients and the bytes `comm_stats()` counted; every expected value is rebuilt here on one device
from the same seeded full-length inputs (same function with sequence_group=None, and the dense
float64 reference of tests/reference.py). Meshes in the one world of 4: dp 1 x sp 4 and dp 2 x sp 2
(the two dp replicas get different data; each must match its own single-device result).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch

import longnet_dist.attention.sequence_parallel as sequence_parallel
from longnet_dist.attention import dilated_attention, packed_dilated_attention, segment_spans
from longnet_dist.attention.sequence_parallel import (BACKWARD_KV_TAG, FORWARD_KV_TAG, FORWARD_MASK_TAG,
                                                       SpanningBranch, comm_volume)
from longnet_dist.distributed import build_mesh, comm_stats
from longnet_dist.distributed.testing import run_multiprocess, value_error_message
from reference import reference_dilated_attention

WORLD_SIZE = 4
# float64: sharded and single-device do the same math in double precision; they differ only in
# summation order (keys split into per-rank parts, merged by lse), so 1e-9 relative is plenty.
F64_TOL = dict(rtol=1e-9, atol=1e-10)
# fp32: the same split, rounded at 2^-24; outputs and gradients of O(1) values agree to ~1e-6.
F32_TOL = dict(rtol=1e-4, atol=1e-5)

# sp 4, l = 16, N = 64: w=8 local, w=16 = l local, w=32 spans 2 ranks, w=48 spans 3 (the last
# segment is ragged: sp rank 3 alone), w=128 > N spans all 4. H=3 is not a multiple of r=2, 4.
FIVE_BRANCHES = dict(sp=4, batch=2, local_len=16, heads=3, head_dim=8, segs=[8, 16, 32, 48, 128],
                     rates=[1, 2, 2, 4, 4])
# dp 2 x sp 2, l = 32, N = 64: w=8, 32 local, w=64 = N spans 2, w=96 > N spans 2.
PAIR_BRANCHES = dict(sp=2, batch=2, local_len=32, heads=4, head_dim=8, segs=[8, 32, 64, 96], rates=[1, 1, 2, 4])
# Same w, r and l = 32 on (N=64, P=2) and (N=128, P=4): the bytes per rank must be equal.
DOUBLING = dict(batch=1, local_len=32, heads=2, head_dim=8, segs=[16, 32, 64], rates=[1, 2, 4], causal=True,
                mask=True, dtype=torch.float64)

CASES = {
    "sp4_noncausal": dict(FIVE_BRANCHES, causal=False, mask=False, dtype=torch.float64),
    "sp4_causal": dict(FIVE_BRANCHES, causal=True, mask=False, dtype=torch.float64),
    "sp4_noncausal_mask": dict(FIVE_BRANCHES, causal=False, mask=True, dtype=torch.float64),
    "sp4_causal_mask": dict(FIVE_BRANCHES, causal=True, mask=True, dtype=torch.float64),
    "sp4_causal_mask_fp32": dict(FIVE_BRANCHES, causal=True, mask=True, dtype=torch.float32),
    # a fused projection's packed qkv (packed_dilated_attention): spanning branches, so gradients come as rows
    "sp4_causal_mask_packed": dict(FIVE_BRANCHES, causal=True, mask=True, dtype=torch.float64, packed=True),
    "dp2sp2_noncausal_mask": dict(PAIR_BRANCHES, causal=False, mask=True, dtype=torch.float64),
    "dp2sp2_causal_mask": dict(PAIR_BRANCHES, causal=True, mask=True, dtype=torch.float64),
    # r = 3 and 6 do not divide l = 16 (nor w = 32, 64): ranks hold ceil(16/r) slots, some of them
    # empty, whose validity travels with K/V; head offsets continue across rank boundaries.
    "sp4_rates_not_dividing_shard": dict(sp=4, batch=1, local_len=16, heads=4, head_dim=8, segs=[8, 32, 64],
                                         rates=[1, 3, 6], causal=True, mask=False, dtype=torch.float64),
    "sp4_rates_not_dividing_shard_noncausal": dict(sp=4, batch=1, local_len=16, heads=4, head_dim=8,
                                                   segs=[8, 32, 64], rates=[1, 3, 6], causal=False, mask=True,
                                                   dtype=torch.float64),
    # the fused Triton kernels for the local branches (Triton's interpreter on CPU), aten's beside them
    "sp4_causal_mask_fp32_triton": dict(FIVE_BRANCHES, head_dim=16, causal=True, mask=True, dtype=torch.float32,
                                        backend="triton", share_keys=False),
    "dp2sp2_noncausal_mask_fp32_triton": dict(PAIR_BRANCHES, head_dim=16, causal=False, mask=True,
                                              dtype=torch.float32, backend="triton"),
    # and with shared keys among the local branches (fused_settings.SHARE_KEYS, the default; off in the case
    # above): (16, 2) nests in (8, 1)
    "sp4_causal_mask_fp32_triton_shared": dict(FIVE_BRANCHES, head_dim=16, causal=True, mask=True,
                                               dtype=torch.float32, backend="triton", share_keys=True),
    # head_dim 8, between the kernels' widths: the local branches' rows read in place in tiles of 16 (columns past
    # 8 masked, no padding), packed; the spanning branches' gathers carry the 8 columns (comm_volume at 8)
    "sp4_causal_mask_fp32_triton_head_dim_8": dict(FIVE_BRANCHES, causal=True, mask=True, dtype=torch.float32,
                                                   backend="triton", packed=True),
    "doubling_N64_P2": dict(DOUBLING, sp=2),
    "doubling_N128_P4": dict(DOUBLING, sp=4),
}
if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
    # CPU tensors reach the fused kernels only through Triton's interpreter (tests/conftest.py sets it
    # where there is no GPU; a GPU machine checks those kernels in tests/test_cuda_attention.py)
    CASES = {name: case for name, case in CASES.items() if case.get("backend") != "triton"}


def case_inputs(case: dict, dp_rank: int):
    """Full-length q, k, v, key padding mask and upstream gradient; different data per dp replica."""
    g = torch.Generator().manual_seed(100 + 7 * dp_rank)
    shape = (case["batch"], case["local_len"] * case["sp"], case["heads"], case["head_dim"])
    q, k, v, grad = (torch.randn(shape, generator=g, dtype=torch.float64).to(case["dtype"]) for _ in range(4))
    mask = torch.rand(shape[:2], generator=g) >= 0.25 if case["mask"] else None
    return q, k, v, mask, grad


def _stats_by_tag(snapshot: dict) -> dict:
    tags = {tag: (s["sent_bytes"], s["received_bytes"], s["calls"]) for tag, s in snapshot["by_tag"].items()}
    return dict(total=(snapshot["sent_bytes"], snapshot["received_bytes"], snapshot["calls"]), tags=tags)


def _run_case(case: dict, mesh) -> dict:
    """This rank's shard through the sharded function: output, gradients, bytes per pass."""
    q, k, v, mask, grad = case_inputs(case, mesh.dp_rank)
    rows = slice(mesh.sp_rank * case["local_len"], (mesh.sp_rank + 1) * case["local_len"])
    local = [x[:, rows].clone().requires_grad_() for x in (q, k, v)]
    if case.get("packed"):  # one (B, N, 3, H, D) leaf, its gradient unbound afterwards
        packed = torch.stack([x.detach() for x in local], dim=2).requires_grad_()
    from longnet_dist.attention import fused_settings

    default, fused_settings.SHARE_KEYS = fused_settings.SHARE_KEYS, case.get("share_keys", fused_settings.SHARE_KEYS)
    try:
        comm_stats().reset()
        attend = functools.partial(packed_dilated_attention, packed) if case.get("packed") else \
            functools.partial(dilated_attention, *local)
        out = attend(case["segs"], case["rates"], causal=case["causal"],
                     key_padding_mask=None if mask is None else mask[:, rows],
                     sequence_group=mesh.sequence_group, backend=case.get("backend"))
        forward = _stats_by_tag(comm_stats().snapshot())
        comm_stats().reset()
        out.backward(grad[:, rows])
        backward = _stats_by_tag(comm_stats().snapshot())
    finally:
        fused_settings.SHARE_KEYS = default
    grads = list(packed.grad.unbind(2)) if case.get("packed") else [x.grad for x in local]
    return dict(out=out.detach(), grads=grads, forward=forward, backward=backward,
                sp_rank=mesh.sp_rank, dp_rank=mesh.dp_rank)


class DropOwnKeysBranch(SpanningBranch):
    """The official code's causal bug, emulated: a rank's queries never see its own keys."""

    def key_parts(self, slots, causal):
        return [(keys, part_causal) for keys, part_causal in super().key_parts(slots, causal) if not part_causal]


def _worker(rank, world_size):
    meshes = {sp: build_mesh(sp) for sp in (2, 4)}
    results = {}
    # Before setup prepared the segment subgroups: a clear error, raised before any communication.
    results["unprepared_error"] = value_error_message(lambda: _run_case(CASES["sp4_causal"], meshes[4]))
    for sp, mesh in meshes.items():
        spans = sorted({span for case in CASES.values() if case["sp"] == sp
                        for span in segment_spans(case["local_len"] * sp, sp, case["segs"])})
        mesh.sequence_group.prepare_segment_subgroups(spans)  # collective over the world, same order
    for name, case in CASES.items():
        results[name] = _run_case(case, meshes[case["sp"]])
    sequence_parallel.SpanningBranch = DropOwnKeysBranch
    try:
        results["drop_own_keys"] = _run_case(CASES["sp4_causal"], meshes[4])
    finally:
        sequence_parallel.SpanningBranch = SpanningBranch
    return results


@pytest.fixture(scope="module")
def rank_results():
    return run_multiprocess(_worker, WORLD_SIZE, timeout=300)


def single_device(case: dict, dp_rank: int, dense: bool = False) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of the whole sequence on one device (ours, or the dense reference)."""
    q, k, v, mask, grad = case_inputs(case, dp_rank)
    if dense:
        q, k, v, grad = (x.double() for x in (q, k, v, grad))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    attention = reference_dilated_attention if dense else dilated_attention
    out = attention(q, k, v, case["segs"], case["rates"], causal=case["causal"], key_padding_mask=mask)
    return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), grad))


def _assert_shards_match(rank_results, name: str, case: dict, dense: bool, tol: dict) -> None:
    expected = {}
    for rank, result in enumerate(rank_results):
        seen = result[name]
        if seen["dp_rank"] not in expected:
            expected[seen["dp_rank"]] = single_device(case, seen["dp_rank"], dense)
        rows = slice(seen["sp_rank"] * case["local_len"], (seen["sp_rank"] + 1) * case["local_len"])
        for what, got, full in zip(("out", "dq", "dk", "dv"), [seen["out"]] + seen["grads"], expected[seen["dp_rank"]]):
            assert got.dtype == case["dtype"]
            torch.testing.assert_close(got.to(full.dtype), full[:, rows],
                                       msg=lambda m: f"{name}, rank {rank}, {what}: {m}", **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_shard_equals_single_device_slice(rank_results, name):
    """Output and dq, dk, dv of every rank's shard equal the matching slices of the single-device
    result (same function, sequence_group=None); for dp 2 x sp 2, per replica with its own data."""
    case = CASES[name]
    _assert_shards_match(rank_results, name, case, dense=False, tol=F64_TOL if case["dtype"] == torch.float64 else F32_TOL)


@pytest.mark.parametrize("name", ["sp4_causal_mask", "dp2sp2_noncausal_mask"])
def test_shard_equals_dense_reference(rank_results, name):
    """Independent of the single-device code: the dense O(N^2) float64 reference."""
    _assert_shards_match(rank_results, name, CASES[name], dense=True, tol=F64_TOL)


def test_dp_replicas_saw_different_data(rank_results):
    """Guards the dp x sp test: replicas 0 and 1 really had different inputs and outputs."""
    by_replica = {r["dp2sp2_causal_mask"]["dp_rank"]: r["dp2sp2_causal_mask"]["out"] for r in rank_results[::2]}
    assert set(by_replica) == {0, 1}
    assert (by_replica[0] - by_replica[1]).abs().max() > 0.1


def test_dropping_own_keys_is_caught(rank_results):
    """LONGNET.md: the official causal sequence-parallel path drops a rank's own keys (27-40% off).
    The same emulated here is far from the single-device result; ours is within 1e-9."""
    case = CASES["sp4_causal"]
    expected_out = single_device(case, 0)[0]
    wrong = torch.cat([r["drop_own_keys"]["out"] for r in rank_results], dim=1)
    right = torch.cat([r["sp4_causal"]["out"] for r in rank_results], dim=1)
    assert (right - expected_out).norm() / expected_out.norm() < 1e-9
    assert (wrong - expected_out).norm() / expected_out.norm() > 0.05


def test_unprepared_subgroup_is_a_clear_error(rank_results):
    for result in rank_results:
        message = result["unprepared_error"]
        assert message is not None and "prepare_segment_subgroups" in message
        assert "segment_spans(64, 4, [8, 16, 32, 48, 128])" in message and "(0, 2)" in message


def _expected_volume(case: dict, sp_rank: int):
    return comm_volume(batch=case["batch"], local_len=case["local_len"], sp_size=case["sp"], sp_rank=sp_rank,
                       num_heads=case["heads"], head_dim=case["head_dim"],
                       element_size=torch.empty(0, dtype=case["dtype"]).element_size(),
                       segment_lengths=case["segs"], dilation_rates=case["rates"], key_padding_mask=case["mask"])


def _spanning_segments(case: dict, sp_rank: int) -> tuple[int, int]:
    """(branches that put this rank in a segment of >= 2 ranks = K/V collectives per pass, those of
    them that also gather key validity: with a mask, or when r does not divide l)."""
    seq_len, sp, local = case["local_len"] * case["sp"], case["sp"], case["local_len"]
    spanning = [r for w, r in zip(case["segs"], case["rates"])
                if sequence_parallel.segment_span(seq_len, sp, sp_rank, w)[1] > 1]
    return len(spanning), sum(1 for r in spanning if case["mask"] or local % r)


@pytest.mark.parametrize("name", list(CASES))
def test_bytes_per_rank_equal_the_formula(rank_results, name):
    """Measured by comm_stats, per rank and pass: exactly comm_volume's bytes, sent = received, one
    collective per spanning branch (plus one for the mask), and nothing else on the network."""
    case = CASES[name]
    for result in rank_results:
        seen = result[name]
        volume = _expected_volume(case, seen["sp_rank"])
        spanning, with_validity = _spanning_segments(case, seen["sp_rank"])
        gathers = spanning + with_validity
        assert seen["forward"]["total"] == (volume.forward, volume.forward, gathers)
        assert seen["backward"]["total"] == (volume.backward_kv, volume.backward_kv, spanning)
        forward_tags, backward_tags = seen["forward"]["tags"], seen["backward"]["tags"]
        if spanning:
            assert forward_tags[FORWARD_KV_TAG] == (volume.forward_kv, volume.forward_kv, spanning)
            assert backward_tags[BACKWARD_KV_TAG] == (volume.backward_kv, volume.backward_kv, spanning)
        if with_validity:
            assert forward_tags[FORWARD_MASK_TAG] == (volume.forward_mask, volume.forward_mask, with_validity)


def test_bytes_by_hand_and_independent_of_n(rank_results):
    """(N=64, P=2) and (N=128, P=4), l = 32: only w=64, r=4 spans (2 ranks), so every rank moves
    (2-1) * [2 K/V * B * (l/r) * H * D * 8 bytes + B * (l/r) * H mask bytes] each way, both times."""
    B, l, H, D = DOUBLING["batch"], DOUBLING["local_len"], DOUBLING["heads"], DOUBLING["head_dim"]
    kv_bytes = (2 - 1) * 2 * B * (l // 4) * H * D * 8
    mask_bytes = (2 - 1) * B * (l // 4) * H
    for name in ("doubling_N64_P2", "doubling_N128_P4"):
        for result in rank_results:
            seen = result[name]
            assert seen["forward"]["total"][:2] == (kv_bytes + mask_bytes, kv_bytes + mask_bytes)
            assert seen["backward"]["total"][:2] == (kv_bytes, kv_bytes)
