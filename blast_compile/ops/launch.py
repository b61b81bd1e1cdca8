"""Launching the generated Triton kernels with less host time.

``kernel[grid](*args, **kw)`` spends most of its host time before the launch itself for our ~40-argument
kernels (``bench/probes/launch_probe.py``): Triton's binder specializes every argument, builds a cache key,
looks the compiled kernel up and makes launch metadata, and only then calls the compiled kernel's C
launcher. Without CUDA graphs the opaque op's call is host-bound (two launches at decode), so that is its
largest host cost. (A lowered op's launches are Inductor's, from its own code; see ``lowering``.)

``Kernel(fn)[grid](*args, **kw)`` launches the same kernel. The first launch for each *fingerprint*
goes through Triton's JIT, which compiles or finds the kernel and returns it; later launches with the
same fingerprint call its launcher directly, as the JIT does. The fingerprint is a superset of what
Triton specializes on, for the argument types we pass: every int by value (Triton specializes on
``== 1``, divisibility by 16 and the integer width), every tensor's dtype and its address modulo 16
(alignment), ``None``/bools/floats by value, every keyword (constexprs, ``num_warps``,
``launch_pdl``...), and the device. Any other argument type (a TMA descriptor), an active launch
hook (a profiler), the interpreter, or a Triton whose compiled kernel lacks the launcher we call:
the JIT launch, always. ``_ON["on"] = False`` turns the direct path off (tests).

``compile_only()``: launches in this thread compile (or find) their kernel and do not run it
(``tune._precompile``: the tuner compiles its candidates on several threads at once).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

log = logging.getLogger("blast_compile.ops")

_MAX_ENTRIES = 4096  # fingerprints kept per kernel (ints by value: M varies at prefill)
_ON = {"on": None}


# Triton's interpreter (TRITON_INTERPRET=1 when Triton was imported: its @jit then builds interpreted functions)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _enabled() -> bool:
    on = _ON["on"]
    if on is None:
        on = _ON["on"] = not INTERPRET
    return on


def _hooks_idle() -> bool:
    """No launch hook wants to see our launches (Triton 3.9 keeps an empty hook chain, not None)."""
    for hook in (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _driver():
    return triton.runtime.driver.active


_THREAD = threading.local()


@contextlib.contextmanager
def compile_only():
    """Launches in this thread only compile their kernel (the interpreter compiles nothing: no-ops)."""
    _THREAD.compile_only = True
    try:
        yield
    finally:
        _THREAD.compile_only = False


class _Unsupported(Exception):
    pass


def _fingerprint(args):
    out = []
    for a in args:
        t = type(a)
        if t is int or t is bool or t is float or a is None:
            out.append(a)  # (bool/float: Triton does not specialize them, by value is a superset)
        elif isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16))
        else:
            raise _Unsupported(t)
    return tuple(out)


# launch options Inductor cannot pass through ``wrap_triton`` (speed only: the result is the same)
_NOT_TRACEABLE = ("launch_pdl", "maxnreg")

# Inside a lowered op's body (``ops/lowered.py``) the launchers run on the fake or functional tensors
# of a trace: every launch goes through ``wrap_triton`` (Inductor then emits it in its own output code),
# every table comes from the op's inputs, every config from what the compile-time warm-up chose.
# ``lowered()`` holds there and in the compile-time warm-up that precedes the trace (real launches, the
# same choices: see ``triton_mlp``), ``traced()`` only in the trace itself.
_TRACE = threading.local()


def traced() -> bool:
    return getattr(_TRACE, "mode", None) == "trace"


def lowered() -> bool:
    return getattr(_TRACE, "mode", None) is not None


@contextlib.contextmanager
def _setting(name, value):
    """This thread's ``_TRACE.<name>`` is ``value`` inside."""
    prev = getattr(_TRACE, name, None)
    setattr(_TRACE, name, value)
    try:
        yield
    finally:
        setattr(_TRACE, name, prev)


def lowering(mode="trace"):
    """``mode``: "trace" (launch through ``wrap_triton``), "warm" (launch now, choose as a trace would),
    None (the eager op)."""
    return _setting("mode", mode)


def recording_uses(ids: set):
    """Inside a lowered op's warm-up: every launch adds the ``id`` of each tensor it passes to ``ids``."""
    return _setting("uses", ids)


