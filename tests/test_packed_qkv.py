"""packed_dilated_attention: a fused projection's qkv (B, N, 3, H, D) in, its gradient accumulated packed.

It must equal `dilated_attention(*qkv.unbind(2))` bit for bit, forward and gradient (same kernel calls,
same additions in the same order; only where the sums live differs), on every path: rows read in
place (the gradient then never passes through a joining copy) and rows gathered (the gradient is
stacked, as autograd's unbind would). Sharded: tests/test_sequence_parallel.py, case
"sp4_causal_mask_packed". With rotary, `rotate_packed` must equal `apply_rotary` bit for bit, and the
layer and the LM's blocks that use both must equal their three-tensor paths.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.profiler import ProfilerActivity, profile

from longnet_dist.attention import (DilatedAttention, apply_rotary, dilated_attention, packed_dilated_attention,
                                    rotary_angles, rotate_packed)
from longnet_dist.attention.dilated import LocalBranch
from longnet_dist.model.lm import LongNetConfig, LongNetLM
from reference import reference_dilated_attention
from test_dilated_attention import F64_TOL, configs, make_inputs


def packed_inputs(cfg: dict):
    (q, k, v), mask = make_inputs(cfg["B"], cfg["N"], cfg["H"], cfg["D"], seed=cfg["seed"], pad_fraction=cfg["pad"])
    qkv = torch.stack([x.detach() for x in (q, k, v)], dim=2).requires_grad_()  # (B, N, 3, H, D)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(cfg["seed"] + 1), dtype=q.dtype)
    return qkv, mask, grad


def both_ways(qkv, mask, grad, cfg: dict):
    """(out, dqkv) of the packed entry and of the three views, same options."""
    options = dict(causal=cfg["causal"], key_padding_mask=mask, backend=cfg.get("backend"))
    results = []
    for attend in (lambda: packed_dilated_attention(qkv, cfg["segs"], cfg["rates"], **options),
                   lambda: dilated_attention(*qkv.unbind(2), cfg["segs"], cfg["rates"], **options)):
        out = attend()
        results.append((out, *torch.autograd.grad(out, qkv, grad)))
    return results


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_packed_equals_the_three_views_bit_for_bit_and_the_reference(cfg):
    """Random shapes: ragged tails, H not a multiple of r, r not dividing w, key padding, causal or not."""
    qkv, mask, grad = packed_inputs(cfg)
    (out, d_packed), (out_views, d_views) = both_ways(qkv, mask, grad, cfg)
    assert torch.equal(out, out_views) and torch.equal(d_packed, d_views)
    q64 = qkv.detach().clone().requires_grad_()
    ref = reference_dilated_attention(*q64.unbind(2), cfg["segs"], cfg["rates"], causal=cfg["causal"],
                                      key_padding_mask=mask)
    torch.testing.assert_close(out, ref, **F64_TOL)
    torch.testing.assert_close(d_packed, torch.autograd.grad(ref, q64, grad)[0], **F64_TOL)


def ops_run(backward) -> set[str]:
    """The names of the ops that `backward()` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backward()
    return {event.key for event in prof.key_averages()}


def backward_ops(out, qkv, grad) -> set[str]:
    return ops_run(lambda: torch.autograd.grad(out, qkv, grad))


CASE = dict(B=2, N=96, H=5, D=8, segs=[8, 16, 32], rates=[1, 2, 4], causal=True, pad=0.2, seed=3)


def test_read_in_place_the_gradient_is_never_copied_together():
    """The three views' gradient is joined by a stack (a copy of dq, dk, dv); the packed one is not."""
    qkv, mask, grad = packed_inputs(CASE)
    options = dict(causal=True, key_padding_mask=mask)
    views = backward_ops(dilated_attention(*qkv.unbind(2), CASE["segs"], CASE["rates"], **options), qkv, grad)
    assert "aten::stack" in views  # what the test would see if the packed path joined its gradients
    packed = backward_ops(packed_dilated_attention(qkv, CASE["segs"], CASE["rates"], **options), qkv, grad)
    assert not {"aten::stack", "aten::cat"} & packed


