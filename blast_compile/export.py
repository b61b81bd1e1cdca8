"""Export a block-sparse model with its fused MLPs: ``torch.export``, then AOTInductor.

``torch.export`` runs no ``torch.compile`` backend, so the fused nodes are put in before it traces:

1. Dynamo captures the model (``torch._dynamo.export``: a torch-level graph, the weights as attributes) --
   the graph the backend sees;
2. the blast passes fuse its block-sparse MLPs and, on CUDA, lower them to ``blast::mlp`` (``passes/lower.py``),
   exactly as ``backend="blast"`` does;
3. ``torch.export`` traces that graph: ``blast::mlp`` is a ``triton_op``, kept whole in the ExportedProgram
   with its index tables as constants, and AOTInductor compiles its kernels into the package like its own.

What the package assumes: the weights it was exported with. It holds them (and their sparsity pattern) as
constants and checks nothing per call -- there is no Python left to check with. Re-export after changing a
weight; swapping weights in through AOTInductor's constant-update API is only safe for weights whose
zero blocks stay where they were.

On CPU a package holds the dense graph: the fused CPU op is Python, which AOTInductor cannot call, so
``export`` leaves CPU MLPs unfused there (counter ``export_cpu_dense``).

    ep = blast_compile.export.export(model, (x,))
    path = blast_compile.export.aoti_package(model, (x,), "model.pt2")
    runner = torch._inductor.aoti_load_package(path)      # in any process; no blast_compile import needed
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Tuple

import torch

from ._counters import counters
from .ops import launch

log = logging.getLogger("blast_compile.export")


def _capture(model, args, kwargs, dynamic_shapes):
    with torch.no_grad():
        gm, _guards = torch._dynamo.export(model, dynamic_shapes=dynamic_shapes, assume_static_by_default=True)(
            *args, **kwargs)
    return gm, torch.utils._pytree.tree_leaves((args, kwargs))  # (the graph's inputs, in its order)


def _lowers(flat) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in flat)


def fuse(model, args: Tuple, kwargs: Optional[Mapping] = None, *, dynamic_shapes=None, options=None):
    """``(graph module, candidates)``: ``model`` captured by Dynamo with its block-sparse MLPs fused, and on
    CUDA lowered into ``blast::mlp``. Called with ``model``'s own arguments it gives ``model``'s output."""
    from .backend import rewrite_graph
    from .config import split_options

    kwargs = dict(kwargs or {})
    opts, rest = split_options(options)
    if rest:
        raise ValueError(f"options {sorted(rest)} are Inductor config keys: pass them to aoti_package(inductor_configs=...)")
    gm, flat = _capture(model, args, kwargs, dynamic_shapes)
    if not _lowers(flat):
        counters["blast"]["export_cpu_dense"] += 1
        log.info("blast export: CPU inputs, MLPs stay dense (AOTInductor cannot call the Python CPU op)")
        return gm, []
    with torch.no_grad(), launch.one_graph_for_all_rows():
        new, cands = rewrite_graph(gm, flat, opts)
        if any(c.decision == "fused" for c in cands):
            from .passes.lower import lower
            from .passes.match import Context

            lower(new, Context(new, flat), None)
            left = [n for n in new.graph.nodes if n.op == "call_function"
                    and str(n.target).startswith(("blast.sparse_mlp", "blast.packed_mlp"))]
            if left:  # (an opaque op in a package would need Python at run time)
                raise RuntimeError(f"blast export: {[n.name for n in left]} could not be lowered; see the log")
    new.graph._codegen = gm.graph._codegen  # Dynamo's pytree signature: the model's own arguments
    new.recompile()
    counters["blast"]["exported"] += 1
    return new, cands


def export(model, args: Tuple, kwargs: Optional[Mapping] = None, *, dynamic_shapes=None, options=None,
           strict: bool = False) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model`` with its block-sparse MLPs fused (see the module docstring).
    ``options`` are blast options (``BlastOptions``), as in ``torch.compile(..., options=...)``."""
    gm, _ = fuse(model, args, kwargs, dynamic_shapes=dynamic_shapes, options=options)
    with torch.no_grad(), launch.one_graph_for_all_rows():
        return torch.export.export(gm, tuple(args), dict(kwargs or {}), dynamic_shapes=dynamic_shapes,
                                   strict=strict)


def aoti_package(model, args: Tuple, package_path: str, kwargs: Optional[Mapping] = None, *,
                 dynamic_shapes=None, options=None, inductor_configs: Optional[dict] = None) -> str:
    """Export ``model`` (``export``) and compile it with AOTInductor into ``package_path`` (a ``.pt2``);
    returns the path. Load it with ``torch._inductor.aoti_load_package``."""
    ep = export(model, args, kwargs, dynamic_shapes=dynamic_shapes, options=options)
    with launch.one_graph_for_all_rows():  # (Inductor traces into blast::mlp again)
        return torch._inductor.aoti_compile_and_package(ep, package_path=package_path,
                                                        inductor_configs=inductor_configs)


__all__ = ["fuse", "export", "aoti_package"]
