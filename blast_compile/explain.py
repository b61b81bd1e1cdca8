"""``blast_compile.explain(model, *inputs)``: what the backend would fuse, and why not.

It compiles ``model`` with the blast backend (its own cache entry; the model is
not changed), runs it once on the inputs, and collects the per-graph reports
the backend recorded. ``str(report)`` is a table a person can read.
"""
from __future__ import annotations

import dataclasses
import io
from typing import List

import torch

from . import backend as _backend
from .config import Candidate


@dataclasses.dataclass
class ExplainReport:
    candidates: List[Candidate]
    graphs: List[str]  # rewritten graph code, one per Dynamo graph
    errors: List[str]

    @property
    def fused(self) -> List[Candidate]:
        return [c for c in self.candidates if c.decision == "fused"]

    def table(self) -> str:
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
        buf = io.StringIO()
        Console(file=buf, width=160, force_terminal=False, color_system=None).print(t)
        out = buf.getvalue()
        for e in self.errors:
            out += f"\ninternal error (graph fell back to Inductor): {e}\n"
        return out

    def __str__(self) -> str:
        code = "\n".join(f"--- rewritten graph {i} ---\n{g}" for i, g in enumerate(self.graphs))
        return self.table() + "\n" + code


def explain(model, *example_inputs, options=None, **compile_kwargs) -> ExplainReport:
    """Compile ``model`` with the blast backend, run it once, and report every MLP candidate."""
    start = len(_backend.REPORTS)
    compiled = torch.compile(model, backend=_backend.blast, options=options, **compile_kwargs)
    with torch.no_grad():
        compiled(*example_inputs)
    reps = _backend.REPORTS[start:]
    return ExplainReport(
        candidates=[c for r in reps for c in r.candidates],
        graphs=[r.code for r in reps],
        errors=[r.error for r in reps if r.error],
    )
