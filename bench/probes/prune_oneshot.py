"""One-shot block pruning of a causal LM's MLPs, no training: held-out perplexity after pruning the whole
model (with and without the least-squares refit), and per decoder layer (only that layer pruned), which
shows where the pruning damage comes from before any fine-tuning is spent on it. CPU is enough.

    python bench/probes/prune_oneshot.py .carry/smollm2_hf .carry/SmolLM2-135M-Instruct_tokens.safetensors \
        --sparsity 0.5,0.7 --per-layer 0.5 --dense-layers "0;0,29" --out bench/results/prune_oneshot_cpu.json

``--sequential``: layer by layer, each calibrated on the inputs the layers pruned before it give it (as SparseGPT
does), at the same uniform sparsity. ``--allocate global,global-rel``: the same overall sparsity of each projection
kind (gate/up, down) spread over the layers by one threshold on the block scores of all layers (``global``: the
activation scores as they are; ``global-rel``: each layer's scores divided by their sum, so a layer whose score sits
in few blocks keeps fewer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from blast_compile.sparsifier import BlastSparsifier  # noqa: E402
from blast_compile.sparsify.data import load_model, mlp_layers  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("tokens", help=".safetensors with 'train' and 'eval' token ids")
    ap.add_argument("--sparsity", default="0.5", help="comma list: whole-model one-shot pruning")
    ap.add_argument("--per-layer", type=float, default=0.0, help="also prune each layer alone at this sparsity")
    ap.add_argument("--dense-layers", default="", help="';'-separated comma lists, e.g. '0;0,29': whole-model runs "
                    "(with the refit) keeping these layers dense and the rest pruned harder, to the same overall sparsity")
    ap.add_argument("--allocate", default="", help="comma list of global, global-rel: whole-model runs (with the "
                    "refit) whose per-layer sparsity comes from one threshold over all layers")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform whole-model runs")
    ap.add_argument("--sequential", action="store_true", help="whole-model runs (refit; --dense-layers runs too) "
                    "pruned layer by layer, each calibrated after the ones before it were pruned")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=6144)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--score", default="activation", choices=("activation", "obs"),
                    help="block selection: W^2 E[x^2] (activation), or greedy OBS over the refit's objective (obs)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from safetensors.torch import load_file

    toks = {k: v.long() for k, v in load_file(a.tokens).items()}
    ev = toks["eval"][: a.eval_tokens // a.seq * a.seq].reshape(-1, a.seq)
    calib = toks["train"][: max(a.calib_tokens // a.seq, 1) * a.seq].reshape(-1, a.seq)
    model = load_model(a.model).float().eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def ppl():
        tot = 0.0
        for xb in ev.split(8):
            tot += model(input_ids=xb, labels=xb).loss.item() * xb.numel()
        return math.exp(tot / ev.numel())

    @torch.no_grad()
    def calibrate():
        for xb in calib.split(8):
            model.model(input_ids=xb, use_cache=False)  # (the body: the sparsified layers, no logits)

    def prune(s, layers, refit, allocate="", sequential=False):
        """Perplexity with ``layers`` pruned to ``s``; the model is dense again afterwards. ``sequential``: the
        sparsifier's, one layer after the other, each calibrated on the model pruned so far."""
        sp = BlastSparsifier(model, target_sparsity=s, block_size=a.block, end_step=2, update_every=1,
                             score=a.score if refit else "activation", reconstruct=refit, calibrate=calibrate,
                             layers=layers, declare=False,
                             sequential=sequential)
        if allocate:
            keep = global_keep(sp, s, allocate == "global-rel")
            sp._n_keep = lambda L, sparsity, rows=None: keep[L.name]
            res.setdefault("allocations", {})[f"{s} {allocate}"] = {n: 1 - k / sp.layers[n].mask.numel()
                                                                     for n, k in keep.items()}
        sp._update_masks(s)  # (the constructor calibrated: one mask update at the target, as at a ramp's end)
        sp.apply_masks()
        p = ppl()
        model.load_state_dict(base)
        return p

    res = {"model": a.model, "seq": a.seq, "eval_tokens": ev.numel(), "calib_tokens": calib.numel(),
           "block": a.block, "score": a.score, "torch": torch.__version__, "dense": ppl(), "whole": {}, "per_layer": {}}
    print("dense", round(res["dense"], 3), flush=True)
    all_layers = mlp_layers(model)
    sparsities = [float(v) for v in a.sparsity.split(",") if v]
    for s in ([] if a.no_uniform or a.sequential else sparsities):
        for refit in (False, True):
            t = time.time()
            p = prune(s, all_layers, refit)
            res["whole"][f"{s} {'refit' if refit else 'no refit'}"] = p
            print(f"whole model {s:.0%} {'refit' if refit else 'no refit'}: {p:,.2f} ({time.time() - t:.0f} s)", flush=True)

    for s in ([] if a.no_uniform or not a.sequential else sparsities):
        t = time.time()
        res["whole"][f"{s} refit, sequential"] = p = prune(s, all_layers, True, sequential=True)
        print(f"whole model {s:.0%}, sequential: {p:,.2f} ({time.time() - t:.0f} s)", flush=True)
    for how in (v for v in a.allocate.split(",") if v):
        for s in sparsities:
            res["whole"][f"{s} refit, {how} allocation"] = p = prune(s, all_layers, True, how)
            per = res["allocations"][f"{s} {how}"]
            print(f"whole model {s:.0%}, {how} allocation: {p:,.2f} (layer sparsity {min(per.values()):.2f}-"
                  f"{max(per.values()):.2f})", flush=True)
    n_layers = len(model.model.layers)
    for spec in (v for v in a.dense_layers.split(";") if v):
        skip = [int(i) for i in spec.split(",")]
        for s in sparsities:
            rest = s * n_layers / (n_layers - len(skip))
            p = prune(rest, mlp_layers(model, skip), True, sequential=a.sequential)
            res["whole"][f"{s} refit, {'sequential, ' * a.sequential}layers {spec} dense (the rest {rest:.3f})"] = p
            print(f"whole model {s:.0%}, layers {spec} dense, the rest {rest:.1%}: {p:,.2f}", flush=True)
    if a.per_layer:
        for i in range(n_layers):
            mine = [name for name in all_layers if name.startswith(f"model.layers.{i}.")]
            res["per_layer"][i] = p = prune(a.per_layer, mine, True)
            print(f"layer {i} alone at {a.per_layer:.0%}: {p:.2f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


@torch.no_grad()
def global_keep(sp, s: float, relative: bool) -> dict:
    """Blocks to keep per group (by its first layer's name): per projection kind, the top (1 - s) of the blocks
    of every layer together, by score (``relative``: each group's scores over their sum)."""
    kinds = {}
    for names in sp.groups:
        score = sum(sp._score(sp.layers[n]) for n in names).float()
        if relative:
            score = score / score.sum()
        kinds.setdefault(names[0].rpartition(".")[2] == "down_proj", []).append((names[0], score))
    keep = {}
    for groups in kinds.values():
        scores = torch.cat([sc.flatten() for _, sc in groups])
        threshold = scores.topk(max(1, round((1 - s) * scores.numel()))).values.min()
        keep.update({name: max(1, int((sc >= threshold).sum())) for name, sc in groups})
    return keep


if __name__ == "__main__":
    main()
