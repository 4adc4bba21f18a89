"""Inference from training checkpoints: from_checkpoint, longnet-export, exact decoding, the generate CLI.

Checkpoints are written by the trainer's own engine and checkpoint code (train/engine.py,
train/checkpoint.py) around a tiny LongNetLM after one optimizer step: ZeRO-0 and ZeRO-2 in one process, ZeRO-3 in two
gloo processes (its model-state files then hold placeholders only).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longnet_dist.distributed.testing import run_multiprocess
from longnet_dist.generate import generate_ids, generate_text
from longnet_dist.model import LongNetConfig, LongNetLM
from longnet_dist.model.io import save_exported
from longnet_dist.train.__main__ import CONFIG_DIR
from longnet_dist.train.checkpoint import CheckpointError, CorruptCheckpointError
from longnet_dist.train.export import export
from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath

IDS = torch.arange(40).remainder(200).view(1, 40) + 30  # (1, 40) byte ids: 40 rows cross the 16-row segments
GENERATE_DEFAULTS = OmegaConf.load(CONFIG_DIR / "generate.yaml")


def run_config(zero: str) -> dict:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", "data.seq_len=64", "attention.segment_lengths=[16,64]",
                                          "attention.dilation_rates=[1,2]", f"deepspeed={zero}", "logger=none"])
    return OmegaConf.to_container(cfg, resolve=True)


def _train_one_step_and_save(rank: int, world: int, run_dir: str, config: dict) -> torch.Tensor:
    """Every rank: engine as the trainer builds it, one step, save_checkpoint; returns logits of IDS."""
    from longnet_dist.train.checkpoint import save_checkpoint
    from longnet_dist.train.config import deepspeed_config, model_config
    from longnet_dist.train.engine import build_engine

    cfg = OmegaConf.create(config)
    torch.manual_seed(0)
    engine = build_engine(LongNetLM(model_config(cfg, vocab_size=258)), deepspeed_config(cfg))
    engine.backward(engine(IDS, labels=IDS).mean())
    engine.step()
    save_checkpoint(engine, Path(run_dir) / "checkpoints", 1, {"step": 1, "config": config})
    engine.eval()
    with torch.no_grad():
        return engine(IDS)  # ZeRO-3 gathers the partitioned weights for the forward


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """{zero: (run directory with checkpoints/step_00000001, logits of IDS of the trained model)}."""
    runs = {}
    for zero, world in (("zero0", 1), ("zero2", 1), ("zero3", 2)):
        run_dir = tmp_path_factory.mktemp(zero)
        logits = run_multiprocess(_train_one_step_and_save, world, str(run_dir), run_config(zero), timeout=120)
        runs[zero] = (run_dir, logits[0])
    return runs


@pytest.mark.parametrize("zero", ["zero0", "zero2", "zero3"])
def test_from_checkpoint_gives_the_trained_models_logits(run_dirs, zero):
    run_dir, expected = run_dirs[zero]
    for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "step_00000001"):
        model = LongNetLM.from_checkpoint(path)
        assert not model.training and next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-6)


def test_a_bf16_checkpoint_exports_its_fp32_master_weights(tmp_path):
    """`deepspeed=bf16` (the GPU default: DeepSpeed's BF16_Optimizer, ZeRO-1) on two ranks: its optimizer files
    are not ones zero_to_fp32 reads ("not a zero checkpoint"), so export and generate failed on them. The fp32
    masters joined from both ranks' partitions round to exactly the bf16 weights the engine trained with."""
    from longnet_dist.train.export import checkpoint_weights

    run_multiprocess(_train_one_step_and_save, 2, str(tmp_path / "run"), run_config("bf16"), timeout=120)
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert len(list(folder.glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2
    weights, _ = checkpoint_weights(folder)
    trained = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert set(weights) == set(trained) and all(weights[name].dtype == torch.float32 for name in weights)
    assert all(torch.equal(weights[name].bfloat16(), trained[name]) for name in trained)
    assert any(not torch.equal(weights[name], trained[name].float()) for name in trained)  # more than bf16 holds
    exported = export(tmp_path / "run", tmp_path / "exported")
    with torch.no_grad():
        torch.testing.assert_close(LongNetLM.from_checkpoint(exported)(IDS), LongNetLM.from_checkpoint(folder)(IDS),
                                   rtol=0, atol=0)
    # unpickling its optimizer files imports DeepSpeed, whose accelerator warning went to stdout before the text
    # where nothing names the accelerator (a CPU machine: no GPU, no DS_ACCELERATOR)
    environment = {key: value for key, value in on_the_cpu(repo_first_on_pythonpath(dict(os.environ))).items()
                   if key != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-m", "longnet_dist.generate", f"checkpoint={tmp_path / 'run'}", "prompt=ab",
                             "max_new_tokens=3", "temperature=0"], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("ab"), result.stdout + result.stderr[-2000:]
    assert "accelerator" not in result.stdout + result.stderr


def test_export_keeps_what_is_there_and_reads_only_intact_checkpoints(run_dirs, tmp_path):
    """longnet-export refuses to replace an export (unless --overwrite) or to write into a file, and a checkpoint
    with one byte changed (same size) is caught by its sha256 before the unpickler sees it; each one line."""
    from longnet_dist.export import main

    run_dir, _ = run_dirs["zero0"]
    main([str(run_dir), str(tmp_path / "out")])
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"longnet-export: out_dir '.*out' already holds an exported model.*"
                                         r"pass --overwrite"):
        main([str(run_dir), str(tmp_path / "out")])
    main([str(run_dir), str(tmp_path / "out"), "--overwrite"])
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before  # the same checkpoint, the same bytes
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"longnet-export: out_dir '.*a_file' is a file"):
        main([str(run_dir), str(tmp_path / "a_file")])
    with pytest.raises(SystemExit, match=r"longnet-export: cannot write the export into '/proc/.*"):
        main([str(run_dir), "/proc/longnet_export_test"])
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    weights = damaged / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"longnet-export: .*mp_rank_00_model_states.pt.*sha256"):
        main([str(damaged / "checkpoints" / "step_00000001"), str(tmp_path / "out2")])


