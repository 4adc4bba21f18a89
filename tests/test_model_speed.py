"""The model's speed options change no numbers: checkpointing policies, compiled regions, shared
rotary tables; the dense baseline is exact causal attention; the memory savers save memory."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longnet_dist.attention import DilatedAttention, apply_rotary
from longnet_dist.attention.rotary import rotary_angles
from longnet_dist.model import DenseAttention, LongNetConfig, LongNetLM, attention_flops_per_token

VOCAB = 258
F64 = dict(rtol=1e-10, atol=1e-12)  # float64: the same math in another order agrees to ~1e-15
POLICIES = ("none", "full", "selective")


def build(dtype=torch.float64, seed: int = 0, **overrides) -> LongNetLM:
    settings = dict(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=2, segment_lengths=[8, 16, 32],
                    dilation_rates=[1, 2, 4], token_chunk_size=8, compile=False)  # 4 chunks of 8 rows at N=32
    settings.update(overrides)
    torch.manual_seed(seed)
    return LongNetLM(LongNetConfig(**settings)).to(dtype)


def tokens(batch: int = 2, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length + 1), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: LongNetLM, ids: torch.Tensor):
    model.zero_grad()
    loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(result, reference, tol) -> None:
    (loss, grads), (ref_loss, ref_grads) = result, reference
    torch.testing.assert_close(loss, ref_loss, **tol)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("policy,group", [("full", 1), ("selective", 1), ("full", 2), ("full", 3)])
def test_checkpointing_policies_give_the_loss_and_gradients_of_none(policy, group):
    ids = tokens()
    reference = loss_and_grads(build(activation_checkpointing="none", num_layers=3), ids)
    saver = build(activation_checkpointing=policy, checkpoint_group_size=group, num_layers=3)
    assert_same(loss_and_grads(saver, ids), reference, F64)


class LiveTensors(TorchDispatchMode):
    """Records every tensor an op creates; `live_bytes()` sums the storages still alive (activation memory),
    `made_bytes` the bytes of all of them (memory written)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[weakref.ref] = []
        self.made_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.outputs.append(weakref.ref(tensor))
                self.made_bytes += tensor.numel() * tensor.element_size()
        return out

    def live_bytes(self) -> int:
        storages = {}
        for ref in self.outputs:
            tensor = ref()
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def activation_bytes(policy: str, group: int = 1) -> int:
    """Bytes created by the forward and still alive, held for backward, just before backward."""
    model = build(torch.float32, activation_checkpointing=policy, token_chunk_size=64, checkpoint_group_size=group,
                  num_layers=4)
    ids = tokens(1, 256)
    with LiveTensors() as probe:
        loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
    held = probe.live_bytes()
    loss.backward()  # the graph was complete
    return held


def test_selective_and_full_checkpointing_hold_less_activation_memory():
    held = {policy: activation_bytes(policy) for policy in POLICIES}
    # selective keeps x, q, k, v and the attention output per block; none also keeps norms, rotary and
    # the MLP hidden layers (the largest); full keeps only each block's input
    assert held["selective"] < 0.7 * held["none"], held
    assert held["full"] < 0.7 * held["selective"], held
    block_input = 256 * 32 * 4  # float32 (1, N, E)
    # groups of 2 blocks keep 2 block inputs instead of 4
    assert activation_bytes("full", group=2) <= held["full"] - 2 * block_input, held


@pytest.mark.parametrize("policy", POLICIES)
def test_compiled_regions_give_the_eager_loss_and_gradients(policy):
    """Dynamo captures every region whole (fullgraph) inside checkpointing; aot_eager runs the captured
    graphs without inductor's C++ compile (slow on a small CPU; inductor itself runs on GPUs)."""
    ids = tokens()
    reference = loss_and_grads(build(activation_checkpointing=policy), ids)
    compiled = build(activation_checkpointing=policy, compile=True)
    compiled._compile_once(torch.device("cpu"), backend="aot_eager", fullgraph=True)
    assert compiled.compiled
    assert_same(loss_and_grads(compiled, ids), reference, F64)


def test_compile_auto_is_off_on_cpu():
    model = build(compile="auto")
    model(tokens()[:, :-1])
    assert model.compiled is False


