"""Floor 3: the LongNet decoder language model (knows no ranks; hands the sequence group to attention)."""
from .dense import DenseAttention
from .flops import attention_flops_per_token, count_parameters, flops_per_token, matmul_weights
from .layers import GeluMLP, RMSNorm, SwiGLU
from .lm import Block, LongNetConfig, LongNetLM

__all__ = [
    "Block", "DenseAttention", "GeluMLP", "LongNetConfig", "LongNetLM", "RMSNorm", "SwiGLU", "attention_flops_per_token",
    "count_parameters", "flops_per_token", "matmul_weights",
]
