"""Crash-safe DeepSpeed checkpoints: temp tag -> manifest -> COMPLETE marker -> atomic rename.

Layout under `checkpoint_root`:
    step_00000100/                 one folder per saved step (a DeepSpeed "tag")
        mp_rank_00_model_states.pt ...  DeepSpeed's per-rank files
        manifest.json              every file's size and sha256, written by rank 0 after all ranks
        COMPLETE                   sha256 of manifest.json, written last
    step_00000200.tmp-1a2b3c4d/    a save in progress (or one that crashed): never loaded
    latest                         name of the newest folder (for DeepSpeed's own tools)

A folder named step_XXXXXXXX only ever appears by `os.rename` of a fully written, fsynced temp
folder, so a crash mid-save leaves at most a *.tmp-* folder behind, which is ignored and cleaned up.
Every rank must call save_checkpoint / load_checkpoint (DeepSpeed writes and reads per-rank files);
the folder must be on a filesystem all ranks see, as DeepSpeed itself requires.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any


from longnet_dist.distributed.objects import all_gather_object, barrier, broadcast_from_rank0, rank_and_world

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
COMPLETE_NAME = "COMPLETE"
LATEST_NAME = "latest"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TEMP_DIR = re.compile(r"^step_\d{8,}\.(tmp|old)-[0-9a-f]+$")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 64 << 20  # a failed write with less free than this (or 1% of a small disk) = disk full


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint folder is incomplete, truncated or altered; the message names the bad file."""


class CheckpointDiskFullError(CheckpointError):
    """The filesystem filled up while saving; the partial save was removed, older ones are intact."""


def checkpoint_dir_name(step: int) -> str:
    """Folder name of the checkpoint saved after `step` optimizer steps."""
    return f"step_{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """Step number encoded in a checkpoint folder name (ValueError for other names)."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path!s} is not a checkpoint folder (expected a name like step_00000100)")
    return int(match.group(1))


# ----------------------------------------------------------------------------- files
def _sha256(path: Path, *, fsync: bool = False) -> str:
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if fsync:
            os.fsync(handle.fileno())
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temp file and a rename: readers see the old content or the new, never half."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


def _data_files(folder: Path) -> list[str]:
    """Relative paths of every file under `folder` except our own markers, sorted."""
    names = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return sorted(name for name in names if name not in (MANIFEST_NAME, COMPLETE_NAME))


