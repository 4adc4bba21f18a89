"""prepare_corpus: token stream layout, split by document, cache reuse/rebuild, atomic publish,
rank-0 build under torch.distributed, the stdlib default corpus, clear errors, the Hydra data configs."""

from __future__ import annotations

import hashlib
import json
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from longnet_dist.data import EOD_ID, TokenFile, prepare_corpus, validation_mask
from longnet_dist.data import corpus as corpus_module
from longnet_dist.data.tokenizer import ByteTokenizer
from longnet_dist.distributed.testing import run_multiprocess

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["first document\n", "zweites Dokument: größer\n" * 3, "", "x = 1\n", "λ 🐍\n", "six\n"]


def expected_stream(documents: list[bytes]) -> list[int]:
    """Independent reference: each document's UTF-8 bytes, then EOD."""
    return [t for doc in documents for t in (*doc, EOD_ID)]


def split_documents(documents: list[bytes], val_fraction: float, seed: int) -> dict[str, list[bytes]]:
    mask = validation_mask(len(documents), val_fraction, seed)
    return {"train": [d for d, v in zip(documents, mask) if not v],
            "validation": [d for d, v in zip(documents, mask) if v]}


@pytest.fixture
def text_dir(tmp_path) -> Path:
    pytest.importorskip("datasets")  # file sources read through it (a dependency; a bare GPU image may lack it)
    directory = tmp_path / "texts"
    directory.mkdir()
    for index, text in enumerate(DOCUMENTS):  # names sort in index order
        (directory / f"doc{index:02d}.txt").write_text(text, encoding="utf-8")
    return directory


def count_builds(monkeypatch) -> list:
    calls = []
    real_build = corpus_module._build_corpus

    def counting_build(*args, **kwargs):
        calls.append(args[0])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "_build_corpus", counting_build)
    return calls


def test_local_text_files_documents_joined_by_eod(text_dir, tmp_path):
    splits = prepare_corpus(str(text_dir), cache_dir=tmp_path / "cache", val_fraction=0.34, seed=5)
    expected = split_documents([t.encode() for t in DOCUMENTS], 0.34, 5)
    assert len(expected["validation"]) == 2  # round(0.34 * 6)
    for name, token_file in splits.items():
        assert token_file.tokens.tolist() == expected_stream(expected[name])
        assert token_file.tokens.dtype == np.uint16 and not token_file.tokens.flags.writeable
        assert token_file.meta["num_documents"] == len(expected[name])
        assert token_file.meta["num_bytes"] == sum(map(len, expected[name]))
        assert (token_file.vocab_size, token_file.eod_id, token_file.meta["pad_id"]) == (258, 256, 257)


def test_a_text_file_that_is_not_utf8_is_named(text_dir, tmp_path):
    """HF datasets said only "An error occurred while generating the dataset"."""
    (text_dir / "doc99.txt").write_bytes(b"ok " + bytes(range(128, 256)))
    with pytest.raises(ValueError, match=r"source='.*texts': .*doc99.txt is not UTF-8 text \(invalid start byte at "
                                         r"byte 3\); text sources read UTF-8 files"):
        prepare_corpus(str(text_dir), cache_dir=tmp_path / "cache")


