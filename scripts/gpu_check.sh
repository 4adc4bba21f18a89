#!/usr/bin/env bash
# The whole GPU check in one command, for a short lease on a CUDA machine (`make gpu-check`), its stages limited
# to 460 s together (7.7 minutes; the setup before them, wheels and a device query, takes ~10 s):
#   1. tests (180 s): the CUDA tests and the Triton kernels' tests (both kernel families vs the float64 reference)
#      on GPU_CHECK_TEST_SHARDS (default 16, one per CPU core of the lent machines) pytest processes side by side
#      (scripts/gpu_test_shards.sh: on a fresh machine their time is mostly Triton compiling) -> gpu_tests/;
#   2. attention (100 s): the attention benchmark, dilated vs dense flash, with the tuned defaults (`--quick
#      --dq-modes tma`: N = 32K and 1M with dense beside them, cuDNN at 32K, 4M dilated) -> gpu_attention.* and
#      kernel_tuning.json (the settings in use; the later stages run with them through LONGNET_KERNEL_TUNING);
#   3. profile-attention (40 s): where one attention forward+backward spends its time, kernel by kernel and
#      branch by branch, and when the GPU idles, at 32K and 1M, dense beside it (benchmarks/gpu_profile.py
#      --attention-only, ~20 s once the attention stage has compiled the kernels) -> gpu_profile_attention.json;
#   4. host (30 s): the host's time to issue one 32K attention forward+backward against its wall time and against
#      the same call replayed as a CUDA graph, and the host's time by function (benchmarks/host_overhead.py
#      --device cuda --cprofile 50, ~15 s) -> host_overhead_cuda.json;
#   5. train (110 s): the real trainer on the GPU (`--quick --budget 100 --profile`: 32K dilated and dense, ~90 s
#      on an H200 in stop 29; one more 32K step of each model runs under torch.profiler, trainer.profile_step,
#      left out of the timings: its kernel time by category and the GPU's idle gaps go into the row's "profile";
#      the budget skips 1M and 4M, which `make gpu-train-long` runs) when hydra, omegaconf and deepspeed are
#      importable (carry ../shared/offline_wheels.sh's wheels to an offline machine) -> train_cuda_*.
# Opt-in stages: tune (`make gpu-tune`: `gpu_attention.py --tag tune --tune --quick --tune-budget 45 --dq-modes tma
# stream`, the defaults re-timed against their alternatives: shared keys, small launches, side branches, block
# shapes, TMA loads; its kernel_tuning.json goes to the stages after it; 175 s) -> gpu_attention_tune.*; tune-late
# (`make gpu-tune-late`: the dilated 32K and 1M points, then the r = 1 branch last or first, warp specialisation and
# TMA loads per kernel, each kept only if faster and within bf16 of the plain kernel, then those points again if one
# was kept; 170 s)
# -> gpu_attention_tune_late.*; train-long (`make gpu-train-long`: 1M and 4M training steps, dilated, ~65 + ~72 s on an H200;
# 210 s; a GPU with less memory than a 4M step needed, an 80 GB H100, skips 4M at once); profile (the same 32K
# profile in trainer runs of its own, `benchmarks/train.py --profile`, ~100 s) -> train_cuda_*_profile;
# train-waits (`make gpu-train-waits`: the 32K dilated point with the waits for the GPU that stop 30 removed from
# the step put back, DeepSpeed's throughput timer and BF16_Optimizer's host-side overflow check, profiled; ~60 s;
# 100 s) -> train_cuda_*_waits, against the train stage's row; optimizer (what DeepSpeed's engine adds to an optimizer step at ZeRO 0 and at ZeRO 1 with fp32 gradient
# accumulation, benchmarks/optimizer_step.py, ~45 s each); dq-fused (`make gpu-dq-fused`: the backward with dQ
# from the dK/dV loop on the shapes that do not spill, against the separate dQ kernel, at 256K, then 32K and 1M
# with the winner, `gpu_attention.py --backward-only` -> dq_fused/); profile-model (the attention and a training
# step of the bare model, no engine, dilated and dense, benchmarks/gpu_profile.py, 1-2 minutes); head-dim-128 (`make
# gpu-head-dim-128`: the attention stage's points at 6 heads of 128, the same FLOPs, on the blocks of their own
# that stop 33 chose without a GPU, against dense flash at 128; its tuning file stays in d128/; 110 s); suite (`make
# gpu-suite`: every test the tests stage does not run, with CUDA present, as `make test` on a workstation with a GPU,
# less the SLURM tests, scripts/gpu_test_shards.sh with GPU_TEST_SET=rest; tests that need a package the machine
# lacks, `datasets` or `wandb`, skip and say so; 240 s) -> gpu_suite/.
# Each stage has its own time limit, so that a hang cannot eat the lease; a training point that no longer fits
# is recorded as skipped. What the stages took: on a fresh H200 in stop 29 (gpu_check_h200.log), with limits of
# 175/100/40/128 s for tests/attention/host/train, 374 s in all: the tests (12 workers) passed 106 of 111 before
# their limit, none failed, the rest of the run finished inside its limits. On a fresh H200 in stop 27
# (gpu_check_h200_s27.log) the tests needed 232 s alone in a rerun (the slowest, 35-103 s each, start first:
# LONGNET_HEAVY_FIRST); a fresh machine compiles every kernel variant, so a check on a machine that has run
# one before is faster.
# Results are written as they come,
# into $OUT when that is set (a device runner's output folder), else benchmarks/results/;
# GPU_CHECK_ARCHIVE=path.tgz also packs them all into that one file after every stage (a device
# runner brings back only a few files).
# On an offline machine carry the wheels of ../shared/offline_wheels.sh in .whl/ (or GPU_CHECK_WHEELS).
# Stages to run: GPU_CHECK_STAGES="tests attention profile-attention host train" (the default; add or pick the
# opt-in ones); GPU_CHECK_ATTENTION_ARGS, GPU_CHECK_TRAIN_ARGS pass options to the benchmarks (the whole attention
# sweep: GPU_CHECK_ATTENTION_ARGS="--tune" GPU_CHECK_ATTENTION_LIMIT=400); GPU_CHECK_TESTS_LIMIT,
# GPU_CHECK_ATTENTION_LIMIT, GPU_CHECK_TRAIN_LIMIT change those stages' limits.
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
               run "${GPU_CHECK_TESTS_LIMIT:-180}" gpu_tests \
                   scripts/gpu_test_shards.sh "${GPU_CHECK_TEST_SHARDS:-16}" ;;
        suite) # as on a workstation: DeepSpeed finds its accelerator itself (the train stages' DS_ACCELERATOR unset)
               GPU_TEST_LOGS="$results/gpu_suite" GPU_TEST_SET=rest run "${GPU_CHECK_SUITE_LIMIT:-240}" gpu_suite \
                   env -u DS_ACCELERATOR scripts/gpu_test_shards.sh "${GPU_CHECK_TEST_SHARDS:-16}" ;;
        profile-model) run 150 gpu_profile python3 benchmarks/gpu_profile.py --results "$results" ;;
        dq-fused) run "${GPU_CHECK_DQ_FUSED_LIMIT:-240}" gpu_attention_dq_fused python3 benchmarks/gpu_attention.py \
                      --results "$results/dq_fused" --tag dq_fused --backward-only --tune-budget 190 \
                      --dq-modes stream tma atomic ;;
        profile-attention) run 40 gpu_profile_attention python3 benchmarks/gpu_profile.py --attention-only \
                               --results "$results" ;;
        host) run 30 host_overhead python3 benchmarks/host_overhead.py --device cuda --cprofile 50 --results "$results" ;;
        attention) run "${GPU_CHECK_ATTENTION_LIMIT:-100}" gpu_attention python3 benchmarks/gpu_attention.py --results "$results" \
                       ${GPU_CHECK_ATTENTION_ARGS:---quick --dq-modes tma} ;;
        head-dim-128) run 110 gpu_attention_d128 python3 benchmarks/gpu_attention.py --results "$results/d128" \
                          --tag d128 --quick --heads 6 --head-dim 128 --dq-modes tma ;;
        tune-late) run 170 gpu_attention_tune_late python3 benchmarks/gpu_attention.py --results "$results" \
                       --tag tune_late --tune-late --quick --dq-modes tma ;;
        tune) run 175 gpu_attention_tune python3 benchmarks/gpu_attention.py --results "$results" --tag tune --tune \
                  --quick --tune-budget 45 --dq-modes tma stream ;;
        train|train-long|train-waits|optimizer|profile)
               if ! python3 -c "import hydra, omegaconf, deepspeed" 2>/dev/null; then
                   echo "== $stage skipped: hydra/omegaconf/deepspeed not importable (carry the wheels of ../shared/offline_wheels.sh in $wheels/)"
               elif [ "$stage" = train ]; then
                   run "${GPU_CHECK_TRAIN_LIMIT:-110}" train_cuda python3 benchmarks/train.py --device cuda \
                       ${GPU_CHECK_TRAIN_ARGS:---quick --budget 100 --profile}
               elif [ "$stage" = train-long ]; then
                   run 210 train_cuda_long python3 benchmarks/train.py --device cuda --seq-lens 1048576 4194304 \
                       --impls dilated --budget 200 --tag long
               elif [ "$stage" = train-waits ]; then
                   # the waits for the GPU that stop 30 took out of the step, put back: DeepSpeed's throughput
                   # timer (two device syncs a step) and BF16_Optimizer's host-side overflow check
                   run 100 train_cuda_waits env LONGNET_DEVICE_OVERFLOW_CHECK=0 python3 benchmarks/train.py --device cuda \
                       --seq-lens 32768 --impls dilated --profile --budget 90 --tag waits \
                       --override +deepspeed.timers.throughput.enabled=true
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
