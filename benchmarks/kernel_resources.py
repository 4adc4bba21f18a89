"""Registers, spills and code shape of the fused attention kernels per block shape, compiled for a GPU
that this machine need not have.

    python3 benchmarks/kernel_resources.py               # sm_90 (H100 / H200), bf16, D = 64, ~2 minutes
    python3 benchmarks/kernel_resources.py --defaults    # only the block shapes in use (fused_settings.blocks_for)
    python3 benchmarks/kernel_resources.py --defaults --arch 89 --head-dim 128   # another GPU, head dim or dtype

Each kernel is compiled exactly as a launch would compile it: `fused_launch.forward_branch` and
`fused_launch.backward_branch` run on meta tensors (B = 1, N = 256K, H = 12, D = 64, bf16, branch
(8192, 4), causal, a branch before the covering r = 1 one: in the backward it marks the rows it writes) with
the kernels swapped for recorders, and the recorded arguments are specialised the way Triton's JIT does at
launch (pointers and integers divisible by 16 marked so, integers equal to 1 made constants). Without those hints the compiler can neither vectorise nor
pipeline the strided row loads, and the numbers mean little (this tool's first version compiled so).

Per kernel and shape: registers per thread, the stack frame (where spilled registers go: 0 means no
spills), shared memory, and from the Triton GPU IR whether the row loads are asynchronous copies into
shared memory (cp.async / TMA, pipelined over `num_stages`) and whether the products are Hopper warp-group
MMAs (wgmma), and whether Triton split the loop into warp groups ("+warp specialize":
fused_settings.WARP_SPECIALIZE, which it does for a kernel's only loop with TMA loads and no early return).
"+parent" and "+child" are the same kernels sharing keys (fused_settings.SHARE_KEYS): scoring pairs for three
nested branches, or nested in a branch of 4096 positions. "+last": the 16-bit r = 1 branch (2048, 1) run last,
writing the output or the gradients in bf16. The two row-wise kernels (the
backward's prep, the join of two chains) are compiled too, registers and spills only. Run it under the
Triton a GPU lease has (PYTHONPATH to a `pip install --target` of that version) to know that every kernel
compiles there before the lease starts. Needs a Triton with its NVIDIA backend and TRITON_INTERPRET unset;
no GPU. Writes benchmarks/results/kernel_resources.json.
"""
from __future__ import annotations

import argparse
import contextlib
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
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from common import RESULTS  # noqa: E402
from gpu_kernels import CANDIDATES  # noqa: E402  (the block shapes gpu_attention.py --tune tries)
from longnet_dist.attention import fused_launch, fused_settings  # noqa: E402
from longnet_dist.attention.kernels import triton_dilated as kern  # noqa: E402
from longnet_dist.attention.kernels import triton_rows, triton_width  # noqa: E402
from longnet_dist.attention.nesting import KernelFold  # noqa: E402

