"""A run directory keeps what it holds: a fresh start never writes over another run's checkpoints, a resume
refuses a checkpoint of another model or optimizer layout (and leaves the run's config.yaml as it was), and
weights that went NaN or inf are never saved over good checkpoints. Unit checks, then the CLI end to end."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from longnet_dist.train.faults import NonFiniteWeightsError, check_finite_weights
from longnet_dist.train.run_dir import check_fresh_start, check_resume_compatible
from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath


def test_a_fresh_start_over_another_runs_checkpoints_is_refused(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    check_fresh_start(None, None, root)  # nothing there yet
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000004").mkdir()
    with pytest.raises(ValueError, match=r"trainer.output_dir='.*run' already holds the checkpoints of a run \(newest "
                                         r"step_00000004\); a fresh run \(resume=null\) would mix.*Use resume=auto"):
        check_fresh_start(None, None, root)
    with pytest.raises(ValueError, match=r"a run from .*elsewhere/step_00000009 would mix"):
        check_fresh_start(str(tmp_path / "elsewhere"), tmp_path / "elsewhere" / "step_00000009", root)
    check_fresh_start("auto", root / "step_00000004", root)  # continues it
    check_fresh_start(str(root / "step_00000002"), root / "step_00000002", root)  # a roll-back within the run


def test_a_resume_with_another_model_or_optimizer_layout_names_every_difference(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    saved = {"model": {"dim": 64, "num_layers": 2, "num_heads": 2, "mlp": "swiglu", "mlp_hidden_dim": None,
                       "norm": "rmsnorm", "tie_embeddings": True, "compile": "auto"},
             "data": {"tokenizer": "bytes"}, "deepspeed": {"zero_optimization": {"stage": 0}}}
    OmegaConf.save(OmegaConf.create(saved), run / "config.yaml")
    now = OmegaConf.create(saved)
    now.model.compile = False  # not a layout change
    check_resume_compatible(run / "checkpoints" / "step_00000002", now)
    now.model.num_layers, now.deepspeed.zero_optimization.stage = 3, 1
    with pytest.raises(ValueError, match=r"cannot resume from .*step_00000002: model.num_layers: 2 in the checkpoint's "
                                         r"run, 3 now; deepspeed.zero_optimization.stage: 0 in the checkpoint's run, 1 "
                                         r"now \(see .*config.yaml\)"):
        check_resume_compatible(run / "checkpoints" / "step_00000002", now)
    check_resume_compatible(tmp_path / "copied" / "step_00000002", now)  # no run config beside it: nothing to compare


def test_a_zero_checkpoint_resumes_only_on_as_many_processes_as_wrote_it(tmp_path):
    folder = tmp_path / "copied" / "step_00000002"
    folder.mkdir(parents=True)
    manifest = json.dumps({"world_size": 2, "files": {}}).encode()
    (folder / "manifest.json").write_bytes(manifest)
    (folder / "COMPLETE").write_text(hashlib.sha256(manifest).hexdigest())
    config = OmegaConf.create({"deepspeed": {"zero_optimization": {"stage": 1}}})
    check_resume_compatible(folder, config, world_size=2)
    with pytest.raises(ValueError, match=r"cannot resume from .*step_00000002: 2 processes wrote its ZeRO-1 partitions, "
                                         r"this run has 4 \(see .*manifest.json\)"):
        check_resume_compatible(folder, config, world_size=4)
    config.deepspeed.zero_optimization.stage = 0  # whole optimizer state in every rank's file: any world size
    check_resume_compatible(folder, config, world_size=4)


def test_weights_that_went_nan_or_inf_are_never_saved():
    layer = torch.nn.Linear(3, 2)
    check_finite_weights(layer, 5, None)
    with torch.no_grad():
        layer.bias[1] = math.inf
    with pytest.raises(NonFiniteWeightsError, match=r"step 5: parameter bias \(rank 0\) holds NaN or inf after the "
                                                    r"update, so no checkpoint was saved; the last one is .*step_3"):
        check_finite_weights(layer, 5, Path("run/checkpoints/step_3"))


def train(run: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = on_the_cpu(repo_first_on_pythonpath(dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1",
                                                   **(env or {}))))
    return subprocess.run([sys.executable, "-m", "longnet_dist.train", f"trainer.output_dir={run}", "model=tiny",
                           "data.seq_len=256", "attention.segment_lengths=[64,128,256]",
                           "attention.dilation_rates=[1,2,4]", "trainer.max_steps=2", "trainer.eval_every=0",
                           "logger=none", "trainer.num_threads=1", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and ".hydra" not in path.parts}


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_cli_refuses_in_one_line_and_the_run_directory_keeps_every_byte(tmp_path):
    run = tmp_path / "run"
    first = train(run)
    assert first.returncode == 0, first.stderr[-3000:]
    before = digest(run)
    assert "checkpoints/step_00000002/manifest.json" in before and "config.yaml" in before
    refused = [train(run, "resume=null"), train(run, "model.num_layers=3"), train(run, "deepspeed=zero1")]
    for result, message in zip(refused, ("already holds the checkpoints of a run (newest step_00000002)",
                                         "model.num_layers: 2 in the checkpoint's run, 3 now",
                                         "deepspeed.zero_optimization.stage: 0 in the checkpoint's run, 1 now")):
        assert result.returncode == 1, result.stderr[-3000:]
        assert last_line(result).startswith("longnet-train: ValueError: ") and message in last_line(result)
        assert "Traceback" not in result.stderr
    # another batch or seq_len: the data position would mean other windows; refused before the engine is built
    batch = train(run, "data.micro_batch_size=2", env={"LONGNET_TRACEBACK": "1"})
    assert batch.returncode == 1 and ("ValueError: cannot resume the data position of " in batch.stderr
                                      and "global_batch (data.micro_batch_size x data-parallel size): 1 in " in
                                      batch.stderr and ", 2 now" in batch.stderr), batch.stderr[-3000:]
    assert "_decided_by_rank0" in batch.stderr and "load_checkpoint" not in batch.stderr  # where it was refused
    assert digest(run) == before  # checkpoints, metrics and config.yaml as the first run left them
    unstable = train(tmp_path / "unstable", "trainer.lr=1e9")  # NaN weights after the last update, losses finite
    assert unstable.returncode == 1 and "NonFiniteWeightsError: step 2: parameter" in last_line(unstable), \
        unstable.stderr[-3000:]
    assert not (tmp_path / "unstable" / "checkpoints" / "step_00000002").exists()


@pytest.mark.slow
def test_a_resume_with_a_longer_schedule_takes_its_lr_and_counts_tokens_as_they_ran(tmp_path):
    """Continuing past the end (max_steps 4 -> 6) with twice the gradient accumulation: step 5 takes the new
    schedule's lr (that of a 6-step run at step 5, not the 4-step run's last one, which the loaded optimizer state
    holds) and tokens_seen adds each step's own tokens (4 x 256, then 2 x 512)."""
    def logged(run: Path) -> dict[int, dict]:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {line["step"]: line for line in lines if "lr" in line}

    run, fresh = tmp_path / "run", tmp_path / "fresh"
    for result in (train(run, "trainer.max_steps=4", "trainer.log_every=1"),
                   train(run, "trainer.max_steps=6", "trainer.log_every=1", "trainer.gradient_accumulation_steps=2"),
                   train(fresh, "trainer.max_steps=6", "trainer.log_every=1")):
        assert result.returncode == 0, result.stderr[-3000:]
    continued, expected = logged(run), logged(fresh)
    assert continued[5]["lr"] == expected[5]["lr"] and continued[6]["lr"] == expected[6]["lr"]
    assert continued[4]["lr"] != expected[4]["lr"]  # the 4-step schedule had reached its floor
    assert [continued[step]["tokens_seen"] for step in (4, 5, 6)] == [1024, 1536, 2048]