def note_uses(args, kw):
    """``recording_uses``: add a launch's tensors."""
    uses = getattr(_TRACE, "uses", None)
    if uses is not None:
        uses.update(id(a) for a in (*args, *kw.values()) if isinstance(a, torch.Tensor))


def one_graph_for_all_rows():
    """``torch.export``: one graph serves every M of the exported range, and a choice made by comparing a
    symbolic M would be a guard the export cannot keep. Inside, M picks the decode kernels only where the whole
    range is decode-sized; the prefill kernels are right at any M."""
    return _setting("one_graph", True)


def one_graph() -> bool:
    return bool(getattr(_TRACE, "one_graph", False))


def rows_at_most(m, k) -> bool:
    """``m <= k``, without a guard on a symbolic ``m`` inside ``one_graph_for_all_rows``."""
    if isinstance(m, torch.SymInt) and one_graph():
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(m <= k)
    return m <= k


class Kernel:
    """A ``@triton.jit`` function whose ``[grid](...)`` launches skip the JIT's binder once seen."""

    __slots__ = ("fn", "names", "defaults", "compiled")

    def __init__(self, fn):
        self.fn = fn
        params = getattr(fn, "params", None)
        self.names = [p.name for p in params] if params is not None else None
        self.defaults = {p.name: p.default for p in params if getattr(p, "has_default", False)} if params else {}
        self.compiled = {}

    def __getattr__(self, name):  # (everything else: the JIT function's)
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launch(grid, args, kw)

    def launch(self, grid, args, kw):
        if lowered():  # a lowered op (or its warm-up, which must time what the trace will launch)
            note_uses(args, kw)
            kw = {k: v for k, v in kw.items() if k not in _NOT_TRACEABLE}
            if traced():  # Inductor emits this launch in its own code
                from torch.library import wrap_triton

                # (its analysis of the kernel wants every parameter given: defaults too)
                given = set(self.names[:len(args)]) | set(kw)
                kw.update({n: v for n, v in self.defaults.items() if n not in given})
                return wrap_triton(self.fn)[tuple(grid)](*args, **kw)
        if getattr(_THREAD, "compile_only", False):
            if not INTERPRET:
                self.fn.run(*args, grid=grid, warmup=True, **kw)
            return
        if not (_enabled() and self.names is not None and _hooks_idle()):
            return self.fn[grid](*args, **kw)
        try:
            driver = _driver()
            device = driver.get_current_device()
            key = (device, _fingerprint(args), tuple(kw.items()))
            hit = self.compiled.get(key)
        except (_Unsupported, TypeError):  # an argument we do not fingerprint, an unhashable keyword
            return self.fn[grid](*args, **kw)
        if hit is None:
            return self._first(grid, args, kw, key)
        run, function, meta, order = hit
        vals = args + tuple(kw[n] if n in kw else self.defaults[n] for n in order)
        g = tuple(grid)
        run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, driver.get_current_stream(device),
            function, meta, None, None, None, *vals)

    def _first(self, grid, args, kw, key):
        """The JIT launch; keep what it returns for the next launches with this fingerprint."""
        k = self.fn.run(*args, grid=grid, warmup=False, **kw)
        try:  # (the JIT launch bound every parameter: each one past args is a keyword or has a default)
            entry = (k.run, k.function, k.packed_metadata, tuple(self.names[len(args):]))
        except AttributeError:  # a Triton whose compiled kernel looks otherwise: stay on the JIT path
            log.info("blast: direct Triton launches unavailable (%s); using the JIT launch", triton.__version__)
            _ON["on"] = False
            return
        if len(self.compiled) >= _MAX_ENTRIES:
            self.compiled.clear()
        self.compiled[key] = entry


# (interpreted kernels too: a ``compile_only`` launch must not run them -- the tuner's threads would run candidates
# at once on one scratch)
_KERNEL_TYPES = (triton.runtime.jit.JITFunction, InterpretedFunction)


class Module:
    """A generated kernel module whose ``@triton.jit`` functions launch through ``Kernel``."""

    def __init__(self, mod):
        self._mod = mod
        self._kernels = {}

    def __getattr__(self, name):
        k = self._kernels.get(name)
        if k is None:
            fn = getattr(self._mod, name)
            k = self._kernels[name] = Kernel(fn) if isinstance(fn, _KERNEL_TYPES) else fn
        return k
