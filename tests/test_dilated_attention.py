"""Dilated attention on one device against the dense float64 reference (tests/reference.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet_dist.attention import dilated_attention
from reference import reference_dilated_attention

# float64: both sides do the same math in double precision; differences are summation order only.
F64_TOL = dict(rtol=1e-9, atol=1e-10)


def make_inputs(B, N, H, D, dtype=torch.float64, seed=0, pad_fraction=0.0, head_dim_strided=False):
    """q, k, v (B, N, H, D) and a key padding mask; `head_dim_strided`: views of (B, N, D, H) leaves, whose head
    dim has stride H (aten's flash kernels read a row's D values as contiguous: such inputs must be copied)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = None
    if pad_fraction > 0:
        mask = torch.rand(B, N, generator=g) >= pad_fraction
    if head_dim_strided:
        return [x.transpose(2, 3).contiguous().to(dtype).requires_grad_().transpose(2, 3) for x in (q, k, v)], mask
    return [x.to(dtype).requires_grad_() for x in (q, k, v)], mask


def run_both(q, k, v, segs, rates, causal, mask, backend=None):
    """Output and (dq, dk, dv) of ours and of the reference (in float64) for one random upstream grad."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = dilated_attention(q, k, v, segs, rates, causal=causal, key_padding_mask=mask, backend=backend)
    ours = [out] + list(torch.autograd.grad(out, (q, k, v), grad.to(out.dtype)))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out = reference_dilated_attention(q64, k64, v64, segs, rates, causal=causal, key_padding_mask=mask)
    ref = [ref_out] + list(torch.autograd.grad(ref_out, (q64, k64, v64), grad))
    return ours, ref


def no_gather(layout, rows):
    """Stands in for BranchLayout.gather where the CPU path must read rows in place."""
    raise AssertionError("a local branch gathered rows on the CPU")


def assert_all_close(ours, ref, **tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a.double(), b, msg=lambda m: f"{name}: {m}", **tol)


@st.composite
def configs(draw):
    N = draw(st.integers(1, 70))
    branches = draw(st.integers(1, 3))
    segs = sorted(draw(st.lists(st.integers(1, 80), min_size=branches, max_size=branches)))
    rates = [draw(st.integers(1, min(w, 6))) for w in segs]
    return dict(B=draw(st.integers(1, 2)), N=N, H=draw(st.integers(1, 5)), D=draw(st.sampled_from([4, 8])),
                segs=segs, rates=rates, causal=draw(st.booleans()),
                pad=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2**16)),
                backend=draw(st.sampled_from(["cpu_flash", "chunked"])), strided=draw(st.sampled_from([False] * 3 + [True])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_matches_dense_reference_float64(cfg):
    """Randomised: ragged tails, w > N, H not a multiple of r, several branches, causal or not,
    random key padding, batch > 1, both kernels, a head dim of stride 1 or not. Forward and all three gradients."""
    (q, k, v), mask = make_inputs(cfg["B"], cfg["N"], cfg["H"], cfg["D"], seed=cfg["seed"], pad_fraction=cfg["pad"],
                                  head_dim_strided=cfg["strided"])
    ours, ref = run_both(q, k, v, cfg["segs"], cfg["rates"], cfg["causal"], mask, cfg["backend"])
    assert_all_close(ours, ref, **F64_TOL)


@st.composite
def in_place_configs(draw):
    """Segments that tile N (w | N), leave a ragged last segment, or exceed N (one segment)."""
    N = draw(st.integers(1, 96))
    divisors = [d for d in range(1, N + 1) if N % d == 0]
    segs = sorted(draw(st.lists(st.one_of(st.sampled_from(divisors), st.integers(1, N + 9)), min_size=1, max_size=3)))
    rates = [draw(st.integers(1, min(w, 13))) for w in segs]  # r > N when w > N: offsets with no row
    return dict(B=draw(st.integers(1, 2)), N=N, H=draw(st.integers(1, 7)), D=draw(st.sampled_from([4, 8])),
                segs=segs, rates=rates, causal=draw(st.booleans()), pad=draw(st.sampled_from([0.0, 0.3])),
                seed=draw(st.integers(0, 2**16)), backend=draw(st.sampled_from(["cpu_flash", "chunked"])),
                one_segment_per_chunk=draw(st.booleans()))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(in_place_configs())
def test_every_local_branch_is_read_in_place_on_the_cpu(cfg):
    """Any N and branches: r dividing w or not (the paper's r = 6, 12), a ragged last segment (a chunk of its
    own), r larger than the segment, H not a multiple of r, key padding, causal or not, batch 2, both
    kernels, chunks of the default size or of one segment each: forward and backward read every branch's
    rows through strided views (layout.offset_view; no gather, no index_add) and match the float64
    reference, output and all three gradients."""
    from longnet_dist.attention import dilated, layout

    (q, k, v), mask = make_inputs(cfg["B"], cfg["N"], cfg["H"], cfg["D"], seed=cfg["seed"], pad_fraction=cfg["pad"])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(layout.BranchLayout, "gather", no_gather)
        if cfg["one_segment_per_chunk"]:
            m.setattr(dilated, "FORWARD_CHUNK_BYTES", 1)
        ours, ref = run_both(q, k, v, cfg["segs"], cfg["rates"], cfg["causal"], mask, cfg["backend"])
    assert_all_close(ours, ref, **F64_TOL)


def test_a_ragged_last_segment_is_a_chunk_of_its_own():
    """N = 70, w = 16, 96 bytes per position, a 4608-byte budget: three segments per chunk over the 64
    positions of whole segments (the second chunk stops there), then the last 6 as one segment (viewable
    layouts all)."""
    from longnet_dist.attention import dilated

    (q, k, v), _ = make_inputs(1, 70, 4, 8)
    inputs = dilated.AttentionInputs((q, k, v), 1, 70, 4, None, True, 1.0, None)
    chunks = list(dilated.LocalBranch(16, 3)._chunks(inputs, 4608, 96))
    assert [(start, stop) for _, start, stop, _ in chunks] == [(0, 48), (48, 64), (64, 70)]
    assert all(lay.viewable for *_, lay in chunks) and chunks[-1][3].effective_segment == 6
    assert [(s, e) for _, s, e, _ in dilated.LocalBranch(128, 3)._chunks(inputs, 3072, 96)] == [(0, 70)]


def test_offset_views_hold_exactly_the_rows_each_head_keeps():
    """r = 6 does not divide w = 16: offsets s < 16 mod 6 = 4 keep 3 slots per segment, the others 2
    (positions s, s + 6, s + 12 < 16), each head h = s (mod 6) its own offset; r = 5 > N = 4 (one
    segment): offset 4 keeps nothing."""
    from longnet_dist.attention.layout import BranchLayout

    N, H = 32, 8
    x = torch.arange(N * H).view(1, N, H, 1)  # row value = position * H + head
    lay = BranchLayout(N, H, 16, 6)
    assert [lay.offset_slots(g) for g in range(6)] == [3, 3, 3, 3, 2, 2]
    for g in range(6):
        view = lay.offset_view(x, g, heads=True, flat=False)             # (1, n_seg, m_s, H_s, 1)
        positions = [[j * 16 + g + 6 * k for k in range(lay.offset_slots(g))] for j in range(2)]
        expected = torch.tensor([[[p * H + h for h in range(g, H, 6)] for p in seg] for seg in positions])
        assert torch.equal(view[0, ..., 0], expected), g
    assert BranchLayout(4, 5, 4, 5).offset_slots(4) == 0

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype, tol", [
    # fp32: flash accumulates in fp32 over <= 64 keys; errors ~1e-6 relative, gradients a bit more.
    (torch.float32, dict(rtol=1e-4, atol=1e-5)),
    # bf16: inputs and outputs carry 8 mantissa bits (relative step 2^-8 = 0.004); the merge runs in
    # fp32, so the error is a few bf16 roundings of O(1) values.
    (torch.bfloat16, dict(rtol=5e-2, atol=5e-2)),
])
def test_low_precision_against_float64_reference(dtype, tol, causal):
    (q, k, v), mask = make_inputs(2, 150, 4, 16, dtype=dtype, seed=3, pad_fraction=0.2)
    ours, ref = run_both(q, k, v, [16, 32, 64], [1, 2, 4], causal, mask)
    assert ours[0].dtype == dtype
    assert_all_close(ours, ref, **tol)


def test_paper_like_config_float64():
    """Five branches with the paper's ratios (scaled down), N with a ragged tail."""
    (q, k, v), mask = make_inputs(1, 333, 6, 8, seed=5)
    ours, ref = run_both(q, k, v, [8, 16, 32, 64, 128], [1, 2, 4, 6, 12], True, None)
    assert_all_close(ours, ref, **F64_TOL)


