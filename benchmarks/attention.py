"""Dilated attention vs dense flash attention on this machine: time, FLOP/s and peak memory.

    python benchmarks/attention.py                # full sweep, N = 4K .. 1M (about 30 min on 2 cores)
    python benchmarks/attention.py --max-n 65536  # quick look

Each (kernel, N, causal) point runs in a fresh process so that its peak memory (max RSS above a
warm-up baseline) is its own. FLOPs count only the multiply-adds the algorithm needs: per branch and
head, 4 * pairs * D forward over the (query, key) pairs it scores (LONGNET.md "Cost"), and 2.5x that
for the backward pass. Writes benchmarks/results/attention.json and attention.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, human, machine, save, style_log2_axis, timed  # noqa: E402

SEGMENTS = [2048, 4096, 8192, 16384, 32768]
DILATIONS = [1, 2, 4, 8, 16]
HEADS, HEAD_DIM = 4, 64
BACKWARD_FACTOR = 2.5  # the backward pass runs 5 matmuls to the forward's 2


def attention_flops(kind: str, n: int, causal: bool) -> float:
    from longnet_dist.attention.kernels import dense_flops, dilated_flops

    if kind == "dense":
        return dense_flops(n, n, HEADS, HEAD_DIM, causal)
    return dilated_flops(n, HEADS, HEAD_DIM, SEGMENTS, DILATIONS, causal)


def child(kind: str, n: int, causal: bool, repeats: int) -> dict:
    """One measurement point, run in its own process."""
    import torch

    from longnet_dist.attention import dilated_attention
    from longnet_dist.train.metrics import peak_rss_bytes

    def make(length):
        return [torch.randn(1, length, HEADS, HEAD_DIM, requires_grad=True) for _ in range(3)]

    def forward(q, k, v):
        if kind == "dense":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal)[0]
        return dilated_attention(q, k, v, SEGMENTS, DILATIONS, causal=causal)

    def forward_backward(q, k, v):
        forward(q, k, v).sum().backward()

    forward_backward(*make(4096))  # warm-up: thread pools and allocator arenas go into the baseline
    base = peak_rss_bytes()
    q, k, v = make(n)
    fwd_bwd = timed(lambda: forward_backward(q, k, v))  # first: its peak is the one we report
    peak = peak_rss_bytes() - base
    with torch.no_grad():
        fwd = timed(lambda: forward(q, k, v), repeats)
    if repeats > 1:
        fwd_bwd = min(fwd_bwd, timed(lambda: forward_backward(q, k, v), repeats - 1))
    flops = attention_flops(kind, n, causal)
    return {"kind": kind, "n": n, "causal": causal, "forward_s": fwd, "forward_backward_s": fwd_bwd,
            "peak_bytes": peak, "forward_flops": flops, "forward_flops_per_s": flops / fwd,
            "forward_backward_flops_per_s": flops * (1 + BACKWARD_FACTOR) / fwd_bwd}


def run_point(kind: str, n: int, causal: bool, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(n), "--repeats", str(repeats)]
    if causal:
        cmd.append("--causal")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"kind": kind, "n": n, "causal": causal, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, causal in sorted({(p["kind"], p["causal"]) for p in points if "error" not in p}):
        rows = sorted((p for p in points if p["kind"] == kind and p["causal"] == causal and "error" not in p),
                      key=lambda p: p["n"])
        label = f"{kind} ({'causal' if causal else 'bidirectional'})"
        ns = [p["n"] for p in rows]
        ax_time.plot(ns, [p["forward_backward_s"] for p in rows], marker="o", label=label + " fwd+bwd")
        ax_mem.plot(ns, [p["peak_bytes"] / 2**30 for p in rows], marker="o", label=label)
    style_log2_axis(ax_time, "seconds", log_y=True)
    style_log2_axis(ax_mem, "peak memory above baseline (GiB)", log_y=True)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarize(points: list[dict]) -> dict:
    """The issue's targets, from the measured points."""
    def get(kind, n, causal):
        return next((p for p in points if p["kind"] == kind and p["n"] == n and p["causal"] == causal
                     and "error" not in p), None)

    targets = {}
    for causal in (False, True):
        tag = "causal" if causal else "bidirectional"
        dil, den = get("dilated", 32768, causal), get("dense", 32768, causal)
        if dil and den:
            targets[f"flops_ratio_32k_{tag}"] = dil["forward_flops_per_s"] / den["forward_flops_per_s"]
            targets[f"flops_ratio_32k_fwd_bwd_{tag}"] = (dil["forward_backward_flops_per_s"]
                                                         / den["forward_backward_flops_per_s"])
        small, large = get("dilated", 65536, causal), get("dilated", 262144, causal)
        if small and large:
            targets[f"time_ratio_256k_over_64k_{tag}"] = large["forward_backward_s"] / small["forward_backward_s"]
        million = get("dilated", 1 << 20, causal)
        if million:
            targets[f"million_forward_backward_s_{tag}"] = million["forward_backward_s"]
            targets[f"million_peak_gib_{tag}"] = million["peak_bytes"] / 2**30
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-n", type=int, default=4096)
    parser.add_argument("--max-n", type=int, default=1 << 20)
    parser.add_argument("--dense-max-n", type=int, default=32768, help="largest N for dense flash attention")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many timed runs per point")
    parser.add_argument("--modes", default="bidirectional,causal")
    parser.add_argument("--tag", default="", help="results go to attention_<tag>.json/png")
    parser.add_argument("--child", choices=["dilated", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--causal", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.causal, args.repeats)))
        return

    host = machine()
    print(f"machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB, torch {host['torch']}")
    print(f"config: segments {SEGMENTS}, dilations {DILATIONS}, H={HEADS}, D={HEAD_DIM}, fp32, batch 1")
    print(f"{'kernel':8} {'mode':13} {'N':>8} {'fwd s':>8} {'fwd+bwd s':>10} {'fwd FLOP/s':>11} "
          f"{'f+b FLOP/s':>11} {'peak':>9}")
    points = []
    for mode in args.modes.split(","):
        causal = mode == "causal"
        n = args.min_n
        while n <= args.max_n:
            kinds = ["dilated"] + (["dense"] if n <= args.dense_max_n else [])
            for kind in kinds:
                p = run_point(kind, n, causal, args.repeats)
                points.append(p)
                if "error" in p:
                    print(f"{kind:8} {mode:13} {n:>8} failed: {p['error']}")
                    continue
                print(f"{kind:8} {mode:13} {n:>8} {p['forward_s']:8.3f} {p['forward_backward_s']:10.3f} "
                      f"{human(p['forward_flops_per_s']):>11} {human(p['forward_backward_flops_per_s']):>11} "
                      f"{human(p['peak_bytes'], 'B'):>9}", flush=True)
            n *= 2
    targets = summarize(points)
    for key, value in targets.items():
        print(f"{key}: {value:.3f}")
    name = f"attention_{args.tag}" if args.tag else "attention"
    path = save(name, {"machine": host, "segments": SEGMENTS, "dilations": DILATIONS, "heads": HEADS,
                              "head_dim": HEAD_DIM, "dtype": "float32", "repeats": args.repeats,
                              "command": " ".join(sys.argv), "points": points, "targets": targets})
    plot(points, RESULTS / f"{name}.png",
         f"LongNet dilated vs dense flash attention, one layer, H={HEADS}, D={HEAD_DIM}, fp32 - "
         f"{host['cpu']}, {host['cores']} cores")
    print(f"wrote {path} and {RESULTS / name}.png")


if __name__ == "__main__":
    main()
