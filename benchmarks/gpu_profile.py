"""Where the GPU time goes: kernel-level profiles of one attention forward+backward and of one
training step of the `base` LongNet LM, dilated and dense side by side.

    python3 benchmarks/gpu_profile.py                      # CUDA, about a minute on an H200
    python3 benchmarks/gpu_profile.py --attention-only     # the attention profiles alone (seconds, once compiled)
    python3 benchmarks/gpu_profile.py --device cpu --smoke # tiny shapes on the CPU (checks the script)

Attention: bf16, batch 1, H = 12, D = 64, the paper's branches (w = 2048..32768, r = 1..12), causal,
N = 32K and 1M (fused Triton kernels) and dense flash (SDPA) at 32K. Model step: `model=base`
(85M parameters), bf16 weights, compiled token-wise regions (model.compile=auto), no activation
checkpointing, torch AdamW (fused on CUDA), seq 32K, dilated and `attention_impl=dense`.
torch.profiler records every kernel of one step after warm-up; kernels are grouped by name
(`category`): the dilated kernels one by one, dense flash, matmuls, compiled regions, elementwise,
reductions, copies and fills, the optimizer; and by branch (the kernels inside each
`kernels.branch_range`, "dilated fwd w=2048 r=1"). Prints per profile the milliseconds per category,
per branch and the top kernels; writes benchmarks/results/gpu_profile.json (or --results/gpu_profile.json;
gpu_profile_attention.json with --attention-only).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, machine  # noqa: E402

from longnet_dist.attention import dilated_attention  # noqa: E402
from longnet_dist.model import LongNetConfig, LongNetLM  # noqa: E402

SEGMENTS, DILATIONS = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]
K, M = 1024, 1024 * 1024
# (category, pattern searched in the lower-cased kernel or op name), first match wins; Triton
# kernels keep their function's name (kernels/triton_dilated.py)
CATEGORIES = [
    ("dilated fwd", r"^_fwd\b"), ("dilated dK/dV", r"^_bwd_dkdv\b"), ("dilated dQ", r"^_bwd_dq\b"),
    ("dilated prep / merge", r"^_bwd_prep\b|^_merge_chains\b"),
    ("flash (dense / aten)", r"flash|fmha|efficient_attention|scaled_dot_product"),
    ("optimizer", r"multi_tensor|adam|foreach"), ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|cublas|aten::mm|addmm|bmm"),
    ("compiled region", r"^triton_|compiledfunction|torch-compiled"), ("copy / fill", r"memcpy|memset|copy|fill|zero"),
    ("reduction", r"reduce|sum|norm"), ("elementwise", r"elementwise|vectorized|aten::"),
]


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def summarize(prof, device: str, top: int = 15) -> dict:
    """Kernel (CUDA) or op (CPU) self times of one profile: per category and the `top` largest."""
    rows, branches = [], {}
    for event in prof.key_averages():
        if event.key.startswith("dilated ") and " w=" in event.key:  # kernels.branch_range: one branch's work
            branches[event.key] = (event.device_time_total if device == "cuda" else event.cpu_time_total) / 1000
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key[:160], "calls": event.count, "ms": us / 1000, "category": category(event.key)})
    total = sum(r["ms"] for r in rows) or 1.0
    by_category: dict[str, float] = {}
    for r in rows:
        by_category[r["category"]] = by_category.get(r["category"], 0.0) + r["ms"]
    rows.sort(key=lambda r: -r["ms"])
    return {"total_ms": total, "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "branches_ms": dict(sorted(branches.items())), "top": rows[:top]}


def profiled(step, device: str, warmup: int) -> tuple[dict, float]:
    """(summary of one profiled step, wall seconds of one unprofiled step) after `warmup` steps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    step()
    sync()
    seconds = time.perf_counter() - start
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync()
    return summarize(prof, device), seconds


def attention_step(n: int, impl: str, device: str, dtype: torch.dtype, heads: int, head_dim: int, segments, dilations):
    q, k, v, grad = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        if impl == "dense":  # SDPA over (B, H, N, D)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
        else:
            out = dilated_attention(q, k, v, segments, dilations, causal=True)
        torch.autograd.grad(out, (q, k, v), grad)
    return step


def model_step(n: int, impl: str, device: str, dtype: torch.dtype, shape: dict):
    torch.manual_seed(0)
    config = LongNetConfig(vocab_size=258, attention_impl=impl, activation_checkpointing="none", **shape)
    model = LongNetLM(config).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    ids = torch.randint(0, 258, (1, n + 1), device=device)

    def step():
        loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def print_summary(label: str, summary: dict, seconds: float) -> None:
    print(f"\n== {label}: {seconds * 1000:.2f} ms per step (unprofiled), {summary['total_ms']:.2f} ms of kernels")
    for name, ms in summary["categories"].items():
        print(f"   {name:<22} {ms:10.2f} ms {100 * ms / summary['total_ms']:5.1f}%")
    for name, ms in summary["branches_ms"].items():
        print(f"   {name:<30} {ms:10.2f} ms")
    for row in summary["top"][:8]:
        print(f"   {row['ms']:10.2f} ms x{row['calls']:<4} {row['name'][:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (seconds; for checking the script)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for gpu_profile.json")
    parser.add_argument("--attention-only", action="store_true",
                        help="no model steps (their compile takes most of a minute): gpu_profile_attention.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --smoke to check the script)")
    if args.smoke:
        heads, head_dim, segments, dilations = 2, 16, [64, 128], [1, 2]
        attention_points, model_points = [(256, "dilated"), (256, "dense")], [(256, "dilated"), (256, "dense")]
        shape = dict(dim=32, num_layers=2, num_heads=2, segment_lengths=segments, dilation_rates=dilations,
                     compile=False)
        dtype = torch.float32
    else:
        heads, head_dim, segments, dilations = 12, 64, SEGMENTS, DILATIONS
        attention_points = [(32 * K, "dilated"), (32 * K, "dense"), (M, "dilated")]
        model_points = [(32 * K, "dilated"), (32 * K, "dense")]
        shape = dict(dim=768, num_layers=12, num_heads=12, segment_lengths=segments, dilation_rates=dilations)
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.attention_only:
        model_points = []
    report = {"machine": machine(), "command": " ".join(sys.argv), "dtype": str(dtype), "profiles": []}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / ("gpu_profile_attention.json" if args.attention_only else "gpu_profile.json")
    jobs = [("attention", n, impl, attention_step(n, impl, args.device, dtype, heads, head_dim, segments, dilations))
            for n, impl in attention_points]
    for kind, n, impl, step in jobs + [("model step", n, impl, None) for n, impl in model_points]:
        if step is None:  # built only now: a model holds memory the attention points do not need
            step = model_step(n, impl, args.device, dtype, shape)
        summary, seconds = profiled(step, args.device, warmup=2)
        label = f"{kind}, {impl}, N = {n:,}"
        print_summary(label, summary, seconds)
        report["profiles"].append({"kind": kind, "impl": impl, "n": n, "step_s": seconds, **summary})
        path.write_text(json.dumps(report, indent=2) + "\n")  # after every profile: a time-out keeps the rest
        del step
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
