"""`longnet-export CHECKPOINT OUT_DIR` / `python -m longnet_dist.export CHECKPOINT OUT_DIR`.

Writes OUT_DIR/model.safetensors (fp32 weights) and OUT_DIR/config.json (model config, tokenizer,
training seq_len, step, source) from a run directory (its newest complete checkpoint) or a
checkpoint folder of any ZeRO stage. The folder loads without DeepSpeed:
`LongNetLM.from_checkpoint(OUT_DIR)`, and `python -m longnet_dist.generate checkpoint=OUT_DIR`.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="longnet-export", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", help="run directory, checkpoints/ folder or checkpoints/step_XXXXXXXX folder")
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in out_dir")
    args = parser.parse_args(argv)

    from longnet_dist.train.checkpoint import CheckpointError
    from longnet_dist.train.export import export

    try:
        out_dir = export(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    except (CheckpointError, ValueError) as error:
        sys.exit(f"longnet-export: {error}")
    except OSError as error:
        if str(error.filename or "").startswith(args.out_dir):  # the output folder: not creatable or writable
            sys.exit(f"longnet-export: cannot write the export into {args.out_dir!r}: {error.strerror}")
        sys.exit(f"longnet-export: {error}")
    print(f"exported {args.checkpoint} -> {out_dir}/model.safetensors + config.json")


if __name__ == "__main__":
    main()
