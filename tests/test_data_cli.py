"""`python -m longnet_dist.data`: a bad argument is one line `longnet-data: <message>` and exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from longnet_dist.data.__main__ import main
from subprocess_env import REPO, repo_first_on_pythonpath


def test_bad_arguments_exit_with_the_librarys_message(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_info:
        main(["--val-fraction", "2", *cache])
    assert exit_info.value.code == "longnet-data: val_fraction=2.0: expected a number with 0 < val_fraction < 1"
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", str(tmp_path / "missing"), *cache])
    assert exit_info.value.code == f"longnet-data: the local file or directory '{tmp_path / 'missing'}' does not exist"
    with pytest.raises(SystemExit, match=r"^longnet-data: tokenizer='/no/such.json' is neither 'bytes' nor"):
        main(["--tokenizer", "/no/such.json", *cache])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_single_document_is_one_line_on_stderr_and_status_1(tmp_path):
    """A corpus of one .txt file cannot be split by document: the message alone, no traceback."""
    pytest.importorskip("datasets")  # file sources read through it
    (tmp_path / "one.txt").write_text("only document\n")
    env = repo_first_on_pythonpath(dict(os.environ, OMP_NUM_THREADS="1"))
    result = subprocess.run([sys.executable, "-m", "longnet_dist.data", "--source", str(tmp_path / "one.txt"),
                             "--cache-dir", str(tmp_path / "cache")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == ("longnet-data: the source has 1 document(s); a train/validation "
                                                      "split by document needs at least 2"), result.stderr
    assert "Traceback" not in result.stderr  # (before it: datasets' progress lines)
