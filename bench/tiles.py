"""Tile-config sweep: every prefill/backward launch config the tuner tries, per kernel (GPU).

For each shape and M, one SwiGLU MLP with random tied block masks (declared, as the sparsifier
does) runs ``triton_mlp.forward`` (keeping for the backward what ``--keep`` says: by default H and the
pre-activations, the training path at 8B 90 %) and ``triton_mlp.backward`` once with tuning on; the tuner's
own timings (``tune.TUNE_RECORD``: CUDA-graph replays, L2 not flushed) are grouped by kernel
kind, and the best narrow (wide=0) and wide (wide=1) configs are reported side by side.
Fresh cache dir per run so that every kind is tuned here.

    BLAST_CACHE_DIR=$(mktemp -d) python bench/tiles.py --out bench/results
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._results import run_meta, write_json  # noqa: E402
from bench.train_mlp import SHAPES, sparsify_  # noqa: E402
from blast_compile.formats import pattern_from_weights  # noqa: E402
from blast_compile.masks import clear_mask  # noqa: E402
from blast_compile.ops import triton_mlp, tune  # noqa: E402
from blast_compile.ops.sparse_mlp import weights_plan  # noqa: E402
from blast_compile.testing import SwiGLU  # noqa: E402


def setup(shape, m, sparsity, block):
    """One bf16 SwiGLU MLP of a named shape with random tied block masks (declared), an x of M rows,
    and its plan: (w1, w3, w2, x, plan)."""
    d, h = SHAPES[shape]
    torch.manual_seed(0)
    mlp = SwiGLU(d, h).to("cuda", torch.bfloat16)
    sparsify_(mlp, sparsity, block)
    w1, w3, w2 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    pat = pattern_from_weights(w1, w3, w2, block, block, activation="silu", has_b1=False, has_b3=False)
    return w1, w3, w2, x, weights_plan(x, w1, None, w3, None, w2, None, "silu", block, block, pat.key, 1.0)


def sweep(shape, m, sparsity, block, keep=2):
    w1, w3, w2, x, plan = setup(shape, m, sparsity, block)
    dy = torch.randn_like(x)
    tune.TUNE_RECORD = rec = []
    out = triton_mlp.forward(x, w1, None, w3, None, w2, None, plan, "silu", keep=keep)
    saved = out[1] if keep else None
    triton_mlp.backward(dy, x, w1, None, w3, None, w2, None, plan, "silu", [True, True, False, True, False, True, False],
                        saved)
    tune.TUNE_RECORD = None
    torch.cuda.synchronize()
    for w in (w1, w3, w2):
        clear_mask(w)
    rows = []
    for kind in dict.fromkeys(k.split("|")[0] for k, _, _ in rec):
        got = [(t, list(c)) for k, c, t in rec if k.split("|")[0] == kind]
        narrow = [g for g in got if len(g[1]) < 4 or not g[1][3]]
        wide = [g for g in got if len(g[1]) == 4 and g[1][3]]
        row = {"shape": shape, "M": m, "sparsity": sparsity, "block": block, "kind": kind,
               "all": sorted(got)}
        if narrow:
            row["narrow_us"], row["narrow_cfg"] = min(narrow)
        if wide:
            row["wide_us"], row["wide_cfg"] = min(wide)
        rows.append(row)
        print(f"{shape:>4} M={m:<5} {kind:<14} narrow {row.get('narrow_us', float('nan')):8.1f} µs "
              f"{row.get('narrow_cfg')}   wide {row.get('wide_us', float('nan')):8.1f} µs {row.get('wide_cfg')}",
              flush=True)
        print("      best: " + ", ".join(f"{t:.0f} {tuple(c)}" for t, c in row["all"][:5]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--m", default="1024,4096")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--keep", type=int, default=2, choices=[0, 1, 2],
                    help="what the forward keeps for the backward: 0 nothing, 1 H, 2 H and the pre-activations")
    a = ap.parse_args()
    # "34m@8192": one shape at its own M list
    cases = [(s.split("@")[0], int(m)) for s in a.shapes.split(",")
             for m in (s.split("@")[1:] or a.m.split(","))]
    rows = [r for s, m in cases for r in sweep(s, m, a.sparsity, a.block, a.keep)]
    meta = run_meta(timing="CUDA-graph replay median, L2 not flushed (the tuner's own)")
    write_json(a.out, f"tiles_{a.tag}.json", {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
