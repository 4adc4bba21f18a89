"""A flat token file: raw little-endian ids (`<name>.bin`) beside JSON metadata (`<name>.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .tokenizer import token_dtype


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


class TokenFile:
    """One split's tokens, opened read-only as a numpy memmap on first use of `.tokens`.

    Attributes: `path` (the .bin file), `num_tokens`, `vocab_size`, `eod_id`, `meta` (the whole JSON).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = _meta_path(self.path)
        if not self.path.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"token file {self.path} or its metadata {meta_path} is missing")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.num_tokens = int(self.meta["num_tokens"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.eod_id = int(self.meta["eod_id"])
        self.dtype = np.dtype(self.meta["dtype"])
        expected_bytes = self.num_tokens * self.dtype.itemsize
        actual_bytes = self.path.stat().st_size
        if actual_bytes != expected_bytes:
            raise ValueError(
                f"token file {self.path} has {actual_bytes} bytes but its metadata says "
                f"{self.num_tokens} tokens of {self.dtype} ({expected_bytes} bytes); "
                f"delete {self.path.parent} to rebuild it"
            )
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """(num_tokens,) read-only memmap of the ids."""
        if self._tokens is None:
            if self.num_tokens == 0:  # numpy cannot memory-map an empty file
                self._tokens = np.zeros(0, dtype=self.dtype)
            else:
                self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, num_tokens={self.num_tokens}, vocab_size={self.vocab_size})"

    def __getstate__(self) -> dict:  # pickle the path, not the memmap
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state


class TokenFileWriter:
    """Appends ids to `<name>.bin` as they come (nothing held in memory); `close()` writes the JSON."""

    def __init__(self, path: str | Path, *, vocab_size: int, eod_id: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.eod_id = eod_id
        self.dtype = token_dtype(vocab_size)
        self.num_tokens = 0
        self.num_documents = 0
        self._file = open(self.path, "wb")

    def append(self, ids: np.ndarray) -> None:
        """Append ids as they are (no EOD)."""
        ids = np.asarray(ids)
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {self.vocab_size}")
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += int(ids.size)

    def append_documents(self, documents: list[np.ndarray]) -> None:
        """Append each document followed by EOD, in one write."""
        if not documents:
            return
        eod = np.array([self.eod_id], dtype=self.dtype)
        pieces = [piece for ids in documents for piece in (np.asarray(ids, dtype=self.dtype), eod)]
        self.append(np.concatenate(pieces))
        self.num_documents += len(documents)

    def close(self, meta: dict[str, Any] | None = None) -> TokenFile:
        """Flush to disk, write the metadata JSON, and open the result."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        full_meta = dict(meta or {})
        full_meta.update(
            num_tokens=self.num_tokens,
            num_documents=self.num_documents,
            vocab_size=self.vocab_size,
            eod_id=self.eod_id,
            dtype=self.dtype.name,
        )
        _meta_path(self.path).write_text(json.dumps(full_meta, indent=1, sort_keys=True))
        return TokenFile(self.path)


def write_token_file(
    path: str | Path, tokens: np.ndarray, *, vocab_size: int, eod_id: int, meta: dict | None = None
) -> TokenFile:
    """Write an in-memory id array as a token file (for tests and small corpora)."""
    writer = TokenFileWriter(path, vocab_size=vocab_size, eod_id=eod_id)
    writer.append(tokens)
    return writer.close(meta)
