"""Has a tensor changed since we last looked? For plans derived from weights (live blocks, packed copies).

``_version`` alone does not answer it:

* fused optimizers (``Adam/AdamW/SGD/Adagrad(..., fused=True)``; HF Trainer's ``adamw_torch_fused``)
  write the parameters in one kernel that moves no version counter. A global optimizer step
  post-hook counts their steps for the parameters that are *watched* (:func:`watch`);
* ``p.data = t`` (``vector_to_parameters``) gives ``p`` another storage and keeps its version
  counter, and a new storage can land at the address of a freed one. A :class:`Snapshot` keeps a
  :class:`~torch.multiprocessing.reductions.StorageWeakRef` of each storage it saw: the StorageImpl
  (not its data) stays allocated, so no other storage can get its address as ``_cdata`` while we
  compare.

Still unseen: writes through another tensor that shares the storage but not the version counter
(``p.data.copy_(t)``, a flat buffer the parameters were rebound into): ``blast_compile.refresh()``.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

# watched parameters, weakly and by identity (a WeakSet would compare tensors with ==): the step
# hook counts steps for these only
_WATCHED = WeakIdKeyDictionary()
# fused optimizer steps per storage (``_cdata``) of a watched parameter. Keyed by storage, not by the
# parameter, so that the per-call aliases Inductor hands the op (``reinterpret_tensor`` views sharing
# the storage) see the parameter's count. A dead storage's entry can only be inherited by a storage
# no live Snapshot knows (each holds a StorageWeakRef of its own), so counts never alias.
_STEPS: "dict[int, int]" = {}
# bumped by every counted step: a Snapshot whose epoch is current skips the per-tensor look-ups
_EPOCH = 0


def watch(t: Optional[Tensor]) -> None:
    """Count fused-optimizer steps on ``t`` (a parameter the fused op reads, or a declared mask)."""
    if isinstance(t, Tensor) and t not in _WATCHED:
        _WATCHED[t] = True


def steps(t: Tensor) -> int:
    """Fused-optimizer steps seen so far on ``t``'s storage."""
    return _STEPS.get(_cdata(t), 0)


def _cdata(t: Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):  # subclasses without a storage
        return None


def _writes_unseen(opt: torch.optim.Optimizer, group: dict) -> bool:
    """Does this optimizer update ``group`` without moving version counters? torch.optim's fused
    implementations do; its others run in-place ops that move them. Optimizers from elsewhere (apex,
    bitsandbytes: kernels on raw pointers) may not: counted too."""
    return bool(group.get("fused")) or not type(opt).__module__.startswith("torch.optim")


def _after_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer step post-hook: count steps that moved no version counter on watched tensors.
    O(parameter groups) for torch.optim's unfused optimizers; O(parameters) for fused ones."""
    global _EPOCH
    if not _WATCHED:
        return
    groups = [g for g in opt.param_groups if _writes_unseen(opt, g)]
    hit = False
    for g in groups:
        for p in g["params"]:
            if p in _WATCHED:  # (counted also without a gradient: a spurious count costs one re-check)
                k = _cdata(p)
                _STEPS[k] = _STEPS.get(k, 0) + 1
                hit = True
    if hit:
        _EPOCH += 1
        if len(_STEPS) > 4 * len(_WATCHED) + 1024:  # rebound parameters leave dead storages' entries
            live = {_cdata(p) for p in list(_WATCHED.keys())}
            for k in [k for k in _STEPS if k not in live]:
                del _STEPS[k]


_HOOK = None


def install() -> None:
    """Install the step hook once (``blast_compile.ops`` does on import)."""
    global _HOOK
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK = register_optimizer_step_post_hook(_after_step)


_INFERENCE = object()  # a version slot of an inference tensor (it has no version counter)


def _version(t: Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensor
        from .plans import version  # (warns once, as every path that meets one does)

        version(t)
        return _INFERENCE


class Snapshot:
    """What a sequence of tensors (None allowed) looked like: ``changed(ts)`` says whether any of them
    may have changed since, ``update(ts)`` looks again.

    Per tensor: version counter, storage identity (``_cdata``, its StorageImpl held by a weak ref so the
    address cannot be reused meanwhile), storage offset, shape, strides, and the fused-optimizer steps
    counted on its storage. ``layout=False`` (or one bool per tensor) leaves out offset, shape and
    strides, for a caller that keys on them itself (the ops' plan caches: a third less per tensor).
    Inference tensors (no version counter) answer only for identity and layout: in-place writes to them
    need ``blast_compile.refresh()``.
    """

    __slots__ = ("_state", "_refs", "_epoch", "_layout")

    def __init__(self, ts: Sequence[Optional[Tensor]], layout: Union[bool, Sequence[bool]] = True):
        self._layout = tuple(layout) if not isinstance(layout, bool) else (layout,) * len(ts)
        if len(self._layout) != len(ts):
            raise ValueError("Snapshot: one layout flag per tensor")
        self._state = None
        self.update(ts)

    def __len__(self) -> int:
        """How many tensors it covers."""
        return len(self._layout)

    def update(self, ts: Sequence[Optional[Tensor]]) -> None:
        # A storage seen at the same position last time keeps its weak ref: the ref held its StorageImpl, so an
        # equal _cdata is the same storage (and a training step re-takes every weight: refs are the costly part)
        old = self._state if self._state is not None and len(self._state) == len(ts) else None
        state, refs = [], []
        for i, t in enumerate(ts):
            if t is None:
                state.append(None)
                refs.append(None)
                continue
            try:
                st = t.untyped_storage()
                cd, off = st._cdata, t.storage_offset()
                o = old[i] if old is not None else None
                refs.append(self._refs[i] if o is not None and o[1] == cd else StorageWeakRef(st))
            except (RuntimeError, NotImplementedError, AttributeError):  # no storage: identity by object
                cd, off = ("id", weakref.ref(t)), 0
                refs.append(None)
            state.append((_version(t), cd, off, t.shape, t.stride(), _STEPS.get(cd, 0)))
        self._state = state
        self._refs = refs
        self._epoch = _EPOCH

    def changed(self, ts: Sequence[Optional[Tensor]]) -> bool:
        state = self._state
        if len(ts) != len(state):
            return True
        for t, s, layout in zip(ts, state, self._layout):
            if s is None:
                if t is not None:
                    return True
                continue
            if t is None:
                return True
            try:  # (one chain of reads: this runs per tensor per call)
                if t._version != s[0] or t.untyped_storage()._cdata != s[1]:
                    return True
                if layout and (t.storage_offset() != s[2] or t.shape != s[3] or t.stride() != s[4]):
                    return True
            except (RuntimeError, NotImplementedError):  # an inference tensor, a tensor without a storage
                if _slow_changed(t, s, layout):
                    return True
        if self._epoch != _EPOCH:  # some fused step since: were any of ours stepped?
            if any(s is not None and _STEPS.get(s[1], 0) != s[5] for s in state):
                return True
            self._epoch = _EPOCH
        return False


def _slow_changed(t: Tensor, s, layout: bool) -> bool:
    ver, cd, off, shape, stride, _ = s
    if _version(t) != ver:
        return True
    if isinstance(cd, tuple):
        same = cd[1]() is t
    else:
        same = _cdata(t) == cd and (not layout or t.storage_offset() == off)
    return not same or (layout and (t.shape != shape or t.stride() != stride))


__all__ = ["watch", "steps", "Snapshot", "install"]
