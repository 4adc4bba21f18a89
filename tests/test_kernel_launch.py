"""attention/kernels/launch.py: compiled Triton kernels launched without Triton's per-call binding.

The direct path runs on a GPU only (tests/test_cuda_attention.py and the Triton kernel tests run every fused launch
through it there, against the float64 reference); here a fake kernel checks the bookkeeping, and Triton's own
binder (its C++ specialisation, no GPU needed) checks that our key never joins launches Triton would tell apart.
"""
from __future__ import annotations

import inspect
import random
from types import SimpleNamespace

import pytest
import torch

from longnet_dist.attention.kernels import launch as fast

triton = pytest.importorskip("triton")


def _kernel_body(X, Y, n, stride, scale, FLAG, D, BLOCK=16):
    pass


class FakeCompiled:
    function, packed_metadata = "cu-function", "packed"

    def __init__(self):
        self.launches = []

    @property
    def run(self):
        return lambda *args: self.launches.append(args)


class FakeKernel:
    """Triton's JITFunction as launch() sees it: params, signature, kernel[grid](...) -> the compiled kernel."""

    def __init__(self, body=_kernel_body):
        self.signature = inspect.signature(body)
        self.params = [SimpleNamespace(name=name, is_constexpr=name.isupper()) for name in self.signature.parameters]
        self.compiled, self.through_triton = FakeCompiled(), []

    def __getitem__(self, grid):
        def go(*args, **meta):
            self.through_triton.append((grid, args, meta))
            return self.compiled
        return go


@pytest.fixture
def runtime(monkeypatch):
    hooks = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(fast, "_driver", [lambda: 0, lambda device: 1000 + device, hooks])
    monkeypatch.setattr(fast, "_cache", {})
    return hooks


def test_a_kernel_goes_through_triton_once_per_key_then_straight_to_its_launcher(runtime):
    kernel, x, y = FakeKernel(), torch.zeros(64), torch.zeros(64, dtype=torch.bfloat16)
    fast.launch(kernel, (4, 2), (x, y), 32, 64, 0.5, FLAG=True, D=64, num_warps=4)
    assert len(kernel.through_triton) == 1 and not kernel.compiled.launches
    x2, y2 = torch.ones(64), torch.ones(64, dtype=torch.bfloat16)  # other tensors, same dtypes and alignment
    fast.launch(kernel, (8,), (x2, y2), 32, 64, 0.5, FLAG=True, D=64, num_warps=4)
    # grid padded to three, the current stream, no metadata or hooks, then the arguments and the constexpr tail
    # (FLAG and D passed, BLOCK defaulted)
    assert kernel.compiled.launches == [(8, 1, 1, 1000, "cu-function", "packed", None, None, None,
                                         x2, y2, 32, 64, 0.5, True, 64, 16)]
    for pointers, scalars, meta in [((x[1:], y), (32, 64, 0.5), {}),  # a misaligned address
                                    ((x.double(), y), (32, 64, 0.5), {}),  # a dtype
                                    ((x, y), (48, 64, 0.5), {}), ((x, y), (32, 64, 0.25), {}),  # scalars
                                    ((x, y), (32, 64, 0.5), {"num_warps": 8}), ((x, y), (32, 64, 0.5), {"FLAG": 0})]:
        before = len(kernel.through_triton)
        fast.launch(kernel, (1,), pointers, *scalars, **{"FLAG": True, "D": 64, "num_warps": 4, **meta})
        assert len(kernel.through_triton) == before + 1, (pointers, scalars, meta)
    assert len(kernel.compiled.launches) == 1


