"""Kernel benchmark: one block-sparse MLP, blast's Triton kernels vs dense and torch BSR (GPU).

    PYTHONPATH=$PWD python bench/mlp.py --out bench/results            # headline sweep
    PYTHONPATH=$PWD python bench/mlp.py --full --out bench/results     # + block sizes, GPT2-XL, low sparsity
    PYTHONPATH=$PWD python bench/mlp.py --quick --out /tmp/q           # headline subset (M=1,16,4096; no BSR)

Training table (``train`` in the JSON): forward+backward through ``torch.ops.blast.sparse_mlp``
with declared masks (dW on live blocks only) vs dense eager autograd, M = 4096 and 16384.

Columns (bf16, times in µs, median of CUDA-graph replays):
  dense      eager F.linear chain (cuBLAS)
  compiled   torch.compile(dense_mlp) (default mode, Inductor)
  bsr        torch ``to_sparse_bsr`` weights + F.linear (untuned torch kernels)
  blast      blast_compile.ops.triton_mlp.forward (generated kernels, tuned once)
  stk        stanford-stk ``dds`` (only block-128 cases: stk supports 128x128 blocks only; M padded
             to a multiple of 128, the padding counted) -- with ``--stk``: ``pip download --no-deps
             --no-binary :all: stanford-stk`` and put its ``stk`` package on PYTHONPATH (its wheel's
             dependencies pin other torch versions).

L2: the H100/H200 L2 (50-60 MB) holds a 90%-sparse MLP's live blocks, so every
timed graph cycles through enough copies of the weights (>= 256 MB per cycle) that
each call streams its weights from HBM, as in a model with many layers.
Gate and up share one block mask (the kernels read the union of both masks).
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blast_compile.formats import block_bytes, cdiv, dense_flops, expand_mask  # noqa: E402
from blast_compile.ops import triton_mlp, tune  # noqa: E402
from blast_compile.ops.activations import ACTIVATIONS, dense_mlp  # noqa: E402
from blast_compile.ops.sparse_mlp import weights_plan  # noqa: E402
from blast_compile.testing import random_block_mask  # noqa: E402

SHAPES = {  # name: (d_model, hidden, activation, gated)
    "llama3.1-8b": (4096, 14336, "silu", True),
    "llama3.2-1b": (2048, 8192, "silu", True),
    "gpt2-xl": (1600, 6400, "gelu_tanh", False),
}
MS = (1, 16, 128, 1024, 4096)
ROTATE_BYTES = 256 << 20


def make_weights(shape, sparsity, block, dtype, seed):
    d, h, act, gated = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    m_in = random_block_mask(cdiv(h, block), cdiv(d, block), sparsity, g)
    m_dn = random_block_mask(cdiv(d, block), cdiv(h, block), sparsity, g)

    def w(o, i, m):
        t = torch.randn(o, i, device="cuda", dtype=dtype) / math.sqrt(i)
        return t * expand_mask(m.cuda(), block, block, t.shape).to(dtype)

    w1 = w(h, d, m_in)
    w3 = w(h, d, m_in) if gated else None
    w2 = w(d, h, m_dn)
    return w1, w3, w2


def graph_time(fns, reps=20):
    """Median µs per call of ``fns`` (a cycle of calls) replayed as one CUDA graph."""
    return tune.graph_time(fns, reps=reps, warm=2)


def bench_time(fns):
    """Fallback without graphs (for torch paths that cannot be captured)."""
    from triton.testing import do_bench

    i = [0]

    def step():
        fns[i[0] % len(fns)]()
        i[0] += 1

    return do_bench(step, warmup=10, rep=50, return_mode="median") * 1e3


def timed(fns):
    try:
        return graph_time(fns), "graph"
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return bench_time(fns), f"no graph ({type(e).__name__})"


def hw_ceilings():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = graph_time([lambda: b.copy_(a)], reps=10)
    bw = 2 * n / (t * 1e-6)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    t = graph_time([lambda: x @ y], reps=10)
    return bw, 2 * 8192 ** 3 / (t * 1e-6)


def run_case(shape, sparsity, block, ms, dtype, dense_cache, bw, flops, do_bsr=True, do_compiled=True,
             do_stk=False):
    d, h, act, gated = SHAPES[shape]
    itemsize = torch.finfo(dtype).bits // 8
    w1, w3, w2 = make_weights(shape, sparsity, block, dtype, seed=1)
    dense_bytes = (w1.numel() * (2 if gated else 1) + w2.numel()) * itemsize
    plan0 = weights_plan(torch.empty(1, d, device="cuda", dtype=dtype), w1, None, w3, None, w2, None, act, block, block, "", 1.0)
    live_bytes = block_bytes(plan0.pattern, itemsize, gated)
    n_sp = max(2, min(24, cdiv(ROTATE_BYTES, live_bytes)))
    n_de = max(2, min(8, cdiv(ROTATE_BYTES, dense_bytes)))
    sets = [(w1, w3, w2)] + [tuple(None if t is None else t.clone() for t in (w1, w3, w2)) for _ in range(n_sp - 1)]
    # the real pattern key (not ""), and every weight set stays alive while its plan is used: no plan
    # can be reused for another case's tensors at a freed address
    key = plan0.pattern.key
    plans = [weights_plan(torch.empty(1, d, device="cuda", dtype=dtype), a, None, c, None, b, None, act, block, block, key, 1.0)
             for a, c, b in sets]
    assert all(p.pattern.key == key for p in plans)
    rows = []
    for m in ms:
        xs = [torch.randn(m, d, device="cuda", dtype=dtype) for _ in range(len(sets))]
        row = dict(shape=shape, sparsity=sparsity, block=block, M=m, density=plan0.pattern.density,
                   live_mb=live_bytes / 2 ** 20, dense_mb=dense_bytes / 2 ** 20)
        # correctness on this exact case before timing
        y = triton_mlp.forward(xs[0], *_wargs(sets[0]), plans[0], act)
        ref = dense_mlp(xs[0].float(), *(None if t is None else t.float() for t in _wargs(sets[0])), act)
        row["rel_err"] = float((y.float() - ref).norm() / ref.norm())
        key = (shape, m)
        if key not in dense_cache:
            dsets = sets[:n_de] if len(sets) >= n_de else sets
            dense_cache[key] = {}
            dense_cache[key]["dense_us"], _ = timed([lambda s=s, x=x: dense_mlp(x, *_wargs(s), act) for s, x in zip(dsets, xs)])
            cfn = torch.compile(dense_mlp, dynamic=False)
            try:
                if not do_compiled:
                    raise RuntimeError("skipped (--quick)")
                dense_cache[key]["compiled_us"], _ = timed([lambda s=s, x=x: cfn(x, *_wargs(s), act) for s, x in zip(dsets, xs)])
            except Exception as e:  # noqa: BLE001
                dense_cache[key]["compiled_us"] = None
                if do_compiled:
                    print("compile failed", e)
        row.update(dense_cache[key])
        row["blast_us"], row["blast_timing"] = timed(
            [lambda s=s, p=p, x=x: triton_mlp.forward(x, *_wargs(s), p, act) for s, p, x in zip(sets, plans, xs)])
        if do_bsr:
            row["bsr_us"] = _bsr_time(sets[: min(len(sets), 4)], xs, act, gated, block)
        if do_stk and block == 128:
            row["stk_us"], row["stk_rel_err"] = _stk_time(sets[: min(len(sets), 8)], xs, act, ref)
        row["speedup"] = row["dense_us"] / row["blast_us"]
        row["speedup_vs_compiled"] = row["compiled_us"] / row["blast_us"] if row.get("compiled_us") else None
        t_bytes = live_bytes / bw * 1e6
        t_flops = dense_flops(m, d, h, d, gated) * plan0.pattern.density / flops * 1e6
        row["floor_us"] = max(t_bytes, t_flops)
        row["pct_roofline"] = 100 * row["floor_us"] / row["blast_us"]
        rows.append(row)
        print(_fmt(row), flush=True)
    del sets, plans
    torch.cuda.empty_cache()
    return rows


def _wargs(s):
    w1, w3, w2 = s
    return (w1, None, w3, None, w2, None)


def _bsr_time(sets, xs, act, gated, block):
    try:
        bs = [tuple(None if t is None else t.to_sparse_bsr((block, block)) for t in s) for s in sets]

        def f(s, x):
            a = ACTIVATIONS[act](F.linear(x, s[0]))
            if s[1] is not None:
                a = a * F.linear(x, s[1])
            return F.linear(a, s[2])

        t, _ = timed([lambda s=s, x=x: f(s, x) for s, x in zip(bs, xs)])
        return t
    except Exception as e:  # noqa: BLE001
        print("bsr failed:", type(e).__name__, str(e)[:120])
        return None


def _fmt(r):
    f = lambda v: "-" if v is None else f"{v:8.1f}"  # noqa: E731
    return (f"{r['shape']:12s} s={r['sparsity']:.2f} b{r['block']:<3d} M={r['M']:<5d} dense {f(r['dense_us'])} "
            f"compiled {f(r.get('compiled_us'))} bsr {f(r.get('bsr_us'))} stk {f(r.get('stk_us'))} blast {f(r['blast_us'])} "
            f"x{r['speedup']:5.2f} roof {r['pct_roofline']:5.1f}% err {r['rel_err']:.1e}")


def train_case(shape, sparsity, block, m, dtype):
    """fwd+bwd (autograd through the op, masks declared) vs dense eager fwd+bwd, µs (do_bench, no graph)."""
    import blast_compile.ops.sparse_mlp  # noqa: F401  (registers the op)
    from blast_compile import masks
    from blast_compile.formats import block_mask, pattern_from_weights

    d, h, act, gated = SHAPES[shape]
    w1, w3, w2 = (None if t is None else t.requires_grad_(True) for t in make_weights(shape, sparsity, block, dtype, 2))
    for w in (w1, w3, w2):
        if w is not None:
            masks.declare_mask(w, block_mask(w.detach(), block, block), (block, block))
    pat = pattern_from_weights(w1.detach(), None if w3 is None else w3.detach(), w2.detach(), block, block,
                               activation=act, has_b1=False, has_b3=False)
    x = torch.randn(m, d, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(m, d, device="cuda", dtype=dtype)
    ws = [t for t in (x, w1, w3, w2) if t is not None]

    def blast():
        y = torch.ops.blast.sparse_mlp(x, w1, None, w3, None, w2, None, act, block, block, pat.key, 1.0)
        torch.autograd.grad(y, ws, dy)

    def dense():
        y = dense_mlp(x, w1, None, w3, None, w2, None, act)
        torch.autograd.grad(y, ws, dy)

    from triton.testing import do_bench

    blast()
    row = dict(shape=shape, sparsity=sparsity, block=block, M=m,
               dense_fwdbwd_us=do_bench(dense, warmup=5, rep=40, return_mode="median") * 1e3,
               blast_fwdbwd_us=do_bench(blast, warmup=5, rep=40, return_mode="median") * 1e3)
    row["speedup"] = row["dense_fwdbwd_us"] / row["blast_fwdbwd_us"]
    for w in (w1, w3, w2):
        if w is not None:
            masks.clear_mask(w)
    print(f"train {shape:12s} s={sparsity:.2f} b{block} M={m:<6d} dense fwd+bwd {row['dense_fwdbwd_us']:9.1f} "
          f"blast {row['blast_fwdbwd_us']:9.1f} x{row['speedup']:5.2f}", flush=True)
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["shape"], r["block"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (shape, block) in zip(axes[0], shapes):
        for m in MS:
            pts = sorted((r["sparsity"], r["speedup"]) for r in rows if r["shape"] == shape and r["block"] == block and r["M"] == m)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"M={m}")
        ax.axhline(1, color="gray", lw=0.5)
        ax.set_title(f"{shape} b{block}")
        ax.set_xlabel("block sparsity")
        ax.set_ylabel("speedup vs dense cuBLAS")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _stk_time(sets, xs, act, ref):
    """stk's dense x block-sparse product (``dds``) for the three projections; M padded to 128."""
    try:
        import stk

        mats = [tuple(None if t is None else stk.ops.to_sparse(t.t().contiguous(), blocking=128) for t in s)
                for s in sets]

        def f(s, x):
            m = x.shape[0]
            if m % 128:
                x = F.pad(x, (0, 0, 0, 128 - m % 128))
            a = ACTIVATIONS[act](stk.ops.dds(x, s[0]))
            if s[1] is not None:
                a = a * stk.ops.dds(x, s[1])
            return stk.ops.dds(a, s[2])[:m]

        y = f(mats[0], xs[0])
        err = float((y.float() - ref).norm() / ref.norm())
        t, _ = timed([lambda s=s, x=x: f(s, x) for s, x in zip(mats, xs)])
        return t, err
    except Exception as e:  # noqa: BLE001
        print("stk failed:", type(e).__name__, str(e)[:160])
        return None, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--no-bsr", action="store_true")
    ap.add_argument("--quick", action="store_true", help="8B/1B b64 90/95%%, M=1,16,4096, dense + blast only")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--stk", action="store_true", help="only the block-128 cases, with a stanford-stk column")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    dtype = torch.bfloat16
    bw, flops = hw_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 GEMM {flops / 1e12:.0f} TFLOP/s", flush=True)
    cases = [(s, sp, 64) for s in ("llama3.1-8b", "llama3.2-1b") for sp in (0.9, 0.95)]
    if args.full:
        cases += [("llama3.2-1b", 0.5, 64), ("llama3.2-1b", 0.7, 64), ("gpt2-xl", 0.9, 64),
                  ("llama3.2-1b", 0.9, 32), ("llama3.2-1b", 0.9, 128), ("llama3.1-8b", 0.9, 128)]
    if args.stk:
        cases = [("llama3.1-8b", 0.9, 128), ("llama3.1-8b", 0.95, 128), ("llama3.2-1b", 0.9, 128)]
    rows, dense_cache = [], {}
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
                host=platform.node(), copy_tb_s=bw / 1e12, gemm_tflops=flops / 1e12, dtype=str(dtype))
    tag = "h200" if "H200" in meta["device"] else ("h100" if "H100" in meta["device"] else "gpu")
    ms = (1, 16, 4096) if args.quick else MS
    train = []
    name = f"mlp_{tag}{'_quick' if args.quick else ''}{'_stk' if args.stk else ''}.json"

    def save():
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(dict(meta=meta, rows=rows, train=train), f, indent=1)

    for i, (shape, sp, block) in enumerate(cases):
        if i == 4 and not (args.no_train or args.stk):  # after the headline cases: the training table
            for tshape in ("llama3.1-8b", "llama3.2-1b"):
                for m in ((4096,) if args.quick else (4096, 16384)):
                    try:
                        train.append(train_case(tshape, 0.9, 64, m, dtype))
                    except Exception as e:  # noqa: BLE001
                        print("train failed:", tshape, m, type(e).__name__, str(e)[:300], flush=True)
                    torch.cuda.empty_cache()
            save()
        rows += run_case(shape, sp, block, ms, dtype, dense_cache, bw, flops, do_bsr=not (args.no_bsr or args.quick),
                         do_compiled=not (args.quick or args.stk), do_stk=args.stk)
        save()
    if not (args.quick or args.stk):
        plot(rows, os.path.join(args.out, f"mlp_{tag}.png"))
    print("\n".join(_fmt(r) for r in rows))


if __name__ == "__main__":
    main()
