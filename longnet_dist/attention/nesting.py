"""Nested branches share keys: a (query, key) pair that several branches give is scored once (exact).

Eq. 9-10 weight each branch by its softmax denominator, so the merged output is one softmax over the
multiset of all keys the branches give a query: a key that 1 + c branches give weighs
(1 + c) exp(s) = exp(s + ln(1 + c)).

Branch d = (w_d, r_d) *nests* in branch a = (w_a, r_a) when w_a | w_d, r_a | r_d and r_d | w_a (effective
segment lengths, whole segments). Then, for a query p of head h in d, the keys d gives p inside p's own
a-segment are keys a gives p too (head h keeps rows = h mod r_d there, and those are = h mod r_a), and p
is a query of a. So
- d attends only the keys outside p's a-segment. With m = w_a / r_d slots per a-segment, the slots of
  sub-block q attend sub-blocks 0..q-1 (and q+1.. when not causal): rectangles, no causal diagonal;
- a scores the pairs it shares with d with the bias ln(1 + c), where c counts the branches nested in a
  (directly or through others) whose rows both p and the key are (p = key = h mod r_d). The bias depends
  on the head only through h mod lcm(r, r_d...), so a runs one call per such head group, each with one
  (Lq, Lk) bias shared by its heads and segments.
With w = 2048, 4096, 8192 and r = 1, 2, 4 (the paper's doubling rule) the second and third branch score half
their pairs, all off the causal diagonal. On aten's CPU flash kernel, whose causal calls compute 512-key
blocks whole, that is about a fifth less kernel time for a layer (benchmarks/cpu_layer.py).

Each branch nests in the longest branch it can (ties: the larger r) whose own ancestors it nests in too; a
branch that nests in none attends its whole segments (a root). `choose` keeps the plan only where the
kernel work it saves outweighs what the bias costs (a cost model of aten's CPU kernel); dilated.py uses it
on the CPU for whole segments without key padding.

The fused GPU kernels (kernels/triton_dilated.py, kernels/triton_nesting.py) share keys the same way when
fused_settings.SHARE_KEYS is on (`kernel_plan`). There the bias is a factor on the probabilities,
p = exp2(s - m) (1 + sum_d [query kept by d] [key kept by d]), and only r_a | w_a is needed (kept-by-d tests
positions, not slots): the paper's branches w = 2048..32768, r = 1, 2, 4, 6, 12 score 22% fewer pairs
((16384, 6) nests in (4096, 2), (32768, 12) in (8192, 4); `kernel_pairs`).
"""
from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

BIAS_BYTES = 64 * 2**20  # largest (Lq, Lk) bias one call may take: w/r = 2048 slots in float64 (16 MiB in float32)
BIAS_COST = 0.1          # a call with a bias costs about 10% more (aten CPU flash, fwd+bwd, measured 5-19%)
MIN_SAVING = 0.1         # share keys only when the cost model saves at least this fraction of the kernel work
# LONGNET_SHARE_KEYS=0 in the environment: every branch alone, on the CPU path (dilated.SHARE_KEYS) and in the
# fused kernels (fused_settings.SHARE_KEYS), which both start from this
SHARE_KEYS_BY_DEFAULT = os.environ.get("LONGNET_SHARE_KEYS", "1") != "0"


@dataclass(frozen=True)
class Fold:
    """How a branch (w, r) runs: `parent` the effective segment length of the branch it nests in (None: a
    root, it attends its whole segments) and `nested` the dilations of the branches nested in it, directly
    or through others, whose pairs it scores for them."""

    parent: int | None = None
    nested: tuple[int, ...] = ()


ROOT = Fold()


def _nests(a: tuple[int, int], d: tuple[int, int]) -> bool:
    """d nests in a on the CPU path (whole slot blocks: r_d | w_a)."""
    (wa, ra), (wd, rd) = a, d
    return wd % wa == 0 and rd % ra == 0 and wa % rd == 0