def test_jsonl_rows_are_documents_and_missing_field_is_named(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "rows.jsonl"
    rows = [{"body": f"row {i} " * i, "id": i} for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    splits = prepare_corpus(str(path), cache_dir=tmp_path / "cache", text_field="body", val_fraction=0.25)
    expected = split_documents([row["body"].encode() for row in rows], 0.25, 0)
    assert splits["train"].tokens.tolist() == expected_stream(expected["train"])
    assert splits["validation"].tokens.tolist() == expected_stream(expected["validation"])
    with pytest.raises(ValueError, match=r"text_field='text' is not a column.*\['body', 'id'\]"):
        prepare_corpus(str(path), cache_dir=tmp_path / "cache")


def test_second_call_hits_the_cache_and_a_change_rebuilds(text_dir, tmp_path, monkeypatch):
    builds = count_builds(monkeypatch)
    first = prepare_corpus(str(text_dir), cache_dir=tmp_path / "cache", val_fraction=0.34)
    stamp = first["train"].path.stat().st_mtime_ns
    again = prepare_corpus(str(text_dir), cache_dir=tmp_path / "cache", val_fraction=0.34)
    assert len(builds) == 1
    assert again["train"].path == first["train"].path and again["train"].path.stat().st_mtime_ns == stamp

    # the cache key holds size + mtime of each file: append text (size changes) -> a new build
    (text_dir / "doc05.txt").write_text("six, longer now\n")
    changed = prepare_corpus(str(text_dir), cache_dir=tmp_path / "cache", val_fraction=0.34)
    assert len(builds) == 2 and changed["train"].path != first["train"].path
    all_tokens = changed["train"].tokens.tolist() + changed["validation"].tokens.tolist()
    assert bytes(t for t in all_tokens if t < 256).count(b"six, longer now") == 1
    # split parameters are part of the key too
    prepare_corpus(str(text_dir), cache_dir=tmp_path / "cache", val_fraction=0.5)
    assert len(builds) == 3
    assert not list((tmp_path / "cache").glob(".*building*"))  # no temp dir left behind


def test_split_is_deterministic_and_seeded():
    first, again = validation_mask(1000, 0.1, seed=3), validation_mask(1000, 0.1, seed=3)
    assert np.array_equal(first, again) and first.sum() == 100
    assert not np.array_equal(first, validation_mask(1000, 0.1, seed=4))
    assert validation_mask(2, 0.01, 0).sum() == 1  # at least one document on each side
    assert validation_mask(3, 0.99, 0).sum() == 2


class ListSource:
    """A document source over an in-memory list (same protocol as the real sources)."""

    description = "list"

    def __init__(self, documents: list[bytes]):
        self.documents = documents

    def fingerprint(self):
        return "list-" + hashlib.sha256(b"\0".join(self.documents)).hexdigest()  # same in every process

    def num_documents(self):
        return len(self.documents)

    def document_names(self):
        return [f"doc{i}" for i in range(len(self.documents))]

    def iter_batches(self, batch_size=2):
        for first in range(0, len(self.documents), batch_size):
            yield self.documents[first:first + batch_size]


def test_concurrent_builders_publish_one_complete_corpus(tmp_path):
    documents = [bytes([65 + i]) * (i + 1) for i in range(10)]
    corpus_dir = tmp_path / "cache" / "list-corpus"
    start = threading.Barrier(4)
    errors = []

    def build():
        try:
            start.wait()
            corpus_module._build_corpus(corpus_dir, ListSource(documents), ByteTokenizer(), 0.2, 0, {"k": 1})
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    # every builder but the first to rename discarded its own copy; the published one is complete
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["list-corpus"]
    expected = split_documents(documents, 0.2, 0)
    for split in ("train", "validation"):
        token_file = TokenFile(corpus_dir / f"{split}.bin")
        assert token_file.tokens.tolist() == expected_stream(expected[split])
        assert token_file.meta["documents"] == [f"doc{i}" for i, d in enumerate(documents) if d in expected[split]]


def test_failed_build_leaves_nothing(tmp_path):
    class BrokenSource(ListSource):
        def iter_batches(self, batch_size=2):
            yield self.documents[:2]
            raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        corpus_module._build_corpus(tmp_path / "c", BrokenSource([b"a", b"b", b"c"]), ByteTokenizer(), 0.3, 0, {})
    assert list(tmp_path.iterdir()) == []


def _build_on_ranks(rank, world_size, cache_dir):
    """Runs in each spawned rank: count who builds; local rank 0 sleeps inside the build so a rank
    that did not wait would find no cache and build itself."""
    documents = [f"document {i}\n".encode() * (i + 1) for i in range(12)]
    corpus_module.resolve_source = lambda source, **kwargs: ListSource(documents)
    real_build, built = corpus_module._build_corpus, []

    def slow_build(*args):
        built.append(rank)
        time.sleep(1.0)
        real_build(*args)

    corpus_module._build_corpus = slow_build
    splits = prepare_corpus("in-memory", cache_dir=cache_dir, val_fraction=0.25)
    return len(built), str(splits["train"].path), splits["train"].tokens.tolist()


def test_under_torch_distributed_rank_0_builds_and_the_others_wait(tmp_path):
    results = run_multiprocess(_build_on_ranks, 2, str(tmp_path / "cache"), timeout=120)
    assert [built for built, _, _ in results] == [1, 0]
    assert results[0][1:] == results[1][1:]


def test_stdlib_corpus(tmp_path):
    started = time.perf_counter()
    splits = prepare_corpus("stdlib", cache_dir=tmp_path / "cache")
    build_seconds = time.perf_counter() - started
    # independent listing of the standard library's .py files (site-packages and caches excluded)
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts))
    train, validation = splits["train"].meta["documents"], splits["validation"].meta["documents"]
    assert not set(train) & set(validation)
    assert sorted(train + validation) == names
    assert len(validation) == round(0.02 * len(names))
    # the split is a function of the sorted file list and the seed
    mask = validation_mask(len(names), 0.02, 0)
    assert validation == [name for name, is_val in zip(names, mask) if is_val]
    for split, documents in (("train", train), ("validation", validation)):
        sizes = [(root / name).stat().st_size for name in documents]
        token_file = splits[split]
        assert token_file.num_tokens == sum(sizes) + len(documents)
        assert token_file.meta["num_bytes"] == sum(sizes)
        first = (root / documents[0]).read_bytes()
        assert token_file.tokens[:len(first)].tobytes() == np.frombuffer(first, np.uint8).astype(np.uint16).tobytes()
        assert token_file.tokens[len(first)] == EOD_ID
    assert int((splits["train"].tokens == EOD_ID).sum()) == len(train)
    # generous guard (measured ~0.6 s on the 2-core VM): building must stay far below a minute
    assert build_seconds < 60, build_seconds
    started = time.perf_counter()
    assert prepare_corpus("stdlib", cache_dir=tmp_path / "cache")["train"].path == splits["train"].path
    assert time.perf_counter() - started < 10  # a cache hit only stats the files


