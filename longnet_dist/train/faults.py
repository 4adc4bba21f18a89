"""Faults a training loop must survive: stop signals (preemption, scancel) and non-finite losses.

`StopSignal` turns SIGTERM / SIGUSR1 into a flag; the loop calls `sync()` once per step so every rank
sees the flag at the same step, saves a checkpoint and exits cleanly. SLURM sends SIGUSR1 before the
time limit (slurm/train.sbatch) and SIGTERM on cancel/preemption; torchrun forwards both.
`check_finite_loss` applies the configured policy to a NaN/inf loss: "stop" writes a diagnostics JSON
and raises NonFiniteLossError naming step and value; "skip" warns and returns False.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from longnet_dist.distributed.objects import all_gather_object, rank_and_world

from .host_reads import DeviceValue

logger = logging.getLogger(__name__)

NONFINITE_LOSS_POLICIES = ("stop", "skip")
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def _all_gather_floats(value: float) -> list[float]:
    """`value` from every rank in rank order (one tiny all-gather; [value] without a group)."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    return _start_gather(value, world).get()


def _start_gather(value: float, world: int) -> DeviceValue:
    """An all-gather of `value` from every rank, read later: on a GPU (NCCL) the gather is queued behind the work
    before it and DeviceValue.get() waits for it alone; the local value is a fill, not a copy from host memory
    (which would wait for the GPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    local = torch.full((1,), value, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return DeviceValue(torch.cat(gathered))


class StopSignal:
    """Handlers for SIGTERM and SIGUSR1 that only set `requested` (and `signal_name`).

    Install from the main thread (Python's rule for signal handlers). Use as a context manager or
    call `restore()` to put the previous handlers back.
    """

    def __init__(self, signal_names: tuple[str, ...] = STOP_SIGNALS) -> None:
        unknown = [name for name in signal_names if not hasattr(signal, name)]
        if unknown:
            raise ValueError(f"unknown signal names {unknown}; valid examples: {list(STOP_SIGNALS)}")
        self.requested = False
        self.signal_name: str | None = None
        self._pending: DeviceValue | None = None  # the gather of the flags the last sync() started
        self._previous: dict[signal.Signals, Any] = {}
        for name in signal_names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested, self.signal_name = True, name
        message = (f"[rank {rank_and_world()[0]}] received {name}: saving a checkpoint and stopping after this step "
                   "(with several ranks, the next)\n")
        # os.write, not sys.stderr: the handler may interrupt a write to sys.stderr's buffer (reentrant call).
        os.write(sys.stderr.fileno(), message.encode())

    def sync(self, mesh: Any = None) -> bool:
        """Whether to stop after this step; every rank gets the same answer at the same call.

        One process: its own flag. Several: the flags are gathered over the whole world (a stop must span it;
        `mesh` is accepted for symmetry with the trainer's call site) without waiting for the gather: each call
        starts the gather of this step's flags and decides from the previous call's, so a GPU never drains for
        it and the ranks stop together one step after the step that saw the signal.
        """
        rank, world = rank_and_world()
        if world == 1:
            return self.requested
        pending, self._pending = self._pending, _start_gather(1.0 if self.requested else 0.0, world)
        if pending is None:
            return False
        rank_flags = pending.get()
        stop = any(rank_flags)
        if stop and not self.requested:
            first = next(index for index, flag in enumerate(rank_flags) if flag)
            self.requested, self.signal_name = True, f"stop signal on rank {first}"
        # Return what every rank gathered, never the local flag: a signal landing after the gather
        # would otherwise stop this rank one step before the others (and hang their collectives).
        return stop

    def restore(self) -> None:
        """Reinstall the handlers that were active before this object."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or inf and the policy is "stop"."""

    def __init__(self, message: str, step: int, value: float, diagnostics_path: Path) -> None:
        super().__init__(message)
        self.step, self.value, self.diagnostics_path = step, value, diagnostics_path


class NonFiniteWeightsError(RuntimeError):
    """A parameter held NaN or inf when a checkpoint was due: nothing is saved over the good checkpoints."""


def check_finite_weights(module: torch.nn.Module, step: int, last_checkpoint: Path | None) -> None:
    """NonFiniteWeightsError on every rank when any rank's parameters (under ZeRO-3 its partitions) hold NaN or
    inf: an update that finite losses did not catch (the loss is taken before it), e.g. a learning rate far too
    large. Saving them would let keep_last_checkpoints delete the good checkpoints. Collective."""
    bad = next((name for name, param in module.named_parameters()
                if not bool(torch.isfinite(getattr(param, "ds_tensor", param).detach()).all())), None)
    culprit = next(((r, name) for r, name in enumerate(all_gather_object(bad)) if name is not None), None)
    if culprit is not None:
        raise NonFiniteWeightsError(
            f"step {step}: parameter {culprit[1]} (rank {culprit[0]}) holds NaN or inf after the update, so no "
            f"checkpoint was saved; the last one is {last_checkpoint}. A smaller trainer.lr (or trainer.grad_clip) "
            f"and resume=auto continue from it")


def check_nonfinite_policy(policy: str) -> None:
    """ValueError unless `policy` is one of NONFINITE_LOSS_POLICIES (call at start-up)."""
    if policy not in NONFINITE_LOSS_POLICIES:
        raise ValueError(f"non-finite loss policy {policy!r} is not one of {list(NONFINITE_LOSS_POLICIES)}")


def _write_diagnostics(diagnostics_dir: Path, step: int, rank_losses: list[float], details: dict) -> Path:
    rank, world = rank_and_world()
    diagnostics_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_rank{rank}" if world > 1 else ""
    path = diagnostics_dir / f"nonfinite_loss_step_{step:08d}{suffix}.json"
    record = {
        "step": step,
        "loss": repr(rank_losses[rank]),  # repr: JSON has no NaN/inf literals
        "loss_by_rank": [repr(value) for value in rank_losses],
        "rank": rank,
        "world_size": world,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
        **{key: (repr(value) if isinstance(value, float) and not math.isfinite(value) else value)
           for key, value in details.items()},
    }
    path.write_text(json.dumps(record, indent=1, default=repr) + "\n")
    return path


def check_finite_loss(
    loss_value: float | torch.Tensor,
    step: int,
    policy: str,
    diagnostics_dir: str | os.PathLike,
    *,
    lr: float | None = None,
    grad_norm: float | None = None,
    extra: dict[str, Any] | None = None,
    same_on_every_rank: bool = False,
) -> bool:
    """True when the loss is finite on every rank; otherwise apply `policy`.

    Collective when distributed (one all-gather of a float), so every rank takes the same branch; with
    `same_on_every_rank` (the caller's value is identical on every rank, like the trainer's all-reduced
    loss) a finite value returns at once, with no collective and no wait for a GPU, and a non-finite one,
    non-finite on every rank, gathers as before:
    "stop" writes `diagnostics_dir/nonfinite_loss_step_XXXXXXXX[_rankR].json` (step, loss on every
    rank, lr, grad_norm, extra) and raises NonFiniteLossError naming step and value; "skip" writes
    the same file, logs a warning and returns False (the caller skips backward/step).
    """
    check_nonfinite_policy(policy)
    value = float(loss_value.detach().float().item() if isinstance(loss_value, torch.Tensor) else loss_value)
    if same_on_every_rank and math.isfinite(value):
        return True
    rank_losses = _all_gather_floats(value)
    bad_ranks = [rank for rank, loss in enumerate(rank_losses) if not math.isfinite(loss)]
    if not bad_ranks:
        return True
    bad_value = rank_losses[bad_ranks[0]]
    details = {"lr": lr, "grad_norm": grad_norm, "policy": policy, **(extra or {})}
    path = _write_diagnostics(Path(diagnostics_dir), step, rank_losses, details)
    where = "" if len(rank_losses) == 1 else f" on rank(s) {bad_ranks}"
    if policy == "stop":
        message = (
            f"non-finite loss {bad_value} at step {step}{where}; stopping (policy 'stop'). "
            f"Diagnostics: {path}"
        )
        raise NonFiniteLossError(message, step, bad_value, path)
    logger.warning("non-finite loss %s at step %d%s: skipping this step (policy 'skip'); diagnostics: %s",
                   bad_value, step, where, path)
    return False
