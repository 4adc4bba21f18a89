"""prepare_corpus: documents -> tokens -> one flat token file per split, built once and cached.

Cache layout: `<cache_dir>/<source-slug>-<key>/{train,validation}.{bin,json}` where `key` hashes the
source fingerprint (file paths + sizes + mtimes, or the hub dataset's fingerprint), the tokenizer id and
the split parameters. A build writes into a fresh temporary directory and publishes it with one atomic
`os.rename`, so a reader never sees a half-written corpus and concurrent builders are safe (the first
rename wins, the others discard their copy). Under torch.distributed, only local rank 0 of each node
builds; the other ranks wait at a barrier and then open the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .sources import resolve_source
from .token_file import TokenFile, TokenFileWriter
from .tokenizer import load_tokenizer

CORPUS_FORMAT_VERSION = 1
SPLITS = ("train", "validation")


def default_cache_dir() -> Path:
    """$LONGNET_CACHE, else ~/.cache/longnet_dist."""
    return Path(os.environ.get("LONGNET_CACHE") or "~/.cache/longnet_dist").expanduser()


def validation_mask(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """(num_documents,) bool, True = validation: a seeded random choice of
    max(1, round(val_fraction * num_documents)) documents (at most num_documents - 1)."""
    if num_documents < 2:
        raise ValueError(
            f"the source has {num_documents} document(s); a train/validation split by document needs at least 2"
        )
    num_validation = min(max(1, round(val_fraction * num_documents)), num_documents - 1)
    mask = np.zeros(num_documents, dtype=bool)
    mask[np.random.default_rng(seed).permutation(num_documents)[:num_validation]] = True
    return mask


def _check_val_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r}: expected a number with 0 < val_fraction < 1")


def prepare_corpus(
    source: str = "stdlib",
    *,
    cache_dir: str | Path | None = None,
    tokenizer: str | Path = "bytes",
    val_fraction: float = 0.02,
    seed: int = 0,
    text_field: str = "text",
) -> dict[str, TokenFile]:
    """Token files {"train", "validation"} of `source`, built on the first call and reused afterwards.

    source: "stdlib" (this interpreter's standard library .py files), a local file, directory or glob of
    .txt/.md (one document per file), .json/.jsonl/.parquet (one document per row, column `text_field`),
    or a hub dataset name (its "train" split; needs network or the HF cache). Documents are assigned to
    validation by a seeded choice of val_fraction of them; each split is its documents in source order,
    each followed by the tokenizer's EOD id. cache_dir None means `default_cache_dir()`.
    Under torch.distributed every rank must call it (it contains a barrier).
    """
    _check_val_fraction(val_fraction)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    token_encoder = load_tokenizer(tokenizer)
    document_source = resolve_source(source, text_field=text_field, hf_cache_dir=cache_dir / "hf_datasets")

    def load_or_build() -> dict[str, TokenFile]:
        key_parts = {
            "format": CORPUS_FORMAT_VERSION,
            "source": document_source.fingerprint(),
            "tokenizer": token_encoder.name,
            "val_fraction": float(val_fraction),
            "seed": int(seed),
        }
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("_.")[-40:] or "corpus"
        corpus_dir = cache_dir / f"{slug}-{key}"
        if not corpus_dir.is_dir():
            _build_corpus(corpus_dir, document_source, token_encoder, val_fraction, seed, key_parts)
        return {split: TokenFile(corpus_dir / f"{split}.bin") for split in SPLITS}

    return _once_per_node(load_or_build)


def _build_corpus(corpus_dir: Path, document_source, token_encoder, val_fraction, seed, key_parts) -> None:
    """Tokenize every document batch by batch into a temp dir, then rename it to `corpus_dir`."""
    started = time.perf_counter()
    corpus_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{corpus_dir.name}.building-", dir=corpus_dir.parent))
    try:
        num_documents = document_source.num_documents()
        is_validation = validation_mask(num_documents, val_fraction, seed)
        writers = {
            split: TokenFileWriter(
                temp_dir / f"{split}.bin", vocab_size=token_encoder.vocab_size, eod_id=token_encoder.eod_id
            )
            for split in SPLITS
        }
        num_bytes = dict.fromkeys(SPLITS, 0)
        document_index = 0
        for batch in document_source.iter_batches():
            raw_documents = [doc if isinstance(doc, bytes) else doc.encode("utf-8") for doc in batch]
            token_documents = token_encoder.encode_batch(raw_documents)
            per_split: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
            for raw, ids in zip(raw_documents, token_documents):
                split = "validation" if is_validation[document_index] else "train"
                per_split[split].append(ids)
                num_bytes[split] += len(raw)
                document_index += 1
            for split in SPLITS:
                writers[split].append_documents(per_split[split])
        if document_index != num_documents:
            raise RuntimeError(
                f"{document_source.description} gave {document_index} documents, expected {num_documents}"
            )

        names = document_source.document_names()
        for split in SPLITS:
            in_split = is_validation if split == "validation" else ~is_validation
            meta = {
                **key_parts,
                "split": split,
                "source_description": document_source.description,
                "tokenizer_vocab_size": token_encoder.vocab_size,
                "pad_id": token_encoder.pad_id,
                "num_bytes": num_bytes[split],  # UTF-8 bytes of the split's text: for bits per byte
                "build_seconds": round(time.perf_counter() - started, 3),
            }
            if names is not None:
                meta["documents"] = [name for name, keep in zip(names, in_split) if keep]
            writers[split].close(meta)
        os.chmod(temp_dir, 0o755)  # mkdtemp makes it owner-only; a shared cache should be readable
        try:
            os.rename(temp_dir, corpus_dir)  # atomic publish; fails if another builder got there first
        except OSError:
            if not corpus_dir.is_dir():
                raise
            shutil.rmtree(temp_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def _once_per_node(load_or_build: Callable[[], dict[str, TokenFile]]) -> dict[str, TokenFile]:
    """Run load_or_build on local rank 0 first, barrier, then on the other ranks (cache hits)."""
    distributed = sys.modules.get("torch.distributed")  # not imported => not initialised
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return load_or_build()
    if distributed.get_world_size() == 1:
        return load_or_build()
    is_builder = int(os.environ.get("LOCAL_RANK", distributed.get_rank())) == 0
    result, error = None, None
    if is_builder:
        try:
            result = load_or_build()
        except Exception as caught:  # reach the barrier anyway, so the other ranks do not hang
            error = caught
    distributed.barrier()
    if error is not None:
        raise error
    return result if is_builder else load_or_build()
