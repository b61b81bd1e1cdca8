"""Declared block masks: the sparsifier's statement that a weight *means* ``W * mask``.

A weight with no declared mask is just a dense tensor that happens to hold zero
blocks: its gradient is dense. A weight with a declared mask has, by
definition, zero gradient on dead blocks, so the fused op computes dW only on
live blocks. The mask is found at run time from the weight's storage, so the
aliases AOTAutograd hands to the op (detached views of the parameter) find it.
"""
import weakref
from typing import Optional, Tuple

import torch

_DECLARED: "dict[int, weakref.ref]" = {}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def declare_mask(param: torch.Tensor, mask: torch.Tensor, block: Tuple[int, int]) -> None:
    """Declare ``param`` to mean ``param * expand(mask, block)``. ``mask`` is bool ``[O/bo, I/bi]``."""
    param._blast_mask = (mask, tuple(block))
    _DECLARED[_storage_key(param)] = weakref.ref(param)


def clear_mask(param: torch.Tensor) -> None:
    _DECLARED.pop(_storage_key(param), None)
    if hasattr(param, "_blast_mask"):
        del param._blast_mask


def declared_mask(t: Optional[torch.Tensor]):
    """``(mask, (bo, bi))`` declared for the parameter whose storage ``t`` views, else None."""
    if t is None:
        return None
    if hasattr(t, "_blast_mask"):
        return t._blast_mask
    try:
        ref = _DECLARED.get(_storage_key(t))
    except (RuntimeError, NotImplementedError):  # fake / meta tensors
        return None
    p = ref() if ref is not None else None
    if p is None or p.shape != t.shape or p.stride() != t.stride() or p.storage_offset() != t.storage_offset():
        return None
    return getattr(p, "_blast_mask", None)


def mask_version(t: Optional[torch.Tensor]):
    d = declared_mask(t)
    if d is None:
        return None
    from .ops.plans import version

    return (id(d[0]), version(d[0]), d[1])
