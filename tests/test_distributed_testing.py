"""run_multiprocess: results in rank order, worker failures re-raised with the rank, no hangs."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from longnet_dist.distributed.testing import MultiprocessError, run_multiprocess


def _report(rank, world_size, extra):
    return {"rank": rank, "world_size": world_size, "extra": extra, "threads": torch.get_num_threads(),
            "env_rank": os.environ["RANK"], "caller_variable": os.environ.get("LONGNET_TEST_VARIABLE"), "dist_rank": dist.get_rank(), "tensor": torch.full((2,), float(rank))}


def _rank_1_raises(rank, world_size):
    if rank == 1:
        raise KeyError("boom on purpose")
    dist.barrier()  # never completes: rank 1 is gone, so the parent must stop this rank
    return rank


def _every_rank_raises(rank, world_size):
    raise ValueError(f"bad value on rank {rank}")


def _rank_1_dies(rank, world_size):
    if rank == 1:
        os._exit(3)
    dist.barrier()
    return rank


def _sleep_forever(rank, world_size, pid_dir):
    with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as pid_file:
        pid_file.write(str(os.getpid()))
    time.sleep(600)


def test_results_come_back_in_rank_order(monkeypatch):
    monkeypatch.delenv("LONGNET_TEST_VARIABLE", raising=False)
    assert [result["caller_variable"] for result in run_multiprocess(_report, 1, None)] == [None]
    # Set after a first run (a forkserver already started): workers must still see it.
    monkeypatch.setenv("LONGNET_TEST_VARIABLE", "set by the caller")
    results = run_multiprocess(_report, 2, "payload")
    for rank, result in enumerate(results):
        assert {key: result[key] for key in ("rank", "world_size", "extra", "threads", "env_rank", "dist_rank")} == {
            "rank": rank, "world_size": 2, "extra": "payload", "threads": 1, "env_rank": str(rank), "dist_rank": rank}
        assert result["caller_variable"] == "set by the caller"
        assert torch.equal(result["tensor"], torch.full((2,), float(rank)))


def test_exception_on_rank_1_is_raised_with_rank_and_traceback():
    started = time.monotonic()
    with pytest.raises(MultiprocessError, match="rank 1 raised") as caught:
        run_multiprocess(_rank_1_raises, 2, timeout=120)
    assert caught.value.rank == 1
    assert "KeyError: 'boom on purpose'" in caught.value.worker_traceback
    assert "_rank_1_raises" in caught.value.worker_traceback
    # rank 0 was stuck in a barrier: it must have been killed, not waited for until the timeout
    assert time.monotonic() - started < 60


def test_when_every_rank_raises_the_first_one_is_reported():
    with pytest.raises(MultiprocessError, match=r"ValueError: bad value on rank \d") as caught:
        run_multiprocess(_every_rank_raises, 2)
    assert caught.value.later_failed_ranks == (1 - caught.value.rank,)
    assert f"bad value on rank {caught.value.rank}" in caught.value.worker_traceback


def test_rank_that_dies_without_exception_is_reported():
    with pytest.raises(MultiprocessError, match="rank 1 raised:\nprocess exited with code 3"):
        run_multiprocess(_rank_1_dies, 2, timeout=120)


def test_timeout_kills_workers(tmp_path):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] not done after 8 s"):
        run_multiprocess(_sleep_forever, 2, str(tmp_path), timeout=8)
    assert time.monotonic() - started < 20
    pids = [int(path.read_text()) for path in sorted(tmp_path.glob("*.pid"))]
    assert len(pids) == 2, "workers did not start within the 8 s timeout"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
