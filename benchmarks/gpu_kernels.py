"""The attention kernels the GPU benchmarks time, and the choice of their settings.

The paper's configuration (H = 12, D = 64, bf16, w = 2048..32768, r = 1, 2, 4, 6, 12), random inputs,
one forward of each kernel family ("dilated": the fused Triton kernels; "gather": aten's flash kernel
per branch; "dense", "dense_cudnn", "dense_sdpa": SDPA over the whole sequence with its flash kernel,
cuDNN's kernel, or its own pick), CUDA-event timing; and, for `gpu_attention.py`, the tuning steps: which
way to compute dQ (fused_settings.DQ_MODES, checked against an fp32 run), which block shapes per kernel, which
kernels read their rows through TMA descriptors (fused_settings.TMA_LOADS) and which have their loops split into
specialised warp groups (fused_settings.WARP_SPECIALIZE), whether small causal launches
change (fused_settings.SMALL_LAUNCH_WAVES), how many branches run as a second chain on side streams
(fused_settings.SIDE_BRANCHES), and kernel_tuning.json, which hands the choice to a later
process (fused_settings.load_tuning, LONGNET_KERNEL_TUNING).
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from longnet_dist.attention import dilated_attention

SEGMENTS, DILATIONS = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]
HEADS, HEAD_DIM, DTYPE = 12, 64, torch.bfloat16
K, M = 1024, 1024 * 1024
# Where the tuning runs, its sizes and the fp32 reference's kernels (a CPU test shrinks them all and
# runs the steps through Triton's interpreter: tests/test_gpu_check_tools.py)
DEVICE, REFERENCE_BACKEND = "cuda", "cuda_flash"
CHECK_N, TUNE_N, SMALL_N = 64 * K, 256 * K, 32 * K  # dQ modes checked / shapes tuned / small launches tuned
REPEATS, SMALL_REPEATS = 3, 10  # timed runs per setting at TUNE_N and at SMALL_N (a 32K run is ~4 ms)
DEADLINE = float("inf")  # time.time() past which the tuning steps try nothing new (gpu_attention.py --tune-budget)


def out_of_time(step: str) -> bool:
    """Past DEADLINE: say which tuning step stops there (what it chose so far stays)."""
    if time.time() < DEADLINE:
        return False
    print(f"tune {step}: out of tuning time, stopped here", flush=True)
    return True
# dQ modes that have never run on a GPU: checked after the sweep, so that a fault cannot cost it
# (none now: "tma" ran on an H200 in stop 14)
UNTRIED_DQ_MODES: tuple[str, ...] = ()
CANDIDATES = {  # (block_m, block_n, warps, stages) per kernel, tried by --tune: the first is the default,
    # then the runner-up of the H200 sweeps (gpu_attention_{sweep_,}h200.log; each shape costs a compile)
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 4)],
    # 16x128 tied with 32x128; the 8-warp shapes: 29-42 ms vs 26.4 in stop 14; 64x64 x 8 warps 25.02 ms against
    # 24.69 in stop 28 (H200, 256K). With a separate dQ kernel ("kernel", "stream").
    "dkdv": [(32, 128, 4, 4), (64, 64, 4, 3)],
    # dK/dV computing dQ too ("tma", "atomic": 5 matrix products per block pair instead of 7), the "dkdv_dq"
    # blocks: stop 28's H200 sweep (gpu_attention_dq_fused_h200.log, fwd+bwd at 256K with "tma") timed twelve
    # shapes: 64x64 x 4 warps 23.35-23.97 ms with 2, 3 or 4 stages; 64x128 x 8 warps 25.58; 32x64 x 4 warps 27.30;
    # 128x128 x 8 warps 30.52; the others 28-49 (8 warps at 64 keys per program, 128 queries per step).
    "dkdv_fused_dq": [(64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 3)],
    "dq": [(64, 32, 4, 4), (64, 64, 4, 3)],
    # causal launches of few programs (fused_settings.SMALL_LAUNCH_WAVES): 64 keys per program (half the
    # default's), with 64 or 32 queries per step (both compile without spills for sm_90)
    "dkdv_small": [(64, 64, 4, 3), (32, 64, 4, 4)],
}


def make_inputs(n: int, seed: int = 0, requires_grad: bool = False):
    """q, k, v (leaves that require grad if asked) and an incoming gradient, (1, n, H, D) each."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v, grad = (torch.randn(1, n, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(4))
    return [*(x.requires_grad_(requires_grad) for x in (q, k, v)), grad]


