"""Head dims between the fused kernels' tile widths (16, 32, 64, 128), on CPU through Triton's interpreter (and on
CUDA when present): rows of D values read and written in place in tiles of the next width, the columns past D
masked (kernels/triton_columns.py), with no padded copy of q, k, v, the output or the gradients.

- forward and every gradient against the dense float64 reference at D = 8, 24, 40, 80, 96 (64 the control):
  causal or not, ragged tails, H not a multiple of r, key padding, shared keys; the packed and three-tensor entries;
- every way the kernels store rows at D = 80 (dQ kernel or atomic, r = 1 branch first or last, head groups, a second
  chain);
- no pad copy, and no column past D read (inputs that are views of wider rows holding NaN there, through pointer
  loads, TMA descriptors and the warp-specialised loops) nor written (accumulators and outputs framed by sentinels);
- launches and blocks go by the tiles' width.
Tolerances as in test_triton_kernels.py: float32 runs exact IEEE dot products, so only summation order differs
(observed ~3e-7 relative), 1e-4 allowed; float16 rounds its inputs and P to 11-bit mantissas (observed ~5e-4
relative norm), 4e-3 allowed. A masked column adds exact zeros, so where two runs read the same rows (a view of
wider rows against the same rows contiguous) they agree bit for bit.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longnet_dist.attention import dilated_attention, packed_dilated_attention
from reference import dilated_errors, error_norms, reference_dilated_attention
from test_triton_kernels import DEVICE, fused_outputs_and_grads  # skips this module where it skips itself

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3}
# N = 100: a ragged tail in every branch (100 = 6 * 16 + 4 = 2 * 48 + 4 = 96 + 4); H = 3, not a multiple of 2 or 6;
# (48, 2) and (96, 6) nest in (16, 1), (96, 6) in (48, 2): shared keys (fused_settings.SHARE_KEYS) when on
SHAPE = dict(B=2, N=100, H=3, segs=[16, 48, 96], rates=[1, 2, 6])
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _share_keys(monkeypatch):
    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "SHARE_KEYS", True)


@pytest.fixture
def no_padding(monkeypatch):
    """Padding the rows (F.pad, functional._padded) raises: the fused path must run without it."""
    from longnet_dist.attention import functional

    def refuse(*args, **kwargs):
        raise AssertionError("the fused path padded its rows")

    monkeypatch.setattr(F, "pad", refuse)
    monkeypatch.setattr(functional, "_padded", refuse)


def wide(x: torch.Tensor, width: int = 128, fill: float = float("nan")) -> torch.Tensor:
    """x (..., D) as the first D columns of a buffer (..., width) whose other columns hold `fill`: rows read in place
    through strides, with something wrong in every column past D."""
    buffer = torch.full((*x.shape[:-1], width), fill, dtype=x.dtype, device=x.device)
    buffer[..., : x.shape[-1]] = x
    return buffer[..., : x.shape[-1]]


def framed(shape: tuple, dtype: torch.dtype, fill: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(a contiguous tensor of `shape`, uninitialised (NaN), the 256 elements after it in its storage, set to
    `fill`): a store of columns past the last row's end would change them."""
    count = torch.Size(shape).numel()
    storage = torch.full((count + 256,), float("nan"), dtype=dtype, device=DEVICE)
    storage[count:] = fill
    return storage[:count].view(shape), storage[count:]


