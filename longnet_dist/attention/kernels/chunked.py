"""The portable kernel behind the contract (see __init__.py): any device and dtype, blocks of queries
in plain torch ops, scores of one block at a time in the merge precision (float32 / float64)."""
from __future__ import annotations

import torch

CHUNK_QUERIES = 256  # query rows per block: bounds the (Lq, Lk) scores held at once


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_scores(q_block, k, scale, first_row, causal, key_valid, bias):
    """Scores (B, H, c, Lk) in the merge precision, plus `bias` (B or 1, H or 1, Lq, Lk), masked for causality
    and key validity."""
    acc = _acc_dtype(q_block.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q_block.to(acc), k.to(acc)) * scale
    if bias is not None:
        scores = scores + bias[:, :, first_row: first_row + q_block.shape[1]].to(acc)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid.permute(0, 2, 1).unsqueeze(2), float("-inf"))
    if causal:
        rows = torch.arange(first_row, first_row + q_block.shape[1], device=q_block.device)
        cols = torch.arange(k.shape[1], device=q_block.device)
        scores = scores.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    return scores


def forward(q, k, v, causal, scale, key_valid, bias=None):
    acc = _acc_dtype(q.dtype)
    outs, lses = [], []
    for start in range(0, q.shape[1], CHUNK_QUERIES):
        scores = _block_scores(q[:, start:start + CHUNK_QUERIES], k, scale, start, causal, key_valid, bias)
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, c)
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(scores - finite.unsqueeze(-1))  # 0 where masked, rows without keys all 0
        outs.append(torch.einsum("bhqk,bkhd->bqhd", probs, v.to(acc)))
        lses.append(lse.transpose(1, 2))
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 1)


def backward(grad_out, q, k, v, out, lse, causal, scale, key_valid, bias=None):
    """`lse` (B, Lq, H) with +inf where a row carries no gradient."""
    acc = _acc_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    k_acc, v_acc = k.to(acc), v.to(acc)
    for start in range(0, q.shape[1], CHUNK_QUERIES):
        stop = min(start + CHUNK_QUERIES, q.shape[1])
        scores = _block_scores(q[:, start:stop], k, scale, start, causal, key_valid, bias)
        probs = torch.exp(scores - lse[:, start:stop].transpose(1, 2).to(acc).unsqueeze(-1))  # (B, H, c, Lk)
        d_out = grad_out[:, start:stop].to(acc)
        row_dot = (d_out * out[:, start:stop].to(acc)).sum(-1).transpose(1, 2)  # (B, H, c)
        d_probs = torch.einsum("bqhd,bkhd->bhqk", d_out, v_acc)
        d_scores = probs * (d_probs - row_dot.unsqueeze(-1)) * scale
        dq[:, start:stop] = torch.einsum("bhqk,bkhd->bqhd", d_scores, k_acc)
        dk += torch.einsum("bhqk,bqhd->bkhd", d_scores, q[:, start:stop].to(acc))
        dv += torch.einsum("bhqk,bqhd->bkhd", probs, d_out)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
