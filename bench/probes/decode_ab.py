"""Decode-only A/B (GPU): the decode variants of both paths, no dense/prefill. bench/probes/profile_decode.py
has the floors.

    PYTHONPATH=$PWD python bench/probes/decode_ab.py [--sweep] [--reps N] [--out DIR]

For the headline cases (8B/1B, 90/95 %, b64) and M = 1, 16, per path (split-K, sliced): rel. error and
the time of the tuned config for each variant in ``VARIANTS`` -- split-K: ``tuned`` (the default: tuned
chunk sizes, warps and early launch/prefetch; GEMV at M = 1), ``no_pdl`` (that config with kernel 2
launched after kernel 1), ``csr`` (CSR chunk tables instead of flat ones), ``dots`` (M = 1: 16-row
tensor-core tiles instead of the GEMV, its own tuning); sliced: ``plain`` (PDL without prefetch),
``prefetch`` (the default). Variants sharing a tuning key run the config tuned for the first of them.
Each variant is timed ``--reps`` times (default 3), interleaved, and reported as the median with the
spread. ``--sweep`` (8B 90 %, M = 1): every split-K config, GEMV and dots. Same timing method as
bench/mlp.py (CUDA-graph replays cycling weight copies >= 256 MB).
"""
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _results import run_meta, write_json  # noqa: E402
from mlp import ROTATE_BYTES, SHAPES, _wargs, graph_time, make_weights  # noqa: E402

from blast_compile import codegen  # noqa: E402
from blast_compile.formats import block_bytes, cdiv  # noqa: E402
from blast_compile.ops import triton_mlp  # noqa: E402
from blast_compile.ops.activations import dense_mlp  # noqa: E402
from blast_compile.ops.sparse_mlp import resolve  # noqa: E402

DEFAULT = dict(pdl="1", prefetch=True, flat=True, gemv=1)
VARIANTS = {"splitk": {"tuned": {}, "no_pdl": dict(pdl="0"), "csr": dict(flat=False), "dots": dict(gemv=0)},
            "sliced": {"plain": dict(prefetch=False), "prefetch": {}}}


def _variant(pdl="1", prefetch=True, flat=True, gemv=1):
    os.environ["BLAST_PDL"] = pdl
    triton_mlp.DECODE_PREFETCH = prefetch
    triton_mlp.DECODE_FLAT = flat
    triton_mlp.GEMV_MAX_M = gemv


def case(shape, sp, block=64, ms=(1, 16), sweep=False, reps=3, dtype=torch.bfloat16):
    d, h, act, gated = SHAPES[shape]
    w1, w3, w2 = make_weights(shape, sp, block, dtype, seed=1)
    plan0 = resolve(torch.empty(1, d, device="cuda", dtype=dtype), w1, None, w3, None, w2, None, act, block, block, "", 1.0)
    live = block_bytes(plan0.pattern, 2, gated)
    n = max(2, min(24, cdiv(ROTATE_BYTES, live)))
    sets = [(w1, w3, w2)] + [tuple(t.clone() for t in (w1, w3, w2)) for _ in range(n - 1)]
    key = plan0.pattern.key
    plans = [resolve(torch.empty(1, d, device="cuda", dtype=dtype), a, None, c, None, b, None, act, block, block, key, 1.0)
             for a, c, b in sets]
    sig = triton_mlp._module(plans[0], act, gated, False, False, dtype)[0]
    rows = []
    for m in ms:
        xs = [torch.randn(m, d, device="cuda", dtype=dtype) for _ in sets]
        fns = [lambda s=s, p=p, x=x: triton_mlp.forward(x, *_wargs(s), p, act) for s, p, x in zip(sets, plans, xs)]
        ref = dense_mlp(xs[0].float(), *(None if t is None else t.float() for t in _wargs(sets[0])), act)
        for path, variants in VARIANTS.items():
            os.environ["BLAST_DECODE"] = path
            names = [v for v in variants if not (v == "dots" and m > 1)]
            row = {"shape": shape, "sparsity": sp, "M": m, "path": path, "live_MB": live / 2**20}
            times = {v: [] for v in names}
            for r in range(reps):
                for name in names:
                    _variant(**{**DEFAULT, **variants[name]})
                    if r == 0:
                        y = fns[0]()  # (tunes the config on first use of its key)
                        row[f"err_{name}"] = float((y.float() - ref).norm() / ref.norm())
                    times[name].append(graph_time(fns))
            for name in names:
                row[f"us_{name}"] = statistics.median(times[name])
                row[f"spread_{name}"] = max(times[name]) - min(times[name])
            if path == "splitk":  # the tuned config (chunks in / down, warps, early mode)
                row["config"] = codegen.lookup_config(triton_mlp.tuning_key(
                    "decode2g" if m <= DEFAULT["gemv"] else "decode2", sig, m, (d, h, d)))
            best = min(names, key=lambda v: row[f"us_{v}"])
            row["best"] = best
            row["gbps_best"] = live / row[f"us_{best}"] / 1e3
            rows.append(row)
            print(f"{shape:12s} s={sp:.2f} M={m:3d} {path:6s} " + "  ".join(
                f"{v} {row[f'us_{v}']:6.1f}±{row[f'spread_{v}'] / 2:.1f}" for v in names)
                + f"  (best {best}: {row['gbps_best']:.0f} GB/s) {row.get('config', '')}", flush=True)
        if sweep and m == 1:
            os.environ["BLAST_DECODE"] = "splitk"
            for name, kind, configs in (("tuned", "decode2g", triton_mlp.DECODE_GEMV_CONFIGS),
                                        ("dots", "decode2", triton_mlp.DECODE_CONFIGS)):
                _variant(**{**DEFAULT, **VARIANTS["splitk"][name]})
                tkey = triton_mlp.tuning_key(kind, sig, m, (d, h, d))
                cfg = codegen.lookup_config(tkey)
                parts = []
                for c in configs:
                    codegen.store_config(tkey, list(c))
                    parts.append(f"{c}:{graph_time(fns):.1f}")
                codegen.store_config(tkey, list(cfg))
                print(f"   sweep (split-K, {name}) " + "  ".join(parts), flush=True)
    os.environ.pop("BLAST_DECODE", None)
    _variant(**DEFAULT)
    del sets, plans
    torch.cuda.empty_cache()
    return rows


CASES = (("llama3.1-8b", 0.9), ("llama3.1-8b", 0.95), ("llama3.2-1b", 0.9), ("llama3.2-1b", 0.95))

if __name__ == "__main__":
    sweep = "--sweep" in sys.argv
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 3
    rows = []
    for shape, sp in CASES:
        rows += case(shape, sp, sweep=sweep and sp == 0.9 and shape == "llama3.1-8b", reps=reps)
    if out:
        write_json(out, "decode_ab.json", {"meta": run_meta(), "rows": rows})