def test_export_loads_without_deepspeed_and_gives_identical_logits(run_dirs, tmp_path):
    run_dir, expected = run_dirs["zero3"]
    export(run_dir, tmp_path / "exported")
    assert sorted(path.name for path in (tmp_path / "exported").iterdir()) == ["config.json", "model.safetensors"]
    script = (  # a fresh interpreter in which importing deepspeed fails
        "import sys, torch; sys.modules['deepspeed'] = None\n"
        "from longnet_dist.model import LongNetLM\n"
        f"model = LongNetLM.from_checkpoint({str(tmp_path / 'exported')!r})\n"
        f"ids = torch.arange(40).remainder(200).view(1, 40) + 30\n"
        f"torch.save(model(ids).detach(), {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(name.startswith('deepspeed') for name in sys.modules if sys.modules[name] is not None)\n")
    env = repo_first_on_pythonpath(dict(os.environ, OMP_NUM_THREADS="1"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        exact = LongNetLM.from_checkpoint(run_dir)(IDS)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), exact)  # export is lossless


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is ~50x faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_generated_step_has_the_logits_of_a_full_forward_pass(one_thread, use_cache):
    torch.manual_seed(0)
    config = LongNetConfig(vocab_size=50, dim=32, num_layers=2, num_heads=4, segment_lengths=[4, 8, 16],
                           dilation_rates=[1, 2, 4])  # ragged segments and every head offset get exercised
    model = LongNetLM(config).double().eval()
    prompt = [3, 1, 4, 1, 5]
    for temperature, top_k in ((0.8, 5), (0.0, None)):
        step_logits: list[torch.Tensor] = []
        new = generate_ids(model, prompt, 20, temperature=temperature, top_k=top_k, seed=1, step_logits=step_logits,
                           use_cache=use_cache)
        assert len(new) == len(step_logits) == 20
        with torch.no_grad():
            full = model(torch.tensor([prompt + new]))[0]  # (25, V) one pass over the whole text
        for step, logits in enumerate(step_logits):
            torch.testing.assert_close(logits, full[len(prompt) - 1 + step], rtol=0, atol=1e-12)
        if temperature == 0:
            assert new == [int(row.argmax()) for row in step_logits]
        if top_k:
            assert all(int((row > row[token]).sum()) < top_k for row, token in zip(step_logits, new))
    assert generate_ids(model, prompt, 5, temperature=1.0, seed=7) == generate_ids(model, prompt, 5, temperature=1.0,
                                                                                     seed=7)


