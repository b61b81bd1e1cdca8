"""Tuned torch BSR for the headline rows (Llama-3.1-8B MLP, block 64, 90%), in one run with dense and blast.

torch ships no H100/H200 table for its Triton BSR kernels, so ``F.linear`` with a BSR weight runs
untuned; ``torch.sparse._triton_ops_meta.tune_bsr_dense_addmm`` tunes one (weight shape, N, block,
sparsity) in ~40 s and stores the result in the process's table, which ``F.linear`` then uses.
``F.linear(x, W)`` with a BSR ``W`` is ``bsr_dense_mm(W, x^T)`` = ``bsr_dense_addmm(out, W, x^T, beta=0)``:
that is what gets tuned, per M (N of the product; a multiple of 16, so M = 1 is not tunable).

    PYTHONPATH=$PWD python bench/bsr_tuned.py --out bench/results     # GPU, ~6 minutes
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _results import run_meta, write_json  # noqa: E402
from mlp import SHAPES, make_weights, timed  # noqa: E402

from blast_compile.ops import triton_mlp  # noqa: E402
from blast_compile.ops.activations import ACTIVATIONS, dense_mlp  # noqa: E402
from blast_compile.ops.sparse_mlp import weights_plan  # noqa: E402


def bsr_mlp(bs, x, act):
    a = ACTIVATIONS[act](F.linear(x, bs[0]))
    if bs[1] is not None:
        a = a * F.linear(x, bs[1])
    return F.linear(a, bs[2])


def tune(w_bsr, m, dtype):
    """Tune bsr_dense_addmm for F.linear(x[m, in], w_bsr[out, in]); returns seconds spent."""
    from torch.sparse._triton_ops_meta import tune_bsr_dense_addmm

    n_out, n_in = w_bsr.shape
    dense = torch.randn(m, n_in, device="cuda", dtype=dtype).t()  # x^T, as F.linear passes it
    out = torch.empty(n_out, m, device="cuda", dtype=dtype)
    t0 = time.perf_counter()
    tune_bsr_dense_addmm(out, w_bsr, dense, beta=0, alpha=1, out=out, store=True)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--m", default="16,128,1024,4096")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="bsr_tuned_h200.json",
                    help="output file (one process per M keeps a crash in torch's BSR tuner to that M)")
    args = ap.parse_args()
    dtype = torch.bfloat16
    d, h, act, gated = SHAPES[args.shape]
    w1, w3, w2 = make_weights(args.shape, args.sparsity, args.block, dtype, seed=1)
    wargs = (w1, None, w3, None, w2, None)
    plan = weights_plan(torch.empty(1, d, device="cuda", dtype=dtype), *wargs, act, args.block, args.block, "", 1.0)
    bs = tuple(None if t is None else t.to_sparse_bsr((args.block, args.block)) for t in (w1, w3, w2))
    res = run_meta(shape=args.shape, sparsity=args.sparsity, block=args.block, rows=[])
    for m in (int(v) for v in args.m.split(",")):
        x = torch.randn(m, d, device="cuda", dtype=dtype)
        ref = dense_mlp(x.float(), *(None if t is None else t.float() for t in wargs), act)
        row = {"M": m}
        row["dense_us"], _ = timed([lambda: dense_mlp(x, *wargs, act)])
        row["bsr_us"], _ = timed([lambda: bsr_mlp(bs, x, act)])
        row["tune_s"] = tune(bs[0], m, dtype) + tune(bs[2], m, dtype)  # gate/up share a shape
        row["bsr_tuned_us"], _ = timed([lambda: bsr_mlp(bs, x, act)])
        y = bsr_mlp(bs, x, act)
        row["bsr_rel_err"] = float((y.float() - ref).norm() / ref.norm())
        row["blast_us"], _ = timed([lambda: triton_mlp.forward(x, *wargs, plan, act)])
        for k in ("bsr", "bsr_tuned", "blast"):
            row[f"{k}_speedup"] = row["dense_us"] / row[f"{k}_us"]
        res["rows"].append(row)
        print(f"M={m:5d} dense {row['dense_us']:8.1f} bsr {row['bsr_us']:8.1f} ({row['bsr_speedup']:.2f}x) "
              f"bsr tuned {row['bsr_tuned_us']:8.1f} ({row['bsr_tuned_speedup']:.2f}x, tuning {row['tune_s']:.0f} s, "
              f"err {row['bsr_rel_err']:.1e}) blast {row['blast_us']:8.1f} ({row['blast_speedup']:.2f}x)", flush=True)
    write_json(args.out, args.name, res)


if __name__ == "__main__":
    main()
