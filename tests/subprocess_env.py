"""Environment for subprocesses that must import this checkout of longnet_dist."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_first_on_pythonpath(environment: Mapping[str, str], repo: Path = REPO) -> dict[str, str]:
    """A copy of `environment` whose PYTHONPATH starts with `repo`, keeping every entry it had after it
    (an environment may find its packages through PYTHONPATH)."""
    existing = environment.get("PYTHONPATH", "")
    return {**environment, "PYTHONPATH": os.pathsep.join([str(repo), existing]) if existing else str(repo)}


def on_the_cpu(environment: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environment` for a child that must run on the CPU on a GPU machine too (a trainer whose test
    expects fp32 CPU numbers, ranks that talk gloo): no GPU visible, DeepSpeed's CPU accelerator (which an
    environment's DS_ACCELERATOR=cuda would otherwise override)."""
    return {**environment, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
