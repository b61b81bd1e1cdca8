"""Decode-only A/B (GPU): both decode paths with and without the early-launched kernel 2 (PDL) and its
L2 prefetch of W2, no dense/prefill. bench/profile_decode.py has the floors.

    PYTHONPATH=$PWD python bench/decode_ab.py [--sweep] [--out DIR]

For the headline cases (8B/1B, 90/95 %, b64) and M = 1, 16, per path (split-K, sliced): rel. error and
the time of the tuned config for each variant -- ``plain`` (split-K: no PDL; sliced: PDL, as before the
prefetch existed), ``pdl`` (split-K only: PDL, no prefetch), ``prefetch`` (PDL + L2 prefetch, the
default) -- and (``--sweep``, 8B 90 %) every split-K config. Same timing method as bench/mlp.py
(CUDA-graph replays cycling weight copies >= 256 MB).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import run_meta, write_json  # noqa: E402
from mlp import ROTATE_BYTES, SHAPES, _wargs, graph_time, make_weights  # noqa: E402

from blast_compile import codegen  # noqa: E402
from blast_compile.formats import block_bytes, cdiv  # noqa: E402
from blast_compile.ops import triton_mlp  # noqa: E402
from blast_compile.ops.activations import dense_mlp  # noqa: E402
from blast_compile.ops.sparse_mlp import resolve  # noqa: E402

# variant -> (BLAST_PDL, prefetch); split-K had no PDL before, the sliced path had PDL without prefetch
VARIANTS = {"splitk": {"plain": ("0", False), "pdl": ("1", False), "prefetch": ("1", True)},
            "sliced": {"plain": ("1", False), "prefetch": ("1", True)}}


def _variant(pdl, prefetch):
    os.environ["BLAST_PDL"] = pdl
    triton_mlp.DECODE_PREFETCH = prefetch


def case(shape, sp, block=64, ms=(1, 16), sweep=False, dtype=torch.bfloat16):
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
            row = {"shape": shape, "sparsity": sp, "M": m, "path": path, "live_MB": live / 2**20}
            for name, (pdl, pf) in variants.items():
                _variant(pdl, pf)
                y = fns[0]()  # (tunes the config on first use, with this variant)
                row[f"err_{name}"] = float((y.float() - ref).norm() / ref.norm())
                row[f"us_{name}"] = graph_time(fns)
            row["gbps_prefetch"] = live / row["us_prefetch"] / 1e3
            rows.append(row)
            print(f"{shape:12s} s={sp:.2f} M={m:3d} {path:6s} " + "  ".join(
                f"{k[3:]} {v:6.1f} us" for k, v in row.items() if k.startswith("us_"))
                + f"  ({row['gbps_prefetch']:.0f} GB/s, err {row['err_prefetch']:.1e})", flush=True)
        if sweep and m == 1:
            os.environ["BLAST_DECODE"] = "splitk"
            _variant("1", True)
            tkey = triton_mlp.tuning_key("decode2", sig, m, (d, h, d))
            cfg = codegen.lookup_config(tkey)
            parts = []
            for c in triton_mlp.DECODE_CONFIGS:
                codegen.store_config(tkey, list(c))
                parts.append(f"{c}:{graph_time(fns):.1f}")
            codegen.store_config(tkey, list(cfg))
            print("   sweep (split-K, prefetch) " + "  ".join(parts), flush=True)
    os.environ.pop("BLAST_DECODE", None)
    _variant("1", True)
    del sets, plans
    torch.cuda.empty_cache()
    return rows


CASES = (("llama3.1-8b", 0.9), ("llama3.1-8b", 0.95), ("llama3.2-1b", 0.9), ("llama3.2-1b", 0.95))

if __name__ == "__main__":
    sweep = "--sweep" in sys.argv
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    rows = []
    for shape, sp in CASES:
        rows += case(shape, sp, sweep=sweep and sp == 0.9)
    if out:
        write_json(out, "decode_ab.json", {"meta": run_meta(), "rows": rows})
