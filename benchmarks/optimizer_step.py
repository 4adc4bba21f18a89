"""What the DeepSpeed engine adds to an optimizer step of `model=base`, against a bare torch AdamW.

Times `engine.step()` of the trainer's own engine (build_engine + deepspeed_config from the composed
Hydra config: ZeRO stage 0, torch AdamW, gradient clipping 1.0, the LR scheduler; on CUDA bf16 with
fp32 master weights and the fused AdamW) after a real backward of a short sequence, and a bare
torch.optim.AdamW step (fused on CUDA, foreach on the CPU) with clip_grad_norm_ over fp32 parameters
of the same shapes. The difference is the engine's overhead per step. "host" is the time until step()
returns, before waiting for the device: where it is close to the whole, the GPU waited on the host.

Which DeepSpeed wrapper runs the step depends on the config: bf16 at ZeRO stage 0 is FP16_UnfusedOptimizer
(a loop over the parameters, an overflow check that waits for the GPU once per parameter); bf16 at stage 1
with `--grad-accum-dtype fp32` is BF16_Optimizer (flat fp32 buffers, gradients accumulated in fp32 during
the backward), DeepSpeed's own bf16 path, whose gradient clipping build_engine fuses into one multi-tensor
multiply (engine.fuse_bf16_gradient_clipping; LONGNET_FUSED_CLIP=0 times DeepSpeed's own per-tensor loop).

    python3 benchmarks/optimizer_step.py                 # CPU fp32 (about a minute on 2 cores)
    python3 benchmarks/optimizer_step.py --device cuda   # one GPU, bf16, a few seconds
    python3 benchmarks/optimizer_step.py --device cuda --zero-stage 1 --grad-accum-dtype fp32

Writes benchmarks/results/optimizer_step_<device>_zero<stage>[_bf16][_accum_fp32].json and prints the times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
from common import machine, save  # noqa: E402


def compose(device: str, zero_stage: int, bf16: bool, grad_accum_dtype: str | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = ["model=base", "attention=paper", f"deepspeed=zero{zero_stage}", f"deepspeed.bf16.enabled={bf16}",
                 "trainer.torch_adam=true", "logger=none", "data.seq_len=32768", "model.compile=false"]
    if grad_accum_dtype:
        overrides.append(f"+deepspeed.data_types.grad_accum_dtype={grad_accum_dtype}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides), overrides


def timed_steps(step, sync, repeats: int, host: list[float] | None = None) -> list[float]:
    """Seconds of each step until the device is done; `host` (if given) gets each step's time until it returned."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        returned = time.perf_counter()
        sync()
        times.append(time.perf_counter() - start)
        if host is not None:
            host.append(returned - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto", help="auto: on CUDA only")
    parser.add_argument("--tokens", type=int, default=256, help="sequence of the backward before each step")
    parser.add_argument("--grad-accum-dtype", choices=["fp32"], default=None,
                        help="DeepSpeed's data_types.grad_accum_dtype (default: the model's dtype); fp32 with bf16 "
                             "at ZeRO stage 1 selects BF16_Optimizer")
    args = parser.parse_args()

    import torch

    from longnet_dist.model import LongNetLM, count_parameters
    from longnet_dist.train.config import deepspeed_config, model_config
    from longnet_dist.train.engine import build_engine, ensure_process_group

    bf16 = args.device == "cuda" if args.bf16 == "auto" else args.bf16 == "true"
    cfg, overrides = compose(args.device, args.zero_stage, bf16, args.grad_accum_dtype)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    ensure_process_group(None)
    torch.manual_seed(0)
    model = LongNetLM(model_config(cfg, vocab_size=258))
    bare_params = [torch.nn.Parameter(p.detach().clone().float().to(args.device)) for p in model.parameters()]
    engine = build_engine(model, deepspeed_config(cfg))
    ids = torch.randint(0, 258, (1, args.tokens + 1), device=engine.device)

    def backward() -> None:
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]).mean())

    engine_times, host_times = [], []
    for _ in range(args.repeats + 1):  # the first step allocates optimizer state
        backward()
        engine_times += timed_steps(engine.step, sync, 1, host_times)
    first_step_s, engine_times, host_times = engine_times[0], engine_times[1:], host_times[1:]

    for p in bare_params:
        p.grad = torch.randn_like(p) * 1e-3
    fused = args.device == "cuda"
    bare = torch.optim.AdamW(bare_params, lr=1e-4, weight_decay=0.1, fused=fused, foreach=None if fused else True)

    def bare_step() -> None:
        torch.nn.utils.clip_grad_norm_(bare_params, 1.0, foreach=True)
        bare.step()

    bare_host: list[float] = []
    bare_times = timed_steps(bare_step, sync, args.repeats + 1, bare_host)[1:]
    result = {"device": args.device, "parameters": count_parameters(model),
              "engine": {"optimizer": type(engine.optimizer).__name__,
                         "inner": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
                         "bf16": engine.bfloat16_enabled()},
              "grad_accum_dtype": str(engine.get_data_types()[1]).replace("torch.", ""),
              "engine_step_ms": 1e3 * statistics.median(engine_times),
              "engine_host_ms": 1e3 * statistics.median(host_times),
              "bare_adamw_step_ms": 1e3 * statistics.median(bare_times),
              "bare_adamw_host_ms": 1e3 * statistics.median(bare_host[1:]),
              "bare_adamw": "fused" if fused else "foreach", "repeats": args.repeats,
              "engine_step_times_s": engine_times, "engine_first_step_s": first_step_s, "bare_step_times_s": bare_times,
              "overrides": overrides, "machine": machine()}
    result["engine_overhead_ms"] = result["engine_step_ms"] - result["bare_adamw_step_ms"]
    accum = f"_accum_{args.grad_accum_dtype}" if args.grad_accum_dtype else ""
    path = save(f"optimizer_step_{args.device}_zero{args.zero_stage}{'_bf16' if bf16 else ''}{accum}", result)
    print(f"{result['parameters'] / 1e6:.1f}M parameters on {args.device}: engine.step() "
          f"{result['engine_step_ms']:.1f} ms (host {result['engine_host_ms']:.1f}; {result['engine']}), bare AdamW "
          f"+ clip {result['bare_adamw_step_ms']:.1f} ms (host {result['bare_adamw_host_ms']:.1f}; "
          f"{result['bare_adamw']}); engine overhead "
          f"{result['engine_overhead_ms']:.1f} ms per step; wrote {path}")


if __name__ == "__main__":
    main()
