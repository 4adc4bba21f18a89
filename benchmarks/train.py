"""Training throughput of the `small` model at long sequence lengths, and the longest step that fits.

Runs the real trainer (`python -m longnet_dist.train`, DeepSpeed engine, activation checkpointing,
the `long` branches: segments up to the whole sequence) for each sequence length, with 1 process
(all cores) and with 2 processes splitting the sequence (sp=2, one thread each). A length that fails
ends the climb for that process count; the last one that ran is the longest sequence one training
step handles on this machine. Failures: out of memory (each process's data segment is capped at 90%
of the available memory / processes, so an allocation fails cleanly instead of waking the OOM
killer), or past --timeout.
Tokens/s and MFU are those of the last step (the first carries one-time warm-up costs when
--steps > 1). MFU uses the model FLOPs of longnet_dist.model.flops_per_token against the fp32
matmul peak of the whole machine, measured here first (so 2 processes share that peak).

    python3 benchmarks/train.py                                   # full: 16K, 64K, 256K, 512K, 1M tokens
    python3 benchmarks/train.py --seq-lens 4096 8192 --tag smoke  # a quick check

Writes benchmarks/results/train{_tag}.json and .png and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
from common import RESULTS, human, machine, save  # noqa: E402

from longnet_dist.distributed.testing import free_port  # noqa: E402
DEFAULT_SEQ_LENS = [16384, 65536, 262144, 524288, 1048576]


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def memory_limiter(limit_bytes: int):
    """preexec_fn capping each process's data segment: an allocation past it fails inside torch
    ("can't allocate memory") instead of waking the kernel's OOM killer on a shared machine."""
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    return apply


def measure_matmul_peak(threads: int, seconds: float = 3.0) -> float:
    """Best FLOP/s of a 2048^3 fp32 matmul with `threads` threads (the MFU denominator)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - start))
    return best


def run_trainer(seq_len: int, nproc: int, steps: int, peak_flops: float, timeout: float) -> dict:
    """One trainer run; returns its last metrics record (+ status) or the failure."""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_train_") as output_dir:
        overrides = [
            "model=small", "attention=long", "model.activation_checkpointing=true", f"data.seq_len={seq_len}",
            f"trainer.max_steps={steps}", f"trainer.warmup_steps={steps}", "trainer.log_every=1",
            "trainer.eval_every=0", "trainer.keep_last_checkpoints=1", f"trainer.save_every={steps}",
            f"trainer.num_threads={max(1, cores // nproc)}", f"trainer.peak_flops={peak_flops / nproc}",
            f"distributed.sequence_parallel_size={nproc}", "logger=none", "resume=null",
            f"trainer.output_dir={output_dir}",
        ]
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                         "--master_port", str(free_port())]
        env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=str(max(1, cores // nproc)),
                   PYTHONPATH=str(REPO))
        started = time.perf_counter()
        limit = int(0.9 * available_memory_bytes() / nproc)  # per process (torchrun's children inherit it)
        try:
            result = subprocess.run([*launcher, "-m", "longnet_dist.train", *overrides], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=timeout,
                                    preexec_fn=memory_limiter(limit))
        except subprocess.TimeoutExpired:
            return {"status": f"timeout after {timeout:.0f} s"}
        wall = time.perf_counter() - started
        metrics = Path(output_dir) / "metrics.jsonl"
        if result.returncode != 0 or not metrics.exists():
            log = result.stdout + result.stderr
            out_of_memory = result.returncode in (-9, 137) or "can't allocate memory" in log or "out of memory" in log
            return {"status": "out of memory" if out_of_memory else f"failed (exit {result.returncode})",
                    "memory_limit_per_process": limit, "log_tail": log[-1500:]}
        last = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line][-1]
        return {"status": "ok", "wall_s": wall, "memory_limit_per_process": limit, **last}


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for nproc in sorted({row["processes"] for row in rows}):
        done = [row for row in rows if row["processes"] == nproc and row["status"] == "ok"]
        if not done:
            continue
        lengths = [row["seq_len"] for row in done]
        label = "1 process" if nproc == 1 else f"{nproc} processes (sp={nproc})"
        axes[0].plot(lengths, [row["tokens_per_s"] for row in done], "o-", label=label)
        axes[1].plot(lengths, [100 * row["mfu"] for row in done], "o-", label=label)
        axes[2].plot(lengths, [row["peak_mem_bytes"] / 2 ** 30 for row in done], "o-", label=label)
    for axis, ylabel in zip(axes, ("tokens / s", "MFU (%)", "peak memory per process (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=DEFAULT_SEQ_LENS)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per run (the last is reported)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. smoke)")
    args = parser.parse_args()

    host = machine()
    peak = measure_matmul_peak(threads=os.cpu_count() or 1)
    rows = []
    for nproc in args.processes:
        for seq_len in sorted(args.seq_lens):
            print(f"seq_len {seq_len:>8}, {nproc} process(es) ...", flush=True)
            measured = run_trainer(seq_len, nproc, args.steps, peak, args.timeout)
            row = {"seq_len": seq_len, "processes": nproc, **measured}
            rows.append(row)
            if row["status"] != "ok":
                print(f"  {row['status']}; not trying longer sequences with {nproc} process(es)")
                break
    longest = {nproc: max((r["seq_len"] for r in rows if r["processes"] == nproc and r["status"] == "ok"), default=0)
               for nproc in args.processes}

    name = f"train_{args.tag}" if args.tag else "train"
    machine_line = f"{host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB ({host['platform']})"
    payload = {"benchmark": "trainer throughput, model=small attention=long, activation checkpointing",
               "machine": host, "peak_flops_measured": peak, "steps_per_run": args.steps, "rows": rows,
               "longest_seq_len_by_processes": longest}
    json_path = save(name, payload)
    plot(rows, f"LongNet small, training step throughput - {machine_line}", RESULTS / f"{name}.png")

    print(f"\nmachine: {machine_line}; fp32 matmul peak measured {human(peak, 'FLOP/s')}")
    print(f"{'seq_len':>9} {'procs':>5} {'status':>14} {'tokens/s':>9} {'MFU':>7} {'step s':>8} {'peak mem/proc':>13}")
    for row in rows:
        if row["status"] == "ok":
            print(f"{row['seq_len']:>9} {row['processes']:>5} {'ok':>14} {row['tokens_per_s']:>9.0f} "
                  f"{100 * row['mfu']:>6.2f}% {row['seq_len'] / row['tokens_per_s']:>8.1f} "
                  f"{row['peak_mem_bytes'] / 2 ** 30:>10.2f} GiB")
        else:
            print(f"{row['seq_len']:>9} {row['processes']:>5} {row['status']:>14}")
    for nproc, length in longest.items():
        print(f"longest training step with {nproc} process(es): {length:,} tokens")
    print(f"wrote {json_path} and {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
