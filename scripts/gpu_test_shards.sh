#!/usr/bin/env bash
# The CUDA tests as N pytest processes side by side (scripts/gpu_check.sh's "tests" stage): on a
# fresh GPU machine most of their time is Triton compiling kernel variants, one CPU core per process.
# Usage: scripts/gpu_test_shards.sh RESULTS_DIR [SHARDS=6]; logs and JUnit XML per shard go to
# RESULTS_DIR; exits 0 only if every shard passed. Sharding: LONGNET_TEST_SHARD (tests/conftest.py).
set -uo pipefail
results=${1:?usage: gpu_test_shards.sh RESULTS_DIR [SHARDS]} shards=${2:-6}
pids=() rc=0
for ((i = 0; i < shards; i++)); do
    # -o addopts=-ra: the project's addopts name pytest-timeout, which a bare GPU machine may lack
    LONGNET_TEST_SHARD="$i/$shards" python3 -m pytest tests/test_cuda_attention.py -q -p no:cacheprovider \
        -o addopts=-ra --junitxml="$results/gpu_tests_$i.xml" > "$results/gpu_tests_$i.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || rc=1
    echo "-- shard $i/$shards:"
    tail -n 15 "$results/gpu_tests_$i.log"
done
exit $rc
