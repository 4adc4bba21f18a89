"""Byte tokenizer round trip and ids; the optional HF tokenizer wrapper and its missing-package error."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from longnet_dist.data import EOD_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_ids_and_specials():
    assert (VOCAB_SIZE, EOD_ID, PAD_ID) == (258, 256, 257)
    tokenizer = load_tokenizer("bytes")
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eod_id, tokenizer.pad_id) == (258, 256, 257)


@pytest.mark.parametrize("text", ["", "def f(x):\n    return x\n", "naïve café – λ → 🐍\t\0"])
def test_byte_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))  # independent reference: Python's UTF-8 codec
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text.encode("utf-8")).tolist() == ids.tolist()  # bytes in, same ids


def test_decode_drops_special_ids():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([104, 105, EOD_ID, 33, PAD_ID]) == "hi!"


def test_unknown_tokenizer_spec_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer='nope.json' is neither 'bytes' nor an existing"):
        load_tokenizer("nope.json")


def test_missing_tokenizers_package_says_how_to_fix(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"needs the `tokenizers` package.*pip install tokenizers"):
        load_tokenizer(path)


def test_hf_tokenizer_appends_eod_and_pad_after_its_vocabulary(tmp_path, monkeypatch):
    class FakeTokenizer:  # stands in for tokenizers.Tokenizer: one id per character
        @classmethod
        def from_file(cls, path):
            return cls()

        def get_vocab_size(self, with_added_tokens=True):
            return 1000

        def encode_batch(self, texts, add_special_tokens=True):
            return [types.SimpleNamespace(ids=[ord(c) % 1000 for c in text]) for text in texts]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=FakeTokenizer))
    path = tmp_path / "tokenizer.json"
    path.write_text('{"fake": 1}')
    tokenizer = load_tokenizer(str(path))
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.eod_id, tokenizer.pad_id, tokenizer.vocab_size) == (1000, 1001, 1002)
    ids = tokenizer.encode_batch(["ab", b"c"])
    assert [i.tolist() for i in ids] == [[97, 98], [99]] and ids[0].dtype == np.uint16
    assert tokenizer.decode([97, 1000, 98]) == "ab"
    path.write_text('{"fake": 2}')  # another file content -> another cache id
    assert load_tokenizer(str(path)).name != tokenizer.name
