"""Compressed block-sparse weights: keep only the live blocks of MLP weights, free the rest.

``compress_(model)`` finds the MLPs of a model by module name (the families of
:mod:`layouts`, except a fused gate|up projection), detects each MLP's block shape with
:func:`formats.choose_block` and replaces every projection with a
:class:`BlockSparseLinear`: packed live blocks ``[nnz, bo, bi]`` in CSR order
over block-rows, ``row_ptr`` / ``col_idx`` (int32) and the bias. The dense
weight is dropped (no reference kept), so its memory is really returned.

Packing follows the fused MLP kernels (see :mod:`formats`): one block shape
``(bh, bd)`` per MLP; W1/W3 ``[H, D]`` in ``(bh, bd)`` blocks CSR over hidden
block-rows, W2 ``[D, H]`` in ``(bd, bh)`` blocks CSR over output block-rows.
Gate and up share one index (the union of their masks) when that costs at most
5% more blocks than separate indices, which is what ``forward_packed`` wants
(p1 and p3 at the same positions); otherwise each keeps its own mask (less
memory). Every linear is compressed exactly: all its non-zero blocks are kept.

Mapping packed blocks to an :class:`formats.MLPPattern` (what the compiler pass
does to fuse a compressed MLP, see :func:`packed_mlp`): build the pattern from
the modules' masks; ``build_pattern`` may drop hidden blocks that cannot
contribute, so ``pattern.in_cols`` (CSR over hidden rows) is a subsequence of
the union CSR order, and ``pattern.dn_cols`` (CSR over output rows) a
subsequence of W2's packed order. A position table ``pos[row, col] -> packed
index`` gives the selection; when nothing is dropped and the masks are shared
it is the identity and the stored tensors are used as they are (no copy).

Save/load (safetensors): the tensors plus metadata (format version, per-module
shapes/block shapes/roles, a sha256 of every tensor, the HF config). Loading
builds the dense architecture with parameters on the meta device, swaps the
compressed modules in, checks names/shapes/checksums and raises ValueError on
any mismatch, never returning a wrong model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import layouts
from .formats import BLOCK_CHOICES, block_mask, build_pattern, cdiv, choose_block
from .ops import gather

log = logging.getLogger("blast_compile.compress")

FORMAT = "blast-compressed"
FORMAT_VERSION = 1
_CHUNK_ELEMS = 1 << 24
_NONPERSISTENT = "__nonpersistent__."

# ---------------------------------------------------------------------------------------------
# The op


def _rows_of(row_ptr: Tensor, nnz: int) -> Tensor:
    """Block-row of each packed block (int64), without a host sync."""
    return gather.rows_of(row_ptr, nnz)


def _pad_last(t: Tensor, n: int) -> Tensor:
    return t if t.shape[-1] == n else F.pad(t, (0, n - t.shape[-1]))


@torch.library.custom_op("blast::block_linear", mutates_args=())
def block_linear(x: Tensor, blocks: Tensor, row_ptr: Tensor, col_idx: Tensor, bias: Optional[Tensor],
                 out_features: int) -> Tensor:
    """``F.linear(x, W, bias)`` where ``W [out_features, x.shape[-1]]`` is given by its live blocks."""
    _same_dtype(x, blocks)
    nnz, bo, bi = blocks.shape
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = _pad_last(x.reshape(-1, k), cdiv(k, bi) * bi)
    rows = _rows_of(row_ptr, nnz)
    y = gather.bsmm(x2d, blocks, rows, col_idx, row_ptr.numel() - 1)[:, :out_features]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).contiguous().reshape(*lead, out_features)  # (contiguous, as the fake says)


@block_linear.register_fake
def _(x, blocks, row_ptr, col_idx, bias, out_features):
    _same_dtype(x, blocks)
    return x.new_empty((*x.shape[:-1], out_features))


def _same_dtype(x: Tensor, blocks: Tensor) -> None:
    """``F.linear``'s rule: input and weight of one dtype (under autocast its rule has cast both already)."""
    if x.dtype != blocks.dtype:
        raise RuntimeError(f"block_linear: expected the input and the blocks to have the same dtype, but got "
                           f"{x.dtype} != {blocks.dtype}")


def _block_linear_setup(ctx, inputs, output):
    x, blocks, row_ptr, col_idx, bias, out_features = inputs
    ctx.save_for_backward(x, blocks, row_ptr, col_idx)
    ctx.has_bias = bias is not None