@pytest.mark.parametrize("causal", [True, False])
def test_gathered_rows_fall_back_to_a_stack_with_the_same_bits(causal, monkeypatch):
    """Branches that gather their rows (aten's CUDA kernels, a shard of a longer segment) add into row
    accumulators; the packed gradient is then stacked from them, bit for bit the three views' gradient."""
    monkeypatch.setattr(LocalBranch, "reads_in_place", lambda self, inputs: False)
    cfg = dict(CASE, causal=causal)
    qkv, mask, grad = packed_inputs(cfg)
    (out, d_packed), (out_views, d_views) = both_ways(qkv, mask, grad, cfg)
    assert torch.equal(out, out_views) and torch.equal(d_packed, d_views)
    assert "aten::stack" in backward_ops(packed_dilated_attention(qkv, cfg["segs"], cfg["rates"], causal=causal,
                                                                  key_padding_mask=mask), qkv, grad)


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_takes_the_packed_path(dtype, rotary):
    """DilatedAttention feeds its fused projection packed (rotary: q and k rotated into one new packed
    tensor, rotate_packed): the same output and parameter gradients as through three views of it, in the
    input dtype (low precision converts once, packed)."""
    torch.manual_seed(0)
    layer = DilatedAttention(40, 5, [8, 16], [1, 2], causal=True, rotary=rotary).to(dtype)
    x = torch.randn(2, 48, 40, dtype=dtype)

    def run(through_views: bool):
        layer.zero_grad()
        if through_views:
            q, k, v = layer.project(x)  # rotary: q, k rotated as apply_rotary does, v a view
            out = layer.out(dilated_attention(q, k, v, [8, 16], [1, 2], causal=True).flatten(2))
        else:
            out = layer(x)
        joined = {"aten::stack", "aten::cat"} & ops_run(out.float().square().mean().backward)
        return out.detach(), [p.grad.clone() for p in layer.parameters()], joined

    packed, views = run(False), run(True)
    assert not packed[2] and "aten::stack" in views[2]  # the layer's backward joins no gradients
    assert torch.equal(packed[0], views[0])
    for a, b in zip(packed[1], views[1]):
        assert a.dtype == dtype and torch.equal(a, b)


def composition(x, tables):
    """What rotate_packed must equal: apply_rotary on the 2H heads of q and k, then v concatenated."""
    B, N, _, H, D = x.shape
    qk = apply_rotary(x[:, :, :2].reshape(B, N, 2 * H, D), tables=tables).view(B, N, 2, H, D)
    return torch.cat([qk, x[:, :, 2:]], dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotate_packed_is_apply_rotary_bit_for_bit(dtype):
    """rotate_packed writes q and k rotated and v as it is into one tensor; forward and gradient equal the
    composition (apply_rotary on q and k, then a concatenation) bit for bit: the same products and sums."""
    B, N, H, D = 2, 37, 3, 8
    tables = rotary_angles(torch.arange(5, 5 + N), D, dtype=dtype)  # positions of a shard: not from 0
    x = torch.randn(B, N, 3, H, D, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, N, 3, H, D, dtype=dtype)
    out, composed = rotate_packed(x, tables), composition(x, tables)
    assert torch.equal(out, composed)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (out, composed)))
    assert not {"aten::cat", "aten::stack"} & ops_run(lambda: torch.autograd.grad(rotate_packed(x, tables), x, grad))


def test_rotate_packed_with_tables_of_another_dtype_rotates_in_theirs():
    """bf16 qkv with float32 tables (the layer's own tables): rotated in float32 and rounded once to bf16,
    forward and gradient, bit for bit as apply_rotary does."""
    x = torch.randn(2, 16, 3, 2, 8, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(x.shape, dtype=torch.bfloat16)
    tables = rotary_angles(torch.arange(16), 8)
    out, composed = rotate_packed(x, tables), composition(x, tables)
    assert out.dtype == torch.bfloat16 and torch.equal(out, composed)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (out, composed)))


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_lm_blocks_hand_attention_one_packed_tensor(policy):
    """LongNetLM's eager blocks pass q, k, v packed (Block.packed): the loss and every gradient equal the
    three-tensor path bit for bit (compiled blocks keep it), under each checkpointing policy, and the
    backward stacks no dq, dk, dv."""
    config = LongNetConfig(vocab_size=64, dim=32, num_layers=2, num_heads=2, segment_lengths=[8, 16],
                           dilation_rates=[1, 2], activation_checkpointing=policy)
    torch.manual_seed(0)
    model = LongNetLM(config)
    ids = torch.randint(0, 64, (2, 48))
    runs = []
    for packed in (True, False):
        for block in model.blocks:
            block.packed = packed
        model.zero_grad()
        loss = model(ids, labels=ids).mean()
        ops = ops_run(loss.backward)
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()], ops))
    (loss, grads, ops), (loss_views, grads_views, ops_views) = runs
    assert "aten::stack" in ops_views and "aten::stack" not in ops
    assert torch.equal(loss, loss_views)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_views))


def test_packed_shape_error_names_the_shape():
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seq, 3, heads, head_dim\), got \(1, 16, 2, 4\)"):
        packed_dilated_attention(torch.randn(1, 16, 2, 4), [8], [1])


def test_rotate_packed_compiles_to_the_composition():
    """Under torch.compile rotate_packed traces apply_rotary's composition (no graph break): the same values
    and gradient as eager."""
    x = torch.randn(1, 12, 3, 2, 8, requires_grad=True)
    tables = rotary_angles(torch.arange(12), 8)
    compiled = torch.compile(rotate_packed, backend="aot_eager", fullgraph=True)
    out, eager = compiled(x, tables), rotate_packed(x, tables)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    grad = torch.randn(out.shape)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, grad)[0] for y in (out, eager)), rtol=0, atol=0)
