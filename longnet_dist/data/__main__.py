"""Build (or find) a corpus cache ahead of a run: `python -m longnet_dist.data --source stdlib`."""

from __future__ import annotations

import argparse
import sys
import time

from .corpus import prepare_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="longnet-data", description=__doc__)
    parser.add_argument("--source", default="stdlib", help="'stdlib', a local file/dir/glob, or a hub dataset name")
    parser.add_argument("--cache-dir", default=None, help="default: $LONGNET_CACHE or ~/.cache/longnet_dist")
    parser.add_argument("--tokenizer", default="bytes", help="'bytes' or a tokenizer.json path")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-field", default="text")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        splits = prepare_corpus(
            args.source, cache_dir=args.cache_dir, tokenizer=args.tokenizer,
            val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
        )
    except (ValueError, ImportError) as error:  # one line, no traceback: the messages name the argument and the fix
        sys.exit(f"longnet-data: {error}")
    for name, token_file in splits.items():
        meta = token_file.meta
        print(f"{name}: {token_file.num_tokens} tokens, {meta['num_documents']} documents, {token_file.path}")
    print(f"ready in {time.perf_counter() - started:.2f} s (corpus build took {meta['build_seconds']} s)")


if __name__ == "__main__":
    main()
