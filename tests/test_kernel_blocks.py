"""How the fused kernels' launches choose their blocks: per head dim and dtype (a head dim between the kernels'
runs in tiles of the next), from a tuning file, smaller for small causal launches, and smaller again where a GPU refuses
them for lack of shared memory. On CPU through
Triton's interpreter (and on CUDA when present); and the blocks at head_dim 128 compiled for GPUs this machine need
not have (benchmarks/kernel_resources.py; head_dim 64 on sm_90 in tests/test_gpu_check_tools.py).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from longnet_dist.attention import dilated_attention, packed_dilated_attention
from reference import dilated_errors
from subprocess_env import REPO, repo_first_on_pythonpath
from test_triton_kernels import DEVICE, fused_outputs_and_grads  # skips this module where it skips itself


def test_a_tuning_file_installs_the_dq_mode_and_block_shapes(tmp_path, monkeypatch):
    """benchmarks/gpu_attention.py writes kernel_tuning.json; fused_settings.load_tuning (or the environment
    variable fused_settings.TUNING_ENV, read at import, in a fresh process) installs it for 16-bit inputs."""
    from longnet_dist.attention import fused_launch, fused_settings

    path = tmp_path / "kernel_tuning.json"
    path.write_text(json.dumps({"dq_mode": "stream", "small_launch_waves": 2, "tma_loads": ["fwd", "dq"],
                                "side_branches": 2, "share_keys": True, "warp_specialize": ["dkdv"], "head_dim": 64,
                                "covering_last": False, "blocks": {"dkdv": [64, 64, 8, 3]}}))
    monkeypatch.setattr(fused_settings, "TUNED", {})
    monkeypatch.setattr(fused_settings, "DQ_MODE", "kernel")
    monkeypatch.setattr(fused_settings, "SMALL_LAUNCH_WAVES", 0)
    monkeypatch.setattr(fused_settings, "TMA_LOADS", frozenset())
    monkeypatch.setattr(fused_settings, "SIDE_BRANCHES", 0)
    monkeypatch.setattr(fused_settings, "SHARE_KEYS", False)
    monkeypatch.setattr(fused_settings, "WARP_SPECIALIZE", frozenset())
    monkeypatch.setattr(fused_settings, "COVERING_LAST", True)
    fused_settings.load_tuning(path)
    assert fused_settings.DQ_MODE == "stream" and fused_settings.WARP_SPECIALIZE == {"dkdv"}
    assert fused_settings.TUNED == {("dkdv", False, 64): fused_settings.Blocks(64, 64, 8, 3)}
    assert fused_settings.SMALL_LAUNCH_WAVES == 2 and fused_settings.TMA_LOADS == {"fwd", "dq"}
    assert fused_settings.SIDE_BRANCHES == 2 and fused_settings.SHARE_KEYS is True
    assert fused_settings.COVERING_LAST is False
    if not fused_launch.kern.interpreted():  # the interpreter runs every kernel with its own small blocks
        assert fused_settings.blocks_for("dkdv", torch.bfloat16, 64) == fused_settings.Blocks(64, 64, 8, 3)
        assert fused_settings.blocks_for("dkdv", torch.float32, 64) == fused_settings.DEFAULT_BLOCKS[("dkdv", True)]
    probe = ("from longnet_dist.attention import fused_settings as s; "
             "print(s.DQ_MODE, s.TUNED[('dkdv', False, 64)].num_warps)")
    shown = subprocess.run([sys.executable, "-c", probe], env={**os.environ, fused_settings.TUNING_ENV: str(path)},
                           capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["stream", "8"]
    for bad, message in [({"dq_mode": "fast", "head_dim": 64}, r"dq_mode='fast' is not one of \['kernel'"),
                         ({"head_dim": 64, "blocks": {"bwd": [64, 64, 4, 3]}},
                          r"blocks\['bwd'\]=\[64, 64, 4, 3\]; want"),
                         ({"head_dim": 64, "blocks": {"fwd": [64, 0, 4, 3]}}, r"blocks\['fwd'\]=\[64, 0, 4, 3\]; want"),
                         ({"head_dim": 64, "small_launch_waves": -1}, r"small_launch_waves=-1 must be an integer >= 0"),
                         ({"side_branches": True}, r"side_branches=True must be an integer >= 0"),
                         ({"share_keys": 1}, r"share_keys=1 must be true or false"),
                         ({"covering_last": "yes"}, r"covering_last='yes' must be true or false"),
                         ({"tma_loads": ["bwd"]},
                          r"tma_loads=\['bwd'\] must be a list of some of \['fwd', 'dkdv', 'dq'\]"),
                         ({"warp_specialize": "fwd"},
                          r"warp_specialize='fwd' must be a list of some of \['fwd', 'dkdv', 'dq'\]"),
                         ({"blocks": {"fwd": [64, 64, 4, 3]}}, r"blocks need the head_dim they were tuned for")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            fused_settings.load_tuning(path)
    # a refused file changes nothing
    assert fused_settings.DQ_MODE == "stream" and fused_settings.SMALL_LAUNCH_WAVES == 2
    assert fused_settings.TMA_LOADS == {"fwd", "dq"} and fused_settings.WARP_SPECIALIZE == {"dkdv"}


def test_a_causal_launch_of_few_dkdv_programs_takes_the_small_blocks(monkeypatch):
    """fused_settings.SMALL_LAUNCH_WAVES: the paper's longest branch at N = 32K is one wave of unevenly long
    causal dK/dV programs; below the threshold the launch takes twice as many, half as long."""
    from longnet_dist.attention import fused_launch, fused_settings

    monkeypatch.setattr(fused_launch.kern, "interpreted", lambda: False)  # the interpreter's own blocks aside
    monkeypatch.setattr(fused_settings, "SMALL_LAUNCH_WAVES", 4)
    launch = functools.partial(fused_launch._dkdv_key, 32 * 1024, heads=12, batch=1, dtype=torch.bfloat16,
                               head_dim=64, multiprocessors=132)
    blocks = fused_settings.DEFAULT_BLOCKS[("dkdv", False)].block_n, fused_settings.DEFAULT_BLOCKS[("dkdv_small", False)]
    # w = 32768, r = 12: 2731 slots, 22 blocks of 128 keys x 12 heads = 264 programs < 4 x 132
    assert launch(32768, 12, causal=True) == ("dkdv_small", True)
    assert blocks == (128, fused_settings.Blocks(64, 64, 4, 3))  # so the small launch has 43 x 12 programs
    # w = 2048, r = 1: 16 blocks x 16 segments x 12 heads = 3072 programs
    assert launch(2048, 1, causal=True) == ("dkdv", False)
    assert launch(32768, 12, causal=False) == ("dkdv", False)  # programs of equal length: nothing to even out
    assert launch(32768, 12, causal=True, fuse_dq=True) == ("dkdv_small", True)  # 43 x 12 programs of 64 keys
    monkeypatch.setattr(fused_settings, "SMALL_LAUNCH_WAVES", 0)  # off
    assert launch(32768, 12, causal=True) == ("dkdv", False)


def test_small_launches_change_only_the_order_of_programs(monkeypatch):
    """fused_settings.SMALL_LAUNCH_WAVES on: every causal launch below counts as small, so its programs start
    block-major (longest first across all (segment, head) pairs) and dK/dV takes the "dkdv_small"
    blocks (the interpreter's blocks either way). Each program writes its own rows: bit-identical."""
    from longnet_dist.attention import fused_launch, fused_settings

    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(2, 90, 3, 16, device=DEVICE) for _ in range(4))

    def run(waves):
        monkeypatch.setattr(fused_settings, "SMALL_LAUNCH_WAVES", waves)
        monkeypatch.setattr(fused_settings, "DQ_MODE", "kernel")
        monkeypatch.setattr(fused_launch, "_multiprocessors", lambda device: 1)
        return fused_outputs_and_grads(q, k, v, grad, [8, 32, 64], [1, 2, 3], causal=True)

    for a, b in zip(run(0), run(10**6)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_head_dims_above_64_take_their_own_blocks(monkeypatch):
    """fused_settings.WIDE_HEAD_BLOCKS at head_dim 128 (the blocks tuned at 64 spill and outgrow 99 KiB GPUs there),
    DEFAULT_BLOCKS up to 64; a tuning sweep's blocks for a head dim win at that head dim only."""
    from longnet_dist.attention import fused_launch, fused_settings

    monkeypatch.setattr(fused_launch.kern, "interpreted", lambda: False)  # the interpreter's own blocks aside
    monkeypatch.setattr(fused_settings, "TUNED", {})
    for (kernel, fp32), blocks in fused_settings.DEFAULT_BLOCKS.items():
        dtype = torch.float32 if fp32 else torch.bfloat16
        assert fused_settings.blocks_for(kernel, dtype, 128) == fused_settings.WIDE_HEAD_BLOCKS[(kernel, fp32)]
        assert [fused_settings.blocks_for(kernel, dtype, d) for d in (16, 32, 64)] == [blocks] * 3
    assert fused_settings.WIDE_HEAD_BLOCKS[("dkdv", False)] != fused_settings.DEFAULT_BLOCKS[("dkdv", False)]
    tuned = fused_settings.Blocks(64, 32, 4, 2)
    monkeypatch.setitem(fused_settings.TUNED, ("dkdv", False, 128), tuned)
    assert fused_settings.blocks_for("dkdv", torch.float16, 128) == tuned
    assert fused_settings.blocks_for("dkdv", torch.float16, 64) == fused_settings.DEFAULT_BLOCKS[("dkdv", False)]


def test_smaller_blocks_shed_stages_then_halve_the_longer_side():
    from longnet_dist.attention.fused_settings import Blocks, smaller_blocks

    steps, blocks = [], Blocks(64, 128, 8, 3)
    while blocks is not None:
        steps.append((blocks.block_m, blocks.block_n, blocks.num_stages))
        blocks = smaller_blocks(blocks)
    assert steps == [(64, 128, 3), (64, 128, 2), (64, 128, 1), (64, 64, 2), (64, 64, 1), (64, 32, 2), (64, 32, 1),
                     (32, 32, 2), (32, 32, 1), (32, 16, 2), (32, 16, 1), (16, 16, 2), (16, 16, 1)]


def refusing(monkeypatch, most: int):
    """fused_launch.launch as on a GPU whose shared memory holds BLOCK_M x BLOCK_N x num_stages <= `most`: a bigger
    launch raises Triton's OutOfResources before running, as Triton does at a kernel's first launch on a device.
    Returns the list of refused (BLOCK_M, BLOCK_N, num_stages)."""
    from triton.runtime.errors import OutOfResources

    from longnet_dist.attention import fused_launch

    real, refused = fused_launch.launch, []

    def launch(kernel, grid, pointers, *scalars, **meta):
        if "BLOCK_M" in meta and meta["BLOCK_M"] * meta["BLOCK_N"] * meta["num_stages"] > most:
            refused.append((meta["BLOCK_M"], meta["BLOCK_N"], meta["num_stages"]))
            raise OutOfResources(meta["BLOCK_M"] * meta["BLOCK_N"] * meta["num_stages"] * 128, most * 128,
                                 "shared memory")
        return real(kernel, grid, pointers, *scalars, **meta)

    monkeypatch.setattr(fused_launch, "launch", launch)
    return refused


def starting_with(monkeypatch, blocks, fp32: bool = True) -> None:
    """Every launch at head_dim 16 (fp32, or 16-bit) takes `blocks` (in the interpreter, and on CUDA as a tuning
    sweep's)."""
    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "INTERPRETER_BLOCKS", blocks)
    monkeypatch.setattr(fused_settings, "TUNED", {(key, fp32, 16): blocks for key in ("fwd", "dkdv", "dkdv_dq", "dq")})


