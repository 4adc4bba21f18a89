"""The attention benchmark and its tuning steps (benchmarks/gpu_attention.py, gpu_kernels.py), which a GPU lease runs
first, checked on the CPU: the tuning steps through Triton's interpreter on a small problem, their deadline, and
the attention script's bookkeeping and options with stand-ins for what needs a GPU."""
from __future__ import annotations

import json
import sys

import pytest

from subprocess_env import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_the_tuning_steps_run_on_the_cpu(tmp_path, monkeypatch):
    """benchmarks/gpu_kernels.py's tuning steps, which a GPU lease runs first (dQ modes against an fp32
    run, block shapes with the dQ-fused shapes, TMA loads, warp specialisation, small launches, where the covering
    branch runs, side branches, shared keys, kernel_tuning.json),
    on a small fp16
    problem through Triton's interpreter: their control flow, and a file that fused_settings.load_tuning takes.
    Timings here mean nothing (the interpreter runs every shape with its own blocks)."""
    import pytest
    import torch

    pytest.importorskip("triton")
    import gpu_kernels as gk

    from longnet_dist.attention import fused_settings

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shrunk = dict(DEVICE="cpu", REFERENCE_BACKEND="cpu_flash", DTYPE=torch.float16, HEADS=2, HEAD_DIM=16,
                  SEGMENTS=[16, 32], DILATIONS=[1, 2], CHECK_N=48, TUNE_N=48, SMALL_N=48, REPEATS=1, SMALL_REPEATS=1,
                  CANDIDATES={"fwd": [(64, 64, 4, 3)], "dkdv": [(32, 128, 4, 4)], "dkdv_fused_dq": [(32, 64, 4, 4)],
                              "dq": [(64, 64, 4, 3)], "dkdv_small": [(64, 64, 4, 3)]})
    for name, value in shrunk.items():
        monkeypatch.setattr(gk, name, value)
    for name, value in (("DQ_MODE", fused_settings.DQ_MODE), ("TUNED", {}), ("SMALL_LAUNCH_WAVES", 0),
                        ("TMA_LOADS", frozenset()), ("SIDE_BRANCHES", 0), ("SHARE_KEYS", False),
                        ("WARP_SPECIALIZE", frozenset()), ("COVERING_LAST", True)):
        monkeypatch.setattr(fused_settings, name, value)  # restored afterwards

    report = gk.choose_dq_variant(["kernel", "stream", "atomic", "tma"])
    assert all(report[mode]["correct"] for mode in ("kernel", "stream", "atomic", "tma")), report
    assert max(max(report[mode]["errors_out_dq_dk_dv"]) for mode in fused_settings.DQ_MODES) < 4e-3  # fp16 vs fp32
    tuned = gk.tune(list(fused_settings.DQ_MODES))
    # dK/dV is tuned with the dQ mode the timings chose when it runs a dQ kernel of its own, else with "stream";
    # which one the interpreter's timings choose varies from run to run
    separate = report["chosen"] if report["chosen"] in ("kernel", "stream") else "stream"
    assert set(tuned["dkdv"]["seconds"]) == {f"(32, 128, 4, 4) {separate}", "(32, 64, 4, 4) tma",
                                             "(32, 64, 4, 4) atomic"}
    # the dK/dV kernel with dQ inside keeps blocks of its own: each variant its fastest shape
    assert fused_settings.TUNED[("dkdv", False, 16)] == fused_settings.Blocks(32, 128, 4, 4)
    assert fused_settings.TUNED[("dkdv_dq", False, 16)] == fused_settings.Blocks(32, 64, 4, 4)
    assert set(gk.tune(["kernel"], kernels=("dkdv",))) == {"dkdv"}  # `gpu_attention.py --backward-only`
    fused_settings.DQ_MODE = "kernel"  # so that the dQ kernel's loads are tuned too
    tma = gk.tune_tma_loads()
    assert set(tma) == {"fwd", "dkdv", "dq", "chosen"}, tma
    assert all(tma[kernel]["error_vs_pointer"] == 0 for kernel in ("fwd", "dkdv", "dq")), tma  # the same numbers
    specialized = gk.tune_warp_specialize()
    assert set(specialized) == {"fwd", "dkdv", "dq", "chosen"}, specialized
    assert all(specialized[kernel]["error_vs_plain"] == 0 for kernel in ("fwd", "dkdv", "dq")), specialized
    assert fused_settings.WARP_SPECIALIZE == set(specialized["chosen"])
    assert gk.tune_split_backward() == {}  # "kernel" runs a dQ kernel already
    chosen_ws = fused_settings.WARP_SPECIALIZE
    fused_settings.DQ_MODE = "atomic"  # dQ from the dK/dV loop: the split 7-product backward is timed against it
    split = gk.tune_split_backward()
    assert split["error_vs_fused"] < 4e-3 and {"atomic_s", "stream_split_s", "kept"} <= set(split), split
    assert split["chosen"] == [fused_settings.DQ_MODE, sorted(fused_settings.WARP_SPECIALIZE)]
    assert fused_settings.DQ_MODE == ("stream" if split["kept"] else "atomic")
    fused_settings.DQ_MODE, fused_settings.WARP_SPECIALIZE = "kernel", chosen_ws
    small = gk.tune_small_launches()
    assert set(small["seconds"]) == {"0 None", "4 (64, 64, 4, 3)", "8 (64, 64, 4, 3)"}
    assert max(small["errors_vs_off"].values()) == 0  # on the CPU no launch counts as small: same kernels
    covering = gk.tune_covering_last()  # the r = 1 branch first with store passes, or last writing the outputs
    assert set(covering["seconds"]) == {"False", "True"} and covering["errors_vs_off"]["True"] < 4e-3, covering
    assert fused_settings.COVERING_LAST == covering["best"]
    side = gk.tune_side_branches()
    assert set(side["seconds"]) == {"0", "1", "2", "3"} and max(side["errors_vs_off"].values()) < 4e-3, side
    assert fused_settings.SIDE_BRANCHES == side["best"]
    share = gk.tune_share_keys()  # (16, 1) and (32, 2) nest: the second skips half its pairs
    assert set(share["seconds"]) == {"False", "True"} and max(share["errors_vs_off"].values()) < 4e-3, share
    assert fused_settings.SHARE_KEYS == share["best"]
    gk.write_tuning(tmp_path)
    chosen = (fused_settings.DQ_MODE, fused_settings.SMALL_LAUNCH_WAVES, fused_settings.TMA_LOADS,
              fused_settings.SIDE_BRANCHES, fused_settings.SHARE_KEYS, fused_settings.WARP_SPECIALIZE,
              fused_settings.COVERING_LAST)
    assert fused_settings.TMA_LOADS == set(tma["chosen"])
    monkeypatch.setattr(fused_settings, "DQ_MODE", "kernel")
    monkeypatch.setattr(fused_settings, "TMA_LOADS", frozenset({"nothing"}))
    monkeypatch.setattr(fused_settings, "SHARE_KEYS", not share["best"])
    monkeypatch.setattr(fused_settings, "WARP_SPECIALIZE", frozenset({"nothing"}))
    monkeypatch.setattr(fused_settings, "COVERING_LAST", not covering["best"])
    fused_settings.load_tuning(tmp_path / "kernel_tuning.json")
    assert (fused_settings.DQ_MODE, fused_settings.SMALL_LAUNCH_WAVES, fused_settings.TMA_LOADS,
            fused_settings.SIDE_BRANCHES, fused_settings.SHARE_KEYS, fused_settings.WARP_SPECIALIZE,
            fused_settings.COVERING_LAST) == chosen


