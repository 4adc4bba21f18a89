"""Faults against the real trainer (`python -m longnet_dist.train`, tiny model, CPU):
stop signals, a killed rank under torchrun --max-restarts, a corrupt checkpoint, a NaN loss, a full disk.

Helpers here (TINY_RUN, TrainerRun, wait_for) are shared with test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from subprocess_env import on_the_cpu
from tmpfs import mounted_tmpfs
from longnet_dist.train.checkpoint import checkpoint_step, find_latest_checkpoint, verify_checkpoint

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
# A run that starts in seconds and takes ~0.1 s per step on the 2-core CPU VM.
TINY_RUN = ["model=tiny", "data.seq_len=256", "logger=none", "trainer.progress_bar=false", "trainer.eval_every=0"]


def trainer_env(**extra: str) -> dict[str, str]:
    return {**on_the_cpu(os.environ), "WANDB_MODE": "disabled", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **extra}


def wait_for(condition: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] = lambda: True,
             describe: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or not alive():
            raise AssertionError(f"{'timed out' if alive() else 'process ended'} waiting for {what}\n{describe()}")
        time.sleep(0.3)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"step"' in line]


class TrainerRun:
    """A trainer process (own session, output in a log file) that the test can signal and wait for."""

    def __init__(self, command: list[str], log_path: Path, **env: str) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPOSITORY, env=trainer_env(**env), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"trainer did not finish in {timeout} s\n{self.log()[-4000:]}") from None

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 180) -> None:
        wait_for(lambda: max(logged_steps(run_dir), default=0) >= step, timeout, f"step {step} in {run_dir}",
                 self.alive, lambda: self.log()[-4000:])

    def stop(self) -> None:
        """SIGKILL the process and all its descendants (torchrun puts workers in their own sessions)."""
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "longnet_dist.train", *TINY_RUN, f"trainer.output_dir={run_dir}", *overrides]


def run_trainer(run_dir: Path, log_path: Path, *overrides: str, timeout: float = 180) -> tuple[int, str]:
    run = TrainerRun(train_command(run_dir, *overrides), log_path)
    code = run.wait(timeout)
    return code, run.log()


@pytest.fixture
def stop_leftovers():
    """Kills (by process group) every TrainerRun a test registered, whatever the test's outcome."""
    runs: list[TrainerRun] = []
    yield runs.append
    for run in runs:
        run.stop()


