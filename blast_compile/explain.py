"""``blast_compile.explain(model, *inputs)``: what the backend would fuse, and why not.

It runs ``model`` once on the inputs through Dynamo with the blast backend and
collects the report the backend records for every graph; the model is not
changed. ``str(report)`` (or ``print(report)``) is a table a person can read;
``report.graph_code()`` is the rewritten graphs' code.

Dynamo keeps compiled graphs per code object and backend, so an earlier
``torch.compile(model, backend="blast")`` (or an earlier ``explain``) would be
reused and the backend never run again. Each call therefore traces through a
code object of its own and with a backend function of its own: it always sees
every MLP, and it leaves the user's compiled entries as they were.
"""
from __future__ import annotations

import dataclasses
import io
import shutil
import types
from typing import List, Optional

import torch

from .config import Candidate


@dataclasses.dataclass
class ExplainReport:
    candidates: List[Candidate]
    graphs: List[str]  # rewritten graph code, one per Dynamo graph
    errors: List[str]

    @property
    def fused(self) -> List[Candidate]:
        return [c for c in self.candidates if c.decision == "fused"]

    def table(self, width: Optional[int] = None) -> str:
        """The per-MLP table, as wide as its content needs, at most ``width`` columns
        (default: the terminal's width, or 200 when the output is not a terminal)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"blast: {len(self.fused)} of {len(self.candidates)} MLPs fused", show_lines=False)
        for col in ("module", "kind", "act", "shape", "block", "sparsity", "decision", "reason", "kernel"):
            t.add_column(col, overflow="fold")
        for c in self.candidates:
            t.add_row(
                c.module or "?",
                c.kind,
                c.activation,
                f"{c.d_in}->{c.hidden}->{c.d_out}" + (" +b" if c.bias else "") + f" {c.dtype.replace('torch.', '')}",
                f"{c.block[0]}x{c.block[1]}" if c.block else "-",
                f"{c.sparsity:.1%}" if c.sparsity is not None else "-",
                c.decision,
                c.reason,
                (c.kernel + (f"\n{c.kernel_source}" if c.kernel_source else "")) or "-",
            )
        width = width or shutil.get_terminal_size((200, 24)).columns
        buf = io.StringIO()
        Console(file=buf, width=width, force_terminal=False, color_system=None).print(t)
        out = buf.getvalue()
        for e in self.errors:
            out += f"\ninternal error (graph fell back to Inductor): {e}\n"
        return out

    @classmethod
    def from_reports(cls, reports, model=None) -> "ExplainReport":
        """From the backend's per-graph reports; module names as ``model.named_modules()`` spells them."""
        names = _module_names(model) if model is not None else set()
        cands = [c for r in reports for c in r.candidates]
        for c in cands:
            c.module = _relative(c.module, names)
        return cls(candidates=cands, graphs=[r.code for r in reports], errors=[r.error for r in reports if r.error])

    def graph_code(self) -> str:
        """The rewritten graphs' code (one ``blast::sparse_mlp`` node per fused MLP)."""
        return "\n".join(f"--- rewritten graph {i} ---\n{g}" for i, g in enumerate(self.graphs))

    def __str__(self) -> str:
        return self.table()


def _call(model, *args, **kwargs):
    return model(*args, **kwargs)


def _module_names(model) -> set:
    try:
        return {n for n, _ in model.named_modules()}
    except Exception:
        return set()


def _relative(name: str, names: set) -> str:
    """The candidate's module name as ``model.named_modules()`` spells it (Dynamo's source
    may carry a leading component for the object the trace started from)."""
    if not names or name in names or name == "<root>":
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in names:
            return ".".join(parts[i:])
    return name


def explain(model, *example_inputs, options=None, mode=None, **kwargs) -> ExplainReport:
    """Run ``model(*example_inputs, **kwargs)`` once through the blast backend and report every MLP
    candidate, whatever was compiled before. ``options`` / ``mode`` as for ``torch.compile``."""
    from . import backend as _backend

    # a compiled module (torch.compile(model)) runs its own cached graphs, and across a graph break the trace
    # below would see none of its code: explain the module it wraps
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    opts = dict(options or {})
    if "inductor" not in opts:  # the report is the point: skip Inductor's codegen, and so its config keys
        from .config import split_options

        inductor_keys = split_options(opts)[1]  # (bad options raise here, from explain)
        opts = {k: v for k, v in opts.items() if k not in inductor_keys}
        opts["inductor"] = False
    reports = []

    def explain_backend(gm, inputs):  # a new function per call: no cached entry matches it
        start = len(_backend.REPORTS)
        out = _backend.blast(gm, inputs, mode=mode, options=opts)
        reports.extend(_backend.REPORTS[start:])
        return out

    # a code object of our own: Dynamo's cache for it starts empty and goes away with it
    fn = types.FunctionType(_call.__code__.replace(), _call.__globals__, "blast_explain")
    compiled = torch.compile(fn, backend=explain_backend)
    with torch.no_grad():
        compiled(model, *example_inputs, **kwargs)
    return ExplainReport.from_reports(reports, model)
