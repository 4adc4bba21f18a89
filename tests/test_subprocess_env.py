import os
from pathlib import Path

from subprocess_env import REPO, repo_first_on_pythonpath


def test_repo_is_prepended_to_an_existing_pythonpath():
    environment = {"PYTHONPATH": os.pathsep.join(["/site/a", "/site/b"]), "HOME": "/h"}
    updated = repo_first_on_pythonpath(environment, Path("/repo"))
    assert updated == {"PYTHONPATH": os.pathsep.join(["/repo", "/site/a", "/site/b"]), "HOME": "/h"}
    assert environment["PYTHONPATH"] == os.pathsep.join(["/site/a", "/site/b"])  # the input is not changed


def test_repo_alone_without_pythonpath():
    assert repo_first_on_pythonpath({"HOME": "/h"}, Path("/repo")) == {"HOME": "/h", "PYTHONPATH": "/repo"}
    assert repo_first_on_pythonpath({"PYTHONPATH": ""}, Path("/repo")) == {"PYTHONPATH": "/repo"}
    assert (REPO / "longnet_dist" / "__init__.py").is_file()
