"""The trainer's step makes the host wait for the device only where it must (train/host_reads.py).

On a GPU each host read of a tensor's value, and each copy from pageable memory, drains the GPU's queue: it
then idles until the host has launched more work. A training step (`trainer._train_step`, the real engine,
`model=tiny`) may read one value of ours: the loss, which the non-finite-loss policy needs (before the
backward under "skip", after the optimizer step under "stop"). The gradient norm stays on the device until it
is logged, and batches go to the GPU through pinned memory. DeepSpeed's own reads are reported, not asserted:
on the CPU, torch's non-fused AdamW reads its step counts, and BF16_Optimizer reads whether the gradient norm
is finite (with fused AdamW, as on CUDA, neither: tests/test_train_units.py checks the overflow check kept on
the device). No whole-device sync may happen at all (DeepSpeed's throughput timer made two a step).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from longnet_dist.train.host_reads import DeviceValue, HostReads, call_site, cuda_syncs
from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath

STEP_RUN = r"""
import json, os, sys
from pathlib import Path
import torch


def audited_step(rank, world, out, zero, device, policy):
    # two warm-up steps, then step 3 under HostReads and cuda_syncs. With `world` ranks (sequence parallel, sp =
    # world) each rank reads its 64 tokens of a 64 * world window; the longest branch spans every rank.
    os.environ.setdefault("LOCAL_RANK", str(rank))
    from hydra import compose, initialize_config_dir
    from longnet_dist.attention import segment_spans
    from longnet_dist.distributed import build_mesh
    from longnet_dist.model import LongNetLM
    from longnet_dist.train.__main__ import CONFIG_DIR
    from longnet_dist.train.config import deepspeed_config, model_config
    from longnet_dist.train.engine import build_engine, ensure_process_group
    from longnet_dist.train.host_reads import DeviceValue, HostReads, cuda_syncs
    from longnet_dist.train.trainer import _train_step

    seq_len, segments = 64 * world, [16 * world, 64 * world]
    ensure_process_group("gloo" if device == "cpu" else "nccl")  # nothing to do under run_multiprocess (gloo)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.seq_len={seq_len}", f"attention.segment_lengths={segments}",
                                          "model=tiny", "attention.dilation_rates=[1,2]", f"deepspeed={zero}",
                                          "logger=none", f"distributed.sequence_parallel_size={world}"])
    sequence_group = None
    if world > 1:
        sequence_group = build_mesh(world).sequence_group
        sequence_group.prepare_segment_subgroups(segment_spans(seq_len, world, segments))
    torch.manual_seed(0)
    engine = build_engine(LongNetLM(model_config(cfg, vocab_size=258)), deepspeed_config(cfg))

    def batches():  # what SequenceShardLoader yields: views of this rank's (1, 65) block, global positions
        generator = torch.Generator().manual_seed(0)
        while True:
            block = torch.randint(3, 258, (1, seq_len + 1), generator=generator)[:, 64 * rank: 64 * rank + 65]
            positions = torch.arange(64 * rank, 64 * rank + 64)
            yield {"input_ids": block[:, :-1], "labels": block[:, 1:], "positions": positions}

    loader = batches()
    for step in (1, 2):  # compiles, allocates, creates the optimizer state
        _train_step(engine, loader, sequence_group, 1, step, policy, out.parent)
    with HostReads() as reads, cuda_syncs() as syncs:
        loss, norm, lr = _train_step(engine, loader, sequence_group, 1, 3, policy, out.parent)
    return {"reads": reads.sites, "syncs": syncs, "norm_kept": isinstance(norm, DeviceValue), "norm": norm.get(),
            "loss": loss, "wrapper": type(engine.optimizer).__name__,
            "device": str(next(engine.module.parameters()).device)}


if __name__ == "__main__":
    out, zero, device, policy, world = Path(sys.argv[1]), *sys.argv[2:5], int(sys.argv[5])
    if world == 1:
        found = audited_step(0, 1, out, zero, device, policy)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    else:
        from longnet_dist.distributed.testing import run_multiprocess

        found = run_multiprocess(audited_step, world, out, zero, device, policy, timeout=400)
    out.write_text(json.dumps(found))
