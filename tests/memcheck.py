"""A memory checker for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``).

compute-sanitizer needs a GPU; CI has none. Under the interpreter every load, store and atomic of a kernel
is a numpy call on the addresses it computed, so each can be checked before it happens: every address the
mask lets through must lie inside the storage of one of the kernel's tensor arguments (a TMA descriptor's
base counts). A kernel that reads or writes anywhere else -- a wrong offset table, a missing mask, a scratch
part past its buffer -- raises ``OutOfBounds`` at that access, where on a GPU it would be an illegal memory
access some time later, or silent corruption.

What it cannot see: accesses that only exist on a GPU (inline PTX such as the L2 prefetches, TMA hardware
paths the interpreter emulates with masked loads), and races.

    with memcheck():
        triton_mlp.forward(...)        # any launches under TRITON_INTERPRET=1
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


_ranges: list = []  # [(lo, hi)] byte ranges of the running kernel's tensor arguments
_passed_by_address: list = []  # [(lo, hi)] of buffers kernels get as an int address (``allow``)
checked = [0]  # accesses checked (a test asserts the checker ran)


def allow(t: torch.Tensor) -> None:
    """Kernels may also access ``t``'s storage: a buffer passed to them by its address, not as a tensor."""
    _storages(t, _passed_by_address)


def _storages(v, out):
    if isinstance(v, torch.Tensor):
        s = v.untyped_storage()
        out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    elif isinstance(v, (tuple, list)):
        for u in v:
            _storages(u, out)
    elif isinstance(getattr(v, "base", None), torch.Tensor):  # a TensorDescriptor
        _storages(v.base, out)


def _check(kind, ptrs, mask, itemsize):
    from triton.runtime import interpreter

    checked[0] += 1
    a = np.asarray(ptrs).astype(np.uint64)
    if mask is not None:
        a = a[np.broadcast_to(np.asarray(mask, dtype=bool), a.shape)]
    a = a.ravel()
    if not a.size:
        return
    ok = np.zeros(a.shape, dtype=bool)
    for lo, hi in _ranges:
        ok |= (a >= lo) & (a + itemsize <= hi)
    if not ok.all():
        bad = ", ".join(f"{int(b):#x}" for b in a[~ok][:4])
        raise OutOfBounds(f"{kind} of {int((~ok).sum())} of {a.size} elements outside every tensor argument "
                          f"(e.g. {bad}; arguments {[(hex(lo), hi - lo) for lo, hi in _ranges]}) in program "
                          f"{interpreter.interpreter_builder.grid_idx}")


@contextlib.contextmanager
def memcheck():
    """Check every masked access of the kernels launched inside (interpreter only)."""
    from triton.runtime import interpreter as I

    B = I.InterpreterBuilder
    names = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    orig = {n: getattr(B, n) for n in names}
    call = I.GridExecutor.__call__

    def size(ptrs):
        return np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize

    def load(self, ptrs, mask, *a, **k):
        _check("load", ptrs.data, mask.data, size(ptrs))
        return orig["create_masked_load"](self, ptrs, mask, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        _check("store", ptrs.data, mask.data, size(ptrs))
        return orig["create_masked_store"](self, ptrs, value, mask, *a, **k)

    def rmw(self, op, ptr, val, mask, *a, **k):
        _check("atomic", ptr.data, mask.data, size(ptr))
        return orig["create_atomic_rmw"](self, op, ptr, val, mask, *a, **k)

    def cas(self, ptr, cmp, val, *a, **k):
        _check("atomic_cas", ptr.data, None, size(ptr))
        return orig["create_atomic_cas"](self, ptr, cmp, val, *a, **k)

    def launch(self, *args, **kwargs):
        rs = []
        _storages([*args, *kwargs.values()], rs)
        saved = list(_ranges)
        _ranges[:] = rs + _passed_by_address
        try:
            return call(self, *args, **kwargs)
        finally:
            _ranges[:] = saved

    for n, f in zip(names, (load, store, rmw, cas)):
        setattr(B, n, f)
    I.GridExecutor.__call__ = launch
    try:
        yield
    finally:
        for n, f in orig.items():
            setattr(B, n, f)
        I.GridExecutor.__call__ = call
