"""``blast`` console script: ``blast demo`` (the main job), ``blast sparsify`` and ``blast memory-plan``."""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from typing import Optional


def fraction(lo_open: bool = True):
    """argparse type: a float in (0, 1) (``lo_open=False``: in [0, 1)), with a message naming the range."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ((0.0 < v) if lo_open else (0.0 <= v)) or not v < 1.0:
            rng = "(0, 1)" if lo_open else "[0, 1)"
            raise argparse.ArgumentTypeError(f"{v:g} is outside {rng}: the fraction of blocks that are zero, e.g. 0.9")
        return v

    return parse


def number(lo: float, lo_closed: bool, hi: Optional[float] = None, kind=float):
    """argparse type: a finite number above ``lo`` (or at it, ``lo_closed``), at most ``hi``."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or v < lo or (v == lo and not lo_closed) or (hi is not None and v > hi):
            rng = f"{'[' if lo_closed else '('}{lo:g}, {'inf)' if hi is None else f'{hi:g}]'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {rng}")
        return v

    return parse


def width(text: str) -> int:
    """The demo model's width: 8 attention heads of an even width (rotary embeddings pair the features)."""
    v = positive_int(text)
    if v % 16:
        raise argparse.ArgumentTypeError(f"{v} is not a multiple of 16 (8 attention heads of an even width)")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _timings(fns: dict, device: str, reps: int) -> dict:
    """Seconds per call of each ``fns`` entry over ``reps`` rounds, the sides interleaved within each
    round (machine noise hits every side alike); on CUDA also the host's share: time until the call
    returns (kernels queued) over time until the GPU is done."""
    import torch

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for fn in fns.values():  # warm-up (CUDA graph recording, caches)
        fn(), fn()
    sync()
    total = {k: [] for k in fns}
    host = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            t_host = time.perf_counter()
            sync()
            t_end = time.perf_counter()
            total[k].append(t_end - t)
            host[k].append(t_host - t)
    return {k: (total[k], host[k] if cuda else None) for k in fns}


def _ms(ts) -> str:
    """median (min-max) in ms"""
    return f"{statistics.median(ts) * 1e3:.3g} ({min(ts) * 1e3:.3g}-{max(ts) * 1e3:.3g})"


def demo(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import LlamaConfig, LlamaForCausalLM

    from blast_compile import backend
    from blast_compile.explain import ExplainReport
    from blast_compile.testing import sparsify_mlps_

    con = Console(width=shutil.get_terminal_size((120, 24)).columns)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=4096, max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    n = sparsify_mlps_(model, args.sparsity, block=args.block)
    con.print(f"[bold]blast demo[/]: Llama-style model, {args.layers} layers, MLP {args.hidden}->{args.intermediate} "
              f"SwiGLU, {n} MLP weights with {args.sparsity:.0%} of {args.block}x{args.block} blocks zeroed; "
              f"{device}, {dtype}")
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), device=device)

    # On a GPU both sides get CUDA graphs: a small model's step is otherwise mostly launch overhead.
    mode = "reduce-overhead" if device == "cuda" else None
    start = len(backend.REPORTS)
    compiled = torch.compile(model, backend="blast", mode=mode)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = compiled(ids, use_cache=False).logits.clone()
        t_compile = time.perf_counter() - t0
        ref = model(ids, use_cache=False).logits
    print(ExplainReport.from_reports(backend.REPORTS[start:], model).table())
    con.print(f"first call (compile) {t_compile:.1f} s")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    con.print(f"[green]logits match eager[/] (relative error {err:.2e})")

    dense = torch.compile(model, mode=mode)  # Inductor, same model: its MLPs run dense
    sides = {"eager dense": model, "inductor dense": dense, "blast": compiled}
    t = Table(title=f"forward time on {device}, ms: median (min-max) of {args.reps} rounds"
                    f"{', CUDA graphs' if mode else ''}")
    for c in ("input", *sides, "blast vs inductor"):
        t.add_column(c)
    notes = []
    with torch.no_grad():
        dense(ids, use_cache=False)
        for label, m in (("prefill", args.tokens), ("1 token", 1)):
            x = ids[:, :m]
            res = _timings({k: (lambda f=f: f(x, use_cache=False)) for k, f in sides.items()}, device, args.reps)
            ratios = [d / b for d, b in zip(res["inductor dense"][0], res["blast"][0])]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            t.add_row(label, *(_ms(res[k][0]) for k in sides),
                      f"{statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f})")
            for k, (tot, host) in res.items():
                if host is not None:
                    share = statistics.median(h / s for h, s in zip(host, tot))
                    if share > 0.8:  # the GPU waits for the host: Python, dispatch and launches set the time
                        notes.append(f"{label}, {k}: host-bound (the call returns after {share:.0%} of its time)")
    con.print(t)
    con.print("(blast vs inductor: median of the per-round ratios (quartiles); > 1 means blast is faster)")
    for s in notes:
        con.print(s)
    if device == "cuda" and not notes:
        con.print("no side is host-bound: every call returns well before its kernels finish")
    if device == "cpu":
        con.print("(on CPU the host does all the work, so no side waits for it: host-bound applies on CUDA, where "
                  "this demo reports it. CPU runs the torch gather path; the speed target is the GPU, see "
                  "BENCHMARKS.md)")
    return 0


