"""A resumable ``blast sparsify`` run in one safetensors file: weights, optimizer and sparsifier state.

Tensors go in the file's body; everything else (step, options, curve so far, the structure of the optimizer and
sparsifier state dicts) goes in its metadata as JSON, with each tensor replaced by a reference to its key.
Written to a temporary name and renamed, so an interrupted write never leaves a broken checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch

FORMAT = "blast-sparsify-checkpoint-v1"


def _pack(obj: Any, key: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """A JSON-able tree of ``obj`` with tensors moved into ``tensors`` (dict keys that are not str kept)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__items__": [[k, _pack(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unpack(tree: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__items__" in tree:
        return {k: _unpack(v, tensors) for k, v in tree["__items__"]}
    if isinstance(tree, list):
        return [_unpack(v, tensors) for v in tree]
    return tree


def save(path: str, model: torch.nn.Module, optimizer, sparsifier, state: dict) -> None:
    """``state``: JSON-able run state (step, tokens, options, curve, ...)."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():  # (tied weights once)
        tensors[f"model/{n}"] = p.detach().cpu().contiguous()
    meta = {"format": FORMAT, "state": json.dumps(state),
            "optimizer": json.dumps(_pack(optimizer.state_dict(), "optimizer", tensors)),
            "sparsifier": json.dumps(_pack(sparsifier.state_dict(), "sparsifier", tensors) if sparsifier else None)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, metadata parsed); ValueError for a file that is not a checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a blast sparsify checkpoint (format {meta.get('format')!r})")
    return tensors, {k: json.loads(meta[k]) for k in ("state", "optimizer", "sparsifier")}


@torch.no_grad()
def restore(tensors, meta, model, optimizer, sparsifier) -> dict:
    """Weights, optimizer and sparsifier state back into freshly built objects; returns the run state."""
    params = dict(model.named_parameters())
    saved = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    if set(saved) != set(params):
        raise ValueError(f"checkpoint does not fit the model: {sorted(set(saved) ^ set(params))[:5]} differ")
    for n, p in params.items():
        p.copy_(saved[n])
    optimizer.load_state_dict(_unpack(meta["optimizer"], tensors))
    if sparsifier is not None:
        sparsifier.load_state_dict(_unpack(meta["sparsifier"], tensors))
    return meta["state"]


__all__ = ["save", "load", "restore", "FORMAT"]