def test_blocks_a_gpu_refuses_are_replaced_by_smaller_ones_and_kept(monkeypatch):
    """A launch refused for shared memory (a tuning file from a larger GPU, a head dim or dtype nobody compiled for
    this one) runs again with fused_settings.smaller_blocks, once per kernel, said in a warning; the device keeps
    them (fused_settings.FITTED), and the result is that of those blocks run directly, bit for bit."""
    from longnet_dist.attention import fused_settings
    from longnet_dist.attention.fused_settings import Blocks

    monkeypatch.setattr(fused_settings, "DQ_MODE", "kernel")
    monkeypatch.setattr(fused_settings, "FITTED", {})
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(1, 70, 2, 16, device=DEVICE) for _ in range(4))
    run = functools.partial(fused_outputs_and_grads, q, k, v, grad, [16, 64], [1, 2], causal=True)
    starting_with(monkeypatch, Blocks(32, 16, 1, 1))
    direct = run()
    starting_with(monkeypatch, Blocks(32, 32, 1, 2))
    refused = refusing(monkeypatch, most=32 * 16)
    with pytest.warns(UserWarning) as caught:
        fitted = run()
    said = sorted(str(warning.message).split("'")[1] for warning in caught)
    assert said == ["dkdv", "dq", "fwd"]
    assert "refused the 'fwd' kernel's blocks 32x32, 1 warps, 2 stages" in str(caught[0].message)
    assert "runs with 32x16, 1 warps, 1 stages instead" in str(caught[0].message)
    assert fused_settings.FITTED == {(key, True, 16, q.device): Blocks(32, 16, 1, 1) for key in ("fwd", "dkdv", "dq")}
    assert set(refused) == {(32, 32, 2), (32, 32, 1), (32, 16, 2)}
    for a, b in zip(fitted, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    count = len(refused)
    run()  # the kept blocks: nothing refused again
    assert len(refused) == count


def test_a_kernel_that_fits_no_blocks_is_one_clear_error(monkeypatch):
    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "FITTED", {})
    refusing(monkeypatch, most=0)
    x = torch.randn(1, 40, 2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"kernel 'fwd' \(torch.float32, head_dim 16\) does not fit .* shared "
                                           r"memory even with blocks 16x16, \d+ warps, 1 stages.*backend='cuda_flash'"):
        dilated_attention(x, x, x, [16], [1], backend="triton")


