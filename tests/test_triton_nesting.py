"""Shared keys inside the fused Triton kernels (fused_settings.SHARE_KEYS, kernels/triton_nesting.py), on CPU
through Triton's interpreter (and on CUDA when present).

- the plan (nesting.kernel_plan) and the pairs it saves;
- `_regions`, the loop bounds of a nested branch's programs, against a brute-force count of every pair:
  nothing needed is skipped or left unmasked, and no visited block is all skipped pairs;
- forward and gradients against the dense float64 reference and against every branch alone.
Tolerances as in test_triton_kernels.py: float32 1e-4 (summation order only), float16 4e-3.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet_dist.attention import fused, fused_settings, nesting
from reference import dilated_case, dilated_errors
from test_triton_kernels import DEVICE, DQ_MODES, fused_outputs_and_grads

triton = pytest.importorskip("triton")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
import triton.language as tl  # noqa: E402

from longnet_dist.attention.kernels.triton_nesting import _regions  # noqa: E402

PAPER = [(2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]
# logic checks that a GPU would only spend compile time on (each example compiles new kernel variants; a lease's
# test stage is time-limited): tests/test_cuda_attention.py checks shared keys on a GPU
INTERPRETER_ONLY = pytest.mark.skipif(DEVICE == "cuda", reason="kernel logic: checked through the interpreter")


@pytest.fixture(autouse=True)
def _share(monkeypatch):
    monkeypatch.setattr(fused_settings, "SHARE_KEYS", True)


def test_the_paper_branches_nest_in_a_tree_and_score_22_percent_fewer_pairs():
    plan = nesting.kernel_plan(PAPER)
    # r = 6 does not divide 16384 nor r = 12 32768: the kernels test positions, so only r_a | w_a is needed
    assert [f.parent for f in plan] == [None, 2048, 4096, 4096, 8192]
    assert plan[0].nested == ((4096, 2), (8192, 4), (16384, 6), (32768, 12))
    assert plan[1].nested == ((8192, 4), (16384, 6), (32768, 12)) and plan[2].nested == ((32768, 12),)
    assert not plan[3].nested and not plan[4].nested
    for causal in (True, False):
        alone = sum(nesting.kernel_pairs(w, r, nesting.KernelFold(), causal) for w, r in PAPER)
        shared = sum(nesting.kernel_pairs(w, r, f, causal) for (w, r), f in zip(PAPER, plan))
        assert shared / alone == pytest.approx(0.78, abs=0.005)
    # (8, 2) in (4, 1): of its 4 causal slots per head, 2 in the second half attend the 2 in the first
    assert nesting.kernel_pairs(8, 2, nesting.KernelFold(4), True) == 2 * 2 * 2 / (2 * 8)


def test_the_plan_needs_r_a_to_divide_w_a_and_stays_off_when_asked(monkeypatch):
    assert nesting.nests_in_kernel((4096, 2), (16384, 6)) and not nesting.nests_in_kernel((16384, 6), (32768, 12))
    assert not nesting.nests_in_kernel((6, 4), (12, 8))  # 4 does not divide 6
    assert nesting.kernel_plan([(8, 1), (8, 1)]) == [nesting.KernelFold(None, ((8, 1),)), nesting.KernelFold(8)]
    assert [f for _, _, f in fused.with_folds([(16, 1), (32, 2)], 1000)] == [
        nesting.KernelFold(None, ((32, 2),)), nesting.KernelFold(16)]
    assert [f for _, _, f in fused.with_folds([(16, 1), (32, 2)], 20)] == [None, None]  # (16, 1), (20, 2)
    monkeypatch.setattr(fused_settings, "SHARE_KEYS", False)
    assert [f for _, _, f in fused.with_folds([(16, 1), (32, 2)], 1000)] == [None, None]
    monkeypatch.setattr(fused_settings, "SHARE_KEYS", True)  # 17 branches nested in one: over the kernels' 16
    assert all(f is None for _, _, f in fused.with_folds([(4, 1)] * 18, 64))


@triton.jit
def _probe_regions(OUT, first, last, row0, r, parent_w, lo, hi, m_lo, m_hi, CAUSAL: tl.constexpr,
                   OWN_KEYS: tl.constexpr, BLOCK: tl.constexpr):
    a, m0, m1, gap_at, gap, d = _regions(first, last, row0, r, parent_w, lo, hi, m_lo, m_hi, CAUSAL, OWN_KEYS, True,
                                         BLOCK)
    tl.store(OUT + 0, a)
    tl.store(OUT + 1, m0)
    tl.store(OUT + 2, m1)
    tl.store(OUT + 3, gap_at)
    tl.store(OUT + 4, gap)
    tl.store(OUT + 5, d)


@st.composite
def region_cases(draw):
    w = draw(st.integers(1, 96))
    parent_w = draw(st.sampled_from([x for x in range(1, w + 1) if w % x == 0]))
    r = draw(st.integers(1, min(w, 9)))
    n = draw(st.integers(1, 3 * w))
    seg = draw(st.integers(0, (n - 1) // w))
    s = draw(st.integers(0, r - 1))
    seg_len = min(w, n - seg * w)
    n_slots = (seg_len - s + r - 1) // r
    if n_slots <= 0:
        s, n_slots = 0, (seg_len + r - 1) // r
    own, other = draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([1, 2, 4, 8, 16]))
    block = draw(st.integers(0, (n_slots - 1) // own))
    return dict(parent_w=parent_w, r=r, row0=seg * w + s, n_slots=n_slots, own=own, other=other, block=block,
                side=draw(st.sampled_from(["queries", "keys"])), causal=draw(st.booleans()))


@INTERPRETER_ONLY
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(region_cases())
def test_a_nested_branch_skips_exactly_the_pairs_inside_its_parent_segment(case):
    """One program's loop over the other side: own block `block` of `own` slots (queries, as in the forward and
    dQ kernels, or keys, as in dK/dV), the other side in blocks of `other`. With the same bounds as the kernels:
    every needed pair (causal, both slots real, different parent segments) lies in a visited block; a visited
    unmasked block holds no pair of one parent segment and needs no causal or slot mask; and when the own
    block lies in one parent segment, every visited block reaches out of it (whole blocks are skipped)."""
    n, B, own, pw, r, row0 = case["n_slots"], case["other"], case["own"], case["parent_w"], case["r"], case["row0"]
    first, last = case["block"] * own, min((case["block"] + 1) * own, n) - 1
    if case["side"] == "queries":  # _fwd / _bwd_dq: causal keys up to the block's end, masked from `full`
        lo, hi = 0, min(n, last + 1) if case["causal"] else n
        m_lo, m_hi = (first // B * B if case["causal"] else n // B * B), hi
    else:  # _bwd_dkdv: causal queries from the block's first key, masked up to `diag`
        lo = first // B * B if case["causal"] else 0
        diag = min(-(-(last + 1) // B) * B, n)
        m_lo, m_hi = (lo, diag) if case["causal"] else (n, n)
        hi = n
    out = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    _probe_regions[(1,)](out, first, last, row0, r, pw, lo, hi, m_lo, m_hi, CAUSAL=case["causal"],
                         OWN_KEYS=case["side"] == "keys", BLOCK=B)
    a, m0, m1, gap_at, gap, d = out.tolist()
    assert lo <= a <= m0 <= m1 <= d <= hi and m0 <= gap_at <= gap_at + gap <= m1, (a, m0, m1, gap_at, gap, d)
    assert gap == 0 or not case["causal"], "a causal loop needs no gap"

    def seg(slot):
        return (row0 + slot * r) // pw

    def allowed(i, j):  # own slot i, other slot j: the causal order and real slots
        causal_ok = (j <= i if case["side"] == "queries" else j >= i) if case["causal"] else True
        return causal_ok and j < n

    def needed(i, j):
        return allowed(i, j) and seg(i) != seg(j)

    own_slots = range(first, last + 1)
    blocks = [(x, min(x + B, hi)) for x in range(lo, hi, B)] if lo < hi else []
    starts = {lo, m0, gap_at + gap, d}
    for x0, x1 in blocks:
        others = range(x0, x1)
        unmasked = x0 < a or x0 >= d
        if not unmasked and not (m0 <= x0 < m1 and not gap_at <= x0 < gap_at + gap):  # skipped
            assert not any(needed(i, j) for i in own_slots for j in others), ("skipped a needed pair", x0)
            continue
        assert (x0 - next(s for s in sorted(starts, reverse=True) if s <= x0)) % B == 0, "a stretch is off the grid"
        if unmasked:
            assert all(seg(i) != seg(j) for i in own_slots for j in others if j < n), ("unmasked same segment", x0)
            if case["side"] == "queries":
                assert x1 <= n and all(allowed(i, j) for i in own_slots for j in others), ("needs a mask", x0)
            else:  # the dK/dV loop reads missing query rows as lse2 = +inf; only the causal mask matters
                assert all(allowed(i, j) or j >= n for i in own_slots for j in others), ("needs a mask", x0)
        if seg(first) == seg(last):  # a visited block reaches out of the own block's parent segment
            assert any(seg(j) != seg(first) for j in others if j < n), ("visited a block inside the segment", x0)


@st.composite
def nested_kernel_configs(draw):
    """w_i = w0 a^i, r_i = r_{i-1} times 1, 2 or 3 (r need not divide w), some repeated or capped at N."""
    a = draw(st.sampled_from([2, 3]))
    w0 = draw(st.sampled_from([4, 6, 8, 16]))
    count = draw(st.integers(2, 4))
    while w0 * a ** (count - 2) > 72:  # N >= the second longest: the reference is O(N^2)
        count -= 1
    segs, rates = [w0 * a ** i for i in range(count)], [draw(st.sampled_from([1, 2]))]
    for _ in range(count - 1):
        rates.append(rates[-1] * draw(st.sampled_from([1, 2, 3])))
    rates = [min(r, w) for w, r in zip(segs, rates)]
    n = draw(st.integers(max(2, segs[-2]), max(segs[-2], min(2 * segs[-1], 100))))
    if draw(st.booleans()):
        segs, rates = segs + [segs[-1]], rates + [rates[-1]]
    order = draw(st.permutations(range(len(segs))))
    return dict(B=draw(st.integers(1, 2)), N=n, H=draw(st.integers(1, 5)), D=16,
                segs=[segs[i] for i in order], rates=[rates[i] for i in order], causal=draw(st.booleans()),
                pad=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2**16)))


@INTERPRETER_ONLY
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(nested_kernel_configs())
def test_shared_keys_in_the_kernels_match_the_reference_and_every_branch_alone(cfg):
    """Randomised nesting branches (r not dividing w, repeated branches, any order, ragged tails, w > N, H not a
    multiple of r, key padding, batch 2, causal or not): float32 against float64, and against the kernels with
    every branch alone."""
    args = (cfg["B"], cfg["N"], cfg["H"], cfg["D"], cfg["segs"], cfg["rates"], cfg["causal"], cfg["pad"])
    case = dilated_case(DEVICE, *args, torch.float32, cfg["seed"])  # the kernels sharing keys (the default)
    assert max(case.errors.values()) < 1e-4, case.errors
    q, k, v, grad = (x.to(DEVICE, torch.float32) for x in case.inputs)
    mask = None if case.mask is None else case.mask.to(DEVICE)
    fused_settings.SHARE_KEYS = False  # (the autouse fixture restores it after the test; each example sets it)
    try:
        alone = fused_outputs_and_grads(q, k, v, grad, cfg["segs"], cfg["rates"], causal=cfg["causal"],
                                        key_padding_mask=mask)
    finally:
        fused_settings.SHARE_KEYS = True
    for name, x, y in zip(("out", "dq", "dk", "dv"), case.ours, alone):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dq_mode", DQ_MODES)
def test_shared_keys_float16_every_dq_mode(dq_mode, monkeypatch):
    """The paper's shape of tree at toy size: (12, 1) <- (24, 2) <- (48, 4) <- (96, 12), (24, 2) <- (48, 6)."""
    monkeypatch.setattr(fused_settings, "DQ_MODE", dq_mode)
    errors = dilated_errors(DEVICE, 2, 100, 5, 16, [12, 24, 48, 48, 96], [1, 2, 4, 6, 12], True, 0.3, torch.float16)
    assert max(errors.values()) < 4e-3, errors


