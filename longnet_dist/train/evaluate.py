"""Validation: loss and bits per byte over a fixed set of windows, and loss by position bucket.

Loss by position answers "does the model use long context?": if it does, tokens far into the
window (more context before them) get a lower loss than the first ones.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def position_bucket_edges(seq_len: int, num_buckets: int) -> list[int]:
    """Log-spaced edges [0, N/2^(k-1), ..., N/4, N/2, N]: k buckets, each twice as wide as the one before
    (fewer when N is too short for k distinct powers of two)."""
    return sorted({0} | {max(1, seq_len >> shift) for shift in range(num_buckets)})


def bits_per_byte(loss_nats: float, tokens_per_byte: float) -> float:
    """Nats per token -> bits per UTF-8 byte of the text."""
    return loss_nats / math.log(2) * tokens_per_byte


@torch.no_grad()
def evaluate(engine, loader, *, num_batches: int, seq_len: int, num_buckets: int, sequence_group, ignore_index: int,
             tokens_per_byte: float) -> dict:
    """Mean loss over `num_batches` batches of `loader.iter_epoch` (same windows every call), reduced
    over all ranks. Returns {"loss", "bits_per_byte", "tokens", "buckets": [row dicts]}."""
    edges = torch.tensor(position_bucket_edges(seq_len, num_buckets))
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    for batch in loader.iter_epoch(0, max_steps=num_batches):
        labels = batch["labels"].to(engine.device)
        losses = engine(batch["input_ids"].to(engine.device), labels=labels,
                        positions=batch["positions"].to(engine.device), sequence_group=sequence_group)  # (B, l)
        counted = (labels != ignore_index).double().cpu()
        bucket = torch.bucketize(batch["positions"], edges[1:], right=True)  # (l,) bucket of each position
        sums.index_add_(0, bucket, (losses.double().cpu() * counted).sum(0))
        counts.index_add_(0, bucket, counted.sum(0))
    engine.train(was_training)
    totals = torch.cat([sums, counts])
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = engine.device if dist.get_backend() == "nccl" else "cpu"
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    sums, counts = totals.chunk(2)
    loss = float(sums.sum() / counts.sum())
    rows = []
    for index in range(len(sums)):
        bucket_loss = float(sums[index] / counts[index]) if counts[index] > 0 else float("nan")
        rows.append({"position_start": int(edges[index]), "position_end": int(edges[index + 1]),
                     "tokens": int(counts[index]), "loss": bucket_loss,
                     "bits_per_byte": bits_per_byte(bucket_loss, tokens_per_byte)})
    return {"loss": loss, "bits_per_byte": bits_per_byte(loss, tokens_per_byte), "tokens": int(counts.sum()),
            "buckets": rows}
