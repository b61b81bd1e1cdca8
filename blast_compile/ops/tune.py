"""The tuner: which launch config (or decode path) a kernel gets, per signature, layer shape and M bucket.

A config comes from the plan's memo, else from the persisted table (``codegen.lookup_config``), else it
is timed now (CUDA only, never inside a lowered op's trace: its warm-up tunes first) and stored.
Kernels here run for a few µs, less than a Python launch, so candidates are timed by CUDA-graph replay
(``graph_time``); decode kernels with a flushed L2, as in a model with many layers.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from .. import codegen
from . import launch, plans
from .launch import traced

log = logging.getLogger("blast_compile.ops")


def _interpret() -> bool:
    return launch.INTERPRET


def _hint(v) -> int:
    """A concrete size: a symbolic one's example value (dynamic M while tracing). Used for tuning keys and
    other choices that only change speed, never the result, so that they add no guard on M."""
    if isinstance(v, torch.SymInt):
        h = v.node.hint
        return int(h) if h is not None else 1 << 12
    return int(v)


def _may_tune() -> bool:
    return not (_interpret() or traced() or os.environ.get("BLAST_TUNE", "1") == "0"
                or torch.cuda.is_current_stream_capturing())


def capture(fns, warm=1):
    """``fns`` (called in order) captured as one CUDA graph, after ``warm`` eager passes on a side
    stream (compiles, tunes, builds plan state outside the graph's pool)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def graph_time(fns, reps=5, warm=1):
    """Median µs per call of ``fns`` (a cycle of calls) replayed as one CUDA graph (``capture``)."""
    g = capture(fns, warm)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / len(fns))
    del g
    return sorted(ts)[len(ts) // 2]


def _graph_time(fn, calls=8, reps=5, cold=True):
    """µs per call of ``fn`` for tuning: decode kernels run for a few µs, less than a Python launch,
    so ``do_bench`` would time the launch. ``cold``: every call follows a write of 2x the L2 (its
    time, timed alone, is subtracted), so weights stream from HBM as in a model with many layers,
    not from a hot L2 as in a loop over one layer."""
    if not cold:
        return graph_time([fn] * calls, reps=reps)
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or (64 << 20)
    flush = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")  # (only while tuning: freed after)
    return (graph_time([lambda: (flush.fill_(1), fn())] * calls, reps=reps)
            - graph_time([lambda: flush.fill_(1)] * calls, reps=reps, warm=0))


@functools.lru_cache(maxsize=None)
def _name_of(index) -> str:
    return torch.cuda.get_device_name(index) if torch.cuda.is_available() else "cpu"


def _device_name(index=None) -> str:
    """The GPU's name (a tuning-key part; cached: it is on every launch's host path)."""
    return _name_of(torch.cuda.current_device() if index is None and torch.cuda.is_available() else index)


def tuning_key(kind, sig, m, shape=()) -> str:
    """Key of a tuned launch config: kernel kind, signature, layer dims, M bucket, GPU name."""
    dims = "x".join(str(int(d)) for d in shape)
    return f"{kind}|{sig.digest()}|{dims}|m{codegen.m_bucket(_hint(m))}|{_device_name()}"


# a list to collect every timing the tuner takes, as (key, config, µs) (bench/tiles.py); None: off
TUNE_RECORD = None


def _memo_key(*parts):
    """Key of a choice remembered in a plan's cache (``_choose``'s configs, ``_decode``'s path): its
    parts, the kernel dir and the lookup function (a patched lookup -- tests -- is honoured)."""
    return (*parts, codegen.get_kernel_dir(), codegen.lookup_config)


# threads compiling a tuner's candidates at once (BLAST_COMPILE_THREADS; 1: one by one, as they are timed)
COMPILE_THREADS = int(os.environ.get("BLAST_COMPILE_THREADS", str(min(16, os.cpu_count() or 1))))


def _precompile(configs, run):
    """Compile every candidate config of a kernel on several threads before they are timed one by one:
    tuning a new shape is mostly compiling (~1 s a config, 20-40 configs a kernel, six kernels), and
    Triton's compiler passes and ptxas run outside the GIL (two threads on two cores: 1.6x). The
    threads run ``run(cfg)`` with ``launch.compile_only`` (nothing executes); a config that does not
    compile is left to fail again where it is timed."""
    n = min(COMPILE_THREADS, len(configs))
    if n <= 1:
        return
    from concurrent.futures import ThreadPoolExecutor

    cuda = torch.cuda.is_available()
    # the caller's device and stream (torch work in ``run``, such as a scratch reset, stays in its order)
    where = (torch.cuda.current_device(), torch.cuda.current_stream()) if cuda else None
    on_worker = getattr(plans._ON_WORKER, "on", False)  # (so outside_graph_pool does not wait on itself)

    def one(cfg):
        plans._ON_WORKER.on = on_worker
        try:
            with contextlib.ExitStack() as ctx:
                if where is not None:
                    ctx.enter_context(torch.cuda.device(where[0]))
                    ctx.enter_context(torch.cuda.stream(where[1]))
                ctx.enter_context(launch.compile_only())
                run(cfg)
        except Exception as e:
            log.debug("blast: precompiling %s failed: %r", cfg, e)

    with ThreadPoolExecutor(n, thread_name_prefix="blast-compile") as ex:
        list(ex.map(one, configs))


def _choose(kind, sig, m, configs, run, graph="hot", shape=(), memo=None):
    """Launch config for (kernel, signature, shape, M bucket): persisted table, else tune now (CUDA
    only). Timed by CUDA-graph replay: a Triton launch with ~35 arguments costs ~20-50 µs of host
    time, more than many of these kernels run, so back-to-back launches (``do_bench``) would time
    the host. ``graph="cold"``: L2 flushed between calls (decode: weights stream from HBM);
    ``"hot"``: not (prefill/backward, like do_bench). The signature is shared by every MLP of a
    block shape and dtype, so the layer's dims are part of the key.

    ``memo``: a plan's cache, which then remembers what the table or the tuner gave, so that later
    calls skip the key string (host time: a call without CUDA graphs is host-bound). Its key holds
    the signature's id (the plan keeps the signature alive): ``_memo_key``. ``configs``: a list, or
    a function returning it, called only when neither the memo nor the table has the answer."""
    mk = None
    if memo is not None:
        mk = _memo_key("chosen", kind, id(sig), codegen.m_bucket(_hint(m)), shape)
        cfg = memo.get(mk)
        if cfg is not None:
            return cfg
    key = tuning_key(kind, sig, m, shape)
    cfg = codegen.lookup_config(key)
    if cfg is not None:
        cfg = tuple(cfg)
        if mk is not None:
            memo[mk] = cfg
        return cfg
    if callable(configs):
        configs = configs()
    if traced() and len(configs) > 1:  # (the warm-up tunes before the trace: a miss here is a bug, not a crash)
        log.warning("blast: no tuned config for %s while tracing; using %s", key, configs[0])
    if len(configs) == 1 or not _may_tune():
        return configs[0]
    _precompile(configs, run)
    times = []
    for c in configs:
        try:
            t = _graph_time(lambda: run(c), cold=graph == "cold")
            times.append((t, c))
            if TUNE_RECORD is not None:
                TUNE_RECORD.append((key, c, t))
        except Exception as e:  # a config that does not compile (e.g. too much shared memory)
            log.debug("blast: config %s failed: %r", c, e)
    best = min(times)[1] if times else configs[0]
    codegen.store_config(key, list(best))
    if mk is not None:
        memo[mk] = tuple(best)
    log.info("blast: tuned %s -> %s", key, best)
    return best
