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
