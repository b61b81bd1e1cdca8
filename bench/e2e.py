"""End-to-end generation: a Llama-3.2-1B-shaped model (or GPT2-XL, ``--arch``; random weights, MLP blocks zeroed)
under torch.compile, dense (default Inductor) vs backend="blast".

Decode: HF ``generate`` with a static KV cache, the forward compiled through
``CompileConfig`` (CUDA graphs via mode="reduce-overhead"), batch 1 and 8.
Bare decode loop (``--lean-only``): the compiled forward in a greedy loop without HF's per-token work, under --mode
and in default mode; ``--ceiling`` adds Inductor on the same model with its MLPs taken out, the most any MLP
speed-up could give. Prefill: one forward over 2048 tokens. Writes JSON to --out (``.partial`` after every row).

    python bench/e2e.py --out bench/results            # on the GPU machine
    python bench/e2e.py --layers 2 --small --out /tmp  # quick CPU smoke
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# dense and blast sides in one process: blast's kernels launched as in a process that compiles with blast first
from blast_compile.backend import enable_static_launch  # noqa: E402

enable_static_launch()


def build(args, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from blast_compile.testing import sparsify_mlps_

    if getattr(args, "arch", "llama-1b") == "gpt2-xl":  # Conv1D weights: the fused op reads torch.t(W) views
        d, h = (256, 1024) if args.small else (1600, 6400)
        cls, cfg = GPT2LMHeadModel, GPT2Config(
            n_embd=d, n_inner=h, n_layer=args.layers, n_head=d // 64, vocab_size=2048 if args.small else 50257,
            n_positions=max(1024, args.prefill, args.prompt + args.new), bos_token_id=0, eos_token_id=0)
    elif args.small:
        cls, cfg = LlamaForCausalLM, LlamaConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=args.layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096)
    else:  # Llama-3.2-1B shapes
        cls, cfg = LlamaForCausalLM, LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
            rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg).to(dtype).eval()
    n = sparsify_mlps_(model, args.sparsity, block=args.block)
    return model, cfg, n


class _NoMLP(torch.nn.Module):
    """Stands in for a decoder layer's MLP: adds nothing to the residual (the ceiling: what the rest of the model
    costs, so the MLPs' share of a token is the difference)."""

    def forward(self, x):
        return x.new_zeros(())


