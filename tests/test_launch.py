"""launch/train.sh: the torchrun command it builds and the arguments that reach the trainer.

PYTHON points at a stand-in interpreter that prints its argv as JSON, so these tests check the exact
argument vector torchrun would receive (quoting included) without starting any training.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
LAUNCHER = REPOSITORY / "launch" / "train.sh"
LAUNCH_ENV_KEYS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "MASTER_ADDR",
                   "MASTER_PORT", "MAX_RESTARTS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "SHUTDOWN_TIMEOUT")


@pytest.fixture
def echo_python(tmp_path) -> Path:
    """An executable that prints argv[1:], the shutdown timeout, its SIGUSR1 disposition and LD_PRELOAD as JSON."""
    script = tmp_path / "python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, signal, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'shutdown_timeout': os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT'),\n"
        "                  'usr1_ignored': signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,\n"
        "                  'ld_preload': os.environ.get('LD_PRELOAD')}))\n"
    )
    script.chmod(0o755)
    return script


def fake_ldconfig(folder: Path, *libraries: str) -> str:
    """A PATH whose `ldconfig -p` lists exactly `libraries` (full paths), and no nvidia-smi."""
    folder.mkdir(exist_ok=True)
    script = folder / "ldconfig"
    lines = "".join(f"\t{Path(lib).name} (libc6,x86-64) => {lib}\n" for lib in libraries)
    script.write_text(f"#!/bin/sh\nprintf '%d libs found in cache\\n' {len(libraries)}\nprintf '{lines}'\n")
    script.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def launch(echo_python: Path, *args: str, **env: str) -> tuple[dict, str]:
    clean = {key: value for key, value in os.environ.items() if key not in LAUNCH_ENV_KEYS + ("LD_PRELOAD",)}
    # PATH without nvidia-smi (the GPU count comes only from what each test sets) and with an
    # ldconfig that lists no tcmalloc, unless a test brings its own.
    clean.update({"PYTHON": str(echo_python), "PATH": fake_ldconfig(echo_python.parent / "no_tcmalloc"), **env})
    done = subprocess.run([str(LAUNCHER), *args], env=clean, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def torchrun_options(argv: list[str]) -> list[str]:
    assert argv[:2] == ["-m", "torch.distributed.run"]
    return argv[2:argv.index("longnet_dist.train") - 1]


def test_overrides_pass_through_untouched_and_command_is_printed(echo_python):
    overrides = ["model=tiny", "attention.segment_lengths=[64,128]", "trainer.output_dir=/tmp/a dir/with space",
                 "+note='quoted value'", 'logger.name="x y"', "--cfg", "job"]
    result, stderr = launch(echo_python, *overrides)
    argv = result["argv"]
    assert argv[argv.index("longnet_dist.train") + 1:] == overrides
    assert torchrun_options(argv) == ["--nnodes", "1", "--nproc-per-node", "1", "--max-restarts", "0", "--standalone"]
    printed = stderr.strip().splitlines()[-1]
    assert printed.startswith("+ ") and shlex.split(printed[2:]) == [str(echo_python), *argv]
    assert result["shutdown_timeout"] == "300" and result["usr1_ignored"]


def test_flags_and_environment_choose_processes_and_rendezvous(echo_python):
    result, _ = launch(echo_python, "--nproc-per-node", "3", "--max-restarts", "2", "--", "--nnodes=7")
    assert torchrun_options(result["argv"])[:6] == ["--nnodes", "1", "--nproc-per-node", "3", "--max-restarts", "2"]
    assert result["argv"][-1] == "--nnodes=7"  # after `--` everything belongs to the trainer

    result, _ = launch(echo_python, NNODES="4", RDZV_ENDPOINT="node01:29400", RDZV_ID="job7", SLURM_GPUS_ON_NODE="8")
    assert torchrun_options(result["argv"]) == [
        "--nnodes", "4", "--nproc-per-node", "8", "--max-restarts", "0",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node01:29400", "--rdzv-id", "job7"]

    result, _ = launch(echo_python, "--node-rank", "1", NNODES="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234",
                       CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert torchrun_options(result["argv"]) == [
        "--nnodes", "2", "--nproc-per-node", "4", "--max-restarts", "0",
        "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "1234"]

    result, _ = launch(echo_python, NPROC_PER_NODE="2", SLURM_GPUS_ON_NODE="8", SHUTDOWN_TIMEOUT="60")
    assert torchrun_options(result["argv"])[3] == "2" and result["shutdown_timeout"] == "60"


def test_flags_also_take_the_equals_form(echo_python):
    """`--flag=VALUE` is the launcher's flag as `--flag VALUE` is (not an argument for the trainer); a trainer
    argument of that form after them still passes through untouched."""
    spaced, _ = launch(echo_python, "--nproc-per-node", "3", "--nnodes", "2", "--rdzv-endpoint", "node01:29400",
                       "--rdzv-id", "job7", "--max-restarts", "1", "model=tiny")
    equals, _ = launch(echo_python, "--nproc-per-node=3", "--nnodes=2", "--rdzv-endpoint=node01:29400",
                       "--rdzv_id=job7", "--max_restarts=1", "model=tiny")
    assert equals["argv"] == spaced["argv"]
    assert torchrun_options(equals["argv"]) == [
        "--nnodes", "2", "--nproc-per-node", "3", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node01:29400", "--rdzv-id", "job7"]
    result, _ = launch(echo_python, "--node_rank=1", "--master-addr=10.0.0.1", "--master_port=1234", "--nnodes=2",
                       "--config-name=train", "a=b=c")
    assert torchrun_options(result["argv"])[-6:] == ["--node-rank", "1", "--master-addr", "10.0.0.1",
                                                     "--master-port", "1234"]
    assert result["argv"][-2:] == ["--config-name=train", "a=b=c"]


@pytest.mark.parametrize("args,env,message", [
    ((), {"NNODES": "2"}, "NNODES=2 needs a rendezvous"),
    (("--nproc-per-node", "two"), {}, "NPROC_PER_NODE must be a non-negative integer, got 'two'"),
    (("--nproc-per-node=two",), {}, "NPROC_PER_NODE must be a non-negative integer, got 'two'"),
    ((), {"MAX_RESTARTS": "-1"}, "MAX_RESTARTS must be a non-negative integer, got '-1'"),
    (("--nproc-per-node",), {}, "launch/train.sh: --nproc-per-node needs a value: --nproc-per-node VALUE or "
                                "--nproc-per-node=VALUE\n"),
    (("--nproc-per-node=",), {}, "--nproc-per-node needs a value"),
    (("--rdzv-endpoint", "--nnodes", "2"), {}, "--rdzv-endpoint needs a value"),
    (("--nnodes=2", "--master_addr"), {}, "--master_addr needs a value"),
    (("--master-port", "abc"), {}, "MASTER_PORT must be a port number in 1..65535, got 'abc'"),
    ((), {"MASTER_PORT": "70000"}, "MASTER_PORT must be a port number in 1..65535, got '70000'"),
    (("--rdzv-endpoint", "nohostport"), {}, "RDZV_ENDPOINT must be host:port (e.g. node001:29500), got 'nohostport'"),
])
def test_bad_launcher_settings_fail_before_starting(echo_python, args, env, message):
    clean = {key: value for key, value in os.environ.items() if key not in LAUNCH_ENV_KEYS}
    done = subprocess.run([str(LAUNCHER), *args], env={**clean, "PYTHON": str(echo_python), **env},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_launcher_is_executable_bash():
    assert os.access(LAUNCHER, os.X_OK)
    subprocess.run(["bash", "-n", str(LAUNCHER)], check=True)


def test_cpu_workers_get_tcmalloc_when_installed(echo_python, tmp_path):
    """launch/cpu_allocator.sh: on a node without GPUs the workers run on tcmalloc when ldconfig knows
    it (kept in front of an existing LD_PRELOAD); not with GPUs, not with LONGNET_TCMALLOC=0."""
    library = tmp_path / "libtcmalloc_minimal.so.4"  # ld.so ignores a file that is no library (warning)
    library.write_text("")
    path = fake_ldconfig(tmp_path / "bin", str(library))
    result, stderr = launch(echo_python, PATH=path)
    assert result["ld_preload"] == str(library) and f"+ LD_PRELOAD={library}" in stderr
    result, _ = launch(echo_python, PATH=path, LD_PRELOAD="/opt/other.so")
    assert result["ld_preload"] == f"{library}:/opt/other.so"
    assert launch(echo_python, PATH=path, LONGNET_TCMALLOC="0")[0]["ld_preload"] is None
    assert launch(echo_python, PATH=path, CUDA_VISIBLE_DEVICES="0,1")[0]["ld_preload"] is None
    assert launch(echo_python)[0]["ld_preload"] is None  # not installed: nothing changes


@pytest.mark.parametrize("setting,message", [
    ("1", "LONGNET_TCMALLOC=1 but no libtcmalloc_minimal.so.4 / libtcmalloc.so.4"),
    ("yes", "LONGNET_TCMALLOC=yes must be auto, 0 or 1"),
])
def test_a_required_or_bad_tcmalloc_setting_fails_before_starting(echo_python, setting, message):
    clean = {key: value for key, value in os.environ.items() if key not in LAUNCH_ENV_KEYS}
    clean.update(PYTHON=str(echo_python), PATH=fake_ldconfig(echo_python.parent / "none"), LONGNET_TCMALLOC=setting)
    done = subprocess.run([str(LAUNCHER)], env=clean, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and message in done.stderr and not done.stdout
