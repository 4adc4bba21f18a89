"""Training throughput of the real trainer at long sequence lengths, on the CPU or on one GPU.

Runs `python -m longnet_dist.train` (DeepSpeed engine, activation checkpointing) once per point, as a
child process in its own process group: a point that fails (out of memory, error, past its time) is
recorded as such and the sweep goes on; the JSON is rewritten after every point.

CPU (default): the `small` model with the `long` branches (segments up to the whole sequence), fp32,
with 1 process (all cores) and with 2 processes splitting the sequence (sp=2, one thread each). A
length that fails ends the climb for that process count. Each process's data segment is capped at
90% of the available memory / processes (--memory-fraction), so an allocation fails cleanly instead of waking the OOM
killer. MFU is against the fp32 matmul peak of the whole machine, measured here first.

CUDA (--device cuda): `model=base attention=paper`, bf16 (`deepspeed=bf16` unless --deepspeed: ZeRO-1 with
fp32 gradient accumulation, DeepSpeed's BF16_Optimizer, as experiment=gpu_base), batch 1,
compiled token-wise regions (model.compile=auto), dilated attention against the same model with
dense causal flash attention (model.attention_impl=dense). Tokens/s and MFU are the median over the
steps after the first (which carries the compile warm-up); peak memory is
torch.cuda.max_memory_allocated. --profile runs one more step at 32K under torch.profiler
(trainer.profile_step) and keeps its kernel time by category in the row. --quick: 32K dilated + dense,
1M and 4M dilated, within --budget seconds (default 180) including start-up and compilation; points
that do not fit are recorded as skipped.

    python3 benchmarks/train.py --seq-lens 16384 --processes 1 --tag cpu_check     # one CPU point
    python3 benchmarks/train.py                                   # CPU: 16K, 64K, 256K, 512K, 1M tokens
    python3 benchmarks/train.py --device cuda --quick             # one GPU, ~3 minutes
    python3 benchmarks/train.py --device cuda --budget 1800       # one GPU: 32K .. 4M, dense to 256K
    python3 benchmarks/train.py --device cuda --seq-lens 32768 --steps 3 --profile --tag profile  # where 32K goes

Writes benchmarks/results/train{_tag}.json and .png (CUDA: train_cuda_<gpu>[_quick][_tag]) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import signal
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
from common import RESULTS, human, machine, save  # noqa: E402

from longnet_dist.distributed.testing import free_port  # noqa: E402
from longnet_dist.train.peak import DENSE_16BIT_PEAKS, cpu_matmul_flops, gpu_peak_flops  # noqa: E402
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
    """Best FLOP/s of a 2048^3 fp32 matmul with `threads` threads (the MFU denominator; train/peak.py's timing)."""
    import torch

    torch.set_num_threads(threads)
    return cpu_matmul_flops(seconds)


def run_trainer(overrides: list[str], nproc: int, threads: int, timeout: float, memory_limit: int | None,
                read_back: tuple[str, ...] = (), environment: dict[str, str] | None = None) -> dict:
    """One trainer run (`python -m longnet_dist.train`, torchrun for nproc > 1) in its own process
    group, killed whole past `timeout`; returns its metrics records (+ status) or the failure, and
    "files": the JSON files of `read_back` (names in the run directory) that it wrote. `environment`
    adds variables to the run's (defaults: this process's values win)."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as output_dir:
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                         "--master_port", str(free_port())]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep carried wheels
        env = dict(environment or {}, **os.environ)
        env.update(WANDB_MODE="disabled", OMP_NUM_THREADS=str(threads), PYTHONPATH=path)
        command = [*launcher, "-m", "longnet_dist.train", *overrides, "logger=none", "resume=null",
                   f"trainer.output_dir={output_dir}"]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True,
                                   preexec_fn=memory_limiter(memory_limit) if memory_limit else None)
        try:
            log, _ = process.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the trainer and any torchrun children
            process.communicate()
            return {"status": f"timeout after {timeout:.0f} s"}
        wall = time.perf_counter() - started
        metrics = Path(output_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line] \
            if metrics.exists() else []
        if process.returncode != 0 or not records:
            out_of_memory = process.returncode in (-9, 137) or any(
                text in log for text in ("can't allocate memory", "out of memory", "OutOfMemoryError"))
            return {"status": "out of memory" if out_of_memory else f"failed (exit {process.returncode})",
                    "log_tail": log[-1500:]}
        files = {name: json.loads((Path(output_dir) / name).read_text()) for name in read_back
                 if (Path(output_dir) / name).exists()}
        return {"status": "ok", "wall_s": wall, "records": records, "files": files}


def cpu_point(seq_len: int, nproc: int, steps: int, peak_flops: float, timeout: float,
              memory_fraction: float) -> dict:
    """The `small` model with the `long` branches and full checkpointing, fp32, sp = nproc; each
    process's data segment capped at `memory_fraction` of the available memory / nproc (0: no cap)."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // nproc)
    overrides = [
        "model=small", "attention=long", "model.activation_checkpointing=full", f"data.seq_len={seq_len}",
        f"trainer.max_steps={steps}", f"trainer.warmup_steps={steps}", "trainer.log_every=1",
        "trainer.eval_every=0", "trainer.keep_last_checkpoints=1", f"trainer.save_every={steps}",
        f"trainer.num_threads={threads}", f"trainer.peak_flops={peak_flops / nproc}",
        f"distributed.sequence_parallel_size={nproc}",
    ]
    limit = int(memory_fraction * available_memory_bytes() / nproc) or None  # per process (torchrun's children inherit it)
    result = run_trainer(overrides, nproc, threads, timeout, limit)
    records = result.pop("records", None)
    result.pop("files", None)
    return {**result, "memory_limit_per_process": limit, **(records[-1] if records else {})}


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Tokens/s, MFU and peak memory against sequence length, one line per row["series"]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for series in sorted({row["series"] for row in rows}):
        done = [row for row in rows if row["series"] == series and row["status"] == "ok"]
        if not done:
            continue
        lengths = [row["seq_len"] for row in done]
        axes[0].plot(lengths, [row["tokens_per_s"] for row in done], "o-", label=series)
        axes[1].plot(lengths, [100 * row["mfu"] for row in done], "o-", label=series)
        axes[2].plot(lengths, [row["peak_mem_bytes"] / 2 ** 30 for row in done], "o-", label=series)
    for axis, ylabel in zip(axes, ("tokens / s", "MFU (%)", "peak memory per process (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# (tokens, attention, steps): one 4M step shows that it runs and its memory (its time includes compiling)
QUICK_POINTS = [(32768, "dilated", 5), (32768, "dense", 5), (1048576, "dilated", 2), (4194304, "dilated", 1)]
CUDA_SEQ_LENS = [32768, 131072, 524288, 1048576, 2097152, 4194304]
DENSE_MAX_SEQ_LEN = 262144  # dense attention's cost grows with N^2: beyond this a step takes minutes
# peak GiB a dilated step needed where one was measured (H200, stop 14): a GPU with less memory skips the
# point instead of spending a minute of its lease compiling towards an out-of-memory error
MEASURED_PEAK_GIB = {1048576: 36.0, 4194304: 110.4}
# wall seconds a point's trainer run took, compiling included (32K: H100, stop 19, a fresh machine; 1M: H100,
# stop 19, its own command took 69 s, start-up included; 4M: H200, stop 14): with less of the budget left the
# point is skipped at once, its time left to later stages
MEASURED_SECONDS = {(32768, "dilated"): 60, (32768, "dense"): 28, (1048576, "dilated"): 65,
                    (4194304, "dilated"): 72}
# --profile: points up to this length (a profiled 1M step records tens of thousands of kernels)
PROFILE_MAX_SEQ_LEN = 32768


def checkpointing_for(seq_len: int, choice: str) -> tuple[str, int]:
    """(activation_checkpointing, checkpoint_group_size). auto: nothing recomputed up to 64K tokens
    (activations fit; fastest), whole blocks up to 2M, groups of 2 blocks beyond (a bf16 block input
    is 1.5 KiB per token: 12 of them at 4M tokens are 72 GiB)."""
    if choice != "auto":
        return choice, 1
    if seq_len <= 65536:
        return "none", 1
    return "full", 1 if seq_len <= 2097152 else 2


def cuda_point(seq_len: int, impl: str, steps: int, args, peak_flops: float, timeout: float) -> dict:
    """One trainer run of `model=base attention=paper` in bf16 on GPU 0; medians over steps 2... With
    --profile (up to PROFILE_MAX_SEQ_LEN tokens) one more step runs under torch.profiler
    (trainer.profile_step), left out of the medians: its kernels by category go into the row's "profile"."""
    policy, group = checkpointing_for(seq_len, args.checkpointing)
    profile_step = steps + 1 if args.profile and seq_len <= PROFILE_MAX_SEQ_LEN else None
    runs = profile_step or steps
    overrides = [
        "model=base", "attention=paper", f"deepspeed={args.deepspeed}", "deepspeed.bf16.enabled=true",
        f"model.attention_impl={impl}", f"model.activation_checkpointing={policy}", f"model.checkpoint_group_size={group}",
        f"model.compile={args.compile}",
        f"data.seq_len={seq_len}", "data.micro_batch_size=1", "data.val_fraction=0.2",  # validation >= 4M tokens
        f"trainer.max_steps={runs}", f"trainer.warmup_steps={steps}", "trainer.log_every=1", "trainer.eval_every=0",
        "trainer.keep_last_checkpoints=1", f"trainer.save_every={runs}", f"trainer.peak_flops={peak_flops}",
        "trainer.torch_adam=true", "trainer.progress_bar=false", f"trainer.profile_step={profile_step or 'null'}",
        *args.override,
    ]
    row = {"seq_len": seq_len, "attention_impl": impl, "activation_checkpointing": policy,
           "checkpoint_group_size": group, "steps": steps,
           "series": f"{impl} attention"}
    profile_file = f"profile_step_{profile_step}.json"
    result = run_trainer(overrides, 1, os.cpu_count() or 1, timeout, None, read_back=(profile_file,),
                         environment={"DS_ACCELERATOR": "cuda"})
    records, files = result.pop("records", None), result.pop("files", {})
    row.update(result)
    if profile_file in files:
        row["profile"] = files[profile_file]
    if records and profile_step:
        records = [r for r in records if r["step"] != profile_step]  # the profiled step runs slower
    if records:
        timed = records[1:] or records  # the first step compiles (a one-step run reports it anyway)
        step_s = sorted(seq_len / r["tokens_per_s"] for r in timed)
        median_s = step_s[len(step_s) // 2]
        row.update(tokens_per_s=seq_len / median_s, step_s=median_s, first_step_s=seq_len / records[0]["tokens_per_s"],
                   mfu=sorted(r["mfu"] for r in timed)[len(timed) // 2],
                   peak_mem_bytes=max(r["peak_mem_bytes"] for r in records), loss=records[-1]["loss"],
                   timed_steps=len(timed), includes_compile=len(records) == 1)
        row["peak_mem_bytes_per_token"] = row["peak_mem_bytes"] / seq_len
    return row


def too_big(seq_len: int, impl: str, host: dict) -> str | None:
    """A skip status when a dilated step of `seq_len` tokens needed more memory where it was measured
    (MEASURED_PEAK_GIB, default checkpointing) than this GPU has; else None."""
    needed = MEASURED_PEAK_GIB.get(seq_len) if impl == "dilated" else None
    has = host.get("gpu_memory_gib")
    if needed is None or has is None or needed <= has:
        return None
    return f"skipped: a step peaked at {needed} GiB on an H200 (stop 14); this GPU has {has} GiB"


def too_long(seq_len: int, impl: str, left: float) -> str | None:
    """A skip status when fewer seconds of the budget are left than the point took where it was measured
    (MEASURED_SECONDS; at least 20 s for any point); else None."""
    needed = MEASURED_SECONDS.get((seq_len, impl), 20)
    if left >= needed:
        return None
    return f"skipped: {left:.0f} s of the budget left, a run took {needed} s"


def cuda_points(args) -> list[tuple[int, str, int]]:
    if args.quick:
        return QUICK_POINTS
    lengths = args.seq_lens or CUDA_SEQ_LENS
    return [(n, impl, args.steps or (4 if n <= 1048576 else 2)) for impl in args.impls for n in sorted(lengths)
            if impl == "dilated" or n <= DENSE_MAX_SEQ_LEN]


def print_table(rows: list[dict], keys: list[tuple], values: list[tuple]) -> None:
    """One line per row: the `keys` columns, then "ok" and the `values` columns for rows that ran, or
    the row's status. Columns are (header, width, row -> value)."""
    print(" ".join(f"{header:>{width}}" for header, width, _ in keys + [("status", 10, None)] + values))
    for row in rows:
        cells = [f"{get(row)!s:>{width}}" for _, width, get in keys]
        if row["status"] == "ok":
            cells += [f"{'ok':>10}"] + [f"{get(row)!s:>{width}}" for _, width, get in values]
        else:
            cells.append(row["status"])
        print(" ".join(cells))


def cuda_sweep(args) -> None:
    host = machine()
    if "gpu" not in host:
        sys.exit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    gpu = host["gpu"]
    peak = args.peak_flops or gpu_peak_flops(gpu)  # the MFU denominator: the GPU's dense bf16 peak
    if peak is None:
        sys.exit(f"no peak FLOP/s known for {gpu!r} (known: {[part for part, _ in DENSE_16BIT_PEAKS]}); "
                 "pass --peak-flops")
    slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "_")
    name = f"train_cuda_{slug}{'_quick' if args.quick else ''}{'_' + args.tag if args.tag else ''}"
    budget = args.budget or (180.0 if args.quick else 3600.0)
    deadline = time.perf_counter() + budget
    payload = {"benchmark": f"trainer throughput, model=base attention=paper, bf16, deepspeed={args.deepspeed}, "
                            "batch 1, one GPU",
               "machine": host, "peak_flops": peak, "budget_s": budget, "command": " ".join(sys.argv), "rows": []}
    failed_impls: set[str] = set()
    for seq_len, impl, steps in cuda_points(args):
        left = deadline - time.perf_counter()
        print(f"seq_len {seq_len:>8}, {impl} ({left:.0f} s of the budget left) ...", flush=True)
        skipped = ("skipped: a shorter sequence failed" if impl in failed_impls else too_long(seq_len, impl, left)
                   or (too_big(seq_len, impl, host) if args.checkpointing == "auto" else None))
        if skipped:
            row = {"seq_len": seq_len, "attention_impl": impl, "series": f"{impl} attention", "status": skipped}
        else:
            row = cuda_point(seq_len, impl, steps, args, peak, timeout=min(args.timeout, left))
        if row["status"] not in ("ok",) and not row["status"].startswith("skipped"):
            failed_impls.add(impl)
        print(f"  {row['status']}" + (f": {row['tokens_per_s']:,.0f} tokens/s, MFU {100 * row['mfu']:.1f}%, "
                                       f"{row['peak_mem_bytes'] / 2 ** 30:.1f} GiB" if row["status"] == "ok" else ""),
              flush=True)
        if "log_tail" in row:
            print("  " + row["log_tail"][-800:].replace("\n", "\n  "), flush=True)
        payload["rows"].append(row)
        json_path = save(name, payload)  # after every point: a later hang or kill keeps what ran
    plot(payload["rows"], f"LongNet base (85M), bf16, one {gpu}", RESULTS / f"{name}.png")
    print(f"\n{gpu}; peak {human(peak, 'FLOP/s')}")
    print_table(payload["rows"],
                [("seq_len", 9, lambda r: r["seq_len"]), ("attention", 9, lambda r: r["attention_impl"]),
                 ("ckpt", 9, lambda r: r.get("activation_checkpointing", ""))],
                [("tokens/s", 10, lambda r: f"{r['tokens_per_s']:.0f}"), ("MFU", 7, lambda r: f"{100 * r['mfu']:.1f}%"),
                 ("step s", 8, lambda r: f"{r['step_s']:.2f}"),
                 ("peak GiB", 9, lambda r: f"{r['peak_mem_bytes'] / 2 ** 30:.1f}"),
                 ("KiB/token", 9, lambda r: f"{r['peak_mem_bytes_per_token'] / 1024:.1f}")])
    print(f"wrote {json_path} and {RESULTS / (name + '.png')}")


def cpu_sweep(args) -> None:
    host = machine()
    peak = measure_matmul_peak(threads=os.cpu_count() or 1)
    rows = []
    for nproc in args.processes:
        for seq_len in sorted(args.seq_lens or DEFAULT_SEQ_LENS):
            print(f"seq_len {seq_len:>8}, {nproc} process(es) ...", flush=True)
            measured = cpu_point(seq_len, nproc, args.steps or 1, peak, args.timeout, args.memory_fraction)
            series = "1 process" if nproc == 1 else f"{nproc} processes (sp={nproc})"
            row = {"seq_len": seq_len, "processes": nproc, "series": series, **measured}
            rows.append(row)
            if row["status"] != "ok":
                print(f"  {row['status']}; not trying longer sequences with {nproc} process(es)")
                break
    longest = {nproc: max((r["seq_len"] for r in rows if r["processes"] == nproc and r["status"] == "ok"), default=0)
               for nproc in args.processes}

    name = f"train_{args.tag}" if args.tag else "train"
    machine_line = f"{host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB ({host['platform']})"
    payload = {"benchmark": "trainer throughput, model=small attention=long, activation checkpointing",
               "machine": host, "peak_flops_measured": peak, "steps_per_run": args.steps or 1, "rows": rows,
               "longest_seq_len_by_processes": longest}
    json_path = save(name, payload)
    plot(rows, f"LongNet small, training step throughput - {machine_line}", RESULTS / f"{name}.png")

    print(f"\nmachine: {machine_line}; fp32 matmul peak measured {human(peak, 'FLOP/s')}")
    print_table(rows, [("seq_len", 9, lambda r: r["seq_len"]), ("procs", 5, lambda r: r["processes"])],
                [("tokens/s", 9, lambda r: f"{r['tokens_per_s']:.0f}"), ("MFU", 7, lambda r: f"{100 * r['mfu']:.2f}%"),
                 ("step s", 8, lambda r: f"{r['seq_len'] / r['tokens_per_s']:.1f}"),
                 ("peak mem/proc", 13, lambda r: f"{r['peak_mem_bytes'] / 2 ** 30:.2f} GiB")])
    for nproc, length in longest.items():
        print(f"longest training step with {nproc} process(es): {length:,} tokens")
    print(f"wrote {json_path} and {RESULTS / (name + '.png')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="default: 16K..1M (cpu), 32K..4M (cuda)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="cpu: process counts (sp)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (cpu: 1, the last is reported; "
                                                  "cuda: 4 up to 1M tokens, 2 beyond)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="cpu: cap each process's data segment at this fraction of the available memory / "
                             "processes (0: no cap). The cap counts address space that an allocator keeps "
                             "after freeing (tcmalloc; glibc's fragmented heap), so it can fail a step "
                             "whose resident memory fits")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. smoke)")
    parser.add_argument("--quick", action="store_true", help="cuda: 32K dilated + dense, 1M and 4M dilated")
    parser.add_argument("--budget", type=float, help="cuda: seconds for the whole sweep (default 180 quick, 3600)")
    parser.add_argument("--impls", nargs="+", default=["dilated", "dense"], choices=["dilated", "dense"])
    parser.add_argument("--checkpointing", default="auto", choices=["auto", "none", "full", "selective"],
                        help="cuda: model.activation_checkpointing (auto: none up to 64K tokens, full beyond, "
                             "in groups of 2 blocks beyond 2M)")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"], help="cuda: model.compile")
    parser.add_argument("--peak-flops", type=float, help="cuda: FLOP/s of the GPU for MFU (default by its name)")
    parser.add_argument("--deepspeed", default="bf16", choices=["bf16", "zero0", "zero1", "zero2", "zero3"],
                        help="cuda: the DeepSpeed config group, bf16 enabled in all (bf16: ZeRO-1 with fp32 gradient "
                             "accumulation, BF16_Optimizer, 3.5 ms per engine step of model=base on an H200 against "
                             "20.8 ms for zero0's FP16_UnfusedOptimizer)")
    parser.add_argument("--override", nargs="*", default=[], help="cuda: extra trainer overrides (key=value)")
    parser.add_argument("--profile", action="store_true",
                        help=f"cuda: profile one more step of each point up to {PROFILE_MAX_SEQ_LEN} tokens "
                             "(trainer.profile_step; the row's 'profile': kernel time by category, wall time)")
    args = parser.parse_args()
    (cuda_sweep if args.device == "cuda" else cpu_sweep)(args)


if __name__ == "__main__":
    main()
