"""The ``blast`` torch.compile backend.

``torch.compile(model, backend="blast")`` lands here (entry point group
``torch_dynamo_backends``) with the Dynamo FX graph and its example inputs.
That is the one place where the weights' *values* are visible (the example
inputs of parameter placeholders are the real Parameters), so detection runs
here, on a copy of the graph:

    detect (passes.match / passes.decide) -> rewrite (passes.rewrite)
      -> codegen (Triton source per pattern, on CUDA) -> Inductor (compile_fx)

The rewritten graph holds one ``blast::sparse_mlp`` node per fused MLP; the
rest goes to Inductor untouched. Any internal error falls back to plain
Inductor on the original graph with a warning, unless ``strict=True``.
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional

import torch
from torch._dynamo.utils import counters

from .config import BlastOptions, Candidate, split_options

log = logging.getLogger("blast_compile.backend")

# Every compiled graph's report, newest last (explain() reads the ones it produced).
REPORTS: List["GraphReport"] = []
_MAX_REPORTS = 256


class GraphReport:
    """What the backend did to one Dynamo graph."""

    def __init__(self, candidates: List[Candidate], code: str, error: Optional[str] = None):
        self.candidates = candidates
        self.code = code
        self.error = error


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copied graph (node.meta shallow-copied), sharing attributes."""
    graph = torch.fx.Graph()
    val_map = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, new_node in val_map.items():  # Dynamo hangs the input's source on the node itself
        if hasattr(old, "_dynamo_source"):
            new_node._dynamo_source = old._dynamo_source
    new = torch.fx.GraphModule(gm, graph)
    # Dynamo's annotations (e.g. _param_name_to_source) tell AOTAutograd which inputs are
    # parameters / static buffers; without them CUDA graphs copy every weight per replay
    # or are skipped for "mutated inputs".
    for k, v in gm.__dict__.items():
        if k not in new.__dict__:
            new.__dict__[k] = v
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _inductor_patches(mode: Optional[str], extra: dict) -> dict:
    patches = {}
    if mode and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(extra)
    return patches


STATIC_LAUNCH_ENV = "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"


def _static_launch(opts: BlastOptions) -> dict:
    """Inductor patches that let its static CUDA launcher take user-defined Triton kernels (the lowered MLPs').

    Inductor launches its own kernels through a launcher in C, a user kernel through Triton's Python launcher
    unless ``static_launch_user_defined_triton_kernels`` is set -- and its compile workers read that setting from
    the environment when they start. So, unless the option is off, :func:`enable_static_launch` sets the variable
    before the first compile that would start them, and the setting is patched for compiles in this process."""
    from torch._inductor import config as inductor_config

    key = "static_launch_user_defined_triton_kernels"
    if not opts.static_launch or not hasattr(inductor_config, key):
        return {}  # (a torch without the setting: Triton's launcher, as before)
    return {key: True} if enable_static_launch() else {}


def enable_static_launch() -> bool:
    """Set ``TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1`` unless the user set it (either way);
    True where it is on. For every user kernel compiled from then on (one the static launcher cannot take --
    launch hooks or attributes, a global scratch -- keeps Triton's). blast's own programs that compile a dense
    phase with Inductor first (``blast sparsify``, examples/pretrain.py) call it before that compile: it starts
    the workers, which would otherwise never see the variable."""
    import os

    if STATIC_LAUNCH_ENV not in os.environ:
        os.environ[STATIC_LAUNCH_ENV] = "1"
        if _compile_workers_started():
            log.info("blast: Inductor's compile workers started before blast's first compile in this process: the "
                     "lowered kernels they compile keep Triton's launcher (set %s=1 before any compile for the "
                     "static one)", STATIC_LAUNCH_ENV)
    return os.environ[STATIC_LAUNCH_ENV] == "1"


def _compile_workers_started() -> bool:
    try:
        from torch._inductor.async_compile import AsyncCompile

        return AsyncCompile.process_pool.cache_info().currsize > 0
    except Exception:  # (another torch's layout: unknown, say nothing)
        return False


def _fused_nodes(gm):
    fused = (torch.ops.blast.sparse_mlp.default, torch.ops.blast.sparse_mlp_train.default)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in fused]


def _fill_kernel_info(cands: List[Candidate], gm):
    """Say which implementation runs each fused MLP (and where the generated source is)."""
    # rewrite left the pattern decide() built on each fused node; take it off again so it
    # never travels into AOTAutograd / Inductor with the node's meta
    nodes = {n.args[10]: n for n in _fused_nodes(gm)}
    patterns = {k: n.meta.pop("blast_pattern", None) for k, n in nodes.items()}
    for c in cands:
        if c.decision != "fused" or c.kernel:  # compressed MLPs: decide_packed named the kernel
            continue
        if not c.device.startswith("cuda"):
            c.kernel = "gather (torch): packed live blocks + batched matmul"
            continue
        try:
            from . import codegen

            gated = c.kind == "gated"
            b1, b3, b2 = (nodes[c.pattern_key].args[i] for i in (2, 4, 6))
            name, path = codegen.kernel_info(
                patterns[c.pattern_key], c.activation, gated, b1 is not None, b3 is not None, b2 is not None,
                getattr(torch, c.dtype.replace("torch.", "")), torch.device(c.device),
            )
            c.kernel, c.kernel_source = name, str(path)
        except Exception as e:  # explain must not break compile
            log.debug("blast: no kernel info: %r", e)
            c.kernel = c.kernel or "triton (generated at first call)"