def test_the_branches_share_keys():
    from longnet_dist.attention import fused

    folds = [fold for _, _, fold in fused.with_folds(list(zip(SHAPE["segs"], SHAPE["rates"])), SHAPE["N"])]
    assert [bool(f and f.nested) for f in folds] == [True, True, False] and folds[2].parent == 48


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [8, 24, 40, 80, 96, 64])
def test_head_dims_match_dense_reference(head_dim, dtype, causal, no_padding):
    """Tiles of 16 (8), 32 (24), 64 (40, 64) and 128 (80, 96); key padding (30%), shared keys, dQ from the dK/dV
    loop (the default on a CPU: atomic adds, masked to the real columns)."""
    errors = dilated_errors(DEVICE, SHAPE["B"], SHAPE["N"], SHAPE["H"], head_dim, SHAPE["segs"], SHAPE["rates"],
                            causal, 0.3, dtype, seed=head_dim)
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("way", ["dq kernel", "covering first", "no covering branch, head groups", "second chain"])
def test_every_way_to_store_rows_at_head_dim_80(way, dtype, monkeypatch, no_padding):
    """The stores each setting takes, against float64: a dQ kernel's (_bwd_dq, in 16-bit written last in the
    gradients' dtype, earlier rows marked); the r = 1 branch run first (16-bit: store passes after the branches);
    no r = 1 branch, one head per pass (fused_launch.store_heads per head group); a second chain joined by
    fused_launch.merge_chains."""
    from longnet_dist.attention import fused, fused_settings

    rates = SHAPE["rates"]
    if way == "dq kernel":
        monkeypatch.setattr(fused_settings, "DQ_MODE", "kernel")
    elif way == "covering first":
        monkeypatch.setattr(fused_settings, "COVERING_LAST", False)
    elif way == "no covering branch, head groups":
        rates = [2, 2, 6]
        monkeypatch.setattr(fused, "ACCUMULATOR_BUDGET_BYTES", 0)
    else:
        monkeypatch.setattr(fused_settings, "SIDE_BRANCHES", 1)
    errors = dilated_errors(DEVICE, 1, SHAPE["N"], 3, 80, SHAPE["segs"], rates, True, 0.2, dtype, seed=5)
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("head_dim", [24, 80])
def test_the_packed_entry_matches_three_tensors(head_dim, monkeypatch, no_padding):
    """packed_dilated_attention of a (B, N, 3, H, D) tensor: its views read in place (row stride 3 H D), the result
    and the gradient bit for bit those of three tensors (dQ by a kernel of its own: reproducible on a GPU), both
    against float64."""
    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "DQ_MODE", "kernel")
    g = torch.Generator().manual_seed(head_dim)
    qkv, grad = torch.randn(1, 70, 3, 2, head_dim, generator=g), torch.randn(1, 70, 2, head_dim, generator=g)
    mask = torch.rand(1, 70, generator=g) > 0.2
    options = dict(causal=True, key_padding_mask=mask.to(DEVICE), backend="triton")
    packed = qkv.to(DEVICE).clone().requires_grad_()
    out = packed_dilated_attention(packed, [16, 64], [1, 2], **options)
    out.backward(grad.to(DEVICE))
    views = [x.to(DEVICE).clone().requires_grad_() for x in qkv.unbind(2)]
    apart = dilated_attention(*views, [16, 64], [1, 2], **options)
    apart.backward(grad.to(DEVICE))
    torch.testing.assert_close(out, apart, rtol=0, atol=0)
    torch.testing.assert_close(packed.grad, torch.stack([x.grad for x in views], 2), rtol=0, atol=0)
    ref_in = [x.double().requires_grad_() for x in qkv.unbind(2)]
    ref = reference_dilated_attention(*ref_in, [16, 64], [1, 2], causal=True, key_padding_mask=mask)
    errors = error_norms([out, *packed.grad.unbind(2)], [ref, *torch.autograd.grad(ref, ref_in, grad.double())])
    assert max(errors.values()) < TOLERANCE[torch.float32], errors


