"""The exported model folder: `model.safetensors` + `config.json`; loads with torch and safetensors only.

config.json holds {"format", "model": LongNetConfig fields, "tokenizer": "bytes" or a file in the folder,
"seq_len": the training sequence length, "step", "source"}. `longnet-export` (longnet_dist/export.py)
writes it from a training checkpoint; `LongNetLM.from_checkpoint(folder)` reads it back.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .lm import LongNetConfig, LongNetLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EXPORT_FORMAT = "longnet_dist-export-1"


def is_exported(path: str | os.PathLike) -> bool:
    """True for a folder written by save_exported (it has config.json and model.safetensors)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def save_exported(model: LongNetLM, out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write `model`'s fp32 weights and config (+ `meta`: tokenizer, seq_len, step, source) into `out_dir`.

    Files are written under temporary names and renamed into place, config.json last, so a crash
    never leaves a folder that looks complete.
    """
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"format": EXPORT_FORMAT, "model": dataclasses.asdict(model.config), **meta}
    weights_temp, config_temp = out_dir / f".{WEIGHTS_NAME}.tmp", out_dir / f".{CONFIG_NAME}.tmp"
    save_model(model.float(), str(weights_temp))  # tied head/embedding weights are stored once
    config_temp.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(weights_temp, out_dir / WEIGHTS_NAME)
    os.replace(config_temp, out_dir / CONFIG_NAME)
    return out_dir


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LongNetLM, dict[str, Any]]:
    """(model in eval mode on `device`, the rest of config.json) of an exported folder."""
    from safetensors.torch import load_model

    path = Path(path)
    if not is_exported(path):
        raise FileNotFoundError(f"{path} is not an exported model folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                                f"(written by `longnet-export CHECKPOINT OUT_DIR`)")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON ({error}); export the checkpoint again") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path / CONFIG_NAME} has format {meta.get('format')!r}; this version reads "
                         f"{EXPORT_FORMAT!r}")
    model = LongNetLM(LongNetConfig(**meta.pop("model")))
    try:
        load_model(model, str(path / WEIGHTS_NAME), strict=True, device=str(device))
    except RuntimeError:
        raise  # the weights do not fit the model of config.json: torch names the tensors
    except Exception as error:  # noqa: BLE001 - safetensors' own error types: a damaged file
        raise ValueError(f"{path / WEIGHTS_NAME} cannot be read ({type(error).__name__}: {error}); export the "
                         f"checkpoint again") from None
    return model.to(device).eval(), meta
