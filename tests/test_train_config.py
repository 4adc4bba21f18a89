"""Hydra config: overrides reach the model, attention and DeepSpeed; bad configs fail at start, clearly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from longnet_dist.model import LongNetLM
from longnet_dist.train.__main__ import CONFIG_DIR
from longnet_dist.train.config import deepspeed_config, model_config, validate_config
from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath


def make_config(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_default_config_is_valid():
    cfg = make_config()
    validate_config(cfg, world_size=1)
    assert cfg.model.name == "small" and cfg.data.seq_len == 4096 and cfg.resume == "auto"


def test_the_gpu_experiment_trains_with_the_bf16_optimizer_and_the_paper_branches():
    """experiment=gpu_base: DeepSpeed's BF16_Optimizer mix (ZeRO-1, bf16, fp32 gradient accumulation), the
    paper's branches, 32K windows; it validates on 8 ranks as dp 4 x sp 2 (its docstring's example)."""
    cfg = make_config("experiment=gpu_base", "distributed.sequence_parallel_size=2")
    validate_config(cfg, world_size=8)
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is True
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert cfg.model.name == "base" and cfg.data.seq_len == 32768
    assert list(cfg.attention.segment_lengths) == [2048, 4096, 8192, 16384, 32768]
    assert list(cfg.attention.dilation_rates) == [1, 2, 4, 6, 12]


def test_overrides_reach_the_built_model_and_its_attention():
    cfg = make_config("model=tiny", "model.num_layers=3", "model.mlp=gelu", "data.seq_len=512",
                      "attention.segment_lengths=[32,128,512]", "attention.dilation_rates=[1,2,8]")
    validate_config(cfg, world_size=1)
    model = LongNetLM(model_config(cfg, vocab_size=258))
    assert len(model.blocks) == 3 and model.embed.embedding_dim == 64
    for block in model.blocks:
        assert block.attn.segment_lengths == [32, 128, 512] and block.attn.dilation_rates == [1, 2, 8]
        assert type(block.mlp).__name__ == "GeluMLP"


@pytest.mark.parametrize("group,stage", [("zero0", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero2_offload", 2),
                                         ("bf16", 1)])
def test_deepspeed_dict_combines_the_group_with_trainer_values(group, stage):
    cfg = make_config(f"deepspeed={group}", "trainer.lr=0.01", "trainer.max_steps=77", "trainer.warmup_steps=7",
                      "trainer.gradient_accumulation_steps=3", "data.micro_batch_size=2")
    validate_config(cfg, world_size=1)
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 0.01
    assert ds["scheduler"]["params"]["total_num_steps"] == 77 and ds["scheduler"]["params"]["warmup_num_steps"] == 7
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ("offload_optimizer" in ds["zero_optimization"]) == (group == "zero2_offload")
    # `bf16`: the mix DeepSpeed runs with BF16_Optimizer (bf16 weights, fp32 gradient accumulation, stage 1)
    assert ds["bf16"]["enabled"] == (group == "bf16")
    assert ds.get("data_types", {}).get("grad_accum_dtype") == ("fp32" if group == "bf16" else None)


def test_unknown_key_override_fails_in_hydra():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        make_config("trainer.max_stepz=3")


@pytest.mark.parametrize("overrides,world_size,message", [
    (["+trainer.bogus=1"], 1, r"unknown key\(s\) \['trainer.bogus'\]"),
    (["trainer.max_steps=abc"], 1, "bad value in config group 'trainer'"),
    (["data.seq_len=1000", "distributed.sequence_parallel_size=3"], 3, "not divisible by sequence_parallel_size 3"),
    (["distributed.sequence_parallel_size=2"], 3, "does not divide the world size 3"),
    (["distributed.sequence_parallel_size=2", "attention.segment_lengths=[512,3072]",
      "attention.dilation_rates=[1,2]"], 2, "segment length 3072 spans ranks but is not a multiple"),
    (["attention.dilation_rates=[1,2]"], 1, "must have the same length"),
    (["model.num_heads=3"], 1, "num_heads=3"),
    (["trainer.nonfinite_loss=ignore"], 1, "'ignore' is not one of"),
    (["trainer.profile_step=0"], 1, r"trainer.profile_step=0 must be an integer >= 1"),
    (["+deepspeed.optimizer.type=Adam"], 1, "deepspeed.optimizer -> set trainer.lr"),
    (["deepspeed.zero_optimization.stage=4"], 1, "stage=4 must be 0, 1, 2 or 3"),
    (["deepspeed=bf16", "deepspeed.zero_optimization.stage=0"], 1, "grad_accum_dtype=fp32 with bf16 needs"),
    (["deepspeed=bf16", "deepspeed.data_types.grad_accum_dtype=fp64"], 1, "grad_accum_dtype='fp64' must be"),
    (["logger.backend=tensorboard"], 1, "logger.backend='tensorboard'"),
    (["trainer.output_dir="], 1, r"trainer.output_dir='' is empty: the run would write its checkpoints"),
    (["resume=/no/such/checkpoint"], 1, "no such path"),
    (["trainer.peak_flops=fast"], 1, r"trainer.peak_flops='fast' must be 'auto' or a positive number"),
    (["trainer.peak_flops=-1"], 1, r"trainer.peak_flops=-1 must be 'auto' or a positive number"),
    (["trainer.peak_flops=inf"], 1, r"trainer.peak_flops=inf must be 'auto' or a positive finite number"),
    (["model.rotary_base=0"], 1, r"model rotary_base=0.0 must be a finite number > 0 \(the rotary frequency base"),
    (["model.rotary_base=-10000"], 1, r"model rotary_base=-10000.0 must be a finite number > 0"),
    (["model.rotary_base=nan"], 1, r"model rotary_base=nan must be a finite number > 0"),
    (["model.rotary_base=inf"], 1, r"model rotary_base=inf must be a finite number > 0"),
    (["model.tie_embeddings=no"], 1, r"model tie_embeddings='no' must be True or False \(whether the LM head shares"),
    (["model.init_std=-0.02"], 1, r"model init_std=-0.02 must be a finite number >= 0 \(the standard deviation of "
                                  r"the initial weights; e.g. 0.02\)"),
    (["model.init_std=nan"], 1, r"model init_std=nan must be a finite number >= 0"),
    (["model.mlp_hidden_dim=0"], 1, r"model mlp_hidden_dim=0 must be a positive integer, or None \(null in a "
                                    r"config: 4\*dim for gelu"),
    (["model.mlp_hidden_dim=-64"], 1, r"model mlp_hidden_dim=-64 must be a positive integer, or None"),
    (["trainer.lr=inf"], 1, r"trainer.lr=inf must be a finite number > 0"),
    (["trainer.lr=nan"], 1, r"trainer.lr=nan must be a finite number > 0"),
    (["trainer.lr=0"], 1, r"trainer.lr=0 must be a finite number > 0"),
    (["trainer.min_lr_ratio=1.5"], 1, r"trainer.min_lr_ratio=1.5 must be a finite number in \[0, 1\]"),
    (["trainer.eps=0"], 1, r"trainer.eps=0 must be a finite number > 0 \(AdamW's denominator term"),
    (["trainer.eps=-1e-8"], 1, r"trainer.eps=-1e-08 must be a finite number > 0"),
    (["trainer.eps=nan"], 1, r"trainer.eps=nan must be a finite number > 0"),
    (["trainer.weight_decay=-0.1"], 1, r"trainer.weight_decay=-0.1 must be a finite number >= 0"),
    (["trainer.weight_decay=nan"], 1, r"trainer.weight_decay=nan must be a finite number >= 0"),
    (["trainer.grad_clip=nan"], 1, r"trainer.grad_clip=nan must be a finite number >= 0 \(gradient 2-norm clip; 0 "
                                   r"disables it\)"),
    (["trainer.grad_clip=inf"], 1, r"trainer.grad_clip=inf must be a finite number >= 0"),
    (["trainer.grad_clip=-1"], 1, r"trainer.grad_clip=-1 must be a finite number >= 0"),
    (["trainer.seed=-1"], 1, r"trainer.seed=-1 must be an integer in \[0, 4294967295\]"),
    (["data.shuffle_seed=4294967296"], 1, r"data.shuffle_seed=4294967296 must be an integer in \[0, 4294967295\]"),
    (["data.split_seed=-3"], 1, r"data.split_seed=-3 must be an integer in \[0, 4294967295\]"),
    (["data.val_fraction=0"], 1, r"data.val_fraction=0 must be a finite number in \(0, 1\) \(the share of "
                                 r"documents"),
    (["data.val_fraction=1"], 1, r"data.val_fraction=1 must be a finite number in \(0, 1\)"),
    (["data.val_fraction=nan"], 1, r"data.val_fraction=nan must be a finite number in \(0, 1\)"),
    (["trainer.max_steps=2", "trainer.profile_step=3"], 1, r"trainer.profile_step=3 is after the last step "
                                                           r"\(trainer.max_steps=2\), so nothing would be profiled; "
                                                           r"use a step in \[1, 2\] or null"),
    (["distributed.backend=mpi"], 1, r"distributed.backend='mpi' is not one of \[None, 'gloo', 'nccl'\]"),
    (["distributed.backend=nccl"], 1, r"distributed.backend='nccl' needs CUDA and a torch built with NCCL \(CUDA is "
                                      r"not available\); use null"),
    (["attention.backend=tpu_flash"], 1, r"attention.backend='tpu_flash' is not one of \[None, 'cpu_flash', "
                                         r"'cuda_flash', 'chunked', 'triton'\]"),
    (["attention.backend=cuda_flash"], 1, r"attention.backend='cuda_flash' cannot run here: backend 'cuda_flash' "
                                          r"needs CUDA tensors, got device cpu \(the model runs on the CPU: CUDA is "
                                          r"not available\); use null \(the fastest kernel for the device\) or one "
                                          r"of \['cpu_flash', 'chunked'\]"),
    (["attention.backend=triton"], 1, r"attention.backend='triton' cannot run here: backend 'triton' needs CUDA "
                                      r"tensors and the triton package"),
])
def test_impossible_configs_raise_one_clear_value_error(overrides, world_size, message, monkeypatch):
    """Without CUDA (as on a CPU machine, so that the cases of backends that need it fail alike everywhere)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = make_config(*overrides)
    with pytest.raises(ValueError, match=message):
        validate_config(cfg, world_size=world_size)