@pytest.mark.parametrize("loads", ["pointers", "tma", "warp specialized"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_past_the_head_dim_are_never_read(dtype, loads, monkeypatch, no_padding):
    """q, k, v at D = 80 as views of rows 128 wide whose columns 80: hold NaN, read in place (no copy, no pad): one
    NaN read would reach the output or a gradient. Through pointer loads, TMA descriptors of shape (slots, 80)
    (columns past 80 out of bounds: zero-filled) and the warp-specialised single loops (descriptors for every
    tile). Bit for bit the same rows given contiguous; within tolerance of float64. The packed entry too, a view
    of a (B, N, 3, H, 128) buffer."""
    from longnet_dist.attention import fused_settings

    kernels = frozenset(fused_settings.TMA_KERNELS)
    monkeypatch.setattr(fused_settings, "TMA_LOADS", kernels if loads == "tma" else frozenset())
    monkeypatch.setattr(fused_settings, "WARP_SPECIALIZE", kernels if loads == "warp specialized" else frozenset())
    monkeypatch.setattr(fused_settings, "DQ_MODE", "kernel")  # (a dK/dV loop with dQ reductions is never split)
    g = torch.Generator().manual_seed(9)
    q, k, v, grad = (torch.randn(1, 75, 3, 80, generator=g).to(DEVICE, dtype) for _ in range(4))
    segs, rates = [16, 48, 96], [1, 2, 6]
    contiguous = fused_outputs_and_grads(q, k, v, grad, segs, rates, causal=True)
    inputs = [wide(x).requires_grad_() for x in (q, k, v)]
    out = dilated_attention(*inputs, segs, rates, causal=True, backend="triton")
    in_place = [out, *torch.autograd.grad(out, inputs, wide(grad))]
    for name, a, b in zip(("out", "dq", "dk", "dv"), in_place, contiguous):
        assert a.shape[-1] == 80 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    packed = wide(torch.stack([q, k, v], 2)).requires_grad_()
    out = packed_dilated_attention(packed, segs, rates, causal=True, backend="triton")
    (packed_grad,) = torch.autograd.grad(out, packed, grad)
    torch.testing.assert_close(out, contiguous[0], rtol=0, atol=0)
    torch.testing.assert_close(packed_grad, torch.stack(contiguous[1:], 2), rtol=0, atol=0)
    ref_in = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    ref = reference_dilated_attention(*ref_in, segs, rates, causal=True)
    errors = error_norms(in_place, [ref, *torch.autograd.grad(ref, ref_in, grad.double().cpu())])
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("dq_mode", ["kernel", "atomic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_past_the_head_dim_are_never_written(dtype, dq_mode, monkeypatch):
    """Each launch at D = 80 into rows of 80 framed by sentinels: the accumulators and outputs given as views of
    rows 128 wide (the branch launches take any row stride) whose columns 80: hold 7, and the row-wise launches'
    contiguous outputs followed in their storage by 7s. Forward: in fp32 the r = 1 branch first (FIRST) then one
    adding; in fp16 one branch, then the r = 1 branch writing the output (LAST). Backward: its prep (delta, lse2;
    reads O and dO), in fp32 FIRST then adding, in fp16 marking rows then LAST into the gradients; a head group's
    store (store_heads) and the join of two chains (merge_chains). No sentinel changes, and every value written
    equals that of the same launches on plain tensors."""
    from longnet_dist.attention import fused_launch, fused_settings

    monkeypatch.setattr(fused_settings, "DQ_MODE", dq_mode)
    g = torch.Generator().manual_seed(4)
    B, N, H, D = 1, 60, 3, 80
    q, k, v, grad = (torch.randn(B, N, H, D, generator=g).to(DEVICE, dtype) for _ in range(4))
    scale, fp32, sentinels = D**-0.5, dtype == torch.float32, []

    def rows(dtype_=torch.float32, framed_=True):  # (B, N, H, 80) NaN, columns 80: (or the storage after) 7
        x = torch.full((B, N, H, D), float("nan"), dtype=dtype_, device=DEVICE)
        if not framed_:
            return x
        x = wide(x, fill=7.0)
        sentinels.append(x)
        return x

    def forward(framed_):
        acc, lse = rows(framed_=framed_), torch.full((B, N, H), float("-inf"), device=DEVICE)
        out = acc if fp32 else rows(dtype, framed_)
        order = [(16, 1), (48, 2)] if fp32 else [(48, 2), (16, 1)]
        for i, (w, r) in enumerate(order):
            last = not fp32 and i == 1
            fused_launch.forward_branch(q, k, v, None, acc, lse, w, r, 0, True, scale, first=fp32 and i == 0,
                                        out=out if last else None)
        return out, lse

    def backward(out, lse, framed_):
        fused_dq = dq_mode == "atomic"
        delta, lse2, *marks = fused_launch.backward_prep(out.contiguous(), grad, lse, marks=0 if fp32 else 2)
        acc = [rows(framed_=framed_) for _ in range(3)]
        if fused_dq or not fp32:
            acc[0].zero_()
        grads = acc if fp32 else [rows(dtype, framed_) for _ in range(3)]
        order = [(16, 1), (48, 2)] if fp32 else [(48, 2), (16, 1)]
        for i, (w, r) in enumerate(order):
            last = not fp32 and i == 1
            fused_launch.backward_branch(q, k, v, grad, lse2, delta, None, *acc, w, r, 0, True, scale,
                                         first=fp32 and i == 0, marks=tuple(marks) if marks else None,
                                         out=tuple(grads) if last else None)
        if fused_dq and not fp32:  # dQ added atomically stays in its accumulator
            grads[0] = acc[0]
        return delta, lse2, grads

    def row_wise():
        """store_heads of heads [1, 3) and merge_chains, into contiguous rows followed by 7s."""
        part = torch.randn(B, N, 2, D, generator=g).to(DEVICE)
        total, after_total = framed((B, N, H, D), dtype)
        fused_launch.store_heads(part, total, 1)
        torch.testing.assert_close(total[:, :, 1:].float(), part.to(dtype).float(), rtol=0, atol=0)
        chains = [torch.randn(B, N, H, D, generator=g).to(DEVICE) for _ in range(2)]
        lses = [torch.randn(B, N, H, generator=g).to(DEVICE) for _ in range(2)]
        merged, after_merged = framed((B, N, H, D), torch.float32)
        weights = torch.softmax(torch.stack(lses), 0)  # (the launch merges the lse into lses[0])
        fused_launch.merge_chains(chains[0], lses[0], chains[1], lses[1], merged)
        torch.testing.assert_close(merged, weights[0, ..., None] * chains[0] + weights[1, ..., None] * chains[1])
        assert (after_total == 7).all() and (after_merged == 7).all()

    in_rows = forward(True)
    plain = forward(False)
    torch.testing.assert_close(in_rows, plain, rtol=0, atol=0)
    prep, prep_plain = backward(*plain, True), backward(*plain, False)
    for name, a, b in zip(("delta", "lse2", "dq", "dk", "dv"), (*prep[:2], *prep[2]), (*prep_plain[:2],
                                                                                        *prep_plain[2])):
        assert torch.isfinite(a).all(), name
        if name == "dq" and dq_mode == "atomic":
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")  # atomic adds: any order
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    for x in sentinels:  # columns 80: of every accumulator and output given as a view
        assert (x.as_strided((*x.shape[:-1], 128), x.stride())[..., D:] == 7).all()
    row_wise()


def test_launches_and_blocks_go_by_the_tiles_width(monkeypatch, no_padding):
    """A launch at head dim 80 runs tiles of 128 (D) over rows of 80 (HEAD_DIM) and takes the blocks of 128
    (fused_settings.WIDE_HEAD_BLOCKS, or a tuning sweep's at 128); 24 takes those of 32 (the defaults of 64 and
    below); a tuning file written at one head dim serves its tiles' width; blocks a GPU refused are kept by width."""
    from triton.runtime.errors import OutOfResources

    from longnet_dist.attention import fused_launch, fused_settings
    from longnet_dist.attention.fused_settings import Blocks

    assert fused_launch._columns(80) == {"D": 128, "HEAD_DIM": 80} and fused_launch._columns(8)["D"] == 16
    with pytest.raises(ValueError, match="up to 128, not 160"):
        fused_launch._columns(160)
    launched, real = [], fused_launch.launch
    monkeypatch.setattr(fused_launch, "launch", lambda kernel, grid, pointers, *scalars, **meta: (
        launched.append((meta.get("D"), meta.get("HEAD_DIM"))), real(kernel, grid, pointers, *scalars, **meta))[1])
    q = torch.randn(1, 20, 1, 80, device=DEVICE, requires_grad=True)
    dilated_attention(q, q, q, [8, 16], [1, 2], backend="triton").sum().backward()
    assert launched and set(launched) == {(128, 80)}

    monkeypatch.setattr(fused_launch.kern, "interpreted", lambda: False)  # the interpreter's own blocks aside
    monkeypatch.setattr(fused_settings, "TUNED", {})
    monkeypatch.setattr(fused_settings, "FITTED", {})
    for kernel in ("fwd", "dkdv", "dkdv_dq", "dkdv_small", "dq"):
        for dtype, fp32 in ((torch.float16, False), (torch.float32, True)):
            for head_dim in (80, 96, 128):
                assert fused_settings.blocks_for(kernel, dtype, head_dim) == fused_settings.WIDE_HEAD_BLOCKS[
                    (kernel, fp32)]
            assert fused_settings.blocks_for(kernel, dtype, 24) == fused_settings.DEFAULT_BLOCKS[(kernel, fp32)]
    tuned = Blocks(16, 32, 4, 2)
    monkeypatch.setitem(fused_settings.TUNED, ("dkdv", False, 128), tuned)
    assert fused_settings.blocks_for("dkdv", torch.bfloat16, 80) == tuned
    assert fused_settings.blocks_for("dkdv", torch.bfloat16, 64) != tuned

    attempts = []

    def go(blocks):
        attempts.append(blocks)
        if len(attempts) == 1:
            raise OutOfResources(2, 1, "shared memory")

    with pytest.warns(UserWarning, match="refused"):
        fused_launch._fitted("fwd", torch.float16, 96, torch.device(DEVICE), go)
    assert fused_settings.FITTED == {("fwd", False, 128, torch.device(DEVICE)): attempts[1]}
    assert fused_settings.blocks_for("fwd", torch.float16, 80, torch.device(DEVICE)) == attempts[1]


def test_a_tuning_file_at_a_head_dim_between_widths_installs_its_tiles_blocks(tmp_path, monkeypatch):
    import json

    from longnet_dist.attention import fused_settings

    monkeypatch.setattr(fused_settings, "TUNED", {})
    for name in ("DQ_MODE", "SMALL_LAUNCH_WAVES", "TMA_LOADS", "SIDE_BRANCHES", "SHARE_KEYS", "WARP_SPECIALIZE",
                 "COVERING_LAST"):
        monkeypatch.setattr(fused_settings, name, getattr(fused_settings, name))  # restored after the test
    path = tmp_path / "kernel_tuning.json"
    path.write_text(json.dumps({"head_dim": 96, "blocks": {"fwd": [32, 64, 4, 2]}}))
    fused_settings.load_tuning(path)
    assert fused_settings.TUNED == {("fwd", False, 128): fused_settings.Blocks(32, 64, 4, 2)}


def test_dq_is_added_by_tma_reductions_only_into_16_byte_aligned_rows(monkeypatch):
    """The default dQ mode ("tma", on GPUs with TMA) adds dQ by bulk reductions into the fp32 accumulator, whose
    descriptors need 16-byte steps: at head dim 10 (40-byte rows) the launch falls back to atomic adds."""
    from longnet_dist.attention import fused_launch

    monkeypatch.setattr(fused_launch, "_fused_dq", lambda device: 2)  # what a GPU with TMA gets
    seen = {}

    def record(kernel, grid, pointers, *scalars, **meta):
        if "FUSE_DQ" in meta:
            seen[meta["HEAD_DIM"]] = meta["FUSE_DQ"]

    monkeypatch.setattr(fused_launch, "launch", record)  # nothing runs: only the launches' settings are read
    for head_dim in (10, 16):
        q = torch.randn(1, 20, 2, head_dim, device=DEVICE, requires_grad=True)
        dilated_attention(q, q, q, [8, 16], [1, 2], backend="triton").sum().backward()
    assert seen == {10: 1, 16: 2}
    assert not fused_launch._aligned(torch.zeros(1, 4, 3, 10)) and fused_launch._aligned(torch.zeros(1, 4, 3, 16))
    assert not fused_launch._aligned(torch.zeros(1, 4, 3, 17)[..., 1:])  # rows 68 bytes apart, 4 bytes in
