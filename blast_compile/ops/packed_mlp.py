"""``blast::packed_mlp``: the one node a *compressed* MLP becomes.

A compressed model (:mod:`blast_compile.compress`) has no dense MLP weights:
each projection is a ``BlockSparseLinear`` holding its live blocks
``[nnz, bo, bi]`` in CSR order over block-rows (``row_ptr``, ``col_idx``).
Eagerly the MLP runs as ``block_linear -> act -> block_linear`` (three
launches, the hidden activations round-trip through memory); this op is that
chain in one node, with the same meaning and the same rounding (each linear
accumulates in fp32 and returns ``x.dtype``; the activation runs in
``x.dtype``).

The op receives the stored tensors themselves (no copy at compile time) and
derives the :class:`~blast_compile.formats.MLPPattern` the fused kernels want
from the index tensors, once per (pattern key, tensor identities) and while a
:class:`~.watch.Snapshot` of them holds (version counters, storages, fused
optimizer steps): an index or block tensor changed in place is noticed by an O(1)
check per call and the plan is rebuilt, so the op is never stale. Blocks or biases
holding NaN/Inf run as the unfused ``block_linear`` chain (a hidden block the
pattern drops would drop them, where the chain multiplies them by zero), and so
do blocks with non-zero padding past ``d_hidden`` (:func:`pad_zero`).
``pattern_key`` (a hash of the index tensors, :func:`pattern_key`) is an op
argument, so Inductor/AOTAutograd caches never reuse a graph across patterns.

Blocks are used in place when their stored order is the pattern's order (the
common case: gate/up share one index and no hidden block is droppable);
otherwise they are re-packed once per version (see ``compress.packed_mlp``,
which does the same for modules).

Implementations: CPU (any device as fallback) = :mod:`.gather` over the packed
blocks; CUDA = ``triton_mlp.forward_packed``. Inference only: compressed models
are for inference (fine-tune them with the unfused ``block_linear`` chain,
which has autograd); a backward through this op raises.
"""
from __future__ import annotations

import hashlib
import logging
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from .._counters import counters

from ..formats import build_pattern, cdiv
from . import gather
from .activations import ACTIVATIONS
from .sparse_mlp import _all_finite
from .plans import PlanCache, as_output, ident as _ident, outside_graph_pool, refs, warm_kernels
from .watch import Snapshot, watch

log = logging.getLogger("blast_compile.ops")

_PLANS = PlanCache()  # (pattern key, tensor identities, shapes) -> _PackedPlan


def pattern_key(bh: int, bd: int, d_in: int, d_hidden: int, d_out: int, indices) -> str:
    """Hash of block shape, shapes and the index tensors (``None`` entries allowed)."""
    h = hashlib.sha1(f"packed|{bh}x{bd}|{d_in}|{d_hidden}|{d_out}|".encode())
    for t in indices:
        if t is None:
            h.update(b"-|")
            continue
        t = t.detach().to("cpu", torch.int64).contiguous()
        h.update(f"{t.numel()}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class _PackedPlan:
    """The pattern (CPU and device copies) and how to get blocks in pattern order.

    Duck-types ``sparse_mlp._Plan`` for ``triton_mlp`` (``pattern``, ``cache``).
    ``copies[i]`` is a re-packed copy of layer i's blocks, or None when the stored
    tensor is already in pattern order (then the plan holds no reference to it, so a
    cached plan never keeps a deleted model's weights alive).
    """

    __slots__ = ("index_snap", "block_snap", "finite", "pad_zero", "pattern", "dev_pattern", "cache", "sel", "copies",
                 "in_rows", "dn_rows_r", "key", "refs")


class _Blocks(NamedTuple):
    """Blocks in pattern order for one call (what ``gather.forward`` reads as ``packed``)."""

    p1: Tensor
    p3: Optional[Tensor]
    p2: Tensor
    in_rows: Tensor
    dn_rows_r: Tensor


def blocks_in_order(plan: _PackedPlan, blocks1, blocks3, blocks2) -> _Blocks:
    c1, c3, c2 = plan.copies
    return _Blocks(blocks1 if c1 is None else c1, c3 if c3 is not None else blocks3, blocks2 if c2 is None else c2,
                   plan.in_rows, plan.dn_rows_r)


def _mask_and_pos(row_ptr: Tensor, col_idx: Tensor, n_rows: int, n_cols: int, what: str):
    """(bool mask [n_rows, n_cols], long pos table: packed index of each block or -1), on CPU."""
    ptr, cols = row_ptr.detach().cpu().long(), col_idx.detach().cpu().long()
    nnz = cols.numel()
    if ptr.numel() != n_rows + 1 or int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"blast::packed_mlp: {what} row_ptr is not a CSR pointer over {n_rows} block-rows")
    if nnz and (int(cols.min()) < 0 or int(cols.max()) >= n_cols):
        raise ValueError(f"blast::packed_mlp: {what} col_idx out of range [0, {n_cols})")
    pos = gather.pos_table(gather.rows_of(ptr), cols, n_rows, n_cols)
    return pos >= 0, pos


