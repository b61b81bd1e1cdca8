"""Issue 25 on one H100/H200: `blast sparsify` on SmolLM2-135M, dense vs 50/70/90% on one token budget, the
curve, training tokens/s (sparse phase vs dense, with and without CUDA graphs), a reload in a fresh process
that generates with backend="blast" and checks the reported perplexity.

What travels (made here by ``bash bench/sparsify_carry.sh``, all under git-ignored folders):
    .carry/smollm2.gguf.partaa, .carry/smollm2.gguf.partab   the 93.8 MiB GGUF in two parts (48 + 45.8 MiB)
    .carry/SmolLM2-135M-Instruct_tokens.safetensors         the Bible sets in SmolLM2's tokenizer (1.9 MiB)
    .whl/gguf-*.whl                                          transformers reads GGUF through it (not on the GPU image)
The working tree travels with at most 64 MiB a call, so the GGUF needs two calls while the machine stays warm
(ignored files left in the checkout stay there between calls; the machine goes back ~30 s after a call):

    call 1, carry [".carry/smollm2.gguf.partaa", ".carry/SmolLM2-135M-Instruct_tokens.safetensors", ".whl"]:
        export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; python3 bench/sparsify_gpu.py --stages speed --model random \
            --out $OUT 2>&1 | tee $OUT/log.txt
        (training tokens/s needs no trained weights: a random SmolLM2-shaped model with magnitude masks)
    call 2, right after, carry [".carry/smollm2.gguf.partab"]:
        export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; python3 bench/sparsify_gpu.py --stages runs,curve,reload \
            --tokens 10M --out $OUT 2>&1 | tee $OUT/log.txt
    (optional) call 3, the same command again: runs cut at the deadline resume from their checkpoints and finished
        ones are kept, so --tokens 20M takes call 2 + call 3; --stages speed there measures with the trained masks.

Budget (one H100, session 35, --batch 32, three runs at a time, dense first): the dense run takes ~240 s for 20M
tokens; a sparse run's first half (its pruning ramp: 20 layer-by-layer obs updates) ~600 s, its second half ~250 s
(~46k tokens/s each). 20M tokens for dense + three sparsities: ~1,100 s of runs on one warm machine (the fourth run
starts when dense ends), i.e. two full calls and a third, plus the carry call.

The GGUF is joined and dequantized once into .carry/smollm2_hf/ (kept between warm calls). Runs write into
.carry/sps_runs/<name>/ and resume from their checkpoints (``--resume``), so a call cut short continues in the
next one with the same command; at ``--minutes`` the driver interrupts the runs (each saves a checkpoint) and
skips what no longer fits. Everything for the reader lands in $OUT (at most 8 files): sparsify_gpu.json,
curve.png, curve.json, and the log the command tees.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# dense and blast sides in one process: blast's kernels launched as in a process that compiles with blast first
from blast_compile.backend import enable_static_launch  # noqa: E402

enable_static_launch()
CARRY = os.path.join(ROOT, ".carry")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def left(args) -> float:
    return args.minutes * 60 - (time.time() - T0)


# ------------------------------------------------------------------ the model
def _gguf_importable():
    try:
        import gguf  # noqa: F401  (only whether it imports)
    except ImportError:
        whl = glob.glob(os.path.join(ROOT, ".whl", "gguf-*.whl"))
        if not whl:
            raise SystemExit("the gguf package is missing and .whl/ has no gguf wheel: bash bench/sparsify_carry.sh "
                             "makes one; carry .whl")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        "/tmp/site", *whl], check=True)
        sys.path.insert(0, "/tmp/site")
        os.environ["PYTHONPATH"] = "/tmp/site" + os.pathsep + os.environ.get("PYTHONPATH", "")


def prepare_model(args) -> str:
    """A transformers directory for the runs: ``--model`` itself, a random SmolLM2-shaped model ("random"),
    or the GGUF (joined from its parts, dequantized once into .carry/smollm2_hf)."""
    import torch
    import transformers

    if args.model == "random":  # speed only: SmolLM2-135M's shape, random weights
        d = os.path.join(CARRY, "random_smollm2")
        if not os.path.exists(os.path.join(d, "config.json")):
            cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                           max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)
            torch.manual_seed(0)
            transformers.LlamaForCausalLM(cfg).save_pretrained(d)
        return d
    if args.model and os.path.isdir(args.model):
        return args.model
    hf = os.path.join(CARRY, "smollm2_hf")
    if os.path.exists(os.path.join(hf, "config.json")):
        return hf
    gguf = args.model or os.path.join(CARRY, GGUF_NAME)
    if not os.path.exists(gguf):
        parts = sorted(glob.glob(os.path.join(CARRY, "smollm2.gguf.part*")))
        size = sum(os.path.getsize(p) for p in parts)
        if size != GGUF_BYTES:
            raise SystemExit(f"GGUF parts {[os.path.basename(p) for p in parts]} hold {size:,} bytes, "
                             f"not {GGUF_BYTES:,}: "
                             "a part is missing (the machine went cold between the two calls? carry part aa again)")
        with open(gguf, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    out.write(f.read())
    _gguf_importable()
    from blast_compile.sparsify.data import load_model, load_tokenizer

    t = time.time()
    model, tok = load_model(gguf), load_tokenizer(gguf)
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    log(f"dequantized {gguf} into {hf} in {time.time() - t:.0f} s")
    return hf


# ------------------------------------------------------------------ runs
def run_name(s: float) -> str:
    return "dense" if s == 0 else f"s{round(100 * s):02d}"


def runs(args, model_dir, res):
    """`blast sparsify` per sparsity, --parallel at a time (their compiles overlap the others' GPU work).
    ``--sparse-from dense``: the sparse runs start from the dense run's saved model (its best validation point)
    and distill from it, rather than from the pretrained model, whose held-out perplexity the fine-tuned dense
    model beats: a KL term towards the pretrained model holds a sparse model near the pretrained one's quality."""
    os.makedirs(args.runs_dir, exist_ok=True)
    todo = [float(v) for v in args.runs.split(",")]
    if not args.parallel:
        import torch

        gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 40
        args.parallel = max(1, min(4, int(gb // 20)))
    res["parallel"] = args.parallel
    procs, stopping = {}, {}
    res["runs"] = {}
    while todo or procs:
        while todo and len(procs) < args.parallel:
            if todo[0] != 0 and args.sparse_from == "dense" and "dense" not in res["runs"]:
                if "dense" in procs:
                    break  # (the sparse runs start from its saved model)
                raise SystemExit("--sparse-from dense needs the dense run (0) first in --runs")
            s = todo.pop(0)
            name = run_name(s)
            out = os.path.join(args.runs_dir, name)
            done = _finished(out, args.tokens)
            if done:  # (an earlier call finished it: keep it)
                res["runs"][name] = done
                log(f"{name}: finished in an earlier call, kept")
                continue
            start = model_dir
            if s != 0 and args.sparse_from == "dense":
                start = res["runs"]["dense"].get("saved")
                if not start:  # (the dense run failed or was cut: nothing to start from)
                    res["runs"][name] = {"status": "skipped: no saved dense model to start from"}
                    continue
            cmd = [sys.executable, "-m", "blast_compile.cli", "sparsify", start, args.data, "--out", out,
                   "--tokens", str(args.tokens), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--resume", "--no-progress", "--checkpoint-every", str(args.checkpoint_every)]
            cmd += ["--dense-baseline"] if s == 0 else ["--sparsity", str(s)]
            cmd += ["--no-bench-mlp"] if s != max(float(v) for v in args.runs.split(",")) else []
            cmd += args.extra.split() if args.extra else []
            env = dict(os.environ, BLAST_CACHE_DIR=os.path.join(out + "_cache"), PYTHONUNBUFFERED="1",
                       PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
            if args.parallel > 1:
                env["BLAST_TUNE"] = "0"  # (tuning under shared GPU time would pick configs from noise)
            os.makedirs(out, exist_ok=True)
            f = open(out + ".log", "a")
            log("start", name, " ".join(cmd[3:]))
            procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), f, time.time())
        time.sleep(2)
        for name, (p, f, t) in list(procs.items()):
            if p.poll() is None and left(args) < args.reserve * 60 and name not in stopping:
                log(f"deadline: interrupting {name} (it stops after its step with a checkpoint; --resume continues)")
                p.send_signal(signal.SIGINT)
                stopping[name] = time.time()
            elif p.poll() is None and name in stopping and time.time() - stopping[name] > 60:
                log(f"{name} did not stop within 60 s of the interrupt (compiling?): killed; its last checkpoint stays")
                p.kill()
                p.wait()
            if p.poll() is not None:
                f.close()
                del procs[name]
                rep_path = os.path.join(args.runs_dir, name, "report.json")
                tail = open(os.path.join(args.runs_dir, name + ".log"), errors="replace").read()[-3000:]
                if p.returncode == 0 and os.path.exists(rep_path):
                    with open(rep_path) as fr:
                        rep = json.load(fr)
                    rep.pop("losses", None)
                    res["runs"][name] = rep
                    log(f"done {name} in {time.time() - t:.0f} s: ppl {rep['ppl_final']}")
                else:
                    res["runs"][name] = {"status": f"exit {p.returncode}", "log_tail": tail}
                    log(f"{name} ended with exit {p.returncode}:\n{tail[-1500:]}")
        if todo and left(args) < args.reserve * 60:
            for s in todo:
                res["runs"][run_name(s)] = {"status": "skipped: out of time"}
            todo = []
    res["table"] = table(res["runs"])
    log("\n" + res["table"])


def _finished(out: str, tokens: int):
    try:
        with open(os.path.join(out, "report.json")) as f:
            rep = json.load(f)
    except (OSError, ValueError):
        return None
    if rep.get("status") == "done" and rep.get("options", {}).get("tokens") == tokens:
        rep.pop("losses", None)
        return rep
    return None


def _fused(r: dict) -> str:
    """MLPs the sparse phase's blast graph fused (older reports: from the backend's refusal counters)."""
    if r.get("dense_baseline"):
        return "-"
    if r.get("fused_in_training") is not None:
        return str(r["fused_in_training"])
    if not r.get("compile_sparse"):
        return "not compiled"
    c = r.get("blast_counters") or {}
    dense = ", ".join(f"{k[6:]} {v}" for k, v in c.items() if k.startswith("dense_"))
    return f"{c.get('mlp_fused', 0)}" + (f" (dense: {dense})" if dense else "")


def table(reps: dict) -> str:
    dense = reps.get("dense", {}).get("ppl_final")
    lines = ["| run | tokens | kept at (validation ppl) | held-out ppl (each set) | vs dense | achieved | train s | "
             "tok/s by phase | MLPs fused in training |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in reps.items():
        if "ppl_final" not in r:
            lines.append(f"| {name} | {r.get('status')} | | | | | | | |")
            continue
        ppl = ", ".join(f"{k} {v:.3f}" for k, v in r["ppl_final"].items())
        vs = ", ".join(f"{k} {100 * (v / dense[k] - 1):+.1f}%" for k, v in r["ppl_final"].items()) if dense else ""
        k = r.get("kept") or {}
        kept = f"{k['tokens']:,} ({k['val']:.3f})" if k.get("val") is not None else "last"
        lines.append(f"| {name} | {r['tokens_trained']:,} | {kept} | {ppl} | {vs} | {r.get('achieved_sparsity', 0):.3f} | "
                     f"{r['train_s']:.0f} | " + ", ".join(f"{k} {v:,.0f}" for k, v in r["tok_s"].items())
                     + f" | {_fused(r)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ speed
def speed(args, model_dir, res):
    """Training tokens/s (fwd + bwd + AdamW, bf16 autocast, plain LM loss): dense Inductor vs backend="blast"
    on frozen masks, each without and with CUDA graphs; the first compiled loss is checked against eager."""
    import torch
    from torch._dynamo.utils import counters

    from blast_compile.sparsifier import BlastSparsifier
    from blast_compile.sparsify.data import load_model, mlp_layers
    from blast_compile.sparsify.run import Objective, _compile
    from blast_compile.sparsify.options import Options

    if not torch.cuda.is_available():
        raise RuntimeError("the speed stage needs a CUDA GPU")
    res["speed"] = {"device": torch.cuda.get_device_name(), "batch": args.batch, "seq": args.seq, "rows": {}}
    torch.backends.cuda.matmul.allow_tf32 = True
    sides = [(0.0, m) for m in args.modes.split(",")]
    sides += [(float(s), m) for s in args.speed_sparsity.split(",") for m in args.modes.split(",")]
    for s, mode in sides:
        key = f"{'dense' if s == 0 else f'blast {s:.2f}'} {mode}"
        if left(args) < args.reserve * 60 / 2:
            res["speed"]["rows"][key] = "skipped: out of time"
            continue
        try:
            torch._dynamo.reset()
            counters.clear()
            model = load_model(model_dir).cuda().train()
            model.config.use_cache = False
            g = torch.Generator().manual_seed(0)  # (the same batch for every side)
            x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), generator=g).cuda()
            sp = None
            if s > 0:
                masks = os.path.join(args.runs_dir, run_name(s), "masks.safetensors")
                sp = BlastSparsifier(model, target_sparsity=s, block_size=64, schedule="constant",
                                     layers=mlp_layers(model))
                if os.path.exists(masks) and args.model != "random":
                    sp.load_masks(masks)
                sp.hand_off()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            fn = _compile(Objective(model, 0.0), "blast" if s > 0 else "inductor", mode, Options())
            t = time.time()
            step = train_step(fn, x, opt)

            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                eager = float(Objective(model, 0.0)(x[:, :-1], x[:, 1:])[0])
            first = float(step())
            if s > 0 and not counters["blast"]["mlp_fused"]:  # (a speed of dense MLPs is not blast's)
                raise RuntimeError(f"backend='blast' fused no MLP: {dict(counters['blast'])}")
            for _ in range(args.speed_warmup):
                step()
            torch.cuda.synchronize()
            compile_s = time.time() - t
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(args.speed_steps):
                step()
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b) / args.speed_steps
            kernels = _profile(step) if args.profile else None
            res["speed"]["rows"][key] = {"step_ms": ms, "tok_s": args.batch * args.seq / ms * 1e3,
                                         "compile_and_warmup_s": compile_s, "first_loss": first, "eager_loss": eager,
                                         "mlp_fused": counters["blast"]["mlp_fused"],
                                         "blast_counters": dict(counters["blast"]),
                                         "upkeep_restored": sp.upkeep_restored if sp else None,
                                         "kernels": kernels}
            log(f"speed {key}: {ms:.2f} ms/step, {args.batch * args.seq / ms * 1e3:,.0f} tok/s "
                f"(loss {first:.4f} vs eager {eager:.4f}; {counters['blast']['mlp_fused']} MLPs fused)")
            model = opt = fn = sp = None  # (free before the next side)
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            res["speed"]["rows"][key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            log(f"speed {key} failed: {type(e).__name__}: {e}")
    rows = res["speed"]["rows"]
    for s in args.speed_sparsity.split(","):
        for mode in args.modes.split(","):
            d, b = rows.get(f"dense {mode}"), rows.get(f"blast {float(s):.2f} {mode}")
            if isinstance(d, dict) and isinstance(b, dict) and "tok_s" in d and "tok_s" in b:
                res["speed"][f"blast {float(s):.2f} vs dense, {mode}"] = b["tok_s"] / d["tok_s"]


def train_step(fn, x, opt):
    """The speed stage's step: ``fn`` (an ``Objective``) on ``x`` under bf16 autocast, backward, optimizer step."""
    import torch

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = fn(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _profile(step, steps: int = 2) -> dict:
    """GPU time per kernel name over `steps` steps (per step), the top 25 and the total: says where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    ev.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in ev) / steps / 1e3
    top = [{"name": e.key[:120], "ms": e.self_device_time_total / steps / 1e3, "calls": e.count // steps} for e in ev[:25]]
    return {"gpu_ms_per_step": total, "kernel_launches_per_step": sum(e.count for e in ev) // steps, "top": top}


# ------------------------------------------------------------------ reload (fresh process)
def reload_check(run_dir: str, data: str) -> dict:
    """In a fresh process: from_pretrained, held-out perplexity as the report measured it, then generation
    eager and with torch.compile(backend="blast") (greedy, fp32: the same tokens expected)."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from blast_compile import compress
    from blast_compile.sparsify import perplexity

    with open(os.path.join(run_dir, "report.json")) as f:
        rep = json.load(f)
    o = rep["options"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.time()
    model = compress.from_pretrained(os.path.join(run_dir, "model"), device=dev)
    out = {"load_s": time.time() - t, "device": dev}
    ids = load_file(data)
    out["ppl"] = {k: perplexity(model, ids[k].long(), o["seq"], o["batch"], dev, dev == "cuda")
                  for k in rep["ppl_final"]}
    out["ppl_report"] = rep["ppl_final"]
    out["ppl_rel_diff"] = {k: out["ppl"][k] / rep["ppl_final"][k] - 1 for k in out["ppl"]}
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(run_dir, "model"))
    prompt = tok("In the beginning God created", return_tensors="pt").to(dev)
    gen = dict(max_new_tokens=32, do_sample=False)
    with torch.no_grad():
        eager = model.generate(**prompt, **gen)
        model.forward = torch.compile(model.forward, backend="blast")
        t = time.time()
        comp = model.generate(**prompt, **gen)
        out["compiled_first_generate_s"] = time.time() - t
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        sync()
        t = time.time()
        comp = model.generate(**prompt, **gen)
        sync()
        out["compiled_tok_s"] = gen["max_new_tokens"] / (time.time() - t)
    out["text_eager"] = tok.decode(eager[0], skip_special_tokens=True)
    out["text_blast"] = tok.decode(comp[0], skip_special_tokens=True)
    out["same_tokens"] = bool(torch.equal(eager, comp))
    out["blast_counters"] = dict(counters["blast"])
    return out


def reload(args, res):
    res["reload"] = {}
    for name in args.reload_runs.split(","):
        d = os.path.join(args.runs_dir, name)
        if not os.path.exists(os.path.join(d, "report.json")) or left(args) < 60:
            res["reload"][name] = "skipped (no finished run, or out of time)"
            continue
        p = subprocess.run([sys.executable, __file__, "--reload-one", d, "--data", args.data], cwd=ROOT,
                           capture_output=True, text=True, timeout=max(60, int(left(args)) - 20))
        try:
            res["reload"][name] = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res["reload"][name] = {"error": f"exit {p.returncode}", "stderr": p.stderr[-3000:]}
        log(f"reload {name}: {json.dumps(res['reload'][name])[:1500]}")


def cut_run_report(path: str) -> dict:
    """What ``curve`` draws of a run cut before its report (``<runs dir>/<name>.log``, appended by each call)."""
    from blast_compile.sparsify.report import curve_from_log

    with open(path, errors="replace") as f:
        text = f.read()
    pts = curve_from_log(text)
    name = os.path.basename(path)[:-4]
    s = 0.0 if name == "dense" else int(name[1:]) / 100
    note = f"cut; evaluated up to {pts[-1]['tokens'] / 1e6:.1f}M tokens" if pts and "\nsaved: " not in text else ""
    return {"target_sparsity": s or None, "dense_baseline": s == 0, "note": note, "curve": pts}


def curve(args, res):
    """Finished runs from their reports; runs cut before their end (no report yet) from their logs."""
    from blast_compile.sparsify import plot_curves

    reps = []
    names = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(args.runs_dir, "*", "report.json"))}
    names |= {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(args.runs_dir, "*.log"))}
    for name in sorted(names):
        p = os.path.join(args.runs_dir, name, "report.json")
        if os.path.exists(p):
            with open(p) as f:
                reps.append(json.load(f))
        else:
            reps.append(cut_run_report(os.path.join(args.runs_dir, name + ".log")))
    reps = [r for r in reps if r["curve"]]
    if reps:
        res["curve"] = plot_curves(reps, os.path.join(args.out, "curve.png"), os.path.join(args.out, "curve.json"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="runs,curve,reload", help="any of speed, runs, curve, reload")
    ap.add_argument("--model", default="", help="transformers dir, a .gguf, or 'random' (SmolLM2 shape, speed only); "
                                                "default: the GGUF from .carry")
    ap.add_argument("--data", default=os.path.join(CARRY, "SmolLM2-135M-Instruct_tokens.safetensors"))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--runs-dir", default=os.path.join(CARRY, "sps_runs"))
    ap.add_argument("--runs", default="0,0.9,0.7,0.5", help="sparsities (0: the dense baseline), in start order")
    ap.add_argument("--tokens", default="10M", help="training tokens per run (the same for every run)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--parallel", type=int, default=0,
                    help="runs at once on the one GPU (0: one per ~20 GB of GPU memory, at most 4: 3 on an H100)")
    ap.add_argument("--checkpoint-every", default="2.5M")
    ap.add_argument("--extra", default="", help="more `blast sparsify` options for every run")
    ap.add_argument("--sparse-from", choices=("pretrained", "dense"), default="pretrained",
                    help="what the sparse runs start from and distill from: the pretrained model (the same budget "
                         "as the dense run), or the dense run's saved model (prune the fine-tuned model: the sparse "
                         "runs start once it is done)")
    ap.add_argument("--minutes", type=float, default=8.8, help="wall-clock budget of this call")
    ap.add_argument("--reserve", type=float, default=1.5, help="minutes kept for the stages after the runs")
    ap.add_argument("--modes", default="default,reduce-overhead")
    ap.add_argument("--speed-sparsity", default="0.9")
    ap.add_argument("--speed-steps", type=int, default=20)
    ap.add_argument("--speed-warmup", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="speed: also record GPU time per kernel (2 steps)")
    ap.add_argument("--reload-runs", default="s90")
    ap.add_argument("--reload-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reload_one:
        print(json.dumps(reload_check(args.reload_one, args.data)))
        return
    os.makedirs(args.out, exist_ok=True)
    from blast_compile.sparsify.options import _tokens

    args.tokens = _tokens(args.tokens)
    res = {"args": vars(args)}
    try:
        import torch
        import triton

        res["env"] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
                      "torch": torch.__version__, "triton": triton.__version__}
        log(res["env"])
        stages = args.stages.split(",")
        model_dir = prepare_model(args) if {"speed", "runs"} & set(stages) else None
        for st in stages:
            t = time.time()
            try:
                {"speed": lambda: speed(args, model_dir, res), "runs": lambda: runs(args, model_dir, res),
                 "curve": lambda: curve(args, res), "reload": lambda: reload(args, res)}[st]()
            except Exception as e:  # noqa: BLE001  (one stage failing leaves the others' results)
                res[f"{st}_error"] = traceback.format_exc()[-3000:]
                log(f"stage {st} failed: {type(e).__name__}: {e}")
            log(f"stage {st}: {time.time() - t:.0f} s")
            with open(os.path.join(args.out, "sparsify_gpu.json"), "w") as f:
                json.dump(res, f, indent=1, default=str)
    finally:
        for p in glob.glob(os.path.join(args.runs_dir, "*_cache", "kernels", "tuning.json"))[:1]:
            res["tuning_file"] = p
        with open(os.path.join(args.out, "sparsify_gpu.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        log(f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
