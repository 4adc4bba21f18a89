"""Dense float64 reference of LongNet dilated attention, written from ../shared/LONGNET.md alone.

It builds, per branch and head, the full (N x N) boolean mask of allowed (query, key) pairs, runs an
ordinary masked softmax, and mixes the branches literally by Eq. 9-10. O(N^2): for tests only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def branch_mask(n: int, heads: int, segment_length: int, dilation: int, causal: bool) -> torch.Tensor:
    """(H, N, N) bool: query i may attend key j in this branch."""
    w = min(segment_length, n)
    pos = torch.arange(n)
    segment = pos // w
    within = pos % w
    masks = []
    for h in range(heads):
        offset = h % dilation
        kept = (within >= offset) & ((within - offset) % dilation == 0)
        allowed = kept[:, None] & kept[None, :] & (segment[:, None] == segment[None, :])
        if causal:
            allowed &= pos[None, :] <= pos[:, None]
        masks.append(allowed)
    return torch.stack(masks)


def branch_attention(q, k, v, allowed, scale):
    """One branch: out (B, N, H, D) and lse (B, N, H); rows with no key: out 0, lse -inf."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    has_key = allowed.any(-1)                                         # (B, H, N)
    safe = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key[..., None], 0.0)
    lse = torch.logsumexp(safe, dim=-1)
    probs = torch.softmax(safe, dim=-1) * has_key[..., None]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = lse.masked_fill(~has_key, float("-inf"))
    return out, lse.transpose(1, 2)


def reference_dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal=False, key_padding_mask=None,
                                scale=None, detach_weights=False, equal_weights=False):
    """Eq. 9-10 mixture of the branches. `detach_weights` / `equal_weights` reproduce known bugs of
    other implementations (weights under no_grad; plain average of branches) so tests can show that
    they would be caught."""
    B, N, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    real = torch.ones(B, N, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        allowed = branch_mask(N, H, w, r, causal)[None] & real[:, None, None, :]  # (B, H, N, N)
        out, lse = branch_attention(q, k, v, allowed, scale)
        outs.append(out)
        lses.append(lse)
    lse_all = torch.stack(lses)                                       # (branches, B, N, H)
    covered = torch.isfinite(lse_all)
    total = torch.logsumexp(lse_all.masked_fill(~covered.any(0, keepdim=True), 0.0), dim=0)  # Eq. 10
    weights = torch.exp(lse_all - total).masked_fill(~covered, 0.0)   # Eq. 9: s_i / sum_j s_j
    if detach_weights:
        weights = weights.detach()
    if equal_weights:
        weights = covered.to(q.dtype) / covered.sum(0).clamp(min=1)
    out = (weights.unsqueeze(-1) * torch.stack(outs)).sum(0)
    return out * real[:, :, None, None]                               # padded queries output 0


def dilated_errors(device, B, N, H, D, segs, rates, causal, pad, dtype, seed=0, backend="triton"):
    """Errors of `dilated_attention` (out, dq, dk, dv) on `device` in `dtype` against this reference in
    float64: L2 error over the reference's norm plus 1e-2 per element of the O(1) inputs (a gradient
    can be exactly 0, e.g. with one key per query). Asserts that every value is finite."""
    return dilated_case(device, B, N, H, D, segs, rates, causal, pad, dtype, seed, backend).errors


@dataclass
class DilatedCase:
    """One `dilated_errors` run: the inputs it drew (q, k, v, the output's gradient, in float64 on the CPU; the
    key padding mask or None), our [out, dq, dk, dv] on the device and their errors, so that a test can hold
    another run on the same inputs against ours without running ours again."""

    inputs: tuple
    mask: torch.Tensor | None
    ours: list
    errors: dict


def dilated_case(device, B, N, H, D, segs, rates, causal, pad, dtype, seed=0, backend="triton") -> DilatedCase:
    from longnet_dist.attention import dilated_attention

    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = (torch.rand(B, N, generator=g) >= pad) if pad else None
    ours_in = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    out = dilated_attention(*ours_in, segs, rates, causal=causal, backend=backend,
                            key_padding_mask=None if mask is None else mask.to(device))
    ours = [out, *torch.autograd.grad(out, ours_in, grad.to(device, dtype))]
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_dilated_attention(*ref_in, segs, rates, causal=causal, key_padding_mask=mask)
    errors = error_norms(ours, [ref, *torch.autograd.grad(ref, ref_in, grad)])
    return DilatedCase((q, k, v, grad), mask, ours, errors)


def error_norms(ours, refs) -> dict[str, float]:
    """{out, dq, dk, dv: L2 error over the norm of `refs` plus 1e-2 per element}, in float64 on the CPU; asserts
    that every value of `ours` is finite."""
    for name, a in zip(("out", "dq", "dk", "dv"), ours):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
    return {name: ((a.double().cpu() - b.double().cpu()).norm() / (b.double().norm() + 1e-2 * b.numel() ** 0.5)).item()
            for name, a, b in zip(("out", "dq", "dk", "dv"), ours, refs)}
