"""What ``blast sparsify`` reports: held-out perplexity, live blocks per layer, the fused MLP's speed, the curve."""
from __future__ import annotations

import copy
import json
import logging
import math
import re
import statistics
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .data import windows

log = logging.getLogger("blast_compile.sparsify")


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq: int, batch: int, device, amp: bool) -> float:
    """exp(mean next-token cross entropy) over consecutive windows of ``seq`` tokens of ``ids`` (eager model;
    bf16 autocast when ``amp``). The same windows every call: runs and reloads compare exactly."""
    was_training = model.training
    model.eval()
    x, y = windows(ids, seq)
    tot, n = 0.0, 0
    dev = torch.device(device)
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch].to(dev), y[i:i + batch].to(dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            logits = model(input_ids=xb, use_cache=False).logits
        tot += float(nn.functional.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(), reduction="sum"))
        n += yb.numel()
    model.train(was_training)
    return math.exp(tot / max(n, 1))


def live_by_layer(layer_sparsity: Dict[str, dict]) -> Dict[str, dict]:
    """Per decoder layer: live-block fraction of each sparsified projection (gate/up/down...) and overall."""
    out: Dict[str, dict] = {}
    for name, d in layer_sparsity.items():
        m = re.search(r"layers\.(\d+)\.", name)
        key = m.group(1) if m else name.rpartition(".")[0]
        e = out.setdefault(key, {"live": 0, "blocks": 0})
        e[name.rpartition(".")[2]] = d["live"] / d["blocks"]
        e["live"] += d["live"]
        e["blocks"] += d["blocks"]
    for e in out.values():
        e["live_frac"] = e["live"] / max(e["blocks"], 1)
    return out


def bench_mlp(model: nn.Module, mlp_name: str, rows: Sequence[int], device, dtype, reps: int = 20) -> dict:
    """Forward time of one MLP: ``torch.compile`` (Inductor, dense) against ``backend="blast"`` on the same
    weights, at each row count. Says what ran where (CPU runs the gather path: the speed target is the GPU)."""
    from torch._dynamo.utils import counters

    from ..cli import _timings

    mlp = copy.deepcopy(model.get_submodule(mlp_name)).to(device=device, dtype=dtype).eval().requires_grad_(False)
    dense = torch.compile(copy.deepcopy(mlp), dynamic=False)
    before = counters["blast"]["mlp_fused"]
    blast = torch.compile(mlp, backend="blast", dynamic=False)
    dev = torch.device(device)
    res = {"mlp": mlp_name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "rows": {}}
    hidden = next(p for p in mlp.parameters()).shape[1]
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, hidden, device=dev, dtype=dtype)
            t = _timings({"dense": lambda: dense(x), "blast": lambda: blast(x)}, dev.type, reps)
            d_us, b_us = (1e6 * statistics.median(t[k][0]) for k in ("dense", "blast"))
            res["rows"][str(m)] = {"dense_us": d_us, "blast_us": b_us, "speedup": d_us / b_us}
    res["fused"] = counters["blast"]["mlp_fused"] > before
    if dev.type == "cpu":
        res["note"] = "CPU: the fused op runs a torch gather of the live blocks here; the speed target is the GPU"
    return res