def test_the_tuning_steps_stop_at_their_deadline(monkeypatch, capsys):
    """gpu_attention.py --tune-budget: past gpu_kernels.DEADLINE each step keeps the first setting it timed and
    tries nothing more, so that a time-limited stage still reaches its measured points."""
    import pytest
    import torch

    pytest.importorskip("triton")
    import gpu_kernels as gk

    from longnet_dist.attention import fused_settings

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shrunk = dict(DEVICE="cpu", DTYPE=torch.float16, HEADS=1, HEAD_DIM=16, SEGMENTS=[16], DILATIONS=[1], TUNE_N=32,
                  SMALL_N=32, REPEATS=1, SMALL_REPEATS=1, DEADLINE=0.0,
                  CANDIDATES={"fwd": [(64, 64, 4, 3), (64, 64, 4, 4)], "dkdv": [(32, 128, 4, 4), (64, 64, 4, 3)],
                              "dkdv_fused_dq": [(32, 64, 4, 4)], "dq": [(64, 64, 4, 3), (64, 32, 4, 4)],
                              "dkdv_small": [(64, 64, 4, 3)]})
    for name, value in shrunk.items():
        monkeypatch.setattr(gk, name, value)
    for name, value in (("DQ_MODE", "kernel"), ("TUNED", {}), ("SMALL_LAUNCH_WAVES", 0), ("TMA_LOADS", frozenset()),
                        ("SIDE_BRANCHES", 0), ("WARP_SPECIALIZE", frozenset({"dq"}))):
        monkeypatch.setattr(fused_settings, name, value)
    tuned = gk.tune(["kernel", "tma"])
    assert [len(tuned[kernel]["seconds"]) for kernel in ("fwd", "dkdv", "dq")] == [1, 1, 1], tuned
    assert gk.tune_tma_loads() == {"chosen": []}
    monkeypatch.setattr(fused_settings, "TMA_LOADS", frozenset({"fwd"}))  # a choice not timed is kept
    assert gk.tune_tma_loads() == {"chosen": ["fwd"]}
    assert gk.tune_warp_specialize() == {"chosen": ["dq"]}  # untimed: kept
    assert gk.tune_split_backward() == {}
    assert set(gk.tune_small_launches()["seconds"]) == {"0 None"}
    assert gk.tune_side_branches()["seconds"].keys() == {"0"}
    assert "out of tuning time" in capsys.readouterr().out


