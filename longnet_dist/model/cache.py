"""KVCache: every layer's keys and values while generating, so each new token costs one row, not a full pass.

`LongNetLM.forward(ids, cache=cache)` runs rows cache.length .. cache.length + n - 1 (rotary positions from the
cache) and leaves them in it. The first call (the prompt, cache empty) is an ordinary forward pass whose rotated
keys and values each block also writes into the cache; every later row attends the cached rows through
`attention/decode.py` (one row at a time, exact: causal dilated attention of row p depends on rows 0..p only).
The logits equal those of a forward pass over the whole prefix (tests/test_decode_cache.py: float64, 1e-12).
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Rotated keys and values of rows 0..length-1 for each layer, (batch, capacity, H, D) each, preallocated."""

    def __init__(self, num_layers: int, batch: int, capacity: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        for name, value in (("batch", batch), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name}={value!r} must be a positive integer")
        shape = (batch, capacity, num_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch, self.capacity, self.length = batch, capacity, 0

    def check_model(self, num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device) -> None:
        """ValueError unless this cache was made for a model of these layers, heads, head dim, dtype and device
        (LongNetLM.new_cache), and can be written here (a cache made under torch.inference_mode() only there)."""
        keys = self.keys[0]  # (batch, capacity, H, D)
        made = (len(self.keys), keys.shape[2], keys.shape[3], keys.dtype, keys.device)
        wanted = (num_layers, num_heads, head_dim, dtype, device)
        if made != wanted:
            names = ("layers", "heads", "head_dim", "dtype", "device")
            raise ValueError("the cache does not fit this model (" + ", ".join(
                f"{name} {a} vs the model's {b}" for name, a, b in zip(names, made, wanted) if a != b)
                + "): make it with this model's new_cache")
        if keys.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError("the cache was made under torch.inference_mode(); use it there too (or make it under "
                             "torch.no_grad())")

    def check_rows(self, batch: int, rows: int) -> None:
        """ValueError unless `rows` more rows of `batch` sequences fit."""
        if batch != self.batch:
            raise ValueError(f"input_ids has batch {batch} but the cache was made for batch {self.batch}")
        if self.length + rows > self.capacity:
            raise ValueError(f"the cache holds {self.length} of its {self.capacity} rows; {rows} more do not fit: "
                             f"make it with capacity >= {self.length + rows} (model.new_cache)")

    def attend(self, layer: int, attention, qkv: Tensor | tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Layer `layer`'s attention output (B, n, H, D) for the new rows' q, k, v (packed (B, n, 3, H, D) or three
        (B, n, H, D)); their keys and values are written into the cache first."""
        q, k, v = qkv.unbind(2) if isinstance(qkv, Tensor) else qkv
        start, rows = self.length, q.shape[1]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, start:start + rows] = k
        values[:, start:start + rows] = v
        if start == 0:  # the prompt: an ordinary pass over its rows (the fastest kernels)
            return attention.attend_packed(qkv) if isinstance(qkv, Tensor) else attention.attend(q, k, v)
        return torch.stack([attention.attend_step(q[:, i], keys, values, start + i) for i in range(rows)], dim=1)

    def advance(self, rows: int) -> None:
        """The rows just written by every layer now count (LongNetLM.forward calls this after the last block)."""
        self.length += rows