def _filesystem_nearly_full(path: Path) -> bool:
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return usage.free < min(_NEARLY_FULL_BYTES, max(usage.total // 100, 1 << 20))


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain, or any write error on a (nearly) full filesystem.

    The second case matters: torch's zip writer reports a full disk as "unexpected pos ..." RuntimeError.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(cause) or "Disk quota exceeded" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return _filesystem_nearly_full(folder)


def _remove_leftover_temp_dirs(root: Path) -> None:
    for path in root.iterdir():
        if path.is_dir() and _TEMP_DIR.match(path.name):
            logger.warning("removing %s left behind by an interrupted checkpoint save", path)
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- verification
def list_checkpoints(checkpoint_root: str | os.PathLike) -> list[Path]:
    """Every step_XXXXXXXX folder under `checkpoint_root` (complete or not), oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    folders = [path for path in root.iterdir() if path.is_dir() and _STEP_DIR.match(path.name)]
    return sorted(folders, key=checkpoint_step)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a COMPLETE checkpoint folder; CorruptCheckpointError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorruptCheckpointError(f"checkpoint folder {folder} does not exist")
    manifest_path, complete_path = folder / MANIFEST_NAME, folder / COMPLETE_NAME
    if not complete_path.is_file():
        raise CorruptCheckpointError(f"{complete_path} is missing: the save of {folder} never finished")
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"{manifest_path} is missing")
    manifest_bytes = manifest_path.read_bytes()
    if hashlib.sha256(manifest_bytes).hexdigest() != complete_path.read_text().strip():
        raise CorruptCheckpointError(f"{manifest_path} does not match the checksum in {complete_path}")
    try:
        return json.loads(manifest_bytes)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{manifest_path} is not valid JSON: {exc}") from None


def _file_problem(folder: Path, name: str, entry: dict[str, Any], check_checksum: bool) -> str | None:
    path = folder / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path} has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
    if check_checksum and entry.get("sha256") and _sha256(path) != entry["sha256"]:
        return f"{path} has the right size but a wrong sha256 (corrupted)"
    return None


def verify_checkpoint(
    folder: str | os.PathLike, *, checksums: bool = False, share: tuple[int, int] = (0, 1)
) -> dict[str, Any]:
    """Check a checkpoint folder against its manifest; return the manifest.

    Sizes are always compared; sha256 too when `checksums` (reads every byte). `share=(i, n)`
    checks only every n-th file's checksum starting at i, so n ranks can split the reading.
    Raises CorruptCheckpointError naming the first bad file.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    first, every = share
    for index, (name, entry) in enumerate(sorted(manifest["files"].items())):
        problem = _file_problem(folder, name, entry, checksums and index % every == first)
        if problem:
            raise CorruptCheckpointError(problem)
    return manifest


def find_latest_checkpoint(checkpoint_root: str | os.PathLike, *, checksums: bool = False) -> Path | None:
    """Newest COMPLETE checkpoint whose files match its manifest, or None.

    Incomplete or corrupt folders are skipped with a warning naming them (so a resume falls back to
    the previous good checkpoint); *.tmp-* folders of unfinished saves are never considered.
    """
    folders = list_checkpoints(checkpoint_root)
    for index in range(len(folders) - 1, -1, -1):
        try:
            verify_checkpoint(folders[index], checksums=checksums)
            return folders[index]
        except CorruptCheckpointError as exc:
            fallback = "falling back to an older one" if index else "and there is no older one"
            logger.warning("skipping checkpoint %s: %s; %s", folders[index], exc, fallback)
    return None


def checkpoints_root(path: Path) -> Path:
    """Where a run's checkpoints are: `path`/checkpoints for a run directory, else `path` itself."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder `path` names: a step_XXXXXXXX folder, or the newest complete one under a checkpoints
    root or a run directory (its checkpoints/), verified byte for byte (sha256: a flipped byte would otherwise
    reach the unpickler). CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; expected a run directory, its checkpoints/ folder or a "
                              f"checkpoint folder (step_XXXXXXXX)")
    if (path / MANIFEST_NAME).exists() or (path / COMPLETE_NAME).exists() or _STEP_DIR.match(path.name):
        verify_checkpoint(path, checksums=True)  # CorruptCheckpointError: unfinished, truncated, altered, missing
        return path
    root = checkpoints_root(path)
    latest = find_latest_checkpoint(root, checksums=True)
    if latest is None:
        found = [folder.name for folder in list_checkpoints(root)]
        raise CheckpointError(f"no complete checkpoint in {root}: " + (
            f"{', '.join(found)} failed their checks (damaged or unfinished: the warnings above say how)" if found
            else "no step_XXXXXXXX folder with a COMPLETE marker"))
    return latest


# ----------------------------------------------------------------------------- save
def _check_free_space(root: Path, step: int) -> None:
    """Refuse to start a save that cannot fit: needs about as much as the newest checkpoint."""
    previous = find_latest_checkpoint(root)
    if previous is None:
        return
    needed = int(sum(entry["size"] for entry in read_manifest(previous)["files"].values()) * 1.05)
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointDiskFullError(
            f"disk full: not saving checkpoint step {step} to {root}: {free} bytes free, a checkpoint "
            f"needs about {needed} (like {previous.name}); earlier checkpoints are intact"
        )


def _manifest_entries(folder: Path, rank: int, world: int, checksum: bool) -> dict[str, dict[str, Any]]:
    """Size (and sha256, fsyncing as we read) of this rank's share of the folder's files."""
    entries = {}
    for name in _data_files(folder)[rank::world]:
        path = folder / name
        entries[name] = {"size": path.stat().st_size, "sha256": _sha256(path, fsync=True) if checksum else None}
    return entries


def _publish(temp: Path, final: Path, manifest: dict[str, Any], keep_last: int | None) -> None:
    """Rank 0: write manifest + COMPLETE, fsync, rename temp -> final, update latest, prune."""
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _write_durably(temp / MANIFEST_NAME, manifest_bytes)
    _write_durably(temp / COMPLETE_NAME, hashlib.sha256(manifest_bytes).hexdigest().encode() + b"\n")
    _fsync_dir(temp)
    replaced = None
    if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
        replaced = final.with_name(f"{final.name}.old-{temp.name.rsplit('-', 1)[1]}")
        os.rename(final, replaced)
    os.rename(temp, final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    write_text_atomically(final.parent / LATEST_NAME, final.name)
    if keep_last is not None:
        for old in list_checkpoints(final.parent)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("removed old checkpoint %s (keep_last=%d)", old, keep_last)


def _raise_save_failure(failures: list[tuple[int, str, bool]], temp: Path, root: Path, step: int) -> None:
    full = [failure for failure in failures if failure[2]]
    rank, message, _ = (full or failures)[0]
    if full:
        free = shutil.disk_usage(root).free if root.exists() else 0
        latest = find_latest_checkpoint(root)
        raise CheckpointDiskFullError(
            f"disk full while saving checkpoint step {step} to {temp} ({free} bytes left on that "
            f"filesystem; rank {rank}: {message}). The partial checkpoint was removed; earlier "
            f"checkpoints are intact (newest complete: {latest or 'none'}). Free space or point "
            f"trainer.output_dir elsewhere, then resume."
        )
    raise CheckpointError(f"saving checkpoint step {step} to {temp} failed on rank {rank}: {message}")


def save_checkpoint(
    engine: Any,
    checkpoint_root: str | os.PathLike,
    step: int,
    client_state: dict[str, Any],
    *,
    keep_last: int | None = None,
    checksum: bool = True,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Save `engine` (+ `client_state`) as `checkpoint_root/step_{step:08d}`; every rank calls.

    DeepSpeed writes into a temp tag; after all ranks finish, they hash their share of the files,
    rank 0 writes the manifest and COMPLETE marker, fsyncs and renames the folder into place, then
    removes all but the newest `keep_last` checkpoints. `manifest_extra` (JSON) goes into the manifest, where a
    resume can read it before building anything. On failure (disk full included) the temp
    folder is removed on every rank and CheckpointError / CheckpointDiskFullError is raised.
    """
    if keep_last is not None and (isinstance(keep_last, bool) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r} must be None (keep all) or a positive int")
    root, (rank, world) = Path(checkpoint_root), rank_and_world()
    final = root / checkpoint_dir_name(step)
    precheck_error = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftover_temp_dirs(root)
        try:
            _check_free_space(root, step)
        except CheckpointDiskFullError as exc:
            precheck_error = str(exc)
    nonce, precheck_error = broadcast_from_rank0((secrets.token_hex(4), precheck_error))
    if precheck_error:
        raise CheckpointDiskFullError(precheck_error)
    temp = root / f"{final.name}.tmp-{nonce}"

    started = time.perf_counter()
    failure: tuple[int, str, bool] | None = None
    try:
        engine.save_checkpoint(str(root), tag=temp.name, client_state=client_state, save_latest=False)
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        failure = (rank, f"{type(exc).__name__}: {exc}", _is_disk_full(exc, temp))
        barrier()  # meet DeepSpeed's closing barrier so the other ranks do not hang
    entries: dict[str, Any] = {}
    if not any(all_gather_object(failure)):
        try:
            entries = _manifest_entries(temp, rank, world, checksum)
        except OSError as exc:
            failure = (rank, f"{type(exc).__name__}: {exc}", _is_disk_full(exc, temp))
    gathered = all_gather_object((failure, entries))
    failures = [item for item, _ in gathered if item is not None]
    if not failures and rank == 0:
        manifest = {
            "format": MANIFEST_FORMAT,
            "step": step,
            "world_size": world,
            "client_state_keys": sorted(client_state),
            "files": {name: entry for _, part in gathered for name, entry in part.items()},
            **(manifest_extra or {}),
        }
        try:
            _publish(temp, final, manifest, keep_last)
        except OSError as exc:
            failures = [(0, f"{type(exc).__name__}: {exc}", _is_disk_full(exc, temp))]
    failures = broadcast_from_rank0(failures)  # rank 0 alone knows whether publishing worked
    if failures:
        if rank == 0:
            shutil.rmtree(temp, ignore_errors=True)
        barrier()
        _raise_save_failure(failures, temp, root, step)
    logger.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - started)
    return final


# ----------------------------------------------------------------------------- load
def load_checkpoint(
    engine: Any, path: str | os.PathLike, *, checksums: bool = True, load_optimizer_states: bool = True
) -> dict[str, Any]:
    """Load a checkpoint folder into `engine` (every rank calls); return the saved client_state.

    The folder is verified against its manifest first (sizes, and sha256 split across ranks when
    `checksums`); a bad folder raises CorruptCheckpointError naming the file on every rank.
    """
    folder = Path(path)
    if not (folder / MANIFEST_NAME).exists() and list_checkpoints(folder):
        raise CheckpointError(
            f"{folder} is a checkpoint root, not a checkpoint; pass one of its step_* folders "
            f"(find_latest_checkpoint({str(folder)!r}) picks the newest complete one)"
        )
    rank, world = rank_and_world()
    try:
        manifest, problem = verify_checkpoint(folder, checksums=checksums, share=(rank, world)), None
    except CorruptCheckpointError as exc:
        manifest, problem = None, str(exc)
    problems = [item for item in all_gather_object(problem) if item]
    if problems:
        raise CorruptCheckpointError(f"cannot load checkpoint {folder}: {problems[0]}")
    try:
        loaded_path, client_state = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=load_optimizer_states
        )
    except Exception as exc:  # noqa: BLE001 - torch/pickle errors of a damaged file
        raise CorruptCheckpointError(f"DeepSpeed could not load checkpoint {folder}: {type(exc).__name__}: {exc}") from exc
    if loaded_path is None:
        raise CorruptCheckpointError(f"DeepSpeed found no model states for this rank in {folder}")
    assert manifest is not None
    return {key: client_state[key] for key in manifest["client_state_keys"] if key in client_state}
