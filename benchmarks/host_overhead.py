"""Host time of one fused dilated-attention forward+backward (bf16, H = 12, D = 64, the paper's branches,
causal): what the CPU spends issuing a layer's launches, which paces the GPU where the kernels are short
(N = 32K on an H200: 2.86 ms of kernels in a 3.97 ms step, stop 28).

  python3 benchmarks/host_overhead.py            # CPU: the launches stubbed out, our Python alone
  python3 benchmarks/host_overhead.py --device cuda [--n 32768] [--cprofile 50]
                                                 # GPU: real launches; host time to issue, the step's wall,
                                                 # the same step replayed as a CUDA graph, the host by function

On the CPU every Triton kernel is replaced by a stub that only counts its launches, so what is timed is the
Python around them (planning, views, strides, allocations, autograd); the figure is the minimum over --blocks
blocks of --calls calls (the VM is shared: the minimum is the least disturbed). On a GPU each call starts on an
idle GPU: its host time runs from the call to the return of the backward (the launches queued), its wall time
to the end of the last kernel, medians over --calls * --blocks calls; when the two are close, the host sets the
pace. The same call captured once as a CUDA graph and replayed is the GPU's time with no host in the way. Writes benchmarks/results/host_overhead_<device>[_<tag>].json;
an older checkout's figure: PYTHONPATH=<that checkout> python3 benchmarks/host_overhead.py --tag before.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

BRANCHES = [(2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]
HEADS, HEAD_DIM = 12, 64
WARMUP = 5  # untimed calls before the timed blocks


class _Stub:
    """A kernel's stand-in: `kernel[grid](...)` counts the launch and does nothing."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


def stub_kernels() -> dict[str, _Stub]:
    """Replace every Triton kernel the fused path launches by a _Stub (and let TMA paths run as on a GPU)."""
    from longnet_dist.attention import fused_launch
    from longnet_dist.attention.kernels import triton_dilated, triton_rows

    stubs = {}
    for module, names in ((triton_dilated, ("_fwd", "_bwd_dkdv", "_bwd_dq")),
                          (triton_rows, ("_bwd_prep", "_store_heads", "_merge_chains"))):
        for name in names:
            stubs[name] = _Stub()
            setattr(module, name, stubs[name])
    fused_launch._tma_ready = lambda device: True
    return stubs


def timed(fn, calls: int, blocks: int) -> float:
    """Minimum over `blocks` of the mean seconds of `calls` calls of fn (the CPU, kernels stubbed out)."""
    for _ in range(WARMUP):
        fn()
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def issue_and_wall(fn, calls: int, blocks: int) -> tuple[float, float]:
    """(host, wall): medians over calls * blocks calls of fn, each started on an idle GPU, of the seconds until
    fn returns (its launches queued) and until the GPU has finished them."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    issued, finished = [], []
    for _ in range(calls * blocks):
        start = time.perf_counter()
        fn()
        issued.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        finished.append(time.perf_counter() - start)
    return statistics.median(issued), statistics.median(finished)


def graph_wall(fn, calls: int) -> float:
    """Median seconds of one replay of fn captured as a CUDA graph: the GPU's time with no host in the way
    (the kernels' floor that host trims can approach)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_by_function(fn, calls: int, sync, top: int = 30) -> list[dict]:
    """cProfile over `calls` calls of fn (synchronised once, after them): the `top` functions by own time,
    in µs and calls per fn() call. cProfile slows Python down, so these are shares, not exact figures."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    sync()
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, ...)
    rows = [{"function": f"{Path(file).name}:{line} {name}", "us_per_call": own / calls * 1e6,
             "cumulative_us_per_call": cumulative / calls * 1e6, "calls_per_call": count / calls}
            for (file, line, name), (_, count, own, cumulative, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["us_per_call"])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=None, help="sequence length (default: 256 on the CPU, 32768 on CUDA)")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--cprofile", type=int, default=0, metavar="CALLS",
                        help="also profile CALLS calls with cProfile: the host's time by function, per call")
    parser.add_argument("--tag", default="", help="results go to host_overhead_<device>[_<tag>].json")
    args = parser.parse_args()
    from longnet_dist.attention.fused import fused_dilated_attention

    stubs = stub_kernels() if args.device == "cpu" else {}
    n = args.n or (256 if args.device == "cpu" else 32768)
    q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=args.device, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def fwd_bwd():
        out = fused_dilated_attention(q, k, v, BRANCHES, True, HEAD_DIM ** -0.5, None)
        torch.autograd.grad(out, (q, k, v), grad)

    def nothing():
        pass

    cuda = args.device == "cuda"
    if cuda:  # each call issued on an idle GPU: the time to return (host) and to finish (wall)
        host, wall = issue_and_wall(fwd_bwd, args.calls, args.blocks)
        row = {"n": n, "host_s": host, "wall_s": wall}
        try:
            row["graph_wall_s"] = graph_wall(fwd_bwd, args.calls)
        except Exception as error:  # a capture failure must not lose the host figures
            row["graph_error"] = f"{type(error).__name__}: {error}"[:300]
    else:
        host = timed(fwd_bwd, args.calls, args.blocks)
        launches = {name: stub.launches for name, stub in stubs.items() if stub.launches}
        row = {"n": n, "host_s": host, "launches_per_call": sum(launches.values()) / (WARMUP + args.calls * args.blocks)}
    if args.cprofile:
        row["host_by_function"] = host_by_function(fwd_bwd, args.cprofile, torch.cuda.synchronize if cuda else nothing)
    print(f"N = {n}: host {host * 1e6:.0f} us per fwd+bwd"
          + (f", wall {row['wall_s'] * 1e6:.0f} us, replayed as one CUDA graph "
             f"{row['graph_wall_s'] * 1e6 if 'graph_wall_s' in row else float('nan'):.0f} us" if cuda else
             f" with the launches stubbed out ({row['launches_per_call']:.0f} launches each)"))
    for entry in row.get("host_by_function", [])[:12]:
        print(f"   {entry['us_per_call']:8.1f} us {entry['calls_per_call']:6.1f}x  {entry['function']}")
    payload = {"machine": machine(), "command": " ".join(sys.argv), "branches": BRANCHES, "heads": HEADS,
               "head_dim": HEAD_DIM, "dtype": "bfloat16", "device": args.device, **row}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"host_overhead_{args.device}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
