"""Training-side kernel benchmark: one SwiGLU MLP forward+backward, dense vs blast (GPU).

Masks are declared (what the sparsifier does), so dW is computed on live blocks only.
For each shape: dense under ``torch.compile`` (Inductor, cuBLAS) and blast under
``torch.compile(backend="blast")``, timed two ways in one run:

* ``*_ms``: CUDA-event time per iteration over back-to-back iterations, the median of five windows (the
  host may run ahead: this is what a training loop sees when the host is not the bottleneck);
* ``*_sync_ms``: median of single iterations each followed by a synchronize (host time
  included: shows Python/dispatch overhead at small shapes).

Modes: torch.compile's (``default``, ``reduce-overhead``: CUDA graph trees, which copy non-static inputs
into the graph each step) and ``graph``: default-mode code captured whole into one CUDA graph, i.e. the
MLP's kernels alone. ``--profile`` adds a torch.profiler table of the blast case's CUDA kernels (first shape).

    python bench/train_mlp.py --out bench/results            # on the GPU machine
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._results import run_meta, write_json  # noqa: E402
from bench.e2e import _NoMLP  # noqa: E402  (the decode loop's ceiling takes the MLPs out the same way)
from blast_compile.backend import enable_static_launch  # noqa: E402
from blast_compile.formats import cdiv, expand_mask  # noqa: E402
from blast_compile.masks import declare_mask  # noqa: E402
from blast_compile.ops import triton_mlp, tune  # noqa: E402
from blast_compile.testing import SwiGLU, random_block_mask  # noqa: E402

# dense and blast sides in one process: blast's kernels launched as in a process that compiles with blast first
enable_static_launch()

SHAPES = {"34m": (512, 2816), "1b": (2048, 8192), "8b": (4096, 14336)}


def block_mask(rows, cols, sparsity, g, kind="random"):
    """A [rows, cols] block mask. "random": round(sparsity * rows * cols) dead blocks anywhere (as before
    round 18); "balanced": k = round((1 - sparsity) * cols) live blocks in every row (the sparsifier's
    ``balanced=True``: the in-projection's trip count is then a compile-time constant); "ragged": as many
    live blocks as "balanced", placed anywhere (its like-for-like comparison)."""
    if kind == "random":
        return random_block_mask(rows, cols, sparsity, g)
    k = max(1, round((1 - sparsity) * cols))
    if kind == "ragged":
        return random_block_mask(rows, cols, 1 - k / cols, g)
    m = torch.zeros(rows, cols, dtype=torch.bool)
    return m.scatter_(1, torch.rand(rows, cols, generator=g).argsort(1)[:, :k], True)


def sparsify_(mlp, sparsity, block, seed=0, kind="random"):
    """Block masks (``block_mask``), gate and up tied (the sparsifier's default), declared on the weights."""
    g = torch.Generator().manual_seed(seed)
    dev = mlp.gate_proj.weight.device
    masks = {}
    for name in ("gate_proj", "down_proj"):
        w = getattr(mlp, name).weight
        masks[name] = block_mask(cdiv(w.shape[0], block), cdiv(w.shape[1], block), sparsity, g, kind)
    masks["up_proj"] = masks["gate_proj"]
    with torch.no_grad():
        for name, mk in masks.items():
            w = getattr(mlp, name).weight
            w.mul_(expand_mask(mk, block, block, w.shape).to(w.device, w.dtype))
            declare_mask(w, mk.to(dev), (block, block))


def timed(fn, iters, windows=5):
    """(stream ms, synchronized ms) per call. Stream time is the median over ``windows`` windows of ``iters``
    back-to-back calls, after a warm-up window: one slow window (a host stall, the first calls after tuning)
    moves a mean but not the median (round 17 saw a process's first row 0.5-1 ms slow)."""
    for _ in range(max(3, iters)):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per = []
    for _ in range(windows):
        e0.record()
        for _ in range(iters):
            fn()
        e1.record()
        torch.cuda.synchronize()
        per.append(e0.elapsed_time(e1) / iters)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(per), 1e3 * statistics.median(ts)


def graphed(fn):
    """``fn`` captured once into a CUDA graph (``tune.capture``, after a warm-up that tunes and
    compiles): replays run its kernels and nothing else. Mode "graph" measures the MLP's own kernels:
    reduce-overhead's graph trees also copy the non-static inputs (x, and the incoming gradient dy: 94 us a
    step at 8B, on both sides), which inside a whole model are intermediates and are not copied."""
    return tune.capture([fn], warm=3).replay


def case(d, h, m, sparsity, block, iters, mode=None, profile=False, save="auto", ncu=False, masks="random"):
    dev, dt = torch.device("cuda"), torch.bfloat16
    row = {"d": d, "hidden": h, "M": m, "sparsity": sparsity, "block": block, "mode": mode or "default",
           "save_hidden": save, "masks": masks}
    for name in ("dense", "blast"):
        torch.manual_seed(0)
        mlp = SwiGLU(d, h).to(dev, dt)
        if name == "blast":
            sparsify_(mlp, sparsity, block, kind=masks)
        torch._dynamo.reset()
        cmode = None if mode == "graph" else mode  # "graph": default-mode code captured by ``graphed``
        f = (blast_compiled(mlp, cmode, save) if name == "blast" else torch.compile(mlp, mode=cmode))
        x = torch.randn(m, d, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(m, d, device=dev, dtype=dt)

        def fwd_bwd():  # a training step's MLP part: fresh grads each time (zero_grad(set_to_none))
            x.grad = None
            for p in mlp.parameters():
                p.grad = None
            f(x).backward(dy)

        def fwd():
            with torch.no_grad():
                f(x)

        runs = {}
        for fn, label in ((fwd_bwd, "fwd_bwd"), (fwd, "fwd")):
            runs[label] = run = graphed(fn) if mode == "graph" else fn
            row[f"{name}_{label}_ms"], row[f"{name}_{label}_sync_ms"] = timed(run, iters)
        if name == "blast" and ncu:  # one fwd+bwd for ``ncu --profile-from-start off`` to read
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            fwd_bwd()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        if name == "blast" and profile:  # (in mode "graph": the kernels as the graph replays them)
            row["profile"] = kernel_table(runs["fwd_bwd"])
            row["timeline"] = timeline(runs["fwd_bwd"])
        if name == "dense" and profile:
            row["dense_timeline"] = timeline(runs["fwd_bwd"])
            row["host_profile"] = host_table(fwd_bwd)
    for label in ("fwd_bwd", "fwd"):
        row[f"speedup_{label}"] = row[f"dense_{label}_ms"] / row[f"blast_{label}_ms"]
        row[f"speedup_{label}_sync"] = row[f"dense_{label}_sync_ms"] / row[f"blast_{label}_sync_ms"]
    return row


def kernel_table(fn, iters=10):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if dev_us > 0:
            rows.append({"name": e.key[:90], "us_per_iter": dev_us / iters, "calls_per_iter": e.count / iters})
    rows.sort(key=lambda r: -r["us_per_iter"])
    return rows[:25]


def timeline(fn, iters=10):
    """Where a call's GPU time goes between kernels: from a profiler trace of ``iters`` calls, the span
    (first kernel start to last kernel end), the kernels' busy time (union of their intervals) and the
    idle gaps between consecutive kernels, by (previous, next) kernel, per call (us)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        ev = json.load(open(f.name))["traceEvents"]
    ks = sorted((e["ts"], e["ts"] + e["dur"], e["name"][:40]) for e in ev
                if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and e.get("ph") == "X")
    return _idle(ks, iters) if ks else {}


def _idle(ks, iters):
    """``timeline``'s sums over sorted (start, end, name) intervals of ``iters`` calls."""
    busy, end, gaps = 0.0, ks[0][0], {}
    for (s0, e0, n0), (s1, e1, n1) in zip(ks, ks[1:] + [(None, None, None)]):
        busy += max(0.0, e0 - max(s0, end))
        end = max(end, e0)
        if s1 is not None and s1 > end:
            k = f"{n0} -> {n1}"
            gaps[k] = gaps.get(k, 0.0) + (s1 - end) / iters
    span = (end - ks[0][0]) / iters
    top = sorted(gaps.items(), key=lambda kv: -kv[1])[:12]
    return {"span_us": span, "busy_us": busy / iters, "idle_us": span - busy / iters,
            "gaps_us": [{"between": k, "us_per_call": v} for k, v in top]}


def host_table(fn, iters=50, top=20):
    """Where the host's time goes per fwd+bwd (cProfile, own time): at small shapes the GPU waits on it."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr)
    rows = [{"fn": f"{os.path.basename(k[0])}:{k[1]}:{k[2]}", "own_us_per_iter": 1e6 * v[2] / iters,
             "cum_us_per_iter": 1e6 * v[3] / iters, "calls_per_iter": v[1] / iters} for k, v in st.stats.items()]
    rows.sort(key=lambda r: -r["own_us_per_iter"])
    return rows[:top]


def step_case(mode, sparsity, block, iters, batch=32, seq=256, profile=False, save="auto", masks="random",
              windows=9, ceiling=False, host_profile=False):
    """A whole training step of the examples' 34M Llama (fp32 params, bf16 autocast, fused AdamW,
    grad clipping), dense vs blast at ``sparsity`` (random block masks, declared), same mode.

    Both sides are compiled in one process, then timed in alternating windows of ``iters`` steps (dense,
    blast, dense, ...): without CUDA graphs both are bound by host work, which drifts within a process and
    moves by 10-20% between processes on one VM, so a ratio of two separately timed runs mostly measures the
    drift. Per side: the median window (CUDA events), the host's share (how long issuing the window took:
    ~equal to the window when host-bound), and the per-window-pair ratios' range. ``ceiling``: a third side, dense
    Inductor with every MLP taken out (``no_mlp``): the most any MLP speed-up can give this step in this mode.
    ``host_profile``: per side, cProfile's own time per step by function and, blast minus dense, where the
    host time differs (what the default-mode step is bound by)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from _model import Config, Llama
    from torch._dynamo.utils import counters

    dev = torch.device("cuda")
    row = {"what": "train_step_34m", "mode": mode or "default", "sparsity": sparsity, "batch": batch, "seq": seq,
           "save_hidden": save, "masks": masks, "windows": windows, "iters": iters, "interleaved": True}
    torch._dynamo.reset()
    counters["blast"].clear()
    idx = torch.randint(0, 4096, (batch, seq + 1), device=dev)
    steps = {}
    for name in ("dense", "blast", "no_mlp")[:3 if ceiling else 2]:
        torch.manual_seed(0)
        model = Llama(Config.preset("34m", 4096)).to(dev)
        if name == "no_mlp":
            for layer in model.layers:
                layer.mlp = _NoMLP()
        if name == "blast":
            for i, layer in enumerate(model.layers):
                sparsify_(layer.mlp, sparsity, block, seed=i, kind=masks)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        # (one Dynamo cache serves both: blast guards on its weights' identity, and each entry on its backend)
        # "cpp-wrapper": default mode with Inductor's C++ wrapper on every side (no Python per launch). A side
        # whose C++ wrapper fails to build (torch 2.11: Inductor's own loss kernel in the backward, "CudaKernelParamCache
        # not populated") is tried again with Inductor's compile-time autotuning, then left out with its error.
        # So under the C++ wrapper every side computes its loss in eager, outside the compiled model (the same
        # for all: one cross-entropy kernel pair per step each).
        cmode, tries = ((None, [{"cpp_wrapper": True}, {"cpp_wrapper": True, "triton.autotune_at_compile_time": True}])
                        if mode == "cpp-wrapper" else (mode, [{}]))
        outside = row["loss_outside_compile"] = mode == "cpp-wrapper"
        for extra in tries:
            run = (blast_compiled(model, cmode, save, **extra) if name == "blast"
                   else torch.compile(model, mode=cmode, options=extra or None))

            def step(run=run, model=model, opt=opt, outside=outside):
                if mode == "reduce-overhead":  # (three compiled models take turns: tell the graph trees a step begins)
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast("cuda", torch.bfloat16):
                    if outside:  # (the loss in eager, after the compiled model: see above)
                        loss = torch.nn.functional.cross_entropy(run(idx[:, :-1]).float().flatten(0, 1),
                                                                 idx[:, 1:].flatten())
                    else:
                        loss = run(idx[:, :-1], idx[:, 1:])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                for _ in range(max(3, iters)):  # compile, tune, warm up
                    step()
            except Exception as e:
                if len(tries) == 1:
                    raise
                row.setdefault(f"{name}_errors", []).append(f"{extra}: {type(e).__name__}: {str(e)[-300:]}")
                print(f"    {name} {extra}: {type(e).__name__}: {str(e)[-200:]}", flush=True)
                opt.zero_grad(set_to_none=True)
                continue
            torch.cuda.synchronize()
            steps[name] = step
            row[f"{name}_options"] = extra
            break
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per = {name: [] for name in steps}
    host = {name: [] for name in steps}
    for _ in range(windows):
        for name, step in steps.items():
            e0.record()
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            host[name].append(1e3 * (time.perf_counter() - t0) / iters)
            e1.record()
            torch.cuda.synchronize()
            per[name].append(e0.elapsed_time(e1) / iters)
    for name in steps:
        row[f"{name}_step_ms"] = statistics.median(per[name])
        row[f"{name}_host_ms"] = statistics.median(host[name])
        row[f"{name}_windows_ms"] = per[name]
        row[f"{name}_tok_s"] = batch * seq / row[f"{name}_step_ms"] * 1e3
    if "dense" not in steps or "blast" not in steps:  # (a C++-wrapper side that did not build: its error is kept)
        return row
    pairs = sorted(d / b for d, b in zip(per["dense"], per["blast"]))
    row["speedup_step"] = row["dense_step_ms"] / row["blast_step_ms"]
    row["speedup_step_pairs_min_max"] = [pairs[0], pairs[-1]]
    if ceiling and "no_mlp" in steps:
        row["ceiling_step"] = row["dense_step_ms"] / row["no_mlp_step_ms"]
    row["blast_counters"] = dict(counters["blast"])
    if host_profile:
        for name, step in steps.items():
            rows = row[f"{name}_host_profile"] = host_table(step, iters=8, top=400)
            row[f"{name}_launches_per_step"] = launches(rows)
        row["host_diff"] = host_diff(row["dense_host_profile"], row["blast_host_profile"])
    if profile:  # both sides: where a step's GPU time goes
        row["dense_profile"], row["profile"] = kernel_table(steps["dense"]), kernel_table(steps["blast"])
    return row


def launches(rows) -> dict:
    """Kernel launches per step by route, from ``host_table`` rows: Inductor's static launcher, Triton's Python
    launcher, ATen matmuls (cuBLAS)."""
    def calls(pred):
        return sum(r["calls_per_iter"] for r in rows if pred(r["fn"]))
    return {"triton_static": calls(lambda f: f.startswith("static_triton_launcher.py") and f.endswith(":run")),
            "triton_python": calls(lambda f: f.endswith(":launch_metadata")),
            "aten_matmul": calls(lambda f: any(f.endswith(f"method torch.{k}>") for k in ("mm", "addmm", "bmm",
                                                                                        "baddbmm", "matmul")))}


def host_diff(dense, blast, top=25):
    """Functions whose own host time per step differs most, blast minus dense (``host_table`` rows)."""
    d, b = ({r["fn"]: r for r in rows} for rows in (dense, blast))
    zero = {"own_us_per_iter": 0.0, "calls_per_iter": 0.0}
    rows = [{"fn": fn, "us_blast_minus_dense": b.get(fn, zero)["own_us_per_iter"] - d.get(fn, zero)["own_us_per_iter"],
             "calls_dense": d.get(fn, zero)["calls_per_iter"], "calls_blast": b.get(fn, zero)["calls_per_iter"]}
            for fn in set(d) | set(b)]
    rows.sort(key=lambda r: -abs(r["us_blast_minus_dense"]))
    return rows[:top]


# --save: what each fused MLP's forward keeps for its backward (BlastOptions.save_hidden)
SAVE = {"auto": True, "all": "all", "h": "h", "none": False}


def blast_compiled(mlp, mode, save, **options):
    """``torch.compile`` takes a mode or options, not both: the mode goes in as its Inductor options."""
    opts = {"save_hidden": SAVE[save], **(torch._inductor.list_mode_options(mode) if mode else {}), **options}
    return torch.compile(mlp, backend="blast", options=opts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="34m,1b,8b")
    ap.add_argument("--m", default="8192")
    ap.add_argument("--sparsity", default="0.9,0.95")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--modes", default="default,reduce-overhead",
                    help="torch.compile modes (both sides); 'graph': default mode captured whole (no input copies); "
                    "'cpp-wrapper' (--step only): default mode with Inductor's C++ wrapper on every side")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ncu", action="store_true", help="wrap one blast fwd+bwd (first shape) in cudaProfilerStart/"
                    "Stop, for ncu --profile-from-start off")
    ap.add_argument("--save", default="auto", help="comma list of auto|all|h|none: BlastOptions.save_hidden")
    ap.add_argument("--masks", default="random", help="comma list of random|balanced|ragged (``block_mask``)")
    ap.add_argument("--step", action="store_true", help="also a whole 34M-model training step per mode")
    ap.add_argument("--step-batch", default="32x256", help="the step's batch x sequence length (comma list)")
    ap.add_argument("--ceiling", action="store_true", help="the step also with every MLP taken out (dense Inductor)")
    ap.add_argument("--host-profile", action="store_true", help="the step's host time by function (cProfile), each side")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="h200")
    args = ap.parse_args()
    res = run_meta(rows=[])
    first = True
    settings = list(itertools.product((float(v) for v in args.sparsity.split(",")), args.save.split(","),
                                      args.masks.split(",")))
    for mode in args.modes.split(","):
        for s in (v for v in args.shapes.split(",") if v and mode != "cpp-wrapper"):  # (--shapes "" --step: the step only)
            d, h = SHAPES[s]
            for m in (int(v) for v in args.m.split(",")):
                for sp, save, mk in settings:
                    row = case(d, h, m, sp, args.block, args.iters, None if mode == "default" else mode,
                               profile=args.profile and first, save=save, ncu=args.ncu and first, masks=mk)
                    first = False
                    row["shape"] = s
                    res["rows"].append(row)
                    print(f"[{mode}] {s:4s} M={m:5d} {sp:.0%} save={save} masks={mk}: fwd+bwd dense {row['dense_fwd_bwd_ms']:.3f} blast "
                          f"{row['blast_fwd_bwd_ms']:.3f} ms ({row['speedup_fwd_bwd']:.2f}x; sync'd "
                          f"{row['speedup_fwd_bwd_sync']:.2f}x) | fwd dense {row['dense_fwd_ms']:.3f} blast "
                          f"{row['blast_fwd_ms']:.3f} ({row['speedup_fwd']:.2f}x)", flush=True)
                    for k in row.get("profile", []):
                        print(f"    {k['us_per_iter']:8.1f} us  x{k['calls_per_iter']:.0f}  {k['name']}")
                    for side in ("dense_timeline", "timeline"):
                        tl_ = row.get(side)
                        if not tl_:
                            continue
                        who = "dense" if side.startswith("dense") else "blast"
                        print(f"    {who} per call: span {tl_['span_us']:.0f} us, kernels busy {tl_['busy_us']:.0f}, "
                              f"idle {tl_['idle_us']:.0f}")
                        for g in tl_["gaps_us"][:6]:
                            print(f"      idle {g['us_per_call']:7.1f} us  {g['between']}")
                    for k in row.get("host_profile", []):
                        print(f"    host {k['own_us_per_iter']:7.1f} us own {k['cum_us_per_iter']:7.1f} cum "
                              f"x{k['calls_per_iter']:.1f}  {k['fn']}")
    if args.step:
        for mode in (m for m in args.modes.split(",") if m != "graph"):  # a whole step is not captured
            for (sp, save, mk), bs in itertools.product(settings, args.step_batch.split(",")):
                b, sq = (int(v) for v in bs.split("x"))
                row = step_case(None if mode == "default" else mode, sp, args.block, args.iters, batch=b, seq=sq,
                                profile=args.profile and mode == "reduce-overhead", save=save, masks=mk,
                                ceiling=args.ceiling, host_profile=args.host_profile and mode != "reduce-overhead")
                res["rows"].append(row)
                if "speedup_step" not in row:
                    print(f"[{mode}] 34M training step {bs}: a side did not build: "
                          f"{ {k: v for k, v in row.items() if k.endswith(('_errors', '_step_ms'))} }", flush=True)
                    continue
                lo, hi = row["speedup_step_pairs_min_max"]
                print(f"[{mode}] 34M training step {bs} {sp:.0%} save={save} masks={mk}: dense {row['dense_step_ms']:.2f} ms "
                      f"(host {row['dense_host_ms']:.2f}), blast {row['blast_step_ms']:.2f} ms (host "
                      f"{row['blast_host_ms']:.2f}): {row['speedup_step']:.2f}x (window pairs {lo:.2f}-{hi:.2f}x; "
                      f"{row['blast_tok_s'] / 1e6:.2f}M tok/s)" + (f"; MLPs out {row['no_mlp_step_ms']:.2f} ms (host "
                      f"{row['no_mlp_host_ms']:.2f}): ceiling {row['ceiling_step']:.2f}x" if "ceiling_step" in row else ""),
                      flush=True)
                if "host_diff" in row:
                    print("    launches per step: " + ", ".join(f"{n} {row[f'{n}_launches_per_step']}" for n in
                                                              ("dense", "blast", "no_mlp") if f"{n}_launches_per_step" in row))
                for k in row.get("host_diff", []):
                    print(f"    host blast-dense {k['us_blast_minus_dense']:+8.1f} us/step  calls "
                          f"{k['calls_dense']:.0f} -> {k['calls_blast']:.0f}  {k['fn']}")
                for side in ("dense_profile", "profile"):
                    for k in row.get(side, []):
                        print(f"    {side[:5]} {k['us_per_iter']:8.1f} us  x{k['calls_per_iter']:.0f}  {k['name']}")
    write_json(args.out, f"train_mlp_{args.tag}.json", res)


if __name__ == "__main__":
    main()
