"""The tools a short GPU lease relies on, checked on the CPU: test sharding (LONGNET_TEST_SHARD, used
by scripts/gpu_test_shards.sh), the kernel profile script (benchmarks/gpu_profile.py), kernel_resources.py and
the training stage's memory check and profile. The attention benchmark's tuning steps: test_gpu_attention_tools.py."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest

from longnet_dist.train.profiling import category
from subprocess_env import REPO, repo_first_on_pythonpath

sys.path.insert(0, str(REPO / "benchmarks"))


@functools.lru_cache(maxsize=None)  # a collection of test_cuda_attention.py takes ~8 s here: once per arguments
def collected(shard: str | None, heavy_first: bool = False) -> subprocess.CompletedProcess:
    env = repo_first_on_pythonpath(os.environ)
    env.pop("LONGNET_TEST_SHARD", None)
    env.pop("LONGNET_HEAVY_FIRST", None)
    if shard is not None:
        env["LONGNET_TEST_SHARD"] = shard
    if heavy_first:
        env["LONGNET_HEAVY_FIRST"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_cuda_attention.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def collected_ids(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]



def test_shards_split_the_tests_exactly_once():
    everything = collected_ids(collected(None))
    parts = [collected_ids(collected(f"{i}/3")) for i in range(3)]
    assert len(everything) > 10
    assert sorted(sum(parts, [])) == sorted(everything)
    assert all(abs(len(part) - len(everything) / 3) < 1 for part in parts)


def test_heavy_tests_are_collected_first_for_the_gpu_runner():
    """LONGNET_HEAVY_FIRST=1 (scripts/gpu_test_shards.sh) moves the gpu_heavy tests to the front, the rest in
    their order (sharding, after it, then spreads them over the shards)."""
    everything = collected_ids(collected(None))
    heavy = [test for test in everything if "test_shared_keys_match_reference[" in test
             or "test_warp_specialized_kernels_match_reference[" in test]
    assert len(heavy) == 8
    reordered = collected_ids(collected(None, heavy_first=True))
    assert reordered == heavy + [test for test in everything if test not in heavy]


def test_a_malformed_shard_is_one_clear_error():
    result = collected("4/4")
    assert result.returncode != 0
    assert "LONGNET_TEST_SHARD='4/4' must be 'i/n' with 0 <= i < n" in result.stdout + result.stderr


# the files scripts/gpu_test_shards.sh runs, as stand-ins: all tests pass but one. Two shards hold
# {a, f, d} and {b, c, e}; test_b's "id " stays half a line for 3 s while test_f, in the other shard, finishes:
# a follower that interleaved the logs by the chunk ran the two into one line and lost test_b's result
FAKE_TESTS = {
    "test_cuda_attention.py": "import time\n\ndef test_a():\n    pass\n\ndef test_b():\n    time.sleep(3)\n",
    "test_cuda_sequence_parallel.py": "import time\n\ndef test_f():\n    time.sleep(1)\n",
    "test_triton_kernels.py": "def test_c():\n    pass\n\ndef test_d():\n    assert 1 == 2\n",
    "test_triton_nesting.py": "def test_e():\n    pass\n",
    "test_kernel_launch.py": "",
    "test_kernel_blocks.py": "",
    "test_host_reads.py": ("def test_a_training_step_on_the_gpu_never_waits_for_it():\n    pass\n\n"
                           "def test_device_values_wait_for_their_own_copy_only():\n    pass\n"),
}


@pytest.mark.parametrize("mode", ["shards", "xdist"])
def test_the_gpu_test_runner_reports_every_test_and_fails_on_a_failure(mode, tmp_path):
    """scripts/gpu_test_shards.sh in both modes, on stand-in test files beside the project's conftest (its
    LONGNET_TEST_SHARD split): every test's line on the console as it finishes, the failure's log, rc 1, and
    the logs kept in GPU_TEST_LOGS."""
    if mode == "xdist":
        pytest.importorskip("xdist")  # a dev dependency (pyproject.toml); GPU images have it too
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    for name, text in FAKE_TESTS.items():
        (tmp_path / "tests" / name).write_text(text)
    env = {**os.environ, "GPU_TEST_MODE": mode, "GPU_TEST_LOGS": str(tmp_path / "logs")}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_test_shards.sh"), "2"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    def reported(test: str, outcome: str) -> bool:  # pytest -v: "id PASSED"; with xdist: "PASSED id"
        return bool(re.search(f"({test} {outcome}|{outcome} {test})", out))

    for test in ("test_cuda_attention.py::test_a", "test_cuda_attention.py::test_b", "test_triton_kernels.py::test_c",
                 "test_triton_nesting.py::test_e", "test_cuda_sequence_parallel.py::test_f"):
        assert reported(f"tests/{test}", "PASSED"), out
    assert reported("tests/test_triton_kernels.py::test_d", "FAILED"), out
    assert "assert 1 == 2" in out, out  # the failure's detail reaches the console
    assert any(path.stat().st_size for path in (tmp_path / "logs").iterdir())
    if mode == "xdist":  # idle workers take queued tests from busy ones (xdist >= 3.2, which the dev extras pin)
        assert "--dist worksteal" in out, out


def test_the_gpu_test_runner_runs_the_rest_of_the_suite_or_says_which_sets_there_are(tmp_path):
    """GPU_TEST_SET=rest (`make gpu-suite`): every test file but the CUDA and kernel ones, a file per worker, the two
    GPU tests of test_host_reads.py deselected; an unknown set is one clear error before any test runs."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    for name, text in FAKE_TESTS.items():
        (tmp_path / "tests" / name).write_text(text)
    (tmp_path / "tests" / "test_host_reads.py").write_text(
        FAKE_TESTS["test_host_reads.py"] + "\ndef test_on_the_cpu():\n    pass\n")
    (tmp_path / "tests" / "test_model.py").write_text(
        "import pytest\n\ndef test_m():\n    pass\n\n@pytest.mark.slurm\ndef test_s():\n    pass\n")
    env = {**os.environ, "GPU_TEST_SET": "rest", "GPU_TEST_MODE": "shards"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_test_shards.sh"), "2"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = set(re.findall(r"(tests/\S+::\w+) PASSED", result.stdout))
    assert ran == {"tests/test_host_reads.py::test_on_the_cpu", "tests/test_model.py::test_m"}, result.stdout
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_test_shards.sh"), "2"], cwd=tmp_path,
                            env={**env, "GPU_TEST_SET": "all"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "GPU_TEST_SET=all must be gpu (the CUDA and kernel tests) or rest (every other test)" in result.stderr


def test_kernel_names_fall_into_their_categories():
    assert category("_fwd") == "dilated fwd"
    assert category("_bwd_dkdv") == "dilated dK/dV"
    assert category("_bwd_dq") == "dilated dQ"
    assert category("_bwd_prep") == category("_merge_chains") == "dilated prep / merge"
    assert category("_store_heads") == "copy / fill"  # the head groups' accumulators into the outputs
    assert category("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>") \
        == "flash (dense / aten)"
    assert category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT") == "matmul"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1") == "matmul"
    assert category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled region"
    assert category("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") \
        == "copy / fill"
    assert category("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>") \
        == "elementwise"
    assert category("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>") == "optimizer"
    assert category("Memset (Device)") == "copy / fill"
    assert category("some_new_kernel") == "other"


def test_a_profile_that_cannot_be_summarised_does_not_stop_the_step(monkeypatch, tmp_path):
    """trainer.profile_step on a machine whose profiler records something unexpected: the step's result and
    wall time stand, the summary names the error (log line and JSON); the step's own errors still propagate."""
    import torch

    from longnet_dist.train import profiling

    def broken(prof, device, top=15):
        raise AttributeError("'FunctionEventAvg' object has no attribute 'self_device_time_total'")

    monkeypatch.setattr(profiling, "summarize", broken)
    with profiling.profiled(torch.device("cpu")) as found:
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.sum() == 64 and found["seconds"] > 0
    assert found["summary"] == {"error": "could not summarise the profile: AttributeError: 'FunctionEventAvg' "
                                         "object has no attribute 'self_device_time_total'"}
    assert "ms per step; could not summarise the profile: AttributeError" in \
        profiling.format_summary("step 3 profiled", found["summary"], found["seconds"])
    assert json.loads(profiling.write_step_profile(tmp_path, 3, found).read_text())["error"].startswith("could not")
    with pytest.raises(ValueError, match="the step failed"):
        with profiling.profiled(torch.device("cpu")):
            raise ValueError("the step failed")


def profile_smoke(tmp_path, *options: str) -> None:
    """benchmarks/gpu_profile.py --device cpu --smoke into tmp_path; it must succeed."""
    result = subprocess.run([sys.executable, "benchmarks/gpu_profile.py", "--device", "cpu", "--smoke", *options,
                             "--results", str(tmp_path)], cwd=REPO, env=repo_first_on_pythonpath(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_profile_script_runs_on_the_cpu(tmp_path):
    profile_smoke(tmp_path)
    report = json.loads((tmp_path / "gpu_profile.json").read_text())
    kinds = [(p["kind"], p["impl"]) for p in report["profiles"]]
    assert kinds == [("attention", "dilated"), ("attention", "dense"), ("model step", "dilated"),
                     ("model step", "dense")]
    for profile in report["profiles"]:
        assert profile["step_s"] > 0 and profile["total_ms"] > 0
        assert abs(sum(profile["categories"].values()) - profile["total_ms"]) < 1e-6 * profile["total_ms"] + 1e-9
        assert "flash (dense / aten)" in profile["categories"]  # every profile runs aten's CPU flash kernel
        # kernels.branch_range: the smoke shape's two branches, forward and backward (dense: none)
        expected = {f"dilated {d} w={w} r={r}" for d in ("fwd", "bwd") for w, r in ((64, 1), (128, 2))}
        assert set(profile["branches_ms"]) == (expected if profile["impl"] == "dilated" else set()), profile
        assert all(ms > 0 for ms in profile["branches_ms"].values())


def test_profile_script_profiles_the_attention_alone_when_asked(tmp_path):
    """--attention-only (gpu_check.sh's profile-attention stage): no model steps, its own JSON."""
    profile_smoke(tmp_path, "--attention-only")
    report = json.loads((tmp_path / "gpu_profile_attention.json").read_text())
    assert [(p["kind"], p["impl"]) for p in report["profiles"]] == [("attention", "dilated"), ("attention", "dense")]
    assert not (tmp_path / "gpu_profile.json").exists()


def test_kernel_resources_compiles_the_default_kernels_for_sm90(tmp_path):
    """The registers / spills tool compiles the in-use block shapes for an H100/H200 without a GPU, with the
    specialisation a real launch gets."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in repo_first_on_pythonpath(os.environ).items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", "--defaults", "--results", str(tmp_path)],
                            cwd=REPO, env={**env, "TRITON_DEFAULT_FP_FUSION": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "kernel_resources.json").read_text())["rows"]
    assert [row["kernel"] for row in rows] == ["fwd", "dkdv", "dkdv+atomic dq", "dkdv+tma dq", "dq", "fwd+tma loads",
                                               "dkdv+tma loads", "dkdv+tma loads+tma dq", "dq+tma loads",
                                               "fwd+tma loads+warp specialize",  # fused_settings.WARP_SPECIALIZE
                                               "dkdv+tma loads+warp specialize", "dq+tma loads+warp specialize",
                                               "fwd+parent", "dkdv+parent", "dq+parent",  # shared keys
                                               "fwd+child", "dkdv+child", "dq+child",
                                               "fwd+last", "dkdv+last", "dkdv+tma dq+last", "dq+last",  # r = 1 last
                                               "fwd+tma loads+warp specialize+last",
                                               "dkdv+tma loads+warp specialize+last",
                                               "dq+tma loads+warp specialize+last"]
    for row in rows:
        assert row["default"] and 32 <= row["registers"] <= 255 and row["stack_bytes"] >= 0, row
        assert row["dynamic_shared_bytes"] > 0, row
        # compiled as a launch compiles them (alignment known), the row loads are asynchronous copies that the
        # pipeline overlaps and the products Hopper's warp-group MMAs; without the JIT's hints neither happens
        assert row["async_loads"] > 0 and row["wgmma"], row
        assert (row["tma_loads"] > 0) == ("tma loads" in row["kernel"]), row  # fused_settings.TMA_LOADS
        # the one-loop kernels are split into warp groups (Triton 3.6 and 3.9 do so for sm_90); nothing else is
        assert row["warp_specialized"] == ("warp specialize" in row["kernel"]), row
    row_kernels = json.loads((tmp_path / "kernel_resources.json").read_text())["row_kernels"]
    assert [row["kernel"] for row in row_kernels] == ["prep", "merge chains"]  # they compile, and do not spill
    assert all(row["stack_bytes"] == 0 and row["registers"] > 0 for row in row_kernels), row_kernels


def test_the_training_stage_skips_a_point_that_needed_more_memory_than_the_gpu_has():
    """benchmarks/train.py on an 80 GB H100: the 4M step (110.4 GiB measured on the H200) is recorded as
    skipped at once instead of compiling towards an out-of-memory error; it runs where it fits."""
    import train as bench

    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2}
    h200 = {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8}
    status = bench.too_big(4194304, "dilated", h100)
    assert status.startswith("skipped") and "110.4 GiB" in status and "79.2 GiB" in status, status
    assert bench.too_big(4194304, "dilated", h200) is None
    assert bench.too_big(1048576, "dilated", h100) is None and bench.too_big(32768, "dense", h100) is None
    assert bench.too_big(4194304, "dilated", {"gpu": "unknown"}) is None  # no memory known: try it


def test_the_training_stage_skips_a_point_that_no_longer_fits_its_budget():
    """benchmarks/train.py: with less of the budget left than a point took where it was measured (1M: 65 s on
    an H100), the point is recorded as skipped at once (on the H100 in stop 19 it started with 22 s left and
    timed out, which also skipped the 4M point as "a shorter sequence failed")."""
    import train as bench

    status = bench.too_long(1048576, "dilated", 22.0)
    assert status.startswith("skipped") and "22 s of the budget left" in status and "65 s" in status, status
    assert bench.too_long(1048576, "dilated", 64.0) and bench.too_long(1048576, "dilated", 66.0) is None
    assert bench.too_long(65536, "dilated", 19.0) and bench.too_long(65536, "dilated", 21.0) is None  # unmeasured


def test_the_training_stage_profiles_one_more_step_and_leaves_it_out_of_the_medians(monkeypatch):
    """benchmarks/train.py --profile: a 32K point runs steps + 1 steps with trainer.profile_step on the last, keeps
    that step's profile in its row and out of the medians; a 1M point is not profiled."""
    import argparse

    import train as bench

    calls = []

    def fake_run(overrides, nproc, threads, timeout, memory_limit, read_back=(), environment=None):
        calls.append((overrides, read_back))
        assert environment == {"DS_ACCELERATOR": "cuda"}  # the trainer's, not this process's (later runs here)
        steps = int(next(o for o in overrides if o.startswith("trainer.max_steps=")).split("=")[1])
        tokens_per_s = {1: 1e3, 2: 4e3, 3: 5e3, 4: 6e3, 5: 1e2}  # step 5 (profiled) slowest
        records = [{"step": i, "tokens_per_s": tokens_per_s[i], "mfu": i / 10, "peak_mem_bytes": 2**30, "loss": 1.0}
                   for i in range(1, steps + 1)]
        files = {name: {"step": 5, "categories": {"matmul": 1.0}} for name in read_back if name.endswith("_5.json")}
        return {"status": "ok", "wall_s": 1.0, "records": records, "files": files}

    monkeypatch.setattr(bench, "run_trainer", fake_run)
    args = argparse.Namespace(profile=True, checkpointing="auto", deepspeed="bf16", compile="auto", override=[])
    row = bench.cuda_point(32768, "dilated", 4, args, 1e15, timeout=60)
    overrides, read_back = calls[-1]
    assert "deepspeed=bf16" in overrides  # BF16_Optimizer: the wrapper with the least overhead on a GPU
    assert "trainer.max_steps=5" in overrides and "trainer.profile_step=5" in overrides
    assert read_back == ("profile_step_5.json",) and row["profile"]["categories"] == {"matmul": 1.0}
    assert row["timed_steps"] == 3 and row["tokens_per_s"] == 5e3  # steps 2-4: the profiled step 5 left out
    row = bench.cuda_point(1048576, "dilated", 2, args, 1e15, timeout=60)
    assert "trainer.max_steps=2" in calls[-1][0] and "trainer.profile_step=null" in calls[-1][0]
    assert "profile" not in row and os.environ.get("DS_ACCELERATOR") != "cuda"  # (build_engine sets "cpu" here)


def test_annotated_ranges_are_not_counted_twice_in_the_kernel_time():
    """A CUDA profile holds each `kernels.branch_range` (and "Optimizer.step#...") twice: as a user annotation
    whose device time spans its kernels, and as the kernels themselves. The summary counts the kernels once
    and keeps the range only as the branch's time (stop 27's H200 profile had put 3.4 of 7.1 ms in "other")."""
    from types import SimpleNamespace

    import torch

    from longnet_dist.train.profiling import summarize

    cuda = torch.autograd.DeviceType.CUDA

    def event(key, us, annotation=False, device_type=cuda):
        return SimpleNamespace(key=key, count=1, device_type=device_type, is_user_annotation=annotation,
                               self_device_time_total=us, device_time_total=us, self_cpu_time_total=0,
                               cpu_time_total=0)

    events = [event("dilated fwd w=2048 r=1", 700, annotation=True), event("_fwd", 500), event("_bwd_dq", 200),
              event("Optimizer.step#AdamW.step", 300, annotation=True),
              event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", 300),
              event("aten::mm", 9000, device_type=torch.autograd.DeviceType.CPU)]
    summary = summarize(SimpleNamespace(key_averages=lambda: events), "cuda")
    assert summary["total_ms"] == pytest.approx(1.0)
    assert summary["categories"] == {"dilated fwd": 0.5, "optimizer": 0.3, "dilated dQ": 0.2}
    assert summary["branches_ms"] == {"dilated fwd w=2048 r=1": 0.7}
    assert [row["name"] for row in summary["top"]] == ["_fwd", events[4].key, "_bwd_dq"]

    with torch.profiler.profile() as prof:  # the same on a real CPU profile: the range is a branch, not an op
        with torch.profiler.record_function("dilated bwd w=4096 r=2"):
            torch.ones(64, 64) @ torch.ones(64, 64)
    summary = summarize(prof, "cpu")
    assert "dilated bwd w=4096 r=2" in summary["branches_ms"]
    assert all(not row["name"].startswith("dilated ") for row in summary["top"])
    assert "other" not in summary["categories"]


def test_profile_timeline_measures_idle_gpu_time_between_kernels():
    """The timeline of a CUDA profile: overlapping kernels (side streams) count once as busy, and the time
    between kernels is idle, the largest gaps named by their neighbours and by the host op that launched the
    kernel ending them (the op that began last among those that launched a kernel of that name before it)."""
    from longnet_dist.train.profiling import timeline

    kernels = [(100.0, 200.0, "_fwd"), (150.0, 260.0, "_fwd side"), (300.0, 400.0, "_bwd_dkdv"),
               (402.0, 500.0, "_store_heads"), (600.0, 650.0, "nvjet")]
    host_ops = [(10.0, 590.0, frozenset({"nvjet"}), "train: forward > aten::linear > aten::mm"),  # an older launch
                (560.0, 595.0, frozenset({"nvjet"}), "train: backward > aten::mm"),  # launched the 600 us one
                (700.0, 720.0, frozenset({"nvjet"}), "train: optimizer step > aten::mm")]  # after it: not it
    t = timeline(list(reversed(kernels)), host_ops)  # any order
    assert t["span_ms"] == pytest.approx(0.55)
    assert t["busy_ms"] == pytest.approx((160 + 100 + 98 + 50) / 1000)
    assert t["idle_ms"] == pytest.approx((40 + 2 + 100) / 1000)
    assert t["gaps"] == 2 and t["gaps_ms"] == pytest.approx(0.14)  # the 2 us gap is under the threshold
    assert t["largest_gaps"][0] == {"us": 100.0, "after": "_store_heads", "before": "nvjet", "at_ms": 0.5,
                                    "host": "train: backward > aten::mm"}
    assert t["largest_gaps"][1]["after"] == "_fwd side" and "host" not in t["largest_gaps"][1]
    assert timeline([])["busy_ms"] == 0.0


def test_launching_ops_chain_each_kernel_launch_to_its_enclosing_ranges():
    """launching_ops on profiler events: only host ops that launched kernels, each with its chain of enclosing
    ops outermost first, long chains cut to the outer four and the op itself."""
    from types import SimpleNamespace

    import torch

    from longnet_dist.train.profiling import launching_ops

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, parent=None, kernels=(), device=cpu, start=0.0, end=1.0):
        return SimpleNamespace(name=name, cpu_parent=parent, kernels=[SimpleNamespace(name=k) for k in kernels],
                               device_type=device, time_range=SimpleNamespace(start=start, end=end))

    step = event("train: backward")
    mm = event("aten::mm", step, kernels=["nvjet"], start=5.0, end=9.0)
    deep = step
    for depth in range(6):
        deep = event(f"level{depth}", deep)
    inner = event("aten::copy_", deep, kernels=["copy"])
    ops = launching_ops([step, mm, inner, event("nvjet", kernels=["nvjet"], device=cuda)])
    assert ops[0] == (5.0, 9.0, frozenset({"nvjet"}), "train: backward > aten::mm")
    assert ops[1][3] == "train: backward > level0 > level1 > level2 > ... > aten::copy_"
    assert len(ops) == 2
