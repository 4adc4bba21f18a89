"""The peak FLOP/s that MFU divides by (`trainer.peak_flops`): a number, or "auto".

"auto" on a GPU looks the device's name up among the dense 16-bit tensor-core peaks NVIDIA lists (no 2:4
sparsity); on the CPU it times fp32 matmuls of 2048 x 2048 at this process's thread count, which is how the CPU
default was measured (148e9 on the 2-core CI VM). Ranks that share a CPU time theirs together and so each gets its
share.
"""
from __future__ import annotations

import time

import torch

# (part of torch.cuda.get_device_name, dense bf16/fp16 FLOP/s); the first match wins, so a name that contains
# another comes before it (L40S, L40 before L4; H100 PCIe and NVL before H100)
DENSE_16BIT_PEAKS: tuple[tuple[str, float], ...] = (
    ("B200", 2250e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)
CPU_MATMUL_SIZE = 2048


def gpu_peak_flops(name: str) -> float | None:
    """The dense 16-bit peak of the GPU called `name` (torch.cuda.get_device_name), or None if not listed."""
    return next((peak for part, peak in DENSE_16BIT_PEAKS if part in name), None)


def cpu_matmul_flops(seconds: float = 0.5) -> float:
    """FLOP/s of the fastest fp32 matmul of CPU_MATMUL_SIZE^2 timed over `seconds` (at least one, after one untimed)
    on this process's threads."""
    a, b = (torch.randn(CPU_MATMUL_SIZE, CPU_MATMUL_SIZE) for _ in range(2))
    a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while best == float("inf") or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * CPU_MATMUL_SIZE ** 3 / best


def check_peak_flops(value) -> None:
    """A config value is "auto" or a positive number; else one clear error."""
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"trainer.peak_flops={value!r} must be 'auto' or a positive number (FLOP/s of one device, "
                         f"for MFU; e.g. 989e12 for an H100 in bf16)")


def resolve_peak_flops(value, device: torch.device, sixteen_bit: bool) -> tuple[float, str]:
    """(FLOP/s, where it came from) for `trainer.peak_flops` on `device`, training in 16-bit or not."""
    check_peak_flops(value)
    if value != "auto":
        return float(value), "trainer.peak_flops"
    if device.type == "cpu":
        return cpu_matmul_flops(), f"fp32 {CPU_MATMUL_SIZE}^3 matmul on {torch.get_num_threads()} threads, timed"
    if device.type != "cuda":
        raise ValueError(f"trainer.peak_flops=auto knows CPUs and NVIDIA GPUs, not {device.type!r}: pass a number")
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_flops(name)
    if peak is None or not sixteen_bit:
        known = ", ".join(part for part, _ in DENSE_16BIT_PEAKS)
        why = (f"does not know {name!r} (known: {known})" if peak is None else
               "knows the 16-bit tensor-core peaks only, and this run is fp32")
        raise ValueError(f"trainer.peak_flops=auto {why}: pass the device's FLOP/s as a number, e.g. "
                         f"trainer.peak_flops=312e12 for an A100 in bf16")
    return peak, f"{name}, dense bf16"
