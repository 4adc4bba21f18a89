"""Where a step's time goes: torch.profiler over one step, its kernels (CUDA) or ops (CPU) grouped by kind.

`trainer.profile_step=N` profiles optimizer step N of a run (DeepSpeed engine, data, loss and all) and writes
<run dir>/profile_step_N.json: the step's wall time, its kernels' summed time by category (a wall time well
above the kernels' sum means the GPU waited on the host), the time inside each attention branch
(`kernels.branch_range`) and the largest kernels. benchmarks/gpu_profile.py uses the same summary for its
attention-only and bare-model profiles. Importing this module needs torch only (no Hydra, no DeepSpeed).
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from .host_reads import cuda_syncs

# (category, pattern searched in the lower-cased kernel or op name), first match wins; Triton kernels keep
# their function's name (attention/kernels/triton_dilated.py)
CATEGORIES = [
    ("dilated fwd", r"^_fwd\b"), ("dilated dK/dV", r"^_bwd_dkdv\b"), ("dilated dQ", r"^_bwd_dq\b"),
    ("dilated prep / merge", r"^_bwd_prep\b|^_merge_chains\b"),
    ("flash (dense / aten)", r"flash|fmha|efficient_attention|scaled_dot_product"),
    ("optimizer", r"multi_tensor|adam|foreach"), ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|cublas|aten::mm|addmm|bmm"),
    ("compiled region", r"^triton_|compiledfunction|torch-compiled"),
    ("copy / fill", r"memcpy|memset|copy|fill|zero|^_store_heads\b"),
    ("reduction", r"reduce|sum|norm"), ("elementwise", r"elementwise|vectorized|aten::"),
]


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def summarize(prof, device: str, top: int = 30) -> dict:
    """Kernel (CUDA) or op (CPU) self times of one profile: per category, per attention branch and the
    `top` largest; the host's time in each phase of a training step (`phase`); on CUDA the timeline of the
    GPU's busy and idle time (`timeline`)."""
    rows, branches, phases = [], {}, {}
    for event in prof.key_averages():
        if event.key.startswith("dilated ") and " w=" in event.key:  # kernels.branch_range: one branch's work
            branches[event.key] = (event.device_time_total if device == "cuda" else event.cpu_time_total) / 1000
        if event.key.startswith("train: "):  # `phase`: the host's time in one phase of a training step
            phases[event.key] = event.cpu_time_total / 1000
        if getattr(event, "is_user_annotation", False):
            # a record_function range (a branch, "Optimizer.step#AdamW.step", a compiled region): on CUDA its
            # device time spans the kernels inside it, which are counted on their own; counting it as well
            # put the branches' time twice into the total and into "other" (stop 27's H200 profiles)
            continue
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key[:160], "calls": event.count, "ms": us / 1000, "category": category(event.key)})
    total = sum(r["ms"] for r in rows) or 1.0
    by_category: dict[str, float] = {}
    for r in rows:
        by_category[r["category"]] = by_category.get(r["category"], 0.0) + r["ms"]
    rows.sort(key=lambda r: -r["ms"])
    summary = {"total_ms": total, "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
               "branches_ms": dict(sorted(branches.items(), key=_branch_order)), "top": rows[:top]}
    if phases:
        summary["host_phases_ms"] = phases
    if device == "cuda" and hasattr(prof, "events"):
        events = prof.events()
        kernels = [(e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        summary["timeline"] = timeline(kernels, launching_ops(events))
    return summary


def phase(name: str):
    """A torch.profiler range "train: <name>" around one phase of a training step (the trainer's data, forward,
    loss, backward, grad norm, optimizer step), so that a profile's idle gaps name the phase whose host work
    held the GPU up. Nothing at all while no profiler runs."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"train: {name}")


def launching_ops(events) -> list[tuple[float, float, frozenset, str]]:
    """The host ops of a profile that launched kernels: (start µs, end µs, their kernels' names, the op's chain
    of enclosing ops and ranges, outermost first: "train: backward > aten::mm")."""
    ops = []
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or not getattr(e, "kernels", None):
            continue
        chain, parent = [], e
        while parent is not None:
            chain.append(parent.name[:48])
            parent = parent.cpu_parent
        names = chain[::-1]  # outermost first
        if len(names) > 5:
            names = names[:4] + ["...", names[-1]]
        ops.append((e.time_range.start, e.time_range.end, frozenset(k.name for k in e.kernels), " > ".join(names)))
    return ops


def timeline(kernels: list[tuple[float, float, str]], host_ops: list[tuple] = (), gap_us: float = 5.0,
             top: int = 8) -> dict:
    """When the GPU worked: kernels (start µs, end µs, name), any stream -> span (first start to last end), busy
    (the union of the kernels' intervals), idle (span - busy), and the gaps over `gap_us` with the kernels on
    either side, largest first. Idle time between kernels is time the GPU waited, mostly on the host: each of the
    largest gaps names the host op that launched the kernel ending it ("host", from `host_ops`, launching_ops:
    the innermost op that launched a kernel of that name and ran until shortly before the kernel started)."""
    if not kernels:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": 0, "largest_gaps": []}
    kernels = sorted(kernels)
    busy, gaps = 0.0, []  # gaps: (µs, kernel before, kernel after, its start)
    start, end, name = kernels[0]
    for next_start, next_end, next_name in kernels[1:]:
        if next_start > end:  # a gap: close the busy stretch
            busy += end - start
            if next_start - end > gap_us:
                gaps.append((next_start - end, name, next_name, next_start))
            start = next_start
        if next_end >= end:
            end, name = next_end, next_name
    busy += end - start
    span = max(e for _, e, _ in kernels) - kernels[0][0]
    gaps.sort(key=lambda g: -g[0])
    largest = []
    for us, after, before, at in gaps[:top]:
        gap = {"us": us, "after": after[:60], "before": before[:60], "at_ms": (at - kernels[0][0]) / 1000}
        found = _launcher(at, before, host_ops)
        if found:
            gap["host"] = found
        largest.append(gap)
    return {"span_ms": span / 1000, "busy_ms": busy / 1000, "idle_ms": (span - busy) / 1000, "gaps": len(gaps),
            "gaps_ms": sum(g[0] for g in gaps) / 1000, "largest_gaps": largest}


def _launcher(kernel_start: float, kernel_name: str, host_ops, slack_us: float = 100.0) -> str | None:
    """The chain of the host op that launched `kernel_name` starting at `kernel_start`: among the ops that
    launched a kernel of that name, began before it started and ended at most `slack_us` before, the one that
    began last."""
    best = None
    for op_start, op_end, names, chain in host_ops:
        if kernel_name in names and op_start <= kernel_start and op_end >= kernel_start - slack_us:
            if best is None or op_start > best[0]:
                best = (op_start, chain)
    return best[1] if best else None


def _branch_order(item: tuple[str, float]) -> tuple[bool, int, str]:
    """"dilated fwd w=2048 r=1": forward before backward, then by segment length."""
    name = item[0]
    found = re.search(r"w=(\d+)", name)
    return " fwd " not in name, int(found.group(1)) if found else 0, name


def format_summary(label: str, summary: dict, seconds: float, rows: int = 8) -> str:
    """The summary as lines of text: wall time, kernel time, categories, branches, the largest kernels."""
    if "error" in summary:
        return f"== {label}: {seconds * 1000:.2f} ms per step; {summary['error']}"
    lines = [f"== {label}: {seconds * 1000:.2f} ms per step, {summary['total_ms']:.2f} ms of kernels"]
    lines += [f"   {name:<22} {ms:10.2f} ms {100 * ms / summary['total_ms']:5.1f}%"
              for name, ms in summary["categories"].items()]
    lines += [f"   {name:<30} {ms:10.2f} ms" for name, ms in summary["branches_ms"].items()]
    lines += [f"   {row['ms']:10.2f} ms x{row['calls']:<4} {row['name'][:100]}" for row in summary["top"][:rows]]
    if summary.get("host_phases_ms"):
        lines.append("   host time by phase: " + ", ".join(f"{name[7:]} {ms:.2f} ms"
                                                           for name, ms in summary["host_phases_ms"].items()))
    if "timeline" in summary:
        t = summary["timeline"]
        lines.append(f"   GPU busy {t['busy_ms']:.2f} of {t['span_ms']:.2f} ms from the first kernel to the last; "
                     f"{t['gaps']} gaps over 5 us, {t.get('gaps_ms', 0.0):.2f} ms")
        lines += [f"     gap {g['us']:8.1f} us after {g['after']} before {g['before']}"
                  + (f"\n         launched from {g['host']}" if g.get("host") else "") for g in t["largest_gaps"][:4]]
    if "syncs" in summary:
        waits = "; ".join(f"{count} at {site}" for site, count in list(summary["syncs"].items())[:6])
        lines.append(f"   {sum(summary['syncs'].values())} host waits for the GPU (syncs): {waits or 'none'}")
    return "\n".join(lines)


@contextlib.contextmanager
def profiled(device: torch.device, enabled: bool = True):
    """Profile the block (CPU ops, and CUDA kernels on a CUDA device); yields a dict that holds, after the
    block, "summary" (`summarize`, or {"error": ...} if the profile could not be summarised: the block's
    own errors propagate, the profiler's do not; on CUDA with "syncs", where the block made the host wait
    for the GPU: host_reads.cuda_syncs) and "seconds" (the block's wall time, the device synchronised)."""
    found: dict = {}
    if not enabled:
        yield found
        return
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        with cuda_syncs() if cuda else contextlib.nullcontext(Counter()) as syncs:
            yield found
        sync()
        found["seconds"] = time.perf_counter() - started
    try:
        found["summary"] = summarize(prof, "cuda" if cuda else "cpu")
        if cuda:
            found["summary"]["syncs"] = dict(syncs.most_common())
    except Exception as error:  # what the profiler recorded must not stop a training run: the step itself ran
        found["summary"] = {"error": f"could not summarise the profile: {type(error).__name__}: {error}"}


def write_step_profile(output_dir: Path, step: int, found: dict, extra: dict | None = None) -> Path:
    """<output_dir>/profile_step_<step>.json from a `profiled` block's result."""
    path = Path(output_dir) / f"profile_step_{step}.json"
    path.write_text(json.dumps({"step": step, "step_s": found["seconds"], **(extra or {}), **found["summary"]},
                               indent=2) + "\n")
    return path
