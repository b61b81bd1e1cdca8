"""Tensor parallelism for *compressed* models: each rank holds only its own live blocks.

Sharding a compressed MLP (:class:`~blast_compile.compress.BlockSparseLinear` projections) follows
Megatron: gate/up (fc1) are column-parallel (a rank keeps some hidden block-rows), down (fc2) is
row-parallel (the same hidden block-columns), and the MLP's output is all-reduced, once per MLP.
Which hidden blocks go to which rank is the LPT balance of :mod:`blast_compile.distributed`,
counted on the *stored* blocks, so the ranks hold ~equal bytes.

Why plain local tensors and not DTensor: a rank's packed blocks ``[nnz_r, bo, bi]`` are not a
``Shard`` of any global tensor (``nnz_r`` differs per rank and ``col_idx`` is rank-local), so each
rank's MLP is an ordinary compressed MLP of hidden size ``H / ranks``, and a forward hook on the MLP
module adds the all-reduce (``_c10d_functional``, which Dynamo traces). The blast backend then fuses
each rank's MLP into one ``blast::packed_mlp`` as it does without TP; :func:`fuse_packed_eager_` does
the same without the compiler. Attention (``q/k/v/o_proj`` linears) is sharded by heads the same way
(q/k/v rows, o columns, all-reduce after o); embeddings, lm_head and norms stay replicated.

The plan is computed from the index tensors alone (``row_ptr``/``col_idx``: 4 bytes per block
against ``2 * bo * bi`` for the block), so it is the same whether the blocks come from a model in
memory (:class:`ModuleSource`) or from a safetensors file read a slice at a time
(:class:`FileSource`, ``safe_open(...).get_slice``): a rank reads its own blocks only and dense
weights never exist anywhere. Saving gathers to rank 0 (:func:`save_sharded`), which writes the
ordinary single-file checkpoint, loadable on any number of ranks or on one device.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import compress as C
from .formats import cdiv
from .layouts import IN_ROLES
from .ops import gather

log = logging.getLogger("blast_compile.tp_compressed")

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------- the TP group


@dataclasses.dataclass
class TPGroup:
    """Rank, size and process-group name of a 1-D tensor-parallel group (a DeviceMesh or a ProcessGroup)."""

    rank: int
    size: int
    name: str
    pg: object = None

    @classmethod
    def of(cls, group=None) -> "TPGroup":
        import torch.distributed as dist

        if group is None:
            group = dist.group.WORLD
        if hasattr(group, "get_group"):  # a 1-D DeviceMesh
            if group.ndim != 1:
                raise ValueError("tensor parallelism of compressed models needs a 1-D mesh")
            group = group.get_group()
        return cls(dist.get_rank(group), dist.get_world_size(group), group.group_name, group)


def all_reduce(t: Tensor, group_name: str) -> Tensor:
    """Sum over the group, as a functional collective (traced by Dynamo, works eagerly on gloo and NCCL)."""
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(t, "sum", group_name))


def _all_reduce_hook(group_name: str):
    def hook(module, args, out):
        return all_reduce(out, group_name)

    return hook


# --------------------------------------------------------------------------- the plan (index tensors only)


def hidden_costs(mods: Dict[str, "C.BlockSparseLinear"]) -> Tensor:
    """Stored blocks per hidden block: its row in every in-projection plus its column in down/fc2."""
    some_in = next(m for r, m in mods.items() if r in IN_ROLES)
    n_h = some_in.grid[0]
    cost = torch.zeros(n_h, dtype=torch.int64)
    for role, m in mods.items():
        if role in IN_ROLES:
            p = m.row_ptr.long().cpu()
            cost += p[1:] - p[:-1]
        else:
            cost += torch.bincount(m.col_idx.long().cpu(), minlength=n_h)
    return cost


def split_hidden(costs: Tensor, ranks: int, balance: bool = True) -> List[List[int]]:
    """Hidden blocks of each rank: equal counts; LPT-balanced stored blocks when that lowers the max."""
    from .distributed import lpt_equal_bins

    n = costs.numel()
    if n % ranks:
        raise ValueError(f"{n} hidden blocks do not split into {ranks} ranks of equal count")
    contiguous = [list(range(r * n // ranks, (r + 1) * n // ranks)) for r in range(ranks)]
    if not balance or ranks == 1:
        return contiguous
    bins = lpt_equal_bins(costs.tolist(), ranks)
    worst = lambda bs: max(int(costs[b].sum()) for b in bs)  # noqa: E731
    return bins if worst(bins) < worst(contiguous) else contiguous


def shard_rows(row_ptr: Tensor, col_idx: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sel, row_ptr, col_idx)`` of the block-rows ``rows`` of a CSR layer: ``sel`` the packed positions kept."""
    ptr, cols = row_ptr.long().cpu(), col_idx.long().cpu()
    counts = (ptr[1:] - ptr[:-1])[rows]
    new_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64)
    new_ptr[1:] = torch.cumsum(counts, 0)
    total = int(new_ptr[-1])
    sel = torch.repeat_interleave(ptr[rows] - new_ptr[:-1], counts, output_size=total) + torch.arange(total)
    return sel, new_ptr.to(torch.int32), cols[sel].to(torch.int32)


