"""Trainer pieces without a training run: loss scaling for DeepSpeed's averaging, eval buckets, resume paths."""
from __future__ import annotations

import json
import math

import pytest
import torch

from longnet_dist.distributed.testing import run_multiprocess
from longnet_dist.train.evaluate import bits_per_byte, position_bucket_edges
from longnet_dist.train.loss import sequence_parallel_loss
from longnet_dist.train.state import resolve_resume

IGNORE = -100


def _problem():
    """A linear model theta (4,), 10 tokens with features x (10, 4), targets y (10,); 3 labels ignored."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 4, generator=generator), torch.randn(10, generator=generator)
    labels = torch.arange(10)
    labels[[1, 2, 7]] = IGNORE
    return x, y, labels


def _token_losses(theta, x, y, labels):
    return ((x @ theta - y) ** 2) * (labels != IGNORE)  # (n,), zero where ignored


def _rank_gradient(rank: int, world_size: int):
    """Rank r holds tokens [0, 6) or [6, 10) (unequal counts after ignoring); returns DeepSpeed's average."""
    x, y, labels = _problem()
    rows = slice(0, 6) if rank == 0 else slice(6, 10)
    theta = torch.ones(4, requires_grad=True)
    token_losses = _token_losses(theta, x[rows], y[rows], labels[rows])
    loss = sequence_parallel_loss(token_losses[None], labels[rows][None], IGNORE)  # (1, n) like a batch
    loss.backward_loss.backward()
    gradient = theta.grad.clone()
    torch.distributed.all_reduce(gradient)
    return (gradient / world_size, loss.mean)  # what DeepSpeed's averaging over the world yields


def test_scaled_losses_average_to_the_full_sequence_gradient():
    x, y, labels = _problem()
    theta = torch.ones(4, requires_grad=True)
    full = _token_losses(theta, x, y, labels).sum() / (labels != IGNORE).sum()  # the objective: mean over counted
    full.backward()
    for gradient, mean in run_multiprocess(_rank_gradient, 2):
        # float32, 10 terms: summation order only
        torch.testing.assert_close(gradient, theta.grad, rtol=1e-6, atol=1e-7)
        assert mean == pytest.approx(full.item(), rel=1e-6)


def test_single_process_loss_is_the_mean_over_counted_tokens():
    losses = torch.tensor([[1.0, 2.0, 0.0, 5.0]])
    labels = torch.tensor([[3, 4, IGNORE, 6]])
    result = sequence_parallel_loss(losses, labels, IGNORE)
    assert result.mean == pytest.approx(8.0 / 3) and result.global_tokens == 3
    assert result.backward_loss.item() == pytest.approx(8.0 / 3)


