"""Training checkpoints -> a model for inference, and the export to one safetensors file + config.json.

A checkpoint folder holds DeepSpeed's files; the model weights come from
  ZeRO 0:    mp_rank_00_model_states.pt["module"] (whole weights, cast to fp32),
  ZeRO 1-3:  DeepSpeed's zero_to_fp32 utilities (the fp32 master weights gathered from every rank's
             optimizer shard; ZeRO-3 model-state files hold only placeholders),
  bf16:      (`deepspeed=bf16`, DeepSpeed's BF16_Optimizer) its fp32 master weights, joined here
             (`_bf16_master_weights`: zero_to_fp32 does not read its files),
and the model shape from the resolved run config the trainer stores in every checkpoint. The
vocabulary size is the embedding's row count. Loading runs in one process, on CPU first.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from longnet_dist.model import LongNetLM
from longnet_dist.model.io import is_exported, load_exported, save_exported

from .checkpoint import CheckpointError, checkpoint_step, resolve_checkpoint
from .config import model_config

logger = logging.getLogger(__name__)
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _model_states(folder: Path) -> dict[str, Any]:
    for name in MODEL_STATES:
        if (folder / name).is_file():
            return torch.load(folder / name, map_location="cpu", weights_only=False)
    raise CheckpointError(f"{folder} has none of {list(MODEL_STATES)}: not a DeepSpeed checkpoint of this trainer")


def _bf16_optimizer_files(folder: Path) -> list[Path]:
    """The per-rank optimizer files of DeepSpeed's BF16_Optimizer (`deepspeed=bf16`: ZeRO-1, bf16, fp32 gradient
    accumulation), rank order; zero_to_fp32 does not read them (\"not a zero checkpoint\")."""
    files = folder.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt")
    return sorted(files, key=lambda path: int(path.name.split("_")[4]))  # bf16_zero_pp_rank_{r}_mp_...


def _bf16_master_weights(folder: Path, states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a BF16_Optimizer checkpoint. Each parameter group is one flat fp32 vector, the
    group's parameters one after another in `param_shapes` order, then padding, cut into one equal partition per
    rank: the ranks' partitions joined in rank order give it back. Tied parameters (`shared_params`) and buffers
    come from the model states."""
    ranks = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for path in _bf16_optimizer_files(folder)]
    weights: dict[str, torch.Tensor] = {}
    for group, shapes in enumerate(states["param_shapes"]):
        flat = torch.cat([rank["single_partition_of_fp32_groups"][group] for rank in ranks])  # (group numel + pad,)
        sizes = [shape.numel() for shape in shapes.values()]
        if sum(sizes) > flat.numel():
            raise CheckpointError(f"{folder}: parameter group {group} holds {flat.numel()} values in "
                                  f"{len(ranks)} rank file(s), its parameters need {sum(sizes)}: a rank's file missing?")
        for (name, shape), part in zip(shapes.items(), flat[: sum(sizes)].split(sizes)):
            weights[name] = part.view(shape).clone()
    for alias, source in (states.get("shared_params") or {}).items():
        weights[alias] = weights[source]
    for name in states.get("buffer_names") or []:
        weights[name] = states["module"][name].float()
    return weights


def checkpoint_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state dict of the whole model, resolved run config) of one checkpoint folder."""
    folder = Path(folder)
    if not torch.cuda.is_available():  # unpickling DeepSpeed's files imports it: say what it would detect, so that
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # it prints no warning (on stdout, before generated text)
    states = _model_states(folder)
    run_config = states.get("config")
    if not isinstance(run_config, dict):
        raise CheckpointError(f"{folder} carries no run config (client_state['config']); was it saved by "
                              f"longnet_dist.train?")
    stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 0:
        weights = {name: tensor.float() for name, tensor in states["module"].items()}
    elif _bf16_optimizer_files(folder):
        weights = _bf16_master_weights(folder, states)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):  # progress prints and bars
            weights = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        logger.debug("zero_to_fp32: %s", chatter.getvalue())
    return dict(weights), run_config


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LongNetLM, dict[str, Any]]:
    """(model in eval mode, fp32, on `device`; meta) of an exported folder, a checkpoint folder, a
    checkpoints root or a run directory (its newest complete checkpoint).

    meta: {"tokenizer": spec for load_tokenizer, "seq_len": training length, "step", "source"}. The
    attention backend is left to pick the fastest kernel of `device` (the run's may not exist there).
    """
    if is_exported(path):
        model, meta = load_exported(path, device)
        tokenizer = meta["tokenizer"]
        if tokenizer != "bytes":  # a tokenizer file travels inside the folder
            meta["tokenizer"] = str(Path(path) / tokenizer)
        return model, meta
    folder = resolve_checkpoint(path)
    weights, run_config = checkpoint_weights(folder)
    config = model_config(OmegaConf.create(run_config), vocab_size=weights["embed.weight"].shape[0])
    config.attention_backend = None
    model = LongNetLM(config)
    model.load_state_dict(weights, strict=True)
    meta = {"tokenizer": run_config["data"]["tokenizer"], "seq_len": run_config["data"]["seq_len"],
            "step": checkpoint_step(folder), "source": str(folder.resolve())}
    return model.to(device).eval(), meta


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `out_dir`/model.safetensors + config.json from a checkpoint (or run directory); return out_dir.
    An `out_dir` that holds an export already is refused unless `overwrite`; one that is a file, before any work."""
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise ValueError(f"out_dir {str(target)!r} is a file; name a folder to write the export into")
    if not overwrite and is_exported(target):
        raise ValueError(f"out_dir {str(target)!r} already holds an exported model (config.json, model.safetensors); "
                         f"pass --overwrite to replace it, or name another folder")
    model, meta = load_model(checkpoint)
    if meta["tokenizer"] != "bytes":
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(meta["tokenizer"], Path(out_dir) / "tokenizer.json")
        meta["tokenizer"] = "tokenizer.json"
    return save_exported(model, out_dir, meta)
