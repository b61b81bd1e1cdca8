"""Decode-only A/B (GPU): split-K decode time per launch config and finisher read mode, no dense/prefill
(the split-K path is forced: ``BLAST_DECODE=splitk``; bench/profile_decode.py compares the two paths).

    PYTHONPATH=$PWD python bench/decode_ab.py [--sweep]

For the headline cases (8B/1B, 90/95 %, b64) and M = 1, 16: rel. error, the tuned config's time with
relaxed vs acquire finisher reads, and (``--sweep``) every config of ``DECODE_CONFIGS`` (8B 90 %).
Same timing method as bench/mlp.py (CUDA-graph replays cycling weight copies >= 256 MB).
"""
import os
import sys

import torch

os.environ["BLAST_DECODE"] = "splitk"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mlp import ROTATE_BYTES, SHAPES, _wargs, graph_time, make_weights  # noqa: E402

from blast_compile import codegen  # noqa: E402
from blast_compile.formats import block_bytes, cdiv  # noqa: E402
from blast_compile.ops import triton_mlp  # noqa: E402
from blast_compile.ops.activations import dense_mlp  # noqa: E402
from blast_compile.ops.sparse_mlp import resolve  # noqa: E402


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
    for m in ms:
        xs = [torch.randn(m, d, device="cuda", dtype=dtype) for _ in sets]
        fns = [lambda s=s, p=p, x=x: triton_mlp.forward(x, *_wargs(s), p, act) for s, p, x in zip(sets, plans, xs)]
        y = fns[0]()
        ref = dense_mlp(xs[0].float(), *(None if t is None else t.float() for t in _wargs(sets[0])), act)
        err = float((y.float() - ref).norm() / ref.norm())
        tkey = triton_mlp.tuning_key("decode2", sig, m, (d, h, d))
        cfg = codegen.lookup_config(tkey)
        res = {}
        for mode in (True, False):
            triton_mlp.DECODE_RELAXED_READ = mode
            res["relaxed" if mode else "acquire"] = graph_time(fns)
        triton_mlp.DECODE_RELAXED_READ = True
        print(f"{shape:12s} s={sp:.2f} M={m:3d} err {err:.1e} cfg {cfg} relaxed {res['relaxed']:6.1f} us  "
              f"acquire {res['acquire']:6.1f} us  (live {live / 2**20:.1f} MB)", flush=True)
        if sweep:
            parts = []
            for c in triton_mlp.DECODE_CONFIGS:
                codegen.store_config(tkey, list(c))
                parts.append(f"{c}:{graph_time(fns):.1f}")
            codegen.store_config(tkey, list(cfg))
            print("   sweep " + "  ".join(parts), flush=True)
    del sets, plans
    torch.cuda.empty_cache()


CASES = (("llama3.1-8b", 0.9), ("llama3.1-8b", 0.95), ("llama3.2-1b", 0.9), ("llama3.2-1b", 0.95))

if __name__ == "__main__":
    sweep = "--sweep" in sys.argv
    for shape, sp in CASES:
        case(shape, sp, sweep=sweep and sp == 0.9)
