"""Where documents come from: the interpreter's standard library, local files, or a hub dataset.

A source lists its documents in a fixed order (`num_documents`, `iter_batches`) and has a cheap
`fingerprint()` that changes when its content changes (file paths + sizes + mtimes; for a hub dataset,
the `datasets` fingerprint). HF `datasets` is imported only for local-file and hub sources.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from ..optional import require

DATASET_BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def _stat_fingerprint(paths: list[Path], root: Path | None = None) -> str:
    """Digest of (path, size, mtime_ns) of every file, in order."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        name = path.relative_to(root).as_posix() if root else str(path.resolve())
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stdlib_python_files(root: str | Path | None = None) -> list[Path]:
    """Every .py file under the standard library directory (site-packages excluded), sorted by path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _SKIPPED_STDLIB_DIRS]
        files.extend(Path(directory) / name for name in names if name.endswith(".py"))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


class StdlibSource:
    """The running interpreter's standard library: one document per .py file, read as raw bytes."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        self.files = stdlib_python_files(self.root)
        self.description = f"stdlib:{self.root}"

    def fingerprint(self) -> str:
        return "stdlib-" + _stat_fingerprint(self.files, self.root)

    def num_documents(self) -> int:
        return len(self.files)

    def document_names(self) -> list[str]:
        return [path.relative_to(self.root).as_posix() for path in self.files]

    def iter_batches(self, batch_size: int = 64) -> Iterator[list[bytes]]:
        for first in range(0, len(self.files), batch_size):
            yield [path.read_bytes() for path in self.files[first : first + batch_size]]


class DatasetSource:
    """Documents = the `text_field` column of an HF `datasets` Dataset, row by row, in order."""

    def __init__(self, description: str, load: Callable, text_field: str, stat_files: list[Path] | None):
        self.description = description
        self.text_field = text_field
        self._load = load
        self._stat_files = stat_files
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:
            dataset = self._load()
            if self.text_field not in dataset.column_names:
                raise ValueError(
                    f"text_field={self.text_field!r} is not a column of {self.description}; "
                    f"its columns are {dataset.column_names}"
                )
            self._dataset = dataset
        return self._dataset

    def fingerprint(self) -> str:
        if self._stat_files is not None:  # local files: no need to load them to know they changed
            return f"files-{self.text_field}-" + _stat_fingerprint(self._stat_files)
        return f"hub-{self.description}-{self.text_field}-{self.dataset._fingerprint}"

    def num_documents(self) -> int:
        return len(self.dataset)

    def document_names(self) -> None:
        return None  # rows have no names; metadata records only counts

    def iter_batches(self, batch_size: int = 1000) -> Iterator[list[str]]:
        for batch in self.dataset.iter(batch_size=batch_size):
            yield [text or "" for text in batch[self.text_field]]


def _local_files(source: str) -> list[Path] | None:
    """The files a local path/dir/glob names, sorted; None when `source` does not look local."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix in DATASET_BUILDER_BY_SUFFIX]
        if not found:
            raise ValueError(
                f"directory {source!r} holds no files ending in {sorted(DATASET_BUILDER_BY_SUFFIX)}"
            )
        return sorted(found)
    if any(char in source for char in "*?["):
        found = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)]
        found = [p for p in found if p.is_file()]
        if not found:
            raise ValueError(f"the pattern {source!r} matches no files")
        return sorted(found)
    if source.startswith(("/", ".", "~")) or path.suffix in DATASET_BUILDER_BY_SUFFIX:
        raise ValueError(f"the local file or directory {source!r} does not exist")
    return None


def _unreadable(files: list[Path], builder: str) -> str | None:
    """Which file a failed build could not read, for text files (not UTF-8); None if none is found so."""
    if builder != "text":
        return None
    for path in files:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            return f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); text sources read UTF-8 files"
    return None


def _builder_for(files: list[Path], source: str) -> str:
    suffixes = sorted({path.suffix for path in files})
    builders = {DATASET_BUILDER_BY_SUFFIX.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"source {source!r} has files ending in {suffixes}; use files of one kind: "
            ".txt/.text/.md (text, one document per file), .json/.jsonl (one per row) or .parquet"
        )
    return builders.pop()


def resolve_source(source: str, *, text_field: str, hf_cache_dir: Path) -> StdlibSource | DatasetSource:
    """'stdlib', a local file/dir/glob (txt/json/jsonl/parquet), or a hub dataset name."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"source={source!r}: expected 'stdlib', a local file/dir/glob, or a hub dataset name")
    if source == "stdlib":
        return StdlibSource()
    files = _local_files(source)
    if files is not None:
        builder = _builder_for(files, source)
        options = {"sample_by": "document"} if builder == "text" else {}

        def load_local():
            datasets = require("datasets", f"source={source!r} (local files)", "use source='stdlib'")
            try:
                return datasets.load_dataset(
                    builder, data_files=[str(p) for p in files], split="train",
                    cache_dir=str(hf_cache_dir), **options,
                )
            except datasets.exceptions.DatasetGenerationError as error:  # names neither the file nor the cause
                problem = _unreadable(files, builder) or error.__cause__ or error
                raise ValueError(f"source={source!r}: {problem}") from error

        return DatasetSource(f"local:{source}", load_local, text_field, stat_files=files)

    def load_hub():
        datasets = require("datasets", f"source={source!r} (a hub dataset)", "use source='stdlib'")
        try:
            return datasets.load_dataset(source, split="train")
        except Exception as error:  # offline, unknown name, no train split, ...
            raise ValueError(
                f"unknown source {source!r}: not 'stdlib', not an existing local file/dir/glob, and "
                f"`datasets.load_dataset({source!r}, split='train')` failed ({type(error).__name__}: "
                f"{error}); on a machine without network (HF_DATASETS_OFFLINE=1) only datasets "
                "already in the HF cache load"
            ) from error

    return DatasetSource(source, load_hub, text_field, stat_files=None)
