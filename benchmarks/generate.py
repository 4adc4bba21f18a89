"""Generation after a long prompt: each new token from the key/value cache against a full pass over the prefix.

    python3 benchmarks/generate.py                          # prompts of 1K, 4K, 16K tokens: ~3 minutes on 2 cores
    python3 benchmarks/generate.py --prompts 65536 --tag 64k --device cuda

The `small` model shape (dim 256, 4 layers, H = 4, SwiGLU, RMSNorm), random weights, fp32, batch 1, greedy, the
branches w = 2048, 8192, 32768 and r = 1, 4, 16 (the first three of `attention=long`). "cached"
(`generate_ids(use_cache=True)`, the default): the prompt runs as one forward pass, each new token one row per
layer against the cached keys and values (attention/decode.py). "recomputed" (`use_cache=False`): every token a
forward pass over the whole prefix. Both must pick the same greedy tokens (checked). Per new token: the time of T
steps after the prompt's pass / T for "cached", the time of T tokens / T for "recomputed"; best of --repeats.
Writes benchmarks/results/generate[_TAG].json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, machine, save  # noqa: E402

from longnet_dist.generate import generate_ids  # noqa: E402
from longnet_dist.model.lm import LongNetConfig, LongNetLM  # noqa: E402

BRANCHES = ([2048, 8192, 32768], [1, 4, 16])


def seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def cached_steps(model: LongNetLM, prompt: list[int], tokens: int, device: torch.device) -> float:
    """Seconds of `tokens` greedy steps after the prompt's pass, each one row through the cache (generate_ids'
    loop, timed without the prompt)."""
    cache = model.new_cache(1, len(prompt) + tokens)
    token = int(model(torch.tensor([prompt], device=device), cache=cache)[0, -1].argmax())

    def steps() -> None:
        nonlocal token
        for _ in range(tokens):
            token = int(model(torch.tensor([[token]], device=device), cache=cache)[0, -1].argmax())

    return seconds(steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt lengths")
    parser.add_argument("--cached-tokens", type=int, default=64, help="new tokens per cached run")
    parser.add_argument("--recomputed-tokens", type=int, default=4, help="new tokens per recomputed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="", help="write generate_TAG.json / .png")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LongNetLM(LongNetConfig(vocab_size=258, dim=256, num_layers=4, num_heads=4, segment_lengths=BRANCHES[0],
                                    dilation_rates=BRANCHES[1], compile=False)).to(device).eval()
    points = []
    print(f"{'prompt':>7} {'prompt pass s':>13} {'cached ms/token':>15} {'recomputed ms/token':>19} {'speedup':>8}")
    for n in args.prompts:
        prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        with torch.inference_mode():
            model(torch.tensor([prompt], device=device))  # warm-up
        best = {"prompt": float("inf"), "cached": float("inf"), "recomputed": float("inf")}
        for _ in range(args.repeats):
            with torch.inference_mode():
                best["prompt"] = min(best["prompt"], seconds(lambda: model(torch.tensor([prompt], device=device)),
                                                             device))
            best["cached"] = min(best["cached"], cached_steps(model, prompt, args.cached_tokens, device))
            best["recomputed"] = min(best["recomputed"], seconds(
                lambda: generate_ids(model, prompt, args.recomputed_tokens, temperature=0, use_cache=False), device))
        same = (generate_ids(model, prompt, args.recomputed_tokens, temperature=0)
                == generate_ids(model, prompt, args.recomputed_tokens, temperature=0, use_cache=False))
        cached = best["cached"] / args.cached_tokens
        recomputed = best["recomputed"] / args.recomputed_tokens
        point = {"prompt": n, "prompt_pass_s": best["prompt"], "cached_s_per_token": cached,
                 "recomputed_s_per_token": recomputed, "speedup": recomputed / cached, "same_tokens": same}
        points.append(point)
        print(f"{n:>7} {best['prompt']:13.3f} {cached * 1e3:15.2f} {recomputed * 1e3:19.1f} {point['speedup']:7.0f}x"
              + ("" if same else "  TOKENS DIFFER"), flush=True)
        if not same:
            raise SystemExit("the cached and recomputed runs picked different tokens")
    host = machine()  # names the GPU too where CUDA is present
    name = "generate" + (f"_{args.tag}" if args.tag else "")
    path = save(name, {"machine": host, "device": str(device), "model": "small shape, random weights",
                       "branches": {"segment_lengths": BRANCHES[0], "dilation_rates": BRANCHES[1]}, "dtype": "float32",
                       "cached_tokens": args.cached_tokens, "recomputed_tokens": args.recomputed_tokens,
                       "repeats": args.repeats, "command": " ".join(["python3", "benchmarks/generate.py", *sys.argv[1:]]),
                       "points": points})
    plot(points, host, name, str(device))
    print(f"wrote {path} and {RESULTS / (name + '.png')}")


def plot(points: list[dict], host: dict, name: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = [p["prompt"] for p in points]
    ax.plot(xs, [p["recomputed_s_per_token"] * 1e3 for p in points], "o-", label="recomputed (a pass over the prefix)")
    ax.plot(xs, [p["cached_s_per_token"] * 1e3 for p in points], "o-", label="key/value cache (default)")
    for p in points:
        ax.annotate(f"{p['speedup']:.0f}x", (p["prompt"], p["cached_s_per_token"] * 1e3), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms per new token (best)")
    ax.legend(fontsize=8)
    where = host.get("gpu", device) if device != "cpu" else f"{host['cpu']}, {host['cores']} cores"
    ax.set_title(f"Generation, `small` shape, fp32 - {where}", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
