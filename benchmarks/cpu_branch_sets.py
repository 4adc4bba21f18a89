"""Dilated attention on the CPU for the project's branch sets: rows read in place against rows gathered.

    python3 benchmarks/cpu_branch_sets.py                        # about 5 minutes on 2 cores
    python3 benchmarks/cpu_branch_sets.py --n 60000 --tag ragged  # every branch with a ragged last segment

One attention (no projections), N = 65536, H = 12, D = 64 (the paper's head shape), fp32, causal, batch 1,
aten's CPU flash kernel. Branch sets: the paper's (r = 6, 12 do not divide w), `attention=long`'s first
three (the cost model keeps them unshared), and powers of two (they nest and share keys). "in place" is the
default path: with whole segments each head offset's rows are strided views of q, k, v (r dividing w or
not), the forward merges into them in place and the backward copies per kernel call and adds its gradients
back through them (a ragged last segment as a chunk of its own). "gathered" is the older path, which aten's
CUDA kernels still take in sharded runs: index_select copies of every branch's rows, index_add of the
gradients, and no shared keys. The two alternate within each repeat, best
of `--repeats`; the forward is timed alone too. Writes benchmarks/results/cpu_branch_sets[_TAG].json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, machine, save  # noqa: E402
from cpu_layer import use_in_place  # noqa: E402

from longnet_dist.attention import dilated_attention  # noqa: E402

BRANCH_SETS = {  # name -> (segment lengths, dilation rates)
    "paper": ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]),
    "long (to 32K)": ([2048, 8192, 32768], [1, 4, 16]),
    "powers of 2": ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]),
}
PATHS = {"in_place": True, "gathered": False}


def run_once(segments: list[int], dilations: list[int], n: int, heads: int, backward: bool) -> float:
    q, k, v = (torch.randn(1, n, heads, 64, requires_grad=backward) for _ in range(3))
    start = time.perf_counter()
    if backward:
        dilated_attention(q, k, v, segments, dilations, causal=True).sum().backward()
    else:
        with torch.no_grad():
            dilated_attention(q, k, v, segments, dilations, causal=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="", help="write cpu_branch_sets_TAG.json / .png")
    args = parser.parse_args()
    torch.manual_seed(0)
    run_once([512], [1], 4096, args.heads, True)  # warm-up
    rows = []
    print(f"{'branches':16} {'pass':17} {'in place s':>11} {'gathered s':>11} {'in place / gathered':>20}")
    for name, (segments, dilations) in BRANCH_SETS.items():
        for backward in (False, True):
            best = dict.fromkeys(PATHS, float("inf"))
            for _ in range(args.repeats):
                for path, in_place in PATHS.items():
                    use_in_place(in_place)
                    best[path] = min(best[path], run_once(segments, dilations, args.n, args.heads, backward))
            use_in_place(True)
            row = {"branches": name, "segment_lengths": segments, "dilation_rates": dilations,
                   "pass": "forward+backward" if backward else "forward", **{f"{k}_s": v for k, v in best.items()},
                   "ratio": best["in_place"] / best["gathered"]}
            rows.append(row)
            print(f"{name:16} {row['pass']:17} {best['in_place']:11.3f} {best['gathered']:11.3f} {row['ratio']:20.3f}",
                  flush=True)
    host = machine()
    name = "cpu_branch_sets" + (f"_{args.tag}" if args.tag else "")
    path = save(name, {"machine": host, "n": args.n, "heads": args.heads, "head_dim": 64,
                                    "dtype": "float32", "causal": True, "repeats": args.repeats,
                                    "command": " ".join(sys.argv), "rows": rows})
    plot(rows, host, args, name)
    print(f"wrote {path} and {RESULTS / (name + '.png')}")


def plot(rows: list[dict], host: dict, args, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    xs = range(len(rows))
    for i, (path, label) in enumerate([("in_place", "rows read in place"), ("gathered", "rows gathered")]):
        ax.bar([x + (i - 0.5) * 0.4 for x in xs], [r[f"{path}_s"] for r in rows], 0.4, label=label)
    ax.set_xticks(list(xs), [f"{r['branches']}\n{r['pass']}" for r in rows], fontsize=7)
    ax.set_ylabel("seconds (best of repeats)")
    ax.legend(fontsize=8)
    ax.set_title(f"Dilated attention, N={args.n:,}, H={args.heads}, D=64, fp32, causal - {host['cpu']}, "
                 f"{host['cores']} cores", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
