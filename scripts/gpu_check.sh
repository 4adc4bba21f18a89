#!/usr/bin/env bash
# The whole GPU check in one command, for a short lease on a CUDA machine (`make gpu-check`):
#   1. the CUDA tests (both kernel families vs the float64 reference),
#   2. the attention benchmark (dilated vs dense flash, N = 32K .. 4M) -> benchmarks/results/gpu_attention.*,
#   3. the training benchmark on the GPU when its packages are importable -> benchmarks/results/train_cuda.*
#   4. what DeepSpeed's engine adds to an optimizer step (benchmarks/optimizer_step.py, same packages)
#   (opt-in) profile: where the time goes, kernel by kernel (benchmarks/gpu_profile.py, ~1 minute)
# Each stage has its own time limit (100 + 200 + 130 + 45 s: under 8 minutes in all), so that a hang
# cannot eat the lease; results are written as they come, into $OUT when that is set (a device
# runner's output folder), else benchmarks/results/. The training stage needs hydra, omegaconf and
# deepspeed importable (carry the wheels of ../shared/offline_wheels.sh to an offline machine).
# Stages to run: GPU_CHECK_STAGES="tests attention train optimizer" (the default; add or pick "profile");
# GPU_CHECK_ATTENTION_ARGS, GPU_CHECK_TRAIN_ARGS pass options to the benchmarks, GPU_CHECK_ATTENTION_LIMIT,
# GPU_CHECK_TRAIN_LIMIT change those stages' limits (e.g. a second call for the long training steps:
# GPU_CHECK_STAGES=train GPU_CHECK_TRAIN_LIMIT=300 GPU_CHECK_TRAIN_ARGS="--seq-lens 1048576 4194304
# --impls dilated --budget 280" make gpu-check). The CUDA tests run
# as GPU_CHECK_TEST_SHARDS (default 6) pytest processes side by side (scripts/gpu_test_shards.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
results=${OUT:-benchmarks/results}  # a device runner's output folder, when set: results survive a time-out
mkdir -p "$results"
stages=${GPU_CHECK_STAGES:-tests attention train optimizer}
started=$(mktemp) && trap 'rm -f "$started"' EXIT  # files newer than this were written by this run
status=0
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
        tests) run 100 gpu_tests scripts/gpu_test_shards.sh "$results" "${GPU_CHECK_TEST_SHARDS:-6}" ;;
        profile) run 150 gpu_profile python3 benchmarks/gpu_profile.py --results "$results" ;;
        attention) run "${GPU_CHECK_ATTENTION_LIMIT:-200}" gpu_attention python3 benchmarks/gpu_attention.py --results "$results" \
                       ${GPU_CHECK_ATTENTION_ARGS:-} ;;
        train|optimizer)
               if ! python3 -c "import hydra, omegaconf, deepspeed" 2>/dev/null; then
                   echo "== $stage skipped: hydra/omegaconf/deepspeed not importable (carry wheels: ../shared/offline_wheels.sh)"
               elif [ "$stage" = train ]; then
                   run "${GPU_CHECK_TRAIN_LIMIT:-130}" train_cuda python3 benchmarks/train.py --device cuda \
                       ${GPU_CHECK_TRAIN_ARGS:---quick --budget 110}
               else
                   run 45 optimizer_step python3 benchmarks/optimizer_step.py --device cuda
               fi
               # these two write into benchmarks/results/: copy what this run wrote next to the other results
               [ "$results" = benchmarks/results ] || find benchmarks/results -maxdepth 1 -type f -newer "$started" \
                   \( -name 'train_cuda*' -o -name 'optimizer_step_cuda*' \) -exec cp -f {} "$results"/ \; ;;
        *) echo "unknown stage $stage"; status=1 ;;
    esac
done
exit $status
