"""The LongNet decoder language model: embeddings -> pre-norm blocks -> norm -> LM head.

Each block is x + DilatedAttention(norm(x)) followed by x + MLP(norm(x)). The model knows nothing
about ranks: it gets `positions` (global positions of the rows it holds, for rotary) and an opaque
`sequence_group` that it hands to attention, which shards the long branches over it.
Around the attention call a block has two token-wise regions (regions.py): norm -> q/k/v ->
rotary before it, output projection -> residual -> norm -> MLP -> residual after it; they are what
activation checkpointing recomputes and what `compile` compiles.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longnet_dist.attention.checks import check_branches
from longnet_dist.attention.rotary import rotary_angles

from .dense import ATTENTION_IMPLS, attention_class, check_dense_options
from .cache import KVCache
from .layers import MLPS, NORMS, default_mlp_hidden_dim, make_mlp, make_norm
from .regions import checkpointing_policy, compile_enabled, compile_region, compile_setting, token_wise


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
    activation_checkpointing: str | bool = "none"  # none | full (each block) | selective (token-wise parts)
    checkpoint_group_size: int = 1  # "full": blocks recomputed as one group (keeps every k-th block input)
    attention_backend: str | None = None  # None: fastest kernel available
    token_chunk_size: int = 8192  # rows at once in the recomputed token-wise regions (loss; with checkpointing)
    init_std: float = 0.02
    compile: str | bool = "auto"  # torch.compile the token-wise regions: auto (CUDA only) | true | false
    attention_impl: str = "dilated"  # dilated | dense (full causal attention: a baseline, one device)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "token_chunk_size", "checkpoint_group_size"):
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
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"model attention_impl={self.attention_impl!r} is not one of {list(ATTENTION_IMPLS)}")
        hidden = self.mlp_hidden_dim
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"model mlp_hidden_dim={hidden!r} must be a positive integer, or None (null in a config: "
                             f"4*dim for gelu, 8/3*dim rounded up to a multiple of 64 for swiglu)")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"model tie_embeddings={self.tie_embeddings!r} must be True or False (whether the LM "
                             f"head shares the embedding matrix)")
        if not _is_finite_number(self.rotary_base) or self.rotary_base <= 0:
            raise ValueError(f"model rotary_base={self.rotary_base!r} must be a finite number > 0 (the rotary "
                             f"frequency base; e.g. 10000.0)")
        if not _is_finite_number(self.init_std) or self.init_std < 0:
            raise ValueError(f"model init_std={self.init_std!r} must be a finite number >= 0 (the standard deviation "
                             f"of the initial weights; e.g. 0.02)")
        self.activation_checkpointing = checkpointing_policy(self.activation_checkpointing)
        self.compile = compile_setting(self.compile)
        self.segment_lengths, self.dilation_rates = check_branches(self.segment_lengths, self.dilation_rates)
        if self.mlp_hidden_dim is None:
            self.mlp_hidden_dim = default_mlp_hidden_dim(self.mlp, self.dim)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def _is_finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


# every integer dtype torch has (the unsigned ones past uint8 only in newer versions)
INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64} |
                           {getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)})


def _integer_tensor(name: str, value, what: str) -> None:
    """TypeError unless `value` is a tensor of an integer dtype (not bool); `what` describes it for the message."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(value).__name__}")
    if value.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must be a tensor of an integer dtype (e.g. torch.long) {what}, got dtype "
                        f"{value.dtype}")


