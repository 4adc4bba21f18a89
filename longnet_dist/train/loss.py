"""The loss each rank hands to DeepSpeed, scaled so DeepSpeed's gradient average is the exact gradient.

Every rank of the world (dp x sp) holds its own tokens: sp ranks hold slices of one sample, dp
replicas hold other samples. The objective is the token-weighted mean over the global micro-batch:

    L = sum_r S_r / T,    S_r = sum of rank r's token losses,  T = sum_r T_r (tokens of all ranks)

Autograd on rank r computes g_r = d(l_r)/d(theta) of its backward loss l_r. The sharded attention's
all-gather has a reduce-scatter (a sum) as backward, so the key/value gradients caused by other
ranks' queries come back to the rank that owns those keys: sum_r g_r = d(sum_r l_r)/d(theta).
DeepSpeed is given the whole world as its data-parallel group and averages: g = (1/W) sum_r g_r.
With l_r = W * S_r / T this gives g = d(sum_r S_r / T)/d(theta) = dL/d(theta), the gradient of
the full-sequence loss, whatever dp x sp split runs it. (T is a constant: an all-reduce of counts.)
Gradient accumulation: DeepSpeed divides each micro-batch by the accumulation steps, i.e. averages
micro-batches; they hold equal token counts here (no padding), so that is the token-weighted mean.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .host_reads import DeviceValue


class MicroBatchLoss:
    """One micro-batch's loss. `backward_loss` (l_r = W * S_r / T, what engine.backward gets on this rank) is
    built on the device; the global sums are read on the host only when first asked for (`mean`,
    `global_sum`, `global_tokens`), through host_reads.DeviceValue: on a GPU that read waits for this forward
    only, so a caller that asks after queueing the backward keeps the GPU busy."""

    def __init__(self, backward_loss: Tensor, totals: Tensor):
        self.backward_loss = backward_loss
        self._totals = DeviceValue(totals)  # (2,) float64: sum_r S_r, T, identical on every rank
        self._read: tuple[float, float] | None = None

    def _values(self) -> tuple[float, float]:
        if self._read is None:
            global_sum, global_tokens = self._totals.get()
            if global_tokens == 0:
                raise ValueError("the micro-batch has no labelled token on any rank (all labels are ignore_index)")
            self._read = global_sum, global_tokens
        return self._read

    @property
    def global_sum(self) -> float:
        return self._values()[0]

    @property
    def global_tokens(self) -> float:
        return self._values()[1]

    @property
    def mean(self) -> float:
        """The global token-weighted mean loss L (nats per token)."""
        global_sum, global_tokens = self._values()
        return global_sum / global_tokens


def sequence_parallel_loss(token_losses: Tensor, labels: Tensor, ignore_index: int) -> MicroBatchLoss:
    """token_losses, labels (B, n) of this rank -> the scaled backward loss and the global mean.

    Collective over the whole world when torch.distributed is initialised (one all-reduce). Nothing is read
    on the host here; a micro-batch without a labelled token on any rank raises when its mean is read (its
    backward loss is not finite).
    """
    counted = labels != ignore_index
    local_sum = token_losses.sum()
    totals = torch.stack([local_sum.detach().double(), counted.sum().double()])  # (2,): S_r, T_r
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        if world_size > 1:
            dist.all_reduce(totals)  # (2,): sum_r S_r, T
    # W / T rounded once to the loss dtype: the bits of multiplying by the Python float W / T
    # (token losses are float32, or float64 for a float64 model)
    return MicroBatchLoss(local_sum * (world_size / totals[1]).to(local_sum.dtype), totals)