def render(report: dict, max_layers: int = 12) -> str:
    """The final report as text tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    con = Console(width=120)
    with con.capture() as cap:
        kind = "dense baseline" if report["dense_baseline"] else f"{report['target_sparsity']:.0%} block-sparse MLPs"
        kept = report.get("kept") or {}
        last = report.get("ppl_last") if kept.get("tokens") != report["tokens_trained"] else None
        at = f"kept: {kept['tokens']:,} tokens, best validation" if kept.get("which") == "best" else "final"
        t = Table(title=f"held-out perplexity: {kind}, {report['tokens_trained']:,} tokens")
        for c in ("set", "pretrained", at, "change") + (("last (not kept)",) if last else ()):
            t.add_column(c, justify="right")
        for name, p0 in report["ppl_pretrained"].items():
            p1 = report["ppl_final"][name]
            t.add_row(name, f"{p0:.3f}", f"{p1:.3f}", f"{100 * (p1 / p0 - 1):+.1f}%",
                      *((f"{last[name]:.3f}",) if last else ()))
        con.print(t)
        if report.get("passes") and report["passes"] > 2:
            con.print(f"the budget was {report['passes']:.1f} passes over {report['train_tokens_available']:,} "
                      "training tokens")
        if report.get("live_by_layer"):
            t = Table(title=f"live blocks per layer ({report['block']}x{report['block']}), overall sparsity "
                            f"{report['achieved_sparsity']:.1%}")
            layers = list(report["live_by_layer"].items())
            cols = [c for c in layers[0][1] if c not in ("live", "blocks", "live_frac")]
            for c in ("layer", *cols, "live"):
                t.add_column(c, justify="right")
            half = max_layers // 2
            shown = layers if len(layers) <= max_layers else layers[:half] + [None] + layers[-half:]
            for r in shown:
                if r is None:
                    t.add_row("...", *[""] * (len(cols) + 1))
                    continue
                k, e = r
                t.add_row(k, *(f"{e.get(c, float('nan')):.1%}" for c in cols), f"{e['live_frac']:.1%}")
            con.print(t)
        sp = report.get("tok_s", {})
        if sp:
            con.print("training tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in sp.items())
                      + f" ({report['device']})")
        b = report.get("mlp_bench")
        if b:
            rows = "; ".join(f"{m} rows: dense {r['dense_us']:.1f} us, blast {r['blast_us']:.1f} us "
                             f"({r['speedup']:.2f}x)" for m, r in b["rows"].items())
            con.print(f"fused MLP {b['mlp']} on {b['device']} ({b['dtype']}, {'fused' if b['fused'] else 'NOT fused'}"
                      f"): {rows}" + (f"\n  {b['note']}" if b.get("note") else ""))
        for k in ("saved", "masks"):
            if report.get(k):
                con.print(f"{k}: {report[k]}")
    return cap.get()


_LOG_POINT = re.compile(r"^([\d,]+) tokens: held-out ppl ([^;(]*)")
_LOG_START = re.compile(r"^held-out perplexity before training \(.*\): (.*)$")


def curve_from_log(text: str) -> list:
    """A run's curve as its log printed it (``run`` logs each held-out evaluation): for runs cut before their
    report, e.g. by a time limit. Points ``{"tokens", "ppl"}`` by token count; the last print of a count wins
    (a resumed run appends to the same log)."""
    def sets(s):  # "eval 18.018, eval_kjv 30.778"
        return {k: float(v) for k, v in (kv.split() for kv in s.strip().split(", "))}

    pts = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _LOG_START.match(line):
            pts[0] = sets(m.group(1))
        elif m := _LOG_POINT.match(line):
            pts[int(m.group(1).replace(",", ""))] = sets(m.group(2))
    return [{"tokens": t, "ppl": pts[t]} for t in sorted(pts)]


def plot_curves(reports: Sequence[dict], png: str, js: Optional[str] = None) -> dict:
    """Held-out perplexity against training tokens, one line per run and held-out set (the pretrained model
    at 0 tokens); JSON of the same points to ``js``. Returns that JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {"runs": []}
    sets = sorted({k for r in reports for pt in r["curve"] for k in pt["ppl"]})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.2), squeeze=False)
    for r in sorted(reports, key=lambda r: r["target_sparsity"] or 0.0):
        label = "dense fine-tune" if r["dense_baseline"] else f"{r['target_sparsity']:.0%} sparse"
        label += f" ({r['note']})" if r.get("note") else ""  # (e.g. a run cut before its end)
        data["runs"].append({"label": label, "sparsity": r["target_sparsity"],
                             "tokens": [p["tokens"] for p in r["curve"]],
                             "ppl": {s: [p["ppl"].get(s) for p in r["curve"]] for s in sets}})
        for ax, s in zip(axes[0], sets):
            pts = [(p["tokens"], p["ppl"][s]) for p in r["curve"] if s in p["ppl"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    for ax, s in zip(axes[0], sets):
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"held-out perplexity ({s})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("blast sparsify: held-out perplexity vs tokens")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    if js:
        with open(js, "w") as f:
            json.dump(data, f, indent=1)
    return data


__all__ = ["perplexity", "live_by_layer", "bench_mlp", "render", "plot_curves", "curve_from_log"]