def packed_plan(blocks1, row_ptr1, col_idx1, b1, blocks3, row_ptr3, col_idx3, b3, blocks2, row_ptr2, col_idx2, b2,
            activation: str, block_h: int, block_d: int, d_in: int, d_hidden: int, d_out: int,
            key: str) -> _PackedPlan:
    """The plan for these tensors: rebuilt when an index changed, re-selected when blocks changed."""
    index = (row_ptr1, col_idx1, row_ptr3, col_idx3, row_ptr2, col_idx2)
    blocks = (blocks1, blocks3, blocks2)
    sk = (key, *(_ident(t) for t in index + blocks), b1 is not None, b3 is not None, d_in, d_hidden, d_out,
          activation)
    values = (*blocks, b1, b3, b2)
    plan = _PLANS.get(sk)
    if plan is not None and not plan.index_snap.changed(index) and not plan.block_snap.changed(values):
        return plan

    def refresh(plan):
        if plan is None or plan.index_snap.changed(index):
            plan = _build(blocks1, row_ptr1, col_idx1, b1, blocks3, row_ptr3, col_idx3, b3, blocks2, row_ptr2,
                          col_idx2, activation, block_h, block_d, d_in, d_hidden, d_out, key)
            plan.index_snap = Snapshot(index)
            plan.refs = refs(*index, *blocks)
            for t in (*index, *values):  # count fused-optimizer steps on them from now on
                watch(t)
        else:
            counters["blast"]["packed_blocks_refreshed"] += 1
        _select_blocks(plan, blocks1, blocks3, blocks2)
        plan.finite = _all_finite(values)
        plan.pad_zero = pad_zero(plan, blocks1, blocks3, blocks2)
        plan.block_snap = Snapshot(values)
        return plan

    # long-lived device state: not in a CUDA-graph pool (see sparse_mlp.outside_graph_pool)
    plan = outside_graph_pool(lambda: refresh(plan), blocks1.device)
    _PLANS.put(sk, plan)
    return plan


