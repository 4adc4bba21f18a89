"""Parameter count and training FLOPs per token of a LongNetLM, from its config alone.

Dense part: 6 FLOPs per matmul weight per token (2 forward, 4 backward; Kaplan et al. 2020), over
every matmul including the LM head (it runs even when tied to the embedding).
Attention part (../shared/LONGNET.md "Cost"): per layer, head and branch (w, r) a sequence of N
tokens scores N*w/r^2 query-key pairs, 4*D FLOPs each forward (two matmuls), so 4*(w/r^2)*D per
token; causal halves it; backward costs 2.5x forward, so training is 3.5x forward. Dense
attention (attention_impl="dense") is the one branch w = N, r = 1.
Recomputation by activation checkpointing is not counted (model FLOPs, as MFU usually is).
"""
from __future__ import annotations

from torch import nn

from .layers import mlp_matmul_params
from .lm import LongNetConfig

ATTENTION_TRAIN_FACTOR = 3.5  # forward 1 + backward 2.5 (LONGNET.md)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters; a tied embedding/head weight counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matmul_weights(config: LongNetConfig) -> int:
    """Weights used in matmuls per token: q/k/v/out and MLP of every layer, plus the LM head."""
    attention = 4 * config.dim * config.dim
    mlp = mlp_matmul_params(config.mlp, config.dim, config.mlp_hidden_dim)
    return config.num_layers * (attention + mlp) + config.dim * config.vocab_size


def attention_flops_per_token(config: LongNetConfig, seq_len: int, *, causal: bool = True) -> float:
    """Training FLOPs per token of the attention scores and weighted sums (all layers)."""
    branches = [(seq_len, 1)] if config.attention_impl == "dense" else zip(config.segment_lengths,
                                                                          config.dilation_rates)
    pairs_per_query = sum(min(w, seq_len) / (r * r) for w, r in branches)
    forward = 4.0 * pairs_per_query * config.head_dim * config.num_heads * config.num_layers
    return ATTENTION_TRAIN_FACTOR * forward * (0.5 if causal else 1.0)


def flops_per_token(config: LongNetConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    return 6.0 * matmul_weights(config) + attention_flops_per_token(config, seq_len)
