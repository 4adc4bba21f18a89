"""`init_from`: a fresh run from another run's weights (train/init_weights.py).

Units: the weights arrive exactly (an exported folder), a model of another shape or another tokenizer is refused
before any weight is copied, a path that does not exist fails the config check. End to end: a run at seq_len 256
continues as a fresh run at seq_len 512 (two processes, ZeRO-1: a resume of it would be refused on each count),
and once that run has a checkpoint of its own a rerun resumes it instead of starting over.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longnet_dist.distributed.testing import free_port
from longnet_dist.model import LongNetConfig, LongNetLM
from longnet_dist.model.io import save_exported
from longnet_dist.train.init_weights import load_initial_weights, resolve_init_source, tokenizer_id
from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath


def tiny(seed: int, **changes) -> LongNetLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=258, dim=32, num_layers=2, num_heads=2, segment_lengths=[64], dilation_rates=[1])
    return LongNetLM(LongNetConfig(**{**fields, **changes}))


def exported(tmp_path: Path, model: LongNetLM, tokenizer: str = "bytes") -> Path:
    return save_exported(model, tmp_path / "export", {"tokenizer": tokenizer, "seq_len": 256, "step": 7,
                                                     "source": "test"})


def test_the_weights_arrive_exactly_and_the_branches_may_differ(tmp_path):
    donor = tiny(0)
    folder = exported(tmp_path, donor)
    assert resolve_init_source(str(folder)) == folder
    model = tiny(1, segment_lengths=[128, 256], dilation_rates=[1, 2], rotary_base=5e5)  # attention may change
    meta, weights = load_initial_weights(model, folder, tokenizer="bytes", tokenizer_name="bytes")
    assert (meta["step"], meta["seq_len"]) == (7, 256)
    theirs = donor.state_dict()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in model.state_dict().items())
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in weights.items())


def test_another_model_shape_or_tokenizer_is_refused_before_a_weight_is_copied(tmp_path):
    folder = exported(tmp_path, tiny(0))
    model = tiny(1, num_layers=3, mlp="gelu")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"init_from='.*export': its weights do not fit this run's model: model "
                                         r"num_layers: 2 there, 3 here; model mlp: 'swiglu' there, 'gelu' here\. Set "
                                         r"these as that run had them"):
        load_initial_weights(model, folder, tokenizer="bytes", tokenizer_name="bytes")
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    vocab = tmp_path / "tokenizer.json"
    vocab.write_text("{}")
    name = tokenizer_id(str(vocab))
    assert name.startswith("hf-") and tokenizer_id(str(tmp_path / "elsewhere.json")) is None
    with pytest.raises(ValueError, match=r"data.tokenizer: 'bytes' \(bytes\) there, '.*tokenizer.json' \(hf-\w{16}\) "
                                         r"here: another vocabulary"):
        load_initial_weights(tiny(1), folder, tokenizer=str(vocab), tokenizer_name=name)


def test_config_errors_and_a_missing_source():
    """An empty init_from or one beside an explicit resume path fails the config check; a path that does not exist
    fails where a fresh start resolves it (a rerun that resumes its own checkpoints never looks for it)."""
    from hydra import compose, initialize_config_dir

    from longnet_dist.train.__main__ import CONFIG_DIR
    from longnet_dist.train.config import validate_config

    def config(*overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=[*overrides, "logger=none"])

    validate_config(config("init_from=/no/such/run"))
    with pytest.raises(ValueError, match=r"init_from='/no/such/run': no such path; use null"):
        resolve_init_source("/no/such/run")
    with pytest.raises(ValueError, match=r"init_from='': use null \(weights initialised at random\) or the path"):
        validate_config(config("init_from=''"))
    with pytest.raises(ValueError, match=r"resume='/tmp' and init_from='/tmp': a resume continues that checkpoint's "
                                         r"weights and optimizer, so init_from would be ignored"):
        validate_config(config("init_from=/tmp", "resume=/tmp"))


TINY = ["model=tiny", "attention.segment_lengths=[64,128,256]", "attention.dilation_rates=[1,2,4]",
        "trainer.eval_every=0", "trainer.log_every=1", "trainer.warmup_steps=1", "trainer.num_threads=1",
        "logger=none"]


def train(run: Path, *overrides: str, nproc: int = 1) -> str:
    env = on_the_cpu(repo_first_on_pythonpath(dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")))
    module = ["-m", "longnet_dist.train", f"trainer.output_dir={run}", *TINY, *overrides]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())] if nproc > 1 else []
    result = subprocess.run([sys.executable, *launcher, *module], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def first_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(record["loss"] for record in records if record.get("step") == 1 and "loss" in record)


@pytest.mark.slow
def test_a_run_continues_at_a_longer_seq_len_from_another_runs_weights(tmp_path):
    train(tmp_path / "short", "data.seq_len=256", "trainer.max_steps=12")
    longer = ["data.seq_len=512", "data.micro_batch_size=1", "deepspeed=zero1", "trainer.max_steps=2"]
    log = train(tmp_path / "long", *longer, f"init_from={tmp_path / 'short'}", nproc=2)
    assert f"weights from {tmp_path / 'short' / 'checkpoints' / 'step_00000012'} (step 12, seq_len 256)" in log
    fresh = train(tmp_path / "fresh", *longer, nproc=2)
    assert "weights from" not in fresh
    # same data, same order: the trained weights start 0.6 nats lower than a random start (measured 4.36 vs 5.33)
    assert first_loss(tmp_path / "long") < first_loss(tmp_path / "fresh") - 0.5
    (tmp_path / "short").rename(tmp_path / "gone")  # a requeued job needs its own checkpoints only
    again = train(tmp_path / "long", *longer[:-1], "trainer.max_steps=3", f"init_from={tmp_path / 'short'}",
                  nproc=2)
    assert "resumed from" in again and "weights from" not in again  # its own checkpoint wins over init_from


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["deepspeed=bf16"], ["deepspeed=zero2", "deepspeed.bf16.enabled=true"]])
def test_a_bf16_run_starts_from_the_fp32_weights_not_their_rounding(tmp_path, engine):
    """A 16-bit engine builds its fp32 master weights from the module cast to bf16; init_from writes the source's fp32
    values into them (BF16_Optimizer, and ZeRO-2's optimizer, two ranks each holding a partition). With lr 1e-30 one
    step changes no fp32 value, so the saved masters equal the source's weights bit for bit (rounded: off by up to
    4e-3)."""
    from longnet_dist.train.export import checkpoint_weights

    train(tmp_path / "fp32", "data.seq_len=256", "trainer.max_steps=3")
    train(tmp_path / "bf16", "data.seq_len=256", "trainer.max_steps=1", "trainer.lr=1e-30", *engine,
          f"init_from={tmp_path / 'fp32'}", nproc=2)
    source, _ = checkpoint_weights(tmp_path / "fp32" / "checkpoints" / "step_00000003")
    masters, _ = checkpoint_weights(tmp_path / "bf16" / "checkpoints" / "step_00000001")
    assert set(masters) <= set(source)
    assert all(torch.equal(masters[name], source[name]) for name in masters)
    assert any(not torch.equal(source[name].bfloat16().float(), source[name]) for name in masters)  # bf16 would differ
