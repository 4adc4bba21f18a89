"""Registers and spills of the fused attention kernels per block shape, compiled for a GPU that this
machine need not have.

    python3 benchmarks/kernel_resources.py               # sm_90 (H100 / H200), bf16, D = 64, ~1 minute
    python3 benchmarks/kernel_resources.py --defaults    # only the block shapes in use (fused.DEFAULT_BLOCKS)

Compiles every kernel (forward; dK/dV with dQ from its own kernel, with atomic dQ and with TMA-reduced
dQ; dQ) for the
block shapes `benchmarks/gpu_attention.py --tune` tries and the defaults, with Triton's compiler for
the target architecture (causal, no key padding, not the first branch: the common launch), and
reads the cubin's resource usage with the cuobjdump that Triton bundles: registers per thread, the
stack frame (where spilled registers go: 0 means no spills) and static shared memory. A kernel that
spills runs its hot loop through local memory. Needs a Triton with its NVIDIA backend and
TRITON_INTERPRET unset; no GPU. Writes benchmarks/results/kernel_resources.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py compiles real kernels: unset TRITON_INTERPRET")

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from common import RESULTS  # noqa: E402
from gpu_kernels import CANDIDATES  # noqa: E402  (the block shapes gpu_attention.py --tune tries)
from longnet_dist.attention import fused  # noqa: E402
from longnet_dist.attention.kernels import triton_dilated as kern  # noqa: E402

# (kernel function, 16-bit pointer arguments, fp32 pointer arguments, extra constexprs)
KERNELS = {
    "fwd": (kern._fwd, "Q K V", "OA LA", {}),
    "dkdv": (kern._bwd_dkdv, "Q K V DO", "LSE2 DELTA DKA DVA DQA", {"FUSE_DQ": 0}),
    "dkdv+atomic dq": (kern._bwd_dkdv, "Q K V DO", "LSE2 DELTA DKA DVA DQA", {"FUSE_DQ": 1}),
    "dkdv+tma dq": (kern._bwd_dkdv, "Q K V DO", "LSE2 DELTA DKA DVA DQA", {"FUSE_DQ": 2}),
    "dq": (kern._bwd_dq, "Q K V DO", "LSE2 DELTA DQA", {}),
}


def resources(kernel: str, blocks: fused.Blocks, arch: int, dtype: str = "bf16", head_dim: int = 64) -> dict:
    """Compile one kernel for sm_<arch> and read registers, stack frame and shared memory of its cubin."""
    fn, halves, singles, extra = KERNELS[kernel]
    consts = dict(CAUSAL=True, HAS_KEEP=False, FIRST=False, BLOCK_MAJOR=False, D=head_dim, BLOCK_M=blocks.block_m,
                  BLOCK_N=blocks.block_n, PRECISION="tf32", **extra)
    types = {name: f"*{dtype}" for name in halves.split()}
    types.update({name: "*fp32" for name in singles.split()})
    types.update({"KEEP": "*u8", "scale2": "fp32", "scale": "fp32"})
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"kernel": kernel, "blocks": [blocks.block_m, blocks.block_n, blocks.num_warps, blocks.num_stages],
            "default": blocks == fused.DEFAULT_BLOCKS[(kernel.split("+")[0], False)],
            "registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "dynamic_shared_bytes": compiled.metadata.shared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--defaults", action="store_true", help="only the block shapes in use")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for kernel_resources.json")
    args = parser.parse_args()
    rows = []
    print(f"sm_{args.arch}, bf16, D = 64, causal; Triton {triton.__version__}")
    print(f"{'kernel':<15} {'block_m x block_n, warps, stages':<33} {'registers':>9} {'stack (spills)':>15} "
          f"{'shared':>7}")
    for kernel in KERNELS:
        base = kernel.split("+")[0]
        shapes = [fused.DEFAULT_BLOCKS[(base, False)]]
        if not args.defaults:
            tried = CANDIDATES[base] + (CANDIDATES["dkdv_fused_dq"] + CANDIDATES["dkdv_small"] if base == "dkdv" else [])
            shapes += [fused.Blocks(*shape) for shape in dict.fromkeys(tried) if fused.Blocks(*shape) != shapes[0]]
        for blocks in shapes:
            row = resources(kernel, blocks, args.arch)
            rows.append(row)
            shape = "{} x {}, {}, {}".format(*row["blocks"]) + (" (default)" if row["default"] else "")
            print(f"{kernel:<15} {shape:<33} {row['registers']:>9} {row['stack_bytes']:>15} "
                  f"{row['dynamic_shared_bytes']:>7}", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "kernel_resources.json"
    path.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "dtype": "bf16", "head_dim": 64,
                                "command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