def test_the_attention_stage_records_summarises_and_plots_its_points(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_attention.py's bookkeeping, which only a lease runs otherwise: each point is printed and
    saved as it comes (a failed one recorded, the sweep going on), the targets are computed from the fastest
    run of each point (a rerun after a later dQ mode included) and against the fastest dense kernel, and
    the plot is written."""
    import gpu_attention as ga

    K, M = ga.K, ga.M
    times = {("dilated", 32 * K): [4e-3, 3e-3], ("dense", 32 * K): [20e-3], ("dense_cudnn", 32 * K): [14e-3],
             ("dilated", M): [0.1], ("dense", M): [20.0]}

    def fake_measure(kind, n, causal, repeats):
        if kind == "dense_sdpa":
            raise RuntimeError("CUDA out of memory")
        seconds = times[(kind, n)].pop(0)
        flops = ga.attention_flops(kind, n, causal)
        point = {"kind": kind, "n": n, "causal": causal, "forward_backward_s": seconds,
                 "forward_backward_tflops": flops * 3.5 / seconds / 1e12, "peak_bytes_per_token": 14 * 1024.0}
        if n == 4 * M:
            point["tail_max_abs_diff"] = 0.0
        return point

    monkeypatch.setattr(ga, "measure", fake_measure)
    times[("dilated", 4 * M)] = [0.45]
    payload, saved = {"points": []}, []
    specs = ga.QUICK + [("dilated", 32 * K, True, 5)]  # the 32K point again, faster
    ga.run_points(specs, payload, lambda: saved.append(len(payload["points"])))
    assert saved == list(range(1, len(specs) + 1))  # saved after every point
    assert "failed: RuntimeError: CUDA out of memory" in capsys.readouterr().out
    targets = payload["targets"]
    dilated = ga.attention_flops("dilated", 32 * K, True) / 3e-3
    assert abs(targets["flops_ratio_32k_causal"] - dilated / (ga.attention_flops("dense", 32 * K, True) / 20e-3)) < 1e-9
    assert "flops_ratio_32k_causal_vs_dense_cudnn" in targets and targets["million_forward_backward_s"] == 0.1
    assert targets["peak_kb_per_token_4m"] == 14.0
    ga.plot(payload["points"], tmp_path / "gpu_attention.png", "test")
    assert (tmp_path / "gpu_attention.png").stat().st_size > 0


def test_the_backward_only_run_tunes_the_backward_and_times_32k_and_1m(tmp_path, monkeypatch):
    """`gpu_attention.py --backward-only` (`make gpu-dq-fused`), its control flow with stand-ins for the GPU
    parts: the dQ modes given are checked, only the backward's kernels are tuned, with the modes that checked
    correct, and the dilated 32K and 1M points are timed and saved with the tuning."""
    import gpu_attention as ga

    calls = {}

    def fake_tune(correct_modes, n=None, kernels=("fwd", "dkdv", "dq"), separate_shapes=None):
        calls["tune"] = (correct_modes, kernels, separate_shapes)
        return {"dkdv": {"best": [64, 64, 8, 3], "dq_mode": "tma"}}

    def fake_measure(kind, n, causal, repeats):
        calls.setdefault("points", []).append((kind, n))
        return {"kind": kind, "n": n, "causal": causal, "forward_backward_s": 0.09, "forward_backward_tflops": 250.0,
                "peak_bytes_per_token": 14 * 1024.0}

    monkeypatch.setattr(ga.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ga, "machine", lambda: {"gpu": "stand-in GPU", "torch": ga.torch.__version__})
    monkeypatch.setattr(ga, "choose_dq_variant", lambda modes: {
        "stream": {"correct": True}, "tma": {"correct": True}, "atomic": {"correct": False}, "chosen": "stream"})
    monkeypatch.setattr(ga, "tune", fake_tune)
    monkeypatch.setattr(ga, "measure", fake_measure)
    monkeypatch.setattr(ga, "write_tuning", lambda folder: (folder / "kernel_tuning.json").write_text("{}"))
    monkeypatch.setattr(sys, "argv", ["gpu_attention.py", "--results", str(tmp_path / "dq_fused"), "--tag", "dq_fused",
                                      "--backward-only", "--dq-modes", "stream", "tma", "atomic"])
    ga.main()
    assert calls["tune"] == (["stream", "tma"], ("dkdv",), 1)  # the separate dQ kernel's default blocks only
    assert calls["points"] == [("dilated", 32 * ga.K), ("dilated", ga.M)]
    saved = json.loads((tmp_path / "dq_fused" / "gpu_attention_dq_fused.json").read_text())
    assert saved["tuning"]["dkdv"]["dq_mode"] == "tma" and len(saved["points"]) == 2
    assert saved["targets"]["million_forward_backward_s"] == 0.09
    assert (tmp_path / "dq_fused" / "kernel_tuning.json").exists()


def test_the_attention_benchmark_runs_at_another_head_dim(tmp_path, monkeypatch):
    """`gpu_attention.py --heads 6 --head-dim 128` (`make gpu-head-dim-128`): every input, point and FLOP count at
    6 x 128 (the paper's 12 x 64 FLOPs), recorded in the JSON; a head dim above 128 is one clear error."""
    import gpu_attention as ga
    import gpu_kernels as gk

    monkeypatch.setattr(gk, "HEADS", gk.HEADS)  # restored after the test
    monkeypatch.setattr(gk, "HEAD_DIM", gk.HEAD_DIM)
    flops_64 = ga.attention_flops("dilated", ga.M, True)
    shapes = []

    def fake_measure(kind, n, causal, repeats):
        shapes.append(tuple(gk.make_inputs(256)[0].shape))
        return {"kind": kind, "n": n, "causal": causal, "forward_backward_s": 0.09,
                "forward_backward_tflops": ga.attention_flops(kind, n, causal) * 3.5 / 0.09 / 1e12,
                "peak_bytes_per_token": 14 * 1024.0}

    monkeypatch.setattr(gk, "DEVICE", "cpu")
    monkeypatch.setattr(ga.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ga, "machine", lambda: {"gpu": "stand-in GPU", "torch": ga.torch.__version__})
    monkeypatch.setattr(ga, "choose_dq_variant", lambda modes: {"tma": {"correct": True}, "chosen": "tma"})
    monkeypatch.setattr(ga, "measure", fake_measure)
    monkeypatch.setattr(ga, "write_tuning", lambda folder: (folder / "kernel_tuning.json").write_text("{}"))
    monkeypatch.setattr(ga, "QUICK", [("dilated", ga.M, True, 1), ("dense", 32 * ga.K, True, 1)])
    monkeypatch.setattr(sys, "argv", ["gpu_attention.py", "--results", str(tmp_path), "--tag", "d128", "--quick",
                                      "--heads", "6", "--head-dim", "128", "--dq-modes", "tma"])
    ga.main()
    assert shapes == [(1, 256, 6, 128)] * 2
    saved = json.loads((tmp_path / "gpu_attention_d128.json").read_text())
    assert (saved["heads"], saved["head_dim"]) == (6, 128)
    assert ga.attention_flops("dilated", ga.M, True) == flops_64  # 6 heads of 128: the FLOPs of 12 of 64
    monkeypatch.setattr(sys, "argv", ["gpu_attention.py", "--head-dim", "160"])
    with pytest.raises(SystemExit, match=r"--heads 12 --head-dim 160: want heads >= 1 and 1 <= head_dim <= 128"):
        ga.main()
