"""Default mode (no CUDA graphs) vs CUDA graphs: a stack of residual SwiGLU MLPs, dense and block-sparse.

The layer stack of issue 23: ``--layers`` residual MLPs ``x = x + down(silu(gate(x)) * up(x))``, 90 % of the
64x64 blocks dead (gate and up share a mask), bf16, timed as a whole and divided by the layer count. Per
shape and M, in one process:

* ``eager``: the dense model, no compile (the x-baseline);
* ``inductor`` / ``inductor_ro``: the dense model under ``torch.compile`` default / ``mode="reduce-overhead"``;
* ``blast`` / ``blast_ro``: ``backend="blast"`` (fused MLPs lowered into Inductor's code) default / reduce-overhead;
* ``blast_opaque``: ``backend="blast", options={"lower": False}`` (the opaque op with Python per call);
* ``blast_splitk`` / ``blast_splitk_ro``: ``blast`` / ``blast_ro`` with the lowered decode on split-K
  (``configs.DECODE_PATH = "splitk"``); ``blast_sliced`` / ``blast_sliced_ro`` and ``blast_pf`` / ``blast_pf_ro``:
  on the sliced path without / with kernel 1 prefetching W2 (``"sliced"`` / ``"sliced_pf"``; ``blast`` picks
  among these and split-K by timing);
* ``inductor_cpp`` / ``blast_cpp``: ``inductor`` / ``blast`` with ``torch._inductor.config.cpp_wrapper = True``
  (Inductor's wrapper in C++: its launches, ours included, without Python per kernel);
* ``blast_aoti`` / ``inductor_aoti``: AOTInductor packages (``blast_compile.export.aoti_package`` / plain
  ``torch.export``), loaded with ``aoti_load_package`` (static shapes).

µs per MLP: CUDA events around a window of back-to-back calls (a host-bound call shows as its host time),
median of windows. Host µs per MLP: the Python call alone (launches are asynchronous), after a sync, median.

    python bench/default_mode.py --out bench/results                   # on the GPU machine
    python bench/default_mode.py --shapes tiny --ms 1,64 --out /tmp     # quick CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The dense sides compile first and would start Inductor's compile workers before blast sets what lets them launch
# its kernels statically (option static_launch): set it now, as in a process that compiles with blast first
# (Inductor's own kernels do not read it). --triton-launcher times blast through Triton's Python launcher instead.
if "--triton-launcher" not in sys.argv:
    from blast_compile.backend import enable_static_launch

    enable_static_launch()

SHAPES = {"1b": (2048, 8192), "8b": (4096, 14336), "tiny": (256, 1024)}


class Stack(torch.nn.Module):
    def __init__(self, d, h, n):
        super().__init__()
        from blast_compile.testing import SwiGLU

        self.mlps = torch.nn.ModuleList(SwiGLU(d, h) for _ in range(n))

    def forward(self, x):
        for mlp in self.mlps:
            x = x + mlp(x)
        return x


def build(shape, layers, sparsity, block, device, dtype):
    from blast_compile.testing import sparsify_mlps_

    d, h = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):
        m = Stack(d, h, layers).to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    sparsify_mlps_(m, sparsity, block=block)
    return m


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def window_us(fn, x, calls, windows):
    """Median over ``windows`` of the mean µs per call of ``calls`` back-to-back calls."""
    ts = []
    for _ in range(windows):
        sync()
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(calls):
                fn(x)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn(x)
            ts.append((time.perf_counter() - t) * 1e6 / calls)
    return sorted(ts)[len(ts) // 2]


def host_us(fn, x, calls):
    """Median µs the Python call takes with an idle GPU queue (its kernels run after it returns)."""
    ts = []
    for _ in range(calls):
        sync()
        t = time.perf_counter()
        fn(x)
        ts.append((time.perf_counter() - t) * 1e6)
    sync()
    return sorted(ts)[len(ts) // 2]


MODES = {
    "eager": None,
    "inductor": dict(backend="inductor"),
    "inductor_ro": dict(backend="inductor", mode="reduce-overhead"),
    "blast": dict(backend="blast"),
    "blast_ro": dict(backend="blast", mode="reduce-overhead"),
    "blast_opaque": dict(backend="blast", options={"lower": False}),
    # the lowered decode on split-K (configs.DECODE_PATH; its scratch passed by address) instead of sliced
    "blast_splitk": dict(backend="blast", decode_path="splitk"),
    "blast_splitk_ro": dict(backend="blast", mode="reduce-overhead", decode_path="splitk"),
    # ... on the sliced path, without / with W2 prefetched into L2 by kernel 1
    "blast_sliced": dict(backend="blast", decode_path="sliced"),
    "blast_sliced_ro": dict(backend="blast", mode="reduce-overhead", decode_path="sliced"),
    "blast_pf": dict(backend="blast", decode_path="sliced_pf"),
    "blast_pf_ro": dict(backend="blast", mode="reduce-overhead", decode_path="sliced_pf"),
    # Inductor's wrapper code in C++ instead of Python (default mode's host cost is the launches)
    "inductor_cpp": dict(backend="inductor", cpp_wrapper=True),
    "blast_cpp": dict(backend="blast", cpp_wrapper=True),
    "blast_aoti": "aoti",  # blast_compile.export.aoti_package, loaded with aoti_load_package
    "inductor_aoti": "aoti",  # the dense model through plain torch.export + AOTInductor
}


def aoti(model, x, mode):
    """An AOTInductor package of ``model`` for inputs shaped like ``x``, loaded back (static shapes)."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), f"{mode}.pt2")
    if mode == "blast_aoti":
        from blast_compile.export import aoti_package

        aoti_package(model, (x,), path)
    else:
        with torch.no_grad():
            ep = torch.export.export(model, (x,))
        # (the compiler aoti_package would pick: a libstdc++ linked in statically crashes a package on load)
        from blast_compile.export import _shared_libstdcxx

        torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=_shared_libstdcxx(None))
    return torch._inductor.aoti_load_package(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1b,8b", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--ms", default="1,16,128,1024,4096", help="rows per call (M)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--calls", type=int, default=30, help="calls per timed window")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--triton-launcher", action="store_true",
                   help="lowered kernels through Triton's Python launcher (blast option static_launch=False)")
    args = p.parse_args()

    import blast_compile  # noqa: F401
    from torch._dynamo.utils import counters

    from blast_compile.ops import configs

    from bench._results import write_json

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        from bench._results import run_meta

        res = run_meta(bench="default_mode", layers=args.layers, sparsity=args.sparsity, block=args.block)
    else:
        res = dict(bench="default_mode", device="cpu", torch=torch.__version__)
    res["rows"] = []
    name = f"default_mode_{'cuda' if cuda else 'cpu'}{args.tag}.json"
    os.makedirs(args.out, exist_ok=True)
    for shape in args.shapes.split(","):
        model = build(shape, args.layers, args.sparsity, args.block, device, dtype)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, SHAPES[shape][0], device=device, dtype=dtype)
            ref = None
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                counters.clear()
                row = dict(shape=shape, m=m, mode=mode)
                try:
                    kw = MODES[mode]
                    if isinstance(kw, dict):
                        kw = dict(kw)
                        configs.DECODE_PATH = kw.pop("decode_path", "")
                        torch._inductor.config.cpp_wrapper = kw.pop("cpp_wrapper", False)
                        if args.triton_launcher and kw.get("backend") == "blast":
                            kw["options"] = {**kw.get("options", {}), "static_launch": False}
                    if kw == "aoti":
                        fn = aoti(model, x, mode)
                    else:
                        fn = model if kw is None else torch.compile(model, dynamic=False, **kw)
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        y = fn(x)
                        sync()
                        row["first_call_s"] = round(time.perf_counter() - t0, 2)
                        for _ in range(3):
                            y = fn(x)
                        if ref is None:
                            ref = y.float()
                        row["max_err_vs_first"] = float((y.float() - ref).abs().max())
                        row["us_per_mlp"] = window_us(fn, x, args.calls, args.windows) / args.layers
                        row["host_us_per_mlp"] = host_us(fn, x, 20) / args.layers
                    row["lowered"] = counters["blast"]["lowered"]
                    row["fused"] = counters["blast"]["mlp_fused"]
                except Exception as e:  # report, don't hide
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                finally:
                    configs.DECODE_PATH = ""
                    torch._inductor.config.cpp_wrapper = False
                res["rows"].append(row)
                print(row, flush=True)
                with open(os.path.join(args.out, name + ".partial"), "w") as f:  # (a call cut short keeps its rows)
                    json.dump(res, f)
        del model
        if cuda:
            torch.cuda.empty_cache()
    path = write_json(args.out, name, res)
    os.remove(os.path.join(args.out, name + ".partial"))
    table(res)
    return path


def table(res):
    """Markdown table: µs per MLP (x dense eager), host µs per MLP in brackets."""
    rows = res["rows"]
    ms = sorted({r["m"] for r in rows})
    print(f"\n{res.get('device')}, torch {res.get('torch')}, triton {res.get('triton')}, {res.get('date')}\n")
    print("| shape | mode | " + " | ".join(f"M={m}" for m in ms) + " |")
    print("|---|---|" + "---|" * len(ms))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            cells = []
            for m in ms:
                r = next((r for r in rows if (r["shape"], r["mode"], r["m"]) == (shape, mode, m)), None)
                e = next((r for r in rows if (r["shape"], r["mode"], r["m"]) == (shape, "eager", m)), None)
                if r is None or "us_per_mlp" not in r:
                    cells.append("-" if r is None else "error")
                    continue
                x = f" ({e['us_per_mlp'] / r['us_per_mlp']:.2f}x)" if e and "us_per_mlp" in e else ""
                cells.append(f"{r['us_per_mlp']:.1f}{x} [{r['host_us_per_mlp']:.0f}]")
            print(f"| {shape} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
