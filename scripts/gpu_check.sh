#!/usr/bin/env bash
# The whole GPU check in one command, for a short lease on a CUDA machine (`make gpu-check`):
#   1. tests: the CUDA tests and the Triton kernels' tests (both kernel families vs the float64
#      reference) on GPU_CHECK_TEST_SHARDS (default 12) pytest processes side by side
#      (scripts/gpu_test_shards.sh: on a fresh machine their time is mostly Triton compiling) -> gpu_tests/;
#   2. attention: the attention benchmark, dilated vs dense flash (default `--tune --quick
#      --tune-budget 45 --dq-modes tma stream`: those two dQ modes, the fastest on an H200 in stop 28 (dQ from
#      the dK/dV loop by TMA reductions, and a dQ kernel of its own on a second stream), and shared keys at 256K,
#      small launches and side
#      branches at 32K, block shapes at 256K, for at most 45 s; then N = 32K, 1M and 4M; then TMA loads)
#      -> gpu_attention.* and
#      kernel_tuning.json (the settings chosen; the later stages run with them through LONGNET_KERNEL_TUNING);
#   3. profile-attention: where one attention forward+backward spends its time, kernel by kernel and branch by
#      branch, at 32K and 1M, dense beside it (benchmarks/gpu_profile.py --attention-only, ~20 s once the
#      attention stage has compiled the kernels) -> gpu_profile_attention.json;
#   4. host: the host's time to issue one 32K attention forward+backward against its wall time and against the
#      same call replayed as a CUDA graph, and the host's time by function (benchmarks/host_overhead.py --device
#      cuda --cprofile 50, ~15 s; stop 28's profile found 2.86 ms of kernels in a 3.97 ms step)
#      -> host_overhead_cuda.json;
#   5. train: the real trainer on the GPU (default `--quick --budget 160 --profile`: 32K dilated and dense,
#      1M and, if the budget leaves time, 4M dilated; a 4M step completed on an H200 in stop 14, and a GPU
#      with less memory than it needed there, an 80 GB H100, skips it at once; one more 32K step of each
#      model runs under torch.profiler, trainer.profile_step, left out of the timings: its kernel time by
#      category beside the step's wall time goes into the row's "profile")
#      when hydra, omegaconf and deepspeed are importable (carry ../shared/offline_wheels.sh's wheels
#      to an offline machine) -> train_cuda_*;
#   opt-in: profile (the same 32K profile in trainer runs of its own, `benchmarks/train.py --profile`, ~100 s)
#   -> train_cuda_*_profile;
#   optimizer (what DeepSpeed's engine adds to an optimizer step at ZeRO 0 and at ZeRO 1 with fp32 gradient
#   accumulation, benchmarks/optimizer_step.py, ~45 s each); dq-fused (`make gpu-dq-fused`: the backward with dQ
#   from the dK/dV loop on the shapes that do not spill, against the separate dQ kernel, at 256K, then 32K and 1M
#   with the winner, `gpu_attention.py --backward-only` -> dq_fused/); profile-model (the attention and a training step
#   of the bare model, no engine, dilated and dense, benchmarks/gpu_profile.py, 1-2 minutes).
# Each stage has its own time limit, 240 + 175 + 45 + 40 + 170 s, so that a hang cannot eat the lease; a training
# point that no longer fits is recorded as skipped. What the stages took on a fresh H100 in stop 19
# (gpu_check_h100.log): the tests more than their then 165 s (all passed in a rerun; the fixed shards
# were badly balanced), the attention stage 95 s of tuning, 75 s of points (4M: 46 s) and the TMA-loads
# tuning after them, the training points 60 s (32K dilated, compiling), 28 s (32K dense) and ~65 s (1M).
# On a fresh H200 in stop 27 (gpu_check_h200_s27.log) the whole run took 437 s: the tests stopped at their then
# 180 s limit with 95 of 105 passed (the slowest, 35-103 s each, had started last; they now go first:
# LONGNET_HEAVY_FIRST) and passed in 232 s in a rerun; attention, profile and training took ~250 s.
# Results are written as they come,
# into $OUT when that is set (a device runner's output folder), else benchmarks/results/;
# GPU_CHECK_ARCHIVE=path.tgz also packs them all into that one file after every stage (a device
# runner brings back only a few files).
# On an offline machine carry the wheels of ../shared/offline_wheels.sh in .whl/ (or GPU_CHECK_WHEELS).
# Stages to run: GPU_CHECK_STAGES="tests attention profile-attention host train" (the default; add or pick "profile",
# "optimizer", "profile-model"); GPU_CHECK_ATTENTION_ARGS, GPU_CHECK_TRAIN_ARGS pass options to the benchmarks (the
# whole attention sweep: GPU_CHECK_ATTENTION_ARGS="--tune" GPU_CHECK_ATTENTION_LIMIT=400);
# GPU_CHECK_TESTS_LIMIT, GPU_CHECK_ATTENTION_LIMIT, GPU_CHECK_TRAIN_LIMIT change those stages' limits.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
results=${OUT:-benchmarks/results}  # a device runner's output folder, when set: results survive a time-out
mkdir -p "$results"
stages=${GPU_CHECK_STAGES:-tests attention profile-attention host train}
started=$(mktemp) && trap 'rm -f "$started"; [ -z "${site:-}" ] || rm -rf "$site"' EXIT  # files newer than this: this run's
status=0
# An offline machine without DeepSpeed/Hydra: install the wheels carried in GPU_CHECK_WHEELS (default .whl/,
# made by ../shared/offline_wheels.sh) into a temporary folder for this run; nothing else is touched.
wheels=${GPU_CHECK_WHEELS:-.whl}
if ! python3 -c "import hydra, omegaconf, deepspeed" 2>/dev/null && compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d)
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$site" DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
        echo "== installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
    else
        echo "== could not install the wheels in $wheels: the train and optimizer stages will be skipped"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

