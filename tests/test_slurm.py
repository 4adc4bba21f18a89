"""slurm/train.sbatch on a real one-node SLURM cluster (slurmctld + slurmd + munge on this machine).

The session fixture runs scripts/slurm_local.sh, which installs the Debian packages when missing
(root + apt-get), starts the daemons on free ports with all state in a temp dir, and stops them at
the end. Jobs run 2 gloo workers (NPROC_PER_NODE=2) of the tiny model.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from longnet_dist.train.checkpoint import verify_checkpoint
from test_faults_e2e import TINY_RUN, logged_steps, trainer_env, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPOSITORY = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPOSITORY / "scripts" / "slurm_local.sh"
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _two_free_ports() -> int:
    """A port p with p and p+1 free (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


class Cluster:
    def __init__(self, state_dir: Path) -> None:
        self.env = trainer_env(SLURM_CONF=str(state_dir / "slurm.conf"), LONGNET_ROOT=str(REPOSITORY),
                               NPROC_PER_NODE="2")
        self.state_dir = state_dir

    def run(self, *command: str, cwd: Path | None = None) -> str:
        done = subprocess.run(command, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return done.stdout

    def submit(self, workdir: Path, *overrides: str) -> str:
        output = self.run("sbatch", "--parsable", "--cpus-per-task=2", str(REPOSITORY / "slurm" / "train.sbatch"),
                          *TINY_RUN, *overrides, cwd=workdir)
        return output.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_finished(self, job_id: str, workdir: Path, timeout: float) -> dict[str, str]:
        wait_for(lambda: self.job(job_id)["JobState"] in FINISHED_STATES, timeout, f"job {job_id} to finish",
                 describe=lambda: job_logs(workdir, job_id)[-4000:] + self.daemon_logs())
        return self.job(job_id)

    def daemon_logs(self) -> str:
        return "".join(f"\n== {path}\n" + path.read_text()[-1500:] for path in sorted((self.state_dir / "log").glob("*")))


def job_logs(workdir: Path, job_id: str) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(workdir.glob(f"slurm-*-{job_id}.*")))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("slurm_cluster")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state_dir), "SLURM_LOCAL_PORT": str(_two_free_ports())}
    started = subprocess.run([str(CLUSTER_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
    try:
        assert started.returncode == 0, f"could not start the local SLURM cluster:\n{started.stderr}"
        yield Cluster(state_dir)
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=300)


def test_sbatch_trains_with_two_workers_and_checkpoints(cluster, tmp_path):
    job_id = cluster.submit(tmp_path, "trainer.max_steps=6", "trainer.save_every=3", "trainer.log_every=2")
    job = cluster.wait_finished(job_id, tmp_path, timeout=300)
    out = (tmp_path / f"slurm-longnet-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job_logs(tmp_path, job_id)[-4000:]
    assert (tmp_path / f"slurm-longnet-{job_id}.err").exists()
    run_dir = tmp_path / "outputs" / f"slurm-{job_id}"  # the per-job run directory the script chose
    assert f"run dir {run_dir}" in out and "world 2 = dp 2 x sp 1" in out and "done: 6 steps" in out
    assert logged_steps(run_dir) == [2, 4, 6]
    verify_checkpoint(run_dir / "checkpoints" / "step_00000006", checksums=True)
    assert "--nproc-per-node 2" in job_logs(tmp_path, job_id) and "--rdzv-backend c10d" in job_logs(tmp_path, job_id)


def test_preemption_warning_checkpoints_requeues_and_resumes(cluster, tmp_path):
    max_steps = 300  # ~30 s of training on the 2-core CPU VM: the warning lands mid-run
    job_id = cluster.submit(tmp_path, f"trainer.max_steps={max_steps}", "trainer.save_every=100",
                            "trainer.log_every=10")
    run_dir = tmp_path / "outputs" / f"slurm-{job_id}"
    wait_for(lambda: max(logged_steps(run_dir), default=0) >= 20, 240, "training to reach step 20",
             describe=lambda: job_logs(tmp_path, job_id)[-4000:])
    # What SLURM does --signal=B:USR1@300 before the time limit: SIGUSR1 to the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    # SLURM holds a requeued job for ~2 minutes; once the node is clean, let it start now.
    wait_for(lambda: cluster.job(job_id)["JobState"] == "PENDING", 180, "the job to requeue",
             describe=lambda: job_logs(tmp_path, job_id)[-4000:])
    time.sleep(3)  # the job credential of the first run must be older than the new one
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = cluster.wait_finished(job_id, tmp_path, timeout=300)

    out = (tmp_path / f"slurm-longnet-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", out[-4000:]
    stopped = re.search(r"stopped by SIGUSR1 after step (\d+)", out)
    assert stopped and "got SIGUSR1" in out and f"requeueing job {job_id}" in out, out[-4000:]
    stop_step = int(stopped.group(1))
    assert 20 <= stop_step < max_steps
    assert f"job {job_id} (restart 1)" in out
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stop_step:08d}'} at step {stop_step}" in out
    assert f"done: {max_steps} steps" in out
    steps = logged_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == max_steps  # one record per step across both runs
    verify_checkpoint(run_dir / "checkpoints" / f"step_{max_steps:08d}", checksums=True)
