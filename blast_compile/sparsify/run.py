"""One ``blast sparsify`` run: pretrained model + text -> block-sparse model, held-out report, saved files.

The loop: AdamW on the whole model (bf16 autocast on CUDA, fp32 master weights), the loss the next-token
cross entropy plus ``distill`` x KL to the frozen pretrained model, while :class:`BlastSparsifier` ramps the
MLP block sparsity (cubic, over the first ``1 - freeze_last`` of the budget; blocks chosen on calibration
inputs and a refit at each mask update). While masks move, training runs through Inductor; once they are
frozen it runs through ``torch.compile(backend="blast")`` (the fused op computes forward and backward on live
blocks only) and the sparsifier hands its upkeep off. Everything that defines the run is counted in tokens.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import statistics
import threading
import time
from typing import Dict, Optional

import torch
from torch import nn
from torch._dynamo.utils import counters

from .. import layouts
from . import checkpoint as ckpt
from .data import batch_starts, check_model, load_data, load_model, load_tokenizer, mlp_layers
from .options import Options, SparsifyError, check
from .report import bench_mlp, live_by_layer, perplexity, plot_curves

log = logging.getLogger("blast_compile.sparsify")

CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"  # the weights of the best validation point so far (--keep best)
WARMUP_STEPS = 3  # steps after a compile left out of tokens/s
LOG_EVERY = 10  # steps between loss reads (each one waits for the GPU)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, in fp32: the dense model's whole next-token distribution is a
    richer target than the one observed token, and a pruned model has to relearn exactly that."""
    t = torch.log_softmax(teacher_logits.flatten(0, 1).float(), -1)
    s = torch.log_softmax(student_logits.flatten(0, 1).float(), -1)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


class Objective(nn.Module):
    """Model + loss in one module, so that one ``torch.compile`` covers the loss over the vocabulary too.
    Returns (loss to minimize, the plain LM loss: comparable across runs with and without distillation)."""

    def __init__(self, model: nn.Module, distill: float):
        super().__init__()
        self.model, self.distill = model, float(distill)

    def forward(self, x, y, teacher_logits: Optional[torch.Tensor] = None):
        logits = self.model(input_ids=x, use_cache=False).logits
        lm = nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if teacher_logits is None:
            return lm, lm.detach()
        return lm + self.distill * distill_loss(logits, teacher_logits), lm.detach()


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x, use_cache=False).logits


def lr_at(step: int, steps: int, o: Options) -> float:
    warm = round(o.warmup * steps)
    if step < warm:
        return o.lr * (step + 1) / warm
    if o.schedule == "constant":
        return o.lr
    p = (step - warm) / max(1, steps - warm)
    return o.lr * (o.min_lr + (1 - o.min_lr) * 0.5 * (1 + math.cos(math.pi * p)))


def _compile(module: nn.Module, backend: str, mode: str, o: Options) -> nn.Module:
    if mode == "none":
        return module
    from ..backend import enable_static_launch

    enable_static_launch()  # (before the dense phase's compile starts Inductor's workers: see its docstring)
    graphs = mode == "reduce-overhead"
    if backend == "blast":  # (torch.compile takes a mode or options, not both: the mode's Inductor key)
        opts = {"triton.cudagraphs": True} if graphs else {}
        if o.blast_min_sparsity is not None:
            opts["min_sparsity"] = o.blast_min_sparsity
        return torch.compile(module, backend="blast", options=opts or None)
    return torch.compile(module, mode="reduce-overhead" if graphs else None)


def _check_fused(sp, state, before):
    """After the first step through backend="blast": how many sparsified MLPs its graphs fused (``before``: the
    blast counters when it was compiled). Fewer than were sparsified means the sparse phase trains those at
    dense speed: say so, with the backend's reasons."""
    c = {k: v - before.get(k, 0) for k, v in counters["blast"].items()}
    state["fused_in_training"] = fused = int(c.get("mlp_fused", 0))
    mlps = len({name.rpartition(".")[0] for name in sp.layers})  # (sp.layers: the MLPs' linears)
    if fused < mlps:
        why = ", ".join(f"{k[6:]} x{v}" for k, v in sorted(c.items()) if k.startswith("dense_") and v) or "no MLP matched"
        log.warning("backend='blast' fused %d of the %d sparsified MLPs (kept dense: %s): those train at dense "
                    "speed; blast_compile.explain(model, x) shows why", fused, mlps, why)