@pytest.mark.parametrize("arch, dtype", [(89, "bf16"), (90, "bf16"), (89, "fp32")])
def test_head_dim_128_kernels_fit_each_gpu_without_spilling(arch, dtype, tmp_path):
    """benchmarks/kernel_resources.py compiles the kernels a launch at head_dim 128 takes for sm_89 (L40S, RTX 4090:
    99 KiB of shared memory per program) and sm_90 (H100, H200), without a GPU: each asks for no more shared memory
    than the GPU gives (the blocks tuned at 64 asked sm_89 for 113 KiB) and spills little: at most 64 bytes per thread
    in 16-bit, 1 KiB in fp32 (the blocks tuned at 64 spilled 2.4-6.6 KiB in the 16-bit dK/dV kernel, up to 14 KiB in
    fp32)."""
    if importlib.util.find_spec("triton.backends.nvidia") is None or torch.cuda.is_available():
        pytest.skip("compiled for GPUs on a CPU (CI): this Triton has no NVIDIA backend, or a GPU is here to run them")
    env = {k: v for k, v in repo_first_on_pythonpath(os.environ).items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", "--defaults", "--arch", str(arch),
                             "--head-dim", "128", "--dtype", dtype, "--results", str(tmp_path)],
                            cwd=REPO, env={**env, "TRITON_DEFAULT_FP_FUSION": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / f"kernel_resources_sm{arch}_d128_{dtype}.json").read_text())
    assert report["shared_limit"] == {89: 101376, 90: 232448}[arch]
    rows = report["rows"]
    assert len(rows) == (13 if arch < 90 else 25)  # before Hopper: no TMA loads, TMA dQ or warp-specialised loops
    for row in rows:
        assert row["default"] and row["fits"] and row["dynamic_shared_bytes"] <= report["shared_limit"], row
        assert row["stack_bytes"] <= (64 if dtype == "bf16" else 1024), row