def forward(kind: str, q, k, v, causal: bool):
    if kind.startswith("dense"):  # SDPA over (B, H, N, D) views: its flash kernel, cuDNN's, or its own pick
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"dense": SDPBackend.FLASH_ATTENTION, "dense_cudnn": SDPBackend.CUDNN_ATTENTION}.get(kind)
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    return dilated_attention(q, k, v, SEGMENTS, DILATIONS, causal=causal,
                             backend="triton" if kind == "dilated" else REFERENCE_BACKEND)


def fused_fwd_bwd(q, k, v, grad):
    """A function running one causal forward+backward of the fused kernels: [out, dq, dk, dv]."""
    def run():
        out = forward("dilated", q, k, v, True)
        return [out, *torch.autograd.grad(out, (q, k, v), grad)]
    return run


def grads_of(kind: str, q, k, v, grad, causal: bool = True) -> tuple:
    """(dq, dk, dv) of one forward of `kind` with incoming gradient `grad`."""
    return torch.autograd.grad(forward(kind, q, k, v, causal), (q, k, v), grad)


def relative_errors(results, reference) -> list[float]:
    """||a - b|| / ||b|| per pair, in float32 (reference already float32)."""
    return [((a.float() - b).norm() / b.norm()).item() for a, b in zip(results, reference)]


def cuda_time(fn, repeats: int, warm_up: bool = True, queued: bool = False) -> float:
    """Median seconds of fn() over `repeats` runs, by CUDA events (a host clock off CUDA), after one
    warm-up run (if warm_up). Each run starts on an idle GPU (the host's time to issue its first launches
    included) unless `queued`: then the runs are issued back to back and synchronised once at the end, as a
    model's layers are in training and as triton.testing.do_bench times kernels, so each run's events
    measure the GPU's time for it whenever the host issues faster than the GPU runs."""
    if warm_up:
        fn()
    times = []
    if DEVICE != "cuda":
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    events = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        if not queued:
            stop.synchronize()
        events.append((start, stop))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(stop) / 1000 for start, stop in events)


@contextlib.contextmanager
def refused_blocks_skipped():
    """Blocks a GPU refuses for shared memory raise Triton's OutOfResources, so that a step skips them, instead of
    running smaller under their name (fused_settings.FIT_REFUSED_BLOCKS off). Used as a decorator too."""
    from longnet_dist.attention import fused_settings

    saved, fused_settings.FIT_REFUSED_BLOCKS = fused_settings.FIT_REFUSED_BLOCKS, False
    try:
        yield
    finally:
        fused_settings.FIT_REFUSED_BLOCKS = saved


