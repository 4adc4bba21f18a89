"""Dilated attention (fused Triton kernels) vs dense flash attention on one CUDA GPU.

    python3 benchmarks/gpu_attention.py           # the sweep below, about 3 minutes on an H200
    python3 benchmarks/gpu_attention.py --quick   # causal 32K, 1M and (dilated) 4M only, about a minute

One layer's attention, bf16, batch 1, H = 12, D = 64, the paper's branches w = 2048..32768,
r = 1, 2, 4, 6, 12. Kernels: "dilated" (the fused kernels, the default on CUDA), "gather" (the
previous path: gather rows, aten's flash kernel per branch, merge in PyTorch; backend="cuda_flash")
and "dense" (SDPA's flash kernel over the whole sequence, flash-attention 2). At 32K causal also
"dense_cudnn" (SDPA's cuDNN kernel) and "dense_sdpa" (whichever kernel SDPA picks by itself, as the
trainer's dense baseline gets it): the ratios are reported against "dense" and against the fastest
of the three. FLOPs count only the multiply-adds each
algorithm needs (LONGNET.md "Cost"; causal about half; backward = 2.5x forward). Times are medians
of CUDA-event timings after a warm-up, the calls queued back to back as a model's layers are (the rates and
ratios come from these); "alone" is the same call started on an idle GPU each time, which adds the host's
time to issue it where the kernels are short (32K: ~1.8 ms of host for ~2.9 ms of kernels on an H200
host, stop 29, benchmarks/host_overhead.py); peak memory is torch.cuda.max_memory_allocated over one
forward+backward, inputs and the incoming gradient included, divided by N.
It first checks every way of computing dQ (fused_settings.DQ_MODES: a kernel of its own, the same on a second
CUDA stream, atomically in the dK/dV kernel per element or per tile by TMA) against an fp32 run at
N = 64K and keeps the fastest correct one. `--tune` then times nested branches sharing keys off and on at
256K (fused_settings.SHARE_KEYS), at N = 32K whether causal dK/dV launches of few programs take smaller
blocks (fused_settings.SMALL_LAUNCH_WAVES) and how many branches run as a second chain on side streams
(fused_settings.SIDE_BRANCHES; neither has been timed on a GPU yet), then sweeps a few block shapes per
kernel at N = 256K and keeps the fastest (recorded in the JSON); after the points, which kernels read
rows through TMA descriptors (fused_settings.TMA_LOADS, 256K; dK/dV and dQ not timed yet), and if that
changes anything, the dilated points again. Writes benchmarks/results/gpu_attention.json and .png (the
JSON after every point), and kernel_tuning.json: the settings in use, which a later process installs with
LONGNET_KERNEL_TUNING=path (fused_settings.load_tuning; scripts/gpu_check.sh's training stage).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
from common import RESULTS, machine, style_log2_axis  # noqa: E402
import gpu_kernels  # noqa: E402  (its DEADLINE is set below)
from gpu_kernels import (DILATIONS, SEGMENTS, UNTRIED_DQ_MODES, K, M,  # noqa: E402
                         choose_dq_variant, cuda_time, forward, grads_of, make_inputs, tune, tune_side_branches,
                         tune_covering_last, tune_share_keys, tune_small_launches, tune_split_backward,
                         tune_tma_loads, tune_warp_specialize, write_tuning)

from longnet_dist.attention.kernels import dense_flops, dilated_flops  # noqa: E402

BACKWARD_FACTOR = 2.5
STARTED = time.time()
LATE_TUNING_S = 90  # for the steps after the points (warp specialisation, then TMA loads: each about 3 compiles and
# 6 timed runs at 256K, and the split backward against dQ from the dK/dV loop)
# (kernel, N, causal, repeats); dense at 1M takes ~21 s per forward+backward: repeats 0 times its one
# (first) forward+backward and no forward alone. At 32K a dilated forward+backward lasts ~4 ms, and medians of
# 5 ranged 3.5-4.1 ms for the same settings on an H200 (stop 27): SHORT repeats there, 0.1 s in all.
SHORT = 25
FULL = ([("dilated", 32 * K, True, SHORT)] + [("dilated", n, True, 5) for n in (128 * K, M)]
        + [("dilated", 4 * M, True, 2), ("dilated", 32 * K, False, SHORT), ("dilated", M, False, 5)]
        + [("gather", 32 * K, True, 3), ("gather", M, True, 2)]
        + [("dense", 32 * K, True, 5), ("dense", 32 * K, False, 5), ("dense", M, True, 0)])
DENSE_KERNELS = [("dense_cudnn", 32 * K, True, 5), ("dense_sdpa", 32 * K, True, 5)]  # other dense kernels, 32K
FULL += DENSE_KERNELS
QUICK = [("dilated", 32 * K, True, SHORT), ("dense", 32 * K, True, 5), ("dilated", M, True, 3), *DENSE_KERNELS,
         ("dense", M, True, 0), ("dilated", 4 * M, True, 1)]  # 4M last: ~54 GiB, the 64-bit offsets checked


def set_heads(heads: int, head_dim: int) -> None:
    """Every point, tuning step and kernel_tuning.json from here on at `heads` x `head_dim` (gpu_kernels.HEADS and
    HEAD_DIM; default 12 x 64, the paper's)."""
    from longnet_dist.attention.kernels import triton_width

    if triton_width(head_dim) is None or head_dim < 1 or heads < 1:
        raise ValueError(f"--heads {heads} --head-dim {head_dim}: want heads >= 1 and 1 <= head_dim <= 128 (the fused "
                         "kernels run 16, 32, 64 and 128, and pad the others to the next)")
    gpu_kernels.HEADS, gpu_kernels.HEAD_DIM = heads, head_dim


def attention_flops(kind: str, n: int, causal: bool) -> float:
    heads, head_dim = gpu_kernels.HEADS, gpu_kernels.HEAD_DIM
    if kind.startswith("dense"):
        return dense_flops(n, n, heads, head_dim, causal)
    return dilated_flops(n, heads, head_dim, SEGMENTS, DILATIONS, causal)


def measure(kind: str, n: int, causal: bool, repeats: int) -> dict:
    q, k, v, grad = make_inputs(n, requires_grad=True)

    def fwd_bwd():
        grads_of(kind, q, k, v, grad, causal)

    def fwd():
        with torch.no_grad():
            forward(kind, q, k, v, causal)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    first = cuda_time(fwd_bwd, 1, warm_up=False)  # compiles, and its peak is the one reported
    peak = torch.cuda.max_memory_allocated()
    inputs = 4 * q.numel() * q.element_size()
    point = {"kind": kind, "n": n, "causal": causal, "peak_bytes": peak, "peak_bytes_per_token": peak / n,
             "peak_above_inputs_per_token": (peak - inputs) / n}
    flops = attention_flops(kind, n, causal)
    if repeats:
        point["forward_s"] = cuda_time(fwd, repeats, queued=True)
        point["forward_tflops"] = flops / point["forward_s"] / 1e12
        # each call on an idle GPU: the host's time to issue a call shows where the kernels are short
        point["forward_backward_isolated_s"] = cuda_time(fwd_bwd, repeats)
        point["forward_backward_isolated_tflops"] = (flops * (1 + BACKWARD_FACTOR)
                                                     / point["forward_backward_isolated_s"] / 1e12)
    # calls queued back to back, as a model's layers are (0 repeats: the first run, no compile)
    point["forward_backward_s"] = cuda_time(fwd_bwd, repeats, queued=True) if repeats else first
    point.update(forward_flops=flops, timed_runs=repeats or 1,
                 forward_backward_tflops=flops * (1 + BACKWARD_FACTOR) / point["forward_backward_s"] / 1e12)
    if kind == "dilated" and n >= 4 * M:
        point["tail_max_abs_diff"] = tail_check(q, k, v, causal)
    return point


def tail_check(q, k, v, causal: bool) -> float:
    """The last 32K rows depend only on themselves (every w divides 32K): recomputing them alone
    must give the same output. At 4M rows a tensor has > 2^31 elements: this checks 64-bit offsets."""
    with torch.no_grad():
        whole = forward("dilated", q, k, v, causal)[:, -SEGMENTS[-1]:]
        alone = forward("dilated", *(x[:, -SEGMENTS[-1]:] for x in (q, k, v)), causal)
    return (whole.float() - alone.float()).abs().max().item()


def summarize(points: list[dict]) -> dict:
    def get(kind, n, causal=True):  # the fastest run of that point (a later dQ mode may have rerun it)
        runs = [p for p in points if (p["kind"], p["n"], p["causal"]) == (kind, n, causal) and "error" not in p]
        return min(runs, key=lambda p: p["forward_backward_s"], default=None)

    targets = {}
    for n, tag in ((32 * K, "32k"), (M, "1m")):
        for causal in (True, False):
            dil, den = get("dilated", n, causal), get("dense", n, causal)
            mode = "causal" if causal else "bidirectional"
            if dil and den:
                targets[f"flops_ratio_{tag}_{mode}"] = dil["forward_backward_tflops"] / den["forward_backward_tflops"]
                if "forward_backward_isolated_tflops" in dil and "forward_backward_isolated_tflops" in den:
                    targets[f"flops_ratio_{tag}_{mode}_alone"] = (dil["forward_backward_isolated_tflops"]
                                                                  / den["forward_backward_isolated_tflops"])
            fastest = max(filter(None, (get(kind, n, causal) for kind in ("dense", "dense_cudnn", "dense_sdpa"))),
                          key=lambda p: p["forward_backward_tflops"], default=None)
            if dil and fastest and fastest is not den:
                targets[f"flops_ratio_{tag}_{mode}_vs_{fastest['kind']}"] = (
                    dil["forward_backward_tflops"] / fastest["forward_backward_tflops"])
        dil, old = get("dilated", n), get("gather", n)
        if dil and old:
            targets[f"speedup_over_gather_{tag}"] = old["forward_backward_s"] / dil["forward_backward_s"]
    if get("dilated", M):
        targets["million_forward_backward_s"] = get("dilated", M)["forward_backward_s"]
    for n, tag in ((M, "1m"), (4 * M, "4m")):
        if get("dilated", n):
            targets[f"peak_kb_per_token_{tag}"] = get("dilated", n)["peak_bytes_per_token"] / 1024
    return targets


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, causal in sorted({(p["kind"], p["causal"]) for p in points if "error" not in p}):
        best = {}  # the fastest run per N (a later dQ mode may have rerun a point)
        for p in points:
            if (p["kind"], p["causal"]) == (kind, causal) and "error" not in p:
                if p["n"] not in best or p["forward_backward_s"] < best[p["n"]]["forward_backward_s"]:
                    best[p["n"]] = p
        rows = [best[n] for n in sorted(best)]
        label = f"{kind} ({'causal' if causal else 'bidirectional'})"
        ax_rate.plot([p["n"] for p in rows], [p["forward_backward_tflops"] for p in rows], marker="o", label=label)
        ax_mem.plot([p["n"] for p in rows], [p["peak_bytes_per_token"] / 1024 for p in rows], marker="o", label=label)
    style_log2_axis(ax_rate, "fwd+bwd TFLOP/s (needed FLOPs)")
    style_log2_axis(ax_mem, "peak memory per token (KiB)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_points(specs, payload: dict, save) -> None:
    """Measure each (kind, N, causal, repeats), print its row, append it to payload["points"], save."""
    from longnet_dist.attention import fused_settings

    for kind, n, causal, repeats in specs:
        started = time.time()
        try:
            point = measure(kind, n, causal, repeats)
        except Exception as error:  # out of memory, or a kernel failure: recorded, the sweep goes on
            point = {"kind": kind, "n": n, "causal": causal, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        torch.cuda.empty_cache()
        point["wall_s"] = time.time() - started
        if kind == "dilated":
            point["dq_mode"], point["tma_loads"] = fused_settings.DQ_MODE, sorted(fused_settings.TMA_LOADS)
            point["share_keys"] = fused_settings.SHARE_KEYS
            point["warp_specialize"] = sorted(fused_settings.WARP_SPECIALIZE)
            if fused_settings.SHARE_KEYS:  # the TF/s count every branch's pairs; the kernels score this fraction
                point["pairs_scored_fraction"] = scored_fraction(n, causal)
        payload["points"].append(point)
        mode = "causal" if causal else "bidir"
        if "error" in point:
            print(f"{kind:8} {mode:7} {n:>8} failed: {point['error']}", flush=True)
        else:
            fwd_ms, fwd_tflops = ((f"{point['forward_s'] * 1e3:9.2f}", f"{point['forward_tflops']:9.1f}")
                                  if "forward_s" in point else (f"{'-':>9}", f"{'-':>9}"))
            print(f"{kind:8} {mode:7} {n:>8} {fwd_ms} {point['forward_backward_s'] * 1e3:9.2f} "
                  f"{fwd_tflops} {point['forward_backward_tflops']:9.1f} "
                  f"{point['peak_bytes_per_token'] / 1024:9.2f}"
                  + (f" {point['forward_backward_isolated_s'] * 1e3:9.2f}" if "forward_backward_isolated_s" in point
                     else f" {'-':>9}") + f"  {point.get('dq_mode', '')}"
                  + (f"  tma loads: {','.join(point['tma_loads'])}" if point.get("tma_loads") else "")
                  + ("  shared keys" if point.get("share_keys") else "")
                  + (f"  split: {','.join(point['warp_specialize'])}" if point.get("warp_specialize") else "")
                  + (f"  tail diff {point['tail_max_abs_diff']:.2e}" if "tail_max_abs_diff" in point else ""),
                  flush=True)
        payload["targets"] = summarize(payload["points"])
        save()


def key_points(points: list) -> list:
    """The dilated 32K and 1M points of `points`: the targets' two, timed again after a setting changes."""
    return [p for p in points if p[0] == "dilated" and p[1] in (32 * K, M)]


def write_json(payload: dict, path: Path) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def scored_fraction(n: int, causal: bool) -> float:
    """Of the pairs the paper's branches give at N = n, the fraction the kernels score with shared keys."""
    from longnet_dist.attention import nesting

    pairs = [(min(w, n), r) for w, r in zip(SEGMENTS, DILATIONS)]
    alone = sum(nesting.kernel_pairs(w, r, nesting.KernelFold(), causal) for w, r in pairs)
    return sum(nesting.kernel_pairs(w, r, f, causal) for (w, r), f in zip(pairs, nesting.kernel_plan(pairs))) / alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 32K and 1M, and dilated at 4M, only")
    parser.add_argument("--tune", action="store_true", help="sweep block shapes first (about 1 minute)")
    parser.add_argument("--tune-late", action="store_true",
                        help="the dilated 32K and 1M points, then only the tuning steps that run after the points "
                             "(the covering branch last or first, warp specialisation and TMA loads per kernel; "
                             "LATE_TUNING_S), then those points again if a setting changed")
    parser.add_argument("--tune-budget", type=float, default=float("inf"), metavar="SECONDS",
                        help="seconds from the start after which the tuning tries nothing new (each step keeps its "
                             "best so far; kernel_tuning.json is written after every step), leaving the rest of a "
                             "time-limited stage to the measured points")
    parser.add_argument("--dq-modes", nargs="+", metavar="MODE", default=None,
                        help="the ways to compute dQ to check and time first (default: all of fused_settings.DQ_MODES; "
                             "the GPU check passes 'tma stream', measured fastest on an H200 in stop 28, so "
                             "its tuning budget goes to the settings never timed)")
    parser.add_argument("--backward-only", action="store_true",
                        help="check and time --dq-modes, tune only the backward's block shapes (for 'tma' and "
                             "'atomic': dQ from the dK/dV loop, over the shapes that do not spill), then time the "
                             "dilated 32K and 1M points with the winner (`make gpu-dq-fused`)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (default 12, the paper's)")
    parser.add_argument("--head-dim", type=int, default=64,
                        help="head dim up to 128 (default 64; others run tiles of the next of 16, 32, 64, 128, masked), e.g. "
                             "`--heads 6 --head-dim 128`, the same FLOPs")
    parser.add_argument("--tag", default="", help="results go to gpu_attention_<tag>.json/png")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    args = parser.parse_args()
    try:
        set_heads(args.heads, args.head_dim)
    except ValueError as error:
        sys.exit(str(error))
    if not torch.cuda.is_available():
        sys.exit("gpu_attention.py needs a CUDA GPU")
    host = machine()
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"gpu_attention_{args.tag}" if args.tag else "gpu_attention"
    payload = {"machine": host, "segments": SEGMENTS, "dilations": DILATIONS, "heads": args.heads, "head_dim": args.head_dim,
               "dtype": "bfloat16", "batch": 1, "command": " ".join(sys.argv), "points": []}
    print(f"GPU: {host['gpu']}, torch {host['torch']}; H={args.heads}, D={args.head_dim}, bf16, paper branches",
          flush=True)
    from longnet_dist.attention import fused_settings

    gpu_kernels.DEADLINE = STARTED + args.tune_budget
    unknown = sorted(set(args.dq_modes or ()) - set(fused_settings.DQ_MODES))
    if unknown:
        sys.exit(f"--dq-modes {' '.join(unknown)}: not one of {list(fused_settings.DQ_MODES)}")
    save = functools.partial(write_json, payload, args.results / f"{name}.json")
    payload["dq_variants"] = choose_dq_variant([m for m in args.dq_modes or fused_settings.DQ_MODES
                                                if m not in UNTRIED_DQ_MODES])
    write_tuning(args.results)
    if args.backward_only:  # the 5-product backward against the 7-product one, on shapes that do not spill
        payload["tuning"] = tune([mode for mode, report in payload["dq_variants"].items()
                                  if isinstance(report, dict) and report.get("correct")], kernels=("dkdv",),
                                 separate_shapes=1)  # the separate kernel's other shapes: timed in stop 27
        write_tuning(args.results)
        run_points(key_points(QUICK), payload, save)
        print(f"wrote {args.results / name}.json")
        return
    if args.tune:  # never timed first (the block shapes were tuned on an H200 and an H100); each choice handed on
        tuning = {"share_keys": tune_share_keys()}
        write_tuning(args.results)
        tuning["small_launches"] = tune_small_launches()
        write_tuning(args.results)
        tuning["side_branches"] = tune_side_branches()
        write_tuning(args.results)
        payload["tuning"] = tune([mode for mode, report in payload["dq_variants"].items()
                                  if isinstance(report, dict) and report.get("correct")]) | tuning
        write_tuning(args.results)
        payload["tuning"]["seconds"] = time.time() - STARTED

    payload["blocks"] = {f"{k[0]}{'_fp32' if k[1] else ''}": vars(b) for k, b in fused_settings.DEFAULT_BLOCKS.items()}
    payload["blocks"].update({f"tuned_{k[0]}": vars(b) for k, b in fused_settings.TUNED.items()})
    print(f"{'kernel':8} {'mode':7} {'N':>8} {'fwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>9} {'f+b TF/s':>9} "
          f"{'KiB/token':>9} {'alone ms':>9}  dQ", flush=True)
    # --tune-late: the dilated 32K and 1M points only, before and after (the dense ones: the attention stage's)
    run_points(key_points(QUICK) if args.tune_late else QUICK if args.quick else FULL, payload, save)
    # What has not been timed on a GPU goes last (untried dQ modes; TMA loads; warp specialisation): a kernel fault
    # there (sticky in CUDA) cannot cost the points above. It gets LATE_TUNING_S of its own.
    def settings_now():
        return (fused_settings.DQ_MODE, fused_settings.TMA_LOADS, fused_settings.WARP_SPECIALIZE,
                fused_settings.COVERING_LAST)

    chosen = settings_now()
    gpu_kernels.DEADLINE = time.time() + LATE_TUNING_S
    if UNTRIED_DQ_MODES:
        payload["dq_variants_untried"] = choose_dq_variant(UNTRIED_DQ_MODES, payload["dq_variants"])
        save()
        write_tuning(args.results)
    if args.tune or args.tune_late:  # never timed first: the covering branch last (stops 31-32), warp
        # specialisation; TMA loads were timed, in stops 19 and 27
        payload.setdefault("tuning", {})["covering_last"] = tune_covering_last()
        save()
        write_tuning(args.results)
        payload["tuning"]["warp_specialize"] = tune_warp_specialize()
        payload["tuning"]["split_backward"] = tune_split_backward()
        save()
        write_tuning(args.results)
        payload["tuning"]["tma_loads"] = tune_tma_loads()
        save()
        write_tuning(args.results)
    if settings_now() != chosen:  # faster, correct:
        # the key points again
        run_points(key_points(QUICK if args.quick else FULL), payload, save)
    for key, value in payload["targets"].items():
        print(f"{key}: {value:.3f}")
    plot(payload["points"], args.results / f"{name}.png", "LongNet dilated (fused Triton) vs dense flash attention, "
         f"bf16, H={args.heads}, D={args.head_dim} - {host['gpu']}")
    print(f"wrote {args.results / name}.json and .png")


if __name__ == "__main__":
    main()
