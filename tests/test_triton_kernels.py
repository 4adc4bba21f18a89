"""The fused Triton kernels' logic, on CPU through Triton's interpreter (and on CUDA when present).

Forward and gradients against the dense float64 reference, and against the gather path (the fused
kernels' plain-torch twin). Tolerances: float32 runs exact IEEE dot products, so only summation
order differs (observed ~2e-7 relative), except where a gradient cancels to ~0 (dP - rowsum(dO * O)
with a single key: a few 1e-5 of the per-element floor), hence 1e-4; float16 rounds its inputs and P to 11-bit
mantissas (observed ~5e-4 relative norm; 4e-3 allowed). bfloat16 is not tested here: the
interpreter's bf16 dot is wrong (tests/test_cuda_attention.py covers bf16 on a GPU).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet_dist.attention import dilated_attention
from reference import dilated_errors

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the ways to compute dQ (fused_settings.DQ_MODES); "stream" and "tma" differ from "kernel" and "atomic" only on
# a CUDA device (tma: compute capability 9+)
DQ_MODES = ["kernel", "atomic"] + (["stream", "tma"] if DEVICE == "cuda" else [])
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def fused_outputs_and_grads(q, k, v, grad, segment_lengths, dilation_rates, **options):
    """[out, dq, dk, dv] of the fused kernels (backend "triton") on fresh leaf copies of q, k, v."""
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = dilated_attention(*inputs, segment_lengths, dilation_rates, backend="triton", **options)
    return [out, *torch.autograd.grad(out, inputs, grad)]


@st.composite
def configs(draw):
    branches = draw(st.integers(1, 3))
    segs = sorted(draw(st.lists(st.integers(1, 80), min_size=branches, max_size=branches)))
    return dict(B=draw(st.integers(1, 2)), N=draw(st.integers(1, 70)), H=draw(st.integers(1, 5)),
                D=draw(st.sampled_from([16, 32])), segs=segs, rates=[draw(st.integers(1, min(w, 6))) for w in segs],
                causal=draw(st.booleans()), pad=draw(st.sampled_from([0.0, 0.0, 0.3, 0.9])),
                seed=draw(st.integers(0, 2**16)))


# On CUDA each drawn shape compiles new kernel variants (the JIT specialises integers by divisibility by 16 and
# equality to 1): about 3 per example, 1-2 s each, in one process. 30 examples made this one test the long pole of
# the GPU check's test stage; the interpreter checks the logic with 30 on the CPU, a GPU the compiled code with 12.
@pytest.mark.gpu_heavy
@settings(max_examples=30 if DEVICE == "cpu" else 12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_fused_float32_matches_dense_reference(cfg):
    """Ragged tails, w > N, r not dividing w, H not a multiple of r, uncovered rows, key padding
    (up to 90%: rows with no key left), causal or not, batch 2."""
    errors = dilated_errors(DEVICE, cfg["B"], cfg["N"], cfg["H"], cfg["D"], cfg["segs"], cfg["rates"], cfg["causal"],
                             cfg["pad"], torch.float32, cfg["seed"])
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [0.0, 0.3])
@pytest.mark.parametrize("dq_mode", DQ_MODES)
def test_fused_float16_matches_dense_reference(causal, pad, dq_mode, monkeypatch):
    """Every way to get dQ: its own kernel (on the same or a second stream), or atomically from the
    dK/dV loop."""
    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "DQ_MODE", dq_mode)
    errors = dilated_errors(DEVICE, 2, 100, 5, 16, [12, 32, 128], [1, 3, 6], causal, pad, torch.float16)
    assert max(errors.values()) < 4e-3, errors


def test_head_groups_give_the_same_result(monkeypatch):
    """Long sequences accumulate a group of heads at a time (16-bit inputs): forcing one head per
    group must not change anything."""
    from longnet_dist.attention import fused

    whole = dilated_errors(DEVICE, 1, 64, 3, 16, [16, 64], [1, 4], True, 0.2, torch.float16, seed=3)
    monkeypatch.setattr(fused, "ACCUMULATOR_BUDGET_BYTES", 0)
    assert fused.head_group(1, 64, 3, 16, 2, buffers=3) == 1
    grouped = dilated_errors(DEVICE, 1, 64, 3, 16, [16, 64], [1, 4], True, 0.2, torch.float16, seed=3)
    assert grouped == pytest.approx(whole, rel=1e-6, abs=1e-9)


def test_store_heads_puts_a_head_group_in_place():
    """The head group's fp32 accumulators into the output (fused_launch.store_heads): the first g heads of a
    (B, N, G, D) buffer (a last group smaller than the others) at heads [h0, h0 + g), rounded as torch rounds;
    the other heads untouched."""
    from longnet_dist.attention.fused_launch import store_heads

    acc = torch.randn(2, 37, 3, 16, device=DEVICE)
    out = torch.randn(2, 37, 5, 16, device=DEVICE).half()
    expected = out.clone()
    expected[:, :, 3:5] = acc[:, :, :2]
    store_heads(acc[:, :, :2], out, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="contiguous"):
        store_heads(acc[:, :, :2], out.transpose(1, 2), 0)


@pytest.mark.parametrize("dq_mode", DQ_MODES)
def test_fused_matches_gather_path_float32(dq_mode, monkeypatch):
    """The fused kernels against their plain-torch twin (gather -> per-branch kernel -> merge)."""
    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "DQ_MODE", dq_mode)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 90, 4, 32, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    mask = (torch.rand(2, 90, generator=g) > 0.2).to(DEVICE)
    segs, rates = [16, 40, 200], [1, 3, 8]
    outs = []
    for backend in ("triton", "chunked"):
        out = dilated_attention(q, k, v, segs, rates, causal=True, key_padding_mask=mask, backend=backend)
        outs.append([out, *torch.autograd.grad(out.square().sum(), (q, k, v))])
    for name, fused_t, twin in zip(("out", "dq", "dk", "dv"), *outs):
        torch.testing.assert_close(fused_t, twin, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dq_mode", DQ_MODES)
def test_the_r1_branch_writing_first_or_last_changes_no_bit(dtype, dq_mode, monkeypatch):
    """With an r = 1 branch the accumulators are not zero-filled: in fp32 that branch runs first and writes every
    row (FIRST); in 16-bit it runs last instead and writes the merged output, dK and dV (and dQ from a dQ kernel) in
    their dtype (LAST: no store pass after the branches; the forward's branches before it read a row only where its
    lse is finite, the backward's where its byte says a branch wrote it: MARKED). An accumulator left unfilled holds
    NaN here. Against the plain path (zeros, every branch adds, the same order, then the store pass): identical, bit
    for bit, forward and backward (from the same output), padded and causal, one head per group and the r = 1
    branch listed between the others."""
    from longnet_dist.attention import fused, fused_launch, fused_settings

    assert fused.covering_first([(8, 2), (16, 1), (32, 1)]) == ([(16, 1), (8, 2), (32, 1)], True)
    assert fused.covering_first([(8, 2), (32, 4)]) == ([(8, 2), (32, 4)], False)
    assert fused.covering_last([(16, 1), (8, 2), (32, 1)]) == [(8, 2), (32, 1), (16, 1)]
    monkeypatch.setattr(fused_settings, "DQ_MODE", dq_mode)
    monkeypatch.setattr(fused, "ACCUMULATOR_BUDGET_BYTES", 0)
    g = torch.Generator().manual_seed(11)
    q, k, v, grad = (torch.randn(2, 70, 3, 16, generator=g).to(DEVICE, dtype) for _ in range(4))
    keep = fused_launch.key_bytes((torch.rand(2, 70, generator=g) > 0.3).to(DEVICE))
    branches, scale = [(12, 2), (40, 1), (32, 3)], 16**-0.5
    stores, covering_first = [], fused.covering_first
    # plans are made once per shape and settings: this test's own cache, cleared for each order it patches in
    monkeypatch.setattr(fused, "_cached_plan", functools.lru_cache(maxsize=None)(fused._cached_plan.__wrapped__))
    monkeypatch.setattr(fused, "store_heads", lambda *args: stores.append(args) or fused_launch.store_heads(*args))
    accumulator = fused._accumulator  # an accumulator left unfilled holds NaN here: no branch may read it unwritten
    monkeypatch.setattr(fused, "_accumulator", lambda shape, dtype, device, filled: accumulator(
        shape, dtype, device, filled).fill_(float("nan") if filled else 0.0))

    def run(order=None, reference=None):
        """(out, lse, store passes forward, backward, dq, dk, dv from `reference` = (out, lse) or this run's);
        `order`: the plain path, with the covering branch where `order` puts it."""
        if order is not None:
            monkeypatch.setattr(fused, "covering_first", lambda branches: (order(covering_first(branches)[0]), False))
        fused._cached_plan.cache_clear()
        stores.clear()
        out, lse = fused.fused_forward(q, k, v, branches, True, scale, keep)
        forward_stores = len(stores)
        grads = fused.fused_backward(grad, q, k, v, *(reference or (out, lse)), branches, True, scale, keep)
        return out, lse, forward_stores, len(stores) - forward_stores, *grads

    covering = run()
    sixteen_bit = dtype != torch.float32
    fused_dq = dq_mode in ("atomic", "tma")
    assert covering[2:4] == (0, 3 if sixteen_bit and fused_dq else 0)  # fp32 accumulates in the outputs; 16-bit:
    # the r = 1 branch wrote them (LAST), except an atomically added dQ (a store per head group)
    plain = run(order=lambda o: o[1:] + o[:1] if sixteen_bit else o, reference=covering[:2])  # r = 1 where it ran
    assert plain[2:4] == ((3, 9) if sixteen_bit else (0, 0))  # a store pass per head group and tensor
    for name, a, b in zip(("out", "lse", "", "", "dq", "dk", "dv"), covering, plain):
        if name and fused_dq and name == "dq":  # atomic adds: the order of additions varies
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
        elif name:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_only_an_r1_branch_may_write_first():
    from longnet_dist.attention import fused_launch

    x = torch.zeros(1, 8, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"first=True with r=2"):
        fused_launch.forward_branch(x, x, x, None, x.clone(), torch.zeros(1, 8, 1, device=DEVICE), 8, 2, 0, True, 1.0,
                             first=True)


def test_an_unknown_dq_mode_is_one_clear_error(monkeypatch):
    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "DQ_MODE", "fast")
    q = torch.randn(1, 16, 1, 16, device=DEVICE, requires_grad=True)
    out = dilated_attention(q, q, q, [16], [1], backend="triton")
    expected = r"fused_settings.DQ_MODE='fast' is not one of \['kernel', 'stream', 'atomic', 'tma'\]"
    with pytest.raises(ValueError, match=expected):
        out.sum().backward()


def test_padded_queries_output_zero_and_pass_no_gradient():
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    mask[0, 30:] = False
    out = dilated_attention(q, k, v, [16], [1], causal=False, key_padding_mask=mask, backend="triton")
    assert out[0, 30:].abs().max() == 0
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq[0, 30:].abs().max() == 0 and dk[0, 30:].abs().max() == 0 and dv[0, 30:].abs().max() == 0


def test_default_backend_on_cpu_is_not_triton():
    """The interpreter is for tests: CPU tensors keep aten's CPU flash kernel unless asked."""
    from longnet_dist.attention import select_backend

    assert select_backend(torch.zeros(1, 4, 1, 16)) == "cpu_flash"


@pytest.mark.parametrize("bad, message", [
    (dict(dtype=torch.float64), "float16, bfloat16 and float32"),
    (dict(head_dim=160), r"head_dim <= 128 \(it runs \(16, 32, 64, 128\) and pads the others"),
])
def test_triton_backend_rejects_what_it_cannot_run(bad, message):
    x = torch.zeros(1, 8, 2, bad.get("head_dim", 16), dtype=bad.get("dtype", torch.float32), device=DEVICE)
    with pytest.raises(ValueError, match=message):
        dilated_attention(x, x, x, [4], [1], backend="triton")


@pytest.mark.gpu_heavy
@pytest.mark.parametrize("dq_mode", ["kernel", "atomic"])
def test_tma_loads_read_the_same_rows_as_pointer_loads(dq_mode, monkeypatch):
    """fused_settings.TMA_LOADS: the loops' row tiles through one descriptor per (segment, head) (row stride
    r rows, slots past the end zero-filled) instead of per-row pointers. Ragged tails, r not dividing w, H
    not a multiple of r, key padding, causal or not, a head group that starts past head 0: the same
    numbers bit for bit (a wrong row stride, origin or fill would not be)."""
    from longnet_dist.attention import fused, fused_settings

    torch.manual_seed(1)
    B, N, H, D = 2, 75, 5, 16
    q, k, v, grad = (torch.randn(B, N, H, D, device=DEVICE, dtype=torch.float16) for _ in range(4))
    mask = torch.rand(B, N, device=DEVICE) > 0.3
    monkeypatch.setattr(fused_settings, "DQ_MODE", dq_mode)
    monkeypatch.setattr(fused, "ACCUMULATOR_BUDGET_BYTES", 0)  # one head per pass: descriptors at h0 > 0

    def run(tma, causal):
        monkeypatch.setattr(fused_settings, "TMA_LOADS", frozenset(fused_settings.TMA_KERNELS if tma else ()))
        return fused_outputs_and_grads(q, k, v, grad, [16, 30, 64], [1, 4, 3], causal=causal, key_padding_mask=mask)

    for causal in (False, True):
        pointer, tma = run(False, causal), run(True, causal)
        for a, b in zip(pointer, tma):
            if dq_mode == "atomic":  # atomic adds land in any order: only dQ's rounding may differ
                torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tma_loads_fall_back_to_pointers_on_misaligned_rows(monkeypatch):
    """A descriptor needs 16-byte aligned bases and strides: rows of 5 fp16 values (10 bytes), or a view that
    starts one element into its storage, take pointers."""
    from longnet_dist.attention import fused_launch, fused_settings

    monkeypatch.setattr(fused_settings, "TMA_LOADS", frozenset({"fwd"}))
    monkeypatch.setattr(fused_settings, "WARP_SPECIALIZE", frozenset())

    def tma(kernel, *rows):
        return fused_launch._loop_loads(kernel, rows, rows, True)["TMA"]

    aligned = torch.zeros(1, 8, 2, 16, device=DEVICE, dtype=torch.float16)
    assert tma("fwd", aligned, aligned[:, :, 1:])
    assert not tma("fwd", torch.zeros(1, 8, 1, 5, device=DEVICE, dtype=torch.float16))
    shifted = torch.zeros(1 + 8 * 2 * 16, device=DEVICE, dtype=torch.float16)[1:].view(1, 8, 2, 16)
    assert not tma("fwd", aligned, shifted)
    assert not tma("dq", aligned)  # not listed


@pytest.mark.parametrize("causal", [False, True])
def test_warp_specialized_kernels_are_one_loop_with_the_same_numbers(causal, monkeypatch):
    """fused_settings.WARP_SPECIALIZE: a listed kernel runs its stretches of the other side's slots as one loop,
    every block masked, with every tile through TMA descriptors and no early return, which Triton can split into
    warp groups on compute capability 9+ (the interpreter runs the loop as it is). The masks keep the blocks the
    plain kernel leaves unmasked whole, so outputs and gradients are the same bit for bit: shared keys (a parent
    and nested branches skipping a gap when not causal), ragged tails, r not dividing w, programs past their slots.
    dK/dV is split only with a dQ kernel of its own; a padded launch, misaligned rows or a device without TMA keep
    the plain loops. tests/test_cuda_attention.py checks the compiled loops against float64."""
    from longnet_dist.attention import fused_launch, fused_settings

    torch.manual_seed(2)
    q, k, v, grad = (torch.randn(1, 100, 3, 16, device=DEVICE, dtype=torch.float16) for _ in range(4))
    monkeypatch.setattr(fused_settings, "TMA_LOADS", frozenset())  # a listed kernel takes descriptors regardless
    monkeypatch.setattr(fused_settings, "SHARE_KEYS", True)
    launched = []
    real_launch = fused_launch.launch

    def recording(kernel, grid, pointers, *scalars, **meta):
        launched.append((getattr(kernel, "fn", kernel).__name__, meta.get("WS", False), meta.get("TMA")))
        return real_launch(kernel, grid, pointers, *scalars, **meta)

    monkeypatch.setattr(fused_launch, "launch", recording)

    def run(kernels, dq_mode="kernel"):
        monkeypatch.setattr(fused_settings, "WARP_SPECIALIZE", frozenset(kernels))
        monkeypatch.setattr(fused_settings, "DQ_MODE", dq_mode)
        launched.clear()
        # (48, 1) nests in (16, 1); its last segment, [96, 100), leaves two of its three programs past their slots
        return fused_outputs_and_grads(q, k, v, grad, [16, 48, 100], [1, 1, 3], causal=causal)

    def split():
        return sorted(name for name, ws, tma in launched if ws and tma)

    plain = run(())
    assert not any(ws for _, ws, _ in launched)
    one_loop = run(("fwd", "dkdv", "dq"))
    assert split() == ["_bwd_dkdv"] * 3 + ["_bwd_dq"] * 3 + ["_fwd"] * 3, launched  # three branches
    for a, b in zip(plain, one_loop):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    run(("fwd", "dkdv"), dq_mode="atomic")  # dQ added from the dK/dV loop: that loop stays plain
    assert split() == ["_fwd"] * 3, launched
    assert fused_launch._loop_loads("fwd", (q,), (q,), False) == {"TMA": False}  # key padding, none listed
    if DEVICE == "cpu":  # no compiled loop to split outside the interpreter
        monkeypatch.setattr(fused_launch.kern, "interpreted", lambda: False)
        assert fused_launch._loop_loads("fwd", (q,), (q,), True) == {"TMA": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("side", [1, 2])
def test_a_second_chain_of_branches_matches_dense_reference(dtype, side, monkeypatch):
    """fused_settings.SIDE_BRANCHES: the branches of largest r run as a second chain into accumulators of
    their own (side streams on CUDA, in order here), joined by one Eq. 9-10 merge forward and a sum
    backward. Against float64 (ragged tails, r not dividing w, H not a multiple of r, key padding, causal),
    and against one chain (only the rounding of the merge order may differ)."""
    from longnet_dist.attention import fused_settings

    tolerance = 1e-4 if dtype == torch.float32 else 4e-3
    monkeypatch.setattr(fused_settings, "SIDE_BRANCHES", side)
    errors = dilated_errors(DEVICE, 2, 100, 5, 16, [12, 32, 128], [1, 3, 6], True, 0.3, dtype)
    assert max(errors.values()) < tolerance, errors

    torch.manual_seed(2)
    q, k, v, grad = (torch.randn(1, 90, 3, 16, device=DEVICE, dtype=dtype) for _ in range(4))

    def run(count):
        monkeypatch.setattr(fused_settings, "SIDE_BRANCHES", count)
        return fused_outputs_and_grads(q, k, v, grad, [8, 32, 64], [1, 2, 3], causal=False)

    for one, two in zip(run(0), run(side)):
        torch.testing.assert_close(one, two, rtol=tolerance, atol=tolerance)


def test_the_second_chain_takes_the_branches_of_largest_r_while_its_accumulators_fit(monkeypatch):
    from longnet_dist.attention import fused, fused_settings

    paper = [(2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]
    monkeypatch.setattr(fused_settings, "SIDE_BRANCHES", 2)
    chains = functools.partial(fused._chains, paper, 1, 32 * 1024, 12, 64, 2)
    assert chains(buffers=3) == (paper[:3], paper[3:], True)  # 3 x 96 MiB of fp32 accumulators: they fit
    assert fused._chains(paper, 1, 64 * 1024, 12, 64, 2, buffers=3) == (paper, [], True)  # 576 MiB: they do not
    monkeypatch.setattr(fused_settings, "SIDE_BRANCHES", 9)  # the first chain keeps its covering branch
    assert chains(buffers=1) == (paper[:1], paper[1:], True)
    assert fused._chains([(64, 2), (32, 4)], 1, 64, 1, 16, 2, buffers=1) == ([(64, 2)], [(32, 4)], False)
    monkeypatch.setattr(fused_settings, "SIDE_BRANCHES", 0)
    assert chains(buffers=1) == (paper, [], True)


def test_backward_prep_stores_each_heads_rows_together(monkeypatch):
    """delta = rowsum(dO * O) and lse2 = lse * log2(e) (+inf where lse is not finite), as (B, N, H) views of
    (B, H, N) storage: the dK/dV loop then reads a block of one head's slots from one stretch. Asked for, it also
    clears planes of bytes in lse2's layout (the rows a branch has written, read with lse2's strides)."""
    import math

    from longnet_dist.attention import fused_launch

    torch.manual_seed(3)
    out, grad_out = (torch.randn(2, 37, 3, 16, device=DEVICE) for _ in range(2))
    lse = torch.randn(2, 37, 3, device=DEVICE)
    lse[0, 5, 1], lse[1, 0, 2] = float("-inf"), float("nan")
    delta, lse2 = fused_launch.backward_prep(out, grad_out, lse)
    assert delta.shape == lse2.shape == (2, 37, 3) and delta.stride() == lse2.stride() == (3 * 37, 1, 37)
    torch.testing.assert_close(delta, (out * grad_out).sum(-1), rtol=1e-5, atol=1e-5)
    expected = torch.where(lse.isfinite(), lse / math.log(2), torch.full_like(lse, float("inf")))
    torch.testing.assert_close(lse2, expected)
    empty = torch.empty  # the planes come uncleared (here: full of 7s); the kernel zeroes them
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(7)
                        if kw.get("dtype") == torch.uint8 else empty(*shape, **kw))
    delta_again, lse2_again, *marks = fused_launch.backward_prep(out, grad_out, lse, marks=2)
    assert torch.equal(delta_again, delta) and torch.equal(lse2_again, lse2)
    assert len(marks) == 2 and all(m.dtype == torch.uint8 and m.stride() == lse2.stride() and not m.any()
                                   for m in marks)
