"""SequenceShardLoader: seeded windows of a token file, each rank reading only its own slice.

Sharding rule. The token file is cut into `num_windows = (num_tokens - 1) // seq_len` windows; window i
starts at token i * seq_len and its labels need one token more. Epoch e orders the windows by a
permutation seeded with (seed, e) (or in file order when shuffle=False). Step s of an epoch uses the
`dp_size * micro_batch_size` windows at order positions [s * dp_size * mb, (s + 1) * dp_size * mb);
dp replica r takes the r-th run of `mb` of them, so replicas never share a window and the set of windows
in a step depends only on the global batch, not on how it is split. Inside a window, sp rank j of
sp_size holds the local positions [j * l, (j + 1) * l), l = seq_len // sp_size, and reads only
tokens[start + j*l : start + (j+1)*l + 1] (inputs plus the next token for the last label).
Windows beyond steps_per_epoch * dp_size * mb in an epoch's order are not used that epoch.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .token_file import TokenFile


# what must match for a saved position (epoch, batches consumed) to mean the same windows, with the config keys
# that set each
RESUME_SETTINGS = {
    "seed": "data.shuffle_seed",
    "shuffle": "training shuffles, evaluation does not",
    "seq_len": "data.seq_len",
    "num_windows": "the corpus: data.source, data.val_fraction, data.split_seed, data.tokenizer",
    "global_batch": "data.micro_batch_size x data-parallel size",
}


def _check_count(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")


def _check_rank(name: str, rank: Any, size: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
        raise ValueError(f"{name}={rank!r}: expected an integer in [0, {size})")


class SequenceShardLoader:
    """Infinite iterator of this rank's batches; see the module docstring for the sharding rule.

    Each batch is {"input_ids": (micro_batch_size, seq_len // sp_size) int64, "labels": same shape
    (the next token of each input), "positions": (seq_len // sp_size,) int64 global positions inside
    the window}. `state_dict()` after k batches + `load_state_dict` resumes at batch k + 1 exactly.
    """

    def __init__(
        self,
        token_file: TokenFile,
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        sp_rank: int = 0,
        sp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        _check_count("seq_len", seq_len)
        _check_count("micro_batch_size", micro_batch_size)
        _check_count("dp_size", dp_size)
        _check_count("sp_size", sp_size)
        _check_rank("dp_rank", dp_rank, dp_size)
        _check_rank("sp_rank", sp_rank, sp_size)
        if seq_len % sp_size != 0:
            valid = [size for size in range(1, seq_len + 1) if seq_len % size == 0][:12]
            raise ValueError(
                f"seq_len={seq_len} is not divisible by sp_size={sp_size}; sp sizes that divide it: {valid}"
            )
        num_windows = (token_file.num_tokens - 1) // seq_len
        if num_windows < 1:
            raise ValueError(
                f"{token_file.path} has {token_file.num_tokens} tokens; one sample of seq_len={seq_len} "
                f"needs {seq_len + 1} (seq_len + 1 for the last label): lower seq_len or use a bigger corpus"
            )
        global_batch = dp_size * micro_batch_size
        if num_windows < global_batch:
            raise ValueError(
                f"{token_file.path} gives {num_windows} windows of seq_len={seq_len}, fewer than one step "
                f"needs (dp_size={dp_size} x micro_batch_size={micro_batch_size} = {global_batch})"
            )
        self.token_file = token_file
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.sp_rank, self.sp_size = int(sp_rank), int(sp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.local_len = seq_len // sp_size
        self.num_windows = num_windows
        self.steps_per_epoch = num_windows // global_batch
        # windows used per epoch by all dp replicas together (the rest of the order is dropped)
        self.samples_per_epoch = self.steps_per_epoch * global_batch
        self.positions = torch.arange(sp_rank * self.local_len, (sp_rank + 1) * self.local_len)
        self.epoch = 0
        self.step_in_epoch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ---- order ----------------------------------------------------------------------------------
    def window_order(self, epoch: int) -> np.ndarray:
        """(num_windows,) window indices in the order epoch `epoch` visits them (all replicas)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def windows_of_step(self, epoch: int, step: int) -> np.ndarray:
        """(micro_batch_size,) window indices this dp replica reads at `step` of `epoch`."""
        first = (step * self.dp_size + self.dp_rank) * self.micro_batch_size
        return self.window_order(epoch)[first : first + self.micro_batch_size]

    def slice_bounds(self, window: int) -> tuple[int, int]:
        """[lo, hi) token range this sp rank reads for `window`: its l inputs plus one label token."""
        lo = window * self.seq_len + self.sp_rank * self.local_len
        return lo, lo + self.local_len + 1

    # ---- batches --------------------------------------------------------------------------------
    def _batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        tokens = self.token_file.tokens
        rows = []
        for window in self.windows_of_step(epoch, step):
            lo, hi = self.slice_bounds(int(window))
            rows.append(np.asarray(tokens[lo:hi], dtype=np.int64))  # the only read from the memmap
        block = torch.from_numpy(np.stack(rows))  # (micro_batch, l + 1)
        return {
            "input_ids": block[:, :-1],  # (micro_batch, l)
            "labels": block[:, 1:],  # (micro_batch, l): next token of each input
            "positions": self.positions.clone(),  # (l,) global positions in the window
        }

    def __iter__(self) -> SequenceShardLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        batch = self._batch(self.epoch, self.step_in_epoch)
        self.step_in_epoch += 1
        return batch

    def iter_epoch(self, epoch: int = 0, max_steps: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """A finite pass over one epoch (at most max_steps batches), independent of the resume state:
        with shuffle=False this is a fixed set of windows, e.g. for evaluation."""
        steps = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        for step in range(steps):
            yield self._batch(epoch, step)

    # ---- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, batches consumed in it) plus what must match for that position to mean the same."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "global_batch": self.dp_size * self.micro_batch_size,
        }

    def check_resumable(self, state: dict[str, Any] | None, where: str = "the checkpoint") -> None:
        """ValueError naming each setting whose change would make `state`'s position mean other windows (None:
        a checkpoint from before its manifest recorded the position, checked again when loaded)."""
        if state is None:
            return
        current = self.state_dict()
        mismatched = [name for name in RESUME_SETTINGS if state.get(name) != current[name]]
        if "seq_len" in mismatched and "num_windows" in mismatched:
            mismatched.remove("num_windows")  # follows from seq_len; the corpus may well be the same
        if mismatched:
            details = "; ".join(f"{name} ({RESUME_SETTINGS[name]}): {state.get(name)!r} in {where}, "
                                f"{current[name]!r} now" for name in mismatched)
            raise ValueError(
                f"cannot resume the data position of {where}, the loader setup changed: {details}. Resume with the "
                f"settings it was trained with, or start a new run from its weights in a new trainer.output_dir "
                f"(init_from=<that checkpoint>: the optimizer and the data position start anew)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the dp/sp split may differ as long as the global batch is the same."""
        self.check_resumable(state)
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
