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


@pytest.mark.parametrize("call, error, match", [
    # causal by bool(): "False" was truthy, so the layer attended causally (differing from the reference by 2.6)
    (lambda: dilated_attention(q, q, q, [8], [1], causal="False"), TypeError, r"causal must be True or False, got "
                                                                               r"str 'False'"),
    (lambda: DilatedAttention(8, 2, [8], [1], causal="no"), TypeError, r"causal must be True or False"),
    (lambda: dilated_attention([1.0], q, q, [8], [1]), TypeError, r"q must be a torch.Tensor, got list"),
    (lambda: dilated_attention(q, q, q, [8], [1], key_padding_mask=[[True] * 16]), TypeError,
     r"key_padding_mask must be a torch.Tensor, got list"),
    (lambda: dilated_attention(q, q, q, {8: 1}, [1]), TypeError, r"segment_lengths must be a list of integers, e.g. "
                                                                  r"\[2048, 4096\], got dict"),
    (lambda: dilated_attention(q, q, q, 8, [1]), TypeError, r"segment_lengths must be a list of integers.*got int 8"),
    (lambda: dilated_attention(q, q, q, torch.tensor([8]), [1]), TypeError, r"got Tensor .*\(e.g. .tolist\(\)\)"),
    # 1e39 is a finite Python float but inf in float32: every output was NaN
    (lambda: dilated_attention(q, q, q, [8], [1], scale=1e39), ValueError, r"that torch.float32 holds \(at most "
                                                                          r"3.4e\+38\), got 1e\+39"),
    (lambda: dilated_attention(q[..., :0], q[..., :0], q[..., :0], [8], [1]), ValueError, r"head_dim must be >= 1"),
    (lambda: DilatedAttention(8, True, [8], [1]), ValueError, r"num_heads must be a positive integer, got True"),
    (lambda: DilatedAttention(8, 0, [8], [1]), ValueError, r"num_heads must be a positive integer, got 0"),
    (lambda: DilatedAttention(6, 2, [8], [1]), ValueError, r"head_dim = embed_dim / num_heads = 6 / 2 = 3 must be even"),
    (lambda: DilatedAttention(8, 2, [8], [1], rotary_base=0), ValueError, r"rotary_base must be a finite number > 0"),
    (lambda: DilatedAttention(8, 2, [8], [1], backend="foo"), ValueError, r"backend='foo' is not one of"),
    (lambda: DilatedAttention(8, 2, [8], [1])(torch.randn(16, 8)), ValueError, r"x must be a tensor of shape "
                                                                                r"\(batch, seq, embed_dim=8\), got \(16, 8\)"),
    (lambda: DilatedAttention(8, 2, [8], [1])(torch.randn(1, 16, 12)), ValueError, r"embed_dim=8\), got \(1, 16, 12\)"),
    (lambda: DilatedAttention(8, 2, [8], [1])(torch.randn(1, 16, 8).double()), ValueError,
     r"x is torch.float64 but the layer's weights are torch.float32"),
    (lambda: DilatedAttention(8, 2, [8], [1])(torch.randn(1, 16, 8), positions=torch.ones(16, dtype=torch.bool)),
     ValueError, r"positions must be an integer tensor of shape \(seq,\) = \(16,\), got torch.bool"),
    (lambda: DilatedAttention(8, 2, [8], [1])(torch.randn(1, 16, 8), positions=torch.arange(8)), ValueError,
     r"got torch.int64 \(8,\)"),
])
def test_api_misuse_is_one_clear_error_before_compute(call, error, match):
    """Found by a probe of the public API: each was accepted silently (wrong results) or failed deep in torch."""
    with pytest.raises(error, match=match):
        call()


def test_unusual_but_valid_inputs_are_taken_as_meant():
    """numpy integers and arrays' .tolist() for the branches, numpy bool for causal, an empty sequence."""
    import numpy as np

    reference = dilated_attention(q, q, q, [8], [1], causal=True)
    assert torch.equal(dilated_attention(q, q, q, np.array([8]).tolist(), (np.int64(1),), causal=np.bool_(True)),
                       reference)
    empty = torch.randn(2, 0, 2, 4, requires_grad=True)
    out = dilated_attention(empty, empty, empty, [8], [1], causal=True)
    assert out.shape == (2, 0, 2, 4)
    out.sum().backward()
    assert empty.grad.shape == empty.shape