def nests_in_kernel(a: tuple[int, int], d: tuple[int, int]) -> bool:
    """d nests in a inside the fused kernels, which test positions, not slots: w_a | w_d, r_a | r_d, r_a | w_a.
    Then every row d keeps for head h is a row a keeps for h (its offset from a's segment start is = h mod r_a),
    and this relation is transitive, so any chain of it is a valid tree."""
    (wa, ra), (wd, rd) = a, d
    return wd % wa == 0 and rd % ra == 0 and wa % ra == 0


def _ancestors(parent, i: int):
    """The branches above branch i, nearest first (`parent[i]`: the index of i's parent, or None)."""
    while parent[i] is not None:
        i = parent[i]
        yield i


def parents(pairs: Sequence[tuple[int, int]], nests=_nests) -> list[int | None]:
    """Index of the branch each branch nests in (None: a root), `pairs` their effective (w, r): the longest it
    `nests` in (ties: larger r) whose own ancestors it nests in too."""
    parent: dict[int, int | None] = {}  # filled shortest branch first: a parent comes before its children
    for d in sorted(range(len(pairs)), key=lambda i: pairs[i]):
        fits = [a for a in parent
                if nests(pairs[a], pairs[d]) and all(nests(pairs[x], pairs[d]) for x in _ancestors(parent, a))]
        parent[d] = max(fits, key=lambda a: pairs[a], default=None)
    return [parent[i] for i in range(len(pairs))]


def descendants(parent: Sequence[int | None], i: int) -> list[int]:
    """The branches nested in branch i, directly or through others."""
    return [d for d in range(len(parent)) if i in _ancestors(parent, d)]


def plan(pairs: Sequence[tuple[int, int]]) -> list[Fold]:
    """The fold of each branch on the CPU path, `pairs` its effective (w, r)."""
    parent = parents(pairs)
    return [Fold(None if parent[i] is None else pairs[parent[i]][0],
                 tuple(sorted(pairs[d][1] for d in descendants(parent, i)))) for i in range(len(pairs))]


@dataclass(frozen=True)
class KernelFold:
    """How the fused kernels run a branch that shares keys: `parent` the segment length of the branch it nests
    in (None: a root; else its queries skip the keys in their own parent segment) and `nested` the (w, r) of
    the branches nested in it, directly or through others, whose pairs it scores for them (weight 1 + c)."""

    parent: int | None = None
    nested: tuple[tuple[int, int], ...] = ()


def kernel_plan(pairs: Sequence[tuple[int, int]]) -> list[KernelFold]:
    """The KernelFold of each branch, `pairs` their effective (min(w, N), r)."""
    parent = parents(pairs, nests_in_kernel)
    return [KernelFold(None if parent[i] is None else pairs[parent[i]][0],
                       tuple(pairs[d] for d in descendants(parent, i))) for i in range(len(pairs))]


