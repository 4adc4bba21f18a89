"""What is alive at the memory peak of one LongNetLM training step (forward + backward), on the CPU.

    python3 benchmarks/memory_breakdown.py                       # small model, `long` branches, 128K, full
    python3 benchmarks/memory_breakdown.py --seq-len 32768 --policy selective

Every tensor of at least 1 MiB that an op returns is tracked (a TorchDispatchMode; freed when its
storage is): the peak of their sum, and the tensors alive at that moment grouped by phase, op and
the line of longnet_dist that made them. Sizes are also given in units of one (N, E) fp32 activation
("E"), which makes lengths comparable. Parameters, gradients of parameters and tensors below 1 MiB
are not counted; allocator overhead is not either (compare the process's peak RSS for that).
Writes benchmarks/results/memory_breakdown{_tag}.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, machine  # noqa: E402

from longnet_dist.model import LongNetConfig, LongNetLM  # noqa: E402

LONG_BRANCHES = ([2048, 8192, 32768, 131072, 524288, 2097152], [1, 4, 16, 64, 256, 1024])  # configs/attention/long
MIN_BYTES = 2**20


class LiveTensors(TorchDispatchMode):
    """Peak of the bytes held by tracked op outputs, and which were alive at the peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}  # storage address -> (bytes, label)
        self.total = self.peak = 0
        self.at_peak: list[tuple[int, str]] = []
        self.phase = "forward"

    def _freed(self, key: int) -> None:
        self.total -= self.live.pop(key, (0, ""))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() < MIN_BYTES or key in self.live:  # small, or a view of a tracked one
                continue
            ours = [f for f in traceback.extract_stack(limit=40) if "longnet_dist" in f.filename]
            where = f"{ours[-1].filename.split('longnet_dist/')[-1]}:{ours[-1].lineno}" if ours else "autograd"
            self.live[key] = (storage.nbytes(), f"{self.phase} {func.__name__.split('.')[0]} @ {where}")
            self.total += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
            if self.total > self.peak:
                self.peak, self.at_peak = self.total, list(self.live.values())
        return out


def breakdown(config: LongNetConfig, seq_len: int, seed: int = 0) -> dict:
    """One forward+backward of `config` on random tokens: the peak and what made it, largest first."""
    torch.manual_seed(seed)
    model = LongNetLM(config)
    ids = torch.randint(0, config.vocab_size, (1, seq_len + 1))
    tracker = LiveTensors()
    with tracker:
        loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
        tracker.phase = "backward"
        loss.backward()
    unit = seq_len * config.dim * 4
    groups = collections.Counter()
    for size, label in tracker.at_peak:
        groups[label] += size
    return {"peak_bytes": tracker.peak, "peak_activations": tracker.peak / unit, "activation_bytes": unit,
            "alive_at_peak": [{"what": label, "bytes": size, "activations": size / unit}
                              for label, size in groups.most_common()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--policy", default="full", choices=["none", "full", "selective"])
    parser.add_argument("--dim", type=int, default=256, help="model width (the small model: 256)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    config = LongNetConfig(vocab_size=258, dim=args.dim, num_layers=args.layers, num_heads=args.heads,
                           segment_lengths=LONG_BRANCHES[0], dilation_rates=LONG_BRANCHES[1],
                           activation_checkpointing=args.policy, compile=False)
    result = breakdown(config, args.seq_len)
    print(f"N = {args.seq_len}, dim {args.dim}, {args.layers} layers, checkpointing {args.policy}: peak "
          f"{result['peak_bytes'] / 2**30:.2f} GiB = {result['peak_activations']:.1f} (N, E) fp32 activations")
    for row in result["alive_at_peak"]:
        print(f"  {row['activations']:6.2f}  {row['bytes'] / 2**20:9.1f} MiB  {row['what']}")
    name = f"memory_breakdown{'_' + args.tag if args.tag else ''}.json"
    payload = {"machine": machine(), "command": " ".join(sys.argv), "seq_len": args.seq_len, "policy": args.policy,
               "dim": args.dim, "layers": args.layers, "heads": args.heads, **result}
    (RESULTS / name).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
