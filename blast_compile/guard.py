"""What a compiled graph with lowered MLPs assumes about its weights, checked before each of its calls.

A lowered MLP (``passes/lower.py``) reads the live blocks of the pattern it was compiled for, straight
out of the weights: new *values* are always seen, but a block that comes alive after compile would be
skipped. Dynamo guards on shapes and dtypes, not on values, so the backend wraps the compiled graph in
a :class:`GraphGuard`: per call it asks one :class:`~blast_compile.ops.watch.Snapshot` whether any fused
weight or declared mask may have changed (version counters, storage identity, fused-optimizer steps,
``declare_mask``) -- a few hundred ns per tensor, no device work. Only when something moved does it look
at the weights (:meth:`Watch.valid`, a host sync): a pattern that only lost blocks keeps the compiled
graph (the kernels read zeros), declared masks that did not change keep it without reading the weights
(the MLP means ``W * mask``; where every weight of an MLP declares one, only the masks and the weights'
addresses are watched, so a training step costs no re-check); anything else switches the graph to ``fallback`` -- the same graph with the
opaque ``blast::sparse_mlp`` nodes, run eagerly, which re-derives patterns at every call -- until the
weights fit the compiled pattern again. Recompiling (``torch.compiler.reset()``) lowers the new pattern.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, List, Sequence

import torch
from torch._dynamo.utils import counters

from . import masks as _masks
from .formats import build_pattern
from .ops.watch import Snapshot, watch

log = logging.getLogger("blast_compile.guard")


class Watch:
    """One lowered MLP: how its weights are read (a parameter and the views the rewrite put on it) and the
    pattern it was compiled for."""

    def __init__(self, name, plan, weights: Sequence, activation, biases: Sequence = (None, None, None)):
        self.name, self.plan, self.activation = name, plan, activation
        self.weights = list(weights)  # [(parameter, [(view fn, args), ...]) or None] for w1, w3, w2
        self.biases = list(biases)  # the same for b1, b3, b2
        self.has_b1, self.has_b3 = self.biases[0] is not None, self.biases[1] is not None
        for w in self.weights + self.biases:
            if w is not None:
                watch(w[0])

    def params(self) -> List[torch.Tensor]:
        return [w[0] for w in self.weights + self.biases if w is not None]

    def masks(self) -> List[torch.Tensor]:
        return [m[0] for m in (_masks.declared_mask(p) for p in self.params()) if m is not None]

    def current(self, chains=None):
        """The tensors the op reads now (its weights, or ``chains``): each parameter through its views."""
        return _current(self.weights if chains is None else chains)

    def valid(self) -> bool:
        """The weights (and declared masks) still fit the compiled pattern, and hold no NaN/Inf the pattern
        could skip (host syncs; the weights read as ``sparse_mlp.weights_plan`` reads them)."""
        from .ops.sparse_mlp import _all_finite, live_masks

        p, plan = self.plan.pattern, self.plan
        w1, w3, w2 = self.current()
        m_in, m_dn, decl, fix, _ = live_masks(w1, w3, w2, p.bh, p.bd)
        for a, b in zip(plan.dw_masks + plan.dw_fix, decl + fix):  # dW's live lists were built from these
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b.to(a.device))):
                return False
        biases = self.current(self.biases)
        if _misaligned((w1, w3, w2, *biases)):
            return False  # (rebound to a misaligned view: the compiled kernels assume the 16-byte alignment they saw)
        if not _all_finite((w1, w3, w2, *biases)):
            return False  # (a NaN in a skipped hidden unit would vanish: the fallback computes densely)
        new = build_pattern(m_in, m_dn, p.bh, p.bd, activation=self.activation, gated=w3 is not None,
                            has_b1=self.has_b1, has_b3=self.has_b3)
        return not bool((new.mask_in & ~p.mask_in).any() or (new.mask_dn & ~p.mask_dn).any())


def _current(chains):
    out = []
    for w in chains:
        if w is None:
            out.append(None)
            continue
        t, chain = w
        for fn, args in chain:
            t = fn(t, *args)
        out.append(t)
    return out


def _misaligned(ts) -> bool:
    return any(t is not None and t.data_ptr() % 16 for t in ts)


class PackedWatch:
    """One lowered compressed MLP (``blast::mlp_packed``). Its pattern is its index tensors (``row_ptr``,
    ``col_idx``): compared with copies taken at compile time whenever anything moved. Its blocks and biases are
    read at every call, so new values are seen; NaN/Inf in them, or non-zero padding past ``d_hidden``, switch to
    the opaque op, which then runs the unfused chain (``packed_mlp``). ``copied``: per weight, whether the kernels
    read a re-packed copy of its blocks taken at compile time -- any change to those blocks then leaves the
    compiled graph for good."""

    def __init__(self, name, plan, values: Sequence, index: Sequence, copied: Sequence[bool] = (False,) * 3):
        self.name, self.plan = name, plan
        self.values = list(values)  # chains of blocks1, blocks3, blocks2, b1, b3, b2
        self.index = list(index)  # chains of row_ptr1, col_idx1, row_ptr3, col_idx3, row_ptr2, col_idx2
        self.compiled = [None if t is None else t.detach().cpu().clone() for t in _current(self.index)]
        self.copied = [c for c, k in zip(self.values[:3], copied) if k and c is not None]
        self.copied_snap = Snapshot([c[0] for c in self.copied])
        for c in self.values + self.index:
            if c is not None:
                watch(c[0])

    def params(self) -> List[torch.Tensor]:
        return [c[0] for c in self.values + self.index if c is not None]

    def masks(self) -> List[torch.Tensor]:
        return []

    def valid(self) -> bool:
        from .ops.packed_mlp import pad_zero
        from .ops.sparse_mlp import _all_finite

        for a, b in zip(self.compiled, _current(self.index)):
            if (a is None) != (b is None) or (a is not None and (a.shape != b.shape or not torch.equal(a, b.cpu()))):
                return False
        if self.copied_snap.changed([c[0] for c in self.copied]):
            return False
        vals = _current(self.values)
        return not _misaligned(vals) and _all_finite(vals) and pad_zero(self.plan, *vals[:3])


class GraphGuard:
    """The compiled graph, run only while every ``Watch`` is valid; else ``fallback`` (see the module doc)."""

    def __init__(self, compiled: Callable, fallback: Callable, watches: List[Watch]):
        # Dynamo calls a backend's result with the graph's inputs unpacked (``compiled(*args)``). Inductor's
        # result may still carry ``_boxed_call`` (copied from the boxed function it wraps): not a calling
        # convention to follow, so neither read nor exposed here
        self.compiled, self.fallback, self.watches = compiled, fallback, watches
        self.ok = True
        self._take()

    def _take(self, same_masks=()):
        """Snapshot what the graph reads now. ``same_masks``: ids of the watches whose declared masks were just found
        unchanged -- their mask snapshot stands (a training step moves the weights only).

        An MLP whose every weight declares a mask means ``W * mask`` whatever its values hold (``_same_declared_masks``):
        its weights' versions and optimizer steps are not watched, only their masks and addresses (a weight rebound
        at a misaligned address must not reach the kernels) -- no re-validation per training step."""
        self.epoch = _masks.EPOCH[0]
        self.tensors, self.addresses = [], []
        for w in self.watches:
            if id(w) not in same_masks:
                w.taken_masks = w.masks()
                w.mask_snap = _retake(getattr(w, "mask_snap", None), w.taken_masks)
            if _same_declared_masks(w):
                self.addresses += [(t, t.data_ptr()) for t in w.params()]
                self.tensors += w.taken_masks
            else:
                self.tensors += [*w.params(), *w.taken_masks]
        self.snap = _retake(getattr(self, "snap", None), self.tensors)  # (Dynamo guards the weights' layout itself)

    def __call__(self, *args):
        if (self.epoch != _masks.EPOCH[0] or self.snap.changed(self.tensors)
                or any(t.data_ptr() != a for t, a in self.addresses)):
            self._revalidate()
        if self.ok:
            return self.compiled(*args)
        counters["blast"]["graph_fallback_calls"] += 1
        return self.fallback(*args)

    def _revalidate(self):
        counters["blast"]["graph_revalidated"] += 1
        ok, same = True, []
        for w in self.watches:
            if _same_declared_masks(w) and not _misaligned(w.current() + w.current(w.biases)):
                counters["blast"]["masked_weight_update"] += 1  # (as the opaque op counts its declared-mask path)
                same.append(w)
            elif not w.valid():
                ok = False
                break
        if self.ok and not ok:
            counters["blast"]["graph_pattern_changed"] += 1  # (the opaque op then counts its own pattern_changed)
            msg = ("blast: weights of a compiled MLP no longer fit what its kernels were compiled for (new live "
                   "blocks, new masks, NaN/Inf, non-zero padding in compressed blocks, or rebound to a misaligned "
                   "view); its graph now runs through the fused op's host path, which follows the weights at every "
                   "call (correct, slower). Recompile to fuse the new weights: torch.compiler.reset()")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        self.ok = ok
        self._take({id(w) for w in same})


def _retake(snap, ts) -> Snapshot:
    """``snap`` updated to ``ts`` (once per training step: an update reuses what did not move), or a new one."""
    if snap is None or len(snap) != len(ts):
        return Snapshot(ts, layout=False)
    snap.update(ts)
    return snap


def _same_declared_masks(w: Watch) -> bool:
    """Every weight of ``w`` declares a mask, and they are the masks of the last check, unmoved: the MLP means
    ``W * mask`` with the compiled masks, whatever the weights hold (no device work; NaN/Inf in the weights
    then go unseen, as in ``sparse_mlp.weights_plan``: README)."""
    now = w.masks()
    return (getattr(w.plan, "masked", False) and len(now) == len(w.taken_masks)
            and all(a is b for a, b in zip(now, w.taken_masks)) and not w.mask_snap.changed(now))