@refused_blocks_skipped()
def tune(correct_modes: list[str], n: int | None = None, kernels: tuple[str, ...] = ("fwd", "dkdv", "dq"),
         separate_shapes: int | None = None) -> dict:
    """Fastest block shapes per kernel (of `kernels`) at N = n (causal): forward first, then dK/dV with a dQ
    kernel of its own (the chosen mode, or "stream") over CANDIDATES["dkdv"] and, for "tma" and "atomic" if
    they checked correct, with dQ from the dK/dV loop over CANDIDATES["dkdv_fused_dq"]; then dQ unless that
    won. Backward combos are checked against the kernel's first one (both bf16: 2e-2 relative allowed).
    separate_shapes: how many of CANDIDATES["dkdv"] to time with the separate dQ kernel (default all)."""
    from longnet_dist.attention import fused_settings

    q, k, v, grad = make_inputs(n or TUNE_N, requires_grad=True)
    separate = fused_settings.DQ_MODE if fused_settings.DQ_MODE in ("kernel", "stream") else \
        ("stream" if "stream" in correct_modes else "kernel")
    chosen = {}
    for kernel in kernels:
        if kernel == "dq" and fused_settings.DQ_MODE in ("atomic", "tma"):  # no dQ kernel to tune
            break
        shapes = CANDIDATES[kernel][:separate_shapes] if kernel == "dkdv" else CANDIDATES[kernel]
        combos = [(shape, separate if kernel == "dkdv" else fused_settings.DQ_MODE) for shape in shapes]
        if kernel == "dkdv":
            combos += [(shape, mode) for mode in ("tma", "atomic") if mode in correct_modes
                       for shape in CANDIDATES["dkdv_fused_dq"]]
        timings, reference = {}, None
        def blocks_key(mode):  # the dK/dV kernel that computes dQ too has blocks of its own
            return ("dkdv_dq" if kernel == "dkdv" and mode in ("tma", "atomic") else kernel, False, HEAD_DIM)

        for shape, mode in combos:
            if timings and out_of_time(f"{kernel} {shape} {mode}"):  # the first combo always runs
                break
            fused_settings.TUNED[blocks_key(mode)] = fused_settings.Blocks(*shape)
            fused_settings.DQ_MODE = mode
            try:
                if kernel == "fwd":
                    seconds = cuda_time(lambda: forward("dilated", q.detach(), k.detach(), v.detach(), True), REPEATS)
                else:
                    grads = [g.float() for g in grads_of("dilated", q, k, v, grad)]
                    reference = reference or grads
                    off = max(relative_errors(grads, reference))
                    del grads
                    if off > 2e-2:
                        print(f"tune {kernel} {shape} {mode}: off by {off:.1e} from {combos[0]}: skipped")
                        continue
                    seconds = cuda_time(lambda: grads_of("dilated", q, k, v, grad), REPEATS)
                timings[(shape, mode)] = seconds
            except Exception as error:  # a shape that does not fit (shared memory): skip it
                print(f"tune {kernel} {shape} {mode}: {type(error).__name__}: {str(error)[:120]}")
        (best, mode) = min(timings, key=timings.get)
        for key in {blocks_key(m) for _, m in timings}:  # each blocks key keeps its fastest shape
            fastest = min((t, shape) for (shape, m), t in timings.items() if blocks_key(m) == key)[1]
            fused_settings.TUNED[key] = fused_settings.Blocks(*fastest)
        fused_settings.DQ_MODE = mode
        chosen[kernel] = {"best": best, "dq_mode": mode,
                          "seconds": {f"{shape} {m}": t for (shape, m), t in timings.items()}}
        print(f"tune {kernel}: best {best} {mode} ({timings[(best, mode)] * 1e3:.2f} ms); "
              + ", ".join(f"{shape} {m}: {t * 1e3:.2f}" for (shape, m), t in timings.items()), flush=True)
    return chosen


def tune_tma_loads(n: int | None = None) -> dict:
    """fused_settings.TMA_LOADS (tiles through one TMA descriptor per (segment, head)), per kernel:
    _tune_kernel_set."""
    return _tune_kernel_set("tma loads", "TMA_LOADS", "pointer", "tma", n)


def tune_warp_specialize(n: int | None = None) -> dict:
    """fused_settings.WARP_SPECIALIZE (a kernel's loop as one, split into warp groups by Triton), per kernel:
    _tune_kernel_set; a loop the compiler refuses is reported and stays plain."""
    return _tune_kernel_set("warp specialize", "WARP_SPECIALIZE", "plain", "specialized", n)


