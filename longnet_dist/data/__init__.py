"""Data (floor 2): documents -> tokens -> a cached flat token file; a loader that gives every rank
only its own slice of each sample. See docs/data.md."""

from .corpus import default_cache_dir, prepare_corpus, validation_mask
from .loader import SequenceShardLoader
from .token_file import TokenFile, TokenFileWriter, write_token_file
from .tokenizer import EOD_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, HFTokenizer, load_tokenizer, token_dtype

__all__ = [
    "EOD_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "HFTokenizer",
    "SequenceShardLoader",
    "TokenFile",
    "TokenFileWriter",
    "default_cache_dir",
    "load_tokenizer",
    "prepare_corpus",
    "token_dtype",
    "validation_mask",
    "write_token_file",
]