def test_a_tuning_step_skips_blocks_a_gpu_refuses(monkeypatch):
    """benchmarks/gpu_kernels.py times each option under its own name: in its steps (refused_blocks_skipped) a refused
    launch raises Triton's OutOfResources, which the step records as skipped, instead of running smaller blocks
    that fused_settings.FITTED would then keep for every later option."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_kernels as gk

    from longnet_dist.attention import fused_settings
    from longnet_dist.attention.fused_settings import Blocks

    for name, value in dict(DEVICE=DEVICE, DTYPE=torch.float16, HEADS=2, HEAD_DIM=16, SEGMENTS=[16, 32],
                            DILATIONS=[1, 2], SMALL_N=48, SMALL_REPEATS=1).items():
        monkeypatch.setattr(gk, name, value)
    monkeypatch.setattr(fused_settings, "FITTED", {})
    refusing(monkeypatch, most=16 * 16 * 2)

    def apply(option):  # "big": blocks this GPU refuses
        starting_with(monkeypatch, Blocks(32, 32, 1, 2) if option == "big" else Blocks(16, 16, 1, 1), fp32=False)

    report = gk.fastest_fwd_bwd("blocks", ["small", "big"], apply)
    assert report["best"] == "small" and set(report["seconds"]) == {"small"}
    assert fused_settings.FITTED == {} and fused_settings.FIT_REFUSED_BLOCKS is True  # restored after the step


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float16, 4e-3)], ids=str)
@pytest.mark.parametrize("head_dim, width", [(24, 32), (48, 64)])
def test_a_head_dim_between_the_kernels_runs_in_tiles_of_the_next(dtype, tolerance, head_dim, width, monkeypatch):
    """head_dim 24 runs the kernels' tiles of 32, 48 those of 64, over its rows as they are (the columns past the
    rows' end masked, kernels/triton_columns.py; tests/test_triton_head_dims.py has more): forward and gradients
    against the float64 reference, causal, key padding, ragged tails, r not dividing w. Tolerances as in
    test_triton_kernels.py (fp32: summation order; fp16: 11-bit inputs and P)."""
    from longnet_dist.attention import fused, fused_launch

    widths, run, launched, real = [], fused.fused_dilated_attention, set(), fused_launch.launch

    def recording(q, *args):
        widths.append(q.shape[-1])
        return run(q, *args)

    def launch(kernel, grid, pointers, *scalars, **meta):
        launched.add((meta["D"], meta["HEAD_DIM"]))
        return real(kernel, grid, pointers, *scalars, **meta)

    monkeypatch.setattr(fused, "fused_dilated_attention", recording)
    monkeypatch.setattr(fused_launch, "launch", launch)
    errors = dilated_errors(DEVICE, 2, 100, 3, head_dim, [12, 32, 128], [1, 3, 6], True, 0.3, dtype)
    assert widths == [head_dim] and launched == {(width, head_dim)} and max(errors.values()) < tolerance, errors


def test_a_head_dim_between_the_kernels_keeps_the_packed_gradient(monkeypatch):
    """packed_dilated_attention at head_dim 24 (tiles of 32): the packed (B, N, 3, H, 24) tensor's views read in
    place, bit for bit the result and gradient of the three tensors (dQ by a kernel of its own: reproducible on a
    GPU)."""
    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "DQ_MODE", "kernel")
    torch.manual_seed(0)
    qkv, grad = torch.randn(1, 70, 3, 2, 24, device=DEVICE), torch.randn(1, 70, 2, 24, device=DEVICE)
    packed = qkv.clone().requires_grad_()
    out = packed_dilated_attention(packed, [16, 64], [1, 2], causal=True, backend="triton")
    out.backward(grad)
    views = [x.clone().requires_grad_() for x in qkv.unbind(2)]
    apart = dilated_attention(*views, [16, 64], [1, 2], causal=True, backend="triton")
    apart.backward(grad)
    assert out.shape == (1, 70, 2, 24)
    torch.testing.assert_close(out, apart, rtol=0, atol=0)
    torch.testing.assert_close(packed.grad, torch.stack([x.grad for x in views], 2), rtol=0, atol=0)
