"""Process group and DeepSpeed engine set-up (every run uses DeepSpeed, a single process included)."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longnet_dist.distributed import init_distributed

from .host_reads import DeviceValue


def ensure_process_group(backend: str | None = None) -> None:
    """Init the torchrun process group, or a world-1 group for a plain `python` run.

    DeepSpeed needs an initialised group and LOCAL_RANK even for one process; without torchrun's
    environment it would look for MPI instead.
    """
    init_distributed(backend)
    if dist.is_initialized():
        return
    os.environ.setdefault("LOCAL_RANK", "0")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _quiet_deepspeed() -> None:
    """DeepSpeed's INFO lines and torch's collective deprecation warnings drown the training log."""
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    deepspeed_logger.addFilter(lambda record: "before it has started" not in record.getMessage())  # see build_engine
    logging.getLogger("compilers.C.base").setLevel(logging.WARNING)  # DeepSpeed's op probes compile test programs
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def _engine_on_cpu() -> bool:
    """DeepSpeed (and the model) on the CPU: without CUDA, or when the ranks talk gloo, which moves CPU
    tensors (with a GPU visible DeepSpeed would otherwise pick it). DS_ACCELERATOR, if set, still wins."""
    return not torch.cuda.is_available() or dist.get_backend() == "gloo"


def _skip_shared_memory_allreduce_build() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory all-reduce (about a minute) that only its
    inference path uses; training reduces through torch.distributed (gloo), so mark it unavailable."""
    import deepspeed.ops

    if _engine_on_cpu():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (matmul weights, embeddings) decay; norms and biases do not."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def with_fused_torch_adam(ds_config: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The config with torch.optim.AdamW(fused=True) asked for when it runs on CUDA with `torch_adam`
    (one kernel for all parameters instead of a dozen per tensor); otherwise `ds_config` unchanged.
    DeepSpeed passes the extra optimizer param through to torch.optim.AdamW."""
    params = ds_config["optimizer"]["params"]
    if not (cuda and params.get("torch_adam")) or "fused" in params:
        return ds_config
    return {**ds_config, "optimizer": {**ds_config["optimizer"], "params": {**params, "fused": True}}}


def fuse_bf16_gradient_clipping() -> None:
    """DeepSpeed's BF16_Optimizer (`deepspeed=bf16`) clips the gradients tensor by tensor after reading the clip
    coefficient on the host: it waits for the GPU, then launches one multiply per parameter tensor (about 100 for
    `model=base`) while the GPU idles between them. This replaces its clipping with the same arithmetic in one
    multi-tensor multiply by min(1, max_norm / (norm + eps)), left on the GPU: the same bits (x * c, and c is
    exactly 1 where DeepSpeed skips the multiply). Other wrappers clip their own way and are left alone; so is a
    call without a precomputed norm tensor. LONGNET_FUSED_CLIP=0 keeps DeepSpeed's own."""
    from deepspeed.runtime import bf16_optimizer

    original = bf16_optimizer.clip_tensors_by_global_norm
    if getattr(original, "fused_by_longnet", False):
        return

    def clip_tensors_by_global_norm(input_tensors, max_norm=1.0, global_norm=None, mpu=None, eps=1e-6):
        if not torch.is_tensor(global_norm) or not input_tensors:
            return original(input_tensors, max_norm=max_norm, global_norm=global_norm, mpu=mpu, eps=eps)
        coefficient = (max_norm / (global_norm + eps)).clamp(max=1.0)
        torch._foreach_mul_([tensor.detach() for tensor in input_tensors], coefficient)
        return global_norm

    clip_tensors_by_global_norm.fused_by_longnet = True
    bf16_optimizer.clip_tensors_by_global_norm = clip_tensors_by_global_norm