def tune_split_backward(n: int | None = None) -> dict:
    """When dQ comes from the dK/dV loop ("tma", "atomic": a loop Triton does not split), the 7-product backward
    with both of its kernels split (fused_settings.WARP_SPECIALIZE), dQ on a second stream ("stream"), against it
    by fwd+bwd time at N = n (causal); the faster (within bf16) stays. Nothing to time when a dQ kernel runs already
    (tune_warp_specialize chose for it)."""
    from longnet_dist.attention import fused_settings

    report = {}
    if fused_settings.DQ_MODE in ("kernel", "stream") or out_of_time("split backward"):
        return report
    fwd_bwd = fused_fwd_bwd(*make_inputs(n or TUNE_N, seed=5, requires_grad=True))
    fused_mode, listed = fused_settings.DQ_MODE, fused_settings.WARP_SPECIALIZE
    try:
        reference = [x.float() for x in fwd_bwd()]
        fused_s = cuda_time(fwd_bwd, REPEATS)
        fused_settings.DQ_MODE, fused_settings.WARP_SPECIALIZE = "stream", listed | {"dkdv", "dq"}
        error = max(relative_errors([x.float() for x in fwd_bwd()], reference))
        result = {f"{fused_mode}_s": fused_s, "stream_split_s": cuda_time(fwd_bwd, REPEATS), "error_vs_fused": error}
    except Exception as failure:  # this Triton cannot split them: the backward as it was
        result = {"error": f"{type(failure).__name__}: {str(failure)[:300]}"}
    keep = "error" not in result and result["error_vs_fused"] < 2e-2 and \
        result["stream_split_s"] < result[f"{fused_mode}_s"]
    if not keep:
        fused_settings.DQ_MODE, fused_settings.WARP_SPECIALIZE = fused_mode, listed
    report = {**result, "kept": keep, "chosen": [fused_settings.DQ_MODE, sorted(fused_settings.WARP_SPECIALIZE)]}
    print(f"tune split backward (fwd+bwd): {result}: {'stream, split' if keep else fused_mode}", flush=True)
    return report


def _tune_kernel_set(step: str, setting: str, off_name: str, on_name: str, n: int | None) -> dict:
    """fused_settings.<setting>, a set of the kernels with a row-tile loop (fused_settings.TMA_KERNELS) that
    switch something on, one kernel at a time with the blocks and dQ mode chosen so far (N = n, causal):
    dK/dV and dQ (if a dQ kernel runs) by fwd+bwd time, then the forward by its time, each with the others as
    they stand. Each is checked against the set empty (bf16: 2e-2 relative allowed; they should agree but for
    summation order) and kept only if faster; one the deadline leaves untimed keeps its setting."""
    from longnet_dist.attention import fused_settings

    q, k, v, grad = make_inputs(n or TUNE_N, seed=3, requires_grad=True)
    fwd_bwd = fused_fwd_bwd(q, k, v, grad)

    def fwd():
        return forward("dilated", q.detach(), k.detach(), v.detach(), True)

    def switch(kernels):
        setattr(fused_settings, setting, frozenset(kernels))

    current = getattr(fused_settings, setting)
    switch(())
    reference = [x.float() for x in fwd_bwd()]  # off everywhere
    switch(current)  # a kernel not timed (out of tuning time) keeps its setting
    kernels = [kernel for kernel in sorted(fused_settings.TMA_KERNELS, key=lambda k: k == "fwd")  # an H100 timed fwd
               if kernel != "dq" or fused_settings.DQ_MODE in ("kernel", "stream")]
    report = {}
    for kernel in kernels:
        if out_of_time(f"{step} {kernel}"):
            break
        timed = fwd if kernel == "fwd" else fwd_bwd
        without, with_ = getattr(fused_settings, setting) - {kernel}, getattr(fused_settings, setting) | {kernel}
        try:
            switch(without)
            off_s = cuda_time(timed, REPEATS)
            switch(with_)
            error = max(relative_errors([x.float() for x in fwd_bwd()], reference))
            on_s = cuda_time(timed, REPEATS)
        except Exception as failure:  # this GPU or Triton cannot build it: off
            switch(without)
            report[kernel] = {"error": f"{type(failure).__name__}: {str(failure)[:300]}"}
            print(f"tune {step} {kernel}: {report[kernel]['error']}", flush=True)
            continue
        keep = error < 2e-2 and on_s < off_s
        switch(with_ if keep else without)
        report[kernel] = {f"{off_name}_s": off_s, f"{on_name}_s": on_s, f"error_vs_{off_name}": error, "kept": keep}
        print(f"tune {step} {kernel} ({'fwd' if kernel == 'fwd' else 'fwd+bwd'}): {off_name} {off_s * 1e3:.2f} ms, "
              f"{on_name} {on_s * 1e3:.2f} ms (err {error:.1e}): {on_name if keep else off_name}", flush=True)
    report["chosen"] = sorted(getattr(fused_settings, setting))
    return report


