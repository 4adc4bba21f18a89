"""Rank 0's outputs: metrics.jsonl, eval tables (JSON + CSV), W&B (offline by default), log lines.

Other ranks get a logger that does nothing, so call sites need no rank checks. One run directory is
one W&B run: its id is kept in <run dir>/wandb_run_id, and a resumed run continues that id.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import resource
import secrets
import string
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..optional import require
from .checkpoint import write_text_atomically

log = logging.getLogger("longnet_dist.train")
RUN_ID_NAME = "wandb_run_id"


def wandb_run_id(output_dir: Path, resumed: bool) -> str:
    """The W&B run id of this run directory, saved (atomically) in <output_dir>/wandb_run_id.

    A run resumed from a checkpoint continues the id saved there. A fresh start takes WANDB_RUN_ID
    (slurm/train.sbatch sets <cluster>-<job id>, so a requeue before the first checkpoint continues
    too) or a new random id, and saves it.
    """
    path, requested = output_dir / RUN_ID_NAME, os.environ.get("WANDB_RUN_ID")
    saved = path.read_text().strip() if path.is_file() else None
    if resumed and saved:
        if requested and requested != saved:
            log.warning("WANDB_RUN_ID=%s ignored: resuming %s continues its W&B run %s", requested, output_dir, saved)
        return saved
    run_id = requested or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_text_atomically(path, run_id + "\n")
    return run_id


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: VmHWM of /proc/self/status (getrusage's
    ru_maxrss survives fork + exec, so a child of a larger parent would report the parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max_memory_allocated; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


def format_log_line(record: dict[str, Any]) -> str:
    """One plain line of the step metrics (also what tqdm.write prints)."""
    return (f"step {record['step']:>6} | loss {record['loss']:.4f} | bpb {record['bits_per_byte']:.3f} | "
            f"lr {record['lr']:.2e} | grad_norm {record['grad_norm']:.3f} | "
            f"tok/s {record['tokens_per_s']:,.0f} | MFU {100 * record['mfu']:.2f}% | "
            f"attn comm {_format_bytes(record['attn_comm_bytes_per_step'])}/step | "
            f"peak mem {_format_bytes(record['peak_mem_bytes'])}")


class MetricsLogger:
    """Writes metrics on rank 0 only; `enabled=False` makes every method a no-op."""

    def __init__(self, output_dir: Path, logger_cfg: dict[str, Any], run_config: dict[str, Any], enabled: bool,
                 resumed: bool = False):
        self.enabled = enabled
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.eval_dir = output_dir / "eval"
        self.wandb_run = None
        if not enabled:
            return
        if logger_cfg["backend"] == "wandb" and logger_cfg["mode"] != "disabled":
            wandb = require("wandb", f"logger=wandb (mode {logger_cfg['mode']!r})", "use logger=none")
            self.wandb_run = wandb.init(
                project=logger_cfg["project"], entity=logger_cfg["entity"], name=logger_cfg["name"],
                group=logger_cfg["group"], tags=list(logger_cfg["tags"]), mode=logger_cfg["mode"],
                dir=str(output_dir), config=run_config, id=wandb_run_id(output_dir, resumed), resume="allow",
            )

    def forget_after(self, step: int) -> None:
        """On resume from `step`: drop metrics.jsonl records of later steps (logged by the interrupted run
        after its last checkpoint; the resumed run logs them again)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def write(self, message: str) -> None:
        """A log line: through logging when it is configured (Hydra: console + <run dir>/train.log),
        else straight to the console; tqdm-safe either way (see trainer's logging_redirect_tqdm)."""
        if not self.enabled:
            return
        if logging.getLogger().handlers:
            log.info(message)
        else:
            tqdm.write(message)

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])
        self.write(format_log_line(record))

    def log_eval(self, step: int, result: dict[str, Any]) -> None:
        """Save eval/step_XXXXXXXX.{json,csv} (loss by position bucket) and log it."""
        if not self.enabled:
            return
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        stem = self.eval_dir / f"step_{step:08d}"
        stem.with_suffix(".json").write_text(json.dumps({"step": step, **result}, indent=1))
        with open(stem.with_suffix(".csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(result["buckets"][0]))
            writer.writeheader()
            writer.writerows(result["buckets"])
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, "eval_loss": result["loss"],
                                     "eval_bits_per_byte": result["bits_per_byte"]}) + "\n")
        buckets = ", ".join(f"[{row['position_start']},{row['position_end']}) {row['loss']:.3f}"
                            for row in result["buckets"] if not math.isnan(row["loss"]))
        self.write(f"eval step {step}: loss {result['loss']:.4f} | bpb {result['bits_per_byte']:.3f} | "
                   f"loss by position: {buckets}")
        if self.wandb_run is not None:
            import wandb

            rows = result["buckets"]
            table = wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
            self.wandb_run.log({"eval/loss": result["loss"], "eval/bits_per_byte": result["bits_per_byte"],
                                "eval/loss_by_position": table}, step=step)

    def finish(self) -> None:
        """Close W&B and say where an offline run is and how to upload it."""
        if not self.enabled or self.wandb_run is None:
            return
        run_dir = Path(self.wandb_run.dir).parent  # .../wandb/offline-run-<date>-<id>
        mode, run_id = self.wandb_run.settings.mode, self.wandb_run.id
        self.wandb_run.finish()
        parts = sorted(run_dir.parent.glob(f"offline-run-*-{run_id}"))
        if mode == "offline" and len(parts) > 1:  # one folder per start; `wandb sync` joins them in start order
            self.write(f"W&B offline run {run_id}: {len(parts)} parts (resumed), the last {run_dir}\n"
                       f"  upload it with: wandb sync {run_dir.parent}/offline-run-*-{run_id}")
        elif mode == "offline":
            self.write(f"W&B offline run: {run_dir}\n  upload it with: wandb sync {run_dir}")
        else:
            self.write(f"W&B run: {run_dir}")
