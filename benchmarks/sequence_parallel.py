"""Sequence-parallel dilated attention: measured on this machine, and bytes per rank at paper scale.

Part 1 (measured): P = 1, 2, 4 gloo processes (one thread each) with a fixed number of tokens per
rank; median time of one forward+backward and the bytes each rank sent/received (comm_stats),
checked against `comm_volume`, the formula the tests check.
Part 2 (computed with `comm_volume`): bytes per rank and layer, forward (backward moves as much
again), for N = 1M .. 1B tokens and P = 8 .. 1024, beside ring attention (every rank receives all
other ranks' K and V, one block per step) and an all-gather of the full K/V (the same volume at once):
2 * (N - N/P) * H * D * el each.

    python3 benchmarks/sequence_parallel.py                      # the full run
    python3 benchmarks/sequence_parallel.py --tokens-per-rank 2048 --repeats 1   # a quick check

Writes benchmarks/results/sequence_parallel.json and .png and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longnet_dist.attention import dilated_attention, segment_spans
from longnet_dist.attention.sequence_parallel import comm_volume
from longnet_dist.distributed import build_mesh, comm_stats
from longnet_dist.distributed.testing import run_multiprocess

RESULTS = Path(__file__).parent / "results"
MIB = 2 ** 20
# Paper-scale model: H=16 heads of D=64 (embed 1024), bf16, one sequence per rank group.
PAPER_MODEL = dict(batch=1, num_heads=16, head_dim=64, element_size=2)
PAPER_TOKENS = [2 ** k for k in range(20, 31, 2)]  # 1M, 4M, 16M, 64M, 256M, 1B
PAPER_RANKS = [2 ** k for k in range(3, 11)]       # 8 .. 1024


def paper_configs(seq_len: int) -> dict[str, tuple[list[int], list[int]]]:
    """Two branch sets. "LM": the paper's LM segment lengths with power-of-two rates (6, 12 do not
    divide power-of-two shards). "geometric": w = 2048 * 2^k up to N with r = 2^k (w/r = 2048
    for every branch: the paper's scheme to reach 1B tokens)."""
    geometric = [2048 * 2 ** k for k in range((seq_len // 2048).bit_length()) if 2048 * 2 ** k <= seq_len]
    return {"LM": ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]),
            "geometric": (geometric, [w // 2048 for w in geometric])}


def paper_scale_table() -> list[dict]:
    rows = []
    H, D, el = PAPER_MODEL["num_heads"], PAPER_MODEL["head_dim"], PAPER_MODEL["element_size"]
    for seq_len in PAPER_TOKENS:
        for ranks in PAPER_RANKS:
            full_kv = 2 * (seq_len - seq_len // ranks) * H * D * el * PAPER_MODEL["batch"]
            row = dict(seq_len=seq_len, ranks=ranks, local_len=seq_len // ranks, ring_bytes=full_kv,
                       all_gather_bytes=full_kv)
            for name, (segs, rates) in paper_configs(seq_len).items():
                volume = comm_volume(local_len=seq_len // ranks, sp_size=ranks, sp_rank=0, segment_lengths=segs,
                                     dilation_rates=rates, **PAPER_MODEL)  # rank 0: always in a full segment
                row[f"longnet_{name}_bytes"] = volume.forward_kv
            rows.append(row)
    return rows


def _bench_worker(rank, world_size, settings):
    torch.manual_seed(rank)
    mesh = build_mesh(world_size)
    l, B, H, D = settings["tokens_per_rank"], settings["batch"], settings["heads"], settings["head_dim"]
    segs, rates = settings["segment_lengths"], settings["dilation_rates"]
    if mesh.sequence_group is not None:
        mesh.sequence_group.prepare_segment_subgroups(segment_spans(l * world_size, world_size, segs))
    dtype = getattr(torch, settings["dtype"])
    q, k, v = (torch.randn(B, l, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, l, H, D, dtype=dtype)
    times, sent, received = [], [], []
    for step in range(settings["repeats"] + 1):  # step 0 warms up (layouts, allocator)
        dist.barrier()
        comm_stats().reset()
        start = time.perf_counter()
        out = dilated_attention(q, k, v, segs, rates, causal=settings["causal"], sequence_group=mesh.sequence_group)
        out.backward(grad)
        elapsed = time.perf_counter() - start
        q.grad = k.grad = v.grad = None
        if step:
            times.append(elapsed)
            sent.append(comm_stats().sent_bytes)
            received.append(comm_stats().received_bytes)
    volume = comm_volume(batch=B, local_len=l, sp_size=world_size, sp_rank=mesh.sp_rank, num_heads=H, head_dim=D,
                         element_size=q.element_size(), segment_lengths=segs, dilation_rates=rates)
    return dict(rank=rank, seconds=times, sent_bytes=sent, received_bytes=received, formula_bytes=volume.total)


def measure(settings: dict) -> list[dict]:
    rows = []
    for ranks in settings["ranks"]:
        per_rank = run_multiprocess(_bench_worker, ranks, settings, timeout=3600)
        for result in per_rank:  # the measured bytes are exactly the formula's, every repeat
            assert set(result["sent_bytes"]) == set(result["received_bytes"]) == {result["formula_bytes"]}, result
        slowest = [max(r["seconds"][i] for r in per_rank) for i in range(settings["repeats"])]
        rows.append(dict(ranks=ranks, seq_len=ranks * settings["tokens_per_rank"],
                         seconds_fwd_bwd=statistics.median(slowest),
                         bytes_per_rank=max(r["formula_bytes"] for r in per_rank),
                         bytes_per_rank_each=[r["formula_bytes"] for r in per_rank]))
        print(f"  P={ranks}: {rows[-1]['seconds_fwd_bwd']:.2f} s, {rows[-1]['bytes_per_rank'] / MIB:.2f} MiB/rank")
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.uname().machine


def machine() -> dict:
    uname = platform.uname()
    return dict(processor=_cpu_model(), uname=f"{uname.system} {uname.release} {uname.machine}",
                cpu_count=os.cpu_count(), torch=torch.__version__, threads_per_rank=1, backend="gloo",
                note="P processes of one thread share cpu_count cores: P > cpu_count is oversubscribed")


def _mib(x: int) -> str:
    return f"{x / MIB:,.1f}" if x else "0"


def print_tables(measured: list[dict], paper: list[dict], settings: dict) -> None:
    print(f"\nMeasured (tokens per rank {settings['tokens_per_rank']}, B={settings['batch']}, H={settings['heads']}, "
          f"D={settings['head_dim']}, {settings['dtype']}, causal={settings['causal']}, "
          f"w={settings['segment_lengths']}, r={settings['dilation_rates']}):")
    print(f"{'P':>3} {'N':>9} {'fwd+bwd s':>10} {'MiB/rank (fwd+bwd, each way)':>30}")
    for row in measured:
        print(f"{row['ranks']:>3} {row['seq_len']:>9} {row['seconds_fwd_bwd']:>10.2f} {_mib(row['bytes_per_rank']):>30}")
    print("\nPaper scale: MiB per rank and layer, forward (backward: the same again); "
          f"H={PAPER_MODEL['num_heads']}, D={PAPER_MODEL['head_dim']}, bf16, B=1")
    for key, title in (("longnet_LM_bytes", "LongNet, w=2048..32768, r=1..16"),
                       ("longnet_geometric_bytes", "LongNet, w=2048*2^k up to N, r=2^k"),
                       ("ring_bytes", "ring attention = all-gather of full K/V")):
        print(f"\n{title}")
        print(f"{'N / P':>12}" + "".join(f"{p:>12}" for p in PAPER_RANKS))
        for seq_len in PAPER_TOKENS:
            cells = {row["ranks"]: row[key] for row in paper if row["seq_len"] == seq_len}
            print(f"{seq_len:>12}" + "".join(f"{_mib(cells[p]):>12}" for p in PAPER_RANKS))


def plot(measured: list[dict], paper: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    styles = (("ring_bytes", "ring / all-gather of full K, V", "k-"),
              ("longnet_geometric_bytes", "LongNet, w up to N, w/r = 2048", "C0-o"),
              ("longnet_LM_bytes", "LongNet, w = 2K..32K, r = 1..16", "C1-s"))
    for ax, (fixed_key, fixed, x_key) in zip(axes[:2], (("ranks", 1024, "seq_len"), ("seq_len", 2 ** 30, "ranks"))):
        rows = [row for row in paper if row[fixed_key] == fixed]
        for key, label, style in styles:
            # 0 bytes (every branch local) cannot be drawn on a log axis: left out
            points = [(row[x_key], row[key] / MIB) for row in rows if row[key]]
            ax.plot([x for x, _ in points], [y for _, y in points], style, label=label)
        ax.set(xscale="log", yscale="log", ylabel="MiB per rank and layer (forward; 0 not drawn)",
               xlabel="sequence length N" if x_key == "seq_len" else "ranks P",
               title=f"P = {fixed}" if fixed_key == "ranks" else "N = 1B tokens")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    ranks = [row["ranks"] for row in measured]
    ax.plot(ranks, [row["seconds_fwd_bwd"] for row in measured], "C2-o", label="forward+backward (s)")
    ax.set(xlabel="processes P (fixed tokens per rank)", ylabel="seconds", xticks=ranks, title="measured, " + title)
    twin = ax.twinx()
    twin.bar(ranks, [row["bytes_per_rank"] / MIB for row in measured], alpha=0.3, color="C3", width=0.4)
    twin.set_ylabel("MiB per rank (fwd+bwd, each way)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-rank", type=int, default=16384)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--segment-lengths", type=int, nargs="+", default=[1024, 4096, 32768, 65536])
    parser.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "sequence_parallel")
    args = parser.parse_args()
    settings = dict(tokens_per_rank=args.tokens_per_rank, ranks=args.ranks, batch=args.batch, heads=args.heads,
                    head_dim=args.head_dim, segment_lengths=args.segment_lengths,
                    dilation_rates=args.dilation_rates, dtype=args.dtype, causal=not args.non_causal,
                    repeats=args.repeats)
    started = time.perf_counter()
    print("measuring on this machine ...")
    measured = measure(settings)
    paper = paper_scale_table()
    print_tables(measured, paper, settings)
    info = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(machine=info, command=" ".join(sys.argv), settings=settings, measured=measured,
                  paper_model=PAPER_MODEL,
                  paper_configs={str(n): paper_configs(n) for n in PAPER_TOKENS}, paper_scale=paper,
                  formula="per spanning branch and rank, each way: (count-1) * 2 * B * (l/r) * H * D * el "
                          "forward and the same backward; ring / full all-gather: 2 * (N - N/P) * H * D * el",
                  wall_seconds=time.perf_counter() - started)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(measured, paper, args.out.with_suffix(".png"),
         f"{info['cpu_count']} CPUs, {args.tokens_per_rank} tokens/rank")
    print(f"\nwrote {args.out.with_suffix('.json')} and .png in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