def sparsify(args, parser) -> int:
    """``blast sparsify``: bad input is a usage error naming the argument (exit 2), before any training."""
    import logging

    from . import sparsify as sps

    lg = logging.getLogger("blast_compile.sparsify")
    h = logging.StreamHandler()  # (this call's stderr; removed after it)
    h.setFormatter(logging.Formatter("%(message)s"))
    lg.addHandler(h)
    level, lg.level = lg.level, logging.INFO
    try:
        rep = sps.run(sps.from_args(args))
    except sps.SparsifyError as e:
        parser.exit(2, f"blast sparsify: error: {e}\n")
    finally:
        lg.removeHandler(h)
        lg.setLevel(level)
    if rep["status"] == "stopped":
        print(f"stopped after {rep['tokens_trained']:,} tokens; checkpoint {rep['checkpoint']} (--resume continues)")
        return 130 if rep.get("interrupted") else 0
    print(sps.render(rep))
    return 0


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" where the help does not say its own default and the default is a value (a
    ``None`` stands for "decided later", which the help explains, or for a required option)."""

    def _get_help_string(self, action):
        h = action.help or ""
        return h if "default:" in h or action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blast", description="blast-compile: block-sparse MLPs as a torch.compile backend.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{demo,sparsify,memory-plan}")
    d = sub.add_parser(
        "demo", help="compile a block-sparse Llama-style model with backend='blast'",
        description="Build a small random Llama-style model, zero a fraction of its MLP weight blocks, compile it "
                    "with backend='blast', check the logits against eager and time it against eager and Inductor.",
        formatter_class=_Defaults)
    d.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    d.add_argument("--hidden", type=width, default=512, help="model width (MLP input/output features)")
    d.add_argument("--intermediate", type=positive_int, default=2048, help="MLP hidden features")
    d.add_argument("--sparsity", type=fraction(), default=0.9, help="fraction of MLP weight blocks set to zero, in (0, 1)")
    d.add_argument("--block", type=positive_int, default=64, help="block size (square) of the zeroed blocks")
    d.add_argument("--tokens", type=positive_int, default=128, help="prompt length of the prefill row")
    d.add_argument("--reps", type=positive_int, default=10, help="timed rounds per row")
    from .sparsify.options import add_arguments

    s = sub.add_parser(
        "sparsify", help="pretrained causal LM + text -> block-sparse model (BLaST), with a held-out report",
        description="Fine-tune a pretrained causal LM (transformers directory or .gguf) on text while pruning its "
                    "MLP weight blocks (calibrated scores, refit, distillation from the dense model, a cubic ramp "
                    "by tokens), then save the block-sparse model (blast_compile.compress) and masks and report "
                    "held-out perplexity dense vs sparse, live blocks per layer and the fused MLP's speed.",
        formatter_class=_Defaults)
    add_arguments(s)
    sub.add_parser("memory-plan", help="weight memory and GPU count, dense vs block-sparse "
                                       "(blast memory-plan --help for its options)", add_help=False)
    return p


def main(argv=None) -> int:
    p = _parser()
    args, rest = p.parse_known_args(argv)
    if args.cmd in ("demo", "sparsify") and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "demo":
        return demo(args)
    if args.cmd == "sparsify":
        return sparsify(args, p)
    from . import memory_plan

    return memory_plan.main(rest)


if __name__ == "__main__":
    sys.exit(main())
