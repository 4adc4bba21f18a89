"""Attention kernels that return the log-sum-exp, forward and backward.

Every kernel here works on the same layout and contract, so the dilated and the sequence-parallel
code never care which one runs:

    q: (B, Lq, H, D), k, v: (B, Lk, H, D)       any strides, same dtype
    key_valid: (B, Lk, H) bool or None          False = this key may not be attended
    causal: top-left aligned, query i sees keys j <= i
    -> out (B, Lq, H, D) in q.dtype, lse (B, Lq, H) in float32 (float64 for float64 input)

A query row with no key left (all masked) gets out = 0 and lse = -inf ("not covered"). The backward
takes the output and lse of the *merged* softmax (see dilated.py); a row whose lse is not finite
carries no gradient.

Backends: "cpu_flash" (aten's CPU flash kernel), "cuda_flash" (aten's CUDA flash kernel, or the
memory-efficient kernel when a mask is needed), "chunked" (portable: any device and dtype, blocks of
queries in plain torch ops). `backend=None` picks the fastest one available for the tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

BACKENDS = ("cpu_flash", "cuda_flash", "chunked")
_CHUNK_QUERIES = 256  # query rows per block in the portable kernel: bounds its (Lq, Lk) scores


def select_backend(q: Tensor, backend: str | None = None) -> str:
    """The kernel that will run for `q`: `backend` when given (checked), else the fastest available."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)} or None (auto)")
        if backend == "cpu_flash" and q.device.type != "cpu":
            raise ValueError(f"backend 'cpu_flash' needs CPU tensors, got device {q.device}")
        if backend == "cuda_flash" and q.device.type != "cuda":
            raise ValueError(f"backend 'cuda_flash' needs CUDA tensors, got device {q.device}")
        return backend
    if q.device.type == "cpu" and q.dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        return "cpu_flash"
    if q.device.type == "cuda" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return "cuda_flash"
    return "chunked"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of log-sum-exps and of the branch merge: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_first(x: Tensor) -> Tensor:
    return x.transpose(1, 2)  # (B, L, H, D) -> (B, H, L, D), a view


