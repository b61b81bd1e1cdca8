"""Compressed checkpoints and tensor parallelism: load straight into shards, save by gathering.

Loading (:func:`load_sharded`, or ``compress.from_pretrained(dir, device, tp=mesh)``): every rank
builds the architecture with parameters on the meta device, reads the *index* tensors of every
compressed layer whole (4 bytes per block), plans its shard from them
(:func:`tp_compressed.shard_compressed_`), then reads only its own blocks and its heads' attention
rows/columns through ``safe_open(...).get_slice``; replicated tensors (embeddings, norms) are read
whole. No rank ever holds another rank's blocks or a dense MLP weight, so a model whose compressed
size fits ``ranks`` devices loads even when it fits no single one.

Saving (:func:`save_sharded`): rank 0 gathers each sharded layer from the ranks (one layer at a time,
on CPU) and writes the ordinary single-file checkpoint, byte for byte what :func:`compress.save_compressed`
writes for the unsharded model. Chosen over one file per rank because the result loads on any number
of ranks (or one device) and keeps one format; the price is that rank 0's *host* memory holds the whole
compressed model while writing (safetensors writes one dict), which is the model's compressed size,
not its dense size.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Union

import torch
from torch import Tensor, nn

from . import compress as C
from . import tp_compressed as T
from .formats import cdiv
from .ops import gather

log = logging.getLogger("blast_compile.tp_checkpoint")


# --------------------------------------------------------------------------- load


@torch.no_grad()
def load_sharded(model_or_factory: Union[nn.Module, Callable[[], nn.Module]], path: str, group=None,
                 device: Union[str, torch.device] = "cpu", *, balance: bool = True, attention: bool = True) -> nn.Module:
    """A file written by :func:`compress.save_compressed`, loaded as this rank's tensor-parallel shard.

    ``model_or_factory``: the dense architecture (built with parameters on the meta device when a
    factory). The result has ``_blast_shard_report`` (what this rank holds), ``_blast_bytes_read``
    (bytes taken from the file per tensor) and ``_blast_global_specs`` (the file's layer specs).
    """
    src = T.FileSource(path)
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
    else:
        with C.params_on_meta():
            model = model_or_factory()
    C._check_config(src.meta["config"], model)
    specs = src.meta["modules"]
    C.swap_in_compressed(model, specs)
    for name in specs:  # the index of every layer (the plan needs them; they are small)
        mod = model.get_submodule(name)
        mod.row_ptr, mod.col_idx = src.full(f"{name}.row_ptr"), src.full(f"{name}.col_idx")
        for t, what in ((mod.row_ptr, "row_ptr"), (mod.col_idx, "col_idx")):
            if t.dtype != torch.int32:
                raise ValueError(f"{path}: {name}.{what} is {t.dtype}, block indices are int32")
        mod.validate()
    rep = T.shard_compressed_(model, group, balance=balance, attention=attention, source=src, device=device)
    _load_rest(model, src, device)
    for m in model.modules():
        if isinstance(m, C.BlockSparseLinear):
            m.validate()
    model._blast_shard_report = rep
    model._blast_bytes_read = dict(src.read)
    model._blast_global_specs = specs
    return model


def _load_rest(model: nn.Module, src: "T.FileSource", device) -> None:
    """Every tensor sharding did not fill (still on meta): read whole, tied parameters kept tied."""
    made: Dict[str, nn.Parameter] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if getattr(mod, "_blast_tp", None) is not None:
            continue  # this rank's shard, already read
        if leaf in mod._parameters:
            key = src.key(name)
            if key not in made:
                v = src.full(name).to(device)
                if tuple(v.shape) != tuple(t.shape):
                    raise ValueError(f"file does not match the model: {name}: model {tuple(t.shape)} file {tuple(v.shape)}")
                made[key] = nn.Parameter(v, requires_grad=t.requires_grad and v.is_floating_point())
            mod._parameters[leaf] = made[key]
        elif isinstance(mod, C.BlockSparseLinear) and t.device.type != "meta":
            mod._buffers[leaf] = t.to(device)  # the index of a layer that was not sharded: read already
        elif _in_file(src, name):
            mod._buffers[leaf] = src.full(name).to(device)
    left = [n for n, t in model.named_parameters() if t.device.type == "meta"]
    if left:
        raise ValueError(f"file does not match the model: missing {left[:5]}")


def _in_file(src: "T.FileSource", name: str) -> bool:
    try:
        src.key(name)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- save


def _gather(obj, tp: "T.TPGroup"):
    import torch.distributed as dist

    out = [None] * tp.size if tp.rank == 0 else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(tp.pg, 0), group=tp.pg)
    return out


def _merge_compressed(parts, info: dict) -> Dict[str, Tensor]:
    """One compressed layer from every rank's shard: the unsharded layer's CSR order and bias."""
    gin, gout, _ = info["global"]
    hidden = info["hidden"]
    blocks, keys, cols, rows_all = [], [], [], []
    first = parts[0]
    bo, bi = first["blocks"].shape[1:]
    n_rows = cdiv(gout, bo)
    n_cols = cdiv(gin, bi)
    for r, p in enumerate(parts):
        hid = torch.tensor(hidden[r], dtype=torch.int64)
        lrows = gather.rows_of(p["row_ptr"].long())
        lcols = p["col_idx"].long()
        grows, gcols = (hid[lrows], lcols) if info["role_kind"] == "in" else (lrows, hid[lcols])
        blocks.append(p["blocks"])
        keys.append(grows * n_cols + gcols)
        rows_all.append(grows)
        cols.append(gcols)
    order = torch.argsort(torch.cat(keys), stable=True)
    grows = torch.cat(rows_all)[order]
    out = {"blocks": torch.cat(blocks)[order].contiguous(), "col_idx": torch.cat(cols)[order].to(torch.int32)}
    ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(grows, minlength=n_rows), 0)
    out["row_ptr"] = ptr.to(torch.int32)
    if first.get("bias") is not None:
        if info["role_kind"] == "in":
            b = first["bias"].new_empty(gout)
            for r, p in enumerate(parts):
                b[T._elements(torch.tensor(hidden[r], dtype=torch.int64), bo)] = p["bias"]
            out["bias"] = b
        else:
            out["bias"] = first["bias"]  # down/fc2's bias lives on rank 0
    return out


def _local_parts(mod: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in list(mod._parameters.items()) + list(mod._buffers.items())
            if v is not None}


@torch.no_grad()
def save_sharded(model: nn.Module, path: str, group=None) -> None:
    """Write a sharded compressed model as one ordinary compressed file (rank 0 gathers and writes).

    Every rank must call it (collective). The file equals :func:`compress.save_compressed` of the
    unsharded model, so it loads with :func:`compress.load_compressed` or :func:`load_sharded` on any
    number of ranks."""
    import torch.distributed as dist

    tp = T.TPGroup.of(group)
    merged: Dict[str, Tensor] = {}
    specs: Dict[str, dict] = {}
    for name, mod in model.named_modules():
        info = getattr(mod, "_blast_tp", None)
        if info is None:
            continue
        parts = _gather(_local_parts(mod), tp)
        pre = f"{name}." if name else ""
        if tp.rank != 0:
            continue
        if isinstance(mod, C.BlockSparseLinear):
            g = _merge_compressed(parts, info)
            gin, gout, _ = info["global"]
            specs[name] = dict(C.module_spec(mod), **{"in": gin, "out": gout, "nnz": int(g["blocks"].shape[0]),
                                                      "bias": "bias" in g})
        else:  # an attention projection split by heads
            dim = info["dim"]
            g = {"weight": torch.cat([p["weight"] for p in parts], dim)}
            if "bias" in parts[0]:
                g["bias"] = torch.cat([p["bias"] for p in parts]) if dim == 0 else parts[0]["bias"]
        merged.update({pre + k: v for k, v in g.items()})
    if tp.rank == 0:
        tensors, aliases = C._state_tensors(model)
        tensors.update(merged)
        for n, m in model.named_modules():
            if isinstance(m, C.BlockSparseLinear) and n not in specs:
                specs[n] = C.module_spec(m)  # (compressed layers that were not sharded)
        C.write_compressed(tensors, aliases, specs, C._config_dict(model), path)
        model._blast_global_specs = specs
    dist.barrier(group=tp.pg)


def save_pretrained_sharded(model: nn.Module, directory: str, group=None) -> None:
    """:func:`compress.save_pretrained` for a sharded model: config.json, model.safetensors, blast.json (rank 0)."""
    import torch.distributed as dist

    tp = T.TPGroup.of(group)
    if tp.rank == 0:
        os.makedirs(directory, exist_ok=True)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(directory)
    save_sharded(model, os.path.join(directory, "model.safetensors"), group)
    if tp.rank == 0:
        C.write_blast_json(directory, model._blast_global_specs)
    dist.barrier(group=tp.pg)


__all__ = ["load_sharded", "save_sharded", "save_pretrained_sharded"]
