"""benchmarks/common.py: what every benchmark's JSON records about the machine."""
from __future__ import annotations

import json
import sys

from subprocess_env import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402
from common import MEMORY_VARIABLES, machine  # noqa: E402


def test_the_machine_record_names_the_memory_settings_that_shape_cpu_timings(monkeypatch):
    """A run with tcmalloc preloaded, glibc tunables or torch's huge pages times differently from a plain
    one (docs/performance_cpu.md): the JSON must say which it was, not only the command line."""
    for name in MEMORY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    plain = machine()["host_memory"]
    assert set(plain) <= {"transparent_hugepage"}
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    expected = {**plain, "THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}
    assert machine()["host_memory"] == expected


def test_every_saved_result_names_the_command_that_made_it(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--tag", "t"])
    assert json.loads(common.save("plain", {"rows": [1]}).read_text()) == {"command": "benchmarks/x.py --tag t",
                                                                           "rows": [1]}
    own = json.loads(common.save("own", {"command": "python3 benchmarks/x.py", "rows": []}).read_text())
    assert own["command"] == "python3 benchmarks/x.py"  # a payload's own command line is kept
