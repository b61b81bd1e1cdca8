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
# bumped by every declare_mask / clear_mask: a compiled graph's guard re-checks its masks when it moves
EPOCH = [0]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def declare_mask(param: torch.Tensor, mask: torch.Tensor, block: Tuple[int, int]) -> None:
    """Declare ``param`` to mean ``param * expand(mask, block)``. ``mask`` is bool ``[O/bo, I/bi]``."""
    if not (isinstance(block, (tuple, list)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"declare_mask: block must be (bo, bi), two positive ints, not {block!r}")
    if not isinstance(param, torch.Tensor) or param.dim() != 2:
        raise ValueError("declare_mask: param must be a 2-D weight")
    grid = tuple(-(-n // b) for n, b in zip(param.shape, block))
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != grid:
        raise ValueError(f"declare_mask: mask must have the block grid's shape {grid} (weight "
                         f"{tuple(param.shape)} in {tuple(block)} blocks), not "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    param._blast_mask = (mask, tuple(block))
    param._blast_mask_views = {}
    _DECLARED[_storage_key(param)] = weakref.ref(param)
    EPOCH[0] += 1


def clear_mask(param: torch.Tensor) -> None:
    EPOCH[0] += 1
    _DECLARED.pop(_storage_key(param), None)
    for attr in ("_blast_mask", "_blast_mask_views"):
        if hasattr(param, attr):
            delattr(param, attr)


def _row_slice(p: torch.Tensor, t: torch.Tensor):
    """The block rows of ``p``'s declared mask that ``t`` covers, when ``t`` is a block-aligned row
    slice of ``p`` (one half of a fused gate|up weight, as the rewrite passes it), else None. The
    slice object is kept per rows until the next ``declare_mask``, so the op's mask_version stays
    put between calls."""
    mask, (bo, bi) = p._blast_mask
    if t.dim() != 2 or p.dim() != 2 or t.stride() != p.stride() or t.shape[1] != p.shape[1]:
        return None
    off = t.storage_offset() - p.storage_offset()
    if off < 0 or off % p.stride(0):
        return None
    r0, n = off // p.stride(0), t.shape[0]
    if r0 + n > p.shape[0] or r0 % bo or (n % bo and r0 + n != p.shape[0]):
        return None
    views = p._blast_mask_views  # (emptied by every declare_mask)
    if (r0, n) not in views:
        views[r0, n] = mask[r0 // bo: -(-(r0 + n) // bo)]
    return views[r0, n], (bo, bi)


def _transposed(p: torch.Tensor, t: torch.Tensor):
    """``p``'s declared mask as seen through ``t = p.t()`` (GPT-2's ``Conv1D`` weights are ``[in,
    out]``; the rewrite hands the op ``torch.t(W)``), else None. One object per declaration, as
    ``_row_slice``'s."""
    if not (t.dim() == 2 == p.dim() and t.shape == p.shape[::-1] and t.stride() == p.stride()[::-1]
            and t.storage_offset() == p.storage_offset()):
        return None
    mask, (bo, bi) = p._blast_mask
    views = p._blast_mask_views  # (emptied by every declare_mask)
    if "t" not in views:
        views["t"] = mask.t()
    return views["t"], (bi, bo)


def declared_mask(t: Optional[torch.Tensor]):
    """``(mask, (bo, bi))`` declared for the parameter whose storage ``t`` views, else None."""
    if t is None:
        return None
    if hasattr(t, "_blast_mask"):
        return t._blast_mask
    try:
        key = _storage_key(t)
    except (RuntimeError, NotImplementedError):  # fake / meta tensors
        return None
    ref = _DECLARED.get(key)
    p = ref() if ref is not None else None
    if p is None or getattr(p, "_blast_mask", None) is None:
        return None
    if _storage_key(p) != key:
        # p moved to another storage (.to(), .double(), p.data = t) and left its old address behind, which a
        # tensor of another model may have now: the entry follows p to its new address
        del _DECLARED[key]
        _DECLARED[_storage_key(p)] = ref
        return None
    if p.shape != t.shape or p.stride() != t.stride() or p.storage_offset() != t.storage_offset():
        return _row_slice(p, t) or _transposed(p, t)
    return p._blast_mask


def mask_version(t: Optional[torch.Tensor]):
    d = declared_mask(t)
    if d is None:
        return None
    from .ops.plans import version

    return (id(d[0]), version(d[0]), d[1])