def shard_cols(row_ptr: Tensor, col_idx: Tensor, cols_kept: Tensor, n_cols: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sel, row_ptr, col_idx)`` of the block-columns ``cols_kept`` (sorted), renumbered 0..len-1."""
    ptr, cols = row_ptr.long().cpu(), col_idx.long().cpu()
    lut = torch.full((n_cols,), -1, dtype=torch.int64)
    lut[cols_kept] = torch.arange(cols_kept.numel())
    loc = lut[cols]
    sel = (loc >= 0).nonzero().flatten()
    rows = gather.rows_of(ptr)[sel]
    new_ptr = torch.zeros(ptr.numel(), dtype=torch.int64)
    new_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=ptr.numel() - 1), 0)
    return sel, new_ptr.to(torch.int32), loc[sel].to(torch.int32)


def _elements(blocks: Tensor, size: int) -> Tensor:
    """Element indices of whole blocks ``blocks`` of ``size``."""
    return (blocks[:, None] * size + torch.arange(size)).flatten()


# --------------------------------------------------------------------------- where the tensors come from


class ModuleSource:
    """The tensors of a model in memory (every rank holds the unsharded compressed model)."""

    def __init__(self, model: nn.Module):
        self.t = dict(model.named_parameters(remove_duplicate=False))
        self.t.update(model.named_buffers(remove_duplicate=False))

    def full(self, name: str) -> Tensor:
        return self.t[name].detach()

    def rows(self, name: str, idx: Tensor) -> Tensor:
        t = self.t[name].detach()
        return t.index_select(0, idx.to(t.device))

    def narrow(self, name: str, dim: int, start: int, length: int) -> Tensor:
        return self.t[name].detach().narrow(dim, start, length).clone()


class FileSource:
    """A compressed safetensors file read a slice at a time (``safe_open(...).get_slice``).

    ``read[name]`` counts the bytes taken from each stored tensor (what tests check: a rank reads
    its own blocks only). Tensors read whole are checked against the file's sha256; a sliced one
    cannot be (its hash covers the whole tensor): its shape and dtype come from the header, and the
    index tensors that address it are read whole and checked.
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        try:
            self.f = safe_open(path, framework="pt")
            meta = self.f.metadata() or {}
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        self.path = path
        self.meta = C.parse_metadata(path, meta)
        self.keys = set(self.f.keys())
        self.read: Dict[str, int] = {}

    def key(self, name: str) -> str:
        for k in (name, C._NONPERSISTENT + name):
            k = self.meta["aliases"].get(k, k)
            if k in self.keys:
                return k
        raise ValueError(f"{self.path}: no tensor {name!r}")

    def _count(self, key: str, t: Tensor) -> Tensor:
        self.read[key] = self.read.get(key, 0) + t.numel() * t.element_size()
        return t

    def full(self, name: str) -> Tensor:
        k = self.key(name)
        t = self.f.get_tensor(k)
        if C._sha256(t) != self.meta["sha256"].get(k):
            raise ValueError(f"{self.path}: checksum mismatch in {k}: the file is corrupted")
        return self._count(k, t)

    def rows(self, name: str, idx: Tensor) -> Tensor:
        """Rows ``idx`` (sorted) of a stored tensor, read as runs of consecutive rows."""
        k = self.key(name)
        sl = self.f.get_slice(k)
        idx = idx.long().cpu()
        if idx.numel() == 0:
            shape = sl.get_shape()
            full0 = self.f.get_slice(k)[0:0]
            return full0.reshape(0, *shape[1:])
        brk = (idx[1:] != idx[:-1] + 1).nonzero().flatten() + 1
        starts = torch.cat([idx[:1], idx[brk]]).tolist()
        ends = (torch.cat([idx[brk - 1], idx[-1:]]) + 1).tolist()
        parts = [sl[a:b] for a, b in zip(starts, ends)]
        return self._count(k, parts[0] if len(parts) == 1 else torch.cat(parts))

    def narrow(self, name: str, dim: int, start: int, length: int) -> Tensor:
        k = self.key(name)
        sl = self.f.get_slice(k)
        t = sl[start:start + length] if dim == 0 else sl[:, start:start + length]
        return self._count(k, t)


