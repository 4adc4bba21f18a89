"""DenseAttention: the DilatedAttention layer with full causal attention, as a baseline to measure against."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from longnet_dist.attention import DilatedAttention
from longnet_dist.attention.decode import dilated_attention_step

ATTENTION_IMPLS = ("dilated", "dense")


class DenseAttention(DilatedAttention):
    """Same projections, rotary and parameters as DilatedAttention; every query attends to every
    earlier key through `scaled_dot_product_attention` (flash attention on GPUs). One device only."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
               sequence_group=None) -> Tensor:
        check_dense_options(key_padding_mask, sequence_group)
        heads_first = [t.transpose(1, 2) for t in (q, k, v)]  # (B, H, N, D) views
        return F.scaled_dot_product_attention(*heads_first, is_causal=self.causal).transpose(1, 2)  # (B, N, H, D)

    def attend_packed(self, qkv: Tensor, *, key_padding_mask: Tensor | None = None, sequence_group=None) -> Tensor:
        return self.attend(*qkv.unbind(2), key_padding_mask=key_padding_mask, sequence_group=sequence_group)


    def attend_step(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, position: int) -> Tensor:
        """Row `position` attends every row 0..position: one branch of one segment holding them all, r = 1."""
        return dilated_attention_step(q, k_cache, v_cache, position, [position + 1], [1])


def check_dense_options(key_padding_mask: Tensor | None, sequence_group) -> None:
    """ValueError unless dense attention can run these options: no key_padding_mask, no sequence group of size > 1.
    `sequence_group` goes through the dilated path's conversion first (as_sequence_group), so what is no group
    gets its TypeError."""
    if sequence_group is not None:
        from longnet_dist.distributed.group_types import as_sequence_group  # floor 1 only when a group is given

        sequence_group = as_sequence_group(sequence_group)
    if key_padding_mask is not None or (sequence_group is not None and sequence_group.size > 1):
        raise ValueError("attention_impl='dense' supports neither key_padding_mask nor a sequence group of "
                         "size > 1; use attention_impl='dilated'")


def attention_class(impl: str) -> type[DilatedAttention]:
    if impl == "dilated":
        return DilatedAttention
    if impl == "dense":
        return DenseAttention
    raise ValueError(f"model attention_impl={impl!r} is not one of {list(ATTENTION_IMPLS)}")