def test_bad_arguments_are_value_errors(text_dir, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no 20 s of retries without network
    cache = tmp_path / "cache"
    for bad in (0, 1, -0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match=rf"val_fraction={bad!r}: expected a number with 0 < val_fraction < 1"):
            prepare_corpus(str(text_dir), cache_dir=cache, val_fraction=bad)
    with pytest.raises(ValueError, match=r"unknown source 'no-such-dataset-xyz'.*HF_DATASETS_OFFLINE"):
        prepare_corpus("no-such-dataset-xyz", cache_dir=cache)
    with pytest.raises(ValueError, match=r"'./missing.txt' does not exist"):
        prepare_corpus("./missing.txt", cache_dir=cache)
    with pytest.raises(ValueError, match=r"matches no files"):
        prepare_corpus(str(text_dir / "*.parquet"), cache_dir=cache)
    (text_dir / "extra.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"files ending in \['.jsonl', '.txt'\]; use files of one kind"):
        prepare_corpus(str(text_dir), cache_dir=cache)
    with pytest.raises(ValueError, match=r"has 1 document\(s\); a train/validation split by document needs at least 2"):
        prepare_corpus(str(text_dir / "doc00.txt"), cache_dir=cache)


@pytest.mark.parametrize("name", ["stdlib", "local_text"])
def test_data_configs_match_the_api(name, monkeypatch):
    monkeypatch.setenv("LONGNET_CACHE", "/some/cache")
    config = OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml")
    assert config.cache_dir == "/some/cache"
    monkeypatch.delenv("LONGNET_CACHE")
    assert config.cache_dir == "~/.cache/longnet_dist"
    expected_keys = {"source", "tokenizer", "cache_dir", "val_fraction", "split_seed", "text_field",
                     "seq_len", "micro_batch_size", "shuffle_seed"}
    assert set(config.keys()) == expected_keys
    if name == "stdlib":
        assert (config.source, config.seq_len, config.micro_batch_size) == ("stdlib", 2048, 1)
    else:
        assert OmegaConf.is_missing(config, "source")  # the user must name their files
