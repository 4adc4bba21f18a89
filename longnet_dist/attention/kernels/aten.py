"""aten's flash kernels behind the kernel contract (see __init__.py): "cpu_flash" and "cuda_flash".

Both take (B, H, L, D) views and return the log-sum-exp. On CUDA the flash kernel runs when no mask
is needed (fp16/bf16), else the memory-efficient kernel, whose quirks are handled here:
- its additive bias must have a contiguous, 16-aligned last dimension (a stride-0 expansion over
  queries is fine): built as (B, H, 1, Lk rounded up to 16), sliced to Lk, expanded;
- its backward wants the lse with the 32-row padding its forward returned;
- the flash backward wants, for a dense batch, the same cumulative-length placeholders that its
  forward returns (not int64 empties).
One call over more than 2^31 elements overflows 32-bit indexing inside the CUDA kernels, so longer
batches are split along the batch dimension (`_batch_chunks`).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

_MAX_CALL_ELEMENTS = 2**30  # per kernel call and tensor: well inside 32-bit indexing, fp32 accumulators included


def _heads_first(x: Tensor) -> Tensor:
    return x.transpose(1, 2)  # (B, L, H, D) <-> (B, H, L, D), a view


def _cpu_bias(key_valid: Tensor | None, dtype: torch.dtype, bias: Tensor | None = None,
              shape: tuple[int, ...] = ()) -> Tensor | None:
    """Additive mask: 0 for valid keys, -inf for masked ones, (B, H, 1, Lk) broadcast over queries; plus
    `bias` (B or 1, H or 1, Lq, Lk), expanded (a view) to `shape` (B, H, Lq, Lk)."""
    mask = None
    if key_valid is not None:
        mask = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
        mask.masked_fill_(~key_valid, float("-inf"))
        mask = mask.permute(0, 2, 1).unsqueeze(2)  # (B, Lk, H) -> (B, H, 1, Lk)
    if bias is None:
        return mask
    return (bias if mask is None else bias + mask).expand(shape)


def _cuda_bias(key_valid: Tensor | None, dtype: torch.dtype, lq: int) -> Tensor | None:
    """(B, H, Lq, Lk) bias for the memory-efficient kernel: contiguous 16-aligned rows, stride 0 over queries."""
    if key_valid is None:
        return None
    B, lk, H = key_valid.shape
    padded = torch.zeros(B, H, 1, -(-lk // 16) * 16, dtype=dtype, device=key_valid.device)
    padded[..., :lk].masked_fill_(~key_valid.permute(0, 2, 1).unsqueeze(2), float("-inf"))
    return padded[..., :lk].expand(B, H, lq, lk)


def _batch_chunks(batch: int, per_item: int) -> list[slice]:
    """Slices of the batch dimension so that no call handles more than _MAX_CALL_ELEMENTS per tensor."""
    step = max(1, _MAX_CALL_ELEMENTS // max(per_item, 1))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def _uses_flash(q: Tensor, masked: bool) -> bool:
    return not masked and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


@functools.lru_cache(maxsize=None)
def _dense_cum_seq(device: torch.device, dtype: torch.dtype, head_dim: int):
    """The (cum_seq_q, cum_seq_k) that aten's CUDA flash forward returns for a dense batch."""
    x = torch.zeros(1, 1, 1, head_dim, device=device, dtype=dtype)
    out = torch.ops.aten._scaled_dot_product_flash_attention(x, x, x, 0.0, False, False, scale=1.0)
    return out[2], out[3]


def _mask_shape(q: Tensor, k: Tensor) -> tuple[int, int, int, int]:
    return q.shape[0], q.shape[2], q.shape[1], k.shape[1]  # (B, H, Lq, Lk)


def _no_cuda_bias(bias: Tensor | None) -> None:
    if bias is not None:
        raise ValueError("a score bias runs on aten's CPU flash kernel and the portable one only (it is what CPU "
                         "branches sharing keys pass; see attention/nesting.py)")


def forward(kind: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
            key_valid: Tensor | None, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, L, H, D) in; out (B, Lq, H, D), lse (B, Lq, H) (float32, or float64 on CPU for float64)."""
    if kind == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal,
            attn_mask=_cpu_bias(key_valid, q.dtype, bias, _mask_shape(q, k)), scale=scale)
        return _heads_first(out), lse.transpose(1, 2)
    _no_cuda_bias(bias)
    per_item = q.shape[2] * max(q.shape[1], k.shape[1]) * q.shape[3]
    outs, lses = [], []
    for part in _batch_chunks(q.shape[0], per_item):
        mask = None if key_valid is None else key_valid[part]
        out, lse = _cuda_forward(*(_heads_first(x[part]) for x in (q, k, v)), causal, scale, mask)
        outs.append(_heads_first(out))
        lses.append(lse.transpose(1, 2))
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs), torch.cat(lses)


def backward(kind: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             causal: bool, scale: float, key_valid: Tensor | None,
             bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) as (B, L, H, D); `lse` (B, Lq, H) with +inf where a row has no gradient."""
    if kind == "cpu_flash":
        lse_heads = lse.transpose(1, 2).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(_heads_first(x) for x in (grad_out, q, k, v, out)), lse_heads.contiguous(), 0.0, causal,
            attn_mask=_cpu_bias(key_valid, q.dtype, bias, _mask_shape(q, k)), scale=scale)
        return tuple(_heads_first(g) for g in grads)
    _no_cuda_bias(bias)
    per_item = q.shape[2] * max(q.shape[1], k.shape[1]) * q.shape[3]
    parts = []
    for part in _batch_chunks(q.shape[0], per_item):
        mask = None if key_valid is None else key_valid[part]
        grads = _cuda_backward(*(_heads_first(x[part]) for x in (grad_out, q, k, v, out)),
                               lse[part].transpose(1, 2).float(), causal, scale, mask)
        parts.append([_heads_first(g) for g in grads])
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(torch.cat(group) for group in zip(*parts))


def _cuda_forward(q, k, v, causal, scale, key_valid):
    """(B, H, L, D) layout -> out (B, H, Lq, D), lse (B, H, Lq)."""
    if _uses_flash(q, key_valid is not None):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out, lse
    bias = _cuda_bias(key_valid, q.dtype, q.shape[2])
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal,
                                                                           scale=scale)
    return out, lse[..., : q.shape[2]]  # lse comes padded to a multiple of 32 rows


def _cuda_backward(grad_out, q, k, v, out, lse, causal, scale, key_valid):
    """(B, H, L, D) layout; lse (B, H, Lq) float32 with +inf at rows that carry no gradient."""
    lq, lk = q.shape[2], k.shape[2]
    seed = torch.zeros((), dtype=torch.int64, device=q.device)  # philox state: unused without dropout
    if _uses_flash(q, key_valid is not None):
        cum_q, cum_k = _dense_cum_seq(q.device, q.dtype, q.shape[-1])
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse.contiguous(), cum_q, cum_k, lq, lk, 0.0, causal, seed, seed, scale=scale)
    padded_lse = torch.full((*lse.shape[:2], -(-lq // 32) * 32), float("inf"), dtype=torch.float32, device=q.device)
    padded_lse[..., :lq] = lse  # the layout the forward returned: 32-row aligned per head
    bias = _cuda_bias(key_valid, q.dtype, lq)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out, q, k, v, bias, out, padded_lse, seed, seed, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv
