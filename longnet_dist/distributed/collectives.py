"""Collectives over a `SequenceGroup`, with byte accounting in the process-wide `CommStats`.

- `all_gather_tensor` / `all_gather_tensor_async`: concatenate every rank's tensor along `dim`,
  in group-rank order. Not autograd-aware.
- `reduce_scatter_tensor` / `reduce_scatter_tensor_async`: sum the tensors of all ranks, split
  along `dim` into `size` equal slices, and keep slice `rank`. Not autograd-aware.
- `all_gather_along`: autograd-aware all-gather whose backward is the reduce-scatter of the
  gradient (rank r receives the sum over ranks of the gradient slice r), which is the gradient of
  the sum of all ranks' losses.

Bytes (INTERFACES.md): an all-gather of a b-byte tensor over G ranks sends and receives (G-1)*b;
a reduce-scatter whose output slice has b bytes moves the same. A group of one rank moves nothing:
its collectives return a copy and are not counted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from longnet_dist.distributed.sequence_group import SequenceGroup
from longnet_dist.distributed.stats import comm_stats

# torch >= 2.12 renamed the single-tensor collectives; the old names still work but warn.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class PendingCollective:
    """Handle of a collective started with async_op; `wait()` returns its result tensor."""

    def __init__(self, work: dist.Work | None, buffer: torch.Tensor, finish: Callable[[torch.Tensor], torch.Tensor],
                 source: torch.Tensor | None = None):
        self._work = work
        self._source = source  # the sent tensor, kept alive until the collective is done
        self._buffer = buffer
        self._finish = finish
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        """Block until the collective is done (once) and return the result."""
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = self._finish(self._buffer)
            self._buffer = self._source = None
        return self._result


def _checked_dim(x: torch.Tensor, dim: int, group: SequenceGroup) -> int:
    """`dim` as a non-negative index, after checking `group` and `dim` (ValueError if bad)."""
    if not isinstance(group, SequenceGroup):
        raise ValueError(f"group must be a SequenceGroup (e.g. mesh.sequence_group), got {group!r}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _record(group: SequenceGroup, slice_bytes: int, tag: str | None) -> None:
    moved = (group.size - 1) * slice_bytes
    comm_stats().record(sent_bytes=moved, received_bytes=moved, tag=tag)


def all_gather_tensor_async(
    x: torch.Tensor, dim: int, group: SequenceGroup, *, tag: str | None = None
) -> PendingCollective:
    """Start an all-gather of `x` along `dim`; `.wait()` returns (..., size * x.shape[dim], ...).

    Every rank must pass a tensor of the same shape and dtype.
    """
    dim = _checked_dim(x, dim, group)
    if group.size == 1:
        return PendingCollective(None, x.clone(), lambda copy: copy)
    # Flat buffers: gloo accepts only the concatenated (not the stacked) form.
    flat_source = x.contiguous().view(-1)  # (x.numel(),)
    flat_gathered = x.new_empty(group.size * x.numel())  # (G * x.numel(),)
    work = _all_gather_single(flat_gathered, flat_source, group=group.group, async_op=True)
    _record(group, x.numel() * x.element_size(), tag)

    def finish(gathered: torch.Tensor) -> torch.Tensor:
        # (G, ..., d, ...) -> (..., G, d, ...) -> (..., G*d, ...): rank order along dim
        return gathered.view(group.size, *x.shape).movedim(0, dim).flatten(dim, dim + 1)

    return PendingCollective(work, flat_gathered, finish, flat_source)


def all_gather_tensor(x: torch.Tensor, dim: int, group: SequenceGroup, *, tag: str | None = None) -> torch.Tensor:
    """All-gather `x` along `dim` in group-rank order (blocking, not autograd-aware)."""
    return all_gather_tensor_async(x, dim, group, tag=tag).wait()


def reduce_scatter_tensor_async(
    x: torch.Tensor, dim: int, group: SequenceGroup, *, tag: str | None = None
) -> PendingCollective:
    """Start a reduce-scatter (sum) of `x` along `dim`; `.wait()` returns this rank's summed slice.

    x.shape[dim] must be divisible by the group size; every rank passes the same shape.
    """
    dim = _checked_dim(x, dim, group)
    if x.shape[dim] % group.size != 0:
        raise ValueError(
            f"reduce_scatter_tensor: size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) is not "
            f"divisible by the group size {group.size}"
        )
    if group.size == 1:
        return PendingCollective(None, x.clone(), lambda copy: copy)
    slice_length = x.shape[dim] // group.size
    # (..., G*d, ...) -> (..., G, d, ...) -> (G, ..., d, ...): slice r of every rank lands on rank r
    stacked = x.unflatten(dim, (group.size, slice_length)).movedim(dim, 0).contiguous()
    flat_output = x.new_empty(stacked[0].numel())  # (x.numel() / G,)
    work = _reduce_scatter_single(flat_output, stacked.view(-1), group=group.group, async_op=True)
    _record(group, flat_output.numel() * flat_output.element_size(), tag)
    return PendingCollective(work, flat_output, lambda reduced: reduced.view(stacked.shape[1:]), stacked)


def reduce_scatter_tensor(x: torch.Tensor, dim: int, group: SequenceGroup, *, tag: str | None = None) -> torch.Tensor:
    """Reduce-scatter (sum) `x` along `dim` (blocking, not autograd-aware)."""
    return reduce_scatter_tensor_async(x, dim, group, tag=tag).wait()


class _AllGatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: SequenceGroup, tag: str | None) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.tag = dim, group, tag
        return all_gather_tensor(x, dim, group, tag=tag)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return reduce_scatter_tensor(grad_output, ctx.dim, ctx.group, tag=ctx.tag), None, None, None


def all_gather_along(x: torch.Tensor, dim: int, group: SequenceGroup, *, tag: str | None = None) -> torch.Tensor:
    """Autograd-aware all-gather along `dim` in group-rank order; backward is a reduce-scatter.

    Every rank of the group must call backward through it (the backward is a collective too).
    """
    return _AllGatherAlong.apply(x, _checked_dim(x, dim, group), group, tag)