@pytest.mark.parametrize("side,dq_mode", [(0, "tma"), (0, "kernel"), (1, "tma")])
def test_a_nested_r1_branch_writing_first_head_groups_and_a_second_chain(side, dq_mode, monkeypatch):
    """(32, 1) nests in (16, 1) and, listed first, is the branch that covers every row. It writes them: first
    (FIRST) with a second chain; else last, into the 16-bit output and gradients (LAST). Its programs whose
    queries (keys) have nothing outside their parent segment must still write, not return. One head per group
    (16-bit accumulators), and the largest-r branch on a second chain; dQ added in the dK/dV loop (the default
    "tma", atomic adds off Hopper) or from a dQ kernel, whose nested programs must write too."""
    monkeypatch.setattr(fused_settings, "DQ_MODE", dq_mode)
    monkeypatch.setattr(fused, "ACCUMULATOR_BUDGET_BYTES", 0)
    monkeypatch.setattr(fused_settings, "SIDE_BRANCHES", side)
    assert fused.covering_first(fused.with_folds([(32, 1), (16, 1), (64, 4)], 80))[0][0] == (
        32, 1, nesting.KernelFold(16, ((64, 4),)))
    errors = dilated_errors(DEVICE, 1, 80, 3, 16, [32, 16, 64], [1, 1, 4], True, 0.2, torch.float16, seed=5)
    assert max(errors.values()) < 4e-3, errors


def test_mutations_of_the_plan_are_caught(monkeypatch):
    """Dropping either half of sharing (the parent's weights, or the child's skipped keys) changes the result:
    the tests above would see it."""
    plan = nesting.kernel_plan
    for broken in (lambda p: [dataclasses.replace(f, nested=()) for f in plan(p)],
                   lambda p: [dataclasses.replace(f, parent=None) for f in plan(p)]):
        monkeypatch.setattr(fused, "_kernel_plan", broken)
        errors = dilated_errors(DEVICE, 1, 64, 2, 16, [16, 32, 64], [1, 2, 4], True, 0.0, torch.float32)
        assert max(errors.values()) > 1e-2, errors
