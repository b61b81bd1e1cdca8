"""Where a Triton launch's host time goes (GPU): the JIT launch ``k[grid](...)`` of a kernel with
as many arguments as ours (~40: pointers, strides, flags, constexprs) against its parts -- the binder
(specialization of every argument), the cache key, and ``CompiledKernel.run`` (the C launcher) called
directly -- and against a 4-argument kernel. Round 11 measured ~60 µs per launch of our decode
kernels inside the op; this says how much of it a launcher of our own could save.

    python bench/probes/launch_probe.py --out bench/results
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

from bench._results import run_meta, write_json  # noqa: E402
from bench.probes.host import host_us  # noqa: E402

CALLS = 2000  # launches timed per row (median)


@triton.jit
def small(x, y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)


@triton.jit
def wide(x, sx, y, sy, m, d_in, d_h, w1, o1, s10, s11, w3, o3, s30, s31, cols, a0, a1, a2, n_in, z, sz, b2, e,
         d_out, flag, f1, g, sg, h, sh, k0, k1, k2, k3, c0, c1, c2, c3,
         CH: tl.constexpr, HAS_B: tl.constexpr, PDL: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x + o * sx, mask=o < m) + m + d_in + d_h + n_in + d_out + f1 + k0 + k1 + k2 + k3
    tl.store(y + o * sy, v, mask=o < m)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    dev = "cuda"
    x = torch.randn(4096, device=dev)
    y = torch.empty_like(x)
    t = [torch.randn(64, device=dev) for _ in range(12)]
    wide_args = (x, 1, y, 1, 64, 2048, 8192, t[0], t[1], 64, 1, t[2], t[3], 64, 1, t[4], 3, 5, 7, 11, t[5], 1,
                 t[6], t[7], 2048, t[8], 1, t[9], 64, t[10], 64, 13, 17, 19, 23, t[11], t[0], t[1], t[2])
    kw = dict(CH=2, HAS_B=False, PDL=False, FLAT=True, BLOCK=64)
    res = dict(run_meta(), bench="launch_probe", rows={})

    def jit_small():
        small[(1,)](x, y, 64, BLOCK=64)

    def jit_wide():
        wide[(1,)](*wide_args, **kw)

    for name, fn in (("jit_small", jit_small), ("jit_wide", jit_wide)):
        fn()
        res["rows"][name] = host_us(fn, CALLS)
    # the parts of JITFunction.run (Triton internals: recorded, not relied on by the product)
    try:
        device = triton.runtime.driver.active.get_current_device()
        stream = triton.runtime.driver.active.get_current_stream(device)
        caches = wide.device_caches[device]
        binder = caches[-1]
        opt = dict(kw, debug=False)  # what run() adds to the kwargs differs by version: try the 3.9 set first
        for extra in (dict(instrumentation_mode=triton.knobs.compilation.instrumentation_mode,
                           fpsan_homomorphic_casts=getattr(triton.knobs.compilation, "fpsan_homomorphic_casts", None)),
                      dict(instrumentation_mode=getattr(triton.knobs.compilation, "instrumentation_mode", None)), {}):
            try:
                bound, spec, opts = binder(*wide_args, **opt, **extra)
                opt.update(extra)
                break
            except TypeError:
                continue
        res["rows"]["binder_wide"] = host_us(lambda: binder(*wide_args, **opt), CALLS)
        kern = wide.run(*wide_args, grid=(1,), warmup=False, **kw)
        vals = tuple(bound.values())
        res["rows"]["n_bound_args"] = len(vals)
        launch = (kern.run, kern.function, kern.packed_metadata)

        def direct():
            launch[0](1, 1, 1, stream, launch[1], launch[2], None, None, None, *vals)

        direct()
        torch.cuda.synchronize()
        res["rows"]["compiled_run_wide"] = host_us(direct, CALLS)

        def stream_and_run():
            s = triton.runtime.driver.active.get_current_stream(device)
            launch[0](1, 1, 1, s, launch[1], launch[2], None, None, None, *vals)

        res["rows"]["stream_plus_compiled_run_wide"] = host_us(stream_and_run, CALLS)
        res["rows"]["torch_current_stream"] = host_us(lambda: torch.cuda.current_stream().cuda_stream, CALLS)
    except Exception as e:  # report, don't hide
        res["rows"]["parts_error"] = f"{type(e).__name__}: {e}"
    src = inspect.getsource(triton.runtime.jit.JITFunction.run)
    res["jit_run_source_tail"] = src[-1200:]
    for k, v in res["rows"].items():
        print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    write_json(args.out, f"launch_probe{args.tag}.json", res)


if __name__ == "__main__":
    main()
