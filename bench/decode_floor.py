"""Decode against its floor: a kernel that only streams the live weight bytes once, same layout (GPU).

Issue 24's denominator. At decode (M <= 16) the fused MLP has one job: read its live blocks of W1, W3 and W2
once. ``stream_live`` does only that -- every live 64x64 block of the three dense weights, read at the offsets
the fused kernels read them from, summed into one fp32 per program so nothing is dead code -- and its time
under CUDA graphs, cold L2 (each replay cycles through >= 256 MB of weight copies, as in a model with many
layers), is the floor. Per shape, sparsity and M, in one process: the floor, blast's decode
(``triton_mlp.forward`` per path, graph-replayed; ``--lowered``: as a lowered op launches them -- no PDL, kernel 1
prefetching W2, split-K's scratch by address) and dense cuBLAS.

    python bench/decode_floor.py --out bench/results      # 1B and 8B MLP shapes, 90 / 95 %, M = 1, 8, 16

The floor kernel checks itself: its sum over one weight set must equal torch's sum of the live blocks.
"""
import argparse
import contextlib
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.mlp import ROTATE_BYTES, SHAPES, _wargs, graph_time, make_weights  # noqa: E402
from blast_compile.formats import cdiv  # noqa: E402
from blast_compile.ops import configs, launch, triton_mlp  # noqa: E402
from blast_compile.ops.activations import dense_mlp  # noqa: E402
from blast_compile.ops.sparse_mlp import weights_plan  # noqa: E402


@triton.jit
def stream_live(w_ptr, off_ptr, n_blocks, out_ptr, BO: tl.constexpr, BI: tl.constexpr, STRIDE_O: tl.constexpr,
                PER: tl.constexpr):
    """Program p sums blocks p*PER .. p*PER+PER-1 of ``off_ptr`` (element offsets of [BO, BI] blocks of a
    row-major weight with row stride STRIDE_O): exactly the live bytes, each once."""
    p = tl.program_id(0)
    offs = tl.arange(0, BO)[:, None] * STRIDE_O + tl.arange(0, BI)[None, :]
    acc = tl.zeros((BO, BI), dtype=tl.float32)
    for k in tl.static_range(PER):
        i = p * PER + k
        off = tl.load(off_ptr + tl.minimum(i, n_blocks - 1))
        ok = (tl.zeros((BO, BI), dtype=tl.int32) + i) < n_blocks  # (the last program's tail reads nothing)
        acc += tl.load(w_ptr + off + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + p, tl.sum(acc))


def live_offsets(pattern, d_in, d_hidden):
    """Element offsets of the live blocks: W1/W3 [hidden, d_in] and W2 [d_out, hidden], row-major."""
    bh, bd = pattern.bh, pattern.bd
    rows_in = torch.repeat_interleave(torch.arange(len(pattern.in_rowptr) - 1), pattern.in_rowptr.diff())
    rows_dn = torch.repeat_interleave(torch.arange(len(pattern.dn_rowptr) - 1), pattern.dn_rowptr.diff())
    off_in = rows_in * bh * d_in + pattern.in_cols.long() * bd
    off_dn = rows_dn * bd * d_hidden + pattern.dn_cols.long() * bh
    return off_in.cuda(), off_dn.cuda(), (rows_in, pattern.in_cols.long()), (rows_dn, pattern.dn_cols.long())


def live_sum(w, rows, cols, bo, bi) -> float:
    """torch's sum of the blocks (rows[i], cols[i]) of w: what ``stream_live`` must read."""
    r, c = w.shape[0] // bo, w.shape[1] // bi
    return float(w.float().view(r, bo, c, bi)[rows.cuda(), :, cols.cuda(), :].sum())


def floor_fns(sets, offs, shape, per):
    d, h, _, gated = SHAPES[shape]
    off_in, off_dn = offs[:2]
    out = torch.empty(cdiv(max(off_in.numel(), off_dn.numel()), per), device="cuda", dtype=torch.float32)
    outs = []

    def one(w1, w3, w2):
        s = [torch.zeros_like(out) for _ in range(3)]  # (a weight with fewer live blocks fills fewer)
        outs.append(s)

        def run():
            for w, off, o, bo, bi, stride in ((w1, off_in, s[0], 64, 64, d), (w3, off_in, s[1], 64, 64, d),
                                              (w2, off_dn, s[2], 64, 64, h)):
                if w is not None and off.numel():
                    stream_live[(cdiv(off.numel(), per),)](w, off, off.numel(), o, BO=bo, BI=bi, STRIDE_O=stride,
                                                          PER=per, num_warps=4)
        return run

    return [one(*s) for s in sets], outs


