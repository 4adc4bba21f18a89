"""One DilatedAttention layer on the CPU: our paths and the official layer (torchscale), side by side.

    python3 benchmarks/cpu_layer.py                                  # about 6 minutes on 2 cores
    python3 benchmarks/cpu_layer.py --torchscale /path/torchscale    # + the official layer, ~9 minutes
    python3 benchmarks/cpu_layer.py --torchscale /path/torchscale --profile   # ops of one 16K fwd+bwd each

E = 256, H = 4 (D = 64), w = 2048, 4096, 8192, r = 1, 2, 4, causal, fp32, batch 1 (aten's CPU flash
kernel), four biased projections, no positions (the official layer's shape without xPos).
"in place" (the default path): whole segments, so each head offset's rows are a strided
view that the kernel reads directly and the merge updates in place, and the nested branches share
keys (attention/nesting.py: the 4096- and 8192-branches score only the keys outside their rows' 2048-
and 4096-segments, the 2048-branch scores the shared ones with a bias). "unshared": in place, every
branch alone (dilated.SHARE_KEYS off). "gather": neither (index_select copies, index_copy merge).
"unpacked": in place, but q, k, v handed over as three views of the fused projection, so autograd's
unbind joins their gradients with a copy (the layer's path until stop 23; it now passes them packed:
functional.packed_dilated_attention).
"torchscale": microsoft/torchscale's DilatedAttention from a source checkout (`--torchscale` or
TORCHSCALE_SRC; see torchscale_layer.py), its flash call on the same aten kernel.
Each point alternates the layers and keeps the best of `--repeats`, so all see the same noise.
Each layer runs in a worker process of its own (same seed, same weights), so one layer's heap is not
shaped by another's: in one shared process glibc served a 64K layer's 64 MiB tensors from the free
heap that the previous layers had left (16-66K page faults instead of 82K), but never a 256K layer's,
so the growth ratio partly measured the neighbours' heap (ours 4.2-4.9 there, 4.1-4.6 in processes of
their own; the spread between runs stays: docs/performance_cpu.md, "Stop 22"). `--one-process` runs them
all in this process, as stops 16-21 did. Also reports forward time(256K) / time(64K) for each (4.0
would be perfectly linear) and the page faults of each best run (a fresh glibc mapping faults every
page it touches). Writes benchmarks/results/cpu_layer[_TAG].json and .png; the JSON's
machine.host_memory names the allocator settings in force (tcmalloc, glibc tunables, THP_MEM_ALLOC_ENABLE).
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, machine, save  # noqa: E402

from longnet_dist.attention import DilatedAttention  # noqa: E402
from longnet_dist.attention import dilated  # noqa: E402
from longnet_dist.attention import layout as layout_module  # noqa: E402

SEGMENTS, DILATIONS, EMBED, HEADS = [2048, 4096, 8192], [1, 2, 4], 256, 4
POINTS = [(16384, True), (65536, True), (65536, False), (262144, False)]  # (N, with backward)
IN_PLACE = layout_module.BranchLayout.in_place
LAYERS = ("in_place", "unshared", "gather", "unpacked")  # ours; "torchscale" with --torchscale


def use_in_place(enabled: bool, shared: bool = True) -> None:
    layout_module.BranchLayout.in_place = IN_PLACE if enabled else property(lambda self: False)
    dilated.SHARE_KEYS = shared


def run_once(forward, n: int, backward: bool) -> tuple[float, int]:
    """(seconds, minor page faults) of one pass."""
    x = torch.randn(1, n, EMBED, requires_grad=backward)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    if backward:
        forward(x).sum().backward()
    else:
        with torch.no_grad():
            forward(x)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def layers(torchscale_src: str | None) -> dict:
    """name -> forward function, each with its own weights (same shapes)."""
    torch.manual_seed(0)
    ours = DilatedAttention(EMBED, HEADS, SEGMENTS, DILATIONS, causal=True, rotary=False, bias=True)

    def path(in_place: bool, shared: bool = True):
        def forward(x):
            use_in_place(in_place, shared)
            return ours(x)
        return forward

    def unpacked(x):  # q, k, v as three views: autograd's unbind stacks dq, dk, dv (a copy)
        use_in_place(True)
        qkv = ours.qkv(x).view(*x.shape[:2], 3, HEADS, EMBED // HEADS)
        return ours.out(ours.attend(*qkv.unbind(2)).flatten(2))

    found = {"in_place": path(True), "unshared": path(True, shared=False), "gather": path(False),
             "unpacked": unpacked}
    if torchscale_src:
        from torchscale_layer import torchscale_layer

        found["torchscale"] = torchscale_layer(torchscale_src, EMBED, HEADS, SEGMENTS, DILATIONS)[1]
    return found


def _serve(name: str, torchscale_src: str | None, connection) -> None:
    """A worker process: builds the layers, then times `name` for each (n, backward) it receives until None."""
    forward = layers(torchscale_src)[name]
    run_once(forward, 4096, True)  # warm-up
    connection.send("ready")
    while (job := connection.recv()) is not None:
        connection.send(run_once(forward, *job))


class Worker:
    """One layer timed in a process of its own: `worker(n, backward)` -> (seconds, minor page faults)."""

    def __init__(self, name: str, torchscale_src: str | None):
        context = multiprocessing.get_context("spawn")
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(name, torchscale_src, theirs), daemon=True)
        self.process.start()
        if self.connection.recv() != "ready":
            raise RuntimeError(f"the {name} worker did not start")

    def __call__(self, n: int, backward: bool) -> tuple[float, int]:
        self.connection.send((n, backward))
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def timers(names: list[str], torchscale_src: str | None, one_process: bool) -> dict:
    """name -> a function (n, backward) -> (seconds, page faults) of one pass."""
    if not one_process:
        # only the torchscale worker builds torchscale's layer (ours is built first in every process, so its
        # weights are the same either way)
        return {name: Worker(name, torchscale_src if name == "torchscale" else None) for name in names}
    found = layers(torchscale_src)
    for name in names:
        run_once(found[name], 4096, True)  # warm-up
    return {name: functools.partial(run_once, found[name]) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="only print a torch.profiler table of one 16K forward+backward per layer (ops by self time)")
    parser.add_argument("--torchscale", default=os.environ.get("TORCHSCALE_SRC"),
                        help="root of a microsoft/torchscale checkout (default: $TORCHSCALE_SRC; omitted: not compared)")
    parser.add_argument("--layers", nargs="+", choices=[*LAYERS, "torchscale"],
                        help="time only these (default: all found)")
    parser.add_argument("--one-process", action="store_true",
                        help="time every layer in this process (their allocations then shape each other's heap)")
    parser.add_argument("--tag", default="", help="write cpu_layer_TAG.json / .png")
    args = parser.parse_args()
    if args.profile:
        found = layers(args.torchscale)
        return profile({k: v for k, v in found.items() if not args.layers or k in args.layers})
    names = [k for k in (*LAYERS, "torchscale")
             if (k != "torchscale" or args.torchscale) and (not args.layers or k in args.layers)]
    compared = timers(names, args.torchscale, args.one_process)
    points = []
    # in place / each, when both ran
    ratios = {"ratio": "gather", "ratio_vs_unshared": "unshared", "ratio_vs_unpacked": "unpacked",
              "ratio_vs_torchscale": "torchscale"}
    ratios = {key: other for key, other in ratios.items() if {"in_place", other} <= compared.keys()}
    print(f"{'N':>8} {'pass':8} " + " ".join(f"{name + ' s':>12} {'faults':>8}" for name in compared)
          + "".join(f" {'in place/' + other:>20}" for other in ratios.values()))
    for n, backward in POINTS:
        best = dict.fromkeys(compared, (float("inf"), 0))
        for _ in range(args.repeats):
            for name, timer in compared.items():
                best[name] = min(best[name], timer(n, backward))
        point = {"n": n, "pass": "forward+backward" if backward else "forward",
                 **{f"{k}_s": v[0] for k, v in best.items()}, **{f"{k}_page_faults": v[1] for k, v in best.items()},
                 **{key: best["in_place"][0] / best[other][0] for key, other in ratios.items()}}
        points.append(point)
        print(f"{n:>8} {point['pass'][:8]:8} " + " ".join(f"{t:12.3f} {f:8d}" for t, f in best.values())
              + "".join(f" {point[key]:20.3f}" for key in ratios), flush=True)
    for timer in compared.values():
        getattr(timer, "close", lambda: None)()
    forward = {p["n"]: p for p in points if p["pass"] == "forward"}
    growth = {name: forward[262144][f"{name}_s"] / forward[65536][f"{name}_s"] for name in compared}
    print("forward time(256K) / time(64K): " + ", ".join(f"{k} {v:.2f}" for k, v in growth.items()))
    host = machine()
    name = "cpu_layer" + (f"_{args.tag}" if args.tag else "")
    path = save(name, {"machine": host, "segments": SEGMENTS, "dilations": DILATIONS, "embed_dim": EMBED,
                              "heads": HEADS, "dtype": "float32", "causal": True, "rotary": False, "bias": True,
                              "repeats": args.repeats, "processes": "one" if args.one_process else "one per layer",
                              "torchscale": torchscale_revision(args.torchscale),
                              "command": " ".join(sys.argv), "allocator": os.environ.get("LD_PRELOAD") or "glibc",
                              "points": points, "forward_growth_256k_over_64k": growth})
    plot(points, host, list(compared), name)
    print(f"wrote {path} and {RESULTS / (name + '.png')}")


def profile(compared: dict, n: int = 16384) -> None:
    """Where one forward+backward's time goes, per layer: ops by self CPU time (aten's flash kernel
    forward and backward, the projections' matmuls, gathers, copies)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for name, forward in compared.items():
        run_once(forward, 4096, True)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run_once(forward, n, True)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{name}: {total / 1e6:.3f} s of ops, N = {n}, forward+backward")
        for event in events[:8]:
            print(f"  {event.self_cpu_time_total / 1e3:9.1f} ms {100 * event.self_cpu_time_total / total:5.1f}%  "
                  f"x{event.count:<3} {event.key[:70]}")


def torchscale_revision(src: str | None) -> str | None:
    """The checkout's commit (or its path when it is not a git work tree)."""
    if not src:
        return None
    import subprocess

    result = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else str(src)


def plot(points: list[dict], host: dict, names: list[str], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['n'] // 1024}K {p['pass']}" for p in points]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = range(len(points))
    bars = [("in_place", "ours: rows read in place, nested branches share keys"),
            ("unshared", "ours, rows read in place, every branch alone"), ("gather", "ours, rows gathered"),
            ("unpacked", "ours, in place, gradients joined by unbind"),
            ("torchscale", "torchscale (same aten kernel)")]
    bars = [(key, label) for key, label in bars if key in names]
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [p[f"{key}_s"] for p in points], width, label=label)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("seconds (best of repeats)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"One DilatedAttention layer, E={EMBED}, H={HEADS}, fp32, causal - {host['cpu']}, {host['cores']} cores",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