@pytest.mark.parametrize("backend", ["cpu_flash", "chunked"])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_in_chunks_reads_in_place_and_changes_no_bit(backend, causal, monkeypatch):
    """Whole segments: the CPU forward reads each head offset's rows as views (no gather) and
    runs one batch element and about FORWARD_CHUNK_BYTES of kernel output at a time. One segment per
    chunk must give the same result as one chunk per batch element (every segment is computed alone
    either way), with key padding, batch 2 and H not a multiple of r, and match the reference. Bit for
    bit with aten's CPU flash kernel; the portable kernel's batched matmuls (einsum) round differently
    with the batch they are given (float64 ulps), hence 1e-13 there."""
    from longnet_dist.attention import dilated, layout

    calls = []
    kernel = dilated.attention_forward
    monkeypatch.setattr(dilated, "attention_forward", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    (q, k, v), mask = make_inputs(2, 96, 5, 8, pad_fraction=0.2, seed=4)
    segs, rates = [8, 16, 32], [1, 2, 4]
    runs, counts = [], []
    # a call outputs (w/r slots, ceil(H/r) heads, D) float64 per segment: 320, 96 and 32 bytes per position
    # for r = 1, 2, 4. 5120 bytes: chunks of 2, 3 and 5 segments (96 positions: 6, 2 and 1 chunks)
    for budget in (dilated.FORWARD_CHUNK_BYTES, 1, 5120):
        monkeypatch.setattr(dilated, "FORWARD_CHUNK_BYTES", budget)
        with torch.no_grad(), monkeypatch.context() as m:
            m.setattr(layout.BranchLayout, "gather", no_gather)
            runs.append(dilated_attention(q, k, v, segs, rates, causal=causal, key_padding_mask=mask, backend=backend))
        counts.append(len(calls) - sum(counts))
    # per batch element: one chunk, 1 + 2 + 4 calls; one segment per chunk, 96/8 + (96/16) * 2 + (96/32) * 4;
    # 5120 bytes, 6 + 2 * 2 + 1 * 4
    assert counts == [2 * 7, 2 * (12 + 12 + 12), 2 * (6 + 4 + 4)], counts
    assert calls[-1] == (3, 8, 1, 8)  # (segments, w/r slots, heads of offset 3, D)
    tol = dict(rtol=0, atol=0) if backend == "cpu_flash" else dict(rtol=1e-13, atol=1e-15)
    for run in runs[1:]:
        torch.testing.assert_close(runs[0], run, **tol)
    ours, ref = run_both(q, k, v, segs, rates, causal, mask, backend=backend)  # still chunked
    assert_all_close(ours, ref, **F64_TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_strided_inputs_are_read_in_place_forward_and_backward(causal, monkeypatch):
    """q, k, v as a fused qkv projection gives them (strided views of one (B, N, 3, H, D) tensor): the CPU
    in-place forward and backward read them as they are (whole segments, key padding): no rows are made of
    them (no whole copy). Same results as contiguous inputs, forward and gradients."""
    from longnet_dist.attention import dilated

    (q, k, v), mask = make_inputs(2, 96, 5, 8, pad_fraction=0.2, seed=6)
    packed = torch.stack([x.detach() for x in (q, k, v)], dim=2).requires_grad_()  # (B, N, 3, H, D)
    segs, rates = [8, 16, 32], [1, 2, 4]
    made = []
    to_rows = dilated.to_rows
    monkeypatch.setattr(dilated, "to_rows", lambda x: made.append(x.is_contiguous()) or to_rows(x))
    with torch.no_grad():
        out = dilated_attention(*packed.unbind(2), segs, rates, causal=causal, key_padding_mask=mask)
    assert made == []  # forward only: nothing copied
    out = dilated_attention(*packed.unbind(2), segs, rates, causal=causal, key_padding_mask=mask)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (d_packed,) = torch.autograd.grad(out, packed, grad)
    # the backward: only the incoming gradient as rows (contiguous: a view); q, k, v are read through their views
    assert made == [True]
    ours, _ = run_both(q, k, v, segs, rates, causal, mask)  # contiguous inputs
    torch.testing.assert_close(out, ours[0], rtol=1e-13, atol=1e-15)
    for name, a, b in zip(("dq", "dk", "dv"), d_packed.unbind(2), ours[1:]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["cpu_flash", "chunked"])
@pytest.mark.parametrize("causal", [True, False])
def test_backward_in_chunks_of_segments_changes_no_bit(backend, causal, monkeypatch):
    """The gather path of a local branch (aten's CUDA kernels in sharded runs; forced here on the CPU, which
    reads rows in place) runs its backward a chunk of whole segments at a time (bounded temporaries):
    forcing one segment per chunk must give the same gradients, with a ragged tail, r not dividing w,
    H not a multiple of r and key padding, and still match the reference. Bit for bit with the
    portable kernel; aten's CPU flash backward rounds differently with the batch it is given (a few
    float64 ulps: its work split depends on the batch of segments), hence 1e-13 there."""
    from longnet_dist.attention import dilated, layout

    monkeypatch.setattr(layout.BranchLayout, "in_place", property(lambda self: False))
    (q, k, v), mask = make_inputs(2, 70, 5, 8, pad_fraction=0.2, seed=3)
    segs, rates = [8, 12, 32], [1, 3, 4]
    whole = run_both(q, k, v, segs, rates, causal, mask, backend=backend)
    monkeypatch.setattr(dilated, "BACKWARD_CHUNK_BYTES", 1)
    contiguous = []  # what the rows are made of: a chunk's slice of the rows (batch 2) would be copied
    to_rows = dilated.to_rows
    monkeypatch.setattr(dilated, "to_rows", lambda x: contiguous.append(x.is_contiguous()) or to_rows(x))
    inputs = dilated.AttentionInputs((q, k, v), 2, 70, 5, mask, causal, 1.0, backend)
    assert dilated.chunk_positions(inputs, 12, dilated.BACKWARD_CHUNK_BYTES, 1) == 12  # one segment per chunk
    chunked = run_both(q, k, v, segs, rates, causal, mask, backend=backend)
    assert contiguous and all(contiguous), contiguous  # the chunks use slices of the rows as they are
    tol = dict(rtol=0, atol=0) if backend == "chunked" else dict(rtol=1e-13, atol=1e-15)
    for name, a, b in zip(("out", "dq", "dk", "dv"), whole[0], chunked[0]):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    assert_all_close(*chunked, **F64_TOL)


@pytest.mark.parametrize("head_dim", [1, 4])
def test_a_head_dim_of_another_stride_is_copied_first(head_dim):
    """Views of a (B, N, D, H) buffer, and a packed (B, N, 3, D, H) one seen as (B, N, 3, H, D): aten's CPU flash
    kernel read their rows as contiguous and returned garbage (errors of 1-6 here, up to 1e250: memory outside
    the tensor). Now copied once at the entry; D = 1, whose lone column `contiguous()` leaves strided, too."""
    from longnet_dist.attention import packed_dilated_attention

    (q, k, v), _ = make_inputs(1, 16, 2, head_dim, head_dim_strided=True)
    assert q.stride(-1) == 2 or head_dim == 1
    if head_dim == 1:  # a lone column with a stride other than 1
        q, k, v = (x.as_strided(x.shape, (*x.stride()[:-1], 7)) for x in (q, k, v))
    ours, ref = run_both(q, k, v, [8], [1], True, None, "cpu_flash")
    assert_all_close(ours, ref, **F64_TOL)
    packed = torch.stack([x.detach() for x in (q, k, v)], 2).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert packed.stride(-1) != 1 or head_dim == 1
    out = packed_dilated_attention(packed, [8], [1], causal=True)
    torch.testing.assert_close(out, ref[0], **F64_TOL)
