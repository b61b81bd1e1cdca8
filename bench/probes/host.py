"""Host cost of one ``blast::sparse_mlp`` call (GPU): what a call spends in Python before the GPU
gets its kernels, against the GPU time of the same call.

Without CUDA graphs a layer's wall time is max(host, GPU); round 10's e2e prefill (1B shape, 16
layers, 2048 tokens) was host-bound. Per M, for one MLP: host µs per call (launches are
asynchronous, so the Python call's duration is its host time while the launch queue has room) of
the op, of its Python body (no dispatcher) and of ``triton_mlp.forward``, TMA on and off, direct
launches (``ops/launch.py``) and Triton's JIT launch (``_jit``),
interleaved; GPU µs per call (CUDA-graph replay); and where the op's time goes (``Timers``:
wall-clock wrappers around its functions and Triton's launch). The same breakdown inside the
compiled e2e model's default-mode prefill (``--layers``, 0: skip). A cProfile of the calls is kept
for reference only: it charged ~0.5 ms a call to custom_op's ``backend_impl`` that no timer saw.

    BLAST_CACHE_DIR=$(mktemp -d) python bench/probes/host.py --out bench/results
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

from bench._results import run_meta, write_json  # noqa: E402
from bench.tiles import setup  # noqa: E402
from blast_compile.ops import configs, launch, triton_mlp, tune  # noqa: E402
from blast_compile.ops.sparse_mlp import sparse_mlp  # noqa: E402


def host_us(fn, calls):
    """Median µs of the Python call ``fn()`` (no synchronization inside the timed window)."""
    ts = []
    for i in range(calls):
        if i % 32 == 0:
            torch.cuda.synchronize()  # keep the launch queue short
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return sorted(ts)[len(ts) // 2] * 1e6


def profile(fn, calls, top):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def case(shape, m, calls, top, rounds=5):
    """Host µs per call of the op, of its Python body (no dispatcher), of ``triton_mlp.forward``,
    each with TMA tiles on and off, interleaved over ``rounds`` (the median of round medians);
    GPU µs per call (graph replay); a cProfile of the op's calls."""
    w1, w3, w2, x, plan = setup(shape, m, 0.9, 64)
    key = plan.pattern.key
    op = torch.ops.blast.sparse_mlp
    args = (x, w1, None, w3, None, w2, None, "silu", 64, 64, key, 1.0)
    fns = {"op": lambda: op(*args), "body": lambda: sparse_mlp._init_fn(*args),
           "forward": lambda: triton_mlp.forward(x, w1, None, w3, None, w2, None, plan, "silu")}
    res = {}
    with torch.no_grad():
        for tma in (True, False):
            configs.TMA = tma
            ref = fns["op"]()  # tunes, builds the plan's tables
            torch.cuda.synchronize()
            res[f"gpu_tma{int(tma)}"] = tune.graph_time([fns["forward"]] * 8)
            torch.testing.assert_close(fns["forward"](), ref)
        got = {}
        for _ in range(rounds):  # interleaved: the machine's host speed drifts by up to 2x over minutes
            for tma in (True, False):
                configs.TMA = tma
                for fast in (True, False):  # direct launches (ops/launch.py) or Triton's JIT launch
                    launch._ON["on"] = fast
                    for name, fn in fns.items():
                        key = f"{name}_tma{int(tma)}{'' if fast else '_jit'}"
                        got.setdefault(key, []).append(host_us(fn, calls))
        res.update({k: sorted(v)[len(v) // 2] for k, v in got.items()})
        configs.TMA = True
        launch._ON["on"] = None
        prof = profile(fns["op"], calls, top)
        tm = Timers()
        try:
            res["breakdown"] = tm.measure(fns["op"], calls)
        finally:
            tm.undo()
        print(f"M={m} op host breakdown (µs per call, calls):", res["breakdown"], flush=True)
    configs.TMA = True
    print(f"{shape} M={m}: " + ", ".join(f"{k} {v:.0f}" for k, v in res.items() if k != "breakdown"), flush=True)
    print(prof, flush=True)
    return dict(shape=shape, M=m, **res, profile=prof)


class Timers:
    """Wall time inside chosen functions (module attributes, so callers pick up the wrappers),
    accumulated per name while ``on``: where a call's host time goes, without cProfile's
    distortion of C-heavy code."""

    def __init__(self):
        import triton.runtime.jit as jit

        from blast_compile.ops import sparse_mlp as sm

        self.acc, self.on, self._undo = {}, False, []
        for mod, name in ((sm, "weights_plan"), (sm, "_cuda_forward"), (triton_mlp, "_forward"), (triton_mlp, "_choose"),
                          (triton_mlp, "_descs"), (triton_mlp, "_tma_ok"), (triton_mlp, "_decode"),
                          (jit.JITFunction, "run"), (launch.Kernel, "launch"), (torch, "zeros"), (torch, "empty")):
            self._wrap(mod, name)

    def _wrap(self, mod, name):
        fn = getattr(mod, name)
        acc = self.acc

        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t = time.perf_counter_ns()
            try:
                return fn(*a, **k)
            finally:
                s = acc.setdefault(name, [0, 0])
                s[0] += time.perf_counter_ns() - t
                s[1] += 1

        setattr(mod, name, timed)
        self._undo.append((mod, name, fn))

    def measure(self, fn, calls):
        """(host µs per call, {name: (µs per call, calls per call)})."""
        self.acc.clear()
        torch.cuda.synchronize()
        self.on = True
        t = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        total = (time.perf_counter_ns() - t) / calls / 1e3
        self.on = False
        torch.cuda.synchronize()
        return total, {k: (round(v[0] / calls / 1e3, 1), v[1] / calls) for k, v in self.acc.items()}

    def undo(self):
        for mod, name, fn in reversed(self._undo):
            setattr(mod, name, fn)


def e2e_profile(layers, tokens, reps, top):
    """Default-mode (no CUDA graphs) prefill of the e2e model under backend="blast" and Inductor:
    wall ms per call and a cProfile of ``reps`` calls of blast's."""
    from types import SimpleNamespace

    from bench.e2e import build, median_seconds

    model, cfg, _ = build(SimpleNamespace(small=False, layers=layers, sparsity=0.9, block=64), "cuda", torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda")
    out = {}
    for name in ("inductor", "blast"):
        torch._dynamo.reset()
        fn = torch.compile(model, backend=name)
        call = lambda: fn(ids, use_cache=False).logits  # noqa: E731
        out[f"{name}_ms"] = median_seconds(call, "cuda", reps) * 1e3
        with torch.no_grad():  # host ms: the call returns once its launches are queued
            out[f"{name}_host_ms"] = host_us(call, reps) / 1e3
        if name == "blast":
            with torch.no_grad():
                out["blast_profile"] = profile(call, reps, top)
                tm = Timers()
                try:
                    out["blast_breakdown"] = tm.measure(call, reps)
                finally:
                    tm.undo()
                print("blast prefill host breakdown (µs per forward, calls):", out["blast_breakdown"], flush=True)
        print(f"e2e prefill {tokens} {name}: {out[f'{name}_ms']:.2f} ms (host {out[f'{name}_host_ms']:.2f})",
              flush=True)
    print(out["blast_profile"], flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1b")
    p.add_argument("--ms", default="1,16,2048")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--tag", default="")
    p.add_argument("--layers", type=int, default=16, help="e2e model layers (0: skip the e2e profile)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    rows = [case(args.shape, m, args.calls, args.top) for m in map(int, args.ms.split(","))]
    e2e = e2e_profile(args.layers, args.tokens, 5, args.top) if args.layers else None
    write_json(args.out, f"host_{torch.cuda.get_device_name().split()[-1].lower()}{args.tag}.json",
               run_meta(bench="host", rows=rows, e2e=e2e))


if __name__ == "__main__":
    main()