@refused_blocks_skipped()
def fastest_fwd_bwd(step: str, options: list, apply, n: int | None = None) -> dict:
    """The option (applied by `apply(option)`; the first is "off") with the fastest fwd+bwd at N = n (causal),
    each checked against the first (both bf16: only summation order differs, 2e-2 relative allowed); the
    winner stays applied."""
    fwd_bwd = fused_fwd_bwd(*make_inputs(n or SMALL_N, seed=2, requires_grad=True))

    def name(option):
        return " ".join(map(str, option)) if isinstance(option, tuple) else str(option)

    timings, errors, reference = {}, {}, None
    for option in options:
        if timings and out_of_time(f"{step} {name(option)}"):
            break
        apply(option)
        try:
            results = [x.float() for x in fwd_bwd()]
            reference = reference or results
            errors[option] = max(relative_errors(results, reference))
            timings[option] = cuda_time(fwd_bwd, SMALL_REPEATS)
        except Exception as error:  # a shape that does not fit: skipped
            print(f"tune {step} {name(option)}: {type(error).__name__}: {str(error)[:120]}")
    best = min([option for option in timings if errors[option] < 2e-2], key=timings.get)
    apply(best)
    print(f"tune {step} ({(n or SMALL_N) // K}K): best {name(best)} ({timings[best] * 1e3:.3f} ms); "
          + ", ".join(f"{name(o)}: {t * 1e3:.3f} (err {errors[o]:.1e})" for o, t in timings.items()), flush=True)
    return {"best": list(best) if isinstance(best, tuple) else best,
            "seconds": {name(o): t for o, t in timings.items()},
            "errors_vs_off": {name(o): e for o, e in errors.items()}}


def tune_small_launches(n: int | None = None) -> dict:
    """fused_settings.SMALL_LAUNCH_WAVES (0: off, 4, 8) with each "dkdv_small" candidate, at N = n (32K: where
    the long branches are single waves)."""
    from longnet_dist.attention import fused_settings

    def apply(option):
        fused_settings.SMALL_LAUNCH_WAVES, shape = option
        if shape is not None:
            fused_settings.TUNED[("dkdv_small", False, HEAD_DIM)] = fused_settings.Blocks(*shape)

    options = [(0, None)] + [(waves, shape) for waves in (4, 8) for shape in CANDIDATES["dkdv_small"]]
    return fastest_fwd_bwd("small launches", options, apply, n)


def tune_side_branches(n: int | None = None) -> dict:
    """fused_settings.SIDE_BRANCHES (0: one chain, 1, 2, 3 branches of largest r in a second chain on side
    streams), at N = n (32K: the size at which their accumulators fit, and their launches are few programs)."""
    from longnet_dist.attention import fused_settings

    def apply(option):
        fused_settings.SIDE_BRANCHES = option

    return fastest_fwd_bwd("side branches", [0, 1, 2, 3], apply, n)


def tune_share_keys(n: int | None = None) -> dict:
    """fused_settings.SHARE_KEYS (nested branches score the keys they share once: 22% fewer pairs for the paper's
    branches, a flag dot and a multiply per pair in the parents), off or on, at N = n (256K: the long-sequence
    regime, where the attention is all kernel time)."""
    from longnet_dist.attention import fused_settings

    def apply(option):
        fused_settings.SHARE_KEYS = option

    return fastest_fwd_bwd("share keys", [False, True], apply, n or TUNE_N)