class Meter:
    """Training tokens/s per phase over steady stretches (no compile warm-up, mask update, eval or save
    inside): synchronizes only where a stretch starts or ends, never per step."""

    def __init__(self, cuda: bool, totals: Optional[dict] = None):
        self.cuda, self.t0, self.phase = cuda, None, None
        self.totals = {k: list(v) for k, v in (totals or {}).items()}  # phase -> [seconds, tokens]

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self, phase: str):
        if self.t0 is None:
            self._sync()
            self.t0, self.phase = time.perf_counter(), phase
            self.totals.setdefault(phase, [0.0, 0])

    def stop(self):
        if self.t0 is not None:
            self._sync()
            self.totals[self.phase][0] += time.perf_counter() - self.t0
            self.t0 = None

    def count(self, tokens: int):
        if self.t0 is not None:
            self.totals[self.phase][1] += tokens

    def tok_s(self) -> Dict[str, float]:
        return {k: n / s for k, (s, n) in self.totals.items() if s > 0 and n > 0}


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C (SIGINT) asks the loop to stop at the end of the current step, with a checkpoint (a step cut
    in half would leave weights, optimizer and masks out of step); a second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    flag = []

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)
        log.warning("interrupted: stopping after this step with a checkpoint (Ctrl-C again: at once)")

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(flag)
    finally:
        signal.signal(signal.SIGINT, old)


def split_validation(train_ids: torch.Tensor, o: Options):
    """(training ids, validation ids or None): the last ``val_fraction`` of the training tokens (at least one
    window) held out of training. It chooses the kept model; the report's held-out sets never do."""
    if not o.val_fraction:
        return train_ids, None
    n = train_ids.numel()
    n_val = max(int(n * o.val_fraction), o.seq + 1)
    if n - n_val < o.seq + 1:
        raise SparsifyError("--val-fraction", f"the training text has {n:,} tokens: too few for a validation "
                                              f"split of {n_val:,} and one training window (--val-fraction 0 "
                                              "--keep last: no validation)")
    train_ids, val_ids = train_ids[: n - n_val], train_ids[n - n_val:]
    passes = o.tokens / train_ids.numel()
    if passes > 2:
        log.warning("--tokens %s is %.1f passes over the %s training tokens: the model will likely overfit "
                    "them; %s", f"{o.tokens:,}", passes, f"{train_ids.numel():,}",
                    "the saved model is the one with the best validation perplexity (--keep best)"
                    if o.keep == "best" else "with --keep last the saved model is the overfit one")
    return train_ids, val_ids


