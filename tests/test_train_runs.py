"""End-to-end runs of `python -m longnet_dist.train` (tiny model, 256-token windows of the stdlib corpus).

One single-process run is the reference; sequence-parallel runs (2 processes, sp=2, every ZeRO stage),
a data-parallel run and a resumed run must reproduce its losses.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longnet_dist.distributed.testing import free_port
from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath

pytestmark = pytest.mark.slow
STEPS = 12
# Branch 256 spans both ranks of sp=2 (128 rows each), so the sharded attention path runs.
TINY = ["model=tiny", "data.seq_len=256", "attention.segment_lengths=[64,128,256]", "attention.dilation_rates=[1,2,4]",
        f"trainer.max_steps={STEPS}", "trainer.warmup_steps=3", "trainer.log_every=1", "trainer.eval_every=6",
        "trainer.eval_batches=2", "trainer.save_every=6", "trainer.num_threads=1", "logger=none"]
# fp32 on CPU: sharded attention and ZeRO's reductions add the same terms in another order, so losses
# agree to ~1e-7 relative (measured); Adam's division by sqrt(v) can amplify that a little over 12 steps.
LOSS_RTOL = 1e-5
# Weights after 12 steps, per tensor, as ||difference|| / ||weight|| (observed <= 3.5e-6): Adam moves a
# weight whose gradient is ~0 by its rounding alone, so single entries differ by up to ~1e-4 of the
# tensor's largest (observed 1.1e-4 in mlp.down), which a per-entry bound would have to allow anyway.
PARAM_RTOL = 2e-5


def launch(output_dir: Path, *overrides: str, nproc: int = 1, wait: bool = True):
    env = on_the_cpu(repo_first_on_pythonpath(dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")))
    module = ["-m", "longnet_dist.train", f"trainer.output_dir={output_dir}", *TINY, *overrides]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *module]
    else:
        command = [sys.executable, *module]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    return output


def records(output_dir: Path, key: str = "loss") -> tuple[dict[int, float], dict[int, float]]:
    """({step: train `key`}, {step: eval loss}) from metrics.jsonl."""
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r[key] for r in lines if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}
    return train, evals


def assert_same_training(run: Path, expected: Path) -> None:
    """Same losses, and same gradient norms: Adam and clipping would hide a gradient off by a constant
    factor (e.g. a wrong loss scale for DeepSpeed's averaging) from the losses, not from the norm."""
    for key in ("loss", "grad_norm"):
        assert records(run, key)[0] == pytest.approx(records(expected, key)[0], rel=LOSS_RTOL), key


def assert_resumed_at_step_6_repeats(resumed: Path, original: Path) -> None:
    """A run resumed from step 6 logged steps 7..STEPS, each loss exactly the original run's (same ops, same
    order, CPU)."""
    train, expected = records(resumed)[0], records(original)[0]
    assert sorted(train) == list(range(7, STEPS + 1))
    assert train == {step: expected[step] for step in train}


def model_weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = output_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("reference")
    launch(output_dir)
    return output_dir


def test_loss_falls_and_run_directory_is_complete(reference):
    train, evals = records(reference)
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(evals) == [6, 12]
    assert max(train[s] for s in (10, 11, 12)) < train[1] - 0.3, train  # from ~5.3 nats (uniform: ln 258 = 5.55)
    assert evals[12] < evals[6] - 0.1, evals
    record = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "bits_per_byte", "tokens_per_s", "mfu", "lr", "grad_norm", "attn_comm_bytes_per_step",
                "peak_mem_bytes"):
        assert key in record
    assert (reference / "config.yaml").is_file() and (reference / ".hydra" / "config.yaml").is_file()
    assert (reference / "checkpoints" / "step_00000012" / "COMPLETE").is_file()
    table = json.loads((reference / "eval" / "step_00000012.json").read_text())["buckets"]
    assert [row["position_start"] for row in table] == [0, 2, 4, 8, 16, 32, 64, 128]
    assert (reference / "eval" / "step_00000012.csv").is_file()


@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3"])
def test_sequence_parallel_run_matches_single_process(reference, zero, tmp_path):
    # ZeRO-3 also runs with activation checkpointing and a chunked MLP and loss (the memory savers)
    savers = ["model.activation_checkpointing=true", "model.token_chunk_size=48"] if zero == "zero3" else []
    launch(tmp_path, "distributed.sequence_parallel_size=2", f"deepspeed={zero}", *savers, nproc=2)
    assert_same_training(tmp_path, reference)
    assert records(tmp_path)[1] == pytest.approx(records(reference)[1], rel=LOSS_RTOL)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["attn_comm_bytes_per_step"] > 0 for r in lines if "loss" in r)  # the 256 branch is sharded
    if zero == "zero0":  # stage 0 checkpoints hold whole weights
        expected_weights = model_weights(reference, STEPS)
        for name, weight in model_weights(tmp_path, STEPS).items():
            expected = expected_weights[name]
            assert (weight - expected).norm() <= PARAM_RTOL * expected.norm(), name


