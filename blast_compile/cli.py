"""``blast`` console script: ``blast demo`` (the main job) and ``blast memory-plan``."""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _time(fn, device, reps: int) -> float:
    """Median seconds of ``fn()`` (synchronizing on CUDA)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def demo(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from transformers import LlamaConfig, LlamaForCausalLM


    from blast_compile import backend
    from blast_compile.explain import ExplainReport
    from blast_compile.testing import sparsify_mlps_

    con = Console()
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
    reps = backend.REPORTS[start:]
    report = ExplainReport([c for r in reps for c in r.candidates], [r.code for r in reps],
                           [r.error for r in reps if r.error])
    print(report.table())
    con.print(f"first call (compile) {t_compile:.1f} s")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    con.print(f"[green]logits match eager[/] (relative error {err:.2e})")

    dense = torch.compile(model, mode=mode)  # Inductor, same model: its MLPs run dense
    with torch.no_grad():
        dense(ids, use_cache=False)
        rows = []
        for label, m in (("prefill", args.tokens), ("1 token", 1)):
            x = ids[:, :m]
            te = _time(lambda: model(x, use_cache=False), device, args.reps)
            td = _time(lambda: dense(x, use_cache=False), device, args.reps)
            tb = _time(lambda: compiled(x, use_cache=False), device, args.reps)
            rows.append((label, te, td, tb))
    t = Table(title=f"forward time on {device} (median of {args.reps}{', CUDA graphs' if mode else ''})")
    for c in ("input", "eager dense", "inductor dense", "blast", "blast vs inductor"):
        t.add_column(c)
    for label, te, td, tb in rows:
        t.add_row(label, f"{te * 1e3:.2f} ms", f"{td * 1e3:.2f} ms", f"{tb * 1e3:.2f} ms", f"{td / tb:.2f}x")
    con.print(t)
    if device == "cpu":
        con.print("(CPU runs the torch gather implementation; the speed target is the GPU, see BENCHMARKS.md)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="blast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile a block-sparse Llama-style model with backend='blast'")
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--hidden", type=int, default=512)
    d.add_argument("--intermediate", type=int, default=2048)
    d.add_argument("--sparsity", type=float, default=0.9)
    d.add_argument("--block", type=int, default=64)
    d.add_argument("--tokens", type=int, default=128)
    d.add_argument("--reps", type=int, default=10)
    sub.add_parser("memory-plan", help="weight memory and GPU count, dense vs block-sparse", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.cmd == "demo":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return demo(args)
    from . import memory_plan

    return memory_plan.main(rest)


if __name__ == "__main__":
    sys.exit(main())
