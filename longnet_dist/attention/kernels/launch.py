"""Launch a compiled Triton kernel with less host time than `kernel[grid](...)`.

Triton binds every launch anew: it specialises each argument, builds a cache key from them and the
options, reads its knobs (several from the environment), checks the kernel's globals and only then calls
the compiled kernel's launcher. For a 32K-token attention layer on an H200 host that was about a third
of the 2.0 ms the CPU spent issuing one forward+backward, while the GPU needed 2.9 ms (stop 29,
benchmarks/host_overhead.py --cprofile): the GPU waited on the host.

`launch(kernel, grid, tensors, *scalars, **meta)` does what `kernel[grid](*tensors, *scalars, **meta)` does.
The first launch of each key goes through Triton (which compiles or finds the kernel) and keeps the
compiled kernel under that key; later launches with the same key call its launcher directly. Our key is
at least as specific as Triton's specialisation: per tensor its dtype and whether its address is 16-byte
aligned (what Triton reads of a pointer), the scalar arguments' values themselves (Triton reads whether
an integer is divisible by 16, equal to 1, 32 or 64 bits; a layer's strides and lengths repeat every
step, so exact values cost no extra compiles), and every keyword (constexprs, num_warps, num_stages);
the kernels here take their non-constexpr arguments positionally, tensors first. Anything
else takes Triton's own path: Triton's interpreter, a stub, launch hooks (profilers such as Proton set
them), a Triton outside 3.4-3.9 (the versions whose `JITFunction.run` calls the launcher as this module
does; checked in their source), or LONGNET_TRITON_DIRECT_LAUNCH=0 in the environment.
"""
from __future__ import annotations

import os

DIRECT = os.environ.get("LONGNET_TRITON_DIRECT_LAUNCH", "1") != "0"  # read at import
VERIFIED_TRITON = ((3, 4), (3, 9))  # oldest and newest (major, minor) whose launcher call this module repeats

_cache: dict = {}       # our key -> (launcher, function, packed metadata, the constexpr tail of the argument list)
_CACHE_LIMIT = 4096     # keys kept before the cache starts afresh (a new sequence length is a new key)
_driver: list = []      # [get_current_device, get_current_stream, knobs.runtime], set at the first kept launch
_STATS = {"direct": 0, "triton": 0}  # launches by path (tests read them)


def arguments_key(pointers: tuple, scalars: tuple) -> tuple[tuple, tuple]:
    """What tells launches apart: per tensor its dtype and whether its address is 16-byte aligned; the scalars."""
    return tuple([(x.dtype, x.data_ptr() & 15 == 0) for x in pointers]), scalars


def verified(version: str) -> bool:
    """Whether Triton `version` ("3.6.0", "3.9.0+git...") is one whose launcher call this module repeats."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return VERIFIED_TRITON[0] <= major_minor <= VERIFIED_TRITON[1]


def _runtime() -> bool:
    """Whether direct launches may be used; the first time, also fetch what they need from Triton."""
    if not DIRECT:
        return False
    if not _driver:
        import triton
        from triton import knobs
        from triton.runtime import driver

        if not verified(triton.__version__):
            return False
        _driver.extend([driver.active.get_current_device, driver.active.get_current_stream, knobs.runtime])
    return True


def _tail(kernel, count: int, meta: dict) -> tuple | None:
    """The arguments after the `count` positional ones as the launcher takes them (constexprs, passed or
    defaulted), or None when one of them is not a constexpr (then Triton's path only)."""
    values = []
    for param in kernel.params[count:]:
        if not param.is_constexpr:
            return None
        default = kernel.signature.parameters[param.name].default
        values.append(meta.get(param.name, default))
    return tuple(values)


def _no_hooks(runtime) -> bool:
    """No launch hooks: None (Triton <= 3.5) or an empty HookChain (3.6 on)."""
    return not any(getattr(hook, "calls", hook) for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def launch(kernel, grid: tuple, pointers: tuple, *scalars, **meta) -> None:
    """kernel[grid](*pointers, *scalars, **meta): the kernel's tensor arguments first, then its scalars (ints,
    floats, bools), then its constexprs and options by keyword. Through the kept compiled kernel when a launch
    with the same key ran on this device before: per tensor its dtype and whether its address is 16-byte aligned,
    the scalars' values themselves, and the keywords."""
    device = _driver[0]() if _driver else None
    key = (kernel, device, *arguments_key(pointers, scalars), tuple(meta.items()))
    kept = _cache.get(key)
    if kept is not None and _no_hooks(_driver[2]):
        launcher, function, packed, tail = kept
        _STATS["direct"] += 1
        launcher(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _driver[1](device),
                 function, packed, None, None, None, *pointers, *scalars, *tail)
        return
    _STATS["triton"] += 1
    compiled = kernel[grid](*pointers, *scalars, **meta)
    if kept is None and DIRECT and all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")) \
            and hasattr(kernel, "params") and hasattr(kernel, "signature"):
        tail = _tail(kernel, len(pointers) + len(scalars), meta)
        if tail is not None and _runtime():
            if len(_cache) >= _CACHE_LIMIT:
                _cache.clear()
            _cache[(kernel, _driver[0](), *key[2:])] = (compiled.run, compiled.function, compiled.packed_metadata, tail)