def cli(*overrides: str) -> subprocess.CompletedProcess:
    env = on_the_cpu(repo_first_on_pythonpath(dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")))
    return subprocess.run([sys.executable, "-m", "longnet_dist.generate", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("zero", ["zero0", "zero3"])
def test_cli_prints_text(run_dirs, zero):
    result = cli(f"checkpoint={run_dirs[zero][0]}", "prompt=def main(", "max_new_tokens=12", "top_k=50")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def main(") and len(result.stdout) > len("def main(\n")
    assert not (REPO / ".hydra").exists() and not (REPO / "generate.log").exists()  # stdout only


def test_bad_inputs_give_clear_errors(run_dirs, tmp_path):
    run_dir = run_dirs["zero0"][0]

    def message(**overrides) -> str:
        cfg = OmegaConf.merge(GENERATE_DEFAULTS, {"checkpoint": str(run_dir), "max_new_tokens": 4}, overrides)
        with pytest.raises((ValueError, CheckpointError)) as error:
            generate_text(cfg)
        return str(error.value)

    assert "temperature=-1" in message(temperature=-1) and ">= 0" in message(temperature=-1)
    assert "top_k=-2" in message(top_k=-2)
    assert "max_new_tokens=0" in message(max_new_tokens=0)
    assert "does not exist" in message(checkpoint=str(tmp_path / "nowhere"))
    assert "max_length=64" in message(max_new_tokens=100)  # 4 prompt tokens + 100 > the training seq_len 64
    unfinished = tmp_path / "run" / "checkpoints" / "step_00000001"
    shutil.copytree(run_dir / "checkpoints" / "step_00000001", unfinished)
    (unfinished / "COMPLETE").unlink()
    assert "COMPLETE is missing" in message(checkpoint=str(unfinished))
    with pytest.raises(CorruptCheckpointError):
        LongNetLM.from_checkpoint(unfinished)
    assert "no complete checkpoint" in message(checkpoint=str(tmp_path / "run"))
    # a model whose vocabulary is smaller than the tokenizer's: 'z' (122) is outside 0..99
    small = LongNetLM(LongNetConfig(vocab_size=100, dim=16, num_layers=1, num_heads=2, segment_lengths=[8],
                                    dilation_rates=[1]))
    save_exported(small, tmp_path / "small", {"tokenizer": "bytes", "seq_len": 64, "step": 0, "source": "test"})
    text = message(checkpoint=str(tmp_path / "small"), prompt="zz")
    assert "[122]" in text and "0..99" in text
    text = message(checkpoint=str(tmp_path / "small"), prompt="ab")  # in range, but eod and pad are not
    assert "tokenizer 'bytes' has eod_id=" in text and "outside the model's vocabulary 0..99" in text, text
    assert "seed='abc' must be an integer or null" in message(seed="abc")
    assert "stop_at_eod='maybe' must be true or false" in message(stop_at_eod="maybe")
    assert "use_cache=1 must be true or false" in message(use_cache=1)
    damaged = tmp_path / "damaged"  # an exported folder whose files were damaged
    shutil.copytree(tmp_path / "small", damaged)
    (damaged / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "model.safetensors cannot be read" in message(checkpoint=str(damaged))
    (damaged / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in message(checkpoint=str(damaged))
    result = cli(f"checkpoint={tmp_path / 'nowhere'}")
    assert result.returncode != 0 and "longnet-generate:" in result.stderr and "does not exist" in result.stderr
