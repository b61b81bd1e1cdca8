"""Inference memory: dense vs compressed block-sparse MLP weights (blast_compile.compress).

Llama-3.2-1B- and Llama-3.1-8B-shaped models (random bf16 weights built on the GPU),
MLP blocks (64x64) zeroed at 0/50/90/95% sparsity. Masks are nested (one random
block order per weight, the first ``round(s*n)`` blocks dead), so one dense model
serves every sparsity: zero more blocks, measure dense, ``compress_``, measure,
``decompress_``, next sparsity. For each: allocated bytes after build/compress
(``torch.cuda.memory_allocated``), peak during a prefill forward
(``max_memory_allocated``), peak during ``compress_``, and the theoretical
numbers from :mod:`blast_compile.memory_plan` (only the MLP shrinks; index
overhead counted). ``reduction_vs_theory`` = achieved / theoretical saved bytes
(target >= 0.95). Writes JSON to --out.

    python bench/memory.py --out bench/results                  # GPU machine, ~1-2 min
    python bench/memory.py --small --device cpu --out /tmp      # CPU smoke test
"""
import argparse
import datetime
import gc
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._results import write_json  # noqa: E402
from blast_compile import compress as C  # noqa: E402
from blast_compile import memory_plan  # noqa: E402
from blast_compile.formats import cdiv  # noqa: E402
from blast_compile.testing import mlp_weights  # noqa: E402

SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True, head_dim=64)


def allocated(model, device):
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def tensor_bytes(model):
    ts = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in ts.values())


def build(cfg_dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_dict, max_position_embeddings=4096, rope_theta=500000.0)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return cfg, model


def block_orders(model, block, seed=0):
    """One random order of the blocks of every MLP weight (nested masks across sparsities)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    mlp = mlp_weights(model)
    for name, p in model.named_parameters():
        if p.dim() == 2 and name in mlp:
            nr, nc = cdiv(p.shape[0], block), cdiv(p.shape[1], block)
            out[name] = torch.randperm(nr * nc, generator=g)
    return out


@torch.no_grad()
def zero_blocks(model, orders, sparsity, block):
    params = dict(model.named_parameters())
    for name, perm in orders.items():
        w = params[name]
        nr, nc = cdiv(w.shape[0], block), cdiv(w.shape[1], block)
        keep = torch.ones(nr * nc, dtype=torch.bool)
        keep[perm[: int(round(sparsity * nr * nc))]] = False
        m = keep.reshape(nr, nc).to(w.device)
        full = m.repeat_interleave(block, 0).repeat_interleave(block, 1)[: w.shape[0], : w.shape[1]]
        w.mul_(full)
        del full


def forward_peak(model, ids, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(ids).logits[:, -8:].float()
    if device == "cuda":
        torch.cuda.synchronize()
    return logits, (torch.cuda.max_memory_allocated() if device == "cuda" else None), time.perf_counter() - t


def run_model(name, cfg_dict, args, device, dtype, results):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    base = allocated(torch.nn.Module(), device) if device == "cuda" else 0
    t0 = time.perf_counter()
    cfg, model = build(cfg_dict, device, dtype)
    t_build = time.perf_counter() - t0
    orders = block_orders(model, args.block)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), device=device)
    for s in args.sparsity:
        t0 = time.perf_counter()
        zero_blocks(model, orders, s, args.block)
        dense_alloc = allocated(model, device) - base
        dense_bytes = tensor_bytes(model)
        ref, peak_dense, t_dense = forward_peak(model, ids, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tc = time.perf_counter()
        rep = C.compress_(model, min_sparsity=args.min_sparsity, block_sizes=tuple(args.block_sizes))
        gc.collect()
        t_compress = time.perf_counter() - tc
        peak_compress = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
        sparse_alloc = allocated(model, device) - base
        sparse_bytes = tensor_bytes(model)
        out, peak_sparse, t_sparse = forward_peak(model, ids, device)
        err = ((out - ref).norm() / ref.norm()).item()
        theory = memory_plan.plan(cfg_dict, s, block=args.block, dtype_bytes=torch.finfo(dtype).bits // 8)
        t_saved = theory.dense_bytes - theory.sparse_bytes
        row = dict(
            model=name, sparsity=s, block=args.block, tokens=args.tokens,
            mlps_compressed=len(rep.compressed), mlps=len(rep.mlps),
            blocks_chosen=sorted({tuple(r.block) for r in rep.compressed}),
            shared_gate_up=sum(r.shared_in_mask for r in rep.compressed),
            dense_alloc_bytes=dense_alloc, sparse_alloc_bytes=sparse_alloc,
            dense_tensor_bytes=dense_bytes, sparse_tensor_bytes=sparse_bytes,
            theory_dense_bytes=theory.dense_bytes, theory_sparse_bytes=theory.sparse_bytes,
            theory_index_bytes=theory.index_bytes, report_bytes_saved=rep.bytes_saved,
            saved_alloc_bytes=dense_alloc - sparse_alloc, theory_saved_bytes=t_saved,
            reduction_vs_theory=((dense_alloc - sparse_alloc) / t_saved) if rep.compressed and t_saved > 0 else None,
            peak_forward_dense_bytes=peak_dense and peak_dense - base,
            peak_forward_sparse_bytes=peak_sparse and peak_sparse - base,
            peak_compress_bytes=peak_compress,
            logits_rel_err=err, t_forward_dense_s=t_dense, t_forward_sparse_s=t_sparse,
            t_compress_s=t_compress, t_build_s=t_build,
        )
        results.append(row)
        g = 2**30
        rvt = row["reduction_vs_theory"]
        print(f"{name} s={s:.2f}: alloc {dense_alloc / g:.2f} -> {sparse_alloc / g:.2f} GiB "
              f"(theory {theory.dense_bytes / g:.2f} -> {theory.sparse_bytes / g:.2f}; "
              f"achieved/theory {'n/a' if rvt is None else f'{rvt:.4f}'}), "
              f"peak fwd {0 if peak_dense is None else (peak_dense - base) / g:.2f} -> "
              f"{0 if peak_sparse is None else (peak_sparse - base) / g:.2f} GiB, rel err {err:.1e}, "
              f"compress {t_compress:.1f} s, {time.perf_counter() - t0:.1f} s total", flush=True)
        if err > args.max_err:
            raise SystemExit(f"compressed model differs from dense: relative error {err:.3e}")
        C.decompress_(model)
        del out, ref
    del model
    gc.collect()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    p.add_argument("--small", action="store_true", help="a tiny Llama config instead (CPU smoke test)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.95])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--min-sparsity", type=float, default=0.3)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--max-err", type=float, default=2e-2)
    args = p.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = {"small": SMALL} if args.small else {m: memory_plan.CONFIGS[m] for m in args.models}
    res = dict(
        bench="memory", date=datetime.datetime.now().isoformat(timespec="seconds"), device=device,
        gpu=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        torch=torch.__version__, dtype=str(dtype), results=[],
    )
    t0 = time.perf_counter()
    for name, cfg in models.items():
        run_model(name, cfg, args, device, dtype, res["results"])
    res["wall_s"] = time.perf_counter() - t0
    ok = [r["reduction_vs_theory"] for r in res["results"] if r["reduction_vs_theory"] is not None]
    res["min_reduction_vs_theory"] = min(ok) if ok else None
    print(f"min achieved/theoretical reduction: {res['min_reduction_vs_theory']} (target >= 0.95); "
          f"{res['wall_s']:.0f} s")
    write_json(args.out, f"memory_{res['date'].replace(':', '')}.json", res)


if __name__ == "__main__":
    main()
