"""Launch settings of the fused kernels (fused.py): block shapes per kernel, how the backward computes
dQ, small causal launches, whether rows arrive through TMA descriptors or loops split into warp groups, a second
chain of branches, whether nested branches share keys, and whether the r = 1 branch runs last. The defaults are
what the last GPU sweep measured (or, where marked, what was written without a GPU); `load_tuning` (or
LONGNET_KERNEL_TUNING at import) installs a newer sweep's choices, the kernel_tuning.json that
`benchmarks/gpu_attention.py --tune` writes. fused.py reads these
names at every launch, so setting them (`fused_settings.DQ_MODE = "kernel"`) takes effect at once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from . import nesting
from .kernels import triton_dilated as kern
from .kernels import triton_width


@dataclass(frozen=True)
class Blocks:
    """Meta-parameters of one kernel launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (kernel, fp32?) -> blocks. 16-bit: the fastest of `benchmarks/gpu_attention.py --tune` on an H200 (D = 64,
# paper branches, N = 256K, causal; results/gpu_attention_sweep_h200.log, gpu_attention_h200_s14.log): forward
# 64x64 x 3 stages 6.11 ms, 6.36 with 4, 7.19 at 128x64; dK/dV: the second sweep's best within 0.2% (noise);
# dQ 64x32 x 4 stages 24.73 ms against 25.08 for 64x64 x 3 (stop 27's H200 sweep, gpu_attention_h200_s27.log;
# stop 14's chose it too). "dkdv_dq": the dK/dV kernel that computes dQ too (DQ_MODE "tma" or "atomic"), which
# needs registers for one more accumulator: 64x64 x 4 warps (no spills) 23.45 ms with "tma" against 24.0-48.7
# for the other eleven shapes of stop 28's H200 sweep (gpu_attention_dq_fused_h200.log; 2 stages 23.35,
# within noise of 3).
# The sweep can install others in TUNED. fp32 (IEEE dots, no tensor cores): 8-warp tiles that compile for sm_80,
# sm_89 and sm_90 spilling at most 80 bytes per thread (256 with TMA loads on sm_90), where the 4-warp tiles used
# before spilled 0.3-2.6 KiB on sm_90 and sm_89 (`benchmarks/kernel_resources.py --dtype fp32`); untimed.
DEFAULT_BLOCKS = {
    ("fwd", False): Blocks(64, 64, 4, 3),
    ("dkdv", False): Blocks(32, 128, 4, 4),
    ("dkdv_dq", False): Blocks(64, 64, 4, 3),
    ("dkdv_small", False): Blocks(64, 64, 4, 3),  # 27.8 ms at 256K against 26.4: see SMALL_LAUNCH_WAVES
    ("dq", False): Blocks(64, 32, 4, 4),
    ("fwd", True): Blocks(64, 32, 8, 2),
    ("dkdv", True): Blocks(32, 32, 8, 2),
    ("dkdv_dq", True): Blocks(32, 32, 8, 2),
    ("dkdv_small", True): Blocks(32, 16, 4, 2),
    ("dq", True): Blocks(64, 32, 8, 2),
}
# Head dims above 64, which run in tiles of 128 (80 and 96 too: kernels.triton_width; blocks go by the tiles' width,
# which sets the registers and shared memory a program needs). With the blocks above, the 16-bit dK/dV kernel spills
# 2.4 KiB of registers per thread on sm_90 and 6.6 KiB on sm_80, and asks for 113 KiB of shared memory: more than
# sm_86, sm_89 and sm_120 GPUs (L40S, RTX 4090, RTX 5090) give a program (99 KiB), so the backward could not launch
# there; fp32 spilled 2.8-14 KiB.
# These compile for sm_80, sm_89 and sm_90 within each one's shared memory (and within 99 KiB but for 16-bit on
# sm_90, which has 227), the 16-bit kernels without spills (48 bytes in two variants), fp32 with at most 1 KiB
# (kernel_resources.py --head-dim 128, benchmarks/results/kernel_resources_sm*_d128_*.json); untimed.
WIDE_HEAD_BLOCKS = {
    ("fwd", False): Blocks(64, 64, 4, 3),
    ("dkdv", False): Blocks(32, 64, 8, 2),
    ("dkdv_dq", False): Blocks(32, 64, 8, 2),
    ("dkdv_small", False): Blocks(64, 32, 8, 2),
    ("dq", False): Blocks(64, 64, 8, 3),
    ("fwd", True): Blocks(32, 32, 8, 2),  # 32 x 64: no spills without TMA loads, 1.7 KiB with them (sm_90)
    ("dkdv", True): Blocks(32, 32, 8, 2),
    ("dkdv_dq", True): Blocks(32, 32, 8, 2),
    ("dkdv_small", True): Blocks(32, 16, 4, 2),
    ("dq", True): Blocks(32, 16, 4, 2),
}
# A causal dK/dV program loops over the queries after its key block: lengths run from 1 to slots /
# BLOCK_M, and a launch of few programs lasts as long as its longest, about twice the mean (branch
# (32768, 12) at N = 32K: 12 heads x 22 blocks of 128 keys, one wave on an H200). A causal launch of
# fewer than SMALL_LAUNCH_WAVES programs per multiprocessor takes "dkdv_small" (half the keys per
# program), and every small causal launch starts its longest programs first (BLOCK_MAJOR). Written
# after the H200 lease, so off (0) until a GPU measures it: `gpu_attention.py --tune` times 0, 4 and
# 8 at 32K and hands the best on.
SMALL_LAUNCH_WAVES = 0
INTERPRETER_BLOCKS = Blocks(16, 16, 1, 1)
# How the backward computes dQ:
#   "kernel": a dQ kernel of its own after each branch's dK/dV kernel (7 matrix products per block pair);
#   "stream": the same kernels, every dQ launch on a second CUDA stream: dK/dV and dQ write different
#             accumulators, so the two chains run side by side and fill each other's tail waves
#             (the same numbers bit for bit; on the CPU / interpreter it is "kernel");
#   "atomic": dQ from the dK/dV loop, added atomically (5 products; rounding order varies run to run);
#   "tma":    the same, each (BLOCK_M, D) dQ tile added by one TMA bulk reduction instead of an atomic
#             per element (compute capability >= 9; elsewhere it is "atomic").
# "atomic" and "tma" run the dK/dV kernel with the "dkdv_dq" blocks. On an H200 (bf16, paper branches, N = 256K,
# causal, fwd+bwd; stop 28, gpu_attention_dq_fused_h200.log): tma 23.67 ms, stream 24.69, atomic 25.91; at 1M
# the fwd+bwd took 88.2 ms with tma against 94.4 with stream (stop 27). Stop 14 had timed tma slower (31.1 ms
# against 26.6) with the separate kernel's blocks, with which it spills registers. All within 2.5e-3 of fp32.
# "tma" and "atomic" add dQ in an order that varies run to run; "kernel" and "stream" give the same bits
# every run (set DQ_MODE = "stream" for bit-reproducible gradients).
DQ_MODES = ("kernel", "stream", "atomic", "tma")
DQ_MODE = "tma"
# How each kernel's loop reads its row tiles (k and v in "fwd" and "dq", q and dO in "dkdv"):
#   not listed: pointer loads, each thread computing its rows' addresses (async copies to shared memory);
#   listed:     one TMA descriptor per (segment, head) over its slots (row stride r rows), tiles fetched by
#               the tensor-memory accelerator, which also zero-fills slots past the end (compute capability
#               >= 9 and every row 16-byte aligned; elsewhere pointer loads). The same numbers either way.
# On an H100 (stop 19, gpu_attention_h100.log, 256K, shared keys): the forward 6.32 ms with TMA loads against
# 6.81 with pointer loads. On an H200 (stop 27, gpu_attention_h200_s27.log, 256K fwd+bwd): TMA in dK/dV 24.72 ms
# against 24.89, in dQ 24.78 against 24.60; the 32K fwd+bwd then ran 3.67 ms against 4.13 (noisy: 3.54-4.13
# in that run). So "fwd" and "dkdv" are the default (`gpu_attention.py --tune` times each anew).
TMA_KERNELS = ("fwd", "dkdv", "dq")
# Branches run as a second chain beside the first: the SIDE_BRANCHES branches with the largest r (launches of
# the fewest programs, e.g. (32768, 12) at N = 32K: 12 heads x 22 programs, under two per multiprocessor,
# which run at low occupancy and end on their longest program) go on side streams into accumulators of
# their own, so that their launches overlap the first chain's instead of running alone; one elementwise
# launch joins the two (Eq. 9-10 forward, a sum backward). Only while the second accumulators fit
# fused.ACCUMULATOR_BUDGET_BYTES (N = 32K at H = 12, D = 64, batch 1, but not 64K). Rounding differs from
# one chain. Written after the H200 lease, so off (0) until a GPU measures it (`gpu_attention.py --tune`).
SIDE_BRANCHES = 0
# In 16-bit the covering r = 1 branch runs last and writes the output, dK and dV itself (fused.covering_last): no
# fills and no store passes of those fp32 accumulators, by bytes about 3.5 ms of a 1M-token layer (stops 31-32).
# Written without a GPU: `gpu_attention.py --tune-late` times it against False (the branch first, store passes).
COVERING_LAST = True
# Nested branches share keys (attention/nesting.py, kernel_plan): a branch nested in a shorter one skips the keys
# in its queries' own parent segment, which the parent scores for it with weight 1 + c. Exact; the paper's
# branches score 22% fewer pairs, and the parent pays a 16-wide flag dot and a multiply per pair. On an H100
# (stop 19, 256K, fwd+bwd) 25.70 ms on against 26.09 off: on by default (`gpu_attention.py --tune` times both).
SHARE_KEYS = nesting.SHARE_KEYS_BY_DEFAULT  # LONGNET_SHARE_KEYS=0: off, as on the CPU path
TMA_LOADS: frozenset[str] = frozenset({"fwd", "dkdv"})
# Kernels ("fwd", "dkdv", "dq") that run their stretches of the other side's slots as one loop, every block masked
# (the masks keep whole blocks whole: the same numbers), which asks Triton for automatic warp specialisation
# (tl.range(..., warp_specialize=True)): the compiler splits the loop into warp groups that fetch tiles, multiply
# and do the softmax at the same time, as flash-attention 3 does by hand on Hopper. Triton 3.6 and 3.9 split a loop
# only when it is the kernel's only loop, the kernel has no early return and every tile arrives through a TMA
# descriptor (compiled for sm_90 on a CPU, benchmarks/kernel_resources.py), and not a loop with in-loop atomic or
# TMA reductions: so a listed kernel's launch reads its tiles through descriptors (listed in TMA_LOADS or not),
# needs compute capability 9+ and no key padding, and dK/dV is split only when a dQ kernel of its own runs
# (DQ_MODE "kernel" or "stream"). Written without a GPU (stop 31), so empty until `gpu_attention.py --tune` (or
# `make gpu-tune-late`) times each kernel with and without it, and the split 7-product backward against "tma".
WARP_SPECIALIZE: frozenset[str] = frozenset()
TUNED: dict[tuple[str, bool, int], Blocks] = {}  # (kernel, fp32?, tile width) -> blocks, set by a tuning sweep
TUNING_ENV = "LONGNET_KERNEL_TUNING"  # a kernel_tuning.json to install at import (see load_tuning)


def load_tuning(path: str | os.PathLike) -> None:
    """Install a tuning sweep's choices for 16-bit inputs: the JSON that `benchmarks/gpu_attention.py`
    writes as kernel_tuning.json, {"dq_mode": "kernel", "small_launch_waves": 4, "tma_loads": ["fwd"],
    "side_branches": 2, "share_keys": true, "warp_specialize": ["fwd"], "covering_last": true, "head_dim": 64,
    "blocks": {"fwd": [block_m, block_n, num_warps, num_stages], "dkdv": [...], "dkdv_dq": [...], "dkdv_small": [...],
    "dq": [...]}} (every key optional; blocks need head_dim)."""
    global DQ_MODE, SMALL_LAUNCH_WAVES, TMA_LOADS, SIDE_BRANCHES, SHARE_KEYS, WARP_SPECIALIZE, COVERING_LAST
    with open(path) as file:
        data = json.load(file)
    mode = data.get("dq_mode", DQ_MODE)
    if mode not in DQ_MODES:
        raise ValueError(f"{path}: dq_mode={mode!r} is not one of {list(DQ_MODES)}")
    if data.get("blocks") and "head_dim" not in data:
        raise ValueError(f"{path}: blocks need the head_dim they were tuned for (e.g. \"head_dim\": 64)")
    blocks = {}
    for kernel, shape in data.get("blocks", {}).items():
        if (kernel, False) not in DEFAULT_BLOCKS or len(shape) != 4 or not all(int(x) > 0 for x in shape):
            raise ValueError(f"{path}: blocks[{kernel!r}]={shape!r}; want one of fwd, dkdv, dkdv_dq, dkdv_small, dq "
                             "mapped to [block_m, block_n, num_warps, num_stages] (positive integers)")
        width = triton_width(int(data["head_dim"])) or int(data["head_dim"])  # blocks go by the tiles' width
        blocks[(kernel, False, width)] = Blocks(*(int(x) for x in shape))
    waves = data.get("small_launch_waves", SMALL_LAUNCH_WAVES)
    if isinstance(waves, bool) or not isinstance(waves, int) or waves < 0:
        raise ValueError(f"{path}: small_launch_waves={waves!r} must be an integer >= 0 (0: never)")
    tma_loads, specialized = (data.get(key, sorted(default)) for key, default in
                              (("tma_loads", TMA_LOADS), ("warp_specialize", WARP_SPECIALIZE)))
    for key, kernels in (("tma_loads", tma_loads), ("warp_specialize", specialized)):
        if not isinstance(kernels, list) or not set(kernels) <= set(TMA_KERNELS):
            raise ValueError(f"{path}: {key}={kernels!r} must be a list of some of {list(TMA_KERNELS)}")
    side = data.get("side_branches", SIDE_BRANCHES)
    if isinstance(side, bool) or not isinstance(side, int) or side < 0:
        raise ValueError(f"{path}: side_branches={side!r} must be an integer >= 0 (0: one chain)")
    share, last = data.get("share_keys", SHARE_KEYS), data.get("covering_last", COVERING_LAST)
    for key, value in (("share_keys", share), ("covering_last", last)):
        if not isinstance(value, bool):
            raise ValueError(f"{path}: {key}={value!r} must be true or false")
    DQ_MODE, SMALL_LAUNCH_WAVES, SIDE_BRANCHES, SHARE_KEYS, COVERING_LAST = mode, waves, side, share, last
    TMA_LOADS, WARP_SPECIALIZE = frozenset(tma_loads), frozenset(specialized)
    TUNED.update(blocks)


def blocks_for(kernel: str, dtype: torch.dtype, head_dim: int, device: torch.device | None = None) -> Blocks:
    """The blocks of `kernel`'s launches in `dtype` at `head_dim` on `device`: those that replaced blocks the device
    refused (FITTED), else the interpreter's, a tuning sweep's (TUNED) or the defaults for the head dim. A head dim
    between the kernels' widths takes those of its tiles' width (80: 128's), which FITTED and TUNED are keyed by."""
    fp32 = dtype == torch.float32
    width = triton_width(head_dim) or head_dim
    fitted = FITTED.get((kernel, fp32, width, device))
    if fitted is not None:
        return fitted
    if kern.interpreted():
        return INTERPRETER_BLOCKS
    defaults = WIDE_HEAD_BLOCKS if width > 64 else DEFAULT_BLOCKS
    return TUNED.get((kernel, fp32, width), defaults[(kernel, fp32)])


# (kernel, fp32?, tile width, device) -> the blocks that replaced ones the device refused for lack of shared memory
# (fused_launch._fitted: a tuning file from a larger GPU, a head dim or dtype nobody compiled for this one)
FITTED: dict[tuple[str, bool, int, torch.device | None], Blocks] = {}
# Whether a refused launch runs again with smaller blocks (False: Triton's OutOfResources reaches the caller, as a
# tuning sweep wants, which skips the blocks a GPU refuses instead of timing others under their name)
FIT_REFUSED_BLOCKS = True


def smaller_blocks(blocks: Blocks) -> Blocks | None:
    """What to try after a GPU refused `blocks` for shared memory: one pipeline stage fewer (each stage buffers a
    tile of the loop's rows), then at one stage the longer side of the tile halved (down to 16) with two
    stages; None when nothing is smaller."""
    if blocks.num_stages > 1:
        return Blocks(blocks.block_m, blocks.block_n, blocks.num_warps, blocks.num_stages - 1)
    if max(blocks.block_m, blocks.block_n) <= 16:
        return None
    if blocks.block_n >= blocks.block_m:
        return Blocks(blocks.block_m, blocks.block_n // 2, blocks.num_warps, 2)
    return Blocks(blocks.block_m // 2, blocks.block_n, blocks.num_warps, 2)


if os.environ.get(TUNING_ENV):  # e.g. the GPU check's training stage, after the attention stage tuned
    load_tuning(os.environ[TUNING_ENV])
