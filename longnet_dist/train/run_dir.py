"""Guards of a run directory, checked on rank 0 before anything is written into it: a fresh start never
mixes its checkpoints with another run's, and a resume refuses a checkpoint whose model or optimizer
layout differs from this run's (DeepSpeed would fail deep inside, or load a mismatched state)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .checkpoint import CheckpointError, list_checkpoints, read_manifest

# keys whose change makes a checkpoint unloadable or wrong for this run: the weights' shapes and meaning and the
# vocabulary (no run can start from such weights), and how DeepSpeed lays out the optimizer state (init_from can)
WEIGHT_KEYS = ("model.dim", "model.num_layers", "model.num_heads", "model.mlp", "model.mlp_hidden_dim", "model.norm",
               "model.tie_embeddings", "data.tokenizer")
RESUME_KEYS = (*WEIGHT_KEYS, "deepspeed.zero_optimization.stage", "deepspeed.bf16.enabled")


def check_fresh_start(resume: str | None, resume_from: Path | None, checkpoint_root: Path) -> None:
    """ValueError when this run would write its checkpoints beside another run's: `checkpoint_root` already holds
    step folders and the run neither continues them (resume=auto) nor rolls back to one of them (resume=<one of
    its folders>). keep_last_checkpoints would then delete the newer run's checkpoints and keep the old ones,
    and resume=auto would later continue the old run."""
    if resume == "auto" or not checkpoint_root.is_dir():
        return
    existing = list_checkpoints(checkpoint_root)
    if not existing:
        return
    if resume_from is not None and checkpoint_root.resolve() in resume_from.resolve().parents:
        return  # a roll-back within this run
    started = "a fresh run (resume=null)" if resume_from is None else f"a run from {resume_from}"
    raise ValueError(
        f"trainer.output_dir={str(checkpoint_root.parent)!r} already holds the checkpoints of a run (newest "
        f"{existing[-1].name}); {started} would mix its checkpoints with those and overwrite its metrics. Use "
        f"resume=auto to continue that run, or a new trainer.output_dir (or remove {checkpoint_root} to start over "
        f"there)")


def _value(config: Any, dotted: str) -> Any:
    return OmegaConf.select(config, dotted, default=None)


def check_resume_compatible(resume_from: Path, config: Any, world_size: int = 1) -> None:
    """ValueError naming every RESUME_KEYS value that differs between this run's `config` and the run that
    wrote `resume_from` (its run directory's config.yaml, written once a start succeeded; nothing to compare
    when that file is missing, a checkpoint copied out of its run), and a ZeRO checkpoint (stage 1-3: the
    optimizer state is partitioned over the ranks) written by another number of processes than `world_size`."""
    changed, sources, weights_changed = [], [], False
    try:
        saved_world = read_manifest(resume_from).get("world_size")
    except CheckpointError:  # loading it says so, on every rank
        saved_world = None
    stage = _value(config, "deepspeed.zero_optimization.stage") or 0
    if stage >= 1 and saved_world is not None and saved_world != world_size:
        changed.append(f"{saved_world} processes wrote its ZeRO-{stage} partitions, this run has {world_size}")
        sources.append(resume_from / "manifest.json")
    saved_path = resume_from.parent.parent / "config.yaml"
    if saved_path.is_file():
        saved = OmegaConf.load(saved_path)
        keys = [key for key in RESUME_KEYS if _value(saved, key) != _value(config, key)]
        changed += [f"{key}: {_value(saved, key)!r} in the checkpoint's run, {_value(config, key)!r} now"
                    for key in keys]
        sources += [saved_path] if keys else []
        weights_changed = any(key in WEIGHT_KEYS for key in keys)
    if changed:
        way_out = ("start fresh in a new trainer.output_dir" if weights_changed else
                   "start a new run from its weights in a new trainer.output_dir (init_from=<that checkpoint>: the "
                   "optimizer starts anew)")
        raise ValueError(
            f"cannot resume from {resume_from}: " + "; ".join(changed) + f" (see {', '.join(map(str, sources))}). "
            f"Resume with the values it was trained with, or {way_out}")
