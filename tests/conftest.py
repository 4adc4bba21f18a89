"""Test-session setup shared by every test file."""
import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter (numpy): the fused
# attention kernels' logic is tested that way. It must be set before the kernels module is imported
# (the jit decorator reads it). On a machine with CUDA the kernels compile and run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """LONGNET_TEST_SHARD="i/n" keeps every n-th collected test starting at the i-th (0-based), so n
    processes split a run: scripts/gpu_check.sh runs the CUDA tests as parallel shards, because on a
    fresh GPU machine most of their time is Triton compiling kernels on one CPU core each."""
    if os.environ.get("LONGNET_HEAVY_FIRST") == "1":
        # scripts/gpu_test_shards.sh: the tests marked gpu_heavy (35-105 s each on a fresh H200, mostly compiling)
        # go first, so that each starts on a worker of its own instead of last, after the short ones (stop 27:
        # they all finished last and the stage took 232 s)
        items.sort(key=lambda item: item.get_closest_marker("gpu_heavy") is None)
    shard = os.environ.get("LONGNET_TEST_SHARD")
    if not shard:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise SystemExit(f"LONGNET_TEST_SHARD={shard!r} must be 'i/n' with 0 <= i < n, e.g. '0/4'") from None
    kept = items[index::count]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
