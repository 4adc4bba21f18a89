"""benchmarks/common.py: what every benchmark's JSON records about the machine."""
from __future__ import annotations

import sys

from subprocess_env import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from common import MEMORY_VARIABLES, machine  # noqa: E402


def test_the_machine_record_names_the_memory_settings_that_shape_cpu_timings(monkeypatch):
    """A run with tcmalloc preloaded, glibc tunables or torch's huge pages times differently from a plain
    one (docs/performance.md): the JSON must say which it was, not only the command line."""
    for name in MEMORY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    plain = machine()["host_memory"]
    assert set(plain) <= {"transparent_hugepage"}
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    expected = {**plain, "THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}
    assert machine()["host_memory"] == expected