def test_bf16_optimizer_tracks_fp32_and_resumes_bit_identically(reference, tmp_path):
    """`deepspeed=bf16`, the GPU default (ZeRO-1, bf16 weights, fp32 master weights and gradient accumulation:
    DeepSpeed's BF16_Optimizer), on 2 processes with sp=2: the log names the wrapper; losses and gradient norms
    stay within bf16 rounding of the fp32 reference (observed 5e-4 and 2.6e-3 relative: a loss averages 256
    tokens' roundings of 2^-8, a norm fewer); resumed from step 6 it reproduces steps 7-12 bit-identically.
    MFU against trainer.peak_flops=auto: on the CPU a timed matmul, named in the log."""
    common = ("distributed.sequence_parallel_size=2", "deepspeed=bf16")
    output = launch(tmp_path / "run", *common, "trainer.peak_flops=auto", nproc=2)
    assert "ZeRO stage 1, bf16 (BF16_Optimizer)" in output, output[-3000:]
    assert re.search(r"MFU of [0-9.]+ TFLOP/s per device \(fp32 2048\^3 matmul on \d+ threads, timed\)", output)
    for key, rtol in (("loss", 3e-3), ("grad_norm", 2e-2)):
        assert records(tmp_path / "run", key)[0] == pytest.approx(records(reference, key)[0], rel=rtol), key
    launch(tmp_path / "resumed", *common, f"resume={tmp_path / 'run' / 'checkpoints' / 'step_00000006'}", nproc=2)
    assert_resumed_at_step_6_repeats(tmp_path / "resumed", tmp_path / "run")


def test_data_parallel_run_matches_one_process_with_the_same_global_batch(tmp_path):
    # dp=2 x micro-batch 1 reads the same windows per step as one process with micro-batch 2
    launch(tmp_path / "one", "data.micro_batch_size=2", "trainer.max_steps=4", "trainer.eval_every=0")
    launch(tmp_path / "two", "trainer.max_steps=4", "trainer.eval_every=0", "deepspeed=zero2", nproc=2)
    assert_same_training(tmp_path / "two", tmp_path / "one")


def test_resume_from_step_6_reproduces_steps_7_to_12_bit_identically(reference, tmp_path):
    launch(tmp_path, f"resume={reference / 'checkpoints' / 'step_00000006'}")
    assert_resumed_at_step_6_repeats(tmp_path, reference)
    assert records(tmp_path)[1][12] == records(reference)[1][12]


def test_sigterm_saves_a_checkpoint_and_resume_auto_continues(tmp_path):
    process = launch(tmp_path, "trainer.max_steps=100000", "trainer.eval_every=0", "trainer.save_every=100000",
                     wait=False)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    stopped_at = max(records(tmp_path)[0])
    assert (tmp_path / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()
    launch(tmp_path, f"trainer.max_steps={stopped_at + 2}", "trainer.eval_every=0")  # resume=auto by default
    assert max(records(tmp_path)[0]) == stopped_at + 2


def test_a_validation_split_shorter_than_seq_len_only_matters_with_evaluation(tmp_path):
    """Found by a 1M-token run on the stdlib corpus (validation split: 475K tokens): without
    evaluation (eval_every=0) the trainer must not need one validation sample of seq_len."""
    pytest.importorskip("datasets")  # a file corpus (a dependency; a bare GPU image may lack it)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(10):  # 10 documents of ~600 bytes: val_fraction 0.1 puts one of them in validation
        (texts / f"doc{i}.txt").write_text(f"document {i}: " + "def f(x):\n    return x + 1\n" * 22)
    data = ["data=local_text", f"data.source={texts}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1",
            "data.seq_len=1024", "attention.segment_lengths=[256,512,1024]", "trainer.max_steps=1",
            "trainer.save_every=1"]
    launch(tmp_path / "no_eval", *data, "trainer.eval_every=0")
    assert records(tmp_path / "no_eval")[0].keys() == {1}
    failed = launch(tmp_path / "eval", *data, "trainer.eval_every=1", wait=False)
    output, _ = failed.communicate(timeout=300)
    assert failed.returncode != 0
    assert "validation.bin has" in output and "one sample of seq_len=1024 needs 1025" in output, output[-2000:]


def test_profile_step_writes_where_that_steps_time_goes(tmp_path):
    """trainer.profile_step=2: step 2 runs under torch.profiler; profile_step_2.json holds its wall time and its
    ops (CPU here, kernels on a GPU) by category, the attention's branches among them, and the log prints it."""
    output = launch(tmp_path, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=2",
                    "trainer.profile_step=2")
    profile = json.loads((tmp_path / "profile_step_2.json").read_text())
    assert profile["step"] == 2 and profile["step_s"] > 0 and profile["tokens"] == 256
    assert {"matmul", "flash (dense / aten)"} <= profile["categories"].keys(), profile["categories"]
    assert profile["total_ms"] == pytest.approx(sum(profile["categories"].values()))
    assert "dilated fwd w=64 r=1" in profile["branches_ms"] and profile["top"], profile
    phases = {f"train: {name}" for name in ("data", "forward", "loss", "backward", "optimizer step")}
    assert phases <= profile["host_phases_ms"].keys() and all(ms > 0 for ms in profile["host_phases_ms"].values())
    assert "step 2 profiled" in output and not (tmp_path / "profile_step_1.json").exists()
