"""longnet_dist.train.checkpoint against real DeepSpeed engines (tiny model, CPU, gloo).

Each scenario runs in spawned ranks (run_multiprocess) so DeepSpeed's global state never leaks into
the pytest process. Weights are compared exactly: a checkpoint round trip must be bit-identical.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

from tmpfs import mounted_tmpfs
from longnet_dist.distributed.testing import run_multiprocess
from longnet_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def ranks_on_cpu(monkeypatch):
    """The spawned ranks talk gloo, so their engines must live on the CPU: with a GPU visible DeepSpeed
    would put the model on it. run_multiprocess hands this environment to every rank."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def make_engine(seed: int, zero_stage: int = 0, width: int = 16):
    """A DeepSpeed engine around a tiny MLP, after one AdamW step (so optimizer state exists)."""
    import deepspeed
    import deepspeed.ops

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # As the trainer does (train/engine.py): skip JIT-building DeepSpeed's shared-memory all-reduce,
    # which only its inference path uses and which takes a minute on a fresh machine.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
    world = torch.distributed.get_world_size()
    config = {
        "train_batch_size": 2 * world,
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(torch.randn(2, width)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return engine


def weights(engine) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in engine.module.state_dict().items()}


def optimizer_moments(engine) -> list[torch.Tensor]:
    optimizer_state = engine.optimizer.state_dict()
    state = optimizer_state.get("base_optimizer_state", optimizer_state)["state"]  # ZeRO wraps it
    return [entry["exp_avg"].clone() for _, entry in sorted(state.items())]


def _round_trip(rank: int, world: int, root: str, zero_stage: int) -> dict:
    source = make_engine(seed=1, zero_stage=zero_stage)
    saved = [ckpt.save_checkpoint(source, root, step, {"step": step, "data": {"epoch": 0}}, keep_last=2)
             for step in (1, 2, 3)]
    target = make_engine(seed=2, zero_stage=zero_stage)
    assert any(not torch.equal(weights(target)[key], value) for key, value in weights(source).items())
    client_state = ckpt.load_checkpoint(target, saved[-1])
    same_weights = all(torch.equal(weights(target)[key], value) for key, value in weights(source).items())
    same_moments = all(torch.equal(a, b) for a, b in zip(optimizer_moments(source), optimizer_moments(target)))
    return {"saved": [str(path) for path in saved], "client_state": client_state,
            "same_weights": same_weights, "same_moments": same_moments}


def test_save_load_round_trip_keep_last_and_manifest(tmp_path):
    """Two ranks under ZeRO-1, so each rank writes its own optimizer shard into the same folder."""
    world, zero_stage = 2, 1
    results = run_multiprocess(_round_trip, world, str(tmp_path), zero_stage, timeout=300)
    result = results[0]
    assert result["saved"] == [str(tmp_path / f"step_{step:08d}") for step in (1, 2, 3)]
    assert all(item["saved"] == result["saved"] for item in results)
    assert all(item["same_weights"] and item["same_moments"] for item in results)
    assert result["client_state"] == {"step": 3, "data": {"epoch": 0}}
    # keep_last=2: step 1 pruned; no temp folders; `latest` names the newest. (DeepSpeed also copies
    # its zero_to_fp32.py recovery scripts into the root under ZeRO.)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(("step_", "latest"))) == [
        "latest", "step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text() == "step_00000003"
    manifest = ckpt.verify_checkpoint(tmp_path / "step_00000003", checksums=True)
    names = set(manifest["files"])
    assert "mp_rank_00_model_states.pt" in names
    assert {name for name in names if "optim_states" in name} == {
            f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(world)
        }
    assert all(entry["size"] == (tmp_path / "step_00000003" / name).stat().st_size
               for name, entry in manifest["files"].items())


def _save_two(rank: int, world: int, root: str) -> None:
    engine = make_engine(seed=1)
    for step in (10, 20):
        ckpt.save_checkpoint(engine, root, step, {"step": step})


def _load_each(rank: int, world: int, paths: list[str]) -> list[str]:
    """The error message of loading each path into a fresh engine ("loaded" if none)."""
    engine, messages = make_engine(seed=3), []
    for path in paths:
        try:
            ckpt.load_checkpoint(engine, path)
            messages.append("loaded")
        except ckpt.CheckpointError as error:
            messages.append(f"{type(error).__name__}: {error}")
    return messages


def _newest_file(folder: Path) -> Path:
    return folder / "mp_rank_00_model_states.pt"


def test_corrupt_checkpoints_fall_back_or_fail_naming_the_file(tmp_path, caplog):
    run_multiprocess(_save_two, 1, str(tmp_path), timeout=240)
    older, newer = tmp_path / "step_00000010", tmp_path / "step_00000020"
    assert ckpt.find_latest_checkpoint(tmp_path) == newer
    # A temp folder from a crashed save, even with a larger step, is never picked.
    (tmp_path / "step_00000030.tmp-deadbeef").mkdir()
    assert ckpt.find_latest_checkpoint(tmp_path) == newer

    # Flipped byte, same size: only the checksum sees it.
    states = _newest_file(newer)
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    assert ckpt.find_latest_checkpoint(tmp_path) == newer
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert ckpt.find_latest_checkpoint(tmp_path, checksums=True) == older
    assert str(newer) in caplog.text and "sha256" in caplog.text
    flipped_error, root_error, older_loaded = run_multiprocess(
        _load_each, 1, [str(newer), str(tmp_path), str(older)], timeout=240)[0]
    assert flipped_error.startswith("CorruptCheckpointError") and f"{states} has the right size but a wrong sha256" in flipped_error
    assert "is a checkpoint root, not a checkpoint" in root_error
    assert older_loaded == "loaded"

    # Truncated: sizes catch it without reading data; fallback warns naming the folder and file.
    os.truncate(states, 100)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert ckpt.find_latest_checkpoint(tmp_path) == older
    assert f"skipping checkpoint {newer}" in caplog.text and "truncated" in caplog.text
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"{states} has 100 bytes"):
        ckpt.verify_checkpoint(newer)

    # No COMPLETE marker (a save killed before publishing, then renamed by hand): skipped too.
    (older / ckpt.COMPLETE_NAME).unlink()
    assert ckpt.find_latest_checkpoint(tmp_path) is None
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"{older / 'COMPLETE'} is missing"):
        ckpt.verify_checkpoint(older)


