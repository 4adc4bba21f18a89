"""A small tmpfs for tests that need a real full filesystem (root only; skipped with the reason elsewhere)."""
from __future__ import annotations

import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(mount_point: Path, size: str, covered_by: str):
    """Mount a tmpfs of `size` (e.g. "64k") at `mount_point` for the duration of the block."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"tmpfs-{uuid.uuid4().hex[:6]}",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); {covered_by}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
