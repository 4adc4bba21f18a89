"""Where the trainer's DeepSpeed engine lives: the CPU whenever the ranks talk gloo."""
import torch
import torch.distributed as dist

from longnet_dist.train import engine


def test_gloo_keeps_the_engine_on_the_cpu_even_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert engine._engine_on_cpu()
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert not engine._engine_on_cpu()


def test_no_cuda_means_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert engine._engine_on_cpu()


def test_a_finished_run_leaves_the_process_group():
    """train() ends with release_process_group(): a barrier, then the group destroyed, so no rank exits
    while its gloo peers hold connections (a rank then aborted after the run's last line, failing a
    SLURM job whose training had finished); a second call, or a run without a group, does nothing."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    engine.release_process_group()
    assert not dist.is_initialized()
    engine.release_process_group()