def kernel_pairs(w: int, r: int, fold: KernelFold, causal: bool) -> float:
    """Score pairs per position and head that the fused kernels compute for branch (w, r) (slot-exact, whole
    segments of w positions): a root's whole segments, a nested branch's only those across parent segments."""
    total = 0
    for h in range(r):  # the slot sets of heads h mod r
        n = len(range(h, w, r))
        groups = Counter(p // fold.parent for p in range(h, w, r)).values() if fold.parent else [n]
        # causal: slot i attends the i + 1 slots up to it, less those of its own parent segment before it
        same = sum(g * (g + 1) // 2 for g in groups) if causal else sum(g * g for g in groups)
        everything = n * (n + 1) // 2 if causal else n * n
        total += everything if fold.parent is None else everything - same
    return total / (r * w)


def calls(w: int, r: int, fold: Fold, causal: bool) -> list[tuple[slice, slice, bool]]:
    """(query slots, key slots, causal) of each kernel call a segment of branch (w, r) needs: slot k is
    position segment start + s + k r."""
    if fold.parent is None:  # every slot: ceil(w / r) covers the offsets that keep one more when r does not divide w
        n = -(-w // r)
        return [(slice(0, n), slice(0, n), causal)]
    n = w // r  # a branch that nests divides its segments (r | r_d | w_a | w)
    m = fold.parent // r  # slots per parent segment
    out = []
    for first in range(0, n, m):
        rows = slice(first, first + m)
        if first:  # the keys before this parent segment
            out.append((rows, slice(0, first), False))
        if not causal and first + m < n:  # and after it
            out.append((rows, slice(first + m, n), False))
    return out


def head_groups(r: int, fold: Fold, heads: int) -> tuple[int, range]:
    """(step, groups): each call runs the heads h = g (mod step) of one group g, whose rows are = g (mod r);
    their bias is the same (it depends on h mod r_d)."""
    step = math.lcm(r, *fold.nested)
    return step, range(min(step, heads))


def bias(r: int, group: int, fold: Fold, queries: slice, keys: slice, dtype: torch.dtype,
         device: torch.device) -> Tensor | None:
    """(1, 1, Lq, Lk) additive scores ln(1 + c) of one call of head group `group`, or None (nothing nested).
    A nested branch d takes the slots k = t (mod r_d / r) with t = (g mod r_d - g mod r) / r, queries and keys."""
    if not fold.nested:
        return None
    pattern = tuple((rd // r, (group % rd - group % r) // r) for rd in fold.nested)
    # every call's first slots are multiples of each period (r_d divides the parent segment): relative slots do
    return _bias(pattern, queries.stop - queries.start, keys.stop - keys.start, dtype, device)


_BIASES: OrderedDict = OrderedDict()  # (pattern, Lq, Lk, dtype, device) -> bias, least recently used first
CACHE_BYTES = 512 * 2**20           # biases kept across calls and layers (a root's is 16 MiB at 2048 slots, fp32)


def _bias(pattern: tuple[tuple[int, int], ...], lq: int, lk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (pattern, lq, lk, dtype, device)
    found = _BIASES.pop(key, None)
    if found is None:
        # the count depends on (query slot, key slot) mod P only: a (P, P) table, then one gather
        period = math.lcm(*(p for p, _ in pattern))
        cls = torch.arange(period, device=device)
        count = sum((cls % p == t).double()[:, None] * (cls % p == t).double()[None, :] for p, t in pattern)
        table = torch.log1p(count).to(dtype)                                            # (P, P)
        found = table[torch.arange(lq, device=device) % period][:, torch.arange(lk, device=device) % period]
        found = found.view(1, 1, lq, lk)
    _BIASES[key] = found
    while len(_BIASES) > 1 and sum(x.nbytes for x in _BIASES.values()) > CACHE_BYTES:
        _BIASES.popitem(last=False)
    return found


def _pairs(lq: int, lk: int, causal: bool) -> int:
    """Score pairs aten's CPU flash kernel computes for one (Lq, Lk) call: causal, blocks of 256 queries
    each take whole 512-key blocks up to the diagonal."""
    if not causal:
        return lq * lk
    return sum(min(256, lq - i) * min(lk, -(-(i + 256) // 512) * 512) for i in range(0, lq, 256))


def _cost(w: int, r: int, fold: Fold, causal: bool) -> float:
    """Kernel work of branch (w, r) per position and head (a segment's calls over its w positions)."""
    work = sum(_pairs(q.stop - q.start, k.stop - k.start, c) for q, k, c in calls(w, r, fold, causal))
    return work * (1 + BIAS_COST * bool(fold.nested)) / w


def choose(pairs: Sequence[tuple[int, int]], causal: bool, element_size: int) -> list[Fold] | None:
    """`plan`, when it nests any branch, its biases fit BIAS_BYTES and it saves MIN_SAVING of the work."""
    folds = plan(pairs)
    if all(f.parent is None for f in folds):
        return None
    if any(f.nested and (w // r) ** 2 * element_size > BIAS_BYTES for (w, r), f in zip(pairs, folds)):
        return None
    shared = sum(_cost(w, r, f, causal) for (w, r), f in zip(pairs, folds))
    alone = sum(_cost(w, r, ROOT, causal) for w, r in pairs)
    return folds if shared <= (1 - MIN_SAVING) * alone else None
