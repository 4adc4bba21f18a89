"""Nested branches sharing keys (attention/nesting.py): the plan, the regions, the bias, and exactness
against the dense float64 reference and against every branch computed alone."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet_dist.attention import dilated, dilated_attention, nesting
from longnet_dist.attention.nesting import Fold
from subprocess_env import repo_first_on_pythonpath
from test_dilated_attention import F64_TOL, assert_all_close, make_inputs, run_both


def test_plan_of_a_doubling_chain_and_of_the_paper_branches():
    assert nesting.plan([(2048, 1), (4096, 2), (8192, 4)]) == [
        Fold(None, (2, 4)), Fold(2048, (4,)), Fold(4096, ())]
    # r = 6 and 12 divide no shorter segment (4096 % 6, 16384 % 12): those two attend their whole segments
    assert nesting.plan([(2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]) == [
        Fold(None, (2, 4)), Fold(2048, (4,)), Fold(4096, ()), Fold(None, ()), Fold(None, ())]


def test_plan_takes_the_longest_parent_whose_ancestors_fit_too():
    # (16, 8) nests in (8, 2) but not in (8, 2)'s parent (4, 1) (4 % 8 != 0): it stays a root
    assert nesting.plan([(4, 1), (8, 2), (16, 8)]) == [Fold(None, (2,)), Fold(4, ()), Fold(None, ())]
    # listed in any order; equal branches nest in one another (the second scores nothing of its own)
    assert nesting.plan([(8, 2), (4, 1), (4, 1)]) == [Fold(4, ()), Fold(None, (1, 2)), Fold(4, ())]
    assert nesting.calls(4, 1, Fold(4, ()), causal=True) == []


def test_regions_are_the_keys_outside_the_parent_segment():
    whole = [(slice(0, 8), slice(0, 8), True)]
    assert nesting.calls(8, 1, Fold(None, (2,)), causal=True) == whole
    # w/r = 8 slots, parent segments of 2 slots: block q attends blocks before it (and after it, not causal)
    assert nesting.calls(16, 2, Fold(4, ()), causal=True) == [
        (slice(2, 4), slice(0, 2), False), (slice(4, 6), slice(0, 4), False), (slice(6, 8), slice(0, 6), False)]
    assert nesting.calls(8, 2, Fold(4, ()), causal=False) == [
        (slice(0, 2), slice(2, 4), False), (slice(2, 4), slice(0, 2), False)]


def test_bias_counts_the_nested_branches_that_share_each_pair():
    # root (w, r = 1) with nested r = 2 and 4, head group g = 3: r = 2 keeps odd slots, r = 4 slots = 3 (mod 4)
    fold = Fold(None, (2, 4))
    assert nesting.head_groups(1, fold, heads=6) == (4, range(4))
    b = nesting.bias(1, 3, fold, slice(0, 8), slice(0, 8), torch.float64, torch.device("cpu"))[0, 0]
    odd, three = torch.arange(8) % 2 == 1, torch.arange(8) % 4 == 3
    count = (odd[:, None] & odd[None, :]).double() + (three[:, None] & three[None, :]).double()
    torch.testing.assert_close(b, torch.log1p(count), rtol=0, atol=0)
    assert b[3, 7] == math.log(3) and b[1, 3] == math.log(2) and b[1, 2] == 0
    # branch r = 2 with nested r = 4: in its slots (positions s + 2k), head group 3 (s = 1) shares the odd slots
    b = nesting.bias(2, 3, Fold(4, (4,)), slice(2, 4), slice(0, 2), torch.float64, torch.device("cpu"))[0, 0]
    torch.testing.assert_close(b, torch.tensor([[0.0, 0.0], [0.0, math.log(2)]], dtype=torch.float64))
    assert nesting.bias(2, 1, Fold(4, ()), slice(2, 4), slice(0, 2), torch.float64, torch.device("cpu")) is None


def test_biases_are_kept_across_calls_within_a_byte_budget(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(nesting, "_BIASES", type(nesting._BIASES)())
    first = nesting.bias(1, 3, Fold(None, (2, 4)), slice(0, 8), slice(0, 8), torch.float64, cpu)
    assert nesting.bias(1, 3, Fold(None, (2, 4)), slice(8, 16), slice(0, 8), torch.float64, cpu) is first
    monkeypatch.setattr(nesting, "CACHE_BYTES", 8 * 8 * 8)  # one 8 x 8 float64 bias
    other = nesting.bias(1, 2, Fold(None, (2, 4)), slice(0, 8), slice(0, 8), torch.float64, cpu)
    assert list(nesting._BIASES.values()) == [other] and not torch.equal(other, first)


def test_cost_model_and_bias_size_decide():
    chain = [(2048, 1), (4096, 2), (8192, 4)]
    assert nesting.choose(chain, causal=True, element_size=4) == nesting.plan(chain)
    # branches growing 4x (configs/attention/long.yaml): the first branch does most of the work, and its bias
    # would cost more than the others save
    assert nesting.choose([(2048, 1), (8192, 4), (32768, 16)], causal=True, element_size=4) is None
    # a root of 4096 slots: its (4096, 4096) bias is 64 MiB in float32, 128 MiB in float64 (over BIAS_BYTES)
    assert nesting.choose([(4096, 1), (8192, 2)], causal=True, element_size=4) is not None
    assert nesting.choose([(4096, 1), (8192, 2)], causal=True, element_size=8) is None
    assert nesting.choose([(2048, 1), (2048, 3)], causal=True, element_size=4) is None  # nothing nests


def _calls(monkeypatch):
    """Record (q shape, k shape, causal, has bias) of every forward kernel call of dilated.py."""
    calls, kernel = [], dilated.attention_forward
    monkeypatch.setattr(dilated, "attention_forward", lambda q, k, v, **kw: calls.append(
        (tuple(q.shape), tuple(k.shape), kw["causal"], kw.get("bias") is not None)) or kernel(q, k, v, **kw))
    return calls


def test_shared_keys_score_each_pair_once(monkeypatch):
    """w = 8, 16, 32, r = 1, 2, 4 on N = 64, H = 4, causal: the exact calls, and the score pairs they need
    (the first branch's full causal square is the same) are fewer than with every branch alone."""
    calls = _calls(monkeypatch)
    (q, k, v), _ = make_inputs(1, 64, 4, 8)
    with torch.no_grad():
        shared = dilated_attention(q, k, v, [8, 16, 32], [1, 2, 4], causal=True)
    # root: 4 head groups (h mod 4), (8 segments, 8 slots, 1 head), with the bias; r = 2: per group, 4 slots
    # after the first 8-segment attend the 4 slots in it (4 segments of 16), with the bias of r = 4 for the
    # groups that share with it (all: each group's slots = h mod 4 are half of its slots = h mod 2);
    # r = 4: 4 slots attend the 4 before them (2 segments of 32), no bias
    assert calls == ([((8, 8, 1, 8), (8, 8, 1, 8), True, True)] * 4 + [((4, 4, 1, 8), (4, 4, 1, 8), False, True)] * 4
                     + [((2, 4, 1, 8), (2, 4, 1, 8), False, False)] * 4), calls
    monkeypatch.setattr(dilated, "SHARE_KEYS", False)
    alone = dilated_attention(q, k, v, [8, 16, 32], [1, 2, 4], causal=True)
    pairs = lambda found: sum(math.prod(qs[:3]) * ks[1] for qs, ks, _, _ in found)  # noqa: E731
    assert pairs(calls[:12]) == 8 * 64 * 4 + 4 * 16 * 4 + 2 * 16 * 4 < pairs(calls[12:]) == 8 * 64 * 4 + 2 * (4 * 64 * 2) + 4 * 2 * 64
    torch.testing.assert_close(shared, alone, rtol=1e-13, atol=1e-15)


@st.composite
def nested_configs(draw):
    """Branches that nest: w_i = w0 a^i (a few capped at N or repeated), r_i = a^i or some divisor of it."""
    a = draw(st.sampled_from([2, 3, 4]))
    w0 = draw(st.sampled_from([a, 2 * a, 4]))
    count = draw(st.integers(2, 4))
    while w0 * a ** (count - 1) > 256:  # the reference is O(N^2)
        count -= 1
    segs = [w0 * a ** i for i in range(count)]
    rates = [draw(st.sampled_from(sorted({1, a ** i // a if i else 1, a ** i}))) for i in range(count)]
    rates = [r if w % r == 0 else 1 for w, r in zip(segs, rates)]
    order = draw(st.permutations(range(count)))
    N = draw(st.sampled_from([segs[-1], 2 * segs[-1], segs[-2] * (a if count > 2 else 1), segs[-1] + segs[0]]))
    return dict(B=draw(st.integers(1, 2)), N=N, H=draw(st.integers(1, 6)), D=4, segs=[segs[i] for i in order],
                rates=[rates[i] for i in order], causal=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                backend=draw(st.sampled_from(["cpu_flash", "chunked"])))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested_configs())
def test_shared_keys_match_the_reference_and_every_branch_alone(cfg):
    """Randomised nesting branches (growth 2-4, r = a^i or a divisor of it, w > N, repeated branches, any
    order, H not a multiple of r, batch 2, causal or not, both CPU kernels): forward and gradients equal the
    float64 reference, and equal the same attention with every branch alone (float64 rounding only)."""
    (q, k, v), _ = make_inputs(cfg["B"], cfg["N"], cfg["H"], cfg["D"], seed=cfg["seed"])
    inputs = dilated.AttentionInputs((q, k, v), cfg["B"], cfg["N"], cfg["H"], None, cfg["causal"], 0.5, cfg["backend"])
    shares = dilated.share_keys(inputs, [dilated.LocalBranch(w, r) for w, r in zip(cfg["segs"], cfg["rates"])])
    ours, ref = run_both(q, k, v, cfg["segs"], cfg["rates"], cfg["causal"], None, cfg["backend"])
    assert_all_close(ours, ref, **F64_TOL)
    if shares:
        dilated.SHARE_KEYS = False
        try:
            alone, _ = run_both(q, k, v, cfg["segs"], cfg["rates"], cfg["causal"], None, cfg["backend"])
        finally:
            dilated.SHARE_KEYS = True
        assert_all_close(ours, [x.double() for x in alone], **F64_TOL)


@pytest.mark.parametrize("case", ["padding", "ragged", "off"])
def test_no_sharing_where_it_does_not_apply(case, monkeypatch):
    """Key padding, a ragged last segment, or LONGNET_SHARE_KEYS=0 (dilated.SHARE_KEYS): every branch alone."""
    n, pad = 64, 0.0
    if case == "padding":
        pad = 0.3
    elif case == "ragged":
        n = 70
    else:
        monkeypatch.setattr(dilated, "SHARE_KEYS", False)
    calls = _calls(monkeypatch)
    (q, k, v), mask = make_inputs(2, n, 4, 8, pad_fraction=pad)
    ours, ref = run_both(q, k, v, [8, 16, 32], [1, 2, 4], True, mask)
    assert calls and not any(bias for *_, bias in calls)
    assert_all_close(ours, ref, **F64_TOL)


@pytest.mark.parametrize("value, expected", [("0", "False False"), ("1", "True True"), (None, "True True")])
def test_one_environment_switch_turns_sharing_off_on_the_cpu_and_the_gpu(value, expected):
    """LONGNET_SHARE_KEYS=0 in the environment: dilated.SHARE_KEYS (CPU path) and fused_settings.SHARE_KEYS (fused
    GPU kernels) are both off at import; on (the default) otherwise."""
    env = repo_first_on_pythonpath(os.environ)
    env.pop("LONGNET_SHARE_KEYS", None)
    if value is not None:
        env["LONGNET_SHARE_KEYS"] = value
    code = ("from longnet_dist.attention import dilated, fused_settings; "
            "print(dilated.SHARE_KEYS, fused_settings.SHARE_KEYS)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == expected, result.stdout


@pytest.mark.parametrize("causal", [True, False])
def test_a_branch_that_cannot_share_runs_alone_beside_those_that_do(causal, monkeypatch):
    """r = 8 does not divide w = 36 (no strided view): that branch is gathered and attends its whole segments,
    the 8- and 16-branches share keys; together exact."""
    segs, rates = [8, 36, 16], [1, 8, 2]
    (q, k, v), _ = make_inputs(2, 144, 4, 8, seed=2)
    branches = [dilated.LocalBranch(w, r) for w, r in zip(segs, rates)]
    inputs = dilated.AttentionInputs((q, k, v), 2, 144, 4, None, causal, 0.5, "cpu_flash")
    assert dilated.share_keys(inputs, branches) == {branches[0]: Fold(None, (2,)), branches[2]: Fold(8, ())}
    calls = _calls(monkeypatch)
    ours, ref = run_both(q, k, v, segs, rates, causal, None)
    assert sum(bias for *_, bias in calls) == 2 * 2  # the 8-branch's two head groups, per batch element
    assert_all_close(ours, ref, **F64_TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_shared_backward_in_chunks_changes_no_bit(causal, monkeypatch):
    """The shared branches' backward runs a chunk of whole segments at a time: one segment per chunk gives
    the same gradients (float64 ulps: aten's kernel splits its work by the batch it is given)."""
    (q, k, v), _ = make_inputs(2, 64, 5, 8, seed=7)
    whole = run_both(q, k, v, [8, 16, 32], [1, 2, 4], causal, None)
    monkeypatch.setattr(dilated, "BACKWARD_CHUNK_BYTES", 1)
    monkeypatch.setattr(dilated, "FORWARD_CHUNK_BYTES", 1)
    chunked = run_both(q, k, v, [8, 16, 32], [1, 2, 4], causal, None)
    for name, a, b in zip(("out", "dq", "dk", "dv"), whole[0], chunked[0]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, msg=lambda m: f"{name}: {m}")
    assert_all_close(*chunked, **F64_TOL)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(rtol=1e-4, atol=1e-5)),
                                        (torch.bfloat16, dict(rtol=5e-2, atol=5e-2))])
def test_shared_keys_in_low_precision(dtype, tol):
    """The bias is added in the input dtype (ln 2, ln 3 rounded to bf16 in bf16): still within the tolerances
    of tests/test_dilated_attention.py against the float64 reference."""
    (q, k, v), _ = make_inputs(2, 128, 4, 16, dtype=dtype, seed=3)
    ours, ref = run_both(q, k, v, [16, 32, 64], [1, 2, 4], True, None)
    assert ours[0].dtype == dtype
    assert_all_close(ours, ref, **tol)