def _values_checked(tensor: Tensor) -> bool:
    """Whether the values of `tensor` are checked: on the CPU only, where they are already on the host. Reading
    them from an accelerator would make the host wait for it in every forward (train/host_reads.py); a meta
    tensor has none, and code being compiled does not branch on data."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _all_true(valid: Tensor) -> bool:
    """Whether every element of the (CPU) bool tensor `valid` is True, tested inside torch's own op: no value
    of ours is read on the host unless one is False (then the caller builds its message)."""
    try:
        torch._assert_async(valid.all())
    except RuntimeError:
        return False
    return True


def check_labels(labels, shape: tuple[int, ...], device: torch.device, vocab_size: int, ignore_index: int) -> Tensor:
    """`labels` for the loss: an integer tensor of `shape` on `device` whose values (checked on the CPU) are ids in
    0..vocab_size-1 or `ignore_index`; returned as int64 (what cross-entropy takes). TypeError/ValueError naming it."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index={ignore_index!r} must be an integer (the label whose tokens have no loss, "
                        f"e.g. -100)")
    _integer_tensor("labels", labels, f"{shape} of next-token ids (any integer dtype: cast to int64 for the loss)")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} must match input_ids {tuple(shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but input_ids on {device}; put them on one device")
    labels = labels.long()
    if _values_checked(labels) and not _all_true(((labels >= 0) & (labels < vocab_size)) | (labels == ignore_index)):
        bad = labels[((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)]
        raise ValueError(f"labels hold values outside 0..{vocab_size - 1} that are not ignore_index={ignore_index} "
                         f"(min {int(bad.min())}, max {int(bad.max())}): each label is the id of the next token in "
                         f"the model's vocabulary (vocab_size={vocab_size}), or ignore_index for no loss")
    return labels


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + MLP(norm(x)).

    Activation checkpointing ("none" | "full" | "selective"): "full" is applied around the whole
    block by LongNetLM (only its input is kept); "selective" keeps the attention's inputs and output
    and recomputes both token-wise regions; with either, both regions run in `token_chunk_size`-row
    chunks, and those of the region after attention (whose MLP hidden layer is the block's largest
    activation) are recomputed.
    """

    def __init__(self, config: LongNetConfig):
        super().__init__()
        policy = config.activation_checkpointing
        self.recompute_before, self.recompute_after = policy == "selective", policy != "none"
        # with checkpointing both regions run in chunks: the one before attention needs no nested
        # recomputation under "full" (its intermediates are small next to the MLP's)
        self.chunk_before = self.chunk_after = config.token_chunk_size if policy != "none" else None
        self.rotary_base = config.rotary_base
        self.attn_norm = make_norm(config.norm, config.dim)
        self.attn = attention_class(config.attention_impl)(
            config.dim, config.num_heads, config.segment_lengths, config.dilation_rates, causal=True, rotary=True,
            rotary_base=config.rotary_base, backend=config.attention_backend)
        self.mlp_norm = make_norm(config.norm, config.dim)
        self.mlp = make_mlp(config.mlp, config.dim, config.mlp_hidden_dim)
        self.before_attention, self.after_attention = self._before_attention, self._after_attention
        # eager regions hand q, k, v to the attention as one packed tensor (rotary written straight into it,
        # the gradient accumulated packed: attention/rotary.py rotate_packed); compiled ones as three
        # tensors, whose rotation inductor fuses itself (the GPU path as measured)
        self.packed = True

    def compile_regions(self, backend: str = "inductor", fullgraph: bool = False) -> None:
        """Compile both token-wise regions (the attention call between them stays eager)."""
        self.packed = False
        self.before_attention = compile_region(self._before_attention, backend, fullgraph)
        self.after_attention = compile_region(self._after_attention, backend, fullgraph)

    def forward(self, x: Tensor, positions: Tensor | None, sequence_group=None,
                rotary_tables: tuple[Tensor, Tensor] | None = None, cache: tuple[KVCache, int] | None = None) -> Tensor:
        """x (B, N, E) -> (B, N, E); `rotary_tables` (cos, sin), each (1, N, 1, D/2), default from positions.
        `cache` (KVCache, this block's layer index): generation, the rows' keys and values kept (model/cache.py)."""
        if rotary_tables is None:
            rotary_tables = rotary_tables_of(positions, x, self.attn.head_dim, self.rotary_base)
        qkv = token_wise(self.before_attention, x, *rotary_tables, chunk_size=self.chunk_before,
                         recompute=self.recompute_before)  # (B, N, 3, H, D), or q, k, v (B, N, H, D) each
        if cache is not None:
            attn = cache[0].attend(cache[1], self.attn, qkv)  # (B, N, H, D)
        elif self.packed:
            attn = self.attn.attend_packed(qkv, sequence_group=sequence_group)  # (B, N, H, D)
        else:
            attn = self.attn.attend(*qkv, sequence_group=sequence_group)
        return token_wise(self.after_attention, x, attn, chunk_size=self.chunk_after, recompute=self.recompute_after)

    def _before_attention(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor] | Tensor:
        return self.attn.project(self.attn_norm(x), rotary_tables=(cos, sin), packed=self.packed)

    def _after_attention(self, x: Tensor, attn: Tensor) -> Tensor:
        x = x + self.attn.out(attn.flatten(2))  # (B, N, E)
        return x + self.mlp(self.mlp_norm(x))


def rotary_tables_of(positions: Tensor | None, x: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin (1, N, 1, D/2) for the rows of x (B, N, E) at `positions` (default arange(N)), in x's dtype."""
    if positions is None:
        positions = torch.arange(x.shape[1], device=x.device)
    return rotary_angles(positions, head_dim, base, dtype=x.dtype)


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
        self.compiled: bool | None = None  # decided on the first forward (the device is known then)
        self.loss_rows = self._loss_rows
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * layers)
        residual_std = config.init_std / math.sqrt(2 * config.num_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)

    def _compile_once(self, device: torch.device, backend: str = "inductor", fullgraph: bool = False) -> None:
        """On the first forward: compile the regions when `config.compile` asks for it on `device`."""
        if self.compiled is not None:
            return
        self.compiled = compile_enabled(self.config.compile, device)
        if self.compiled:
            for block in self.blocks:
                block.compile_regions(backend, fullgraph)
            self.loss_rows = compile_region(self._loss_rows, backend, fullgraph)

    def _loss_rows(self, hidden_rows: Tensor, label_rows: Tensor, ignore_index: int) -> Tensor:
        """Cross-entropy (B, n) float32 (float64 for a float64 model) of norm -> LM head on rows (B, n, E)."""
        logits = self.head(self.norm(hidden_rows))  # (B, n, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.transpose(1, 2), label_rows, ignore_index=ignore_index, reduction="none")

    def _run_blocks(self, x: Tensor, positions: Tensor | None, sequence_group, tables: tuple[Tensor, Tensor],
                    start: int, count: int, cache: KVCache | None = None) -> Tensor:
        """Blocks start .. start + count - 1. In a checkpointed group of several blocks each block is
        checkpointed too: recomputing the group keeps only its blocks' inputs, one block's intermediates."""
        nested = count > 1 and self.config.activation_checkpointing == "full" and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks[start:start + count], start):
            if nested:
                x = checkpoint(block, x, positions, sequence_group, tables, use_reentrant=False)
            else:
                x = block(x, positions, sequence_group, tables, None if cache is None else (cache, index))
        return x

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty key/value cache for generating `batch` sequences of up to `capacity` rows (prompt included),
        in the weights' dtype and device: pass it to forward as `cache`."""
        weight = self.embed.weight
        return KVCache(self.config.num_layers, batch, capacity, self.config.num_heads, self.config.head_dim,
                       weight.dtype, weight.device)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, *, labels: Tensor | None = None, positions: Tensor | None = None,
                sequence_group=None, ignore_index: int = -100, cache: KVCache | None = None) -> Tensor:
        """input_ids (B, N) -> logits (B, N, V); with `labels` (B, N) -> per-token losses (B, N) float32.

        `positions` (N,) are the global positions of these rows (default arange(N)); with a
        `sequence_group`, input_ids is this rank's shard and attention spans the group.
        input_ids and labels may have any integer dtype; their values (ids in 0..vocab_size-1, labels also
        `ignore_index`) are checked for CPU tensors, before any compute (on an accelerator that would make the
        host wait for it every step). Bad arguments raise one TypeError/ValueError naming them.
        With a `cache` (`new_cache`; generation, no gradient) input_ids are the rows after those it holds, at the
        positions that follow; it keeps their keys and values, and the logits equal a pass over all rows.
        """
        input_ids, labels, positions, sequence_group = self._check_inputs(input_ids, labels, positions,
                                                                          sequence_group, ignore_index)
        if cache is not None:
            return self._forward_cached(input_ids, labels, positions, sequence_group, cache)
        x = self.embed(input_ids)  # (B, N, E)
        self._compile_once(x.device)
        tables = rotary_tables_of(positions, x, self.config.head_dim, self.config.rotary_base)  # once for all layers
        if self.config.activation_checkpointing == "full" and torch.is_grad_enabled():
            size = self.config.checkpoint_group_size
            for start in range(0, len(self.blocks), size):
                x = checkpoint(self._run_blocks, x, positions, sequence_group, tables, start, size, use_reentrant=False)
        else:
            x = self._run_blocks(x, positions, sequence_group, tables, 0, len(self.blocks))
        if labels is None:
            return self.head(self.norm(x))
        return self._token_losses(x, labels, ignore_index)

    def _forward_cached(self, input_ids: Tensor, labels, positions, sequence_group, cache: KVCache) -> Tensor:
        """forward with a cache: logits (B, n, V) of rows cache.length .. cache.length + n - 1."""
        if labels is not None or positions is not None or sequence_group is not None or torch.is_grad_enabled():
            raise ValueError("forward with a cache is for generation: no labels, positions or sequence_group, and "
                             "no gradient (run it under torch.no_grad() or torch.inference_mode())")
        weight = self.embed.weight
        cache.check_model(self.config.num_layers, self.config.num_heads, self.config.head_dim, weight.dtype,
                          weight.device)
        cache.check_rows(*input_ids.shape)
        x = self.embed(input_ids)  # (B, n, E)
        # no _compile_once: generation feeds a new shape each call (the prompt, then one row), which regions compiled
        # for static shapes would compile again; a model that compiled in a full forward keeps its regions
        positions = torch.arange(cache.length, cache.length + input_ids.shape[1], device=x.device)
        tables = rotary_tables_of(positions, x, self.config.head_dim, self.config.rotary_base)
        x = self._run_blocks(x, positions, None, tables, 0, len(self.blocks), cache)
        cache.advance(input_ids.shape[1])
        return self.head(self.norm(x))

    def _check_inputs(self, input_ids, labels, positions, sequence_group, ignore_index: int):
        """forward's arguments checked (metadata; values of CPU tensors), before any compute: (input_ids as int32
        or int64, labels as int64 or None, positions, sequence_group as attention takes it)."""
        vocab_size = self.config.vocab_size
        _integer_tensor("input_ids", input_ids, "(batch, seq) of token ids")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must have shape (batch, seq) with batch >= 1 and seq >= 1, got "
                             f"{tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):  # the index dtypes nn.Embedding takes
            input_ids = input_ids.long()
        if _values_checked(input_ids) and not _all_true((input_ids >= 0) & (input_ids < vocab_size)):
            raise ValueError(f"input_ids hold ids outside 0..{vocab_size - 1} (min {int(input_ids.min())}, max "
                             f"{int(input_ids.max())}): every id must index the model's vocabulary "
                             f"(vocab_size={vocab_size})")
        shape, device = tuple(input_ids.shape), input_ids.device
        if labels is not None:
            labels = check_labels(labels, shape, device, vocab_size, ignore_index)
        if positions is not None:
            _integer_tensor("positions", positions, f"({shape[1]},) of the rows' global positions")
            if tuple(positions.shape) != (shape[1],):
                raise ValueError(f"positions must have shape (seq,) = ({shape[1]},) (one global position per row "
                                 f"of input_ids {shape}, shared by the batch), got {tuple(positions.shape)}")
            if positions.device != device:
                raise ValueError(f"positions are on {positions.device} but input_ids on {device}; put them on one "
                                 f"device")
        if sequence_group is not None:  # the TypeError/ValueError attention would raise, before any compute
            from longnet_dist.distributed.group_types import as_sequence_group  # floor 1 only when sharding

            sequence_group = as_sequence_group(sequence_group)
            if self.config.attention_impl == "dense":
                check_dense_options(None, sequence_group)
        return input_ids, labels, positions, sequence_group

    def token_losses(self, hidden: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """Cross-entropy per token, (B, N) float32, of the last block's output `hidden` (B, N, E).

        Final norm, LM head and loss run `token_chunk_size` rows at a time and are recomputed in the
        backward pass: long sequences never hold all (B, N, V) logits. `labels` as forward takes them.
        """
        labels = check_labels(labels, tuple(hidden.shape[:2]), hidden.device, self.config.vocab_size, ignore_index)
        return self._token_losses(hidden, labels, ignore_index)

    def _token_losses(self, hidden: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
        chunk_size = self.config.token_chunk_size
        return token_wise(functools.partial(self.loss_rows, ignore_index=ignore_index), hidden, labels,
                          chunk_size=chunk_size, recompute=hidden.shape[1] > chunk_size)  # (B, N)

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "LongNetLM":
        """The model (fp32, eval mode) of a run directory, a checkpoint folder (any ZeRO stage) or an
        exported folder; see longnet_dist/train/export.py (imported here: reading checkpoints is train's job)."""
        from longnet_dist.train.export import load_model

        return load_model(path, device=device)[0]
