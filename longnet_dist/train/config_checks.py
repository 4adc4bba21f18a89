"""validate_config's checks of values: numbers in range (finite), seeds, and the backends this machine can run.

Each raises one ValueError naming the key, its value and what would be valid; none computes or touches a device.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from longnet_dist.attention import BACKENDS, select_backend

from .faults import check_nonfinite_policy
from .peak import check_peak_flops

SEED_MAX = 2**32 - 1  # numpy's seed range
DISTRIBUTED_BACKENDS = (None, "gloo", "nccl")


def check_integer(name: str, value: Any, minimum: int = 1, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{note}")


def check_number(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False,
                 open_high: bool = False, note: str = "") -> None:
    """`value` is a finite number in [low, high] (or the open ends asked for)."""
    if not (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)):
        where = f"{'>' if open_low else '>='} {low:g}" if high == math.inf else \
            f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name}={value!r} must be a finite number {where}{note}")


def check_seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name}={value!r} must be an integer in [0, {SEED_MAX}] (2**32 - 1)")


def check_data(data: DictConfig) -> None:
    check_integer("data.micro_batch_size", data.micro_batch_size)
    check_number("data.val_fraction", data.val_fraction, 0, 1, open_low=True, open_high=True,
                 note=" (the share of documents that go to the validation split)")
    check_seed("data.split_seed", data.split_seed)
    check_seed("data.shuffle_seed", data.shuffle_seed)


def check_trainer(trainer: DictConfig) -> None:
    if not str(trainer.output_dir or "").strip():
        raise ValueError(f"trainer.output_dir={trainer.output_dir!r} is empty: the run would write its checkpoints "
                         f"and metrics into the current directory; name a folder (default: outputs/<date>_<time>)")
    for key in ("max_steps", "gradient_accumulation_steps", "warmup_steps", "log_every", "save_every",
                "eval_batches", "eval_position_buckets"):
        check_integer(f"trainer.{key}", trainer[key])
    check_integer("trainer.eval_every", trainer.eval_every, minimum=0)
    for key in ("keep_last_checkpoints", "num_threads", "profile_step"):
        if trainer[key] is not None:
            check_integer(f"trainer.{key}", trainer[key])
    if trainer.profile_step is not None and trainer.profile_step > trainer.max_steps:
        raise ValueError(f"trainer.profile_step={trainer.profile_step} is after the last step (trainer.max_steps="
                         f"{trainer.max_steps}), so nothing would be profiled; use a step in [1, {trainer.max_steps}] "
                         f"or null (no profile)")
    check_number("trainer.lr", trainer.lr, 0, open_low=True)
    check_number("trainer.min_lr_ratio", trainer.min_lr_ratio, 0, 1)
    check_number("trainer.weight_decay", trainer.weight_decay, 0)
    check_number("trainer.eps", trainer.eps, 0, open_low=True, note=" (AdamW's denominator term; e.g. 1e-8)")
    check_number("trainer.grad_clip", trainer.grad_clip, 0, note=" (gradient 2-norm clip; 0 disables it)")
    if len(trainer.betas) != 2 or not all(0 <= b < 1 for b in trainer.betas):
        raise ValueError(f"trainer.betas={list(trainer.betas)} must be two numbers in [0, 1)")
    check_seed("trainer.seed", trainer.seed)
    check_peak_flops(trainer.peak_flops)
    if trainer.peak_flops != "auto" and not math.isfinite(trainer.peak_flops):
        raise ValueError(f"trainer.peak_flops={trainer.peak_flops!r} must be 'auto' or a positive finite number "
                         f"(FLOP/s of one device, for MFU; e.g. 989e12 for an H100 in bf16)")
    check_nonfinite_policy(trainer.nonfinite_loss)


def model_device(distributed_backend: str | None) -> tuple[str, str]:
    """Where the trainer puts the model (engine.py's _engine_on_cpu), and why: CUDA unless it is unavailable or
    the ranks talk gloo."""
    if not torch.cuda.is_available():
        return "cpu", "the model runs on the CPU: CUDA is not available"
    if distributed_backend == "gloo":
        return "cpu", "the model runs on the CPU: distributed.backend='gloo'"
    return "cuda", "the model runs on CUDA"


def check_backends(cfg: DictConfig) -> None:
    """distributed.backend and attention.backend: known names, and runnable on this machine."""
    backend = cfg.distributed.backend
    if backend not in DISTRIBUTED_BACKENDS:
        raise ValueError(f"distributed.backend={backend!r} is not one of {list(DISTRIBUTED_BACKENDS)} "
                         f"(null: nccl with CUDA, else gloo)")
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()):
        why = "CUDA is not available" if not torch.cuda.is_available() else "this torch has no NCCL"
        raise ValueError(f"distributed.backend='nccl' needs CUDA and a torch built with NCCL ({why}); use null "
                         f"(nccl with CUDA, else gloo) or 'gloo'")
    kernel = cfg.attention.backend
    if kernel is None:
        return
    if kernel not in BACKENDS:
        raise ValueError(f"attention.backend={kernel!r} is not one of {[None, *BACKENDS]} "
                         f"(null: the fastest kernel for the device)")
    device, why = model_device(backend)
    ds = cfg.deepspeed
    dtype = (torch.bfloat16 if OmegaConf.select(ds, "bf16.enabled", default=False) else
             torch.float16 if OmegaConf.select(ds, "fp16.enabled", default=False) else torch.float32)
    # what select_backend reads of a query (device, dtype, head dim), without making a tensor on the device
    query = SimpleNamespace(device=torch.device(device), dtype=dtype,
                            shape=(1, 1, cfg.model.num_heads, cfg.model.dim // cfg.model.num_heads))
    try:
        select_backend(query, kernel)
    except ValueError as error:
        usable = [name for name in BACKENDS if _selectable(query, name)]
        raise ValueError(f"attention.backend={kernel!r} cannot run here: {error} ({why}); use null (the fastest "
                         f"kernel for the device) or one of {usable}") from None


def _selectable(query: Any, backend: str) -> bool:
    try:
        select_backend(query, backend)
    except ValueError:
        return False
    return True
