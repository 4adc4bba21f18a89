"""Shared by the benchmark scripts: machine description, timing, peak memory, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What ran the benchmark: CPU model, cores, memory, torch version; the GPUs when CUDA is there."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "platform": platform.platform(), "host_memory": host_memory()}
    if torch.cuda.is_available():
        info.update(gpu_info())
    return info


MEMORY_VARIABLES = ("LD_PRELOAD", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")


def host_memory() -> dict:
    """What shapes the CPU timings through page faults: the allocator settings in the environment (tcmalloc
    preloaded, glibc tunables, torch's huge pages for tensors of 2 MiB and more) and the kernel's transparent
    huge page mode (the bracketed word of /sys/kernel/mm/transparent_hugepage/enabled)."""
    settings = {name: os.environ[name] for name in MEMORY_VARIABLES if os.environ.get(name)}
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        settings["transparent_hugepage"] = mode.split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        pass
    return settings


GPU_QUERY = ("import json, torch; p = torch.cuda.get_device_properties(0); print(json.dumps({'gpu': p.name, "
             "'gpu_count': torch.cuda.device_count(), 'gpu_memory_gib': round(p.total_memory / 2**30, 1), "
             "'compute_capability': f'{p.major}.{p.minor}', 'cuda': torch.version.cuda}))")


def gpu_info() -> dict:
    """Name, count, memory and CUDA version of the GPUs, asked in a child process so that this one
    creates no CUDA context (it would hold GPU memory while benchmark children run)."""
    result = subprocess.run([sys.executable, "-c", GPU_QUERY], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return {"gpu": f"unknown ({result.stderr.strip()[-200:]})"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of `repeats` runs of fn() (after one warm-up run when repeats > 1)."""
    if repeats > 1:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best




def save(name: str, payload: dict) -> Path:
    """Writes results/<name>.json; a payload without its own "command" gets this process's command line."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), **payload}, indent=2) + "\n")
    return path


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def style_log2_axis(ax, ylabel: str, log_y: bool = False) -> None:
    """Sequence length on a log2 x axis, grid and legend: the plots of every benchmark here."""
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
