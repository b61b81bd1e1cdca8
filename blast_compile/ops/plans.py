"""Per-layer plans of the fused ops: where they are kept, and where they are allocated.

A plan (live-block indices, kernel tables, scratch) is derived from a layer's tensors and
reused while those tensors are unchanged. Plans are keyed by the op's pattern key plus the
tensors' identities (storage address, offset, shape, strides, device); a :class:`.watch.Snapshot`
kept with each plan says whether its tensors may have changed since (version counters, storage
identity that survives address reuse, fused-optimizer steps), and each plan keeps weak references
to the tensors it came from: once they are gone the plan is dropped.
"""
import logging
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


def ident(t: Optional[Tensor]):
    if t is None:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.device)


# storage address -> weakrefs of the parameters the backend fused (``register_weights``)
_OWNERS: "dict[int, list]" = {}
# every registered parameter -> the address it is registered at (to find it again after ``p.data = t``
# moved it to another storage)
_REGISTERED = WeakIdKeyDictionary()


def register_weights(*ts) -> None:
    """Name the parameters a fused op reads; the backend calls this at compile time, when it sees
    them. At run time the op may get an *alias* instead (Inductor hands a view of a graph input --
    GPT-2's ``torch.t(W)``, a fused gate|up weight's ``narrow`` -- as a fresh ``reinterpret_tensor``
    each call, with a version counter of its own that in-place changes of the parameter never
    move); ``owner`` maps it back. They are watched for fused-optimizer steps (:func:`.watch.watch`)."""
    from .watch import watch

    for t in ts:
        if isinstance(t, Tensor) and t.device.type != "meta":
            watch(t)
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # fake tensors, subclasses
                continue
            old = _REGISTERED.get(t)
            if old is not None and old != ptr and old in _OWNERS:  # (rebound: off its old address)
                _OWNERS[old] = [r for r in _OWNERS[old] if r() is not None and r() is not t]
                if not _OWNERS[old]:
                    del _OWNERS[old]
            refs_ = _OWNERS.setdefault(ptr, [])
            refs_[:] = [r for r in refs_ if r() is not None and r() is not t] + [weakref.ref(t)]
            _REGISTERED[t] = ptr


def _span(t: Tensor):
    """[first, last] element offsets ``t`` touches in its storage."""
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return t.storage_offset(), last


def _covers(p: Tensor, t: Tensor) -> bool:
    """``p``'s storage span holds ``t``'s elements (same storage assumed)."""
    if p.dtype != t.dtype or p.device != t.device or not p.numel():
        return False
    lo, hi = _span(t) if t.numel() else (t.storage_offset(), t.storage_offset())
    plo, phi = _span(p)
    return plo <= lo and hi <= phi


def owner(t: Optional[Tensor], search: bool = False):
    """The tensor whose version counter and lifetime stand for ``t``: the registered parameter whose
    storage span holds ``t``'s elements (``t`` an alias of it), else the base of a view, else ``t``.
    ``search``: also look through every registered parameter for one rebound (``p.data = t``) to
    ``t``'s storage since it was registered, and register it at its new address."""
    if t is None:
        return None
    try:
        st = t.untyped_storage()
        ptr, cd = st.data_ptr(), st._cdata
    except (RuntimeError, NotImplementedError):
        return t._base if t._base is not None else t
    cands = _OWNERS.get(ptr)
    if cands:
        ps = [r() for r in cands]
        if any(p is t for p in ps):  # the parameter itself (the usual case)
            return t
        if any(p is None for p in ps):  # (a fused parameter died: forget it)
            cands[:] = [r for r, p in zip(cands, ps) if p is not None]
        for p in ps:  # (a parameter rebound since has another storage: another tensor took its address)
            if p is not None and p.untyped_storage()._cdata == cd and _covers(p, t):
                return p
    if t._base is not None:
        return t._base
    if search and not isinstance(t, torch.nn.Parameter):
        for p in list(_REGISTERED.keys()):
            if p.untyped_storage()._cdata == cd and _covers(p, t):
                register_weights(p)
                return p
    return t


def version(t: Optional[Tensor]):
    """``t._version``, or None for an inference tensor (made under ``torch.inference_mode()``), which
    has no version counter: in-place writes to it are not seen (``refresh()`` after them); said once."""
    if t is None:
        return None
    if t.is_inference():
        warn_once("inference_tensors", "blast: a fused MLP's weights (or masks) are inference tensors, made under "
                  "torch.inference_mode(); they have no version counter, so in-place changes to them after the "
                  "first call are not seen -- call blast_compile.refresh() after changing them")
        return None
    return t._version