def _trace_artifact(gm: torch.fx.GraphModule, cands: List[Candidate]):
    try:
        from torch._logging import trace_structured

        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": "blast_rewritten_graph", "encoding": "string"},
            payload_fn=lambda: gm.print_readable(print_output=False)
            + "\n# blast decisions\n"
            + "\n".join(f"# {c.module}: {c.decision} ({c.reason})" for c in cands),
        )
    except Exception as e:  # tracing is best effort
        log.debug("blast: trace artifact failed: %r", e)


def _record(report: GraphReport):
    REPORTS.append(report)
    del REPORTS[:-_MAX_REPORTS]


def rewrite_graph(gm: torch.fx.GraphModule, example_inputs, opts: BlastOptions):
    """Run the passes on a copy of ``gm``; returns (new_gm, candidates)."""
    from . import codegen
    from .passes import run_passes
    from .passes.decide import is_dtensor

    if hasattr(codegen, "set_kernel_dir") and opts.kernel_dir:
        codegen.set_kernel_dir(opts.kernel_dir)
    if any(is_dtensor(t) for t in example_inputs):
        from . import distributed  # noqa: F401  registers the DTensor sharding rule of the fused op
    new = _copy_graph_module(gm)
    cands = run_passes(new, example_inputs, opts)
    _fill_kernel_info(cands, new)
    return new, cands


def _guard_weights(cands: List[Candidate]) -> None:
    """Make Dynamo guard on the identity of every MLP weight the passes looked at: its graph holds a decision
    about *these* weights (fused with their pattern, or dense), and without such a guard a second model of the
    same class would reuse it (Dynamo's cache keys on code and guards, not on weight values). A new set of
    weights recompiles, and gets its own decision."""
    tc = torch._guards.TracingContext.try_get()
    if tc is None:
        return
    from torch._dynamo.guards import GuardBuilder

    for c in cands:
        for src in getattr(c, "_sources", ()):
            if src is not None:
                tc.guards_context.dynamo_guards.add(src.make_guard(GuardBuilder.ID_MATCH))


def _warn_fallback(what: str, e: Exception, then: str):
    counters["blast"]["fallback"] += 1
    msg = f"blast: internal error while {what} ({type(e).__name__}: {e}); {then}"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg, exc_info=True)


def _lower(new_gm, example_inputs, opts):
    """``(fallback, watches)``: the opaque graph kept for the guard, and one Watch per lowered MLP."""
    from .passes.lower import lower, lowerable

    if not (opts.lower and lowerable(new_gm)):
        return None, []
    from .passes.match import Context

    fallback = _copy_graph_module(new_gm)
    watches = lower(new_gm, Context(new_gm, example_inputs), torch._guards.detect_fake_mode(example_inputs))
    return fallback, watches


def blast(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None, options: Optional[dict] = None):
    """torch.compile backend: fuse block-sparse MLPs, lower them into Inductor's code, compile with Inductor."""
    opts, inductor_opts = split_options(options)
    if inductor_opts and not opts.inductor:  # (aot_eager reads no Inductor config: they would do nothing)
        raise ValueError(f"options {sorted(inductor_opts)} are Inductor config keys, but the blast option "
                         "inductor=False compiles without Inductor (aot_eager): drop them, or inductor=False")
    counters["blast"]["graphs"] += 1
    fallback, watches = None, []
    try:
        new_gm, cands = rewrite_graph(gm, example_inputs, opts)
        _guard_weights(cands)
        try:
            fallback, watches = _lower(new_gm, example_inputs, opts)
            lowered = {w.name.split(".")[0] for w in watches}
            for c in cands:
                if c.decision == "fused" and c.pattern_key in lowered:
                    c.kernel += "; lowered: Inductor launches it"
        except Exception as e:
            if opts.strict:
                raise
            _warn_fallback("lowering fused MLPs into Inductor", e, "they run as opaque ops (slower host path)")
            fallback, watches = None, []
            new_gm, cands = rewrite_graph(gm, example_inputs, opts)  # (lowering may have left new_gm half done)
        code = new_gm.code
        _trace_artifact(new_gm, cands)
        _record(GraphReport(cands, code))
        n = sum(c.decision == "fused" for c in cands)
        log.info("blast: %d of %d MLP candidates fused in graph %d (%d lowered)", n, len(cands),
                 counters["blast"]["graphs"], len(watches))
        log.debug("blast: rewritten graph\n%s", code)
    except Exception as e:
        if opts.strict:
            raise
        _warn_fallback("rewriting", e, "compiling this graph " + ("with plain Inductor" if opts.inductor
                                                                   else "unchanged (inductor=False)"))
        _record(GraphReport([], gm.code, error=repr(e)))
        new_gm = gm
    if opts.inductor:
        from torch._inductor.compile_fx import compile_fx

        patches = _inductor_patches(mode, inductor_opts)
        if watches:  # (lowered MLPs, on CUDA: their kernels are user kernels to Inductor)
            patches = {**_static_launch(opts), **patches}

        def compile_(g):
            return compile_fx(g, example_inputs, config_patches=patches or None)
    else:
        from torch._dynamo.backends.registry import lookup_backend

        def compile_(g):
            return lookup_backend("aot_eager")(g, example_inputs)
    if not watches:
        return compile_(new_gm)
    from .guard import GraphGuard

    try:
        compiled = compile_(new_gm)
    except Exception as e:
        if opts.strict:
            raise
        _warn_fallback("compiling the lowered MLPs", e, "they run as opaque ops (slower host path)")
        return compile_(fallback)
    return GraphGuard(compiled, fallback, watches)


__all__ = ["blast", "rewrite_graph", "REPORTS", "GraphReport"]
