"""Tokenizers: the default byte tokenizer and an optional HF `tokenizers` file.

Both expose the same small surface the corpus builder needs: `name` (a stable id that goes into the
cache key), `vocab_size`, `eod_id`, `pad_id`, `encode_batch(texts) -> list[np.ndarray]`, `decode`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..optional import require

BYTE_VOCAB = 256
EOD_ID = 256  # end of document: separates documents in the flat token stream
PAD_ID = 257  # padding; never written into a corpus
VOCAB_SIZE = 258


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary: uint16 below 65536, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus EOD (256) and PAD (257)."""

    name = "bytes-v1"
    vocab_size = VOCAB_SIZE
    eod_id = EOD_ID
    pad_id = PAD_ID

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids of one document (no EOD appended), uint16."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; special ids are dropped, invalid UTF-8 is replaced (U+FFFD)."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB)
        return data.decode("utf-8", errors="replace")


def file_tokenizer_name(path: str | Path) -> str:
    """The name a tokenizer.json goes by (corpus cache keys, checkpoints): 'hf-' and 16 hex digits of its sha256."""
    return f"hf-{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


class HFTokenizer:
    """A `tokenizers` tokenizer.json. EOD and PAD are appended after its vocabulary:
    eod_id = n, pad_id = n + 1, vocab_size = n + 2 (n = the file's vocabulary size)."""

    def __init__(self, path: str | Path):
        tokenizers = require("tokenizers", f"tokenizer={str(path)!r}", "use tokenizer='bytes'")
        self.path = Path(path)
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        base_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod_id = base_vocab
        self.pad_id = base_vocab + 1
        self.vocab_size = base_vocab + 2
        self.name = file_tokenizer_name(self.path)

    def encode(self, text: str | bytes) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        strings = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        dtype = token_dtype(self.vocab_size)
        encodings = self._tokenizer.encode_batch(strings, add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=dtype) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids if int(i) < self.eod_id])


def load_tokenizer(spec: str | Path = "bytes") -> ByteTokenizer | HFTokenizer:
    """'bytes' gives the byte tokenizer; a path to a tokenizer.json gives an `HFTokenizer`."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_file():
        return HFTokenizer(path)
    raise ValueError(
        f"tokenizer={str(spec)!r} is neither 'bytes' nor an existing tokenizer.json file"
    )