def _disk_full_mid_save(rank: int, world: int, root: str) -> str:
    engine = make_engine(seed=1)
    first = ckpt.save_checkpoint(engine, root, 1, {"step": 1})
    original_save = engine.checkpoint_engine.save

    def write_half_then_enospc(state_dict, path):
        Path(path).write_bytes(b"x" * 1000)  # a partial file, as a real full disk leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    engine.checkpoint_engine.save = write_half_then_enospc
    try:
        ckpt.save_checkpoint(engine, root, 2, {"step": 2})
    except ckpt.CheckpointDiskFullError as error:
        message = str(error)
    else:
        raise AssertionError("save_checkpoint did not raise on ENOSPC")
    engine.checkpoint_engine.save = original_save
    assert ckpt.find_latest_checkpoint(root, checksums=True) == first
    assert ckpt.load_checkpoint(make_engine(seed=2), first) == {"step": 1}
    return message


def test_disk_full_mid_save_keeps_previous_checkpoint(tmp_path):
    message = run_multiprocess(_disk_full_mid_save, 1, str(tmp_path), timeout=240)[0]
    assert "disk full" in message and str(tmp_path / "step_00000002.tmp-") in message
    assert "step_00000001" in message  # names the newest intact checkpoint
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest", "step_00000001"]


def _save_into(rank: int, world: int, root: str, width: int) -> str:
    engine = make_engine(seed=1, width=width)
    try:
        ckpt.save_checkpoint(engine, root, 1, {})
    except ckpt.CheckpointDiskFullError as error:
        return str(error)
    return "saved"


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """A 64 KiB tmpfs: the first save of a ~300 KiB checkpoint hits a real ENOSPC."""
    with mounted_tmpfs(tmp_path / "small_fs", "64k", "ENOSPC is covered by the test above") as mount_point:
        message = run_multiprocess(_save_into, 1, str(mount_point / "ckpt"), 256, timeout=240)[0]
        assert message.startswith("disk full while saving checkpoint step 1"), message
        assert str(mount_point / "ckpt" / "step_00000001.tmp-") in message
        assert list((mount_point / "ckpt").iterdir()) == []  # partial save removed


def _devices(rank: int, world: int) -> tuple:
    from deepspeed.accelerator import get_accelerator

    return os.environ["CUDA_VISIBLE_DEVICES"], get_accelerator().device_name(), str(make_engine(seed=1).device)


def test_ranks_run_deepspeed_on_the_cpu():
    """What ranks_on_cpu guarantees on a GPU machine too: no GPU visible, DeepSpeed's CPU accelerator."""
    assert run_multiprocess(_devices, 1, timeout=240) == [("", "cpu", "cpu")]


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="keep_last=0"):
        ckpt.save_checkpoint(object(), tmp_path, 1, {}, keep_last=0)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        ckpt.checkpoint_step(tmp_path / "global_step5")
    assert ckpt.find_latest_checkpoint(tmp_path / "missing") is None