def test_launch_hooks_a_non_constexpr_tail_or_another_device_take_tritons_path(runtime, monkeypatch):
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(2):
        fast.launch(kernel, (1,), (x, x), 16, 16, 1.0, FLAG=False, D=64)
    assert len(kernel.through_triton) == 1
    runtime.launch_enter_hook = SimpleNamespace(calls=[print])  # a profiler's hook (Triton 3.6's HookChain)
    fast.launch(kernel, (1,), (x, x), 16, 16, 1.0, FLAG=False, D=64)
    assert len(kernel.through_triton) == 2
    runtime.launch_enter_hook = SimpleNamespace(calls=[])  # an empty chain: no hook
    fast.launch(kernel, (1,), (x, x), 16, 16, 1.0, FLAG=False, D=64)
    assert len(kernel.through_triton) == 2
    fast._driver[0] = lambda: 1  # another current device: its own compiled kernel
    fast.launch(kernel, (1,), (x, x), 16, 16, 1.0, FLAG=False, D=64)
    assert len(kernel.through_triton) == 3

    def by_keyword(X, n, m, FLAG):
        pass
    odd = FakeKernel(by_keyword)  # m is not a constexpr: a launch passing it by keyword is never kept
    for _ in range(2):
        fast.launch(odd, (1,), (x,), 16, m=16, FLAG=True)
    assert len(odd.through_triton) == 2 and not odd.compiled.launches


def test_direct_launches_only_for_verified_tritons_and_unless_switched_off(runtime, monkeypatch):
    """Triton 3.4-3.9 call the launcher as launch() does (read in their source); other versions, and
    LONGNET_TRITON_DIRECT_LAUNCH=0 (fast.DIRECT), always take Triton's own path."""
    assert fast.verified("3.4.0") and fast.verified("3.6.0") and fast.verified("3.9.1+git1234")
    assert not fast.verified("3.3.1") and not fast.verified("3.10.0") and not fast.verified("4.0") \
        and not fast.verified("nightly")
    monkeypatch.setattr(fast, "DIRECT", False)
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(3):
        fast.launch(kernel, (1,), (x, x), 16, 16, 1.0, FLAG=False, D=64)
    assert len(kernel.through_triton) == 3 and not kernel.compiled.launches and not fast._cache


def test_stubs_and_interpreted_kernels_always_take_tritons_path(runtime):
    """What kernel[grid] returns without a GPU (None: the interpreter, host_overhead's stubs) is never kept."""
    calls = []
    stub = type("Stub", (), {"__getitem__": lambda self, grid: lambda *a, **m: calls.append(a)})()
    for _ in range(3):
        fast.launch(stub, (1,), (torch.zeros(4),), 3, D=4)
    assert len(calls) == 3 and not fast._cache


def test_our_key_tells_apart_every_pair_of_launches_that_tritons_specialisation_does():
    """For the fused kernels' real signatures, launches with one key of ours (arguments_key) get one specialisation
    from Triton's own binder (native_specialize_impl: dtypes, 16-byte alignment, ints divisible by 16, equal to 1,
    32 or 64 bits): keeping a compiled kernel per key of ours never runs a kernel compiled for other arguments."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from longnet_dist.attention.kernels import triton_dilated, triton_rows

    rng = random.Random(0)
    storage = torch.zeros(256, dtype=torch.float32)
    tensors = [storage, storage[1:], storage[4:], storage.to(torch.bfloat16), storage.to(torch.bfloat16)[8:],
               storage.to(torch.uint8)[3:], storage.to(torch.int32)]
    ints = [0, 1, 2, 15, 16, 17, 32, 48, 64, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -16, -1, 2**62, 2**63 - 16]
    for kernel in (triton_dilated._fwd, triton_dilated._bwd_dkdv, triton_rows._store_heads):
        jit = JITFunction(getattr(kernel, "fn", kernel))  # the interpreter's kernels wrap the Python function
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
        runtime_params = [p for p in jit.params if not p.is_constexpr]
        seen = {}
        scalar_sets = [tuple(rng.choice([0.125, 1.0]) if p.name.startswith("scale") else rng.choice(ints)
                             for p in runtime_params if not p.name[0].isupper()) for _ in range(3)]
        for _ in range(400):  # few scalar sets, so that draws share them and differ in their tensors
            pointers = tuple(rng.choice(tensors) for p in runtime_params if p.name[0].isupper())
            scalars = rng.choice(scalar_sets)
            args = [*pointers, *scalars]  # the kernels take their tensors first
            ours = fast.arguments_key(pointers, scalars)
            _, specialization, _ = binder(*args, **{p.name: 1 for p in jit.params if p.is_constexpr})
            tritons = tuple(specialization[i] for i, p in enumerate(jit.params) if not p.is_constexpr)
            assert seen.setdefault(ours, tritons) == tritons, (kernel, args)
        assert len({key[0] for key in seen}) > 20  # the draws did vary the tensors' part of the key
