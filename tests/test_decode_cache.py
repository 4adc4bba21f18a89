"""Generation with a key/value cache (attention/decode.py, model/cache.py).

One row against cached rows must give exactly the row of a full causal pass: checked against the float64
dense reference on hypothesis-drawn branches (r not dividing w, w past the end, H not a multiple of r, heads no
branch covers), and the model's logits fed in pieces (prompt, single rows, several rows) against one pass.
Tolerances: float64 1e-12 (the same sums in another order); float32 2e-6 (one fp32 softmax against another).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet_dist.attention import DilatedAttention, dilated_attention
from longnet_dist.attention.decode import dilated_attention_step
from longnet_dist.model import LongNetConfig, LongNetLM
from reference import reference_dilated_attention


@st.composite
def branch_cases(draw):
    branches = draw(st.integers(1, 3))
    segs = draw(st.lists(st.integers(1, 48), min_size=branches, max_size=branches))
    rates = [draw(st.integers(1, min(w, 7))) for w in segs]
    return dict(B=draw(st.integers(1, 2)), N=draw(st.integers(1, 60)), H=draw(st.integers(1, 6)),
                D=draw(st.sampled_from([2, 4, 8])), segs=segs, rates=rates, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=branch_cases())
def test_each_row_from_the_cache_equals_the_float64_reference(case):
    generator = torch.Generator().manual_seed(case["seed"])
    B, N, H, D = case["B"], case["N"], case["H"], case["D"]
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64, generator=generator) for _ in range(3))
    expected = reference_dilated_attention(q, k, v, case["segs"], case["rates"], causal=True)  # (B, N, H, D)
    # the rows after `position` hold garbage: a step must not read them
    k_cache, v_cache = k.clone(), v.clone()
    for position in range(N):
        k_cache[:, position + 1:] = v_cache[:, position + 1:] = float("nan")
        row = dilated_attention_step(q[:, position], k_cache, v_cache, position, case["segs"], case["rates"])
        torch.testing.assert_close(row, expected[:, position], rtol=0, atol=1e-12)
        k_cache[:, position + 1:], v_cache[:, position + 1:] = k[:, position + 1:], v[:, position + 1:]


def test_float32_and_bfloat16_rows_match_the_full_pass():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 50, 4, 16) for _ in range(3))
    segs, rates = [8, 16, 32], [1, 2, 4]
    full = dilated_attention(q, k, v, segs, rates, causal=True)
    steps = torch.stack([dilated_attention_step(q[:, p], k, v, p, segs, rates) for p in range(50)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=2e-6)
    half = [x.bfloat16() for x in (q, k, v)]
    row = dilated_attention_step(half[0][:, 49], half[1], half[2], 49, segs, rates)
    assert row.dtype == torch.bfloat16
    torch.testing.assert_close(row.float(), full[:, 49], rtol=0, atol=3e-2)  # bf16 inputs: 8 bits of mantissa


@pytest.mark.parametrize("impl", ["dilated", "dense"])
def test_logits_fed_in_pieces_equal_one_forward_pass(impl):
    torch.manual_seed(0)
    config = LongNetConfig(vocab_size=40, dim=30, num_layers=2, num_heads=5, segment_lengths=[4, 9, 16],
                           dilation_rates=[1, 3, 5], attention_impl=impl)  # r not dividing w, H not a multiple of r
    model = LongNetLM(config).double().eval()
    ids = torch.randint(0, 40, (2, 45))
    with torch.no_grad():
        full = model(ids)  # (2, 45, V)
        cache = model.new_cache(batch=2, capacity=45)
        pieces = [model(ids[:, :11], cache=cache)]  # the prompt
        pieces += [model(ids[:, p:p + 1], cache=cache) for p in range(11, 30)]  # one row at a time
        pieces.append(model(ids[:, 30:], cache=cache))  # several rows after the prompt
    assert cache.length == 45
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-12)


def test_the_cache_refuses_what_it_cannot_do():
    model = LongNetLM(LongNetConfig(vocab_size=10, dim=8, num_layers=1, num_heads=2, segment_lengths=[4],
                                    dilation_rates=[1])).eval()
    ids = torch.zeros(1, 3, dtype=torch.long)
    cache = model.new_cache(batch=1, capacity=4)
    with pytest.raises(ValueError, match=r"no gradient \(run it under torch.no_grad\(\)"):
        model(ids, cache=cache)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"no labels, positions or sequence_group"):
            model(ids, labels=ids, cache=cache)
        with pytest.raises(ValueError, match=r"input_ids has batch 2 but the cache was made for batch 1"):
            model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
        model(ids, cache=cache)
        with pytest.raises(ValueError, match=r"the cache holds 3 of its 4 rows; 2 more do not fit: make it with "
                                             r"capacity >= 5"):
            model(ids[:, :2], cache=cache)
        bigger = LongNetLM(LongNetConfig(vocab_size=10, dim=16, num_layers=2, num_heads=4, segment_lengths=[4],
                                         dilation_rates=[1])).eval()
        with pytest.raises(ValueError, match=r"the cache does not fit this model \(layers 1 vs the model's 2, heads 2 "
                                             r"vs the model's 4\): make it with this model's new_cache"):
            bigger(ids, cache=model.new_cache(batch=1, capacity=4))
        with pytest.raises(ValueError, match=r"dtype torch.float32 vs the model's torch.float64"):
            LongNetLM(model.config).double()(ids, cache=model.new_cache(batch=1, capacity=4))
    with torch.inference_mode():
        made_there = model.new_cache(batch=1, capacity=4)
    with torch.no_grad(), pytest.raises(ValueError, match=r"made under torch.inference_mode\(\); use it there too"):
        model(ids, cache=made_there)
    with pytest.raises(ValueError, match=r"capacity=0 must be a positive integer"):
        model.new_cache(batch=1, capacity=0)
    layer = DilatedAttention(8, 2, [4], [1], causal=False)
    with pytest.raises(ValueError, match=r"attend_step computes causal attention; this layer has causal=False"):
        layer.attend_step(torch.zeros(1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)


def test_the_cached_path_runs_eager(monkeypatch):
    """Generation feeds a new shape each call; regions compiled for static shapes would compile again for each, so a
    forward with a cache never asks for compilation (config.compile=True here: a full forward would compile)."""
    model = LongNetLM(LongNetConfig(vocab_size=10, dim=8, num_layers=1, num_heads=2, segment_lengths=[4],
                                    dilation_rates=[1], compile=True)).eval()
    monkeypatch.setattr(model, "_compile_once", lambda device: pytest.fail("the cached path compiled"))
    cache = model.new_cache(batch=1, capacity=3)
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert model.compiled is None