def test_position_buckets_are_log_spaced_and_cover_the_window():
    assert position_bucket_edges(4096, 8) == [0, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert position_bucket_edges(8, 8) == [0, 1, 2, 4, 8]  # too short for 8 distinct buckets


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(math.log(4), 0.5) == pytest.approx(1.0)  # 2 bits per token, 2 bytes per token


def test_resolve_resume(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    assert resolve_resume(None, root) is None
    assert resolve_resume("auto", root) is None  # fresh run: nothing to resume yet
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "run"), root)
    folder = root / "step_00000004"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    assert resolve_resume(str(folder), root) == folder  # an explicit checkpoint folder is taken as given


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    from longnet_dist.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, {"backend": "none"}, {}, enabled=True)
    logger.metrics_path.write_text("".join(f'{{"step": {step}, "loss": 1.0}}\n' for step in range(1, 8)))
    logger.forget_after(5)  # the interrupted run logged steps 6, 7 after its step-5 checkpoint
    assert [json.loads(line)["step"] for line in logger.metrics_path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_the_log_advises_against_deepspeeds_slow_bf16_wrapper_on_a_gpu_only():
    """bf16 at ZeRO-0 on a GPU (FP16_UnfusedOptimizer, 20.8 ms a step of model=base on an H200) gets one note
    naming the faster config group; BF16_Optimizer, fp32's plain AdamW and any CPU run get none."""
    from longnet_dist.train.engine import optimizer_advice

    advice = optimizer_advice("FP16_UnfusedOptimizer", on_gpu=True)
    assert advice is not None and "deepspeed=bf16" in advice and "BF16_Optimizer" in advice
    assert optimizer_advice("FP16_UnfusedOptimizer", on_gpu=False) is None
    assert optimizer_advice("BF16_Optimizer", on_gpu=True) is None
    assert optimizer_advice("AdamW", on_gpu=True) is None


# One small BF16_Optimizer engine (ZeRO-1, fp32 gradient accumulation, torch AdamW, warm-up schedule) on one gloo
# rank, for the scripts below; each sets CLIP (gradient_clipping) and FUSED (AdamW's fused kernel) before it.
BF16_ENGINE = r"""
import sys
import torch
from longnet_dist.train.engine import build_engine, ensure_process_group, grad_norm_value
from longnet_dist.train.host_reads import HostReads

ensure_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
engine = build_engine(model, {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
    "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                              "torch_adam": True, "fused": FUSED}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 1}}})
"""


def _run_each(tmp_path, script: str, variable: str, values: tuple[str, ...], *args: str) -> dict:
    """Runs `script` (a BF16_ENGINE script saving to argv[1]) once per value of environment `variable`, DeepSpeed on
    the CPU -> {value: what that run saved}."""
    import os
    import subprocess
    import sys

    from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath

    results = {}
    for value in values:
        env = {**on_the_cpu(repo_first_on_pythonpath(os.environ)), variable: value}
        path = tmp_path / f"{variable}{value}.pt"
        run = subprocess.run([sys.executable, "-c", script, str(path), *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        results[value] = torch.load(path)
    return results


CLIP_RUN = "CLIP, FUSED = float(__import__('sys').argv[2]), False" + BF16_ENGINE + r"""
x = torch.randn(32, 16).to(torch.bfloat16)
norms = []
for _ in range(4):
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    norms.append(float(engine.get_global_grad_norm()))
from deepspeed.runtime import bf16_optimizer
torch.save({"master": [p.clone() for p in engine.optimizer.fp32_groups_flat_partition], "norms": norms,
            "wrapper": type(engine.optimizer).__name__,
            "fused": getattr(bf16_optimizer.clip_tensors_by_global_norm, "fused_by_longnet", False)}, sys.argv[1])
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # every step clipped; none
def test_fused_bf16_clipping_gives_deepspeeds_bits(tmp_path, max_norm):
    """engine.fuse_bf16_gradient_clipping: BF16_Optimizer's gradient clipping as one multi-tensor multiply left on
    the device gives the fp32 master weights DeepSpeed's per-tensor loop gives, bit for bit, over 4 steps of
    AdamW, whether every step clips or none does (LONGNET_FUSED_CLIP=0 runs DeepSpeed's own)."""
    results = _run_each(tmp_path, CLIP_RUN, "LONGNET_FUSED_CLIP", ("1", "0"), str(max_norm))
    fused, original = results["1"], results["0"]
    assert fused["wrapper"] == original["wrapper"] == "BF16_Optimizer"
    assert fused["fused"] and not original["fused"]
    assert fused["norms"] == original["norms"] and all(n > 0 for n in fused["norms"])
    assert (min(fused["norms"]) > max_norm) if max_norm < 1 else (max(fused["norms"]) < max_norm)
    for a, b in zip(fused["master"], original["master"]):
        assert torch.equal(a, b)


class _Engine:
    """What _train_step uses of a DeepSpeed engine; a micro-batch whose first input id is 0 has a NaN loss."""

    device = torch.device("cpu")
    optimizer = None

    def __init__(self, gas: int):
        self.gas, self.calls, self.micro = gas, [], 0

    def get_lr(self):
        return [1e-3]

    def __call__(self, input_ids, labels, **kwargs):
        self.calls.append(("forward", int(input_ids[0, 0])))
        losses = torch.ones(labels.shape, requires_grad=True)
        return losses * float("nan") if int(input_ids[0, 0]) == 0 else losses

    def backward(self, loss):
        self.calls.append(("backward", float(loss.detach())))
        self.micro += 1

    def is_gradient_accumulation_boundary(self):
        return self.micro % self.gas == 0

    def zero_optimization_stage(self):
        return 1

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.calls.append(("step",))

    def get_global_grad_norm(self):
        return torch.tensor(2.0)


def _batches(first_ids):
    for first in first_ids:
        ids = torch.full((1, 5), 7)
        ids[0, 0] = first
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "positions": torch.arange(4)}


@pytest.mark.parametrize("gas", [1, 2])
def test_a_nonfinite_loss_is_dropped_before_its_backward_under_skip_and_stops_after_the_step_under_stop(tmp_path, gas):
    """_train_step's two policies (nonfinite_loss): "skip" reads each loss before its backward and replaces a
    non-finite micro-batch by the next; "stop" reads the losses after the optimizer step (no wait before the
    backward) and raises NonFiniteLossError naming the step, with its diagnostics file."""
    from longnet_dist.train.faults import NonFiniteLossError
    from longnet_dist.train.trainer import _train_step

    engine = _Engine(gas)
    loss, norm, lr = _train_step(engine, _batches([5, 0, 6, 8]), None, gas, 3, "skip", tmp_path)
    expected = {1: ["forward", "backward", "step"],  # the step ends before the NaN batch
                2: ["forward", "backward", "forward", "forward", "backward", "step"]}  # NaN: no backward
    assert [c[0] for c in engine.calls] == expected[gas]
    assert loss == 1.0 and norm.get() == 2.0 and lr == 1e-3
    engine = _Engine(gas)
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        _train_step(engine, _batches([0, 6, 8]), None, gas, 4, "stop", tmp_path)
    assert [c[0] for c in engine.calls][-1] == "step"  # the losses were read after the optimizer step
    assert (tmp_path / "nonfinite_loss_step_00000004.json").exists()


OVERFLOW_RUN = "CLIP, FUSED = 1.0, True" + BF16_ENGINE + r"""
norms, reads = [], []
for step in range(5):
    x = torch.randn(32, 16).to(torch.bfloat16)
    if step == 2:
        x[0, 0] = float("nan")  # every gradient of the first layer non-finite: the update must be skipped
    engine.backward(engine(x).float().pow(2).mean())
    with HostReads() as found:
        engine.step()
    reads.append(dict(found.sites))
    value = grad_norm_value(engine)
    norms.append(value if isinstance(value, float) else value.get())
inner, masters = engine.optimizer.optimizer, engine.optimizer.fp32_groups_flat_partition
torch.save({"master": [p.clone() for p in masters], "norms": norms, "reads": reads,
            "state": [{k: v.clone() for k, v in inner.state[p].items()} for p in masters],
            "bf16": [p.detach().clone() for p in model.parameters()]}, sys.argv[1])
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_bf16_overflow_skip_on_the_device_gives_deepspeeds_bits_without_a_host_read(tmp_path):
    """engine.keep_bf16_overflow_check_on_device: with fused AdamW inside BF16_Optimizer, a step whose gradients
    are not finite is skipped by the fused kernel (found_inf) instead of by a host read: over 5 steps, one of
    them skipped, the fp32 master weights, AdamW's moments and step count and the bf16 weights equal DeepSpeed's
    own bit for bit (constant LR: on a skipped step the patched schedule advances), the finite steps' norms are
    the same, the skipped one reads -1 (DeepSpeed's inf), and the patched optimizer step reads nothing on the
    host where DeepSpeed's reads the norm's finiteness."""
    import math

    results = _run_each(tmp_path, OVERFLOW_RUN, "LONGNET_DEVICE_OVERFLOW_CHECK", ("1", "0"))
    ours, theirs = results["1"], results["0"]
    assert theirs["norms"][2] == math.inf and ours["norms"][2] == -1.0
    assert [n for i, n in enumerate(ours["norms"]) if i != 2] == [n for i, n in enumerate(theirs["norms"]) if i != 2]
    for a, b in zip(ours["master"] + ours["bf16"], theirs["master"] + theirs["bf16"]):
        assert torch.equal(a, b)
    for a, b in zip(ours["state"], theirs["state"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert float(a["step"]) == 4  # five steps, one skipped
    assert all(reads == {} for reads in ours["reads"]), ours["reads"]
    assert all(any("is_invalid_grad_norm" in site for site in reads) for reads in theirs["reads"]), theirs["reads"]


def test_kept_grad_norms_are_read_when_logged_and_deepspeeds_mark_for_a_skipped_step_reads_inf():
    """trainer._logged_norm / engine.grad_norm_value: the norm BF16_Optimizer's patched check kept is taken once;
    an engine's tensor norm is kept as a DeviceValue; DeepSpeed's -1 (a non-finite norm) is logged as inf."""
    from types import SimpleNamespace

    from longnet_dist.train.engine import grad_norm_value
    from longnet_dist.train.host_reads import DeviceValue
    from longnet_dist.train.trainer import _logged_norm

    kept = DeviceValue(torch.tensor(3.0))
    engine = SimpleNamespace(optimizer=SimpleNamespace(longnet_grad_norm=kept), get_global_grad_norm=lambda: 7.0)
    assert grad_norm_value(engine) is kept and grad_norm_value(engine) == 7.0  # taken once, then the engine's
    engine.get_global_grad_norm = lambda: torch.tensor(-1.0)
    value = grad_norm_value(engine)
    assert isinstance(value, DeviceValue) and _logged_norm(value) == math.inf
    assert _logged_norm(2.5) == 2.5 and _logged_norm(kept) == 3.0
    engine.get_global_grad_norm = lambda: None
    assert grad_norm_value(engine) is None
