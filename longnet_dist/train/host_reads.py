"""Where a training step makes the host wait for the device.

On a GPU, reading a tensor's value on the host (`.item()`, `.tolist()`, `bool`/`float`/`int` of a tensor,
`.numpy()`) waits until every kernel queued before it has run, and so does a copy from pageable host memory
to the GPU. The queue is then empty: the GPU idles until the host has launched the next kernel, and stays
host-bound while the host catches up. A step with no such wait lets the host run ahead, so the GPU never
waits on Python. Two ways to find them:

- `HostReads` (any device): records each host read of a tensor's value with the call site that made it (the
  innermost frame outside torch), so the CPU tests can keep the trainer's step free of new ones. Pageable
  copies are invisible here (on the CPU there is no copy).
- `cuda_syncs` (CUDA): the syncs the CUDA runtime itself reports (torch.cuda.set_sync_debug_mode), pageable
  copies included, with their call sites; the profiled training step (`trainer.profile_step`) records them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

# the Tensor methods that hand a value to the host; on CUDA each one waits for the GPU
READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__"})
_SKIPPED = (os.path.dirname(torch.__file__), __file__, warnings.__file__)


def call_site(depth: int = 2) -> str:
    """"path:line (function)" of the innermost frame of the caller's stack (`depth` frames up) outside torch,
    this file and the warnings module; paths under the working directory are made relative."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(path)
        path = relative if not relative.startswith("..") else path
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"


class HostReads(TorchFunctionMode):
    """Inside the block, `sites` counts the host reads of tensor values by call site and method, e.g.
    {"longnet_dist/train/loss.py:51 (sequence_parallel_loss) tolist": 1}."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.sites[f"{call_site(depth=2)} {name}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_syncs():
    """Yields a Counter that holds, after the block, the CUDA syncs made inside it by call site (`call_site`).
    Uses torch.cuda.set_sync_debug_mode("warn"), which warns at each sync: the warning is counted where it
    is raised, with the stack that made it, instead of printed. The previous mode is restored. Empty without
    CUDA."""
    found: Counter[str] = Counter()
    if not torch.cuda.is_available():
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # restores showwarning and the filters
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def count(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                found[call_site(depth=2)] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = count
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
