"""The LongNet LM's forward+backward on the CPU, its blocks handing attention q, k, v packed or as three tensors.

    python3 benchmarks/cpu_lm.py                         # 4K and 16K tokens, about 3 minutes on 2 cores
    python3 benchmarks/cpu_lm.py --seq-lens 65536 --tag 64k   # about 8 minutes

The `small` model (dim 256, 4 layers, H = 4, SwiGLU, RMSNorm, 3.3M parameters), fp32, batch 1, no activation
checkpointing, eager (as the CPU trains): at 4K tokens with the default branches (w = 512..4096,
r = 1..8: `make train`'s step), longer with w = 2048, 8192, 32768 and r = 1, 4, 16 (the first three of
`attention=long`).
- "packed" (the default since stop 24): each block's region before attention writes rotary's q, k and
  v as it is into one (B, N, 3, H, D) tensor (attention/rotary.py `rotate_packed`: a few passes, the
  backward the inverse rotation), and the attention accumulates their gradient in that layout
  (`packed_dilated_attention`): no concatenation of rotary's halves and no stack of dq, dk, dv.
- "three tensors": `apply_rotary` on q and k, v a view, three tensors to `dilated_attention`
  (`Block.packed` off; what compiled blocks keep, where inductor fuses the rotary itself).
Both give the same loss and gradients bit for bit (tests/test_packed_qkv.py). One model, the same tokens,
the two paths alternating, best of `--repeats`; also the minor page faults of each best run, the
allocator (LD_PRELOAD) and the bytes autograd saves for backward (the activations: every distinct
storage a saved tensor holds, counted once, in a pass of its own). Writes benchmarks/results/cpu_lm[_TAG].json and .png.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, machine, save  # noqa: E402

from longnet_dist.model.lm import LongNetConfig, LongNetLM  # noqa: E402

DEFAULT = ([512, 1024, 2048, 4096], [1, 2, 4, 8])  # configs/attention/default.yaml
LONG = ([2048, 8192, 32768], [1, 4, 16])            # the first three of configs/attention/long.yaml
PATHS = {"packed": True, "three_tensors": False}


def use_packed(model: LongNetLM, packed: bool) -> None:
    for block in model.blocks:
        block.packed = packed


def step(model: LongNetLM, ids: torch.Tensor, packed: bool) -> tuple[float, int]:
    """(seconds, minor page faults) of one forward+backward."""
    use_packed(model, packed)
    model.zero_grad(set_to_none=True)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    model(ids, labels=ids).mean().backward()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def saved_bytes(model: LongNetLM, ids: torch.Tensor, packed: bool) -> int:
    """Bytes of the distinct storages that autograd saves for one forward's backward."""
    use_packed(model, packed)
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(ids, labels=ids).mean()
    loss.backward()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384],
                        help="tokens per step (up to 4096: the default branches, sized for 4096; longer: the long ones)")
    parser.add_argument("--tag", default="", help="write cpu_lm_TAG.json / .png")
    args = parser.parse_args()
    points = []
    print(f"{'N':>7} {'branches':24} " + " ".join(f"{name + ' s':>16} {'faults':>8} {'saved KiB/tok':>13}"
                                                 for name in PATHS) + f" {'packed/three':>13}")
    for n in args.seq_lens:
        segments, dilations = DEFAULT if n <= 4096 else LONG
        torch.manual_seed(0)
        model = LongNetLM(LongNetConfig(vocab_size=256, dim=256, num_layers=4, num_heads=4, segment_lengths=segments,
                                        dilation_rates=dilations, compile=False))
        ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))
        for packed in PATHS.values():
            step(model, ids, packed)  # warm-up
        best = dict.fromkeys(PATHS, (float("inf"), 0))
        for _ in range(args.repeats):
            for name, packed in PATHS.items():
                best[name] = min(best[name], step(model, ids, packed))
        saved = {name: saved_bytes(model, ids, packed) for name, packed in PATHS.items()}
        point = {"n": n, "segment_lengths": segments, "dilation_rates": dilations,
                 **{f"{k}_s": v[0] for k, v in best.items()}, **{f"{k}_page_faults": v[1] for k, v in best.items()},
                 **{f"{k}_saved_bytes": v for k, v in saved.items()},
                 "ratio": best["packed"][0] / best["three_tensors"][0]}
        points.append(point)
        print(f"{n:>7} {str(segments):24} " + " ".join(f"{best[k][0]:16.3f} {best[k][1]:8d} {saved[k] / n / 1024:13.1f}"
                                                       for k in PATHS) + f" {point['ratio']:13.3f}", flush=True)
    host = machine()
    name = "cpu_lm" + (f"_{args.tag}" if args.tag else "")
    path = save(name, {"machine": host, "model": "small (dim 256, 4 layers, 4 heads, swiglu, rmsnorm)",
                       "dtype": "float32", "batch": 1, "pass": "forward+backward", "repeats": args.repeats,
                       "command": " ".join(["python3", "benchmarks/cpu_lm.py", *sys.argv[1:]]),
                       "allocator": os.environ.get("LD_PRELOAD") or "glibc", "points": points})
    plot(points, host, name)
    print(f"wrote {path} and {RESULTS / (name + '.png')}")


def plot(points: list[dict], host: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(points))
    for i, (key, label) in enumerate([("packed", "q, k, v packed (default)"), ("three_tensors", "three tensors")]):
        ax.bar([x + (i - 0.5) * 0.4 for x in xs], [p[f"{key}_s"] for p in points], 0.4, label=label)
    for x, p in zip(xs, points):
        ax.annotate(f"{p['ratio']:.3f}x", (x, p["packed_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [f"{p['n'] // 1024}K" for p in points])
    ax.set_ylabel("seconds per forward+backward (best)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"LongNet LM `small`, fp32, eager - {host['cpu']}, {host['cores']} cores", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