"""


def _run_step(tmp_path, zero: str, device: str, policy: str = "stop", world: int = 1):
    """STEP_RUN's result: one dict, or one per rank with `world` > 1."""
    env = repo_first_on_pythonpath(os.environ)
    if device == "cpu":
        env = on_the_cpu(env)
    script, path = tmp_path / "step.py", tmp_path / f"{zero}_{device}_{policy}_{world}.json"
    script.write_text(STEP_RUN)
    run = subprocess.run([sys.executable, str(script), str(path), zero, device, policy, str(world)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(path.read_text())


def _ours(sites: dict) -> dict:
    return {site: count for site, count in sites.items() if site.startswith("longnet_dist/")}


@pytest.mark.parametrize("zero,policy", [("bf16", "stop"), ("zero0", "stop"), ("bf16", "skip")])
def test_a_training_step_reads_only_the_loss_on_the_host(tmp_path, zero, policy):
    """BF16_Optimizer (the GPU default) and plain AdamW with the trainer's own norm; under nonfinite_loss=stop
    (the default) the loss is read last, after DeepSpeed has waited for the device in its optimizer step, so the
    backward was queued without a wait; under skip it is read first, before the backward it may drop."""
    found = _run_step(tmp_path, zero, "cpu", policy)
    ours = _ours(found["reads"])
    assert list(ours.values()) == [1] and "longnet_dist/train/loss.py" in next(iter(ours)), found["reads"]
    assert "tolist" in next(iter(ours))
    # no whole-device sync (DeepSpeed's throughput timer made two a step: train/config.py turns it off)
    assert not [site for site in found["reads"] if site.endswith(" synchronize")], found["reads"]
    order = list(found["reads"])
    assert len(order) >= 2 and order.index(next(iter(ours))) == (len(order) - 1 if policy == "stop" else 0), order
    assert found["norm_kept"] and found["norm"] > 0 and found["loss"] > 0, found
    assert found["wrapper"] == ("BF16_Optimizer" if zero == "bf16" else "AdamW")


def test_a_sequence_parallel_step_reads_only_the_loss_on_the_host(tmp_path):
    """sp = 2 on two gloo ranks, a branch spanning both (its keys and values all-gathered, their gradients
    reduce-scattered): each rank's step reads the loss and nothing else of ours, and syncs no device."""
    for found in _run_step(tmp_path, "bf16", "cpu", world=2):
        reads = found["reads"]
        ours = _ours(reads)
        assert list(ours.values()) == [1] and "longnet_dist/train/loss.py" in next(iter(ours)), reads
        assert not [site for site in reads if site.endswith(" synchronize")], reads


@pytest.mark.gpu_heavy  # compiles the model's regions in a process of its own
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_on_the_gpu_never_waits_for_it(tmp_path):
    """The syncs CUDA reports in a bf16 step (BF16_Optimizer, fused AdamW): none. Batches arrive through pinned
    memory, the loss and the grad norm through events (host_reads.DeviceValue), and BF16_Optimizer's overflow
    check stays on the device (engine.keep_bf16_overflow_check_on_device)."""
    found = _run_step(tmp_path, "bf16", "cuda")
    assert found["device"].startswith("cuda") and found["wrapper"] == "BF16_Optimizer"
    assert found["syncs"] == {}, found["syncs"]
    assert found["norm_kept"] and found["norm"] > 0 and found["loss"] > 0, found


def test_host_reads_name_the_call_site_and_method():
    with HostReads() as reads:
        x = torch.arange(4.0)
        x.sum().item()
        if x[1] > 0:
            float(x[2])
        x[1:3].tolist()
        x.add(1)  # no read
    sites = list(reads.sites)
    assert len(sites) == 4 and sum(reads.sites.values()) == 4
    assert all(site.startswith(os.path.join("tests", "test_host_reads.py:")) or "test_host_reads.py:" in site
               for site in sites)
    assert [site.split()[-1] for site in sites] == ["item", "__bool__", "__float__", "tolist"]
    assert "test_host_reads_name_the_call_site_and_method" in sites[0]
    assert "test_host_reads.py" in call_site(depth=1)


def test_explicit_syncs_are_counted_once_where_they_are_called():
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    with HostReads() as reads:
        accelerator.synchronize()
    accelerator.synchronize()  # after the block: the accelerator's own method again, not counted
    assert list(reads.sites.values()) == [1] and "test_host_reads.py" in next(iter(reads.sites))
    assert next(iter(reads.sites)).endswith(" synchronize") and "synchronize" not in vars(accelerator)
    assert torch.cuda.synchronize.__module__ == "torch.cuda"
    with HostReads() as outer, HostReads() as inner:  # nested blocks (a profiled step inside an audit) both count
        accelerator.synchronize()
    assert sum(outer.sites.values()) == sum(inner.sites.values()) == 1 and "synchronize" not in vars(accelerator)


def test_cuda_syncs_is_empty_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with cuda_syncs() as syncs:
        torch.ones(2).sum().item()
    assert syncs == {}


def test_device_values_come_back_as_python_numbers():
    x = torch.tensor([1.5, 2.0])
    kept = DeviceValue(x)
    x.add_(1)  # later work on the tensor does not change what was kept
    assert kept.get() == [1.5, 2.0] and DeviceValue(torch.tensor(3.0)).get() == 3.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_values_wait_for_their_own_copy_only():
    x = torch.arange(4.0, device="cuda")
    with cuda_syncs() as syncs:
        kept = DeviceValue(x * 2)
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # queued after the copy: get() does not wait for it
            big = big @ big / 64
        value = kept.get()
    assert value == [0.0, 2.0, 4.0, 6.0] and syncs == {}, syncs
    torch.cuda.synchronize()
