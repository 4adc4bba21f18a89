"""Sharded dilated attention on a CUDA GPU (skipped without one): 2 ranks on the one GPU, the local
branches through the fused Triton kernels and the spanning ones through aten's CUDA kernels, forward
and gradients against the float64 dense reference and against the single-device fused result.

The ranks talk gloo (NCCL refuses two ranks on one device); every collective goes through host memory
(`_stage_through_host`), since gloo's support for CUDA tensors varies by collective and build. So this
checks what runs on the GPU (kernels, masks, merges, accumulation into the shards' gradients), while
tests/test_sequence_parallel.py checks the communication itself (bytes, ranks, subgroups) on the CPU.
LONGNET_SHARDED_TEST_DEVICE=cpu runs the same test through Triton's interpreter (a check of the test).

Tolerances: those of tests/test_cuda_attention.py for each dtype (relative L2 with a per-element floor,
reference.error_norms). Against the single-device result the same bound: both round at the
dtype's precision, in different orders (the spanning branches' keys arrive in per-rank parts).
"""
from __future__ import annotations

import os

import pytest
import torch

from longnet_dist.attention import dilated_attention, segment_spans
from longnet_dist.distributed import build_mesh
from longnet_dist.distributed.testing import run_multiprocess
from reference import error_norms, reference_dilated_attention

DEVICE = os.environ.get("LONGNET_SHARDED_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
SP = 2
# l = 128 rows per rank, N = 256: w = 32, 64, 128 local (they nest, so they share keys), w = 256 spans both
# ranks, w = 512 > N spans both; H = 3 is not a multiple of r = 2, 4; a ragged last 512-segment
BRANCHES = dict(batch=2, local_len=128, heads=3, head_dim=64, segs=[32, 64, 128, 256, 512], rates=[1, 2, 2, 4, 4])
CASES = {
    "bf16_causal_padded": dict(BRANCHES, causal=True, pad=0.25, dtype=torch.bfloat16),
    "fp16_bidirectional_padded": dict(BRANCHES, causal=False, pad=0.25, dtype=torch.float16),
    # r = 3 and 6 do not divide l = 128: ranks hold ceil(l / r) slots, some empty
    "fp32_causal_rates_not_dividing_shard": dict(batch=1, local_len=128, heads=4, head_dim=64, segs=[32, 128, 256],
                                                 rates=[1, 3, 6], causal=True, pad=0.0, dtype=torch.float32),
}


def case_inputs(case: dict, seed: int = 0):
    """Full-length float64 q, k, v, upstream gradient (B, N, H, D) and key padding mask (B, N) or None."""
    g = torch.Generator().manual_seed(seed)
    shape = (case["batch"], case["local_len"] * SP, case["heads"], case["head_dim"])
    q, k, v, grad = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.rand(shape[:2], generator=g) >= case["pad"] if case["pad"] else None
    return q, k, v, grad, mask


def _stage_through_host() -> None:
    """This process's collectives (collectives.py) copy to host memory, run there and copy back; synchronous.
    all-gather moves raw bytes; reduce-scatter sums 16-bit floats in float32."""
    from longnet_dist.distributed import collectives

    gather, scatter = collectives._all_gather_single, collectives._reduce_scatter_single

    def all_gather(output, source, group=None, async_op=False):
        host = torch.empty(output.numel() * output.element_size(), dtype=torch.uint8)
        gather(host, source.contiguous().cpu().view(torch.uint8), group=group)
        output.copy_(host.view(output.dtype).to(output.device))

    def reduce_scatter(output, source, group=None, async_op=False):
        wide = torch.promote_types(source.dtype, torch.float32)
        host = torch.empty(output.shape, dtype=wide)
        scatter(host, source.cpu().to(wide), group=group)
        output.copy_(host.to(output.dtype).to(output.device))

    collectives._all_gather_single, collectives._reduce_scatter_single = all_gather, reduce_scatter


def _worker(rank: int, world_size: int) -> dict:
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    _stage_through_host()
    mesh = build_mesh(SP)
    spans = sorted({s for case in CASES.values() for s in segment_spans(case["local_len"] * SP, SP, case["segs"])})
    mesh.sequence_group.prepare_segment_subgroups(spans)
    results = {}
    for name, case in CASES.items():
        q, k, v, grad, mask = case_inputs(case)
        rows = slice(mesh.sp_rank * case["local_len"], (mesh.sp_rank + 1) * case["local_len"])
        local = [x[:, rows].to(DEVICE, case["dtype"]).requires_grad_() for x in (q, k, v)]
        out = dilated_attention(*local, case["segs"], case["rates"], causal=case["causal"], backend="triton",
                                key_padding_mask=None if mask is None else mask[:, rows].to(DEVICE),
                                sequence_group=mesh.sequence_group)
        out.backward(grad[:, rows].to(DEVICE, case["dtype"]))
        results[name] = [x.detach().cpu() for x in (out, *(t.grad for t in local))]
    return results


def _single(case: dict, dense: bool) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of the whole sequence on one device: the float64 reference, or the fused kernels."""
    q, k, v, grad, mask = case_inputs(case)
    if dense:
        inputs, grad_in = [x.clone().requires_grad_() for x in (q, k, v)], grad
        out = reference_dilated_attention(*inputs, case["segs"], case["rates"], causal=case["causal"],
                                          key_padding_mask=mask)
    else:
        inputs = [x.to(DEVICE, case["dtype"]).requires_grad_() for x in (q, k, v)]
        grad_in = grad.to(DEVICE, case["dtype"])
        out = dilated_attention(*inputs, case["segs"], case["rates"], causal=case["causal"], backend="triton",
                                key_padding_mask=None if mask is None else mask.to(DEVICE))
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_in)]


@pytest.mark.gpu_heavy
def test_sharded_on_gpu_matches_dense_reference_and_single_device():
    """Every case, the 2 ranks' shards concatenated: out, dq, dk, dv against the float64 reference and against
    the single-device fused result. One test (one spawn of the ranks, whose kernels compile once): the GPU
    test run splits tests over processes, and a fixture shared by several tests would spawn in each."""
    per_rank = run_multiprocess(_worker, SP, timeout=400)
    failures = []
    for name, case in CASES.items():
        sharded = [torch.cat(parts, dim=1) for parts in zip(*(r[name] for r in per_rank))]
        for against in ("dense reference", "single device"):
            errors = error_norms(sharded, _single(case, dense=against == "dense reference"))
            if max(errors.values()) >= TOLERANCE[case["dtype"]]:
                failures.append(f"{name} against the {against}: {errors}")
    assert not failures, "\n".join(failures)
