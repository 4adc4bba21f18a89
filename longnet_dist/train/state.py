"""What a checkpoint carries besides DeepSpeed's own state, and which checkpoint a run resumes from."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longnet_dist.distributed.objects import all_gather_object, rank_and_world

from .checkpoint import MANIFEST_NAME, checkpoints_root, find_latest_checkpoint

logger = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def client_state(step: int, loader_state: dict[str, Any], config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The client_state of a checkpoint (collective: gathers every rank's RNG states)."""
    return {"step": step, "data": loader_state, "rng": all_gather_object(rng_states()), "config": config,
            "world_size": rank_and_world()[1], **extra}


def restore_rng(saved: list[dict[str, Any]]) -> None:
    """Each rank takes its own saved RNG state; with another world size all take rank 0's."""
    rank, world = rank_and_world()
    if len(saved) != world:
        logger.warning("checkpoint has RNG states of %d ranks, this run has %d: every rank takes rank 0's",
                       len(saved), world)
        rank = 0
    set_rng_states(saved[rank])


def resolve_resume(resume: str | None, checkpoint_root: Path) -> Path | None:
    """The checkpoint folder to load, or None for a fresh start.

    resume: None -> fresh; "auto" -> newest complete checkpoint under `checkpoint_root` (None if
    there is none yet); a checkpoint folder (has a manifest); a checkpoints root or a run directory
    (its checkpoints/) -> the newest complete one there (ValueError if none).
    """
    if resume is None:
        return None
    if resume == "auto":
        return find_latest_checkpoint(checkpoint_root) if checkpoint_root.is_dir() else None
    path = Path(resume)
    if (path / MANIFEST_NAME).is_file():
        return path
    root = checkpoints_root(path)
    latest = find_latest_checkpoint(root) if root.is_dir() else None
    if latest is None:
        raise ValueError(f"resume={resume!r}: no complete checkpoint in {root} (expected step_XXXXXXXX folders "
                         f"with a manifest)")
    return latest
