"""Probe: do TMA (tensor-descriptor) loads make the prefill tiles faster? (GPU)

Times, in one process and by the tuner's CUDA-graph timing, the shipped prefill kernels
(``mlp_hidden`` and ``bsmm`` for the down projection, every config the tuner tries) against
prototypes that load every tile through a host-side ``TensorDescriptor``:

- ``hidden_tma``: gate and up from the dense weights, two descriptors, two 64-wide dots; PACKED:
  gate|up blocks packed side by side ([nnz*2*BH, BD]), one 128-wide dot;
- ``down_tma``: the down projection from the dense W2, or PACKED blocks.

Checks each prototype against the shipped kernel's output. Writes JSON to --out.

    python bench/probes/tma_probe.py --out bench/results
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

from bench._results import run_meta, write_json  # noqa: E402
from bench.tiles import setup  # noqa: E402
from bench.train_mlp import SHAPES  # noqa: E402
from blast_compile.ops import tables, triton_mlp, tune  # noqa: E402


@triton.jit
def _silu_h(a, u):
    a = a.to(tl.bfloat16).to(tl.float32)
    u = u.to(tl.bfloat16).to(tl.float32)
    g = (a / (1.0 + tl.exp(-a))).to(tl.bfloat16).to(tl.float32)
    return (g * u).to(tl.bfloat16)


@triton.jit
def hidden_tma(x_d, w1_d, w3_d, p_d, h_d, rowptr, cols, order, BM: tl.constexpr, BH: tl.constexpr,
               BD: tl.constexpr, PACKED: tl.constexpr):
    """PACKED: gate|up blocks side by side in p_d (one 128-wide dot), else two 64-wide dots."""
    j = tl.load(order + tl.program_id(1))
    m0 = tl.program_id(0) * BM
    acc = tl.zeros((BM, 2 * BH), dtype=tl.float32)
    acc_a = tl.zeros((BM, BH), dtype=tl.float32)
    acc_u = tl.zeros((BM, BH), dtype=tl.float32)
    for k in range(tl.load(rowptr + j), tl.load(rowptr + j + 1)):
        c = tl.load(cols + k)
        x = x_d.load([m0, c * BD])
        if PACKED:
            acc = tl.dot(x, p_d.load([k * 2 * BH, 0]).T, acc)
        else:
            acc_a = tl.dot(x, w1_d.load([j * BH, c * BD]).T, acc_a)
            acc_u = tl.dot(x, w3_d.load([j * BH, c * BD]).T, acc_u)
    if PACKED:
        acc_a, acc_u = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BH)), (0, 2, 1)))
    h_d.store([m0, j * BH], _silu_h(acc_a, acc_u))


@triton.jit
def down_tma(h_d, w2_d, p_d, y_d, rowptr, cols, order, BM: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
             PACKED: tl.constexpr):
    """PACKED: the down blocks in CSR order in p_d, else from the dense W2."""
    r = tl.load(order + tl.program_id(1))
    m0 = tl.program_id(0) * BM
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    for k in range(tl.load(rowptr + r), tl.load(rowptr + r + 1)):
        c = tl.load(cols + k)
        if PACKED:
            w = p_d.load([k * BO, 0])
        else:
            w = w2_d.load([r * BO, c * BI])
        acc = tl.dot(h_d.load([m0, c * BI]), w.T, acc)
    y_d.store([m0, r * BO], acc.to(tl.bfloat16))


TMA_CONFIGS = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (128, 8, 4), (256, 8, 3), (64, 4, 2), (128, 8, 2)]


def case(shape, m, sparsity, block, timer):
    d, hdim = SHAPES[shape]
    w1, w3, w2, x, plan = setup(shape, m, sparsity, block)
    runs = {}
    orig = tune._choose

    def grab(kind, sig, mm, configs, run, graph="hot", shape=()):
        runs[kind] = (configs, run)
        return orig(kind, sig, mm, configs, run, graph, shape)

    tune._choose = grab
    try:
        y_ref = triton_mlp.forward(x, w1, None, w3, None, w2, None, plan, "silu")
    finally:
        tune._choose = orig
    torch.cuda.synchronize()
    ix = tables._index_tables(plan, x.device)
    p = plan.pattern
    bh = bd = block
    live_in, live_dn = int(p.nnz_in), int(p.nnz_dn)
    fl_h = 2 * 2 * m * live_in * bh * bd
    fl_y = 2 * m * live_dn * bh * bd
    out = {"shape": shape, "M": m, "sparsity": sparsity, "block": block, "hidden": {}, "down": {}}

    def rec(kind, name, t, fl):
        out[kind][name] = {"us": t, "tflops": fl / t / 1e6}
        print(f"{shape} M={m} s={sparsity} {kind:<6} {name:<34} {t:8.1f} µs {fl / t / 1e6:6.0f} TFLOP/s", flush=True)

    def trial(kind, name, fn, got, want, fl):
        """Run a prototype once into ``got`` (zeroed first), check it against ``want``, then time it."""
        try:
            got.zero_()
            fn()
            torch.cuda.synchronize()
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            rec(kind, f"{name} err={err:.1e}", timer(fn), fl)
        except Exception as e:
            print(f"{kind} {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

    for kind, fl in (("hidden", fl_h), ("down", fl_y)):
        configs, run = runs[kind]
        for c in configs:
            rec(kind, f"shipped {tuple(c)}", timer(lambda: run(c)), fl)
    # packed gate|up blocks in CSR order: [nnz, 2*bh, bd]; down blocks in CSR order [nnz, bo, bi]
    rows = ix.in_rows.cpu()
    cols = p.in_cols.long()
    w1b = w1.view(hdim // bh, bh, d // bd, bd)
    w3b = w3.view(hdim // bh, bh, d // bd, bd)
    pk_in = torch.cat([w1b[rows, :, cols], w3b[rows, :, cols]], 1).contiguous().view(-1, bd)
    w2b = w2.view(d // bd, bd, hdim // bh, bh)
    pk_dn = w2b[ix.dn_rows_r.cpu(), :, p.dn_cols.long()].contiguous().view(-1, bh)
    h = torch.empty(m, hdim, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, d, device="cuda", dtype=torch.bfloat16)
    n_live = ix.live.numel()
    # eager's H on the hidden blocks the plan keeps (a block whose down column is dead is dropped:
    # nothing writes it; round 10's first run compared those too, 1B's err=0.17 rows)
    import torch.nn.functional as F
    h_ref = F.silu(F.linear(x, w1)) * F.linear(x, w3)
    keep = torch.zeros(hdim // bh, dtype=torch.bool, device="cuda")
    keep[ix.live.long()] = True
    h_ref = h_ref * keep.repeat_interleave(bh).to(h_ref.dtype)
    for bm, nw, ns in TMA_CONFIGS:
        xd = TensorDescriptor.from_tensor(x, [bm, bd])
        hd = TensorDescriptor.from_tensor(h, [bm, bh])
        w1d = TensorDescriptor.from_tensor(w1, [bh, bd])
        w3d = TensorDescriptor.from_tensor(w3, [bh, bd])
        pd = TensorDescriptor.from_tensor(pk_in, [2 * bh, bd])
        grid = (triton.cdiv(m, bm), n_live)
        for name, pk in (("tma", False), ("tma_packed", True)):
            def fn(pk=pk):
                hidden_tma[grid](xd, w1d, w3d, pd, hd, ix.in_rowptr, ix.in_cols, ix.order_h, BM=bm, BH=bh,
                                 BD=bd, PACKED=pk, num_warps=nw, num_stages=ns)

            trial("hidden", f"{name} {(bm, nw, ns)}", fn, h, h_ref, fl_h)
        hd2 = TensorDescriptor.from_tensor(h_ref.contiguous(), [bm, bh])
        yd = TensorDescriptor.from_tensor(y, [bm, bd])
        w2d = TensorDescriptor.from_tensor(w2, [bd, bh])
        p2d = TensorDescriptor.from_tensor(pk_dn, [bd, bh])
        y_want = F.linear(h_ref, w2)
        grid = (triton.cdiv(m, bm), p.n_out)
        for name, pk in (("tma", False), ("tma_packed", True)):
            def fn(pk=pk):
                down_tma[grid](hd2, w2d, p2d, yd, ix.dn_rowptr, ix.dn_cols, ix.order_o, BM=bm, BO=bd, BI=bh,
                               PACKED=pk, num_warps=nw, num_stages=ns)

            trial("down", f"{name} {(bm, nw, ns)}", fn, y, y_want, fl_y)
    err = ((y_ref.float() - F.linear(h_ref, w2).float()).norm() / y_ref.float().norm()).item()
    out["shipped_forward_err"] = err
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="8b@4096@0.9,8b@4096@0.5,1b@4096@0.9")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="h200")
    a = ap.parse_args()
    timer = (lambda fn: tune._graph_time(fn, cold=False))
    rows = []
    for cs in a.cases.split(","):
        s, m, sp = cs.split("@")
        rows.append(case(s, int(m), float(sp), a.block, timer))
    write_json(a.out, f"tma_probe_{a.tag}.json", {"meta": run_meta(timing="CUDA-graph replay, L2 hot"), "rows": rows})


if __name__ == "__main__":
    main()
