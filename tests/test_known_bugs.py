"""One test per known bug of existing LongNet code (../shared/LONGNET.md) that applies to one device.

Each test checks our result against the dense reference and also shows that the buggy variant is
far off on the same inputs, so the test would catch that bug."""
from __future__ import annotations

import torch

from longnet_dist.attention import dilated_attention
from reference import reference_dilated_attention

TOL = dict(rtol=1e-9, atol=1e-10)


def inputs(B=2, N=96, H=4, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def grads(fn, q, k, v):
    out = fn(q, k, v)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return torch.autograd.grad(out, (q, k, v), upstream)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_branch_weights_are_differentiated():
    """Official code computes the branch weights under no_grad: gradients off by ~5%."""
    q, k, v = inputs()
    segs, rates = [16, 32, 96], [1, 2, 4]
    ours = grads(lambda *x: dilated_attention(*x, segs, rates, causal=True), q, k, v)
    exact = grads(lambda *x: reference_dilated_attention(*x, segs, rates, causal=True), q, k, v)
    detached = grads(lambda *x: reference_dilated_attention(*x, segs, rates, causal=True, detach_weights=True), q, k, v)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, **TOL)
    # the weights depend on q and k only (through lse), so the no_grad variant breaks dq and dk
    assert relative_error(detached[0], exact[0]) > 0.01
    assert relative_error(detached[1], exact[1]) > 0.01


def test_ragged_tail_attends_no_padding():
    """Zero-padding a ragged last segment and letting non-causal queries attend it is ~10% wrong."""
    q, k, v = inputs(N=80)
    segs, rates = [32, 64], [1, 2]  # 80 = 2*32 + 16 and 64 + 16: ragged tails in both branches
    ours = dilated_attention(q, k, v, segs, rates, causal=False)
    torch.testing.assert_close(ours, reference_dilated_attention(q, k, v, segs, rates), **TOL)
    # The buggy variant: pad to a multiple of the segment length with zero k/v that are attended.
    pad = lambda x: torch.cat([x, torch.zeros(2, 128 - 80, 4, 8, dtype=x.dtype)], 1)  # noqa: E731
    buggy = reference_dilated_attention(pad(q), pad(k), pad(v), segs, rates)[:, :80]
    assert relative_error(buggy[:, 64:], ours[:, 64:]) > 0.05


def test_key_padding_mask_is_honoured():
    """Implementations that ignore the key padding mask let real tokens attend padding."""
    q, k, v = inputs()
    mask = torch.ones(2, 96, dtype=torch.bool)
    mask[0, 70:] = False  # right padding
    mask[1, :10] = False  # left padding
    segs, rates = [16, 48], [1, 3]
    for causal in (False, True):
        ours = dilated_attention(q, k, v, segs, rates, causal=causal, key_padding_mask=mask)
        ref = reference_dilated_attention(q, k, v, segs, rates, causal=causal, key_padding_mask=mask)
        torch.testing.assert_close(ours, ref, **TOL)
        ignored = reference_dilated_attention(q, k, v, segs, rates, causal=causal) * mask[:, :, None, None]
        assert relative_error(ignored, ref) > 0.05
        assert ours[~mask].abs().max() == 0  # padded queries output 0


def test_branches_mixed_by_softmax_denominators_not_equal_weights():
    """Popular packages average the branches with equal weights instead of Eq. 9-10."""
    q, k, v = inputs()
    segs, rates = [8, 32, 96], [1, 2, 4]
    ours = dilated_attention(q, k, v, segs, rates, causal=True)
    torch.testing.assert_close(ours, reference_dilated_attention(q, k, v, segs, rates, causal=True), **TOL)
    equal = reference_dilated_attention(q, k, v, segs, rates, causal=True, equal_weights=True)
    assert relative_error(equal, ours) > 0.05


def test_each_head_uses_its_own_offset():
    """Head h keeps rows s = h mod r of each segment (Eq. 13-15), not one offset for all heads."""
    B, N, H, D, r = 1, 16, 4, 8, 4
    q, k, v = inputs(B, N, H, D)
    out = dilated_attention(q, k, v, [N], [r])
    covered = out.detach().abs().sum(-1)[0] > 0  # (N, H)
    expected = torch.tensor([[(p % r) == (h % r) for h in range(H)] for p in range(N)])
    assert torch.equal(covered, expected)


def test_returns_every_token_not_n_over_r():
    """Some packages return N / r rows; the layer keeps (B, N, H, D) and zeros uncovered rows."""
    q, k, v = inputs(N=30, H=1)
    out = dilated_attention(q, k, v, [10], [3])
    assert out.shape == q.shape
    covered = out.detach().abs().sum(-1)[0, :, 0] > 0
    assert torch.equal(covered, torch.tensor([p % 10 % 3 == 0 for p in range(30)]))
