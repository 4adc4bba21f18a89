"""`init_from`: a fresh run that starts from another run's weights (model weights only).

The optimizer state, the LR schedule, the step and the data position start anew, so everything that a resume
must keep may change: the sequence length (e.g. 4K -> 32K to extend the context), the attention branches, the
batch, the corpus, the number of processes, the ZeRO stage. What must match is what shapes and means the
weights: the model's dims, layers, heads, MLP, norm, tied embeddings, and the tokenizer (the embedding rows).

The source is an exported folder (`longnet-export`), a checkpoint folder, or a run directory (its newest complete
checkpoint); any ZeRO stage or bf16 (train/export.py joins the fp32 master weights). Every rank loads them into
its model before DeepSpeed builds the engine, which then shards them as for a fresh model. A run with its own
checkpoints resumes those instead (a requeued job continues itself; it does not start over from `init_from`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from longnet_dist.model import LongNetLM
from longnet_dist.model.io import is_exported
from longnet_dist.model.layers import default_mlp_hidden_dim

from .checkpoint import resolve_checkpoint
from .export import load_model

# LongNetConfig fields that shape the weights or give them their meaning (the rest may change between runs)
WEIGHT_FIELDS = ("vocab_size", "dim", "num_layers", "num_heads", "mlp", "mlp_hidden_dim", "norm", "tie_embeddings")


def resolve_source(init_from: str) -> Path:
    """The folder `init_from` names (an export, or a complete checkpoint found and verified byte for byte);
    CheckpointError naming what is wrong."""
    path = Path(str(init_from)).expanduser()
    return path if is_exported(path) else resolve_checkpoint(path)


def _tokenizer_identity(spec: str) -> str:
    """'bytes', or a tokenizer file's sha256 (its path when the file is gone: compared as a name then)."""
    path = Path(spec).expanduser()
    if spec == "bytes" or not path.is_file():
        return spec
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shape_fields(model: LongNetLM) -> dict[str, Any]:
    fields = dataclasses.asdict(model.config)
    if fields["mlp_hidden_dim"] is None:  # null in a config: the default for its mlp and dim
        fields["mlp_hidden_dim"] = default_mlp_hidden_dim(fields["mlp"], fields["dim"])
    return {name: fields[name] for name in WEIGHT_FIELDS}


def load_initial_weights(model: LongNetLM, source: Path, tokenizer: str) -> dict[str, Any]:
    """Copy the weights of `source` (resolve_source) into `model`; return the source's meta (step, seq_len,
    tokenizer, source). ValueError, before any weight is copied, naming each model setting and the tokenizer
    where the two runs differ."""
    donor, meta = load_model(source)
    theirs, ours = _shape_fields(donor), _shape_fields(model)
    changed = [f"model {name}: {theirs[name]!r} there, {ours[name]!r} here" for name in WEIGHT_FIELDS
               if theirs[name] != ours[name]]
    if _tokenizer_identity(str(meta["tokenizer"])) != _tokenizer_identity(str(tokenizer)):
        changed.append(f"data.tokenizer: {meta['tokenizer']!r} there, {tokenizer!r} here (another vocabulary)")
    if changed:
        raise ValueError(f"init_from={str(source)!r}: its weights do not fit this run's model: " + "; ".join(changed)
                         + ". Set these as that run had them, or start without init_from")
    with torch.no_grad():
        model.load_state_dict(donor.state_dict(), strict=True)  # fp32 into fp32; the engine casts afterwards
    return meta