SHAPE = dict(batch=1, seq_len=262144, heads=12, head_dim=64, w=8192, r=4)  # --head-dim sets head_dim
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE = torch.bfloat16  # of q, k, v, dO and the outputs (--dtype)
# The most dynamic shared memory a program may have (bytes), by compute capability: what each generation's
# programming guide lists (A100 and Hopper/Blackwell datacenter parts; the 99 KiB of Ampere and Ada workstation and
# consumer GPUs (sm_86, sm_89) and of consumer Blackwell (sm_120)). A launch asking for more is refused.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# kernel -> (the Triton function, the fused_settings.DQ_MODE whose backward launches it, constexprs forced on the
# launch: on meta tensors fused sees no CUDA device, so it would pick atomic dQ for "tma" and pointer loads,
# the nesting.KernelFold it launches with: None, sharing no keys)
KERNELS = {
    "fwd": ("_fwd", None, {}, None),
    "dkdv": ("_bwd_dkdv", "kernel", {}, None),
    "dkdv+atomic dq": ("_bwd_dkdv", "atomic", {"FUSE_DQ": 1}, None),
    "dkdv+tma dq": ("_bwd_dkdv", "tma", {"FUSE_DQ": 2}, None),
    "dq": ("_bwd_dq", "kernel", {}, None),
    "fwd+tma loads": ("_fwd", None, {"TMA": True}, None),  # fused_settings.TMA_LOADS
    "dkdv+tma loads": ("_bwd_dkdv", "kernel", {"TMA": True}, None),
    "dkdv+tma loads+tma dq": ("_bwd_dkdv", "tma", {"TMA": True, "FUSE_DQ": 2}, None),
    "dq+tma loads": ("_bwd_dq", "kernel", {"TMA": True}, None),
    # fused_settings.WARP_SPECIALIZE: each kernel's loop as one, split into warp groups by Triton (dK/dV with a dQ
    # kernel of its own)
    "fwd+tma loads+warp specialize": ("_fwd", None, {"TMA": True, "WS": True}, None),
    "dkdv+tma loads+warp specialize": ("_bwd_dkdv", "kernel", {"TMA": True, "WS": True}, None),
    "dq+tma loads+warp specialize": ("_bwd_dq", "kernel", {"TMA": True, "WS": True}, None),
}
# fused_settings.SHARE_KEYS: the branch as a parent scoring pairs for three nested branches (the paper's (4096, 2)
# has three), and as a branch nested in one of 4096 positions
PARENT, CHILD = KernelFold(None, ((16384, 8), (32768, 12), (32768, 16))), KernelFold(4096)
KERNELS.update({f"{name}+{role}": (*KERNELS[name][:2], {}, fold)
                for role, fold in (("parent", PARENT), ("child", CHILD)) for name in ("fwd", "dkdv", "dq")})
# the 16-bit r = 1 branch run last (LAST: it writes the output or the gradients in bf16; the backward's reads the
# bytes that mark the rows the branches before wrote), as branch (2048, 1)
LAST_BRANCH = (2048, 1)
KERNELS.update({f"{name}+last": KERNELS[name] for name in ("fwd", "dkdv", "dkdv+tma dq", "dq")}
               | {f"{name}+tma loads+warp specialize+last": KERNELS[f"{name}+tma loads+warp specialize"]
                  for name in ("fwd", "dkdv", "dq")})


class Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **meta)` records the call instead of running it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((args, meta))


@contextlib.contextmanager
def recording(names=("_fwd", "_bwd_dkdv", "_bwd_dq", "_bwd_prep")):
    """Swap the kernels `names` for Recorders in their modules, `kern` or `triton_rows` (fused_launch launches
    them through the modules)."""
    module = {name: triton_rows if name in ("_bwd_prep", "_merge_chains") else kern for name in names}
    saved = {name: getattr(module[name], name) for name in names}
    recorders = {name: Recorder(fn) for name, fn in saved.items()}
    for name, recorder in recorders.items():
        setattr(module[name], name, recorder)
    try:
        yield recorders
    finally:
        for name, fn in saved.items():
            setattr(module[name], name, fn)


def blocks_key(kernel: str) -> str:
    """The fused_settings blocks `kernel`'s launch takes: "dkdv_dq" for the dK/dV kernel computing dQ too (the
    "atomic" and "tma" dQ modes), else the kernel's own."""
    fn_name, mode, _, _ = KERNELS[kernel]
    return "dkdv_dq" if fn_name == "_bwd_dkdv" and mode in ("atomic", "tma") else kernel.split("+")[0]


def in_use(kernel: str) -> fused_settings.Blocks:
    """The blocks `kernel`'s launch takes at this head dim and dtype without a tuning sweep."""
    return fused_settings.blocks_for(blocks_key(kernel), DTYPE, SHAPE["head_dim"])


def launch_of(kernel: str, blocks: fused_settings.Blocks) -> tuple:
    """(Triton function, positional arguments, meta arguments) of `kernel`'s launch with `blocks`."""
    fn_name, mode, forced, fold = KERNELS[kernel]
    B, N, H, D, w, r = (SHAPE[key] for key in ("batch", "seq_len", "heads", "head_dim", "w", "r"))
    meta_tensor = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    q, k, v, grad_out = (meta_tensor(B, N, H, D, dtype=DTYPE) for _ in range(4))
    lse, delta = meta_tensor(B, N, H), meta_tensor(B, N, H)
    # the 16-bit backward's branches before the covering one mark the rows they write
    marks = tuple(meta_tensor(B, N, H, dtype=torch.uint8) for _ in range(2))
    covering = {} if fn_name == "_fwd" else dict(marks=marks)
    if kernel.endswith("+last"):
        w, r = LAST_BRANCH
        outputs = tuple(meta_tensor(B, N, H, D, dtype=DTYPE) for _ in range(3))
        covering["out"] = outputs[0] if fn_name == "_fwd" else outputs
    saved = dict(fused_settings.TUNED), fused_settings.DQ_MODE
    fused_settings.TUNED[(blocks_key(kernel), DTYPE == torch.float32, triton_width(D))] = blocks  # by tile width
    try:
        with recording() as recorders:
            if fn_name == "_fwd":
                fused_launch.forward_branch(q, k, v, None, meta_tensor(B, N, H, D), lse, w, r, 0, True, D ** -0.5,
                                            fold=fold, **covering)
            else:
                fused_settings.DQ_MODE = mode
                grads = [meta_tensor(B, N, H, D) for _ in range(3)]
                fused_launch.backward_branch(q, k, v, grad_out, lse, delta, None, *grads, w, r, 0, True, D ** -0.5,
                                             fold=fold, **covering)
    finally:
        fused_settings.TUNED.clear()
        fused_settings.TUNED.update(saved[0])
        fused_settings.DQ_MODE = saved[1]
    args, meta = recorders[fn_name].calls[0]
    return recorders[fn_name].fn, args, {**meta, **forced}


def compile_launch(fn, args: tuple, meta: dict, arch: int):
    """Compile `fn` for sm_<arch> with the specialisation Triton's JIT gives these arguments."""
    options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
    values = dict(zip(fn.arg_names, args)) | meta
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name] if param.name in values else fn.signature.parameters[param.name].default
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)
        if kind == "constexpr":  # an integer equal to 1
            signature[param.name], constexprs[param.name] = "constexpr", key
        else:
            signature[param.name] = kind
            if key and BaseBackend.parse_attr(key):
                attrs[(index,)] = BaseBackend.parse_attr(key)
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def row_launches() -> dict:
    """name -> (Triton function, positional arguments, meta arguments) of the two row-wise launches, the
    backward's prep (delta, lse2) and the join of two chains (fused_settings.SIDE_BRANCHES)."""
    B, N, H, D = (SHAPE[key] for key in ("batch", "seq_len", "heads", "head_dim"))
    rows = lambda dtype=torch.float32: torch.empty(B, N, H, D, dtype=dtype, device="meta")  # noqa: E731
    lse = lambda: torch.empty(B, N, H, device="meta")  # noqa: E731
    with recording(("_bwd_prep", "_merge_chains")) as recorders:
        fused_launch.backward_prep(rows(DTYPE), rows(DTYPE), lse())
        fused_launch.merge_chains(rows(), lse(), rows(), lse(), rows(DTYPE))
    return {name: (recorders[fn].fn, *recorders[fn].calls[0]) for name, fn in (("prep", "_bwd_prep"),
                                                                                ("merge chains", "_merge_chains"))}


def usage_of(compiled) -> dict:
    """Registers per thread, stack frame (spills) and shared memory of a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "dynamic_shared_bytes": compiled.metadata.shared}


def resources(kernel: str, blocks: fused_settings.Blocks, arch: int) -> dict:
    """Compile one kernel as its launch would and read its registers, stack frame, shared memory and code."""
    compiled = compile_launch(*launch_of(kernel, blocks), arch)
    ir = compiled.asm["ttgir"]
    return {"kernel": kernel, "blocks": [blocks.block_m, blocks.block_n, blocks.num_warps, blocks.num_stages],
            "default": blocks == in_use(kernel),
            **usage_of(compiled),
            "async_loads": ir.count("async_copy_global_to_local") + ir.count("async_tma_copy_global_to_local"),
            "tma_loads": ir.count("async_tma_copy_global_to_local"),  # of those, by the tensor-memory accelerator
            "wgmma": ir.count("warp_group_dot ") + ir.count("warp_group_dot\n") > 0,
            "warp_specialized": "ttg.warp_specialize" in ir}  # the loop split into warp groups


def kernels_for(arch: int) -> list[str]:
    """The KERNELS a GPU of compute capability `arch` can launch: before Hopper no TMA (fused_launch._tma_ready),
    so no TMA loads, TMA dQ or warp-specialised loops."""
    return [name for name in KERNELS if arch >= 90 or not ("tma" in name or "warp specialize" in name)]


def main() -> None:
    global DTYPE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100, "
                        "89: L40S / RTX 4090, 100: B200, 120: RTX 5090)")
    parser.add_argument("--head-dim", type=int, default=64, choices=range(1, 129), metavar="1..128",
                        help="rows of this many values (tiles of the next of 16, 32, 64, 128, the rest masked)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--defaults", action="store_true", help="only the block shapes in use")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for kernel_resources.json (kernel_resources_sm<arch>_d<D>_<dtype>.json for others)")
    args = parser.parse_args()
    SHAPE["head_dim"], DTYPE = args.head_dim, DTYPES[args.dtype]
    limit = SHARED_LIMIT.get(args.arch)
    rows = []
    print(f"sm_{args.arch} (shared memory per program at most {limit} bytes), {args.dtype}, causal, {SHAPE}; "
          f"Triton {triton.__version__}")
    print(f"{'kernel':<22} {'block_m x block_n, warps, stages':<33} {'registers':>9} {'stack (spills)':>15} "
          f"{'shared':>7} {'async loads (tma)':>17} {'wgmma':>6} {'warp groups':>11}")
    for kernel in kernels_for(args.arch):
        shapes = [in_use(kernel)]
        if not args.defaults:
            base = blocks_key(kernel)
            tried = {"dkdv": CANDIDATES["dkdv"] + CANDIDATES["dkdv_small"],
                     "dkdv_dq": CANDIDATES["dkdv_fused_dq"]}.get(base, CANDIDATES.get(base, []))
            tried = [fused_settings.Blocks(*shape) for shape in dict.fromkeys(tried)]
            shapes += [blocks for blocks in tried if blocks != shapes[0]]
        for blocks in shapes:
            row = resources(kernel, blocks, args.arch)
            row["fits"] = limit is None or row["dynamic_shared_bytes"] <= limit
            rows.append(row)
            shape = "{} x {}, {}, {}".format(*row["blocks"]) + (" (default)" if row["default"] else "")
            print(f"{kernel:<22} {shape:<33} {row['registers']:>9} {row['stack_bytes']:>15} "
                  f"{row['dynamic_shared_bytes']:>7}{' ' if row['fits'] else '!'}{row['async_loads']:>10} "
                  f"({row['tma_loads']:>3}) {str(row['wgmma']):>6} {str(row['warp_specialized']):>11}", flush=True)
    row_kernels = [{"kernel": name, **usage_of(compile_launch(fn, call_args, meta, args.arch))}
                   for name, (fn, call_args, meta) in row_launches().items()]
    for row in row_kernels:
        print(f"{row['kernel']:<22} {'(row-wise)':<33} {row['registers']:>9} {row['stack_bytes']:>15} "
              f"{row['dynamic_shared_bytes']:>7}", flush=True)
    if not all(row["fits"] for row in rows):
        print(f"'!': more shared memory than sm_{args.arch} gives a program; such a launch is refused, and "
              "fused_launch retries it with smaller blocks (fused_settings.smaller_blocks)")
    args.results.mkdir(parents=True, exist_ok=True)
    usual = (args.arch, args.head_dim, args.dtype) == (90, 64, "bf16")
    path = args.results / ("kernel_resources.json" if usual else
                           f"kernel_resources_sm{args.arch}_d{args.head_dim}_{args.dtype}.json")
    path.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "dtype": args.dtype,
                                "shared_limit": limit, "shape": SHAPE, "command": " ".join(sys.argv), "rows": rows,
                                "row_kernels": row_kernels}, indent=2) + "\n")
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