def split_y_only():
    """Path ``sliced_split``: the sliced decode with ``bsmm`` tuned among its split configs only
    (``configs.DECODE_SPLIT_CONFIGS``; persisted unsplit choices ignored, nothing stored). Returns the undo."""
    from blast_compile import codegen

    saved = configs.decode_y_configs, codegen.lookup_config, codegen.store_config
    lookup = saved[1]

    def lookup_config(key):
        cfg = lookup(key)
        return None if key.startswith("dec_y|") and cfg is not None and configs.Slice.of(cfg).split == 1 else cfg

    configs.decode_y_configs = lambda: configs.DECODE_SPLIT_CONFIGS
    codegen.lookup_config, codegen.store_config = lookup_config, lambda key, cfg: None
    configs.DECODE_PATH = "sliced"

    def undo():
        configs.decode_y_configs, codegen.lookup_config, codegen.store_config = saved

    return undo


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama3.2-1b,llama3.1-8b")
    ap.add_argument("--sparsity", default="0.9,0.95")
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--per", default="1,2,4", help="blocks per program of the floor kernel (the best is kept)")
    ap.add_argument("--paths", default=",sliced,splitk,sliced_pf",
                    help="decode paths timed (configs.DECODE_PATH; '' = the tuner's choice; sliced_split: the sliced "
                         "decode with bsmm's reduction split over programs, configs.DECODE_SPLIT_CONFIGS)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="no programmatic dependent launch (configs.PDL = False), as Inductor's code launches")
    ap.add_argument("--lowered", action="store_true",
                    help="launch as a lowered op's kernels (launch.lowering('warm'): no PDL, kernel 1 prefetching W2, "
                         "split-K's scratch by address)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    from bench._results import run_meta, write_json

    configs.PDL = not args.no_pdl
    res = run_meta(bench="decode_floor", rows=[], pdl=configs.PDL, lowered=args.lowered)

    def forward(x, s, p):
        with launch.lowering("warm") if args.lowered else contextlib.nullcontext():
            return triton_mlp.forward(x, *_wargs(s), p, act)

    dtype = torch.bfloat16
    for shape in args.shapes.split(","):
        d, h, act, gated = SHAPES[shape]
        for sp in (float(s) for s in args.sparsity.split(",")):
            w1, w3, w2 = make_weights(shape, sp, 64, dtype, seed=0)
            plan = weights_plan(None, w1, None, w3, None, w2, None, act, 64, 64, "floor", 1.0)
            live = sum(t.numel() * t.element_size() for t in (w1, w3, w2) if t is not None) * (1 - sp)
            n_sets = max(2, int(ROTATE_BYTES // max(live, 1)) + 1)
            sets = [(w1, w3, w2)] + [tuple(None if t is None else t.clone() for t in (w1, w3, w2))
                                     for _ in range(n_sets - 1)]
            offs = live_offsets(plan.pattern, d, h)
            live_bytes = 2 * 64 * 64 * ((1 + gated) * offs[0].numel() + offs[1].numel())
            best = None
            for per in (int(p) for p in args.per.split(",")):
                fns, outs = floor_fns(sets, offs, shape, per)
                fns[0]()
                ref = sum(live_sum(w, *rc, bo, bi) for w, rc, bo, bi in ((w1, offs[2], 64, 64), (w3, offs[2], 64, 64),
                                                                         (w2, offs[3], 64, 64)) if w is not None)
                got = sum(float(o.sum()) for o in outs[0])
                assert abs(got - ref) <= 1e-3 * max(1.0, abs(ref)) + 1e-2, (got, ref)  # reads exactly the live blocks
                t = graph_time(fns)
                best = t if best is None else min(best, t)
            for m in (int(v) for v in args.ms.split(",")):
                xs = [torch.randn(m, d, device="cuda", dtype=dtype) for _ in sets]
                dense = graph_time([lambda s=s, x=x: dense_mlp(x, *_wargs(s), act) for s, x in zip(sets, xs)])
                paths = {}
                for path in args.paths.split(","):
                    configs.DECODE_PATH = path
                    undo = split_y_only() if path == "sliced_split" else (lambda: None)
                    try:  # (fresh plans per path: a plan remembers the path it chose)
                        plans = [weights_plan(None, a, None, c, None, b, None, act, 64, 64, f"floor{path}", 1.0)
                                 for a, c, b in sets]
                        y = forward(xs[0], sets[0], plans[0])
                        ref = dense_mlp(xs[0], *_wargs(sets[0]), act)
                        torch.testing.assert_close(y, ref, rtol=3e-2, atol=3e-2)
                        paths[path or "auto"] = graph_time([lambda s=s, p=p, x=x: forward(x, s, p)
                                                            for s, p, x in zip(sets, plans, xs)])
                    except Exception as e:  # report, don't hide
                        paths[path or "auto"] = f"{type(e).__name__}: {str(e)[:200]}"
                    finally:
                        configs.DECODE_PATH = ""
                        undo()
                times = [v for v in paths.values() if isinstance(v, float)]
                blast = min(times) if times else float("nan")
                row = dict(shape=shape, sparsity=sp, m=m, live_mb=live_bytes / 1e6, floor_us=best, blast_us=blast,
                           paths_us=paths, dense_us=dense, blast_vs_floor=blast / best,
                           floor_gbs=live_bytes / best / 1e3, speedup_vs_dense=dense / blast)
                res["rows"].append(row)
                print(row, flush=True)
            del sets
            torch.cuda.empty_cache()
    path = write_json(args.out, "decode_floor.json", res)
    print(f"\n{res.get('device')}, torch {res.get('torch')}, triton {res.get('triton')}, {res.get('date')}\n")
    print("| shape | sparsity | M | live MB | floor µs | blast µs (best path) | blast / floor | dense µs | blast vs dense |"
          " per path µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        per = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} error" for k, v in r["paths_us"].items())
        print(f"| {r['shape']} | {r['sparsity']:.0%} | {r['m']} | {r['live_mb']:.1f} | {r['floor_us']:.1f} | "
              f"{r['blast_us']:.1f} | {r['blast_vs_floor']:.2f}x | {r['dense_us']:.1f} | {r['speedup_vs_dense']:.2f}x |"
              f" {per} |")
    return path


if __name__ == "__main__":
    main()
