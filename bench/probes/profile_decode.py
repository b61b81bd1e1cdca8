"""Decode profile helper (GPU): floors to compare the decode kernels against, and a region for ncu.

    PYTHONPATH=$PWD python bench/probes/profile_decode.py            # graph-timed floors + decode times
    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \
        python bench/probes/profile_decode.py --ncu                  # counters of one decode call per case

Floors (CUDA-graph replays, weights cycled through >= 256 MB as bench/mlp.py): an empty kernel,
two dependent empty kernels, and a one-launch streaming read of the same live bytes.
"""
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from mlp import ROTATE_BYTES, _wargs, graph_time, make_weights, SHAPES  # noqa: E402

from blast_compile import codegen  # noqa: E402
from blast_compile.formats import block_bytes, cdiv  # noqa: E402
from blast_compile.ops import triton_mlp  # noqa: E402
from blast_compile.ops.activations import dense_mlp  # noqa: E402
from blast_compile.ops.sparse_mlp import resolve  # noqa: E402


@triton.jit
def _empty(p):
    pass


@triton.jit
def _stream(p, out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(p + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.atomic_add(out, tl.sum(v, 0), sem="relaxed")


def floors(nbytes):
    z = torch.zeros(1, device="cuda")
    t0 = graph_time([lambda: _empty[(1,)](z)] * 8)
    t1 = graph_time([lambda: (_empty[(1,)](z), _empty[(1,)](z))] * 8)
    n = nbytes // 2
    bufs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, ROTATE_BYTES // nbytes))]
    res = {"empty_1": t0, "empty_2": t1}
    for blk in (4096, 8192, 16384):
        res[f"stream_{blk}"] = graph_time([lambda b=b, blk=blk: _stream[(cdiv(n, blk),)](b, z, n, BLOCK=blk, num_warps=8)
                                           for b in bufs])
    return res


def case(shape, sp, ms, ncu):
    d, h, act, gated = SHAPES[shape]
    dt = torch.bfloat16
    w1, w3, w2 = make_weights(shape, sp, 64, dt, seed=1)
    p0 = resolve(torch.empty(1, d, device="cuda", dtype=dt), w1, None, w3, None, w2, None, act, 64, 64, "", 1.0)
    live = block_bytes(p0.pattern, 2, gated)
    n = max(2, min(24, cdiv(ROTATE_BYTES, live)))
    sets = [(w1, w3, w2)] + [tuple(t.clone() for t in (w1, w3, w2)) for _ in range(n - 1)]
    plans = [resolve(torch.empty(1, d, device="cuda", dtype=dt), a, None, c, None, b, None, act, 64, 64,
                     p0.pattern.key, 1.0) for a, c, b in sets]
    fl = None if ncu else floors(live)
    for m in ms:
        xs = [torch.randn(m, d, device="cuda", dtype=dt) for _ in sets]
        fns = [lambda s=s, p=p, x=x: triton_mlp.forward(x, *_wargs(s), p, act) for s, p, x in zip(sets, plans, xs)]
        fns[0]()
        torch.cuda.synchronize()
        if ncu:
            torch.cuda.profiler.start()
            fns[1]()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        else:
            t = {}
            for name, mode, pdl in (("auto", "", "1"), ("sliced", "sliced", "1"), ("sliced-no-pdl", "sliced", "0"),
                                    ("splitk", "splitk", "1")):
                os.environ["BLAST_DECODE"], os.environ["BLAST_PDL"] = mode, pdl
                t[name] = graph_time(fns)
            os.environ["BLAST_DECODE"], os.environ["BLAST_PDL"] = "", "1"
            y = fns[0]()
            ref = dense_mlp(xs[0].float(), *(None if w is None else w.float() for w in _wargs(sets[0])), act)
            t["rel_err"] = float((y.float() - ref).norm() / ref.norm())
            if SWEEP:
                sig = triton_mlp._module(plans[0], act, gated, False, False, dt)[0]
                for kind in ("dec_h", "dec_y"):
                    key = triton_mlp.tuning_key(kind, sig, m, (d, h, d))
                    best = codegen.lookup_config(key)
                    parts = []
                    for c in triton_mlp.DECODE_SLICE_CONFIGS + EXTRA:
                        codegen.store_config(key, list(c))
                        parts.append(f"{c}:{graph_time(fns):.1f}")
                    codegen.store_config(key, list(best))
                    print(f"   {kind} tuned {best}: " + "  ".join(parts), flush=True)
            print(f"{shape} s={sp} M={m} live {live / 2**20:.1f} MB decode "
                  + " ".join(f"{k} {v:.3g}" for k, v in t.items()) + " | floors "
                  + " ".join(f"{k} {v:.1f}" for k, v in fl.items()), flush=True)


SWEEP = "--sweep" in sys.argv
EXTRA = [(16, 8, 2, 1), (16, 16, 4, 1), (32, 8, 4, 1), (16, 2, 2, 1), (16, 1, 2, 1), (16, 1, 1, 1), (64, 4, 4, 1),
         (64, 1, 4, 3), (64, 8, 8, 1), (32, 1, 4, 3)]

if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("blast_compile.ops").setLevel(logging.INFO)
    ncu = "--ncu" in sys.argv
    case("llama3.1-8b", 0.9, (1, 16), ncu)
    if not SWEEP:
        case("llama3.1-8b", 0.95, (1, 16), ncu)
        case("llama3.2-1b", 0.9, (1, 16), ncu)
    case("llama3.2-1b", 0.95, (1,), ncu)
