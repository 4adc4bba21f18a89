"""scripts/gpu_check.sh, the one command of a short GPU lease, checked on the CPU with stand-in commands:
which stages run with which arguments, that the kernel tuning reaches the later stages, that results land
in $OUT and in the archive after every stage, and that a failing or hanging stage costs only itself.

A stand-in `python3` first on PATH logs each call (its arguments and LONGNET_KERNEL_TUNING) and writes
what the real scripts would: kernel_tuning.json for the attention stage, a train_cuda JSON into
benchmarks/results/ for the training stage. FAKE_FAIL / FAKE_HANG name a script whose call fails / hangs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from subprocess_env import REPO

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*|${LONGNET_KERNEL_TUNING:-}" >> "$FAKE_LOG"
[ -z "${LONGNET_DEVICE_OVERFLOW_CHECK:-}" ] || echo "LONGNET_DEVICE_OVERFLOW_CHECK=$LONGNET_DEVICE_OVERFLOW_CHECK $*" >> "$FAKE_LOG.env"
args="$*"
case "$args" in
    "-c import hydra, omegaconf, deepspeed") exit "${FAKE_DEPS_RC:-0}" ;;
    -c*) exit 0 ;;
esac
[[ "$args" != *"${FAKE_HANG:-<none>}"* ]] || exec sleep 60
[[ "$args" != *"${FAKE_FAIL:-<none>}"* ]] || { echo "stand-in failure"; exit 3; }
case "$args" in
    *gpu_attention.py*) results=$(sed -E 's/.*--results ([^ ]+).*/\1/' <<< "$args")
                        mkdir -p "$results" && echo '{"dq_mode": "stream"}' > "$results/kernel_tuning.json" ;;
    *benchmarks/train.py*) echo '{"rows": []}' > benchmarks/results/train_cuda_standin.json ;;
    *"-m pytest"*) echo "tests/test_cuda_attention.py::test_a PASSED"; echo "1 passed" ;;
esac
echo "ran: $args"
"""


def gpu_check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, str]], Path]:
    """Runs a copy of the two scripts in a project folder of their own (so the stand-ins write nothing into
    this checkout); returns the result, the logged (arguments, LONGNET_KERNEL_TUNING) calls and $OUT."""
    root, bin_dir, out = tmp_path / "project", tmp_path / "bin", tmp_path / "out"
    for folder in (root / "scripts", root / "benchmarks" / "results", bin_dir, out):
        folder.mkdir(parents=True)
    for script in ("gpu_check.sh", "gpu_test_shards.sh"):
        shutil.copy2(REPO / "scripts" / script, root / "scripts" / script)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "LONGNET_", "OUT"))}
    clean.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), OUT=str(out), **env)
    result = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=clean,
                            capture_output=True, text=True, timeout=120)
    calls = [tuple(line.split("|", 1)) for line in log.read_text().splitlines()]
    return result, [c for c in calls if not c[0].startswith("-c ")], out


def test_the_default_stages_run_in_order_and_hand_on_the_tuning(tmp_path):
    archive = tmp_path / "check.tgz"
    result, calls, out = gpu_check(tmp_path, GPU_CHECK_ARCHIVE=str(archive))
    assert result.returncode == 0, result.stdout + result.stderr
    scripts = [args.split()[0] if not args.startswith("-m pytest") else "pytest" for args, _ in calls]
    assert scripts == ["pytest", "benchmarks/gpu_attention.py", "benchmarks/gpu_profile.py",
                       "benchmarks/host_overhead.py", "benchmarks/train.py"]
    by_script = dict(zip(scripts, calls))
    assert by_script["pytest"][0].count("tests/test_cuda") == 2  # the CUDA tests, the sharded one included
    assert by_script["benchmarks/gpu_attention.py"][0].endswith("--quick --dq-modes tma")  # the tuned defaults
    assert "--attention-only" in by_script["benchmarks/gpu_profile.py"][0]
    assert by_script["benchmarks/host_overhead.py"][0] == f"benchmarks/host_overhead.py --device cuda --cprofile 50 --results {out}"
    # the training stage profiles a 32K step by default, with the attention stage's tuning
    assert by_script["benchmarks/train.py"][0] == "benchmarks/train.py --device cuda --quick --budget 100 --profile"
    tuning = str((out / "kernel_tuning.json").resolve())
    assert by_script["benchmarks/train.py"][1] == tuning and by_script["benchmarks/gpu_profile.py"][1] == tuning
    assert by_script["benchmarks/gpu_attention.py"][1] == ""  # nothing tuned before the attention stage
    # each stage's log and the training stage's JSON (written into benchmarks/results/) are in $OUT and the archive
    expected = {"gpu_tests.log", "gpu_attention.log", "gpu_profile_attention.log", "host_overhead.log",
                "train_cuda.log", "kernel_tuning.json", "train_cuda_standin.json"}
    assert expected <= {p.name for p in out.iterdir()}
    with tarfile.open(archive) as packed:
        assert expected <= {Path(name).name for name in packed.getnames()}
    assert "== train_cuda exit 0" in result.stdout


