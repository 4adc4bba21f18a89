import ast
import os
from pathlib import Path

from subprocess_env import REPO, on_the_cpu, repo_first_on_pythonpath


def test_repo_is_prepended_to_an_existing_pythonpath():
    environment = {"PYTHONPATH": os.pathsep.join(["/site/a", "/site/b"]), "HOME": "/h"}
    updated = repo_first_on_pythonpath(environment, Path("/repo"))
    assert updated == {"PYTHONPATH": os.pathsep.join(["/repo", "/site/a", "/site/b"]), "HOME": "/h"}
    assert environment["PYTHONPATH"] == os.pathsep.join(["/site/a", "/site/b"])  # the input is not changed


def test_repo_alone_without_pythonpath():
    assert repo_first_on_pythonpath({"HOME": "/h"}, Path("/repo")) == {"HOME": "/h", "PYTHONPATH": "/repo"}
    assert repo_first_on_pythonpath({"PYTHONPATH": ""}, Path("/repo")) == {"PYTHONPATH": "/repo"}
    assert (REPO / "longnet_dist" / "__init__.py").is_file()


def _pythonpath_writes(source: str) -> list[int]:
    """Lines of `source` that set PYTHONPATH themselves: a keyword (dict(os.environ, PYTHONPATH=...)), a dict
    key ({"PYTHONPATH": ...}) or an item assignment (env["PYTHONPATH"] = ...)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "PYTHONPATH":
            lines.append(node.value.lineno)
        elif isinstance(node, ast.Dict):
            lines += [key.lineno for key in node.keys if isinstance(key, ast.Constant) and key.value == "PYTHONPATH"]
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            lines += [target.lineno for target in targets if isinstance(target, ast.Subscript)
                      and isinstance(target.slice, ast.Constant) and target.slice.value == "PYTHONPATH"]
    return sorted(lines)


def test_the_guard_sees_every_way_of_setting_pythonpath():
    source = ('a = dict(os.environ, PYTHONPATH=str(REPO))\nb = {**os.environ, "PYTHONPATH": "/repo"}\n'
              'c["PYTHONPATH"] = "/repo"\nd = os.environ.get("PYTHONPATH", "")\n')
    assert _pythonpath_writes(source) == [1, 2, 3]


def test_no_test_replaces_pythonpath_for_its_subprocesses():
    """Subprocesses of the tests get PYTHONPATH from repo_first_on_pythonpath only, which keeps what the
    environment had: a machine that finds its packages through PYTHONPATH (a GPU lease's carried wheels)
    would otherwise lose them in every subprocess."""
    tests = Path(__file__).resolve().parent
    offenders = {path.name: lines for path in sorted(tests.glob("*.py"))
                 if path.name not in {"subprocess_env.py", Path(__file__).name}
                 and (lines := _pythonpath_writes(path.read_text()))}
    assert offenders == {}, f"set PYTHONPATH through subprocess_env.repo_first_on_pythonpath instead: {offenders}"


def test_a_cpu_child_sees_no_gpu_and_gets_deepspeeds_cpu_accelerator():
    environment = {"DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/h"}
    assert on_the_cpu(environment) == {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "HOME": "/h"}
    assert environment["DS_ACCELERATOR"] == "cuda"  # the input is not changed