def tune_covering_last(n: int | None = None) -> dict:
    """fused_settings.COVERING_LAST: the r = 1 branch first, with store passes after (False), or last, writing the
    16-bit output, dK and dV itself (True), at N = n (256K: where those passes are memory traffic, not launches)."""
    from longnet_dist.attention import fused_settings

    def apply(option):
        fused_settings.COVERING_LAST = option

    return fastest_fwd_bwd("covering last", [False, True], apply, n or TUNE_N)


def choose_dq_variant(modes, incumbent: dict | None = None) -> dict:
    """The given ways to compute dQ (of fused_settings.DQ_MODES) against an fp32 run of the aten path (N = 64K,
    causal), then timed at 256K; the fastest of those within bf16 tolerance (2e-2 relative), and than
    `incumbent` (an earlier report), becomes fused_settings.DQ_MODE."""
    from longnet_dist.attention import fused_settings

    q, k, v, grad = make_inputs(CHECK_N, seed=1)

    def grads(dtype, backend):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = dilated_attention(*inputs, SEGMENTS, DILATIONS, causal=True, backend=backend)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, inputs, grad.to(dtype)))]

    ref = grads(torch.float32, REFERENCE_BACKEND)
    big = make_inputs(TUNE_N, requires_grad=True)
    report = {}
    for mode in modes:
        fused_settings.DQ_MODE = mode
        try:
            errors = relative_errors(grads(DTYPE, "triton"), ref)
            seconds = cuda_time(lambda: grads_of("dilated", *big), REPEATS)
        except Exception as error:  # a mode this GPU or Triton cannot run (e.g. TMA): recorded, not chosen
            report[mode] = {"error": f"{type(error).__name__}: {str(error)[:300]}", "correct": False}
            print(f"dQ {mode}: {report[mode]['error']}", flush=True)
            continue
        report[mode] = {"errors_out_dq_dk_dv": errors, "fwd_bwd_256k_s": seconds, "correct": max(errors) < 2e-2}
        print(f"dQ {mode}: errors {['%.1e' % e for e in errors]}, fwd+bwd 256K {seconds * 1e3:.2f} ms", flush=True)
    timed = {**{m: r for m, r in (incumbent or {}).items() if m != "chosen"}, **report}
    correct = [mode for mode, r in timed.items() if r["correct"]] or ["kernel"]
    fused_settings.DQ_MODE = min(correct, key=lambda mode: timed[mode].get("fwd_bwd_256k_s", float("inf")))
    report["chosen"] = fused_settings.DQ_MODE
    return report


def write_tuning(folder: Path) -> None:
    """kernel_tuning.json: the dQ mode, block shapes, TMA loads, warp specialisation, small launches, side branches,
    shared keys and where the covering branch runs, in use, for
    fused_settings.load_tuning (or the environment variable fused_settings.TUNING_ENV) in a later
    process, e.g. the GPU check's training stage."""
    from longnet_dist.attention import fused_settings

    kernels = dict.fromkeys(kernel for kernel, _ in fused_settings.DEFAULT_BLOCKS)  # fwd, dkdv, dkdv_small, dq
    blocks = {kernel: [*vars(fused_settings.blocks_for(kernel, DTYPE, HEAD_DIM)).values()] for kernel in kernels}
    tuning = {"dq_mode": fused_settings.DQ_MODE, "small_launch_waves": fused_settings.SMALL_LAUNCH_WAVES,
              "tma_loads": sorted(fused_settings.TMA_LOADS), "side_branches": fused_settings.SIDE_BRANCHES,
              "share_keys": fused_settings.SHARE_KEYS, "warp_specialize": sorted(fused_settings.WARP_SPECIALIZE),
              "covering_last": fused_settings.COVERING_LAST,
              "head_dim": HEAD_DIM, "blocks": blocks}
    (folder / "kernel_tuning.json").write_text(json.dumps(tuning, indent=2) + "\n")
