"""benchmarks/host_overhead.py: the host's share of a fused attention call, with the kernels stubbed out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from subprocess_env import REPO, repo_first_on_pythonpath

pytest.importorskip("triton")


def test_host_overhead_times_a_layers_launches_without_running_them(tmp_path):
    """On the CPU every kernel is a stub that counts its launches: one forward+backward of the paper's five
    branches issues 12 (forward: 5 branch launches, the r = 1 branch last writing the output; backward: the prep,
    5 dK/dV launches with dQ inside, the r = 1 branch last writing dK and dV, and dQ's store), and the host time
    around them is recorded with the machine."""
    result = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--calls", "2", "--blocks", "2",
                             "--results", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            env=repo_first_on_pythonpath(os.environ), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads((tmp_path / "host_overhead_cpu.json").read_text())
    assert saved["launches_per_call"] == 12, saved
    assert 0 < saved["host_s"] < 1 and saved["device"] == "cpu" and saved["n"] == 256
    assert saved["command"].startswith("benchmarks/host_overhead.py") and "cpu" in saved["machine"]
