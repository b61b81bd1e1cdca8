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

The C++ compiler must link libstdc++ as a shared library: a package with libstdc++ linked in statically carries
its own copy of libstdc++'s locale code, which does not match the process's, and crashes while it loads
(``std::regex`` in its constructor). A GCC without its ``libstdc++.so`` development link does that -- on our
device image ``CXX`` named one. ``aoti_package`` links a probe with Inductor's compiler first and, where it came
out static, builds the package with a system compiler that links the shared library (a warning), or says what
to set.

On CPU a package holds the dense graph: the fused CPU op is Python, which AOTInductor cannot call, so
``export`` leaves CPU MLPs unfused there (counter ``export_cpu_dense``).

    ep = blast_compile.export.export(model, (x,))
    path = blast_compile.export.aoti_package(model, (x,), "model.pt2")
    runner = torch._inductor.aoti_load_package(path)      # in any process; no blast_compile import needed
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
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
    inductor_configs = _shared_libstdcxx(inductor_configs)
    ep = export(model, args, kwargs, dynamic_shapes=dynamic_shapes, options=options)
    with launch.one_graph_for_all_rows():  # (Inductor traces into blast::mlp again)
        return torch._inductor.aoti_compile_and_package(ep, package_path=package_path,
                                                        inductor_configs=inductor_configs)


def _shared_libstdcxx(inductor_configs: Optional[dict]) -> Optional[dict]:
    """``inductor_configs``, with ``cpp.cxx`` set to a compiler that links libstdc++ as a shared library where
    Inductor's own choice (``$CXX``, else ``g++``) would link it statically (see the module docstring)."""
    if not sys.platform.startswith("linux"):  # (elsewhere the C++ runtime is not libstdc++.so.6)
        return inductor_configs
    given = (inductor_configs or {}).get("cpp.cxx")
    cxx = _compiler(given)
    if cxx is None or _links_libstdcxx_shared(cxx) is not False:  # (None: it could not link at all -- Inductor
        return inductor_configs  # will report that itself)
    where = "inductor_configs['cpp.cxx']" if given else "CXX" if os.environ.get("CXX") else "Inductor's cpp.cxx"
    if not given:
        # (PATH may lead to the same compiler again: the system's own paths too)
        names = ("g++", "c++", "clang++", "/usr/bin/g++", "/usr/bin/c++", "/usr/bin/clang++")
        for alt in dict.fromkeys(shutil.which(c) for c in names):
            if alt and os.path.realpath(alt) != os.path.realpath(cxx) and _links_libstdcxx_shared(alt):
                log.warning("blast: %s (%s) links libstdc++ statically, and AOTInductor packages built so crash "
                            "when loaded; building the package with %s instead. Set CXX to a compiler that links "
                            "libstdc++.so (or install %s's libstdc++ development files)", cxx, where, alt, cxx)
                counters["blast"]["aoti_compiler_switched"] += 1
                return {**(inductor_configs or {}), "cpp.cxx": (alt,)}
    raise RuntimeError(f"blast: the C++ compiler {cxx} ({where}) links libstdc++ statically, and an AOTInductor "
                       f"package built so crashes when it is loaded; set {where} to a compiler that links "
                       f"libstdc++.so (e.g. the system g++), or install {cxx}'s libstdc++ development files")


def _compiler(given) -> Optional[str]:
    """The C++ compiler AOTInductor will run: Inductor's search over ``given`` (a ``cpp.cxx`` value: one name or
    a tuple of candidates), else over its own ``cpp.cxx`` (``$CXX``, else ``g++``)."""
    try:
        from torch._inductor import config
        from torch._inductor.cpp_builder import get_cpp_compiler

        with config.patch({"cpp.cxx": given} if given else {}):
            return get_cpp_compiler()
    except Exception:  # (no compiler: AOTInductor will say so itself)
        return None


_PROBE = "#include <locale>\n#include <string>\nstd::string blast_probe() { return std::locale().name(); }\n"


@functools.lru_cache(maxsize=None)
def _links_libstdcxx_shared(cxx: str) -> Optional[bool]:
    """Whether a shared object that ``cxx`` links (as AOTInductor links its packages: ``-shared -fPIC``) needs
    ``libstdc++.so.6``; None where ``cxx`` could not build it. Linked rather than asked (``-print-file-name``):
    a compiler wrapper may add ``-static-libstdc++`` whatever GCC itself would find."""
    with tempfile.TemporaryDirectory(prefix="blast_cxx_") as d:
        src, out = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE)
        try:
            r = subprocess.run([cxx, "-shared", "-fPIC", src, "-o", out], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        if r.returncode != 0 or not os.path.exists(out):
            return None
        with open(out, "rb") as f:
            return b"libstdc++.so.6" in f.read()  # (its DT_NEEDED name; absent from a static link)


__all__ = ["fuse", "export", "aoti_package"]
