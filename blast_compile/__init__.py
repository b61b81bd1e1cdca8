"""blast-compile: BLaST block-sparse MLPs as a torch.compile backend.

    torch.compile(model, backend="blast")        # detect -> fuse -> Triton -> Inductor
    blast_compile.explain(model, *inputs)        # what was fused, and why not
    blast_compile.refresh()                      # after writes through w.data (no version bump)

Folders read in pipeline order: passes/ (detect + rewrite), codegen/ (Triton
source per sparsity pattern), ops/ (the fused op: kernels + autograd).

Importing the package registers the ``blast::`` ops and the backend; everything
else (``.distributed``, ``.sparsifier``, the backend
function, ...) is imported on first use, so ``import blast_compile`` costs little more than
the ops do.
"""
import importlib
import logging

from . import ops as _ops  # noqa: F401  (registers the blast:: ops)
from . import compress as _compress  # noqa: F401  (registers blast::block_linear: a saved program may call it)
from .config import BlastOptions, Candidate
from .explain import ExplainReport, explain  # (eager: the submodule's name is the function's)
from .masks import declare_mask
from .ops.plans import refresh

logging.getLogger("blast_compile").addHandler(logging.NullHandler())

# name -> module that defines it, imported on first access (PEP 562)
_LAZY_ATTRS = {"blast": "backend"}
_SUBMODULES = {"backend", "calibrate", "cli", "compress", "config", "distributed", "explain", "export", "formats",
               "layouts", "masks", "memory_plan", "ops", "passes", "codegen", "sparsifier", "sparsify", "testing",
               "tp_checkpoint", "tp_compressed"}


def __getattr__(name):
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f".{_LAZY_ATTRS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRS) | _SUBMODULES)


def _register_backend():
    """backend="blast" works after ``pip install`` through the entry point (Dynamo loads
    ``blast_compile.backend:blast`` when it first looks the name up); a source checkout on
    PYTHONPATH has no entry point, so there the backend is registered now."""
    from importlib.metadata import entry_points

    if any(ep.name == "blast" for ep in entry_points(group="torch_dynamo_backends")):
        return
    import torch._dynamo

    from .backend import blast

    if "blast" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(blast, name="blast")


_register_backend()

__version__ = "0.1.0"
__all__ = ["blast", "explain", "ExplainReport", "BlastOptions", "Candidate", "declare_mask", "refresh", "__version__"]
