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
(`longnet_dist.train.profiling.category`, as the trainer's `trainer.profile_step` groups them): the
dilated kernels one by one, dense flash, matmuls, compiled regions, elementwise,
reductions, copies and fills, the optimizer; and by branch (the kernels inside each
`kernels.branch_range`, "dilated fwd w=2048 r=1"). Prints per profile the milliseconds per category,
per branch and the top kernels; writes benchmarks/results/gpu_profile.json (or --results/gpu_profile.json;
gpu_profile_attention.json with --attention-only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, machine  # noqa: E402

from longnet_dist.attention import dilated_attention  # noqa: E402
from longnet_dist.model import LongNetConfig, LongNetLM  # noqa: E402
from longnet_dist.train import profiling  # noqa: E402

SEGMENTS, DILATIONS = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]
K, M = 1024, 1024 * 1024


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
    with profiling.profiled(torch.device(device)) as found:
        step()
    return found["summary"], seconds


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
        print("\n" + profiling.format_summary(label + " (the time per step unprofiled)", summary, seconds))
        report["profiles"].append({"kind": kind, "impl": impl, "n": n, "step_s": seconds, **summary})
        path.write_text(json.dumps(report, indent=2) + "\n")  # after every profile: a time-out keeps the rest
        del step
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
