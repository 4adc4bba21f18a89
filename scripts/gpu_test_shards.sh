#!/usr/bin/env bash
# The CUDA tests as N pytest processes side by side (scripts/gpu_check.sh's "tests" stage): on a
# fresh GPU machine most of their time is Triton compiling kernel variants, one CPU core per process.
# Usage: scripts/gpu_test_shards.sh [PROCESSES=12]; exits 0 only if every test passed.
# GPU_TEST_SET=rest runs every other test instead (`make gpu-suite`): the suite as a researcher's workstation runs
# it, CUDA present, less the SLURM tests (root and apt-get) and the files below, a file at a time per worker
# (--dist loadfile: module fixtures, trained runs, are made once).
# With pytest-xdist installed (GPU images usually have it) the tests go to N workers as they free up
# (`-n N --dist worksteal`, or `load` on xdist < 3.2): on an H100 in stop 19 fixed shards took 37 s to 236 s for the same number of tests.
# Without it (or with GPU_TEST_MODE=shards), N fixed shards (LONGNET_TEST_SHARD, tests/conftest.py).
# Either way every test's result is printed as it finishes (-v), so a stage stopped at its time limit still
# shows what passed, and the slowest tests are listed at the end (--durations). Logs go to GPU_TEST_LOGS
# (gpu_check.sh: its results folder, packed into its archive), else a temporary folder.
# The files: the CUDA tests (one GPU, and 2 ranks sharing it), the Triton kernels' tests, which run on CUDA there,
# and the CUDA tests of the training step's waits for the GPU (test_host_reads.py: a real bf16 step on the GPU needs
# DeepSpeed and Hydra, which gpu_check.sh installs from the carried wheels; the file's CPU tests run in CI).
set -uo pipefail
processes=${1:-12}
# the tests marked gpu_heavy first (tests/conftest.py): each then starts early on a worker of its own
export LONGNET_HEAVY_FIRST=1
files=(tests/test_cuda_attention.py tests/test_cuda_sequence_parallel.py tests/test_triton_kernels.py tests/test_kernel_launch.py
       tests/test_kernel_blocks.py tests/test_triton_nesting.py tests/test_host_reads.py::test_a_training_step_on_the_gpu_never_waits_for_it
       tests/test_host_reads.py::test_device_values_wait_for_their_own_copy_only)
# -o addopts=-ra: the project's addopts name pytest-timeout, which a bare GPU machine may lack
options=(-v -p no:cacheprovider -o addopts=-ra --durations=25 --durations-min=1)
dist_rest=
if [ "${GPU_TEST_SET:-gpu}" = rest ]; then
    ignored=() && for file in "${files[@]}"; do [[ "$file" == *::* ]] || ignored+=("--ignore=$file"); done
    deselected=() && for file in "${files[@]}"; do [[ "$file" != *::* ]] || deselected+=("--deselect=$file"); done
    files=(tests "${ignored[@]}" "${deselected[@]}" -m "not slurm")
    dist_rest=loadfile
elif [ "${GPU_TEST_SET:-gpu}" != gpu ]; then
    echo "GPU_TEST_SET=${GPU_TEST_SET} must be gpu (the CUDA and kernel tests) or rest (every other test)" >&2
    exit 2
fi
if [ -n "${GPU_TEST_LOGS:-}" ]; then
    logs=$GPU_TEST_LOGS && mkdir -p "$logs"
else
    logs=$(mktemp -d) && trap 'rm -rf "$logs"' EXIT
fi

mode=${GPU_TEST_MODE:-auto}  # xdist, shards, or auto: xdist when importable
[ "$mode" != auto ] || { python3 -c "import xdist" 2>/dev/null && mode=xdist || mode=shards; }
if [ "$mode" = xdist ]; then
    # worksteal (xdist >= 3.2): a worker that runs out takes tests queued on a busy one. Under `load` each worker
    # is handed its first tests at once, so two heavy ones could queue on one worker: in stop 28 a 12-example
    # hypothesis test waited behind the 103 s sharded test and was still running at the stage's 240 s limit.
    dist=load && python3 -c "from xdist.scheduler import WorkStealingScheduling" 2>/dev/null && dist=worksteal
    dist=${dist_rest:-$dist}
    echo "-- pytest-xdist: $processes workers, --dist $dist"
    python3 -m pytest "${files[@]}" -n "$processes" --dist "$dist" "${options[@]}" 2>&1 | tee "$logs/tests.log" \
        | grep --line-buffered -E "PASSED|FAILED|ERROR|SKIPPED| passed| failed|^E |slowest|s (call|setup) "
    exit "${PIPESTATUS[0]}"
fi

pids=() rc=0 shard_logs=()
for ((i = 0; i < processes; i++)); do
    shard_logs+=("$logs/shard$i.log") && : > "${shard_logs[$i]}"  # made now: a background job opens it later
    LONGNET_TEST_SHARD="$i/$processes" python3 -m pytest "${files[@]}" "${options[@]}" > "${shard_logs[$i]}" 2>&1 &
    pids+=($!)
done
# each shard's results as they come (one line per test), then its summary. One follower per log: a single
# `tail` over several files interleaves them by the chunk, not by the line, so one shard's half-written
# "id " line ran into another's text and its result was lost (CI, stop 21). Each grep writes whole lines.
# Every log exists before its follower starts (a glob over logs that background jobs had not yet created
# missed a shard on a loaded machine), and the followers stop once `running` ends, after reading their log
# once more (tail --pid), not after a fixed wait
sleep infinity & running=$!
followers=()
for log in "${shard_logs[@]}"; do
    tail -n +1 -F --pid="$running" "$log" 2>/dev/null | grep --line-buffered -E "PASSED|FAILED|ERROR|SKIPPED" &
    followers+=($!)
done
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then status=passed; else rc=1; status=FAILED; fi
    echo "-- shard $i/$processes $status: $(tail -n 1 "${shard_logs[$i]}")"
done
kill "$running" && wait "${followers[@]}"
for i in "${!pids[@]}"; do
    if grep -q -E "FAILED|ERROR" "${shard_logs[$i]}"; then
        echo "== shard $i/$processes, its log:" && cat "${shard_logs[$i]}"
    fi
done
exit $rc