def test_the_opt_in_tuning_and_long_training_stages(tmp_path):
    """`make gpu-tune` re-times the settings under a tag of its own and hands its kernel_tuning.json on;
    `make gpu-tune-late` times warp specialisation and TMA loads only; `make gpu-train-long` runs the 1M and 4M
    training points."""
    result, calls, out = gpu_check(tmp_path, GPU_CHECK_STAGES="tune tune-late train-long")
    assert result.returncode == 0, result.stdout + result.stderr
    (tune_args, tune_tuning), (late_args, _), (long_args, long_tuning) = calls
    assert tune_args.startswith(f"benchmarks/gpu_attention.py --results {out} --tag tune --tune") and tune_tuning == ""
    assert late_args == f"benchmarks/gpu_attention.py --results {out} --tag tune_late --tune-late --quick --dq-modes tma"
    assert long_args == "benchmarks/train.py --device cuda --seq-lens 1048576 4194304 --impls dilated --budget 200 --tag long"
    assert long_tuning == str((out / "kernel_tuning.json").resolve())
    assert (out / "gpu_attention_tune.log").exists() and (out / "train_cuda_long.log").exists()
    assert (out / "gpu_attention_tune_late.log").exists()


def test_the_suite_stage_runs_every_test_the_tests_stage_does_not(tmp_path):
    """`make gpu-suite`: `make test` as a workstation with a GPU runs it, less the SLURM tests and the files (and
    the two tests of test_host_reads.py) that the tests stage runs; a file at a time per worker; logs in gpu_suite/."""
    result, calls, out = gpu_check(tmp_path, GPU_CHECK_STAGES="suite")
    assert result.returncode == 0, result.stdout + result.stderr
    [(args, _)] = calls
    assert args.startswith("-m pytest tests --ignore=tests/test_cuda_attention.py ") and " -m not slurm " in args
    assert "--ignore=tests/test_triton_kernels.py" in args and "--ignore=tests/test_host_reads.py" not in args
    assert "--deselect=tests/test_host_reads.py::test_a_training_step_on_the_gpu_never_waits_for_it" in args
    assert "-n 16 --dist loadfile" in args
    assert (out / "gpu_suite.log").exists() and (out / "gpu_suite" / "tests.log").exists()


def test_the_waits_stage_puts_the_steps_waits_back_for_the_32k_point(tmp_path):
    """`make gpu-train-waits`: the 32K dilated point, profiled, with DeepSpeed's throughput timer and the host-side
    overflow check back (what stop 30 took out of the step), under a tag of its own."""
    result, calls, out = gpu_check(tmp_path, GPU_CHECK_STAGES="train-waits")
    assert result.returncode == 0, result.stdout + result.stderr
    [(args, _)] = calls
    assert args == ("benchmarks/train.py --device cuda --seq-lens 32768 --impls dilated --profile --budget 90 "
                    "--tag waits --override +deepspeed.timers.throughput.enabled=true")
    assert (tmp_path / "calls.log.env").read_text().split()[0] == "LONGNET_DEVICE_OVERFLOW_CHECK=0"
    assert (out / "train_cuda_waits.log").exists()


