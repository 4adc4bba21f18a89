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