def _block_linear_backward(ctx, dy):
    """dX through the transposed blocks; dBlocks only for the live blocks (fine-tuning)."""
    x, blocks, row_ptr, col_idx = ctx.saved_tensors
    nnz, bo, bi = blocks.shape
    k = x.shape[-1]
    n_rows, n_cols = row_ptr.numel() - 1, cdiv(k, bi)
    rows = _rows_of(row_ptr, nnz)
    dy2d = _pad_last(dy.reshape(-1, dy.shape[-1]), n_rows * bo)
    x2d = _pad_last(x.reshape(-1, k), n_cols * bi)
    dx = dblocks = dbias = None
    if ctx.needs_input_grad[0]:
        dx = gather.bsmm(dy2d, blocks.transpose(1, 2), col_idx, rows, n_cols)[:, :k].to(x.dtype).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        m = x2d.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dyb, xb = dy2d.reshape(m, n_rows, bo), x2d.reshape(m, n_cols, bi)
        dblocks = torch.empty(blocks.shape, dtype=acc, device=blocks.device)
        step = max(1, _CHUNK_ELEMS // max(1, m * (bo + bi)))
        for s in range(0, nnz, step):
            r, c = rows[s : s + step], col_idx[s : s + step].long()
            dblocks[s : s + step] = torch.bmm(dyb[:, r].to(acc).permute(1, 2, 0), xb[:, c].to(acc).transpose(0, 1))
        dblocks = dblocks.to(blocks.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, dblocks, None, None, dbias, None


block_linear.register_autograd(_block_linear_backward, setup_context=_block_linear_setup)


def _register_autocast(lib: torch.library.Library) -> torch.library.Library:
    """``F.linear``'s autocast rule for ``block_linear``: inside ``torch.autocast`` its floating inputs are cast to
    the autocast dtype and it runs (and returns) in that dtype. Without a rule the op ran in fp32 in eager while a
    compiled graph -- autocast applied while tracing -- could differ, and neither matched the dense layer.
    (``torch.library.register_autocast`` takes one fixed dtype; this reads the autocast dtype per call.)"""
    op = torch.ops.blast.block_linear.default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        dispatch_key = getattr(torch._C.DispatchKey, key)

        def impl(*args, _device=device_type, _key=dispatch_key):
            x, blocks, row_ptr, col_idx, bias, out_features = args
            dt = torch.get_autocast_dtype(_device)

            def cast(t):
                return t.to(dt) if t is not None and t.is_floating_point() and t.device.type == _device else t

            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(cast(x), cast(blocks), row_ptr, col_idx, cast(bias), out_features)

        op.py_impl(dispatch_key)(impl)  # (what tracing runs)
        lib.impl("block_linear", lambda _keyset, *args, _impl=impl: _impl(*args), key, with_keyset=True)
    return lib


_AUTOCAST = _register_autocast(torch.library.Library("blast", "FRAGMENT"))


# ---------------------------------------------------------------------------------------------
# The module


class BlockSparseLinear(nn.Module):
    """A linear layer that stores only its live ``(bo, bi)`` blocks (CSR over block-rows).

    There is no ``.weight``: :meth:`to_dense` materializes it on explicit request.
    ``blast_role`` ("gate"/"up"/"down"/"fc1"/"fc2") and ``blast_block`` (the MLP's
    ``(bh, bd)``) let the compiler pass recognise a compressed MLP; ``orig`` says
    which module it replaced ("linear" or "conv1d") so :func:`decompress_` can undo it.
    """

    def __init__(self, in_features: int, out_features: int, block: Tuple[int, int], nnz: int, bias: bool = True,
                 *, device=None, dtype=None, role: str = "", mlp_block: Optional[Tuple[int, int]] = None,
                 orig: str = "linear"):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block = (int(block[0]), int(block[1]))
        bo, bi = self.block
        self.blocks = nn.Parameter(torch.empty(nnz, bo, bi, device=device, dtype=dtype))
        self.register_buffer("row_ptr", torch.zeros(cdiv(out_features, bo) + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_idx", torch.zeros(nnz, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.blast_role = role
        self.blast_block = tuple(mlp_block) if mlp_block else None
        self.orig = orig
        self.register_load_state_dict_post_hook(_validate_loaded)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor], block: Tuple[int, int],
                   mask: Optional[Tensor] = None, requires_grad: bool = False, **kw) -> "BlockSparseLinear":
        """Pack ``weight [out, in]``; ``mask`` (bool block mask) may add live blocks, never drop non-zeros."""
        bo, bi = block
        nz = block_mask(weight, bo, bi)
        if mask is not None:
            if tuple(mask.shape) != tuple(nz.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} != block grid {tuple(nz.shape)}")
            if bool((nz & ~mask.to(nz.device)).any()):
                raise ValueError("mask drops non-zero blocks: compression would change the layer")
            nz = mask.to(nz.device, torch.bool)
        ptr = torch.zeros(nz.shape[0] + 1, dtype=torch.int32, device=weight.device)
        ptr[1:] = torch.cumsum(nz.sum(1, dtype=torch.int32), 0)
        live = nz.nonzero()  # row-major: CSR order
        rows, cols = live[:, 0], live[:, 1].to(torch.int32)
        m = cls(weight.shape[1], weight.shape[0], block, live.shape[0], bias is not None,
                device="meta", dtype=weight.dtype, **kw)
        m.blocks = nn.Parameter(gather.pack_blocks(weight.detach(), rows, cols, bo, bi).contiguous(),
                                requires_grad=requires_grad)
        m.row_ptr, m.col_idx = ptr, cols
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
        return m

    @property
    def nnz(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def grid(self) -> Tuple[int, int]:
        return cdiv(self.out_features, self.block[0]), cdiv(self.in_features, self.block[1])

    def block_mask(self) -> Tensor:
        """bool ``[out/bo, in/bi]`` of the stored blocks (on the module's device)."""
        m = torch.zeros(self.grid, dtype=torch.bool, device=self.col_idx.device)
        m[_rows_of(self.row_ptr, self.nnz), self.col_idx.long()] = True
        return m

    def nbytes(self) -> int:
        """Bytes held: blocks + bias + index."""
        return sum(t.numel() * t.element_size() for t in (self.blocks, self.row_ptr, self.col_idx, self.bias)
                   if t is not None)

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """The dense ``[out, in]`` weight (a new tensor; zeros outside the live blocks)."""
        (bo, bi), (nr, nc) = self.block, self.grid
        full = self.blocks.new_zeros(nr, bo, nc, bi)
        full[_rows_of(self.row_ptr, self.nnz), :, self.col_idx.long(), :] = self.blocks
        return full.reshape(nr * bo, nc * bi)[: self.out_features, : self.in_features].clone()

    def validate(self) -> None:
        """Raise ValueError if the index is inconsistent (a corrupted or mismatched file)."""
        nr, nc = self.grid
        p, c = self.row_ptr, self.col_idx
        errs = []
        if p.numel() != nr + 1 or c.numel() != self.nnz or tuple(self.blocks.shape[1:]) != self.block:
            errs.append(f"shapes row_ptr {tuple(p.shape)} col_idx {tuple(c.shape)} blocks {tuple(self.blocks.shape)}")
        elif int(p[0]) != 0 or int(p[-1]) != self.nnz or bool((p[1:] < p[:-1]).any()):
            errs.append("row_ptr is not a CSR pointer")
        elif c.numel() and (int(c.min()) < 0 or int(c.max()) >= nc):
            errs.append("col_idx out of range")
        if errs:
            raise ValueError(f"invalid block-sparse layer ({self.out_features}x{self.in_features}): {errs[0]}")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:  # (the blocks alone would take any width up to the padded one)
            raise RuntimeError(f"BlockSparseLinear ({self.blast_role or 'linear'}): the input has {x.shape[-1]} "
                               f"features, the layer takes {self.in_features}")
        return torch.ops.blast.block_linear(x, self.blocks, self.row_ptr, self.col_idx, self.bias, self.out_features)

    def extra_repr(self) -> str:
        nr, nc = self.grid
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"live={self.nnz}/{nr * nc}, bias={self.bias is not None}, role={self.blast_role!r}")


def _validate_loaded(module: BlockSparseLinear, incompatible) -> None:
    """After ``load_state_dict``: an index from a corrupted or foreign state dict raises here (a negative
    ``col_idx`` would otherwise wrap around in eager). Meta tensors (a skeleton being loaded) are not checked."""
    if module.col_idx.device.type != "meta" and module.row_ptr.device.type != "meta":
        module.validate()


# ---------------------------------------------------------------------------------------------
# Finding MLPs

# The layouts compress_ packs: every family of the registry except a fused gate|up projection.
MLP_LAYOUTS = tuple(lay for lay in layouts.LAYOUTS if not lay.fused_gate_up)
_is_conv1d = layouts.is_conv1d


def _dense_kind(m) -> Optional[str]:
    if isinstance(m, nn.Linear):
        return "linear"
    if _is_conv1d(m):
        return "conv1d"
    return None


def _dense_weight(m) -> Tensor:
    """``[out, in]`` view of a Linear / Conv1D weight."""
    return m.weight.t() if _is_conv1d(m) else m.weight


_get = layouts.get_path


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def named_mlps(model: nn.Module, *, compressed: bool = False) -> List[Tuple[str, Dict[str, str]]]:
    """``[(mlp module name, {role: qualified projection name})]`` for every MLP found by name
    (:mod:`layouts`). ``compressed=True`` finds MLPs made of :class:`BlockSparseLinear` instead."""
    accept = (lambda s: isinstance(s, BlockSparseLinear)) if compressed else (lambda s: _dense_kind(s) is not None)
    return [(m.name, m.quals) for m in layouts.mlp_modules(model, MLP_LAYOUTS, accept)]


# ---------------------------------------------------------------------------------------------
# compress_ / decompress_


@dataclasses.dataclass
class MLPRecord:
    name: str
    roles: Dict[str, str]
    block: Optional[Tuple[int, int]] = None
    sparsity: float = 0.0  # fraction of dead blocks (area weighted) found by choose_block
    shared_in_mask: bool = False
    dense_bytes: int = 0  # weights only (biases are kept either way)
    compressed_bytes: int = 0  # packed blocks + row_ptr + col_idx
    compressed: bool = False
    reason: str = ""

    @property
    def bytes_saved(self) -> int:
        return self.dense_bytes - self.compressed_bytes if self.compressed else 0


@dataclasses.dataclass
class CompressReport:
    mlps: List[MLPRecord]

    @property
    def compressed(self) -> List[MLPRecord]:
        return [r for r in self.mlps if r.compressed]

    @property
    def bytes_saved(self) -> int:
        return sum(r.bytes_saved for r in self.mlps)

    def summary(self) -> str:
        c = self.compressed
        return (f"compressed {len(c)}/{len(self.mlps)} MLPs, saved {self.bytes_saved / 2**20:.1f} MiB"
                + (f" (block {c[0].block})" if c else ""))


def _weight_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@torch.no_grad()
def compress_(model: nn.Module, *, min_sparsity: float = 0.5, block_sizes: Sequence[int] = BLOCK_CHOICES,
              shared_gate_up: Optional[bool] = None) -> CompressReport:
    """Replace the projections of every block-sparse MLP of ``model`` by :class:`BlockSparseLinear` (in place).

    An MLP is compressed when ``choose_block`` finds at least ``min_sparsity`` of its
    blocks dead. ``shared_gate_up``: True packs gate and up over the union of their
    masks (what the fused kernels want), False keeps separate masks, None decides
    per MLP (share when it costs <= 5% more blocks).
    """
    _check_compress_args(model, min_sparsity, block_sizes, shared_gate_up)
    report = CompressReport([])
    # tied weights and shared modules stay tied: a dense module met again becomes the same compressed module,
    # a Parameter met again in another module gives it the same packed blocks (same block shape and mask)
    # (weak references: a dense weight must die as soon as its MLP is packed, or peak memory holds the whole model
    # twice; a tied one lives on in the module that shares it)
    done_mods: Dict[int, Tuple[weakref.ref, BlockSparseLinear]] = {}
    done_weights: Dict[int, Tuple[weakref.ref, BlockSparseLinear]] = {}
    for mlp_name, quals in named_mlps(model):
        rec = MLPRecord(mlp_name, dict(quals))
        report.mlps.append(rec)
        mods = {r: model.get_submodule(q) for r, q in quals.items()}
        gated = "gate" in mods
        w1 = _dense_weight(mods["gate" if gated else "fc1"])
        w3 = _dense_weight(mods["up"]) if gated else None
        w2 = _dense_weight(mods["down" if gated else "fc2"])
        if w1.device.type == "meta":
            rec.reason = "weights on the meta device"
            continue
        if w2.shape[1] != w1.shape[0] or (w3 is not None and w3.shape != w1.shape):
            rec.reason = f"shapes do not form an MLP: {tuple(w1.shape)}, {tuple(w2.shape)}"
            continue
        choice = choose_block(w1, w3, w2, blocks=block_sizes)
        if choice is None:
            rec.reason = "no zero weights"
            continue
        bh, bd = choice.bh, choice.bd
        masks = {"down" if gated else "fc2": block_mask(w2, bd, bh)}
        if gated:
            m1, m3 = block_mask(w1, bh, bd), block_mask(w3, bh, bd)
            union = m1 | m3
            share = shared_gate_up
            if share is None:
                share = 2 * int(union.sum()) <= 1.05 * (int(m1.sum()) + int(m3.sum()))
            rec.shared_in_mask = bool(share)
            masks.update(gate=union if share else m1, up=union if share else m3)
        else:
            masks["fc1"] = block_mask(w1, bh, bd)
        # sparsity of what would be stored (choose_block counts gate/up by their union)
        rec.sparsity = 1.0 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        rec.block = (bh, bd)
        if rec.sparsity < min_sparsity:
            rec.reason = f"block sparsity {rec.sparsity:.0%} < min_sparsity {min_sparsity:.0%}"
            rec.block = None
            continue
        for role, mod in mods.items():
            w = _dense_weight(mod)
            blk = (bd, bh) if role in ("down", "fc2") else (bh, bd)
            new = _shared(done_mods.get(id(mod)), mod, blk, masks[role])
            if new is None:
                new = BlockSparseLinear.from_dense(w, mod.bias, blk, masks[role], role=role, mlp_block=(bh, bd),
                                                   orig=_dense_kind(mod), requires_grad=mod.weight.requires_grad)
                if mod.bias is not None:  # (each parameter keeps its own flag: BitFit trains biases only)
                    new.bias.requires_grad_(mod.bias.requires_grad)
                tied = _shared(done_weights.get(id(mod.weight)), mod.weight, blk, masks[role])
                if tied is not None:  # (another module's weight: its packed blocks and index, this module's bias)
                    new.blocks, new.row_ptr, new.col_idx = tied.blocks, tied.row_ptr, tied.col_idx
                else:
                    rec.dense_bytes += _weight_bytes(mod.weight)
                    rec.compressed_bytes += sum(_weight_bytes(t) for t in (new.blocks, new.row_ptr, new.col_idx))
                done_mods[id(mod)] = (weakref.ref(mod), new)
                done_weights[id(mod.weight)] = (weakref.ref(mod.weight), new)
            _set(model, quals[role], new)
        del w, w1, w2, w3, mods, mod  # the dense weights die here (nothing else holds them)
        rec.compressed = True
        parent = model.get_submodule(mlp_name) if mlp_name else model
        parent._blast_mlp = {"block": (bh, bd), "gated": gated, "roles": {r: q for r, q in quals.items()},
                             "shared_in_mask": rec.shared_in_mask}
        log.info("blast compress: %s block %dx%d, %.0f%% sparse, %.1f -> %.1f MiB", mlp_name, bh, bd,
                 100 * rec.sparsity, rec.dense_bytes / 2**20, rec.compressed_bytes / 2**20)
    return report


def _shared(seen, obj, block, mask) -> Optional[BlockSparseLinear]:
    """The compressed module made earlier from ``obj`` (a module, or a weight tied into another module), when it
    has this block shape and mask; another mask cannot share its packed blocks (a warning: the tie is lost)."""
    if seen is None or seen[0]() is not obj:  # (the id of a dead object can be reused: compare the object)
        return None
    new = seen[1]
    if new.block == tuple(block) and torch.equal(new.block_mask(), mask.to(new.col_idx.device)):
        return new
    log.warning("blast compress: a shared %s is packed with another block shape or mask here: it is no longer "
                "shared after compress_", "module" if isinstance(obj, nn.Module) else "weight")
    return None


def _check_compress_args(model, min_sparsity, block_sizes, shared_gate_up) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress_: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"compress_: min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    bad = [b for b in block_sizes if isinstance(b, bool) or not isinstance(b, int) or b not in BLOCK_CHOICES]
    if isinstance(block_sizes, (str, bytes)) or not len(block_sizes) or bad:
        raise ValueError(f"compress_: block_sizes must be a non-empty sequence of {BLOCK_CHOICES}, got "
                         f"{block_sizes!r}")
    if shared_gate_up is not None and not isinstance(shared_gate_up, bool):
        raise ValueError(f"compress_: shared_gate_up must be True, False or None, got {shared_gate_up!r}")


@torch.no_grad()
def decompress_(model: nn.Module) -> int:
    """Replace every :class:`BlockSparseLinear` by the dense module it came from; returns how many."""
    n = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, BlockSparseLinear):
            continue
        w = mod.to_dense()
        b = mod.bias
        if mod.orig == "conv1d":
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                new = Conv1D(mod.out_features, mod.in_features)
            new.weight = nn.Parameter(w.t().contiguous(), requires_grad=mod.blocks.requires_grad)
        else:
            with torch.device("meta"):
                new = nn.Linear(mod.in_features, mod.out_features, bias=b is not None)
            new.weight = nn.Parameter(w, requires_grad=mod.blocks.requires_grad)
        new.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        _set(model, name, new)
        n += 1
    for _, mod in model.named_modules():
        if hasattr(mod, "_blast_mlp"):
            del mod._blast_mlp
    return n


# ---------------------------------------------------------------------------------------------
# Fusing a compressed MLP


def _select(mod: BlockSparseLinear, rows: Tensor, cols: Tensor) -> Tensor:
    """``mod``'s blocks at (rows, cols) in that order; a block the layer does not hold is zero."""
    pos = gather.pos_table(_rows_of(mod.row_ptr, mod.nnz), mod.col_idx, *mod.grid)
    sel = gather.select_blocks(pos, rows, cols, mod.blocks)
    if sel is None:
        return mod.blocks  # the common case: same order, no copy
    log.info("blast compress: re-packing %d blocks into pattern order (copy)", sel.shape[0])
    return sel


def packed_mlp(w1: BlockSparseLinear, w3: Optional[BlockSparseLinear], w2: BlockSparseLinear, activation: str):
    """``(pattern, p1, b1, p3, b3, p2, b2)`` for ``triton_mlp.forward_packed`` from a compressed MLP.

    p1/p3 are in ``pattern.in_cols`` order, p2 in ``pattern.dn_cols`` (CSR) order. The
    pattern is on CPU (``pattern.to(device)`` for kernels).
    """
    bh, bd = w1.block
    if w2.block != (bd, bh) or (w3 is not None and w3.block != w1.block):
        raise ValueError(f"block shapes do not form an MLP: {w1.block}, {w2.block}")
    m_in = w1.block_mask() | (w3.block_mask() if w3 is not None else False)
    pat = build_pattern(m_in.cpu(), w2.block_mask().cpu(), bh, bd, activation=activation, gated=w3 is not None,
                        has_b1=w1.bias is not None, has_b3=w3 is not None and w3.bias is not None)
    dev = w1.col_idx.device
    in_rows = gather.rows_of(pat.in_rowptr).to(dev)
    dn_rows = gather.rows_of(pat.dn_rowptr).to(dev)
    in_cols, dn_cols = pat.in_cols.to(dev), pat.dn_cols.to(dev)
    p1 = _select(w1, in_rows, in_cols)
    p3 = _select(w3, in_rows, in_cols) if w3 is not None else None
    p2 = _select(w2, dn_rows, dn_cols)
    return pat, p1, w1.bias, p3, (w3.bias if w3 is not None else None), p2, w2.bias


# ---------------------------------------------------------------------------------------------
# Save / load


def _sha256(t: Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def _config_dict(model) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else None


_CONFIG_IGNORE = {"transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path", "use_cache",
                  "output_attentions", "output_hidden_states", "return_dict"}


def _state_tensors(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Every parameter and buffer (non-persistent ones too), aliases (tied weights) stored once."""
    tensors, aliases, seen = {}, {}, {}
    persistent = set(model.state_dict(keep_vars=True).keys())
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        key = name if name in persistent else _NONPERSISTENT + name
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype, t.device)
        if ident in seen and t.numel():
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    return tensors, aliases


def save_compressed(model: nn.Module, path: str) -> None:
    """Write all tensors of a (compressed) model to one safetensors file with checks in its metadata."""
    tensors, aliases = _state_tensors(model)
    modules = {n: module_spec(m) for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    write_compressed(tensors, aliases, modules, _config_dict(model), path)


def module_spec(m: "BlockSparseLinear") -> dict:
    """What the file's metadata says about one compressed layer."""
    return {"in": m.in_features, "out": m.out_features, "block": list(m.block), "nnz": m.nnz,
            "bias": m.bias is not None, "role": m.blast_role,
            "mlp_block": list(m.blast_block) if m.blast_block else None, "orig": m.orig}


def write_compressed(tensors: Dict[str, Tensor], aliases: Dict[str, str], modules: Dict[str, dict],
                     config: Optional[dict], path: str) -> None:
    """Write CPU ``tensors`` and the checks of :func:`save_compressed` (shared with ``tp_checkpoint``)."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "modules": json.dumps(modules),
        "aliases": json.dumps(aliases),
        "sha256": json.dumps({k: _sha256(v) for k, v in tensors.items()}),
        # the checksums cover bytes; the header's dtype says how to read them: kept apart, checked on load
        "dtypes": json.dumps({k: _dtype_name(v.dtype) for k, v in tensors.items()}),
        "config": json.dumps(config, default=str),
    }
    save_file(tensors, path, metadata=meta)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@contextlib.contextmanager
def params_on_meta():
    """Build modules with parameters on the meta device and buffers real (like accelerate's init_empty_weights)."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        if param is not None:
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _read(path: str, device) -> Tuple[Dict[str, Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path, device="cpu")
    except Exception as e:  # truncated / garbled header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    parsed = parse_metadata(path, meta)
    sums = parsed["sha256"]
    if set(sums) != set(tensors):
        raise ValueError(f"{path}: tensor list does not match its checksums (file damaged)")
    bad = [k for k, t in tensors.items() if _sha256(t) != sums[k]]
    if bad:
        raise ValueError(f"{path}: checksum mismatch in {len(bad)} tensor(s), e.g. {bad[:3]}: the file is corrupted")
    if "dtypes" in meta:  # (files written before it was recorded: load_compressed's structural checks only)
        try:
            dtypes = json.loads(meta["dtypes"])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: damaged metadata ({e})") from e
        wrong = [f"{k} is {_dtype_name(t.dtype)}, saved as {dtypes.get(k)}" for k, t in tensors.items()
                 if dtypes.get(k) != _dtype_name(t.dtype)]
        if wrong:
            raise ValueError(f"{path}: tensor dtype in the header differs from the one saved (file damaged or edited): "
                             + "; ".join(wrong[:3]))
    return {k: t.to(device) for k, t in tensors.items()}, parsed


def parse_metadata(path: str, meta: dict) -> dict:
    """The file's checks (modules, aliases, sha256, config) from its header metadata; ValueError if it is not
    a blast compressed file of this format version."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a blast compressed file (format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: format version {meta.get('format_version')} unsupported (expected {FORMAT_VERSION})")
    try:
        return {k: json.loads(meta[k]) for k in ("modules", "aliases", "sha256", "config")}
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged metadata ({e})") from e


def _check_config(saved: Optional[dict], model: nn.Module) -> None:
    have = _config_dict(model)
    if saved is None or have is None:
        return
    diff = [k for k in saved.keys() & have.keys()
            if not k.startswith("_") and k not in _CONFIG_IGNORE and saved[k] != have[k]
            and not isinstance(saved[k], dict)]
    if diff:
        raise ValueError("model config differs from the saved one: "
                         + ", ".join(f"{k}={have[k]!r} (file: {saved[k]!r})" for k in sorted(diff)[:5]))


def load_compressed(model_or_factory: Union[nn.Module, Callable[[], nn.Module]], path: str,
                    device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a file written by :func:`save_compressed` into the dense architecture.

    ``model_or_factory``: a module (any device, meta included) or a zero-argument callable
    that builds one (called with parameters on the meta device, so nothing dense is
    allocated). Raises ValueError when the file is corrupted or does not fit the model.
    """
    tensors, meta = _read(path, device)
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
    else:
        with params_on_meta():
            model = model_or_factory()
    _check_config(meta["config"], model)
    swap_in_compressed(model, meta["modules"])
    for key, src in meta["aliases"].items():
        if src not in tensors:
            raise ValueError(f"{path}: alias {key} -> {src} points to a missing tensor")
        tensors[key] = tensors[src]
    expected = {}
    persistent = set(model.state_dict(keep_vars=True).keys())
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is not None:
            expected[name if name in persistent else _NONPERSISTENT + name] = t
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"file does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: model {tuple(expected[k].shape)} file {tuple(tensors[k].shape)}" for k in expected
             if tuple(expected[k].shape) != tuple(tensors[k].shape)]
    if wrong:
        raise ValueError("file does not match the model: " + "; ".join(wrong[:5]))
    wrong = _dtype_mismatches(model, expected, tensors)
    if wrong:
        raise ValueError("file does not match the model (dtype): " + "; ".join(wrong[:5]))
    made = {}  # tied weights: one Parameter per stored tensor
    for key, t in tensors.items():
        name = key[len(_NONPERSISTENT):] if key.startswith(_NONPERSISTENT) else key
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if leaf in mod._parameters:
            if id(t) not in made:
                try:
                    made[id(t)] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
                except RuntimeError as e:  # (e.g. an integer tensor that should require grad)
                    raise ValueError(f"{path}: {key} cannot be a parameter of the model ({e})") from e
            mod._parameters[leaf] = made[id(t)]
        else:
            mod._buffers[leaf] = t
    for name, m in model.named_modules():
        if isinstance(m, BlockSparseLinear):
            m.validate()
    _restore_mlp_metadata(model)
    return model


def swap_in_compressed(model: nn.Module, modules: Dict[str, dict]) -> None:
    """Replace the Linear/Conv1D layers a file compressed by empty (meta) :class:`BlockSparseLinear` of the
    file's shapes; ValueError where the model's layer does not match."""
    for name, spec in modules.items():
        old = _get(model, name)
        kind = _dense_kind(old) if old is not None else None
        if kind is None:
            raise ValueError(f"model has no Linear/Conv1D at {name!r} (the file's compressed layer)")
        w = _dense_weight(old)
        if (w.shape[1], w.shape[0]) != (spec["in"], spec["out"]) or (old.bias is not None) != spec["bias"]:
            raise ValueError(f"{name}: model layer is {w.shape[0]}x{w.shape[1]} (bias={old.bias is not None}), "
                             f"file has {spec['out']}x{spec['in']} (bias={spec['bias']})")
        new = BlockSparseLinear(spec["in"], spec["out"], tuple(spec["block"]), spec["nnz"], spec["bias"],
                                device="meta", role=spec["role"], mlp_block=spec["mlp_block"], orig=spec["orig"])
        _set(model, name, new)


def _dtype_mismatches(model: nn.Module, expected: Dict[str, Tensor], tensors: Dict[str, Tensor]) -> List[str]:
    """What the model's tensors say about the file's dtypes (files without recorded dtypes get only this):
    a float tensor stays float (any float dtype: a model saved in bf16 loads into an fp32 skeleton), other
    dtypes match exactly, block indices are int32, and a compressed layer's bias has its blocks' dtype."""
    out = []
    for k, want in expected.items():
        got = tensors[k].dtype
        if want.is_floating_point() != got.is_floating_point or (not got.is_floating_point and want.dtype != got):
            out.append(f"{k} is {_dtype_name(got)}, the model has {_dtype_name(want.dtype)}")
    for name, m in model.named_modules():
        if not isinstance(m, BlockSparseLinear):
            continue
        pre = f"{name}." if name else ""
        for leaf in ("row_ptr", "col_idx"):
            t = tensors.get(pre + leaf)
            if t is not None and t.dtype != torch.int32:
                out.append(f"{pre}{leaf} is {_dtype_name(t.dtype)}, block indices are int32")
        blk, b = tensors.get(pre + "blocks"), tensors.get(pre + "bias")
        if blk is not None and b is not None and blk.dtype != b.dtype:
            out.append(f"{pre}bias is {_dtype_name(b.dtype)}, its blocks {_dtype_name(blk.dtype)}")
    return out


def _restore_mlp_metadata(model: nn.Module) -> None:
    for mlp_name, quals in named_mlps(model, compressed=True):
        mods = {r: model.get_submodule(q) for r, q in quals.items()}
        w1 = mods.get("gate", mods.get("fc1"))
        (model.get_submodule(mlp_name) if mlp_name else model)._blast_mlp = {
            "block": w1.blast_block, "gated": "gate" in mods, "roles": dict(quals),
            "shared_in_mask": "up" in mods and torch.equal(w1.col_idx, mods["up"].col_idx)
            and torch.equal(w1.row_ptr, mods["up"].row_ptr)}


# HF-style directory: config.json + model.safetensors (compressed) + blast.json


def save_pretrained(model: nn.Module, directory: str) -> None:
    """Write ``config.json``, ``model.safetensors`` (compressed) and ``blast.json`` for an HF model."""
    if getattr(model, "config", None) is None:
        raise ValueError(f"save_pretrained needs a transformers model (with .config); {type(model).__name__} has "
                         "none: use save_compressed(model, path) instead")
    if not any(isinstance(m, BlockSparseLinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no compressed layers: call "
                         "blast_compile.compress.compress_(model) first (for a dense model use model.save_pretrained)")
    os.makedirs(directory, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # as HF's save_pretrained does
    model.config.save_pretrained(directory)
    save_compressed(model, os.path.join(directory, "model.safetensors"))
    write_blast_json(directory, {n: module_spec(m) for n, m in model.named_modules()
                                 if isinstance(m, BlockSparseLinear)})


def write_blast_json(directory: str, specs: Dict[str, dict]) -> None:
    with open(os.path.join(directory, "blast.json"), "w") as f:
        json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, "layers": layers_info(specs)}, f, indent=1)


def from_pretrained(directory: str, device: Union[str, torch.device] = "cpu", model_cls=None, *, tp=None,
                    **tp_options) -> nn.Module:
    """Load a directory written by :func:`save_pretrained` (class from ``config.architectures``).

    ``tp``: a 1-D DeviceMesh or ProcessGroup: load straight into tensor-parallel shards, each rank
    reading only its own blocks (:func:`blast_compile.tp_checkpoint.load_sharded`; ``tp_options``
    go there: ``balance``, ``attention``)."""
    import transformers

    if torch.device(device).type == "meta":
        raise ValueError("from_pretrained: device='meta' holds no values to load (and nothing to check them "
                         "against); build the model on the meta device with its class instead")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory (a compressed model saved by save_pretrained)")
    path = os.path.join(directory, "blast.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no blast.json, so not a compressed model directory written by "
                                "blast_compile.compress.save_pretrained")
    try:
        with open(path) as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {info.get('format') if isinstance(info, dict) else info!r} "
                         f"v{info.get('format_version') if isinstance(info, dict) else '?'}")
    cfg = transformers.AutoConfig.from_pretrained(directory)
    if model_cls is None:
        arch = (cfg.architectures or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        if model_cls is None:
            raise ValueError(f"{directory}: cannot tell the model class (architectures={cfg.architectures})")
    else:
        _check_model_cls(model_cls, cfg, directory)
    if tp is not None:  # each rank reads its own blocks only
        from .tp_checkpoint import load_sharded

        model = load_sharded(lambda: model_cls(cfg), os.path.join(directory, "model.safetensors"), tp, device,
                             **tp_options)
        check_layers(path, info, model._blast_global_specs)
        return model.eval()
    model = load_compressed(lambda: model_cls(cfg), os.path.join(directory, "model.safetensors"), device)
    check_layers(path, info, {n: module_spec(m) for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)})
    return model.eval()


def _check_model_cls(model_cls, cfg, directory: str) -> None:
    """``model_cls`` builds what ``save_pretrained`` recorded: the class in ``config.architectures`` or a subclass of
    it, taking the saved config. Else the load failed later, on a layer or key that does not say why (a base model
    for a head model: "no Linear at model.layers.0..."; another family's class: an attribute its config lacks)."""
    import transformers

    arch = (cfg.architectures or [None])[0]
    held = f"{directory} holds a {arch or 'model'} (model_type={cfg.model_type!r})"
    if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
        raise TypeError(f"from_pretrained: model_cls must be an nn.Module class, not {model_cls!r}; {held}")
    saved = getattr(transformers, arch, None) if arch else None  # (a class of the user's own: not checked)
    takes = getattr(model_cls, "config_class", None)
    if (isinstance(saved, type) and not issubclass(model_cls, saved)) or (
            isinstance(takes, type) and not isinstance(cfg, takes)):
        raise ValueError(f"from_pretrained: model_cls={model_cls.__name__} does not match the checkpoint: {held}; "
                         f"pass that class (or a subclass of it), or leave model_cls out")


def layers_info(specs: Dict[str, dict]) -> Dict[str, dict]:
    """``blast.json``'s ``layers`` entry from layer specs (:func:`module_spec`)."""
    return {n: {"block": list(s["block"]), "nnz": s["nnz"], "role": s["role"],
                "grid": [cdiv(s["out"], s["block"][0]), cdiv(s["in"], s["block"][1])]} for n, s in specs.items()}


def check_layers(path: str, info: dict, specs: Dict[str, dict]) -> None:
    if info.get("layers") != layers_info(specs):
        raise ValueError(f"{path} does not describe model.safetensors' compressed layers (files from two saves?)")


__all__ = ["BlockSparseLinear", "block_linear", "compress_", "decompress_", "named_mlps", "packed_mlp",
           "CompressReport", "MLPRecord", "save_compressed", "load_compressed", "save_pretrained",
           "from_pretrained", "params_on_meta", "FORMAT_VERSION"]