@contextlib.contextmanager
def mlps_removed(model):
    layers = [m for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]
    saved = [m.mlp for m in layers]
    for m in layers:
        m.mlp = _NoMLP()
    try:
        yield
    finally:
        for m, mlp in zip(layers, saved):
            m.mlp = mlp


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, reps, warmup=2):
    """Median wall time of ``fn()`` after ``warmup`` calls (compiles, CUDA-graph capture)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync(device)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def gen_tps(model, ids, new, compile_cfg, device, reps, forward=None):
    """Tokens/s of HF ``generate`` with a static cache: compiled through ``compile_cfg`` (HF's own path), or
    ``forward`` (``torch.compile(model.forward, ...)`` put in place of ``model.forward``, HF's compile off)."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                          pad_token_id=0, compile_config=compile_cfg, disable_compile=compile_cfg is None)
    out = []
    orig = model.forward
    if forward is not None:
        model.forward = forward
    try:
        t = median_seconds(lambda: out.append(model.generate(ids, generation_config=gc)), device, reps)
    finally:
        model.forward = orig
    return ids.shape[0] * new / t, out[-1]


def lean_decode_tps(model, fn, cfg, b, prompt, new, device, reps, trace=None):
    """Tokens/s of a bare greedy loop over ``fn`` (the compiled forward) with a static KV cache:
    what the forward costs without HF generate's per-token Python work. With ``trace`` (a path), one more
    loop runs under the profiler and returns ``(tokens/s, where the time went)`` (:func:`kernel_time`)."""
    from transformers import StaticCache

    def run(prof=contextlib.nullcontext()):
        cache = StaticCache(config=cfg, max_cache_len=prompt + new)
        ids = torch.randint(0, cfg.vocab_size, (b, prompt), device=device)
        pos = torch.arange(prompt, device=device)
        tok = model(ids, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1:].argmax(-1)
        sync(device)
        with prof:
            t = time.perf_counter()
            for i in range(new):
                pos = torch.tensor([prompt + i], device=device)
                tok = fn(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1:].argmax(-1)
            sync(device)
            t = time.perf_counter() - t
        return b * new / t

    with torch.no_grad():
        run()  # compile + CUDA graph capture
        tps = sorted(run() for _ in range(reps))[reps // 2]
        if trace is None:
            return tps
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        run(prof)
        prof.export_chrome_trace(trace)
        return tps, kernel_time(trace, new)


# the kernels of codegen's template (mlp_kernels.py.tmpl), as the profiler names them
BLAST_KERNELS = {"mlp_decode_in", "mlp_decode_dn", "mlp_hidden", "bsmm", "mlp_hidden_bwd", "sddmm", "sddmm_reduce",
                 "pack_blocks"}


def kernel_time(trace, tokens):
    """Per decode step (``*_per_token``: one token per sequence), from a profiler trace of the loop: the summed kernel time, the time the GPU was busy (kernels
    merged where they overlap), the wall time between the first kernel's start and the last one's end, and the
    kernels that took most of it -- so a gap to the ceiling splits into GPU work (whose) and idle GPU (host)."""
    with open(trace) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel" and "dur" in e]
    if not ev:
        return {"error": "no kernel events in the trace"}
    ev.sort(key=lambda e: e["ts"])
    busy, end = 0.0, -1e30
    for e in ev:  # union of [ts, ts + dur)
        s, t = e["ts"], e["ts"] + e["dur"]
        if t > end:
            busy += t - max(s, end)
            end = t
    span = max(e["ts"] + e["dur"] for e in ev) - ev[0]["ts"]
    by = {}
    for e in ev:
        n = e["name"]
        by[n] = by.get(n, 0.0) + e["dur"]
    top = sorted(by.items(), key=lambda kv: -kv[1])[:12]
    mlp = sum(v for n, v in by.items() if n in BLAST_KERNELS)
    return dict(kernels_per_token=len(ev) / tokens, kernel_us_per_token=sum(by.values()) / tokens,
                busy_us_per_token=busy / tokens, span_us_per_token=span / tokens, blast_kernel_us_per_token=mlp / tokens,
                top_us_per_token={n[:90]: v / tokens for n, v in top})


def prefill_ms(fn, ids, device, reps):
    return median_seconds(lambda: fn(ids), device, reps) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="llama-1b", choices=["llama-1b", "gpt2-xl"])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--small", action="store_true")
    p.add_argument("--lean-only", action="store_true", help="skip the HF generate rows")
    p.add_argument("--forward-compile", action="store_true",
                   help="also generate with model.forward = torch.compile(model.forward, ...)")
    p.add_argument("--skip-lean", action="store_true", help="skip the bare decode loop rows")
    p.add_argument("--skip-prefill", action="store_true", help="skip the prefill rows")
    p.add_argument("--skip-lean-default", action="store_true",
                   help="bare decode loop under --mode only, not also in default mode")
    p.add_argument("--prefill-logits", default="last,all",
                   help="prefill rows: 'last' (logits of the last position only, as HF generate's prefill asks with "
                        "logits_to_keep=1) and/or 'all' (every position's logits)")
    p.add_argument("--ceiling", action="store_true",
                   help="bare decode loop: also Inductor with every MLP taken out (the ceiling of an MLP speed-up)")
    p.add_argument("--cpp-wrapper", action="store_true",
                   help="torch._inductor.config.cpp_wrapper = True on every compiled side (launches without Python)")
    p.add_argument("--profile", action="store_true",
                   help="bare decode loop: one more loop under the profiler per row; where each token's time went")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    from transformers import CompileConfig

    import blast_compile  # noqa: F401  (not needed for backend="blast"; for the report)

    torch._inductor.config.cpp_wrapper = args.cpp_wrapper
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, cfg, n = build(args, device, dtype)
    res = dict(
        bench="e2e", date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, triton=__import__("triton").__version__ if device == "cuda" else None,
        model={"llama-1b": "Llama-3.2-1B shape", "gpt2-xl": "GPT2-XL shape"}[args.arch] + (" (small)" * args.small),
        layers=args.layers, sparsity=args.sparsity,
        block=args.block, mlp_weights_sparsified=n, mode=args.mode, cpp_wrapper=args.cpp_wrapper, decode={},
        prefill={},
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"e2e_{res['date'].replace(':', '')}{args.tag}.json")

    def save(final=False):  # after every row: a run cut by a time limit keeps what it measured
        with open(path if final else path + ".partial", "w") as f:
            json.dump(res, f, indent=1)
        if final and os.path.exists(path + ".partial"):
            os.remove(path + ".partial")

    mode = None if args.mode == "default" else args.mode
    variants = {
        "eager": None,
        "inductor": CompileConfig(backend="inductor", mode=mode),
        "blast": CompileConfig(backend="blast", mode=mode),
    }
    for cc in variants.values():
        if cc is not None:
            cc._compile_all_devices = True  # HF compiles only on CUDA unless told (CPU smoke runs)
    if args.forward_compile:  # the other way HF's docs give: model.forward = torch.compile(model.forward, ...)
        variants.update({f"{b}_forward": b for b in ("inductor", "blast")})
    from torch._dynamo.utils import counters
    for b in ([] if args.lean_only else [int(v) for v in args.batches.split(",")]):
        ids = torch.randint(0, cfg.vocab_size, (b, args.prompt), device=device)
        outs = {}
        for name, cc in variants.items():
            torch._dynamo.reset()
            counters.clear()
            try:
                if isinstance(cc, str):
                    tps, outs[name] = gen_tps(model, ids, args.new, None, device, args.reps,
                                              forward=torch.compile(model.forward, backend=cc, mode=mode))
                else:
                    tps, outs[name] = gen_tps(model, ids, args.new, cc, device, args.reps)
                res["decode"].setdefault(f"batch{b}", {})[name] = tps
            except Exception as e:  # report, don't hide
                res["decode"].setdefault(f"batch{b}", {})[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
            if name.startswith("blast"):
                res["decode"][f"batch{b}"][f"{name}_mlps_fused"] = counters["blast"]["mlp_fused"]
                res["decode"][f"batch{b}"][f"{name}_mlps_lowered"] = counters["blast"]["lowered"]
                # (a graph that fell back to the host path, or recompiled, explains a slow row)
                res["decode"][f"batch{b}"][f"{name}_blast_counters"] = dict(counters["blast"])
            res["decode"][f"batch{b}"][f"{name}_dynamo_stats"] = dict(counters["stats"])
            print(f"decode batch {b} {name}: {res['decode'][f'batch{b}'][name]}", flush=True)
            save()
        if "blast" in outs and "inductor" in outs:
            # greedy tokens agree for most positions (bf16 ties can flip late tokens)
            same = (outs["blast"] == outs["inductor"]).float().mean().item()
            res["decode"][f"batch{b}"]["token_agreement_blast_vs_inductor"] = same
    # the bare loop under --mode and, as a second table, in default mode (no CUDA graphs: host-bound,
    # H200 round 11: blast 0.42-0.48x Inductor -- each fused MLP call spends ~0.2-0.3 ms in Python)
    for key, mode in (("lean_decode", args.mode), ("lean_decode_default", None)):
        if args.skip_lean or (key == "lean_decode_default"
                              and (args.mode in (None, "default") or args.skip_lean_default)):
            continue
        res[key] = {}
        for b in [int(v) for v in args.batches.split(",")]:
            # "no_mlp": Inductor on the same model with every MLP taken out -- the ceiling of any MLP speed-up
            for name in ("inductor", "blast") + (("no_mlp",) if args.ceiling else ()):
                torch._dynamo.reset()
                off = mlps_removed(model) if name == "no_mlp" else contextlib.nullcontext()
                try:
                    with off:
                        fn = torch.compile(model, backend="inductor" if name == "no_mlp" else name,
                                           mode=None if mode == "default" else mode)
                        trace = (os.path.join(args.out, f"trace_{key}_b{b}_{name}{args.tag}.json")
                                 if args.profile else None)
                        got = lean_decode_tps(model, fn, cfg, b, args.prompt, args.new, device, args.reps, trace)
                        if trace:
                            got, res[key].setdefault(f"batch{b}", {})[f"{name}_profile"] = got
                            os.remove(trace)  # (big; the summary is kept)
                        res[key].setdefault(f"batch{b}", {})[name] = got
                except Exception as e:
                    res[key].setdefault(f"batch{b}", {})[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
                print(f"lean decode batch {b} {name}{f' ({mode})' if mode else ''}: {res[key][f'batch{b}'][name]}",
                      flush=True)
                save()
            row = res[key][f"batch{b}"]
            if all(isinstance(row.get(k), float) for k in ("inductor", "blast", "no_mlp")):
                # blast's speed-up, and the most any MLP speed-up could give (MLPs at zero cost)
                row["blast_vs_inductor"] = row["blast"] / row["inductor"]
                row["ceiling_vs_inductor"] = row["no_mlp"] / row["inductor"]
    ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=device)
    # default mode, then under CUDA graphs (--mode, both sides): without them a 2048-token prefill is
    # host-bound (H200, round 10: 6.6 ms of GPU work in a ~10-11 ms call, Inductor's launches and blast's op alike)
    res["prefill_graphs"] = {}
    # "prefill" / "prefill_graphs": every position's logits (the rows before 2026-12-07); "prefill_last*": the
    # last position's only, which is what HF generate's prefill computes (logits_to_keep=1) -- the LM head over
    # 2048 positions (a dense 2048 x 2048 x 128256 matmul and a 0.5 GB output) is then not part of either side
    res["prefill_last"], res["prefill_last_graphs"] = {}, {}
    for key, names, mode in (("prefill", ("eager", "inductor", "blast"), None),
                             ("prefill_graphs", ("inductor", "blast"), args.mode)):
        if args.skip_prefill or (key == "prefill_graphs" and args.mode in (None, "default")):
            continue
        for name in names:
            torch._dynamo.reset()
            fn = model if name == "eager" else torch.compile(model, backend=name, mode=mode)
            for logits in args.prefill_logits.split(","):
                k = key.replace("prefill", "prefill_last") if logits == "last" else key
                kw = {"logits_to_keep": 1} if logits == "last" else {}
                counters.clear()
                try:
                    res[k][name] = prefill_ms(lambda i: fn(i, use_cache=False, **kw).logits, ids, device, args.reps)
                except Exception as e:
                    res[k][name] = f"error: {type(e).__name__}: {str(e)[:300]}"
                if name == "blast":  # plans built over warm-up + reps calls: one per MLP if none is rebuilt
                    res[k]["blast_plans_built"] = counters["blast"]["plans_built"]
                print(f"prefill {args.prefill} logits={logits} {name}{f' ({mode})' if mode else ''}: {res[k][name]} ms",
                      flush=True)
                save()
    save(final=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
