"""Packages that only some paths need (`datasets` for file and hub corpora, `wandb` for the W&B logger,
`tokenizers` for a tokenizer.json), imported where used, with one clear error when missing."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def _missing(package: str, needed_by: str, otherwise: str) -> ImportError:
    return ImportError(f"{needed_by} needs the `{package}` package, which is not installed: "
                       f"`pip install {package}`, or {otherwise}")


def ensure_installed(package: str, needed_by: str, otherwise: str) -> None:
    """The error `require` would raise, without importing the package (a config check before any work)."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError, AttributeError):  # a None or spec-less entry in sys.modules
        found = False
    if not found:
        raise _missing(package, needed_by, otherwise)


def require(package: str, needed_by: str, otherwise: str) -> ModuleType:
    """`import package`, or an ImportError that names what needed it, how to install it and the alternative."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise _missing(package, needed_by, otherwise) from error