class Best:
    """Validation perplexity at each evaluation, and (``--keep best``) the weights of the best point that
    is eligible (final masks), in OUT/best.safetensors or, without OUT, in memory."""

    def __init__(self, o: Options, model: nn.Module, val_ids, dev, amp):
        self.o, self.model, self.val_ids, self.dev, self.amp = o, model, val_ids, dev, amp
        self.path = os.path.join(o.out, BEST) if o.out else None
        self.mem = None

    def ppl(self) -> Optional[float]:
        if self.val_ids is None:
            return None
        return perplexity(self.model, self.val_ids, self.o.seq, self.o.batch, self.dev, self.amp)

    def offer(self, state: dict, point: dict, final: bool) -> bool:
        """Keep ``point``'s weights if they are the best eligible so far; True when kept."""
        if self.o.keep != "best" or point["val"] is None or not final or not math.isfinite(point["val"]):
            return False
        if state.get("best") is not None and point["val"] >= state["best"]["val"]:
            return False
        import safetensors.torch

        if self.path:  # (the tokens in its metadata: a run killed between this and its next checkpoint resumes
            # with an older best in its state, and must not restore these weights under that name)
            safetensors.torch.save_model(self.model, self.path, metadata={"tokens": str(point["tokens"])})
        else:
            self.mem = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        state["best"] = {"tokens": point["tokens"], "val": point["val"], "ppl": point["ppl"]}
        return True

    def restore(self, state: dict) -> Optional[dict]:
        """At the end: the best weights back into the model unless the last point is the best. Returns
        what the report says about the kept model."""
        last = state["curve"][-1] if state["curve"] else {}
        as_last = {"which": "last", "tokens": last.get("tokens"), "val": last.get("val")}
        if self.o.keep != "best" or state.get("best") is None:
            return as_last
        b = state["best"]
        if b["tokens"] != last.get("tokens"):
            import safetensors
            import safetensors.torch

            if self.path:
                with safetensors.safe_open(self.path, "pt") as f:
                    saved = (f.metadata() or {}).get("tokens")
                if saved != str(b["tokens"]):
                    log.warning("%s holds the weights of %s tokens, not of the best point (%s tokens): keeping the "
                                "last model", self.path, saved, f"{b['tokens']:,}")
                    return as_last
                safetensors.torch.load_model(self.model, self.path, device=str(self.dev))
            else:
                self.model.load_state_dict(self.mem)
            log.info("kept the model of %s tokens (validation ppl %.3f; the last point's: %.3f)",
                     f"{b['tokens']:,}", b["val"], last.get("val", float("nan")))
        return {"which": "best", "tokens": b["tokens"], "val": b["val"]}


