"""docker/Dockerfile, checked statically: no Docker engine runs on this machine (only the client).

What can be checked without building: the base image is pinned, every COPY source exists and is not
excluded by the ignore file, the install line is the Makefile's minus its CPU torch pin and names
extras pyproject defines, and the entrypoint is the executable launcher.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKERFILE = REPOSITORY / "docker" / "Dockerfile"
IGNORE_FILE = REPOSITORY / "docker" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def arguments(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def ignored(relative: str) -> bool:
    patterns = [line.strip() for line in IGNORE_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return any(fnmatch.fnmatch(relative, pattern.removeprefix("**/")) or fnmatch.fnmatch(relative, pattern)
               for pattern in patterns)


def pip_install_arguments(line: str) -> list[str]:
    """Arguments after `pip install` in one shell line (Makefile or RUN), quotes removed."""
    words = shlex.split(line)
    start = max(index for index, word in enumerate(words[:-1]) if word == "pip" or word.endswith("$(PIP)"))
    assert words[start + 1] == "install", line
    return words[start + 2:]


def test_base_image_is_a_pinned_cuda_pytorch():
    (base,) = arguments("FROM")
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and "@sha256:" not in tag
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-(devel|runtime)", tag), f"unpinned or odd tag {tag!r}"
    torch_version = tuple(int(part) for part in tag.split("-")[0].split("."))
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    torch_floor = next(dep for dep in pyproject["project"]["dependencies"] if dep.startswith("torch"))
    assert torch_version >= tuple(int(part) for part in torch_floor.split(">=")[1].split(".")), torch_floor


def test_every_copy_source_exists_and_is_not_ignored():
    copies = arguments("COPY")
    assert copies
    copied = set()
    for args in copies:
        *sources, _destination = shlex.split(args)
        for source in sources:
            assert not source.startswith("--"), "COPY --from/--chown would need a different check"
            assert (REPOSITORY / source).exists(), f"COPY source {source} does not exist in the repository"
            assert not ignored(source), f"COPY source {source} is excluded by {IGNORE_FILE.name}"
            copied.add(source.rstrip("/"))
    # What `pip install -e .` reads (pyproject, its readme, the package) and what runs (configs, launcher).
    readme = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "longnet_dist", "configs", "launch"} <= copied


def test_install_line_matches_makefile_without_torch_pin():
    makefile_lines = [line for line in (REPOSITORY / "Makefile").read_text().splitlines() if "$(PIP) install" in line]
    makefile_installs = [pip_install_arguments(line) for line in makefile_lines]
    assert any("torch==" in " ".join(args) for args in makefile_installs)  # the CPU pin the image must not copy
    project_install = next(args for args in makefile_installs if "-e" in args)
    (run,) = [args for args in arguments("RUN") if "-e " in args]
    docker_installs = [pip_install_arguments(part) for part in run.split("&&") if "pip install" in part]
    assert project_install in docker_installs, (project_install, docker_installs)
    assert not any(arg.startswith("torch") for args in docker_installs for arg in args)
    extras = re.fullmatch(r"\.\[(.*)\]", project_install[-1]).group(1).split(",")
    defined = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(defined), f"extras {extras} not all defined in pyproject: {sorted(defined)}"


def test_entrypoint_is_the_executable_launcher():
    (entrypoint,) = arguments("ENTRYPOINT")
    command = json.loads(entrypoint)  # exec form, so signals reach the launcher (and torchrun) directly
    assert command == ["launch/train.sh"]
    launcher = REPOSITORY / command[0]
    assert launcher.is_file() and os.access(launcher, os.X_OK)
    assert arguments("WORKDIR") == ["/workspace/longnet_dist"]  # the relative entrypoint resolves there
    assert any(shlex.split(args)[-1] in ("./launch", "launch", "./launch/") for args in arguments("COPY"))