# --------------------------------------------------------------------------- sharding


@dataclasses.dataclass
class ShardReport:
    """What one rank holds: per sharded MLP its hidden blocks and stored blocks, per rank."""

    rank: int
    ranks: int
    mlps: Dict[str, dict] = dataclasses.field(default_factory=dict)
    attention: List[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        live = [sum(m["blocks_per_rank"][r] for m in self.mlps.values()) for r in range(self.ranks)]
        return (f"rank {self.rank}/{self.ranks}: {len(self.mlps)} compressed MLPs sharded, stored blocks per "
                f"rank {live}, {len(self.attention)} attention blocks sharded by heads")


def _param(t: Tensor, requires_grad: bool = False) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=requires_grad and t.is_floating_point())


def _shard_mlp(model, mlp_name, quals, src, tp: TPGroup, balance: bool, device, rep: ShardReport) -> None:
    mods = {r: model.get_submodule(q) for r, q in quals.items()}
    w_in = next(m for r, m in mods.items() if r in IN_ROLES)
    bh = w_in.block[0]
    if w_in.out_features % bh:
        raise ValueError(f"{mlp_name}: hidden size {w_in.out_features} is not whole {bh}-blocks")
    costs = hidden_costs(mods)
    bins = split_hidden(costs, tp.size, balance)
    hid = torch.tensor(bins[tp.rank], dtype=torch.int64)
    for role, m in mods.items():
        q = quals[role]
        if role in IN_ROLES:
            sel, ptr, col = shard_rows(m.row_ptr, m.col_idx, hid)
            shape, bias_rows = (m.in_features, hid.numel() * bh), _elements(hid, bh)
        else:
            sel, ptr, col = shard_cols(m.row_ptr, m.col_idx, hid, m.grid[1])
            shape, bias_rows = (hid.numel() * bh, m.out_features), None
        keep_bias = m.bias is not None and (bias_rows is not None or tp.rank == 0)  # down's bias: counted once
        dev = device if device is not None else m.col_idx.device
        new = C.BlockSparseLinear(*shape, m.block, sel.numel(), keep_bias, device="meta", role=m.blast_role,
                                  mlp_block=m.blast_block, orig=m.orig)
        blocks = src.rows(f"{q}.blocks", sel)
        new.blocks = _param(blocks.to(dev), m.blocks.requires_grad)
        new.row_ptr, new.col_idx = ptr.to(dev), col.to(dev)
        if keep_bias:
            b = src.rows(f"{q}.bias", bias_rows) if bias_rows is not None else src.full(f"{q}.bias")
            new.bias = _param(b.to(dev, blocks.dtype), m.bias.requires_grad)
        new._blast_tp = {"role_kind": "in" if role in IN_ROLES else "out", "hidden": bins, "rank": tp.rank,
                         "n_hidden_blocks": costs.numel(), "global": (m.in_features, m.out_features, m.nnz)}
        C._set(model, q, new)
    parent = model.get_submodule(mlp_name) if mlp_name else model
    _hook(parent, tp)
    rep.mlps[mlp_name] = {"hidden_blocks": bins[tp.rank],
                          "blocks_per_rank": [int(costs[b].sum()) for b in bins]}


def _hook(module: nn.Module, tp: TPGroup) -> None:
    if getattr(module, "_blast_tp_hook", None) is None:
        module._blast_tp_hook = module.register_forward_hook(_all_reduce_hook(tp.name))


def attention_modules(model: nn.Module) -> List[str]:
    """Modules with ``q_proj/k_proj/v_proj/o_proj`` linear children and a ``head_dim`` (HF Llama family)."""
    out = []
    for name, m in model.named_modules():
        if all(isinstance(getattr(m, p, None), nn.Linear) for p in ATTN_PROJ) and getattr(m, "head_dim", None):
            out.append(name)
    return out