def run(o: Options, *, model: Optional[nn.Module] = None, tokenizer=None, train_ids: Optional[torch.Tensor] = None,
        evals: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """Run ``o``; returns the report (also written to ``o.out``/report.json). ``model``/``tokenizer``/
    ``train_ids``/``evals`` let a caller pass what it already loaded (examples/finetune.py); the model is
    trained in place. Bad input raises :class:`SparsifyError` before any training step."""
    t_start = time.perf_counter()
    check(o, files=model is None)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device)
    cuda = dev.type == "cuda"
    mode = ("default" if cuda else "none") if o.compile == "auto" else o.compile
    compile_sparse = (mode != "none") if o.compile_sparse is None else o.compile_sparse
    if model is None:
        t = time.perf_counter()
        model = load_model(o.model)
        log.info("loaded %s in %.1f s", o.model, time.perf_counter() - t)
    check_model(model, o)
    compare = [_read_report(p) for p in o.compare]
    raw = any(not p.endswith(".safetensors") for p in (*o.data, *o.eval))
    if tokenizer is None and o.model and (raw or o.out):
        tokenizer = load_tokenizer(o.model)
    if train_ids is None:
        train_ids, evals = load_data(o, tokenizer, model.get_input_embeddings().num_embeddings)
    train_ids, val_ids = split_validation(train_ids, o)
    if o.out:
        os.makedirs(o.out, exist_ok=True)
    tps = o.batch * o.seq
    steps = o.tokens // tps
    if mode != "none":
        torch._dynamo.reset()  # (earlier runs in this process: their graphs count towards Dynamo's limits)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    model.to(dev).train()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    amp = cuda
    dense = o.dense_baseline
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if o.distill_weight > 0 else None
    mlp_names = set(mlp_layers(model))
    for n, p in model.named_parameters():
        p.requires_grad_(o.train == "all" or n.rpartition(".")[0] in mlp_names)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(0.9, 0.95), weight_decay=o.weight_decay, fused=cuda)
    train_dev = train_ids.to(dev)
    sp = None
    if not dense:
        from ..sparsifier import BlastSparsifier

        n_calib = min(o.calib_tokens, train_ids.numel() - 1) // o.seq * o.seq

        @torch.no_grad()
        def calibrate():  # the first training tokens, through the eager model (hooks record the MLP inputs)
            w = train_dev[:max(n_calib, o.seq)].reshape(-1, o.seq)
            for xb in w.split(o.batch):
                with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                    model(input_ids=xb, use_cache=False)

        ramp = round((1 - o.freeze_last) * steps)
        if ramp < 1:
            raise SparsifyError("--tokens", f"{steps} training step(s) of {tps:,} tokens leave no pruning ramp before "
                                f"the last --freeze-last {o.freeze_last:g} of the budget: raise --tokens")
        sp = BlastSparsifier(model, target_sparsity=o.sparsity, block_size=o.block, end_step=steps,
                             freeze_last=o.freeze_last, update_every=max(1, ramp // o.mask_updates), optimizer=opt,
                             score=o.block_score, regrow=o.regrow, layers=mlp_layers(model, o.skip_layers),
                             reconstruct=o.refit, calibrate=calibrate if o.recalibrates else None,
                             sequential=o.sequential_updates)
    state = {"step": 0, "curve": [], "losses": [], "meter": {}, "train_s": 0.0, "ppl_pretrained": None,
             "best": None}
    path = os.path.join(o.out, CHECKPOINT) if o.out else None
    best = Best(o, model, val_ids, dev, amp)
    if o.resume and path and os.path.exists(path):
        tensors, meta = ckpt.load(path)
        saved = meta["state"]["options"]
        diff = sorted(k for k in saved if saved[k] != o.run_dict().get(k))
        if diff:
            raise SparsifyError("--resume", f"{path} was written with other options: "
                                + ", ".join(f"{k}={saved[k]!r} (now {o.run_dict().get(k)!r})" for k in diff[:5]))
        state = ckpt.restore(tensors, meta, model, opt, sp)
        log.info("resumed from %s at step %d of %d", path, state["step"], steps)
    elif o.resume:
        log.info("--resume: no checkpoint in %s, starting from %s", o.out, o.model or "the given model")
    if state["ppl_pretrained"] is None:
        state["ppl_pretrained"] = {k: perplexity(model, v, o.seq, o.batch, dev, amp) for k, v in evals.items()}
        state["curve"].append({"tokens": 0, "ppl": dict(state["ppl_pretrained"]), "sparsity": 0.0,
                               "val": best.ppl()})
        best.offer(state, state["curve"][-1], final=dense)  # (fine-tuning may only make a dense model worse)
        log.info("held-out perplexity before training (%s): %s", o.model or "the given model",
                 ", ".join(f"{k} {v:.3f}" for k, v in state["ppl_pretrained"].items()))

    def save_checkpoint(step):
        if path:
            meter.stop()
            st = dict(state, step=step, options=o.run_dict(), meter=meter.totals,
                      train_s=state["train_s"] + time.perf_counter() - t_loop)
            ckpt.save(path, model, opt, sp, st)
            log.info("checkpoint at step %d (%s tokens): %s", step, f"{step * tps:,}", path)

    objective = Objective(model, o.distill_weight)
    run_fn = _compile(objective, "inductor", mode, o)
    teacher_fn = _compile(Logits(teacher), "inductor", "default" if mode != "none" else "none", o) if teacher else None
    starts = batch_starts(train_ids.numel(), o.seq, o.batch, steps, o.seed).to(dev)
    offs = torch.arange(o.seq + 1, device=dev)
    meter = Meter(cuda, state["meter"])
    every = o.checkpoint_every or max(tps, o.tokens // 4)
    phase, since = ("dense" if dense else "ramp"), 0
    label = "dense baseline" if dense else f"sparsity {o.sparsity:g}"
    from tqdm import tqdm

    bar = tqdm(total=steps * tps, initial=state["step"] * tps, unit="tok", unit_scale=True, desc=label,
               disable=not o.progress, mininterval=1.0, smoothing=0.05)
    t_loop, start = time.perf_counter(), state["step"]
    with _interruptible() as interrupted:
        for step in range(start, steps):
            if sp is not None and phase == "ramp" and sp.frozen:
                meter.stop()
                phase, since = "sparse", 0
                if compile_sparse and step > start:  # (a checkpoint before the slow blast compile: a run killed
                    save_checkpoint(step)            # during it resumes here, with the ramp's work kept)
                if compile_sparse:  # masks are final: from here the fused block-sparse op pays (fwd and bwd)
                    blast_before = dict(counters["blast"])
                    run_fn = _compile(Objective(model, o.distill_weight), "blast",
                                      "default" if mode == "none" else mode, o)
                    sp.hand_off()  # (the fused op keeps dead blocks and their optimizer state at zero; checked)
                    log.info("step %d: masks frozen, training through backend='blast' (%s)", step, mode)
            update = sp is not None and sp.is_update_step(sp.step_count + 1)
            if since >= (WARMUP_STEPS if mode != "none" else 0) and not update:
                meter.start(phase)
            else:
                meter.stop()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, o)
            w = train_dev[starts[step][:, None] + offs]
            x, y = w[:, :-1], w[:, 1:]
            with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                t_logits = teacher_fn(x) if teacher_fn is not None else None
                if phase == "sparse" and since == 0 and compile_sparse:  # the fused model must compute what eager does
                    with torch.no_grad():
                        state["blast_vs_eager_lm"] = [float(objective(x, y)[1])]
                loss, lm = run_fn(x, y, t_logits)
                if len(state.get("blast_vs_eager_lm", ())) == 1:
                    state["blast_vs_eager_lm"].append(float(lm))
                    _check_fused(sp, state, blast_before)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sp is not None:
                sp.step()
            meter.count(tps)
            since += 1
            bar.update(tps)
            if step % LOG_EVERY == 0 or step == steps - 1:
                lv = float(lm)
                state["losses"].append([(step + 1) * tps, lv])
                bar.set_postfix(loss=f"{lv:.3f}", sparsity=f"{sp.sparsity():.2f}" if sp else "0", phase=phase)
            if (step + 1) * o.eval_points // steps > step * o.eval_points // steps:
                meter.stop()
                ppl = {k: perplexity(model, v, o.seq, o.batch, dev, amp) for k, v in evals.items()}
                point = {"tokens": (step + 1) * tps, "ppl": ppl, "sparsity": sp.sparsity() if sp else 0.0,
                         "val": best.ppl()}
                state["curve"].append(point)
                # only a model with the final masks may be kept (the dense baseline: any)
                kept = best.offer(state, point, final=sp is None or sp.frozen)
                (bar.write if o.progress else log.info)(
                    f"{(step + 1) * tps:,} tokens: held-out ppl " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())
                    + (f"; validation {point['val']:.3f}" + (" (best so far: kept)" if kept else "")
                       if point["val"] is not None else ""))
            done = (step + 1) * tps
            if step + 1 < steps and ((o.stop_at and done >= o.stop_at) or interrupted()):
                save_checkpoint(step + 1)
                bar.close()
                return {"status": "stopped", "step": step + 1, "tokens_trained": done, "checkpoint": path,
                        "interrupted": interrupted()}
            if done // every > step * tps // every and step + 1 < steps:
                save_checkpoint(step + 1)
    meter.stop()
    bar.close()
    train_s = state["train_s"] + time.perf_counter() - t_loop
    state["kept"] = best.restore(state)
    return _finish(o, model, tokenizer, sp, evals, state, meter, dict(
        steps=steps, tokens_trained=steps * tps, train_s=train_s, dev=dev, amp=amp, mode=mode,
        compile_sparse=compile_sparse, t_start=t_start, path=path, compare=compare,
        train_available=int(train_ids.numel()), passes=steps * tps / train_ids.numel()))


