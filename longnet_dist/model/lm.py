"""The LongNet decoder language model: embeddings -> pre-norm blocks -> norm -> LM head.

Each block is x + DilatedAttention(norm(x)) followed by x + MLP(norm(x)). The model knows nothing
about ranks: it gets `positions` (global positions of the rows it holds, for rotary) and an opaque
`sequence_group` that it hands to attention, which shards the long branches over it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longnet_dist.attention import DilatedAttention

from .layers import MLPS, NORMS, default_mlp_hidden_dim, make_mlp, make_norm


@dataclass
class LongNetConfig:
    """Shape and options of a LongNetLM (the `model` and `attention` config groups)."""

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    segment_lengths: list[int] = field(default_factory=lambda: [2048])
    dilation_rates: list[int] = field(default_factory=lambda: [1])
    mlp: str = "swiglu"
    mlp_hidden_dim: int | None = None  # None: default_mlp_hidden_dim(mlp, dim)
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    rotary_base: float = 10000.0
    activation_checkpointing: bool = False
    attention_backend: str | None = None  # None: fastest kernel available
    token_chunk_size: int = 8192  # rows at once in the recomputed token-wise layers (loss; MLP when checkpointing)
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "token_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model {name}={value!r} must be a positive integer")
        if self.dim % self.num_heads != 0 or (self.dim // self.num_heads) % 2 != 0:
            raise ValueError(f"model dim={self.dim} must be num_heads={self.num_heads} x an even head_dim "
                             f"(rotary rotates pairs); e.g. dim={self.num_heads * 64}")
        if self.mlp not in MLPS:
            raise ValueError(f"model mlp={self.mlp!r} is not one of {list(MLPS)}")
        if self.norm not in NORMS:
            raise ValueError(f"model norm={self.norm!r} is not one of {list(NORMS)}")
        self.segment_lengths, self.dilation_rates = list(self.segment_lengths), list(self.dilation_rates)
        if self.mlp_hidden_dim is None:
            self.mlp_hidden_dim = default_mlp_hidden_dim(self.mlp, self.dim)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def chunked_recompute(fn, chunk_size: int | None, *tensors: Tensor) -> Tensor:
    """fn applied to `chunk_size`-row slices along dim 1 of `tensors` (a token-wise fn), concatenated.

    With grad enabled each slice is checkpointed: its intermediates are recomputed in backward, so
    at most one slice's intermediates are alive at once. chunk_size None, or inputs no longer than
    it, run fn in one piece (intermediates stored).
    """
    length = tensors[0].shape[1]
    if chunk_size is None or length <= chunk_size:
        return fn(*tensors)
    pieces = []
    for start in range(0, length, chunk_size):
        rows = [t[:, start:start + chunk_size] for t in tensors]
        pieces.append(checkpoint(fn, *rows, use_reentrant=False) if torch.is_grad_enabled() else fn(*rows))
    return torch.cat(pieces, dim=1)


class Block(nn.Module):
    """Pre-norm transformer block with dilated self-attention."""

    def __init__(self, config: LongNetConfig):
        super().__init__()
        # with activation checkpointing the MLP also runs in recomputed chunks: its hidden layer is the
        # largest activation of the block, and it is token-wise
        self.mlp_chunk_size = config.token_chunk_size if config.activation_checkpointing else None
        self.attn_norm = make_norm(config.norm, config.dim)
        self.attn = DilatedAttention(config.dim, config.num_heads, config.segment_lengths, config.dilation_rates,
                                     causal=True, rotary=True, rotary_base=config.rotary_base,
                                     backend=config.attention_backend)
        self.mlp_norm = make_norm(config.norm, config.dim)
        self.mlp = make_mlp(config.mlp, config.dim, config.mlp_hidden_dim)

    def forward(self, x: Tensor, positions: Tensor | None, sequence_group=None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions=positions, sequence_group=sequence_group)
        return x + chunked_recompute(self._norm_mlp, self.mlp_chunk_size, x)

    def _norm_mlp(self, x: Tensor) -> Tensor:
        return self.mlp(self.mlp_norm(x))


class LongNetLM(nn.Module):
    """LongNet decoder-only language model (Ding et al. 2023) with rotary positions."""

    def __init__(self, config: LongNetConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = make_norm(config.norm, config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * layers)
        residual_std = config.init_std / math.sqrt(2 * config.num_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, *, labels: Tensor | None = None, positions: Tensor | None = None,
                sequence_group=None, ignore_index: int = -100) -> Tensor:
        """input_ids (B, N) -> logits (B, N, V); with `labels` (B, N) -> per-token losses (B, N) float32.

        `positions` (N,) are the global positions of these rows (default arange(N)); with a
        `sequence_group`, input_ids is this rank's shard and attention spans the group.
        """
        x = self.embed(input_ids)  # (B, N, E)
        recompute = self.config.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, positions, sequence_group, use_reentrant=False)
            else:
                x = block(x, positions, sequence_group)
        if labels is None:
            return self.head(self.norm(x))
        return self.token_losses(x, labels, ignore_index)

    def token_losses(self, hidden: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """Cross-entropy per token, (B, N) float32, of the last block's output `hidden` (B, N, E).

        Final norm, LM head and loss run `token_chunk_size` rows at a time and are recomputed in the
        backward pass: long sequences never hold all (B, N, V) logits.
        """
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels shape {tuple(labels.shape)} must match input_ids {tuple(hidden.shape[:2])}")

        def cross_entropy(hidden_rows: Tensor, label_rows: Tensor) -> Tensor:
            logits = self.head(self.norm(hidden_rows)).float()  # (B, n, V)
            return F.cross_entropy(logits.transpose(1, 2), label_rows, ignore_index=ignore_index, reduction="none")

        return chunked_recompute(cross_entropy, self.config.token_chunk_size, hidden, labels)  # (B, N)

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "LongNetLM":
        """The model (fp32, eval mode) of a run directory, a checkpoint folder (any ZeRO stage) or an
        exported folder; see longnet_dist/train/export.py (imported here: reading checkpoints is train's job)."""
        from longnet_dist.train.export import load_model

        return load_model(path, device=device)[0]
