"""longnet_dist.train.faults: stop signals and the non-finite loss policy (unit level)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal

import pytest
import torch

from longnet_dist.distributed.testing import run_multiprocess
from longnet_dist.train import faults


def test_stop_signal_sets_flag_and_restores_handlers(capfd):
    previous = signal.getsignal(signal.SIGUSR1)
    with faults.StopSignal() as stop:
        assert not stop.requested and not stop.sync()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first name
        assert stop.signal_name == "SIGUSR1" and stop.sync()
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert "received SIGUSR1: saving a checkpoint and stopping" in capfd.readouterr().err
    with pytest.raises(ValueError, match="SIGNOPE"):
        faults.StopSignal(("SIGNOPE",))


def test_check_finite_loss_policies(tmp_path, caplog):
    assert faults.check_finite_loss(torch.tensor(2.5), 7, "stop", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written for a finite loss

    with pytest.raises(faults.NonFiniteLossError, match=r"non-finite loss nan at step 12") as caught:
        faults.check_finite_loss(torch.tensor(float("nan")), 12, "stop", tmp_path, lr=3e-4, grad_norm=float("inf"))
    assert caught.value.step == 12 and math.isnan(caught.value.value)
    record = json.loads(caught.value.diagnostics_path.read_text())
    assert caught.value.diagnostics_path == tmp_path / "nonfinite_loss_step_00000012.json"
    assert record["step"] == 12 and record["loss"] == "nan" and record["lr"] == 3e-4
    assert record["grad_norm"] == "inf" and record["policy"] == "stop"

    with caplog.at_level(logging.WARNING, logger=faults.__name__):
        assert faults.check_finite_loss(float("-inf"), 13, "skip", tmp_path) is False
    assert "non-finite loss -inf at step 13" in caplog.text and "skipping" in caplog.text
    assert (tmp_path / "nonfinite_loss_step_00000013.json").exists()

    with pytest.raises(ValueError, match=r"'ignore' is not one of \['stop', 'skip'\]"):
        faults.check_finite_loss(1.0, 1, "ignore", tmp_path)


def _two_ranks(rank: int, world: int, diagnostics_dir: str) -> dict:
    stop = faults.StopSignal()
    try:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        first = stop.sync()  # starts the gather of this step's flags; decides from the previous one (none)
        stopped = stop.sync() and not first
        if rank == 0:  # a value the same on every rank, finite: no collective (rank 1 joins none; a gather would hang)
            assert faults.check_finite_loss(2.0, 4, "stop", diagnostics_dir, same_on_every_rank=True)
        loss = float("inf") if rank == 1 else 1.0
        try:
            faults.check_finite_loss(loss, 5, "stop", diagnostics_dir)
            message = "no error"
        except faults.NonFiniteLossError as error:
            message = str(error)
        return {"stopped": stopped, "name": stop.signal_name, "message": message}
    finally:
        stop.restore()


def test_all_ranks_agree_on_stop_and_nonfinite_loss(tmp_path):
    """Both ranks stop at the same sync, the second after the signal (the first only starts the gather of the
    flags); a non-finite loss on one rank stops both, naming it."""
    rank0, rank1 = run_multiprocess(_two_ranks, 2, str(tmp_path), timeout=120)
    assert rank0["stopped"] and rank1["stopped"]
    assert rank1["name"] == "SIGTERM" and rank0["name"] == "stop signal on rank 1"
    for result in (rank0, rank1):  # rank 0's loss was finite, yet it stops too, naming rank 1
        assert "non-finite loss inf at step 5 on rank(s) [1]" in result["message"]
    record = json.loads((tmp_path / "nonfinite_loss_step_00000005_rank0.json").read_text())
    assert record["loss_by_rank"] == ["1.0", "inf"]
