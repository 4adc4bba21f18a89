"""Where a training step makes the host wait for the device.

On a GPU, reading a tensor's value on the host (`.item()`, `.tolist()`, `bool`/`float`/`int` of a tensor,
`.numpy()`) waits until every kernel queued before it has run, and so does a copy from pageable host memory
to the GPU. The queue is then empty: the GPU idles until the host has launched the next kernel, and stays
host-bound while the host catches up. A step with no such wait lets the host run ahead, so the GPU never
waits on Python. What this module has for finding them and doing without them:

- `HostReads` (any device): records each host read of a tensor's value with the call site that made it (the
  innermost frame outside torch), so the CPU tests can keep the trainer's step free of new ones. Pageable
  copies are invisible here (on the CPU there is no copy).
- `cuda_syncs` (CUDA): the syncs the CUDA runtime itself reports (torch.cuda.set_sync_debug_mode), pageable
  copies included, with their call sites; the profiled training step (`trainer.profile_step`) records them.
- Both count explicit whole-device syncs too (`explicit_syncs`: torch.cuda.synchronize, DeepSpeed's accelerator).
- `DeviceValue` brings a value to the host waiting only for the work queued before it.
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


@contextlib.contextmanager
def explicit_syncs(found: Counter):
    """Inside the block, count calls of torch.cuda.synchronize and of DeepSpeed's accelerator `synchronize` (if
    DeepSpeed is imported) into `found` by call site, as "<site> synchronize": each waits for the whole device
    (DeepSpeed's throughput timer called it twice a step), and set_sync_debug_mode does not report them.
    On the CPU DeepSpeed's is a no-op, but the call is counted the same, so CPU tests see where a GPU would wait."""
    inside = []  # a synchronize calling another (DeepSpeed's calls torch's) counts once

    def counting(original):
        def synchronize(*args, **kwargs):
            if not inside:
                found[f"{call_site(depth=2)} synchronize"] += 1
            inside.append(True)
            try:
                return original(*args, **kwargs)
            finally:
                inside.pop()
        return synchronize

    original_cuda = torch.cuda.synchronize
    torch.cuda.synchronize = counting(original_cuda)
    module = sys.modules.get("deepspeed.accelerator")
    accelerator = module.get_accelerator() if module is not None else None
    if accelerator is not None:
        patched_before = accelerator.__dict__.get("synchronize")  # an enclosing block's counter, if any
        accelerator.synchronize = counting(accelerator.synchronize)
    try:
        yield found
    finally:
        torch.cuda.synchronize = original_cuda
        if accelerator is not None:
            if patched_before is None:
                del accelerator.synchronize  # the instance attribute: the class's method again
            else:
                accelerator.synchronize = patched_before


class HostReads(TorchFunctionMode):
    """Inside the block, `sites` counts the host reads of tensor values by call site and method, e.g.
    {"longnet_dist/train/loss.py:39 (_values) tolist": 1}, and the explicit device syncs
    (`explicit_syncs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()
        self._syncs = None

    def __enter__(self):
        self._syncs = explicit_syncs(self.sites)
        self._syncs.__enter__()
        return super().__enter__()

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            self._syncs.__exit__(*exc_info)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.sites[f"{call_site(depth=2)} {name}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_syncs():
    """Yields a Counter that holds, after the block, the CUDA syncs made inside it by call site (`call_site`),
    explicit ones included (`explicit_syncs`).
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
            with explicit_syncs(found):
                yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)


class DeviceValue:
    """A tensor's value, brought to the host without making it wait for the work queued after it. On CUDA the
    copy goes to page-locked memory behind the work queued so far, followed by an event; `get()` waits for that
    event only, so kernels queued later keep the GPU busy meanwhile. Elsewhere the value is kept as a copy."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.clone()

    def get(self):
        """The value as Python numbers (`tolist`: a float for a 0-dim tensor)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