def test_attention_backends_are_checked_against_the_device_the_model_will_use(monkeypatch):
    """With CUDA the model runs there (cpu_flash cannot), unless distributed.backend=gloo keeps it on the CPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"attention.backend='cpu_flash' cannot run here: backend 'cpu_flash' needs "
                                         r"CPU tensors, got device cuda \(the model runs on CUDA\)"):
        validate_config(make_config("attention.backend=cpu_flash"), world_size=1)
    validate_config(make_config("attention.backend=cpu_flash", "distributed.backend=gloo"), world_size=1)
    validate_config(make_config("attention.backend=cuda_flash"), world_size=1)
    with pytest.raises(ValueError, match=r"attention.backend='cuda_flash' cannot run here: .* \(the model runs on "
                                         r"the CPU: distributed.backend='gloo'\)"):
        validate_config(make_config("attention.backend=cuda_flash", "distributed.backend=gloo"), world_size=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend in ("cpu_flash", "chunked"):
        validate_config(make_config(f"attention.backend={backend}", "distributed.backend=gloo"), world_size=1)
    validate_config(make_config("model.mlp_hidden_dim=128", "model.init_std=0", "trainer.grad_clip=0",
                                "trainer.max_steps=5", "trainer.profile_step=5", "trainer.seed=4294967295"),
                    world_size=1)


def run_cli(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = on_the_cpu(repo_first_on_pythonpath(dict(os.environ, WANDB_MODE="disabled")))
    return subprocess.run([sys.executable, "-m", "longnet_dist.train", f"trainer.output_dir={tmp_path / 'run'}",
                           "logger=none", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override,message", [
    ("trainer.bogus=1", "Key 'bogus' is not in struct"),
    ("attention.dilation_rates=[1,2]", "must have the same length"),
])
def test_cli_rejects_bad_config_before_any_compute(override, message, tmp_path):
    result = run_cli(override, tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout, result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                                        ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA B200", 2250e12)])
def test_peak_flops_auto_finds_the_gpus_dense_bf16_peak(name, peak, monkeypatch):
    """trainer.peak_flops=auto (experiment=gpu_base's) on a GPU: its name's dense 16-bit peak, the more specific
    names first (an H100 PCIe is not an SXM H100, an L40S not an L4)."""
    import torch

    from longnet_dist.train.peak import resolve_peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert resolve_peak_flops("auto", torch.device("cuda", 0), sixteen_bit=True) == (peak, f"{name}, dense bf16")
    assert resolve_peak_flops(5e12, torch.device("cuda", 0), sixteen_bit=True) == (5e12, "trainer.peak_flops")


def test_peak_flops_auto_says_what_it_cannot_know(monkeypatch):
    import torch

    from longnet_dist.train.peak import resolve_peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    with pytest.raises(ValueError, match=r"does not know 'NVIDIA GeForce GTX 1080' \(known: B200, H200.*pass the "
                                         r"device's FLOP/s as a number"):
        resolve_peak_flops("auto", torch.device("cuda", 0), sixteen_bit=True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match="knows the 16-bit tensor-core peaks only, and this run is fp32"):
        resolve_peak_flops("auto", torch.device("cuda", 0), sixteen_bit=False)
    peak, source = resolve_peak_flops("auto", torch.device("cpu"), sixteen_bit=False)  # a timed fp32 matmul
    assert 1e9 < peak < 1e14 and source.startswith("fp32 2048^3 matmul on")


def test_a_missing_package_is_one_clear_error_before_any_work(monkeypatch, tmp_path):
    """wandb for the W&B logger, datasets for a file or hub corpus, tokenizers for a tokenizer.json: dependencies
    that a bare image may lack. check_packages (the trainer's first step after validate_config, which checks the
    config alone) names what needed the package, the install line and the alternative; prepare_corpus too."""
    from longnet_dist.data import prepare_corpus
    from longnet_dist.train.config import check_packages

    for name in ("wandb", "datasets", "tokenizers"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` fails, as where it is not installed
    cfg = make_config("logger=wandb", "logger.mode=offline")
    validate_config(cfg, world_size=1)
    with pytest.raises(ImportError, match=r"logger=wandb \(mode 'offline'\) needs the `wandb` package, which is not "
                                          r"installed: `pip install wandb`, or use logger=none"):
        check_packages(cfg)
    check_packages(make_config("logger=wandb", "logger.mode=disabled"))  # needs none of them
    for override, package in ((f"data.source={tmp_path}", "datasets"), (f"data.tokenizer={tmp_path / 't.json'}",
                                                                        "tokenizers")):
        key = override.split("=")[0]
        with pytest.raises(ImportError, match=rf"{key}='.*' needs the `{package}` package.*pip install {package}`, "
                                              rf"or use {key}="):
            check_packages(make_config("logger=none", override))
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ImportError, match=r"source='.*a.txt' \(local files\) needs the `datasets` package.*"
                                          r"pip install datasets`, or use source='stdlib'"):
        prepare_corpus(str(tmp_path / "a.txt"), cache_dir=tmp_path / "cache")


def test_the_cli_says_which_package_is_missing_in_one_line(tmp_path):
    """The entry point prints check_packages' error alone (no traceback) and exits before any work."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    env = repo_first_on_pythonpath(on_the_cpu(repo_first_on_pythonpath(dict(os.environ, WANDB_MODE="offline"))), blocker)
    result = subprocess.run([sys.executable, "-m", "longnet_dist.train", f"trainer.output_dir={tmp_path / 'run'}",
                             "logger=wandb"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("longnet-train: logger=wandb (mode 'offline') needs the `wandb` "
                                                      "package, which is not installed: `pip install wandb`, or use "
                                                      "logger=none"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_an_output_dir_that_is_a_file_is_one_line_before_hydra_makes_it(tmp_path):
    (tmp_path / "a_file").write_text("")
    for target in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        result = subprocess.run([sys.executable, "-m", "longnet_dist.train", f"trainer.output_dir={target}",
                                 "logger=none"], cwd=REPO, env=on_the_cpu(repo_first_on_pythonpath(dict(os.environ))),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip() == (f"longnet-train: invalid config: trainer.output_dir={str(target)!r}: "
                                         f"{tmp_path / 'a_file'} is a file, not a folder; name a folder for the run "
                                         f"(it is made if missing)")


def test_under_torchrun_the_failure_summary_names_the_error_of_each_rank(tmp_path):
    """torchrun prints a summary block after a worker fails; each rank's one-line error goes into its error file
    so that block gives the cause instead of a link to torchrun's docs."""
    from longnet_dist.distributed.testing import free_port

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                             "127.0.0.1", "--master_port", str(free_port()), "-m", "longnet_dist.train",
                             f"trainer.output_dir={tmp_path / 'run'}", "trainer.lr=-1", "logger=none"],
                            cwd=REPO, env=on_the_cpu(repo_first_on_pythonpath(dict(os.environ))), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    causes = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith("traceback :")]
    assert causes == ["traceback : longnet-train: invalid config: trainer.lr=-1 must be a finite number > 0"] * 2, \
        result.stderr[-3000:]


def test_the_error_file_holds_a_user_error_line_and_an_unexpected_traceback(tmp_path, monkeypatch):
    import json

    from longnet_dist.train import __main__ as cli

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with pytest.raises(SystemExit, match="^longnet-train: bad value$"):
        cli._exit("longnet-train: bad value")
    assert json.loads(error_file.read_text())["message"] == "longnet-train: bad value"
    error_file.unlink()
    try:
        raise RuntimeError("kernel failed")
    except RuntimeError as error:
        cli._record_for_torchrun(error)
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["message"] == "RuntimeError: kernel failed"
    assert 'raise RuntimeError("kernel failed")' in recorded["extraInfo"]["py_callstack"]
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    error_file.unlink()
    with pytest.raises(SystemExit):
        cli._exit("longnet-train: bad value")  # not under torchrun: no file
    assert not error_file.exists()