def test_the_fused_dq_stage_starts_from_the_checks_tuning_and_keeps_its_own_apart(tmp_path):
    """`make gpu-dq-fused` after the check: the backward-only run gets the attention stage's tuning, writes into
    dq_fused/ (in $OUT and the archive), and the tuning handed to later stages stays the check's."""
    archive = tmp_path / "check.tgz"
    result, calls, out = gpu_check(tmp_path, GPU_CHECK_STAGES="attention dq-fused train",
                                   GPU_CHECK_ARCHIVE=str(archive))
    assert result.returncode == 0, result.stdout + result.stderr
    tuning = str((out / "kernel_tuning.json").resolve())
    (fused_args, fused_tuning), (train_args, train_tuning) = calls[1], calls[2]
    assert "--backward-only" in fused_args and f"--results {out}/dq_fused" in fused_args
    assert fused_args.endswith("--dq-modes stream tma atomic")
    assert fused_tuning == tuning and train_args.startswith("benchmarks/train.py") and train_tuning == tuning
    assert (out / "dq_fused" / "kernel_tuning.json").exists() and (out / "gpu_attention_dq_fused.log").exists()
    with tarfile.open(archive) as packed:
        assert "./dq_fused/kernel_tuning.json" in packed.getnames()


def test_the_head_dim_128_stage_keeps_its_tuning_apart(tmp_path):
    """`make gpu-head-dim-128` after the check: the attention points at 6 heads of 128 start from the check's tuning,
    write into d128/, and the tuning handed to later stages stays the check's (head_dim 64)."""
    result, calls, out = gpu_check(tmp_path, GPU_CHECK_STAGES="attention head-dim-128 train")
    assert result.returncode == 0, result.stdout + result.stderr
    tuning = str((out / "kernel_tuning.json").resolve())
    (d128_args, d128_tuning), (train_args, train_tuning) = calls[1], calls[2]
    assert d128_args == (f"benchmarks/gpu_attention.py --results {out}/d128 --tag d128 --quick --heads 6 "
                         "--head-dim 128 --dq-modes tma")
    assert d128_tuning == tuning and train_args.startswith("benchmarks/train.py") and train_tuning == tuning
    assert (out / "d128" / "kernel_tuning.json").exists() and (out / "gpu_attention_d128.log").exists()


def test_a_failing_stage_fails_the_check_but_the_others_still_run(tmp_path):
    result, calls, out = gpu_check(tmp_path, GPU_CHECK_STAGES="attention train", FAKE_FAIL="gpu_attention.py")
    assert result.returncode == 1
    assert "== gpu_attention exit 3" in result.stdout and "stand-in failure" in (out / "gpu_attention.log").read_text()
    assert [args.split()[0] for args, _ in calls] == ["benchmarks/gpu_attention.py", "benchmarks/train.py"]
    assert calls[-1][1] == ""  # no tuning was written, so none is handed on


def test_a_hanging_stage_stops_at_its_limit(tmp_path):
    started = time.monotonic()
    result, calls, out = gpu_check(tmp_path, GPU_CHECK_STAGES="train", GPU_CHECK_TRAIN_LIMIT="2",
                                   FAKE_HANG="benchmarks/train.py")
    assert time.monotonic() - started < 30
    assert result.returncode == 1 and "== train_cuda exit 124" in result.stdout
    assert (out / "train_cuda.log").exists()


def test_without_deepspeed_the_training_stages_are_skipped_and_an_unknown_stage_is_an_error(tmp_path):
    result, calls, _ = gpu_check(tmp_path, GPU_CHECK_STAGES="train optimizer bogus", FAKE_DEPS_RC="1")
    assert result.returncode == 1
    assert calls == []
    assert result.stdout.count("skipped: hydra/omegaconf/deepspeed not importable") == 2
    assert "unknown stage bogus" in result.stdout
