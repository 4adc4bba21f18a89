"""A resumed run continues its W&B run: one run id per run directory, offline files that say so.

Also the end-to-end check of attention=geometric: the lists come from data.seq_len, are printed at
start and saved in the run's config.yaml.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath

pytestmark = pytest.mark.slow
pytest.importorskip("wandb")  # a dependency; a bare GPU image may lack it (`make gpu-suite`)
STEPS = 4
TINY = ["model=tiny", "data.seq_len=256", "attention=geometric", "attention.base_segment_length=64",
        "trainer.warmup_steps=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=100",
        "trainer.num_threads=1", "logger=wandb", "logger.mode=offline"]


def train(output_dir: Path, *overrides: str, run_id: str | None = None) -> str:
    env = on_the_cpu(repo_first_on_pythonpath(dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true",
                                                   OMP_NUM_THREADS="1")))
    env.pop("WANDB_RUN_ID", None)
    if run_id is not None:
        env["WANDB_RUN_ID"] = run_id
    command = [sys.executable, "-m", "longnet_dist.train", f"trainer.output_dir={output_dir}", *TINY, *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def wandb_records(path: Path):
    """The protobuf records of a W&B .wandb file (LevelDB log format: 7-byte file header, 32 KiB
    blocks, each record chunk behind a 7-byte header: crc32, length, type 1 full/2 first/3 middle/4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending = path.read_bytes(), 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left in the block for a header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_part(folder: Path) -> tuple[set[str], list[int]]:
    """({run ids in the run records}, [logged steps]) of one offline-run-* folder."""
    (wandb_file,) = folder.glob("run-*.wandb")
    run_ids, steps = set(), []
    for record in wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "run":
            run_ids.add(record.run.run_id)
        elif record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: item.value_json for item in record.history.item}
            if "train/loss" in items:
                steps.append(int(items["_step"]))
    return run_ids, steps


def test_resume_continues_the_same_wandb_run_offline(tmp_path):
    first = train(tmp_path, f"trainer.max_steps={STEPS}", run_id="job-1")  # as slurm/train.sbatch sets it
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run_id == "job-1"
    # resumed by a later job with another WANDB_RUN_ID: the run directory's id wins
    second = train(tmp_path, f"trainer.max_steps={2 * STEPS}", run_id="job-2")
    assert "resumed from" in second and "WANDB_RUN_ID=job-2 ignored" in second
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    parts = sorted((tmp_path / "wandb").glob("offline-run-*"), key=lambda folder: folder.stat().st_mtime)
    assert len(parts) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in parts)
    assert offline_part(parts[0]) == ({run_id}, list(range(1, STEPS + 1)))
    assert offline_part(parts[1]) == ({run_id}, list(range(STEPS + 1, 2 * STEPS + 1)))
    assert f"wandb sync {tmp_path / 'wandb'}/offline-run-*-{run_id}" in second
    # attention=geometric: lists from seq_len 256 and base 64, printed and saved
    for output in (first, second):
        assert "segment_lengths [64, 128, 256], dilation_rates [1, 2, 4] (geometric" in output
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["attention"]
    assert saved["segment_lengths"] == [64, 128, 256] and saved["dilation_rates"] == [1, 2, 4]


def test_a_fresh_start_in_the_same_directory_is_a_new_run(tmp_path):
    train(tmp_path, "trainer.max_steps=1")
    first_id = (tmp_path / "wandb_run_id").read_text().strip()
    shutil.rmtree(tmp_path / "checkpoints")  # the way to start over in a run directory (else the start is refused)
    train(tmp_path, "trainer.max_steps=1", "resume=null")
    second_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert second_id != first_id
    assert sorted(folder.name.rsplit("-", 1)[1] for folder in (tmp_path / "wandb").glob("offline-run-*")) == sorted(
        [first_id, second_id])
