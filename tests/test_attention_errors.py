"""Bad input gets one clear ValueError that names the bad value, before any compute."""
from __future__ import annotations

import pytest
import torch

from longnet_dist.attention import DilatedAttention, check_sequence_parallel_config, dilated_attention

q = torch.randn(1, 16, 2, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(segment_lengths=[8, 16], dilation_rates=[1]), r"same length"),
    (dict(segment_lengths=[], dilation_rates=[]), r"empty"),
    (dict(segment_lengths=[0], dilation_rates=[1]), r"segment length 0"),
    (dict(segment_lengths=[8.5], dilation_rates=[1]), r"segment length 8.5"),
    (dict(segment_lengths=[8], dilation_rates=[-1]), r"dilation rate -1"),
    (dict(segment_lengths=[8], dilation_rates=[True]), r"dilation rate True"),
    (dict(segment_lengths=[4], dilation_rates=[8]), r"dilation rate 8 is larger than its segment length 4"),
])
def test_bad_branches(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, q, q, **kwargs)


def test_shape_dtype_mask_and_backend_errors():
    with pytest.raises(ValueError, match=r"same shape"):
        dilated_attention(q, torch.randn(1, 8, 2, 4), q, [8], [1])
    with pytest.raises(ValueError, match=r"same dtype"):
        dilated_attention(q, q.double(), q, [8], [1])
    with pytest.raises(ValueError, match=r"\(batch, seq, heads, head_dim\)"):
        dilated_attention(q[0], q[0], q[0], [8], [1])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, seq\) = \(1, 16\)"):
        dilated_attention(q, q, q, [8], [1], key_padding_mask=torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool"):
        dilated_attention(q, q, q, [8], [1], key_padding_mask=torch.ones(1, 16))
    with pytest.raises(ValueError, match=r"unknown attention backend 'tpu_flash'"):
        dilated_attention(q, q, q, [8], [1], backend="tpu_flash")
    with pytest.raises(ValueError, match=r"cuda_flash' needs CUDA"):
        dilated_attention(q, q, q, [8], [1], backend="cuda_flash")
    with pytest.raises(ValueError, match=r"scale must be a positive"):
        dilated_attention(q, q, q, [8], [1], scale=-1.0)
    with pytest.raises(ValueError, match=r"embed_dim 10 is not divisible by num_heads 4"):
        DilatedAttention(10, 4, [8], [1])


@pytest.mark.parametrize("args, match", [
    ((1000, 3, [8], [1]), r"seq_len 1000 is not divisible by sequence_parallel_size 3"),
    ((1024, 4, [96], [1]), r"segment length 96 does not tile the per-rank shard of 256"),
    ((1024, 4, [384], [1]), r"segment length 384 spans ranks but is not a multiple of the per-rank shard of 256"),
])
def test_sequence_parallel_config_errors(args, match):
    with pytest.raises(ValueError, match=match):
        check_sequence_parallel_config(*args)


def test_sequence_parallel_config_accepts_paper_settings():
    check_sequence_parallel_config(65536, 4, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])  # LM runs
    check_sequence_parallel_config(1 << 20, 8, [2048, 8192, 32768, 1 << 20], [1, 4, 16, 64])