def _read_report(path: str) -> dict:
    try:
        with open(path) as f:
            rep = json.load(f)
        rep["curve"], rep["dense_baseline"], rep["target_sparsity"]  # noqa: B018  (the keys the curve needs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SparsifyError("--compare", f"{path} is not a report.json of blast sparsify "
                                         f"({type(e).__name__}: {e})") from None
    return rep


def _finish(o, model, tokenizer, sp, evals, state, meter, info) -> dict:
    """Squash the masks, measure, save, report."""
    dev, amp = info["dev"], info["amp"]
    rep = {"status": "done", "options": o.run_dict(), "dense_baseline": o.dense_baseline,
           "target_sparsity": None if o.dense_baseline else o.sparsity, "block": o.block,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "compile": info["mode"], "compile_sparse": info["compile_sparse"],
           "steps": info["steps"], "tokens_trained": info["tokens_trained"], "train_s": info["train_s"],
           "tok_s": meter.tok_s(), "ppl_pretrained": state["ppl_pretrained"], "curve": state["curve"],
           "losses": state["losses"], "distill": o.distill_weight,
           "kept": state.get("kept"), "ppl_last": state["curve"][-1]["ppl"] if state["curve"] else None,
           "train_tokens_available": info.get("train_available"), "passes": info.get("passes"),
           # first step through backend="blast": its LM loss against eager on the same batch and weights
           "blast_vs_eager_lm": state.get("blast_vs_eager_lm"), "fused_in_training": state.get("fused_in_training")}
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True  # (off for training; the saved model generates with its cache)
    if sp is not None:
        sp.finalize()
        use = sp.hidden_use()
        rep.update(achieved_sparsity=sp.sparsity(), live_by_layer=live_by_layer(sp.layer_sparsity()),
                   sparsified=sorted(sp.layers), mask_step_timing=sp.timing_summary(),
                   upkeep_restored=sp.upkeep_restored,
                   orphan_frac=statistics.mean(u["orphan_frac"] for u in use.values()) if use else None)
    rep["ppl_final_eager"] = {k: perplexity(model, v, o.seq, o.batch, dev, amp) for k, v in evals.items()}
    rep["ppl_final"] = dict(rep["ppl_final_eager"])
    if sp is not None and o.bench_mlp:
        live = {n: e["live_frac"] for n, e in rep["live_by_layer"].items()}
        mid = sorted(live, key=live.get)[len(live) // 2]  # the layer of median density
        mlp = next((m.name for m in layouts.mlp_modules(model) if f"layers.{mid}." in m.name + "."), None)
        if mlp is not None:
            rows = tuple(o.bench_rows) or ((1, min(o.batch * o.seq, 4096)) if dev.type == "cuda"
                                           else (min(o.batch * o.seq, 256),))
            try:
                dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
                rep["mlp_bench"] = bench_mlp(model, mlp, rows, dev, dt)
            except Exception as e:  # noqa: BLE001  (a timing is not worth losing the trained model)
                log.warning("MLP timing failed: %s: %s", type(e).__name__, e)
                rep["mlp_bench"] = {"error": f"{type(e).__name__}: {e}"}
    if o.out:
        out = os.path.join(o.out, "model")
        if sp is not None:
            from .. import compress

            if compress.compress_(model, min_sparsity=0.1).compressed:
                compress.save_pretrained(model, out)
                rep["saved_format"] = "compressed"
            else:  # (no MLP compressible: a fused gate|up layout, or sparsity under compress_'s 0.1) -- the
                # dense weights hold the zero blocks, and backend="blast" finds them there
                log.warning("no MLP of %s could be compressed (a fused gate|up projection, or under 10%% of "
                            "blocks pruned): saving it with dense weights that hold the zero blocks; load it with "
                            "transformers' from_pretrained", type(model).__name__)
                model.save_pretrained(out)
                rep["saved_format"] = "dense"
            sp.save_masks(os.path.join(o.out, "masks.safetensors"))
            rep["masks"] = os.path.join(o.out, "masks.safetensors")
            # what was saved is what is measured: a reload gives these numbers
            rep["ppl_final"] = {k: perplexity(model, v, o.seq, o.batch, dev, amp) for k, v in evals.items()}
        else:
            model.save_pretrained(out)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        rep["saved"] = out
    rep["blast_counters"] = {k: v for k, v in counters["blast"].items()}
    rep["wall_s"] = time.perf_counter() - info["t_start"]
    if o.out:
        with open(os.path.join(o.out, "report.json"), "w") as f:
            json.dump(rep, f, indent=1, default=str)
        if o.curve:
            plot_curves([rep, *info["compare"]], os.path.join(o.out, "curve.png"), os.path.join(o.out, "curve.json"))
        for f in (info["path"], os.path.join(o.out, BEST)):
            if f and os.path.exists(f):
                os.remove(f)  # (the run is complete: the model and report replace them)
    return rep


__all__ = ["run", "Objective", "distill_loss", "lr_at", "Meter", "Best", "split_validation", "CHECKPOINT"]
