"""LongNetLM: shapes, loss against torch's cross-entropy, causality, checkpointing, counts and FLOPs."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from longnet_dist.model import LongNetConfig, LongNetLM, attention_flops_per_token, count_parameters, flops_per_token

VOCAB = 258
# float32 CPU; two computations of the same math in a different order agree to ~1e-6
TOL = dict(rtol=1e-5, atol=1e-6)


def tiny_config(**overrides) -> LongNetConfig:
    settings = dict(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=2, segment_lengths=[8, 16, 32],
                    dilation_rates=[1, 2, 4])
    settings.update(overrides)
    return LongNetConfig(**settings)


def build(seed: int = 0, **overrides) -> LongNetLM:
    torch.manual_seed(seed)
    return LongNetLM(tiny_config(**overrides))


def tokens(batch: int = 2, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mlp,norm", [("swiglu", "rmsnorm"), ("gelu", "layernorm")])
def test_logits_shape_and_token_losses_match_cross_entropy(mlp, norm):
    model, ids = build(mlp=mlp, norm=norm), tokens()
    logits = model(ids[:, :-1])
    assert logits.shape == (2, 32, VOCAB)
    losses = model(ids[:, :-1], labels=ids[:, 1:])
    assert losses.shape == (2, 32) and losses.dtype == torch.float32
    reference = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none").view(2, 32)
    torch.testing.assert_close(losses, reference, **TOL)


def test_ignored_labels_have_zero_loss():
    model, ids = build(), tokens()
    labels = ids[:, 1:].clone()
    labels[:, :5] = 257
    losses = model(ids[:, :-1], labels=labels, ignore_index=257)
    assert torch.all(losses[:, :5] == 0) and torch.all(losses[:, 5:] > 0)


def test_causal_future_tokens_do_not_change_past_logits():
    model, ids = build(), tokens(batch=1)
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % VOCAB
    before, after = model(ids[:, :-1]), model(changed[:, :-1])
    torch.testing.assert_close(before[:, :20], after[:, :20], **TOL)
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def _loss_and_grads(model: LongNetLM, ids: torch.Tensor):
    model.zero_grad()
    loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [{"activation_checkpointing": True}, {"token_chunk_size": 5},
                                       {"activation_checkpointing": True, "token_chunk_size": 5}],
                         ids=["activation_checkpointing", "chunked_loss", "checkpointing_with_chunked_mlp"])
def test_memory_savers_give_the_same_loss_and_gradients(overrides):
    ids = tokens()
    loss, grads = _loss_and_grads(build(), ids)
    saved_loss, saved_grads = _loss_and_grads(build(**overrides), ids)
    torch.testing.assert_close(saved_loss, loss, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(saved_grads[name], grad, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="CPU tensors reach the fused kernels only through Triton's interpreter")
@pytest.mark.parametrize("checkpointing, dim", [("none", 32), ("full", 32), ("none", 48)],
                         ids=["head_dim_16", "head_dim_16_checkpointed", "head_dim_24_padded"])
def test_the_fused_kernels_train_the_model_as_the_cpu_kernels_do(checkpointing, dim):
    """The model on the fused Triton kernels (CUDA's default; here through the interpreter, fp32): q and k
    from rotary, v a strided view of the qkv projection, recomputed under checkpointing; at head_dim 24 in the
    kernels' tiles of 32 (columns past 24 masked). The loss and every parameter's gradient equal the model on aten's
    CPU kernels (fp32: summation order only)."""
    ids = tokens()
    settings = dict(activation_checkpointing=checkpointing, segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4],
                    dim=dim)
    loss, grads = _loss_and_grads(build(attention_backend="cpu_flash", **settings), ids)
    fused_loss, fused_grads = _loss_and_grads(build(attention_backend="triton", **settings), ids)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_tied_embeddings_share_one_matrix_and_count_once():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert count_parameters(untied) - count_parameters(tied) == VOCAB * 32


@pytest.mark.parametrize("mlp,hidden", [("swiglu", 128), ("gelu", 128)])
def test_parameter_count_matches_hand_count(mlp, hidden):
    config = tiny_config(mlp=mlp)
    assert config.mlp_hidden_dim == hidden  # swiglu: ceil(8*32/3 / 64) * 64; gelu: 4 * 32
    E, V, L = 32, VOCAB, 2
    per_layer = 4 * E * E + (3 if mlp == "swiglu" else 2) * E * hidden + 2 * E  # attention, mlp, two norms
    assert count_parameters(LongNetLM(config)) == V * E + L * per_layer + E  # + final norm; head tied


def test_flops_per_token_by_hand():
    config = tiny_config(segment_lengths=[8, 64], dilation_rates=[1, 4])  # 64 > seq_len 32: one segment of 32
    E, F_, V, L, H, D = 32, 128, VOCAB, 2, 2, 16
    dense = 6 * (L * (4 * E * E + 3 * E * F_) + E * V)
    pairs = 8 / 1 + 32 / 16  # keys per query and head: w / r^2 with w capped at seq_len
    attention = 3.5 * 0.5 * 4 * pairs * D * H * L  # fwd+bwd x causal half x 2 matmuls of 2 FLOPs
    assert attention_flops_per_token(config, 32) == pytest.approx(attention)
    assert flops_per_token(config, 32) == pytest.approx(dense + attention)


@pytest.mark.parametrize("bad,message", [
    ({"dim": 30, "num_heads": 4}, "num_heads"),
    ({"dim": 30, "num_heads": 2}, "even head_dim"),
    ({"mlp": "relu"}, "mlp"),
    ({"norm": "batchnorm"}, "norm"),
    ({"num_layers": 0}, "num_layers"),
])
def test_bad_model_config_raises_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)


def test_attention_gets_the_configured_branches():
    model = build(segment_lengths=[4, 16], dilation_rates=[1, 2])
    for block in model.blocks:
        assert block.attn.segment_lengths == [4, 16] and block.attn.dilation_rates == [1, 2]
        assert block.attn.causal and block.attn.rotary
