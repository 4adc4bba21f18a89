#!/usr/bin/env bash
# The CUDA tests as N pytest processes side by side (scripts/gpu_check.sh's "tests" stage): on a
# fresh GPU machine most of their time is Triton compiling kernel variants, one CPU core per process.
# Usage: scripts/gpu_test_shards.sh [SHARDS=12]; prints each shard's summary, then each failing shard's
# whole log (gpu_check.sh keeps that as gpu_tests.log; a device runner brings back only a few files, so
# the per-shard logs stay in a temporary folder), and exits 0 only if every shard passed. Sharding: LONGNET_TEST_SHARD
# (tests/conftest.py). The files: the CUDA tests and the Triton kernels' tests, which run on CUDA there.
set -uo pipefail
shards=${1:-12}
logs=$(mktemp -d) && trap 'rm -rf "$logs"' EXIT
pids=() rc=0 failed=()
for ((i = 0; i < shards; i++)); do
    # -o addopts=-ra: the project's addopts name pytest-timeout, which a bare GPU machine may lack
    LONGNET_TEST_SHARD="$i/$shards" python3 -m pytest tests/test_cuda_attention.py tests/test_triton_kernels.py tests/test_triton_nesting.py -q \
        -p no:cacheprovider -o addopts=-ra > "$logs/$i.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { rc=1; failed+=("$i"); }
done
{
    for ((i = 0; i < shards; i++)); do echo "-- shard $i/$shards: $(tail -n 1 "$logs/$i.log")"; done
    for i in "${failed[@]}"; do echo "== shard $i/$shards failed, its log:"; cat "$logs/$i.log"; done
}
exit $rc
