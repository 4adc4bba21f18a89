"""How the token-wise regions of a block run: in row chunks, recomputed in backward, compiled.

A region is a function of tensors whose rows (dim 1) are independent (norms, projections, rotary,
MLP, loss): it can run `chunk_size` rows at a time, each chunk under activation checkpointing, and
be compiled on its own (regional compilation: short compile times, and the attention's
autograd.Function stays outside every compiled graph).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHECKPOINTING = ("none", "full", "selective")
COMPILE = ("auto", True, False)


def checkpointing_policy(value) -> str:
    """The activation checkpointing policy of a config value; True/False are "full"/"none" (older configs)."""
    if value is True or value is False:
        return "full" if value else "none"
    if value not in CHECKPOINTING:
        raise ValueError(f"model activation_checkpointing={value!r} is not one of {list(CHECKPOINTING)} "
                         f"(or true = full, false = none)")
    return value


def compile_setting(value) -> str | bool:
    """Checks a `compile` config value: "auto" (on for CUDA, off for CPU), true or false."""
    if not any(value is option or (isinstance(option, str) and value == option) for option in COMPILE):
        raise ValueError(f"model compile={value!r} is not one of ['auto', true, false]")
    return value


def compile_enabled(setting: str | bool, device: torch.device) -> bool:
    """Whether regions compile on `device`: "auto" compiles on CUDA only (inductor on a small CPU
    compiles for minutes and gains little in fp32)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_region(fn: Callable, backend: str = "inductor", fullgraph: bool = False) -> Callable:
    """torch.compile of one region with static shapes (chunks have one size). The regions have no
    graph break (tests compile them with fullgraph=True); training tolerates one that a wrapper
    (e.g. an engine's module hook) might add, instead of failing."""
    return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=False)


def token_wise(fn: Callable, *tensors: Tensor, chunk_size: int | None = None, recompute: bool = False):
    """fn over `chunk_size`-row slices along dim 1 of `tensors`, outputs concatenated along dim 1.

    With `recompute` and grad enabled every slice is checkpointed (non-reentrant): only its inputs
    are kept and its intermediates are rebuilt in backward, one slice at a time. chunk_size None, or
    inputs no longer than it, make one slice. fn returns a tensor or a tuple of tensors.
    The slices come from one `split` per tensor, not an index per slice: the backward of an indexed
    slice is a gradient of the whole tensor (zeros but for the slice), so N / chunk_size slices would
    cost O(N^2 / chunk_size) memory traffic (66 s instead of 2 s at N = 1M on 2 CPU cores); split's
    backward concatenates the slices' gradients once.
    """
    run = functools.partial(checkpoint, fn, use_reentrant=False) if recompute and torch.is_grad_enabled() else fn
    length = tensors[0].shape[1]
    size = length if chunk_size is None else chunk_size
    if length <= size:
        return run(*tensors)
    pieces = [run(*rows) for rows in zip(*(t.split(size, dim=1) for t in tensors))]
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))
    return torch.cat(pieces, dim=1)