def _build(blocks1, row_ptr1, col_idx1, b1, blocks3, row_ptr3, col_idx3, b3, blocks2, row_ptr2, col_idx2,
           activation, bh, bd, d_in, d_hidden, d_out, key) -> _PackedPlan:
    gated = blocks3 is not None
    n_h, n_in, n_out = cdiv(d_hidden, bh), cdiv(d_in, bd), cdiv(d_out, bd)
    for name, blk, shape in (("w1", blocks1, (bh, bd)), ("w3", blocks3, (bh, bd)), ("w2", blocks2, (bd, bh))):
        if blk is not None and (blk.dim() != 3 or tuple(blk.shape[1:]) != shape):
            raise ValueError(f"blast::packed_mlp: {name} blocks {tuple(blk.shape)} are not [nnz, {shape[0]}, {shape[1]}]")
    m1, pos1 = _mask_and_pos(row_ptr1, col_idx1, n_h, n_in, "w1")
    m3, pos3 = _mask_and_pos(row_ptr3, col_idx3, n_h, n_in, "w3") if gated else (None, None)
    m2, pos2 = _mask_and_pos(row_ptr2, col_idx2, n_out, n_h, "w2")
    for name, blk, cols in (("w1", blocks1, col_idx1), ("w3", blocks3, col_idx3), ("w2", blocks2, col_idx2)):
        if blk is not None and blk.shape[0] != cols.numel():
            raise ValueError(f"blast::packed_mlp: {name} has {blk.shape[0]} blocks but {cols.numel()} indices")
    pat = build_pattern(m1 | m3 if gated else m1, m2, bh, bd, activation=activation, gated=gated,
                        has_b1=b1 is not None, has_b3=b3 is not None)
    now = pattern_key(bh, bd, d_in, d_hidden, d_out, (row_ptr1, col_idx1, row_ptr3, col_idx3, row_ptr2, col_idx2))
    if now != key:
        counters["blast"]["pattern_changed"] += 1
        log.info("blast: packed pattern %s changed to %s (%s)", key, now, pat.summary())
    plan = _PackedPlan()
    plan.key = now
    plan.pattern = pat
    dev = blocks1.device
    plan.dev_pattern = pat.to(dev) if dev.type != "cpu" else pat
    plan.cache = {"d_hidden": d_hidden, "d_out": d_out}  # triton_mlp's per-plan tables and tuning
    in_rows, dn_rows = gather.rows_of(pat.in_rowptr), gather.rows_of(pat.dn_rowptr)
    plan.sel = (pos1, pos3, pos2, in_rows, dn_rows)
    plan.in_rows, plan.dn_rows_r = in_rows.to(dev), dn_rows.to(dev)
    return plan


def _select_blocks(plan: _PackedPlan, blocks1, blocks3, blocks2) -> None:
    pos1, pos3, pos2, in_rows, dn_rows = plan.sel
    p = plan.pattern
    plan.copies = (gather.select_blocks(pos1, in_rows, p.in_cols, blocks1),
                   gather.select_blocks(pos3, in_rows, p.in_cols, blocks3) if blocks3 is not None else None,
                   gather.select_blocks(pos2, dn_rows, p.dn_cols, blocks2))


def pad_zero(plan: _PackedPlan, blocks1, blocks3, blocks2) -> bool:
    """Where ``d_hidden`` is not a multiple of the block, is the padding of the last hidden block zero (W1/W3 rows
    and W2 columns past ``d_hidden``)? Eager's ``block_linear`` chain never computes those hidden units; the fused
    kernels compute whole blocks, so non-zero padding (a re-initialised or foreign ``blocks`` tensor) would reach
    the output: such blocks run the unfused chain. One host sync, only when the blocks changed."""
    bh, d_hidden = plan.pattern.bh, plan.cache["d_hidden"]
    rem = d_hidden % bh
    if not rem:
        return True
    pos1, pos3, pos2 = plan.sel[:3]
    last = cdiv(d_hidden, bh) - 1
    flags = []
    rows, cols = (lambda b: b[:, rem:, :]), (lambda b: b[:, :, rem:])  # (W1/W3 blocks' rows, W2 blocks' columns)
    for blk, idx, pad in ((blocks1, pos1[last], rows), (blocks3, None if pos3 is None else pos3[last], rows),
                          (blocks2, pos2[:, last], cols)):
        if blk is not None and idx is not None and bool((idx >= 0).any()):
            flags.append((pad(blk[idx[idx >= 0].to(blk.device)]) == 0).all())
    return bool(torch.stack(flags).all()) if flags else True