def refs(*ts):
    return tuple(None if t is None else weakref.ref(t) for t in ts)


class PlanCache:
    """An LRU of plans; ``get`` returns None for plans whose tensors have died."""

    def __init__(self, max_plans: int = 4096):
        self._plans: "OrderedDict" = OrderedDict()
        self._lock = threading.Lock()
        self.max_plans = max_plans
        _CACHES.add(self)

    def clear(self):
        with self._lock:
            self._plans.clear()

    def get(self, key):
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                return None
            if not all(r is None or r() is not None for r in plan.refs):
                del self._plans[key]
                return None
            self._plans.move_to_end(key)
            return plan

    def put(self, key, plan):
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)


_CACHES: "weakref.WeakSet[PlanCache]" = weakref.WeakSet()


def refresh() -> None:
    """Forget every fused MLP's plan: the next call re-derives its live blocks from the weights.

    Needed only after writes through another tensor that shares a weight's storage but not its
    version counter: ``w.data`` (``w.data.copy_(new)``, ``w.data[...] = v``), a flat buffer the
    parameters were rebound into and that is then written in place, a ``torch.from_numpy`` / DLPack
    alias; and after in-place writes to inference tensors (no version counter). Seen without it:
    writes to ``w`` itself (optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``), fused
    optimizer steps (``fused=True``; counted by an optimizer step hook, :mod:`.watch`), and
    rebinding ``w.data = t`` / ``vector_to_parameters`` (a new storage). Under CUDA graphs the
    replayed kernels keep the pattern they were recorded with (re-record: ``torch._dynamo.reset()``
    and compile again)."""
    for cache in list(_CACHES):
        cache.clear()


_WORKER = None
_ON_WORKER = threading.local()
_WARNED: set = set()
log = logging.getLogger("blast_compile.ops")


def warn_once(what, msg: str):
    """Warn with ``msg`` the first time ``what`` (any hashable) comes up in this process: a Python
    warning (shown without any logging set up: the package logger has only a NullHandler) and a
    log record (``TORCH_LOGS="+blast_compile"``)."""
    if what not in _WARNED:
        _WARNED.add(what)
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def outside_graph_pool(fn, device):
    """Run ``fn`` (which makes long-lived CUDA tensors) outside any CUDA-graph memory pool.

    While CUDA-graph trees warm a graph up they send *this thread's* allocations to
    their private pool, and a tensor there that outlives the run is an error later
    ("tensors in the cudagraph pool not tracked as outputs"). A plan's index tensors
    and kernel scratch live as long as the plan, so they are made on a worker thread,
    whose allocations go to the ordinary allocator; it synchronizes before handing back.
    Called again from inside such a ``fn`` (a warm-up building tables lazily) it just runs
    ``fn``: it is on the worker already, and waiting for the one worker would deadlock.
    """
    global _WORKER
    if device.type != "cuda" or getattr(_ON_WORKER, "on", False) or torch.cuda.is_current_stream_capturing():
        return fn()
    if _WORKER is None:
        from concurrent.futures import ThreadPoolExecutor

        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blast-plan")
    torch.cuda.current_stream(device).synchronize()  # inputs made on this thread's stream are ready

    def run():
        _ON_WORKER.on = True
        with torch.cuda.device(device):
            out = fn()
            torch.cuda.synchronize(device)
            return out

    return _WORKER.submit(run).result()


def as_output(y: Tensor, shape) -> Tensor:
    """Contiguous ``y`` with the op's output shape, *not* as a view of ``y``: autograd forbids
    in-place changes of a custom op's output that is a view of one of its intermediates (Falcon's
    ``mlp_output += attention_output``), and ``reshape`` would return one even for the same shape."""
    return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), tuple(shape))


def warm_kernels(plan, x2d, forward):
    """First use on the GPU: let the kernels build their per-plan device state (indices,
    decode scratch, tuned configs) for the decode and the prefill path, off the graph pool.
    ``forward(dummy_x)`` runs the kernels once."""
    if not x2d.is_cuda or plan.cache.get("_warm") or torch.cuda.is_current_stream_capturing():
        return
    from .. import codegen

    def warm():
        for m in (1, codegen.DECODE_MAX_M + 1):
            forward(torch.zeros(m, x2d.shape[1], device=x2d.device, dtype=x2d.dtype))

    outside_graph_pool(warm, x2d.device)
    plan.cache["_warm"] = True
