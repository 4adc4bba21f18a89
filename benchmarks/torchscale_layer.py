"""The official torchscale DilatedAttention layer, built from a source checkout, its flash call backed
by aten's CPU flash kernel (the kernel our layer uses), for side-by-side timing in cpu_layer.py.

torchscale's dilated attention is not on PyPI (0.3.0 predates it), so point at a checkout:

    git clone https://github.com/microsoft/torchscale /path/torchscale     # we measured 4d1e0e8
    python3 benchmarks/cpu_layer.py --torchscale /path/torchscale           # or TORCHSCALE_SRC=...

It needs only torch and einops from our environment (fairscale/timm are imported by other parts).
On CPU torchscale's `flash_attn_func` is None; we install one with flash_attn's contract:
q, k, v (B, L, H, D) -> out (B, L, H, D), lse (B, H, L).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch


def aten_flash(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """flash_attn_func's contract on aten's CPU flash kernel (autograd through out; lse carries none)."""
    if bias is not None or dropout:
        raise ValueError("the torchscale benchmark runs without bias and dropout")
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, scale=softmax_scale)
    return out.transpose(1, 2), lse  # (B, H, L, D) -> (B, L, H, D); lse (B, H, L)


def torchscale_layer(src: str | Path, embed_dim: int, num_heads: int, segment_lengths, dilation_rates):
    """torchscale.component.dilated_attention.DilatedAttention with four biased projections, no xPos,
    no sub-LN, no sequence parallelism: the same parameters and work as our layer with rotary off."""
    src = Path(src).expanduser().resolve()
    module_file = src / "torchscale" / "component" / "dilated_attention.py"
    if not module_file.is_file():
        raise SystemExit(f"--torchscale {src}: no torchscale/component/dilated_attention.py there; "
                         "clone https://github.com/microsoft/torchscale and pass its root")
    sys.path.insert(0, str(src))
    import torchscale.component.multihead_attention as mha
    from torchscale.component.dilated_attention import DilatedAttention

    mha.flash_attn_func = aten_flash
    args = types.SimpleNamespace(flash_attention=True, segment_length=list(segment_lengths),
                                 dilated_ratio=list(dilation_rates), seq_parallel=False, xpos_rel_pos=False,
                                 multiway=False, layernorm_eps=1e-5)
    layer = DilatedAttention(args, embed_dim, num_heads, self_attention=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return layer(x, x, x, is_causal=True)[0]

    return layer, forward
