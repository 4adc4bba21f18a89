"""One new row against cached keys and values: causal dilated attention while generating.

In causal dilated attention the output of row p depends only on rows 0..p (segments start at position 0, and a
ragged last segment only drops slots after p), so row p of any sequence that holds these rows is computed here
from them alone. For branch (w, r) row p lies in segment j = p // w (start a = j * w); it is slot (p - a - s) / r
of the heads h with s = h mod r = (p - a) mod r (Eq. 13-15), and those heads' keys are the slots a + s, a + s + r,
..., p of the segment: the zero-copy view `cache[:, a + s : p + 1 : r, s::r]` (heads s, s + r, ...). The heads a
branch does not give this row contribute nothing to it (lse -inf). The branches are mixed by their softmax
denominators (Eq. 9-10): out = sum_i exp(lse_i - LSE) o_i, LSE = logsumexp_i lse_i; a head no branch covers gets 0,
as in the full pass. Cost per row: sum over branches of (w / r) keys for H / r heads, against a full pass over the
whole prefix for each new token without a cache.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def dilated_attention_step(q: Tensor, k_cache: Tensor, v_cache: Tensor, position: int,
                           segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                           scale: float | None = None) -> Tensor:
    """q (B, H, D): row `position`'s (rotated) query; k_cache, v_cache (B, >= position + 1, H, D): rows
    0..position (rotated keys). Returns (B, H, D) in q's dtype: row `position` of causal dilated attention over
    rows 0..position (the rows after `position` in the caches are not read). Sums run in float32 at least."""
    B, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    dtype, work = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q = q.to(work)
    outs = q.new_zeros(len(segment_lengths), B, H, D)
    lses = q.new_full((len(segment_lengths), B, H), float("-inf"))
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        start = position // w * w
        s = (position - start) % r  # the head offset for which this row is a slot of this segment
        if s >= H:
            continue  # no head keeps this row in this branch
        # (B, H_s, L, D) views: heads s, s + r, ..., their L slots up to this row (no copy in the input's dtype)
        keys, values = (cache[:, start + s: position + 1: r, s::r].transpose(1, 2).to(work)
                        for cache in (k_cache, v_cache))
        scores = (q[:, s::r, None, :] @ keys.transpose(-1, -2)).squeeze(-2) * scale  # (B, H_s, L)
        lse = torch.logsumexp(scores, dim=-1)  # (B, H_s)
        outs[i, :, s::r] = (torch.exp(scores - lse[..., None])[:, :, None, :] @ values).squeeze(-2)  # (B, H_s, D)
        lses[i, :, s::r] = lse
    total = torch.logsumexp(lses, dim=0)  # (B, H): Eq. 10
    weights = torch.where(torch.isfinite(total), torch.exp(lses - total), 0.0)  # (branches, B, H): Eq. 9
    return (weights[..., None] * outs).sum(0).to(dtype)  # (B, H, D)
