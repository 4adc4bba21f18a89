"""`python -m longnet_dist.train` / `longnet-train`: Hydra entry point on configs/train.yaml.

Examples (see docs/training.md):
    python -m longnet_dist.train                                   # the default CPU demo run
    python -m longnet_dist.train model=tiny data.seq_len=1024 trainer.max_steps=50 logger=none
    torchrun --nproc_per_node 2 -m longnet_dist.train distributed.sequence_parallel_size=2 deepspeed=zero2
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig

# configs/ sits at the repository root, beside the package (editable install or a source checkout).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# Under torchrun only rank 0 writes Hydra's files (.hydra/, the job log) into the run directory; the
# other ranks log warnings to the console only, write nothing, and take the run directory from rank 0.
NON_ZERO_RANK_OVERRIDES = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout",
                           "hydra.job_logging.root.level=WARNING")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a run raises for its input (a config value, the data, a checkpoint, an unstable run), each with a
    message that says what to change: printed as one line."""
    from .checkpoint import CheckpointError
    from .faults import NonFiniteLossError, NonFiniteWeightsError

    return ValueError, CheckpointError, NonFiniteLossError, NonFiniteWeightsError


def _exit(message: str) -> NoReturn:
    """Exit 1 with `message` as the run's one line. Under torchrun it also goes into this worker's error file
    (TORCHELASTIC_ERROR_FILE), so the failure summary torchrun prints after it gives `message` as each rank's
    cause instead of a link to its docs."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):
        try:
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
        except OSError:
            pass  # the line below still says it
    sys.exit(message)


def _record_for_torchrun(error: BaseException) -> None:
    """An unexpected error's traceback into torchrun's error file (its @record decorator would never see it:
    Hydra prints the traceback and exits)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)


def _check_config_dir() -> None:
    if not (CONFIG_DIR / "train.yaml").is_file():
        _exit(f"longnet-train: no configs/train.yaml at {CONFIG_DIR}; install the package from a source "
                 f"checkout with `pip install -e .` (configs/ lives at the repository root)")


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    # imported after Hydra has parsed the command line: `--help` stays fast
    from .config import check_packages, validate_config
    from .trainer import train

    try:
        validate_config(cfg)
    except ValueError as error:  # one line, no traceback: the message names the key and valid values
        _exit(f"longnet-train: invalid config: {error}")
    try:
        check_packages(cfg)
    except ImportError as error:  # the package, what needs it, the install line and the alternative
        _exit(f"longnet-train: {error}")
    try:
        train(cfg)
    except _user_errors() as error:
        if os.environ.get("LONGNET_TRACEBACK") == "1":
            raise
        # our own messages name the value and the way out; a traceback through Hydra would bury them
        _exit(f"longnet-train: {type(error).__name__}: {error} (LONGNET_TRACEBACK=1 shows where)")
    except Exception as error:
        _record_for_torchrun(error)
        raise


def _check_output_dir_argument(argv: list[str]) -> None:
    """A `trainer.output_dir=` override naming a file, or a path through one: Hydra makes that folder its run
    directory before any of our code runs, and fails with a traceback of its own."""
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith("trainer.output_dir=")]
    if not values or not values[-1]:
        return
    path = Path(values[-1])
    blocking = next((part for part in [path, *path.parents] if part.exists() and not part.is_dir()), None)
    if blocking is not None:
        _exit(f"longnet-train: invalid config: trainer.output_dir={values[-1]!r}: {blocking} is a file, not a "
                 f"folder; name a folder for the run (it is made if missing)")


def main() -> None:
    _check_config_dir()
    _check_output_dir_argument(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv.extend(NON_ZERO_RANK_OVERRIDES)  # last override wins over the user's
    _hydra_main()


if __name__ == "__main__":
    main()