def _key_bias(key_valid: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive mask (B, H, 1, Lk): 0 for valid keys, -inf for masked ones; broadcast over queries."""
    if key_valid is None:
        return None
    bias = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
    bias.masked_fill_(~key_valid, float("-inf"))
    return bias.permute(0, 2, 1).unsqueeze(2)  # (B, Lk, H) -> (B, H, 1, Lk)


def _covered_rows(key_valid: Tensor, lq: int, causal: bool) -> Tensor:
    """(B, Lq, H) bool: does query row i have at least one valid key?"""
    if not causal:
        return key_valid.any(dim=1, keepdim=True).expand(-1, lq, -1)
    seen = key_valid.to(torch.uint8).cummax(dim=1).values.bool()  # (B, Lk, H): any valid key at <= j
    if lq <= seen.shape[1]:
        return seen[:, :lq]
    tail = seen[:, -1:].expand(-1, lq - seen.shape[1], -1)  # rows past Lk see every key
    return torch.cat([seen, tail], dim=1)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float,
                      key_valid: Tensor | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention of q over k, v. Returns (out (B, Lq, H, D), lse (B, Lq, H))."""
    kind = select_backend(q, backend)
    if kind == "chunked":
        return _chunked_forward(q, k, v, causal, scale, key_valid)
    bias = _key_bias(key_valid, q.dtype)
    if kind == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, attn_mask=bias, scale=scale)
    else:
        out, lse = _cuda_forward(_heads_first(q), _heads_first(k), _heads_first(v), causal, scale, bias)
    out, lse = _heads_first(out), lse.transpose(1, 2).to(lse_dtype(q.dtype))  # back to (B, L, H, ...)
    if key_valid is not None:  # the kernels return lse = 0 for fully masked rows: mark them uncovered
        covered = _covered_rows(key_valid, q.shape[1], causal)
        lse = lse.masked_fill(~covered, float("-inf"))
        out = out.masked_fill(~covered.unsqueeze(-1), 0.0)
    return out, lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       causal: bool, scale: float, key_valid: Tensor | None = None,
                       backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of softmax attention, given the output and lse of the softmax that
    this attention is part of. Rows whose lse is not finite get no gradient."""
    kind = select_backend(q, backend)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # exp(s - inf) = 0
    if kind == "chunked":
        return _chunked_backward(grad_out, q, k, v, out, lse, causal, scale, key_valid)
    bias = _key_bias(key_valid, q.dtype)
    args = [_heads_first(t) for t in (grad_out, q, k, v, out)]
    lse_heads = lse.transpose(1, 2)  # (B, H, Lq)
    if kind == "cpu_flash":
        lse_heads = lse_heads.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *args, lse_heads, 0.0, causal, attn_mask=bias, scale=scale)
    else:
        grads = _cuda_backward(*args, lse_heads.float().contiguous(), causal, scale, bias)
    return tuple(_heads_first(g) for g in grads)


# ---------------------------------------------------------------- CUDA (aten flash / efficient)

def _cuda_forward(q, k, v, causal, scale, bias):
    """(B, H, L, D) layout. Flash when no mask is needed and the dtype allows, else mem-efficient."""
    if bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out, lse
    if bias is not None:  # the efficient kernel wants a bias of full (B, H, Lq, Lk) shape (stride-0 ok)
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal,
                                                                           scale=scale)
    return out, lse[..., : q.shape[2]]  # lse comes padded to a multiple of 32 rows


def _cuda_backward(grad_out, q, k, v, out, lse, causal, scale, bias):
    if bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        lq, lk = q.shape[2], k.shape[2]
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)  # unused without dropout
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, empty, empty, lq, lk, 0.0, causal, seed, seed, scale=scale)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out, q, k, v, bias, out, lse, seed, seed, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


# ---------------------------------------------------------------- portable chunked kernel

def _block_scores(q_block, k, scale, first_row, causal, key_valid):
    """Scores (B, H, c, Lk) in the merge precision, masked for causality and key validity."""
    acc = lse_dtype(q_block.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q_block.to(acc), k.to(acc)) * scale
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid.permute(0, 2, 1).unsqueeze(2), float("-inf"))
    if causal:
        rows = torch.arange(first_row, first_row + q_block.shape[1], device=q_block.device)
        cols = torch.arange(k.shape[1], device=q_block.device)
        scores = scores.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    return scores


def _chunked_forward(q, k, v, causal, scale, key_valid):
    acc = lse_dtype(q.dtype)
    outs, lses = [], []
    for start in range(0, q.shape[1], _CHUNK_QUERIES):
        scores = _block_scores(q[:, start:start + _CHUNK_QUERIES], k, scale, start, causal, key_valid)
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, c)
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(scores - finite.unsqueeze(-1))  # 0 where masked, rows without keys all 0
        outs.append(torch.einsum("bhqk,bkhd->bqhd", probs, v.to(acc)))
        lses.append(lse.transpose(1, 2))
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 1)


def _chunked_backward(grad_out, q, k, v, out, lse, causal, scale, key_valid):
    acc = lse_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    k_acc, v_acc = k.to(acc), v.to(acc)
    for start in range(0, q.shape[1], _CHUNK_QUERIES):
        stop = min(start + _CHUNK_QUERIES, q.shape[1])
        scores = _block_scores(q[:, start:stop], k, scale, start, causal, key_valid)
        probs = torch.exp(scores - lse[:, start:stop].transpose(1, 2).to(acc).unsqueeze(-1))  # (B, H, c, Lk)
        d_out = grad_out[:, start:stop].to(acc)
        row_dot = (d_out * out[:, start:stop].to(acc)).sum(-1).transpose(1, 2)  # (B, H, c)
        d_probs = torch.einsum("bqhd,bkhd->bhqk", d_out, v_acc)
        d_scores = probs * (d_probs - row_dot.unsqueeze(-1)) * scale
        dq[:, start:stop] = torch.einsum("bhqk,bkhd->bqhd", d_scores, k_acc)
        dk += torch.einsum("bhqk,bqhd->bkhd", d_scores, q[:, start:stop].to(acc))
        dv += torch.einsum("bhqk,bqhd->bkhd", probs, d_out)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def dense_flops(lq: int, lk: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward multiply-add FLOPs of one attention: 2 matmuls of 2*Lq*Lk*D each per head."""
    if not causal:
        pairs = lq * lk
    elif lq <= lk:  # top-left causal: query i sees i + 1 keys
        pairs = lq * (lq + 1) / 2
    else:
        pairs = lk * (lk + 1) / 2 + (lq - lk) * lk
    return 4.0 * pairs * heads * head_dim


__all__ = ["BACKENDS", "attention_backward", "attention_forward", "dense_flops", "lse_dtype", "select_backend"]
