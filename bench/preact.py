"""Stored vs recomputed pre-activations in the MLP's backward (GPU).

For each shape at M rows, one SwiGLU MLP with random tied block masks (declared, as the sparsifier
does), every kernel tuned first, then CUDA-graph timings (µs, L2 not flushed) of:

* ``fwd``: ``triton_mlp.forward`` as in inference; ``fwd_pre``: also storing a and u (training);
* ``bwd_recompute``: ``triton_mlp.backward`` with nothing saved (one fused kernel recomputes a, u);
* ``bwd_split``: the same, but a and u recomputed by the forward's kernel into a temporary first;
* ``bwd_pre``: reading the stored a and u;

and the fwd+bwd totals of the three ways. Same process, same weights, interleaved repetitions.

    BLAST_CACHE_DIR=$(mktemp -d) python bench/preact.py --out bench/results
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._results import run_meta, write_json  # noqa: E402
from bench.tiles import setup  # noqa: E402
from blast_compile.ops import triton_mlp  # noqa: E402

NEEDS = [True, True, False, True, False, True, False]


def case(shape, m, sparsity, block, reps):
    w1, w3, w2, x, plan = setup(shape, m, sparsity, block)
    dy = torch.randn_like(x)
    pre = torch.empty(2, m, w1.shape[0], device=x.device, dtype=x.dtype)
    ws = (w1, None, w3, None, w2, None)

    def fwd():
        triton_mlp.forward(x, *ws, plan, "silu")

    def fwd_pre():
        triton_mlp.forward(x, *ws, plan, "silu", pre=pre)

    def bwd(p=None):
        triton_mlp.backward(dy, x, *ws, plan, "silu", NEEDS, pre=p)

    def bwd_split():
        triton_mlp.BACKWARD_SPLIT = True
        try:
            bwd()
        finally:
            triton_mlp.BACKWARD_SPLIT = False

    fns = {"fwd": fwd, "fwd_pre": fwd_pre, "bwd_recompute": bwd, "bwd_split": bwd_split,
           "bwd_pre": lambda: bwd(pre)}
    for f in fns.values():  # tune every kind (and compile) before timing
        f()
    torch.cuda.synchronize()
    # (BACKWARD_SPLIT is read at call time: the graph captures the split launches)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(triton_mlp.graph_time([f] * 4, reps=5))
    row = {"shape": shape, "M": m, "sparsity": sparsity, "block": block,
           **{k + "_us": statistics.median(v) for k, v in times.items()}, "all_us": times}
    row["total_recompute_us"] = row["fwd_us"] + row["bwd_recompute_us"]
    row["total_split_us"] = row["fwd_us"] + row["bwd_split_us"]
    row["total_pre_us"] = row["fwd_pre_us"] + row["bwd_pre_us"]
    print(f"{shape:>3} M={m} {sparsity:.0%}: " + "  ".join(f"{k} {row[k + '_us']:.0f}" for k in fns)
          + f"  | fwd+bwd: recompute {row['total_recompute_us']:.0f}, split {row['total_split_us']:.0f}, "
            f"stored {row['total_pre_us']:.0f} µs", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8b,1b")
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--sparsity", default="0.9,0.95")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="h200")
    a = ap.parse_args()
    rows = [case(s, a.m, float(sp), a.block, a.reps) for s in a.shapes.split(",") for sp in a.sparsity.split(",")]
    meta = run_meta(timing="CUDA-graph replay median of 5, 4 calls per graph, L2 not flushed; medians over reps")
    write_json(a.out, f"preact_{a.tag}.json", {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