def test_shared_rotary_tables_equal_per_layer_rotation():
    """The model's tables (built once) give the layer's own rotation from positions, in float32 and float64."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        layer = DilatedAttention(32, 2, [8, 16], [1, 2]).to(dtype)
        x = torch.randn(2, 16, 32, dtype=dtype)
        positions = torch.arange(100, 116)
        model = build(dtype)
        block = model.blocks[0]
        block.attn = layer
        shared = block(x, positions)  # tables from positions, built by the block
        qkv = layer.qkv(block.attn_norm(x)).view(2, 16, 3, 2, 16)
        tables = rotary_angles(positions, 16, dtype=torch.float64)  # (1, N, 1, D/2) each
        q, k = (apply_rotary(t.double(), tables=tables).to(dtype) for t in qkv[:, :, :2].unbind(2))
        attn = layer.attend(q, k, qkv[:, :, 2])
        h = x + layer.out(attn.flatten(2))
        expected = h + block.mlp(block.mlp_norm(h))
        tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shared, expected, **tol)


def test_dense_attention_is_dilated_attention_with_one_whole_sequence_branch():
    torch.manual_seed(0)
    dense = DenseAttention(32, 2, [8], [1]).double()
    one_branch = DilatedAttention(32, 2, [64], [1]).double()  # w = N, r = 1: every earlier key
    one_branch.load_state_dict(dense.state_dict())
    x = torch.randn(2, 64, 32, dtype=torch.float64, requires_grad=True)
    out = dense(x)
    torch.testing.assert_close(out, one_branch(x), **F64)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (reference,) = torch.autograd.grad(one_branch(x).square().sum(), x)
    torch.testing.assert_close(grad, reference, **F64)


def test_dense_model_trains_and_counts_full_causal_attention():
    model = build(attention_impl="dense")
    loss, grads = loss_and_grads(model, tokens())
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    config = model.config
    assert attention_flops_per_token(config, 1024) == pytest.approx(3.5 * 0.5 * 4 * 1024 * 16 * 2 * 2)


@pytest.mark.parametrize("bad,message", [
    ({"activation_checkpointing": "some"}, r"activation_checkpointing='some' is not one of \['none', 'full'"),
    ({"compile": "yes"}, r"compile='yes' is not one of \['auto', true, false\]"),
    ({"attention_impl": "flash"}, r"attention_impl='flash' is not one of \['dilated', 'dense'\]"),
    ({"checkpoint_group_size": 0}, r"checkpoint_group_size=0 must be a positive integer"),
])
def test_bad_speed_options_raise_value_error_naming_the_valid_values(bad, message):
    with pytest.raises(ValueError, match=message):
        build(**bad)


@pytest.mark.parametrize("value,policy", [(True, "full"), (False, "none"), ("selective", "selective")])
def test_boolean_checkpointing_still_means_full_or_none(value, policy):
    assert build(activation_checkpointing=value).config.activation_checkpointing == policy


def test_fused_adamw_is_asked_for_on_cuda_with_torch_adam_only():
    from longnet_dist.train.engine import with_fused_torch_adam

    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "bf16": {"enabled": True}}
    fused = with_fused_torch_adam(config, cuda=True)
    assert fused["optimizer"]["params"] == {"lr": 1e-3, "torch_adam": True, "fused": True}
    assert "fused" not in config["optimizer"]["params"]  # the caller's dict is not changed
    assert with_fused_torch_adam(config, cuda=False) is config
    deepspeed_adam = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": False}}}
    assert with_fused_torch_adam(deepspeed_adam, cuda=True) is deepspeed_adam  # DeepSpeed's FusedAdam


@pytest.mark.parametrize("recompute", [False, True])
def test_token_wise_backward_costs_the_same_for_any_number_of_chunks(recompute):
    """Chunks are slices of one split: their gradients are concatenated once. Indexing a slice per
    chunk made each chunk's backward a gradient of the whole tensor (zeros but for its rows): with
    64 chunks the backward wrote 64 full-size tensors (66 s instead of 2 s at N = 1M on the CPU)."""
    from longnet_dist.model.regions import token_wise

    x = torch.randn(1, 4096, 32, dtype=torch.float64, requires_grad=True)
    scale = torch.linspace(0.5, 2.0, 4096, dtype=torch.float64)[None, :, None]  # a second input, no gradient

    def region(rows, s):
        return (rows * s).sin(), rows.cos()

    made = {}
    for chunk in (None, 64):
        a, b = token_wise(region, x, scale, chunk_size=chunk, recompute=recompute)
        with LiveTensors() as counter:
            (grad,) = torch.autograd.grad((a * b).sum(), x)
        made[chunk] = counter.made_bytes
        torch.testing.assert_close(grad, ((x * scale).cos() * scale * x.cos() - (x * scale).sin() * x.sin()).detach(),
                                   **F64)
    whole = x.numel() * x.element_size()
    assert made[64] < made[None] + 4 * whole, (made, whole)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rmsnorm_backward_is_exact_and_keeps_only_its_input(dtype):
    """The eager RMSNorm's backward recomputes the normalised rows from x and 1/rms(x): exact against
    autograd through the composition (float64; bf16 up to the float32 rounding both do), and it keeps
    no activation beside its input."""
    from longnet_dist.model.layers import RMSNorm, _rms_norm

    torch.manual_seed(0)
    norm = RMSNorm(16).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 7, 16, dtype=dtype, requires_grad=True)
    out = norm(x)
    big = [t for t in out.grad_fn.saved_tensors if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    grad = torch.randn_like(out)
    reference = _rms_norm(x, norm.weight, norm.eps)[0]
    assert torch.equal(out, reference)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    for got, want in zip(torch.autograd.grad(out, (x, norm.weight), grad),
                         torch.autograd.grad(reference, (x, norm.weight), grad)):
        torch.testing.assert_close(got, want, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda a, w: torch.func.functional_call(norm, {"weight": w}, (a,)),
                                        (x.detach().requires_grad_(), norm.weight.detach().requires_grad_()))


def test_memory_breakdown_accounts_for_the_peak():
    """benchmarks/memory_breakdown.py: what it lists as alive at the peak sums to the peak, and full
    checkpointing's peak is lower than none's (the tool sees what the checkpointing tests assert)."""
    import sys

    from subprocess_env import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory_breakdown import breakdown

    peaks = {}
    for policy in ("none", "full"):
        config = LongNetConfig(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=2, segment_lengths=[512, 2048],
                               dilation_rates=[1, 4], activation_checkpointing=policy, token_chunk_size=2048,
                               compile=False)
        result = breakdown(config, 8192)  # one (N, E) fp32 activation: 1 MiB, the smallest tracked size
        assert sum(row["bytes"] for row in result["alive_at_peak"]) == result["peak_bytes"] > 0
        peaks[policy] = result["peak_activations"]
    assert peaks["full"] < 0.7 * peaks["none"], peaks