def _shard_attention(model, name, src, tp: TPGroup, device, rep: ShardReport) -> None:
    attn = model.get_submodule(name) if name else model
    hd = int(attn.head_dim)
    n_kv = attn.k_proj.out_features // hd
    if n_kv % tp.size:
        raise ValueError(f"{name}: {n_kv} KV heads do not split over {tp.size} ranks")
    pre = f"{name}." if name else ""
    for p in ATTN_PROJ:
        lin = getattr(attn, p)
        dim = 1 if p == "o_proj" else 0
        n = lin.weight.shape[dim]
        per = n // tp.size
        dev = device if device is not None and device != "meta" else lin.weight.device
        w = src.narrow(f"{pre}{p}.weight", dim, tp.rank * per, per)
        b = None
        if lin.bias is not None and (dim == 0 or tp.rank == 0):
            b = (src.narrow(f"{pre}{p}.bias", 0, tp.rank * per, per) if dim == 0 else src.full(f"{pre}{p}.bias"))
        with torch.device("meta"):
            new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        new.weight = _param(w.to(dev), lin.weight.requires_grad)
        if b is not None:
            new.bias = _param(b.to(dev, w.dtype), lin.bias.requires_grad)
        new._blast_tp = {"dim": dim, "rank": tp.rank, "global": tuple(lin.weight.shape)}
        setattr(attn, p, new)
    _hook(attn.o_proj, tp)
    rep.attention.append(name)


@torch.no_grad()
def shard_compressed_(model: nn.Module, group=None, *, balance: bool = True, attention: bool = True,
                      source=None, device=None) -> ShardReport:
    """Shard every compressed MLP (and Llama-style attention) of ``model`` over ``group`` in place.

    ``group``: a 1-D DeviceMesh or a ProcessGroup (default: the world). Each rank keeps only its
    hidden blocks' packed blocks (``BlockSparseLinear`` of hidden size ``H / ranks``) and all-reduces
    the MLP output. ``source`` is where blocks are read from (default: the model itself, which must
    be identical on every rank); ``device`` where the shards go (default: where each layer is).
    """
    tp = TPGroup.of(group)
    src = source if source is not None else ModuleSource(model)
    rep = ShardReport(tp.rank, tp.size)
    for mlp_name, quals in C.named_mlps(model, compressed=True):
        _shard_mlp(model, mlp_name, quals, src, tp, balance, device, rep)
    if attention:
        for name in attention_modules(model):
            _shard_attention(model, name, src, tp, device, rep)
    C._restore_mlp_metadata(model)
    log.info("blast tp: %s", rep.summary())
    return rep


def fuse_packed_eager_(mlp: nn.Module, activation: str) -> nn.Module:
    """Make a compressed MLP's forward one ``blast::packed_mlp`` call, without the compiler.

    Works on a sharded MLP (its all-reduce hook still runs after the new forward)."""
    from .ops.packed_mlp import pattern_key

    quals = C.named_mlps(mlp, compressed=True)
    if len(quals) != 1 or quals[0][0] != "":
        raise ValueError(f"{type(mlp).__name__} is not one compressed MLP")
    mods = {r: mlp.get_submodule(q) for r, q in quals[0][1].items()}
    w1, w3, w2 = mods.get("gate", mods.get("fc1")), mods.get("up"), mods.get("down", mods.get("fc2"))
    bh, bd = w1.block
    key = pattern_key(bh, bd, w1.in_features, w1.out_features, w2.out_features,
                      (w1.row_ptr, w1.col_idx, *((w3.row_ptr, w3.col_idx) if w3 is not None else (None, None)),
                       w2.row_ptr, w2.col_idx))

    def forward(x):
        u = (w3.blocks, w3.row_ptr, w3.col_idx, w3.bias) if w3 is not None else (None, None, None, None)
        return torch.ops.blast.packed_mlp(x, w1.blocks, w1.row_ptr, w1.col_idx, w1.bias, *u, w2.blocks, w2.row_ptr,
                                          w2.col_idx, w2.bias, activation, bh, bd, w1.out_features,
                                          w2.out_features, key)

    mlp.forward = forward
    return mlp


# --------------------------------------------------------------------------- what a rank holds


def weight_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the weights this rank holds (each storage once): compressed MLP layers (blocks, index,
    bias), other parameters; non-persistent buffers (rotary tables) are not weights and not counted."""
    seen, out = set(), {"mlp": 0, "other": 0}
    for mod_name, m in model.named_modules():
        compressed = isinstance(m, C.BlockSparseLinear)
        tensors = list(m._parameters.values()) + ([m.row_ptr, m.col_idx] if compressed else [])
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.device)
            if key in seen:
                continue
            seen.add(key)
            out["mlp" if compressed else "other"] += t.numel() * t.element_size()
    out["total"] = out["mlp"] + out["other"]
    return out


__all__ = ["TPGroup", "ShardReport", "ModuleSource", "FileSource", "shard_compressed_", "fuse_packed_eager_",
           "hidden_costs", "split_hidden", "shard_rows", "shard_cols", "attention_modules", "weight_bytes",
           "all_reduce"]