def test_sigusr1_checkpoints_and_exits_then_resume_skips_a_corrupt_checkpoint(tmp_path, stop_leftovers):
    run_dir = tmp_path / "run"
    run = TrainerRun(train_command(run_dir, "trainer.max_steps=100000", "trainer.save_every=3",
                                   "trainer.log_every=1", "trainer.keep_last_checkpoints=null"), tmp_path / "a.log")
    stop_leftovers(run)
    run.wait_for_step(run_dir, 7)
    os.kill(run.process.pid, signal.SIGUSR1)
    assert run.wait(120) == 0, run.log()[-4000:]
    stopped = re.search(r"stopped by SIGUSR1 after step (\d+)", run.log())
    assert "received SIGUSR1: saving a checkpoint" in run.log() and stopped, run.log()[-4000:]
    last = int(stopped.group(1))
    newest = find_latest_checkpoint(run_dir / "checkpoints", checksums=True)
    assert newest is not None and checkpoint_step(newest) == last >= 7

    # Truncate the newest checkpoint: resume=auto must warn, fall back to the previous one and go on.
    states = newest / "mp_rank_00_model_states.pt"
    os.truncate(states, states.stat().st_size // 2)
    previous = max(step for step in range(3, last, 3))
    code, log = run_trainer(run_dir, tmp_path / "b.log", f"trainer.max_steps={last + 2}", "trainer.save_every=3",
                            "resume=auto")
    assert code == 0, log[-4000:]
    assert f"skipping checkpoint {newest}" in log and "truncated" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{previous:08d}'} at step {previous}" in log
    assert f"done: {last + 2} steps" in log
    verify_checkpoint(run_dir / "checkpoints" / f"step_{last + 2:08d}", checksums=True)


def _worker_pids(torchrun_pid: int) -> dict[int, int]:
    """{global rank: pid} of torchrun's worker processes (its children, by their RANK variable)."""
    workers = {}
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        ranks = [item.split(b"=", 1)[1] for item in environ if item.startswith(b"RANK=")]
        if ranks:
            workers[int(ranks[0])] = pid
    return workers


def test_killed_rank_restarts_from_last_complete_checkpoint_and_sigterm_stops(tmp_path, stop_leftovers):
    run_dir = tmp_path / "run"
    command = [str(REPOSITORY / "launch" / "train.sh"), *TINY_RUN, f"trainer.output_dir={run_dir}",
               "trainer.max_steps=100000", "trainer.save_every=5", "trainer.log_every=1", "resume=auto"]
    run = TrainerRun(command, tmp_path / "run.log", NPROC_PER_NODE="2", MAX_RESTARTS="1")
    stop_leftovers(run)
    run.wait_for_step(run_dir, 12)
    newest_before_kill = checkpoint_step(find_latest_checkpoint(run_dir / "checkpoints"))
    os.kill(_worker_pids(run.process.pid)[1], signal.SIGKILL)

    resumed = re.compile(r"resumed from \S+/step_(\d+) at step (\d+)")
    wait_for(lambda: resumed.search(run.log()) is not None, 180, "the restarted workers to resume", run.alive,
             lambda: run.log()[-4000:])
    resumed_step = int(resumed.search(run.log()).group(1))
    # The newest complete checkpoint when the group restarted: the one we saw, or one finished since.
    assert resumed_step >= newest_before_kill and resumed_step % 5 == 0
    wait_for(lambda: logged_steps(run_dir)[-1] >= resumed_step + 3, 120, "steps after the restart", run.alive,
             lambda: run.log()[-4000:])

    os.kill(run.process.pid, signal.SIGTERM)  # to torchrun, which forwards it to both workers
    run.wait(120)
    log = run.log()
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", log)
    assert stopped and "received SIGTERM" in log, log[-4000:]
    verify_checkpoint(run_dir / "checkpoints" / f"step_{int(stopped.group(1)):08d}", checksums=True)
    assert log.count("LongNet LM:") == 2  # the worker group started twice: the original and the restart


def test_nonfinite_loss_stops_with_step_value_and_diagnostics(tmp_path):
    # A learning rate of 1e30 makes the first update overflow the weights, so a later loss is NaN/inf.
    code, log = run_trainer(tmp_path / "run", tmp_path / "run.log", "trainer.max_steps=20", "trainer.lr=1e30",
                            "trainer.warmup_steps=1", "trainer.log_every=1")
    assert code != 0
    found = re.search(r"NonFiniteLossError: non-finite loss (nan|inf|-inf) at step (\d+)", log)
    assert found, log[-4000:]
    diagnostics = tmp_path / "run" / "diagnostics" / f"nonfinite_loss_step_{int(found.group(2)):08d}.json"
    record = json.loads(diagnostics.read_text())
    assert record["step"] == int(found.group(2)) and record["loss"] == found.group(1) and record["lr"] > 1e29


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path):
    with mounted_tmpfs(tmp_path / "small_disk", "64m", "test_checkpoint.py covers ENOSPC") as mount_point:
        run_dir = mount_point / "run"
        code, log = run_trainer(run_dir, tmp_path / "a.log", "trainer.max_steps=3", "trainer.save_every=3")
        assert code == 0, log[-4000:]
        first = run_dir / "checkpoints" / "step_00000003"
        checkpoint_bytes = sum(path.stat().st_size for path in first.iterdir())
        # Shrink the filesystem to what is used plus half a checkpoint: the next save cannot fit.
        used = int(subprocess.run(["df", "-B1", "--output=used", str(mount_point)], capture_output=True,
                                  text=True, check=True).stdout.split()[-1])
        subprocess.run(["mount", "-o", f"remount,size={used + checkpoint_bytes // 2}", str(mount_point)], check=True)
        code, log = run_trainer(run_dir, tmp_path / "b.log", "trainer.max_steps=6", "trainer.save_every=3",
                                "resume=auto")
        assert code != 0
        assert re.search(r"CheckpointDiskFullError: disk full.*step 6", log), log[-4000:]
        assert "earlier checkpoints are intact" in log
        assert find_latest_checkpoint(run_dir / "checkpoints", checksums=True) == first
        assert not [path for path in (run_dir / "checkpoints").iterdir() if ".tmp-" in path.name]
