"""LongNet dilated attention (paper Eq. 9-15): sparsify -> per-branch flash kernel -> LSE merge.

Forward, per branch (w_i, r_i): gather the branch's rows of q, k, v into a batch of short sequences
(layout.py), run a kernel that returns output and log-sum-exp (kernels/), and merge it into the
running mixture by log-sum-exp (merge.py, Eq. 9-10). Nothing of size N x N or w x w is ever built.
On the CPU nothing is gathered (r dividing w or not): each head offset's rows in a chunk of whole
segments, or in a ragged last segment, are a strided view (layout.offset_view) that the kernel reads,
the merge updates in place and the backward copies per call and adds its gradients back through.
Branches that nest score the keys they share once (nesting.py: a bias on the shorter branch, rectangles
of the keys outside it on the longer; `share_keys`, LONGNET_SHARE_KEYS=0 turns it off). On CUDA the
one-device path is fused.py (all of this inside Triton kernels); this module serves the CPU, the
portable kernel and sequence-parallel branches.

Backward is exact and needs no gradient through the lse: the merged output is one softmax over the
multiset of all keys the branches give a query, so each branch's gradient is the standard attention
backward run with the *merged* output and the *merged* lse (the ring-attention identity). Each branch
reads its rows again (views on the CPU, a gather for aten's CUDA kernels) instead of keeping sparse
copies alive between passes.

A branch is any object with `prefetch(inputs)`, `forward(inputs, merger)` and
`backward(inputs, merged, grads)`; `LocalBranch` runs on one device, the sequence-parallel module
adds one whose segments span several ranks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, Sequence

import torch
from torch import Tensor

from . import nesting
from .kernels import attention_backward, attention_forward, branch_range, lse_dtype
from .layout import BranchLayout, branch_layout, to_rows
from .merge import BranchMerger


@dataclass
class AttentionInputs:
    """What every branch sees: this device's q, k, v and the settings. `heads` holds q, k, v as given,
    (B, N, H, D) with any strides (the CPU in-place forward reads them so); `q`, `k`, `v` are the same
    as rows (B, N * H, D), made at first use and shared by every branch (a copy when a tensor is a
    strided view, e.g. of a fused qkv projection)."""

    heads: tuple[Tensor, Tensor, Tensor]
    batch: int
    seq_len: int
    num_heads: int
    key_padding_mask: Tensor | None  # (B, N) bool, True = real token
    causal: bool
    scale: float
    backend: str | None
    folds: dict = field(default_factory=dict)  # LocalBranch -> nesting.Fold, when branches share keys

    @cached_property
    def rows(self) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(to_rows(x) for x in self.heads)

    @classmethod
    def from_rows(cls, rows: Sequence[Tensor], batch: int, seq_len: int, num_heads: int, *settings) -> AttentionInputs:
        """Inputs whose rows (B, N * H, D) exist already (slices of another's rows): used as they are, no copy."""
        made = cls(tuple(x.view(batch, seq_len, num_heads, -1) for x in rows), batch, seq_len, num_heads, *settings)
        made.rows = tuple(rows)  # fills the cached property
        return made

    def for_backward(self) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, N, H, D) to keep for the backward: the rows if a branch made them (so the backward
        does not copy them again), else as given."""
        if "rows" not in vars(self):
            return self.heads
        return tuple(x.view(self.batch, self.seq_len, self.num_heads, -1) for x in self.rows)

    q = property(lambda self: self.rows[0])
    k = property(lambda self: self.rows[1])
    v = property(lambda self: self.rows[2])
    head_dim = property(lambda self: self.heads[0].shape[-1])
    dtype = property(lambda self: self.heads[0].dtype)
    device = property(lambda self: self.heads[0].device)


@dataclass
class MergedRows:
    """The merged forward result, as rows, and the gradient arriving at it (backward only)."""

    grad_out: Tensor  # (B, N * H, D) in the input dtype, 0 at padded queries
    out: Tensor       # (B, N * H, D) merged output in the input dtype
    lse: Tensor       # (B, N * H) merged lse; +inf where a row carries no gradient
    shared: dict = field(default_factory=dict)  # what several branches' backwards reuse (fused_launch.py: delta)


class Branch(Protocol):
    def prefetch(self, inputs: AttentionInputs) -> None: ...
    def forward(self, inputs: AttentionInputs, merger: BranchMerger) -> None: ...
    def backward(self, inputs: AttentionInputs, merged: MergedRows, grads: list[Tensor]) -> None: ...


class LocalBranch:
    """One (segment length, dilation) branch computed entirely on this device."""

    def __init__(self, segment_length: int, dilation: int):
        self.segment_length, self.dilation = segment_length, dilation

    def layout(self, inputs: AttentionInputs) -> BranchLayout:
        return branch_layout(inputs.seq_len, inputs.num_heads, self.segment_length, self.dilation, inputs.device)

    def prefetch(self, inputs: AttentionInputs) -> None:
        """Nothing to fetch: every row this branch needs is local."""

    def reads_in_place(self, inputs: AttentionInputs) -> bool:
        """On the CPU the rows are read in place, a chunk of segments at a time (on CUDA the fused kernels do);
        its backward then adds into gradients of either form (run_branches_backward)."""
        return inputs.backend != "triton" and inputs.device.type == "cpu" and self.layout(inputs).in_place

    def forward(self, inputs: AttentionInputs, merger: BranchMerger) -> None:
        if inputs.backend == "triton":  # sharded runs on CUDA: this branch through the fused kernels
            return _fused_merge(inputs, merger, self.segment_length, self.dilation, inputs.folds.get(self))
        if self.reads_in_place(inputs):
            return self._forward_in_place(inputs, merger, inputs.folds.get(self, nesting.ROOT))
        layout = self.layout(inputs)
        q, k, v = (layout.gather(x) for x in (inputs.q, inputs.k, inputs.v))  # (B * n_seg, m, H, D)
        out, lse = attention_forward(q, k, v, causal=inputs.causal, scale=inputs.scale,
                                     key_valid=layout.key_valid(inputs.key_padding_mask, inputs.causal, inputs.batch),
                                     backend=inputs.backend)
        merger.add(layout.scatter_index, layout.sparse_to_rows(out, inputs.batch),
                   layout.sparse_to_rows(lse, inputs.batch))

    def _forward_in_place(self, inputs: AttentionInputs, merger: BranchMerger, fold: nesting.Fold) -> None:
        """`forward` on the CPU (r dividing w or not; a ragged last segment alone): each head group's rows
        are a strided view that the kernel reads and the merge updates in place, one kernel call per head
        group (the heads of one offset, or of one bias when the branch shares keys: nesting.py) and per
        region of `fold`. It runs one batch element and one chunk of whole segments at a time, each call's
        output about FORWARD_CHUNK_BYTES: every temporary stays chunk-sized (glibc reuses its heap for them
        instead of mapping and faulting fresh pages, which made a 256K forward cost 4.4-4.7x a 64K one) and
        the views stay views (batch 1)."""
        H, r, mask = inputs.num_heads, self.dilation, inputs.key_padding_mask
        step, groups = nesting.head_groups(r, fold, H)
        # chunks sized for one head offset's call: 1/r of the rows, ceil(H/r) heads (a sparse branch takes
        # longer chunks; a sharing branch's head groups, ceil(H/step) heads, make smaller calls)
        per_position = max(1, -(-H // r) * inputs.head_dim * inputs.heads[0].element_size() // r)
        for b, start, stop, layout, g, regions in self._head_group_calls(inputs, fold, groups, per_position):
            part = (slice(b, b + 1), slice(start * H, stop * H))  # rows of positions [start, stop)
            # q, k, v: (n_seg, m_s, H_g, D) views of the inputs as given
            q, k, v = (layout.offset_view(x[b: b + 1, start:stop], g, heads=True, head_step=step) for x in inputs.heads)
            out_view, lse_view = (layout.offset_view(x[part], g, flat=False, head_step=step)
                                  for x in (merger.out, merger.lse))  # (1, n_seg, m_s, H_g[, D])
            valid = layout.offset_key_valid(None if mask is None else mask[b: b + 1, start:stop], g, step)
            for rows, keys, causal in regions:
                out, lse = attention_forward(q[:, rows], k[:, keys], v[:, keys], causal=causal, scale=inputs.scale,
                                             key_valid=None if valid is None else valid[:, keys],
                                             backend=inputs.backend,
                                             bias=nesting.bias(r, g, fold, rows, keys, q.dtype, q.device))
                merger.add_into(out_view[:, :, rows], lse_view[:, :, rows], out[None], lse[None])
                if fold.parent is not None:  # its query slots may come twice (keys before and after them)
                    merger.mark_merged()
        merger.mark_merged()

    def _head_group_calls(self, inputs: AttentionInputs, fold: nesting.Fold, groups: range, per_position: int):
        """(batch element, first position, end position, layout, head group, regions) of the in-place
        passes: per chunk (`_chunks`, FORWARD_CHUNK_BYTES), each head group with rows in it (w < r: an offset
        past a short segment keeps none) and the kernel calls `nesting.calls` gives its segments."""
        for b, start, stop, layout in self._chunks(inputs, FORWARD_CHUNK_BYTES, per_position):
            regions = nesting.calls(layout.effective_segment, self.dilation, fold, inputs.causal)
            for g in groups:
                if layout.offset_slots(g):
                    yield b, start, stop, layout, g, regions

    def _chunks(self, inputs: AttentionInputs, budget: int, per_position: int):
        """(batch element, first position, end position, layout) of chunks of whole segments, about
        `budget` bytes at `per_position` bytes per position; a ragged last segment is a chunk of its own
        (its layout: one segment of its length), so every chunk's layout is viewable."""
        w, n = self.segment_length, inputs.seq_len
        span = chunk_positions(inputs, w, budget, per_position)
        whole = n - n % w  # positions in whole segments (w > N: none, the one segment is the ragged one)
        bounds = [(start, min(start + span, whole)) for start in range(0, whole, span)]
        if whole < n:
            bounds.append((whole, n))
        for b in range(inputs.batch):
            for start, stop in bounds:
                yield b, start, stop, branch_layout(stop - start, inputs.num_heads, w, self.dilation, inputs.device)

    def backward(self, inputs: AttentionInputs, merged: MergedRows, grads: list[Tensor]) -> None:
        if inputs.backend == "triton":
            return _fused_grads(inputs, merged, grads, self.segment_length, self.dilation, inputs.folds.get(self))
        if self.reads_in_place(inputs):
            return self._backward_in_place(inputs, merged, grads, inputs.folds.get(self, nesting.ROOT))
        # aten's CUDA kernels (sharded runs with backend cuda_flash): gather the rows, scatter the gradients
        # five gathered inputs, three kernel outputs and three fp32 accumulators per row
        span = chunk_positions(inputs, self.segment_length, BACKWARD_CHUNK_BYTES,
                               11 * inputs.num_heads * inputs.head_dim * 4 * inputs.batch)
        if span >= inputs.seq_len:
            return self._backward_rows(inputs, merged, grads)
        # Segments are independent: run whole segments a chunk at a time, so the gathered copies and
        # the kernel's outputs are chunk-sized, not sequence-sized. Each chunk adds into fresh zeros
        # (with their own spare row) that are then added into `grads`: bit for bit the same sums.
        for start in range(0, inputs.seq_len, span):
            self._backward_chunk(inputs, merged, grads, start, min(start + span, inputs.seq_len))

    def _backward_chunk(self, inputs: AttentionInputs, merged: MergedRows, grads: list[Tensor], start: int,
                        stop: int) -> None:
        """Positions [start, stop) (whole segments) of `backward`; its buffers are freed on return,
        before the next chunk's are made."""
        H = inputs.num_heads
        rows = slice(start * H, stop * H)                                 # (B, (stop - start) * H, D) views
        mask = None if inputs.key_padding_mask is None else inputs.key_padding_mask[:, start:stop]
        part = AttentionInputs.from_rows([x[:, rows] for x in inputs.rows], inputs.batch, stop - start, H, mask,
                                         inputs.causal, inputs.scale, inputs.backend)
        sub = [g.new_zeros(g.shape[0], (stop - start) * H + 1, g.shape[2]) for g in grads]
        self._backward_rows(part, MergedRows(merged.grad_out[:, rows], merged.out[:, rows], merged.lse[:, rows]), sub)
        for total, chunk in zip(grads, sub):
            total[:, rows] += chunk[:, :-1]

    def _backward_rows(self, inputs: AttentionInputs, merged: MergedRows, grads: list[Tensor]) -> None:
        layout = self.layout(inputs)
        q, k, v, grad_out, out = (layout.gather(x) for x in (inputs.q, inputs.k, inputs.v,
                                                              merged.grad_out, merged.out))
        lse = layout.gather_lse(merged.lse, inputs.batch)                # (B * n_seg, m, H)
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, causal=inputs.causal, scale=inputs.scale,
                                        key_valid=layout.key_valid(inputs.key_padding_mask, inputs.causal, inputs.batch),
                                        backend=inputs.backend)
        for total, part in zip(grads, (dq, dk, dv)):
            total.index_add_(1, layout.scatter_index, layout.sparse_to_rows(part, inputs.batch).to(total.dtype))


    def _backward_in_place(self, inputs: AttentionInputs, merged: MergedRows, grads: list[Tensor],
                           fold: nesting.Fold) -> None:
        """`backward` on the CPU, alone or sharing keys (`fold`, nesting.py): per chunk, head group and
        call of the forward, its rows copied out of the strided views (aten's CPU flash backward runs 1.6x
        slower on views) and the gradients added back through them. Every temporary is call-sized: no
        index_select, no index_add, no sequence-sized zeros per chunk (the gather path's fresh pages)."""
        H, r, mask = inputs.num_heads, self.dilation, inputs.key_padding_mask
        step, groups = nesting.head_groups(r, fold, H)
        # each call's copies and gradients about FORWARD_CHUNK_BYTES apiece (ceil(H/step) heads, 1/r of the
        # rows): under glibc's mmap threshold, so they reuse the heap (a 256K backward in 256 MiB chunks
        # faulted fresh pages and took 4.9x a 64K one)
        per_position = max(1, -(-H // step) * inputs.head_dim * inputs.heads[0].element_size() // r)
        tensors = (merged.grad_out, merged.out, merged.lse)  # (B, N * H[, D]) rows
        # the gradients as (B, N, H, D): rows (B, N * H + 1, D) are viewed so, a packed buffer's are so already
        grads = [_heads_view(x, inputs.seq_len, H) if x.dim() == 3 else x for x in grads]
        for b, start, stop, layout, g, regions in self._head_group_calls(inputs, fold, groups, per_position):
            part = (slice(b, b + 1), slice(start * H, stop * H))
            # (1, n_seg, m_s, H_g[, D]) views; a slice of slots, flattened to (n_seg, L, H_g[, D]), is a copy.
            # q, k, v as given (B, N, H, D), e.g. strided views of a fused qkv projection: read like the
            # forward, so they are not first copied whole into rows
            q, k, v = (layout.offset_view(x[b: b + 1, start:stop], g, flat=False, heads=True, head_step=step)
                       for x in inputs.heads)
            grad_out, out, lse = (layout.offset_view(x[part], g, flat=False, head_step=step) for x in tensors)
            sums = [layout.offset_view(x[b: b + 1, start:stop], g, flat=False, heads=True, head_step=step)
                    for x in grads]
            valid = layout.offset_key_valid(None if mask is None else mask[b: b + 1, start:stop], g, step)
            for rows, keys, causal in regions:
                dq, dk, dv = attention_backward(
                    *(x[:, :, rows].flatten(0, 1) for x in (grad_out, q)),
                    *(x[:, :, keys].flatten(0, 1) for x in (k, v)),
                    *(x[:, :, rows].flatten(0, 1) for x in (out, lse)), causal=causal, scale=inputs.scale,
                    key_valid=None if valid is None else valid[:, keys], backend=inputs.backend,
                    bias=nesting.bias(r, g, fold, rows, keys, q.dtype, q.device))
                for total, grad, slots in zip(sums, (dq, dk, dv), (rows, keys, keys)):
                    total[:, :, slots] += grad[None]


def share_keys(inputs: AttentionInputs, branches: Sequence[Branch]) -> dict:
    """{branch: nesting.Fold} for the branches that share keys (nesting.py): on the CPU kernels, without key
    padding, among the local branches with whole segments and r | w (the others run alone), when the cost
    model says it pays; else {}. Sharded on the fused kernels (backend "triton"): {branch: nesting.KernelFold}
    among the local branches when fused_settings.SHARE_KEYS is on (fused.with_folds)."""
    if inputs.backend == "triton":
        from .fused import with_folds  # imports triton: only when it runs

        local = [b for b in branches if isinstance(b, LocalBranch)]
        folds = with_folds([(b.segment_length, b.dilation) for b in local], inputs.seq_len)
        return {b: fold for b, (_, _, fold) in zip(local, folds) if fold is not None}
    if not (SHARE_KEYS and inputs.device.type == "cpu" and inputs.backend in ("cpu_flash", "chunked")
            and inputs.key_padding_mask is None):
        return {}
    layouts = {b: b.layout(inputs) for b in branches if isinstance(b, LocalBranch)}
    able = [b for b, x in layouts.items() if x.viewable and x.effective_segment % b.dilation == 0]
    folds = nesting.choose([(layouts[b].effective_segment, b.dilation) for b in able], inputs.causal,
                           inputs.heads[0].element_size())
    return {} if folds is None else dict(zip(able, folds))


# nested branches score shared keys once on the CPU (nesting.py); LONGNET_SHARE_KEYS=0: every branch alone
SHARE_KEYS = nesting.SHARE_KEYS_BY_DEFAULT
BACKWARD_CHUNK_BYTES = 256 * 2**20  # a local branch's backward temporaries, per chunk of whole segments
FORWARD_CHUNK_BYTES = 16 * 2**20    # one in-place forward kernel call's output: under glibc's 32 MiB mmap threshold


def chunk_positions(inputs: AttentionInputs, segment_length: int, budget: int, per_position: int) -> int:
    """Positions per chunk: whole segments, about `budget` bytes at `per_position` bytes per position,
    at least one segment."""
    segments = max(1, budget // (per_position * min(segment_length, inputs.seq_len)))
    return segments * segment_length


def run_branches_forward(inputs: AttentionInputs, branches: Sequence[Branch]) -> tuple[Tensor, Tensor]:
    """Merged output (B, N * H, D) in the input dtype, 0 at padded and uncovered rows, and lse (B, N * H)."""
    for branch in branches:  # start every communication before any compute (overlap)
        branch.prefetch(inputs)
    inputs.folds = share_keys(inputs, branches)
    merger = BranchMerger(inputs.batch, inputs.seq_len * inputs.num_heads, inputs.head_dim,
                          lse_dtype(inputs.dtype), inputs.device)
    for branch in branches:
        with branch_range("fwd", branch.segment_length, branch.dilation):
            branch.forward(inputs, merger)
    out, lse = merger.result()
    if inputs.key_padding_mask is not None:  # padded queries output 0 and carry no gradient
        real = inputs.key_padding_mask.repeat_interleave(inputs.num_heads, dim=1)  # (B, N * H)
        out = out * real.unsqueeze(-1)
        lse = lse.masked_fill(~real, float("inf"))
    return out.to(inputs.dtype), lse


def run_branches_backward(inputs: AttentionInputs, branches: Sequence[Branch], merged: MergedRows,
                          packed: bool = False) -> list[Tensor] | Tensor:
    """Gradients (dq, dk, dv) as rows (B, N * H, D) in the input dtype; with `packed`, one (B, N, 3, H, D)
    tensor (the gradient of a fused projection's qkv). When every branch reads its rows in place, a packed
    gradient is accumulated where it is returned: no copy of dq, dk, dv into one tensor (autograd's unbind
    would make one, a pass over 3 * N * H * D values, at 16K tokens 48 MiB of fresh pages)."""
    acc = lse_dtype(inputs.dtype)
    B, N, H, D = inputs.batch, inputs.seq_len, inputs.num_heads, inputs.head_dim
    inputs.folds = share_keys(inputs, branches)
    in_place = packed and all(isinstance(b, LocalBranch) and b.reads_in_place(inputs) for b in branches)
    if in_place:
        buffer = torch.zeros(B, N, 3, H, D, dtype=acc, device=inputs.device)
        grads = list(buffer.unbind(2))  # (B, N, H, D) views: LocalBranch's in-place backward adds into them
    else:  # rows, one spare row at the end absorbs scatters from invalid slots
        grads = [torch.zeros(B, N * H + 1, D, dtype=acc, device=inputs.device) for _ in range(3)]
    for branch in branches:
        with branch_range("bwd", branch.segment_length, branch.dilation):
            branch.backward(inputs, merged, grads)
    if in_place:
        return buffer.to(inputs.dtype)
    if packed:  # what autograd's unbind would make of the three
        return torch.stack([_heads_view(g, N, H).to(inputs.dtype) for g in grads], dim=2)
    return [g[:, :-1].to(inputs.dtype) for g in grads]


class _DilatedAttentionFunction(torch.autograd.Function):
    """Dilated attention of q, k, v (B, N, H, D); or, with k and v None, of q = a fused projection's
    packed qkv (B, N, 3, H, D), whose gradient then comes back packed (run_branches_backward)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, branches, causal, scale, backend):
        ctx.packed = k is None
        if ctx.packed:
            q, k, v = q.unbind(2)  # strided (B, N, H, D) views, read in place
        B, N, H, D = q.shape
        inputs = AttentionInputs((q, k, v), B, N, H, key_padding_mask, causal, scale, backend)
        out, lse = run_branches_forward(inputs, branches)
        ctx.save_for_backward(*inputs.for_backward(), out, lse, key_padding_mask)
        ctx.settings = (branches, B, N, H, causal, scale, backend)
        return out.view(B, N, H, D)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        branches, B, N, H, causal, scale, backend = ctx.settings
        inputs = AttentionInputs((q, k, v), B, N, H, key_padding_mask, causal, scale, backend)
        merged = MergedRows(to_rows(grad_out.to(q.dtype)), out, lse)
        grads = run_branches_backward(inputs, branches, merged, packed=ctx.packed)
        if ctx.packed:
            return grads, None, None, None, None, None, None, None
        shape = (B, N, H, q.shape[-1])
        return *(g.view(shape) for g in grads), None, None, None, None, None


def _heads_view(rows: Tensor, seq_len: int, heads: int) -> Tensor:
    """(B, N * H [+ 1], ...) rows -> (B, N, H, ...) view of the first N * H (spare row left out)."""
    return rows[:, : seq_len * heads].view(rows.shape[0], seq_len, heads, *rows.shape[2:])


def _fused_merge(inputs: AttentionInputs, merger: BranchMerger, w: int, r: int, fold=None) -> None:
    """LocalBranch with backend "triton" (a sharded run on CUDA): branch (w, r) through the fused kernel,
    merged straight into the merger's fp32 rows, which the spanning branches share. `fold`: how it shares
    keys with the other local branches (nesting.KernelFold, share_keys), or None."""
    from .fused_launch import forward_branch, key_bytes  # imports triton: only when it runs

    view = functools.partial(_heads_view, seq_len=inputs.seq_len, heads=inputs.num_heads)
    forward_branch(view(inputs.q), view(inputs.k), view(inputs.v), key_bytes(inputs.key_padding_mask),
                   view(merger.out), view(merger.lse), w, r, 0, inputs.causal, inputs.scale, fold=fold)
    merger.mark_merged()


def _fused_grads(inputs: AttentionInputs, merged: MergedRows, grads: list[Tensor], w: int, r: int,
                 fold=None) -> None:
    """The backward of `_fused_merge`: adds into the fp32 gradient rows `grads` (dq, dk, dv)."""
    from .fused_launch import backward_branch, backward_prep, key_bytes

    view = functools.partial(_heads_view, seq_len=inputs.seq_len, heads=inputs.num_heads)
    if "delta" not in merged.shared:  # once for all of this rank's fused branches
        merged.shared["delta"] = backward_prep(view(merged.out.contiguous()), view(merged.grad_out.contiguous()),
                                               view(merged.lse.contiguous()))
    delta, lse2 = merged.shared["delta"]
    backward_branch(view(inputs.q), view(inputs.k), view(inputs.v), view(merged.grad_out), lse2, delta,
                    key_bytes(inputs.key_padding_mask), *(view(g) for g in grads), w, r, 0, inputs.causal,
                    inputs.scale, fold=fold)
