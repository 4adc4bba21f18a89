"""Building blocks of a LongNet block besides attention: norms and feed-forward layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x / rms(x) * weight in x's dtype, 1 / rms(x)) computed in float32 or wider (bf16 -> float32)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    wide = x.to(compute)
    rstd = torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return (wide * rstd * weight.to(compute)).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm whose backward keeps only x and 1/rms(x): autograd through the composition would keep
    the normalised rows as well (and a float32 copy of bf16 rows), one more activation per norm."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad = grad_out.to(rstd.dtype)
        grad_weight = (grad * normed).flatten(0, -2).sum(0)
        grad_normed = grad * weight.to(rstd.dtype)
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed)) along the normalised dimension
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(dim=-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 or wider (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # inductor fuses the composition and picks what to keep itself
            return _rms_norm(x, self.weight, self.eps)[0]
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def make_norm(kind: str, dim: int) -> nn.Module:
    """An RMSNorm or a bias-free LayerNorm over the last dimension."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=False)
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020); gate and up share one matmul."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, N, F) each
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """down(gelu(up(x))), the GPT-2 feed-forward layer."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def default_mlp_hidden_dim(kind: str, dim: int) -> int:
    """4*dim for GELU; for SwiGLU 2/3 of that (same parameter count), rounded up to a multiple of 64."""
    if kind == "gelu":
        return 4 * dim
    return -(-(8 * dim // 3) // 64) * 64


def make_mlp(kind: str, dim: int, hidden_dim: int) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(dim, hidden_dim)
    if kind == "gelu":
        return GeluMLP(dim, hidden_dim)
    raise ValueError(f"unknown mlp {kind!r}; valid: {', '.join(MLPS)}")


def mlp_matmul_params(kind: str, dim: int, hidden_dim: int) -> int:
    """Weights of one feed-forward layer (all in matmuls)."""
    return (3 if kind == "swiglu" else 2) * dim * hidden_dim
