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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from longnet_dist.data.tokenizer import file_tokenizer_name
from longnet_dist.model import LongNetLM
from longnet_dist.model.io import is_exported
from longnet_dist.model.layers import default_mlp_hidden_dim

from .checkpoint import read_manifest, resolve_checkpoint
from .export import load_model

# LongNetConfig fields that shape the weights or give them their meaning (the rest may change between runs)
WEIGHT_FIELDS = ("vocab_size", "dim", "num_layers", "num_heads", "mlp", "mlp_hidden_dim", "norm", "tie_embeddings")


def resolve_init_source(init_from: str) -> Path:
    """The folder `init_from` names (an export, or a complete checkpoint found and verified byte for byte);
    ValueError for a path that does not exist, CheckpointError naming what is wrong with one that does."""
    path = Path(str(init_from)).expanduser()
    if not path.exists():
        raise ValueError(f"init_from={str(init_from)!r}: no such path; use null (weights initialised at random) or an "
                         f"exported model folder, a checkpoint folder or a run directory to start from its weights")
    return path if is_exported(path) else resolve_checkpoint(path)


def tokenizer_id(spec: str) -> str | None:
    """The name a corpus records for tokenizer `spec` (data/tokenizer.py): 'bytes', or file_tokenizer_name of the
    file; None for a file that is not there (e.g. a relative path given in another directory)."""
    if spec == "bytes":
        return spec
    path = Path(spec).expanduser()
    return file_tokenizer_name(path) if path.is_file() else None


def _source_tokenizer_id(source: Path, meta: dict[str, Any]) -> str | None:
    """The tokenizer id of the run that wrote `source`: recorded in a checkpoint's manifest (since stop 35), else
    that of the file its config names, as found from here (an export carries the file itself)."""
    if not is_exported(source):
        recorded = read_manifest(source).get("tokenizer")
        if recorded is not None:
            return recorded
    return tokenizer_id(str(meta["tokenizer"]))


def _shape_fields(model: LongNetLM) -> dict[str, Any]:
    fields = dataclasses.asdict(model.config)
    if fields["mlp_hidden_dim"] is None:  # null in a config: the default for its mlp and dim
        fields["mlp_hidden_dim"] = default_mlp_hidden_dim(fields["mlp"], fields["dim"])
    return {name: fields[name] for name in WEIGHT_FIELDS}


def load_initial_weights(model: LongNetLM, source: Path, tokenizer: str,
                         tokenizer_name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Copy the weights of `source` (resolve_init_source) into `model`; return the source's meta (step, seq_len,
    tokenizer, source) and its fp32 weights (for write_master_weights once the engine is built). `tokenizer`: this
    run's data.tokenizer, `tokenizer_name` its id (tokenizer_id). ValueError, before any weight is copied, naming
    each model setting and the tokenizer where the two runs differ (a tokenizer file that cannot be found from here
    is compared by the vocabulary size alone)."""
    donor, meta = load_model(source)
    theirs, ours = _shape_fields(donor), _shape_fields(model)
    changed = [f"model {name}: {theirs[name]!r} there, {ours[name]!r} here" for name in WEIGHT_FIELDS
               if theirs[name] != ours[name]]
    their_tokenizer = _source_tokenizer_id(source, meta)
    if their_tokenizer is not None and their_tokenizer != tokenizer_name:
        changed.append(f"data.tokenizer: {meta['tokenizer']!r} ({their_tokenizer}) there, {tokenizer!r} "
                       f"({tokenizer_name}) here: another vocabulary")
    if changed:
        raise ValueError(f"init_from={str(source)!r}: its weights do not fit this run's model: " + "; ".join(changed)
                         + ". Set these as that run had them, or start without init_from")
    weights = donor.state_dict()
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)  # fp32 into fp32; a bf16 engine rounds them (write_master_weights)
    return meta, weights


def _master_partitions(optimizer) -> list[tuple[list[Tensor], Tensor, Tensor, Tensor]]:
    """Per parameter group of a DeepSpeed optimizer that keeps its module in 16 bits: (the group's parameters,
    the flat 16-bit buffer they are views of, this rank's partition of it, the fp32 master copy of that partition).
    BF16_Optimizer (`deepspeed=bf16`) and ZeRO-1/2's optimizer; [] for others (ZeRO-3 partitions the parameters
    themselves; a plain torch optimizer steps the fp32 parameters)."""
    if hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
        names = ("bf16_groups", "bf16_groups_flat", "bf16_partitioned_groups", "fp32_groups_flat_partition")
    elif hasattr(optimizer, "single_partition_of_fp32_groups"):  # DeepSpeedZeroOptimizer (stages 1 and 2)
        names = ("bit16_groups", "bit16_groups_flat", "parallel_partitioned_bit16_groups",
                 "single_partition_of_fp32_groups")
    else:
        return []
    groups, flats, partitions, masters = (getattr(optimizer, name) for name in names)
    ranks = [torch.distributed.get_rank(group=group) for group in optimizer.real_dp_process_group]
    return [(groups[i], flats[i], partitions[i][ranks[i]], masters[i]) for i in range(len(masters))]


def write_master_weights(engine, weights: dict[str, Tensor]) -> bool:
    """Give a 16-bit engine's fp32 master weights the source's fp32 values: DeepSpeed built them from the module
    rounded to bf16, so init_from would otherwise start from the rounded weights (a resume keeps its fp32 masters).
    Each parameter is a view of its group's flat buffer; its place there is where its values go in an fp32 copy of
    that buffer, whose slice at this rank's partition becomes the master. Returns whether there were masters to
    write (False: ZeRO-3, or an fp32 engine, which already holds `weights`)."""
    partitions = _master_partitions(engine.optimizer)
    names = {id(param): name for name, param in engine.module.named_parameters()}
    for params, flat, partition, master in partitions:
        values = torch.zeros(flat.numel(), dtype=torch.float32)  # an fp32 copy of the flat buffer
        base = flat.storage_offset()
        for param in params:
            start = param.data.storage_offset() - base
            values[start:start + param.numel()] = weights[names[id(param)]].flatten()
        start = partition.storage_offset() - base
        with torch.no_grad():
            master.copy_(values[start:start + master.numel()].to(master.device, master.dtype))
    return bool(partitions)