def _fused_torch_adam(optimizer) -> bool:
    """torch's Adam or AdamW with fused=True in every group: its kernel honours a `found_inf` tensor."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
        group.get("fused") for group in optimizer.param_groups)


def keep_bf16_overflow_check_on_device() -> None:
    """DeepSpeed's BF16_Optimizer skips the update when the gradient norm is not finite, and to decide it reads
    the norm's finiteness on the host: the GPU drains and idles each step (train/host_reads.py). With torch's fused
    Adam or AdamW inside (the trainer's choice on CUDA), the skip can stay on the GPU: the fused kernel leaves
    parameters, moments and step counts as they were when its `found_inf` is 1. This sets found_inf from the norm
    and lets the step go on as for a finite norm: clipping, the update and the copies to the bf16 weights then
    change nothing. On such a step, unlike DeepSpeed's own skip, the LR schedule advances, DeepSpeed's
    skipped-step counter does not, and the norm reads -1 (DeepSpeed's mark for a non-finite norm; the trainer
    logs it as inf). Also, DeepSpeed marks a non-finite norm with a constant built in host memory each step, a
    copy to the GPU that waits as well: a scalar fill gives the same bits. The norm reaches the host through
    host_reads.DeviceValue, copied before the update is queued (`grad_norm_value`). Needs the fused clip
    (fuse_bf16_gradient_clipping), whose coefficient stays on the device; LONGNET_DEVICE_OVERFLOW_CHECK=0 keeps
    DeepSpeed's check."""
    from deepspeed.runtime import bf16_optimizer, utils

    if getattr(bf16_optimizer.is_invalid_grad_norm, "fused_by_longnet", False):
        return
    original_check, original_step = bf16_optimizer.is_invalid_grad_norm, bf16_optimizer.BF16_Optimizer.step
    stepping = []  # the BF16_Optimizer whose step is running

    def is_invalid_grad_norm(norm):
        wrapper = stepping[-1] if stepping else None
        if wrapper is None or not torch.is_tensor(norm) or not _fused_torch_adam(wrapper.optimizer):
            return original_check(norm)
        wrapper.optimizer.found_inf = (~torch.isfinite(norm) | (norm < 0)).float()
        wrapper.longnet_grad_norm = DeviceValue(norm)
        return False

    def step(self, closure=None):
        stepping.append(self)
        try:
            return original_step(self, closure)
        finally:
            stepping.pop()
            self.optimizer.__dict__.pop("found_inf", None)  # torch reads it as an attribute at every step

    def mask_nan_or_inf_with_val_inplace(input, device=None, val=-1.0):
        input.masked_fill_(~torch.isfinite(input), val)

    is_invalid_grad_norm.fused_by_longnet = True
    bf16_optimizer.is_invalid_grad_norm = is_invalid_grad_norm
    bf16_optimizer.BF16_Optimizer.step = step
    utils.mask_nan_or_inf_with_val_inplace = mask_nan_or_inf_with_val_inplace


def grad_norm_value(engine):
    """The last step's gradient norm as the trainer keeps it: host_reads.DeviceValue (read when logged, without
    draining the GPU), a float, or None."""
    kept = getattr(engine.optimizer, "longnet_grad_norm", None)
    if kept is not None:
        engine.optimizer.longnet_grad_norm = None
        return kept
    norm = engine.get_global_grad_norm()
    return DeviceValue(norm) if torch.is_tensor(norm) else (None if norm is None else float(norm))


def build_engine(model: nn.Module, ds_config: dict[str, Any]):
    """deepspeed.initialize over the whole world as data-parallel group (see loss.py for why)."""
    if _engine_on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # set before DeepSpeed is first imported
    import deepspeed

    _quiet_deepspeed()
    _skip_shared_memory_allreduce_build()
    if os.environ.get("LONGNET_FUSED_CLIP", "1") != "0":
        fuse_bf16_gradient_clipping()
        if os.environ.get("LONGNET_DEVICE_OVERFLOW_CHECK", "1") != "0":
            keep_bf16_overflow_check_on_device()
    ds_config = with_fused_torch_adam(ds_config, cuda=not _engine_on_cpu())
    # DeepSpeed's throughput timer (on by default) synchronises the device at every forward and every optimizer
    # step, draining the GPU twice a step (host_reads.explicit_syncs found it); the trainer measures throughput
    # itself. A `timers` entry in the config wins.
    ds_config = {"timers": {"throughput": {"enabled": False}}, **ds_config}
    weight_decay = ds_config["optimizer"]["params"]["weight_decay"]
    engine, _, _, scheduler = deepspeed.initialize(model=model, config=ds_config,
                                                   model_parameters=parameter_groups(model, weight_decay))
    # WarmupCosineLR starts at iteration -1, whose lr is 0: the first step would not move the weights.
    # Start at iteration 0 (lr = lr / warmup_steps); checkpoints save and restore the iteration.
    scheduler.step(0)
    return engine


def stage0_grad_norm(engine) -> torch.Tensor | None:
    """Gradient 2-norm (a 0-dim float32 tensor on the parameters' device) from .grad for ZeRO stage 0, whose
    plain torch optimizer does not report one. Left on the device: the trainer reads it when it logs.

    Call after the backward of the accumulation boundary (DeepSpeed has averaged .grad) and before
    engine.step(), which zeroes it. ZeRO stages report `engine.get_global_grad_norm()` after step.
    """
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def optimizer_advice(wrapper: str, on_gpu: bool) -> str | None:
    """A line for the log when DeepSpeed chose its slow bf16 wrapper on a GPU, else None. bf16 at ZeRO stage 0
    runs FP16_UnfusedOptimizer, a host loop that waits for the GPU once per parameter tensor: on an H200,
    20.8 ms per step of the 85M `model=base` against 3.5 ms for BF16_Optimizer (stop 27,
    benchmarks/optimizer_step.py), a sixth of a 32K-token step."""
    if wrapper != "FP16_UnfusedOptimizer" or not on_gpu:
        return None
    return ("DeepSpeed runs bf16 at ZeRO stage 0 with FP16_UnfusedOptimizer, which waits for the GPU once per "
            "parameter tensor (20.8 ms a step for model=base on an H200); deepspeed=bf16 (ZeRO-1 with fp32 gradient "
            "accumulation: BF16_Optimizer) took 3.5 ms")