run() {  # run LIMIT_SECONDS NAME COMMAND...: one stage, its log in results/NAME.log
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$results/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

for stage in $stages; do
    case $stage in
        tests) export GPU_TEST_LOGS="$results/gpu_tests"  # every test's line and the slowest, in the archive too
               run "${GPU_CHECK_TESTS_LIMIT:-240}" gpu_tests \
                   scripts/gpu_test_shards.sh "${GPU_CHECK_TEST_SHARDS:-12}" ;;
        profile-model) run 150 gpu_profile python3 benchmarks/gpu_profile.py --results "$results" ;;
        dq-fused) run "${GPU_CHECK_DQ_FUSED_LIMIT:-240}" gpu_attention_dq_fused python3 benchmarks/gpu_attention.py \
                      --results "$results/dq_fused" --tag dq_fused --backward-only --tune-budget 190 \
                      --dq-modes stream tma atomic ;;
        profile-attention) run 45 gpu_profile_attention python3 benchmarks/gpu_profile.py --attention-only \
                               --results "$results" ;;
        host) run 40 host_overhead python3 benchmarks/host_overhead.py --device cuda --cprofile 50 --results "$results" ;;
        attention) run "${GPU_CHECK_ATTENTION_LIMIT:-175}" gpu_attention python3 benchmarks/gpu_attention.py --results "$results" \
                       ${GPU_CHECK_ATTENTION_ARGS:---tune --quick --tune-budget 45 --dq-modes tma stream} ;;
        train|optimizer|profile)
               if ! python3 -c "import hydra, omegaconf, deepspeed" 2>/dev/null; then
                   echo "== $stage skipped: hydra/omegaconf/deepspeed not importable (carry the wheels of ../shared/offline_wheels.sh in $wheels/)"
               elif [ "$stage" = train ]; then
                   run "${GPU_CHECK_TRAIN_LIMIT:-170}" train_cuda python3 benchmarks/train.py --device cuda \
                       ${GPU_CHECK_TRAIN_ARGS:---quick --budget 160 --profile}
               elif [ "$stage" = profile ]; then
                   run 120 train_profile python3 benchmarks/train.py --device cuda --seq-lens 32768 --steps 3 \
                       --profile --budget 110 --tag profile
               else
                   # DeepSpeed's two bf16 wrappers: stage 0 (FP16_UnfusedOptimizer, today's) and stage 1 with fp32
                   # gradient accumulation (BF16_Optimizer)
                   run 45 optimizer_step python3 benchmarks/optimizer_step.py --device cuda
                   run 45 optimizer_step_zero1 python3 benchmarks/optimizer_step.py --device cuda --zero-stage 1 \
                       --grad-accum-dtype fp32
               fi
               # these write into benchmarks/results/: copy what this run wrote next to the other results
               [ "$results" = benchmarks/results ] || find benchmarks/results -maxdepth 1 -type f -newer "$started" \
                   \( -name 'train_cuda*' -o -name 'optimizer_step_cuda*' \) -exec cp -f {} "$results"/ \; ;;
        *) echo "unknown stage $stage"; status=1 ;;
    esac
    if [ -f "$results/kernel_tuning.json" ]; then export LONGNET_KERNEL_TUNING=$(realpath "$results/kernel_tuning.json"); fi
    if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then tar czf "$GPU_CHECK_ARCHIVE" -C "$results" . ; fi
done
exit $status