def _triton_forward(x2d, plan: _PackedPlan, blk: _Blocks, b1, b3, b2, activation, d_out):
    """The generated Triton kernels over the packed blocks (CUDA; CPU tensors under TRITON_INTERPRET=1)."""
    from . import triton_mlp

    warm_kernels(plan, x2d, lambda d: triton_mlp.forward_packed(d, blk.p1, b1, blk.p3, b3, blk.p2, b2, plan,
                                                                activation, d_out))
    return triton_mlp.forward_packed(x2d, blk.p1, b1, blk.p3, b3, blk.p2, b2, plan, activation, d_out)


@torch.library.custom_op("blast::packed_mlp", mutates_args=())
def packed_mlp(
    x: Tensor,
    blocks1: Tensor, row_ptr1: Tensor, col_idx1: Tensor, b1: Optional[Tensor],
    blocks3: Optional[Tensor], row_ptr3: Optional[Tensor], col_idx3: Optional[Tensor], b3: Optional[Tensor],
    blocks2: Tensor, row_ptr2: Tensor, col_idx2: Tensor, b2: Optional[Tensor],
    activation: str,
    block_h: int,
    block_d: int,
    d_hidden: int,
    d_out: int,
    pattern_key: str,
) -> Tensor:
    """``block_linear(act(block_linear(x, W1)) [* block_linear(x, W3)], W2)`` in one node."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, d_in)
    plan = packed_plan(blocks1, row_ptr1, col_idx1, b1, blocks3, row_ptr3, col_idx3, b3, blocks2, row_ptr2, col_idx2, b2,
                   activation, block_h, block_d, d_in, d_hidden, d_out, pattern_key)
    if x2d.shape[0] == 0:
        return x.new_empty((*lead, d_out))
    if not (plan.finite and plan.pad_zero):
        y = _unfused(x2d, blocks1, row_ptr1, col_idx1, b1, blocks3, row_ptr3, col_idx3, b3, blocks2, row_ptr2,
                     col_idx2, b2, activation, d_hidden, d_out)
    else:
        blk = blocks_in_order(plan, blocks1, blocks3, blocks2)
        if x.device.type == "cuda":
            y = _triton_forward(x2d, plan, blk, b1, b3, b2, activation, d_out)
        else:
            y = gather.forward(x2d, plan.dev_pattern, blk, b1, b3, b2, activation, d_out)
    # contiguous, as the fake says (without b2, y is a slice of the output padded to whole blocks)
    return as_output(y.contiguous(), (*lead, d_out))


def _unfused(x2d, blocks1, row_ptr1, col_idx1, b1, blocks3, row_ptr3, col_idx3, b3, blocks2, row_ptr2, col_idx2, b2,
             activation, d_hidden, d_out):
    """The compressed MLP's eager meaning, ``block_linear -> act [* block_linear] -> block_linear``."""
    from ..compress import block_linear

    h = ACTIVATIONS[activation](block_linear(x2d, blocks1, row_ptr1, col_idx1, b1, d_hidden))
    if blocks3 is not None:
        h = h * block_linear(x2d, blocks3, row_ptr3, col_idx3, b3, d_hidden)
    return block_linear(h, blocks2, row_ptr2, col_idx2, b2, d_out)


@packed_mlp.register_fake
def _(x, blocks1, row_ptr1, col_idx1, b1, blocks3, row_ptr3, col_idx3, b3, blocks2, row_ptr2, col_idx2, b2,
      activation, block_h, block_d, d_hidden, d_out, pattern_key):
    return x.new_empty((*x.shape[:-1], d_out))


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, dy):
    raise RuntimeError(
        "blast::packed_mlp is inference-only (compressed MLP fused by the blast backend): no backward. "
        "Run the compiled model under torch.no_grad()/torch.inference_mode(), or set requires_grad=False on the "
        "compressed blocks/biases; to fine-tune a compressed model, run it without fusion (eager block_linear).")


packed_mlp.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["packed_mlp", "pattern_key", "packed_plan", "blocks_in_order", "pad_zero"]
