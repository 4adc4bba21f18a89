"""One DilatedAttention layer on the CPU: rows read in place vs gathered, measured side by side.

    python3 benchmarks/cpu_layer.py            # about 4 minutes on 2 cores

E = 256, H = 4 (D = 64), w = 2048, 4096, 8192, r = 1, 2, 4, causal, fp32, batch 1 (aten's CPU flash
kernel). "in place": whole segments with r | w, so each head offset's rows are a strided view that
the kernel reads directly and the merge updates in place (the forward; the backward gathers).
"gather": the same layer with that path switched off (index_select copies, index_copy merge).
Each point alternates the two paths and keeps the best of `--repeats`, so both see the same noise.
Also reports forward time(256K) / time(64K) for each path (4.0 would be perfectly linear).
Writes benchmarks/results/cpu_layer.json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, machine, save  # noqa: E402

from longnet_dist.attention import DilatedAttention  # noqa: E402
from longnet_dist.attention import layout as layout_module  # noqa: E402

SEGMENTS, DILATIONS, EMBED, HEADS = [2048, 4096, 8192], [1, 2, 4], 256, 4
POINTS = [(16384, True), (65536, True), (65536, False), (262144, False)]  # (N, with backward)
IN_PLACE = layout_module.BranchLayout.viewable


def use_in_place(enabled: bool) -> None:
    layout_module.BranchLayout.viewable = IN_PLACE if enabled else property(lambda self: False)


def run_once(layer: DilatedAttention, n: int, backward: bool) -> float:
    x = torch.randn(1, n, EMBED, requires_grad=backward)
    start = time.perf_counter()
    if backward:
        layer(x).sum().backward()
    else:
        with torch.no_grad():
            layer(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = DilatedAttention(EMBED, HEADS, SEGMENTS, DILATIONS, causal=True)
    run_once(layer, 4096, True)  # warm-up
    points = []
    print(f"{'N':>8} {'pass':8} {'in place s':>11} {'gather s':>9} {'ratio':>6}")
    for n, backward in POINTS:
        best = {"in_place": float("inf"), "gather": float("inf")}
        for _ in range(args.repeats):
            for path in best:
                use_in_place(path == "in_place")
                best[path] = min(best[path], run_once(layer, n, backward))
        use_in_place(True)
        point = {"n": n, "pass": "forward+backward" if backward else "forward", **{f"{k}_s": v for k, v in best.items()},
                 "ratio": best["in_place"] / best["gather"]}
        points.append(point)
        print(f"{n:>8} {point['pass'][:8]:8} {best['in_place']:11.3f} {best['gather']:9.3f} {point['ratio']:6.3f}",
              flush=True)
    forward = {p["n"]: p for p in points if p["pass"] == "forward"}
    growth = {path: forward[262144][f"{path}_s"] / forward[65536][f"{path}_s"] for path in ("in_place", "gather")}
    print("forward time(256K) / time(64K): " + ", ".join(f"{k} {v:.2f}" for k, v in growth.items()))
    host = machine()
    path = save("cpu_layer", {"machine": host, "segments": SEGMENTS, "dilations": DILATIONS, "embed_dim": EMBED,
                              "heads": HEADS, "dtype": "float32", "causal": True, "repeats": args.repeats,
                              "command": " ".join(sys.argv), "points": points, "forward_growth_256k_over_64k": growth})
    plot(points, host)
    print(f"wrote {path} and {RESULTS / 'cpu_layer.png'}")


def plot(points: list[dict], host: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['n'] // 1024}K {p['pass']}" for p in points]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = range(len(points))
    ax.bar([x - 0.2 for x in xs], [p["in_place_s"] for p in points], 0.4, label="rows read in place")
    ax.bar([x + 0.2 for x in xs], [p["gather_s"] for p in points], 0.4, label="rows gathered")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("seconds (best of repeats)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"One DilatedAttention layer, E={EMBED}, H={HEADS}, fp32, causal - {host['cpu']}, {host['cores']} cores",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "cpu_layer.png", dpi=120)


if __name__ == "__main__":
    main()
