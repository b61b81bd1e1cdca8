"""blast-compile: BLaST block-sparse MLPs as a torch.compile backend.

    torch.compile(model, backend="blast")        # detect -> fuse -> Triton -> Inductor
    blast_compile.explain(model, *inputs)        # what was fused, and why not
    blast_compile.refresh()                      # after writes through w.data (no version bump)

Folders read in pipeline order: passes/ (detect + rewrite), codegen/ (Triton
source per sparsity pattern), ops/ (the fused op: kernels + autograd).
"""
import logging

from . import ops as _ops  # noqa: F401  (registers the blast:: ops)
from .backend import blast
from .config import BlastOptions, Candidate
from .explain import ExplainReport, explain
from .masks import declare_mask
from .ops.plans import refresh

logging.getLogger("blast_compile").addHandler(logging.NullHandler())


def _register_backend():
    """backend="blast" works after `pip install` through the entry point; this covers a
    source checkout on PYTHONPATH (no entry point) once blast_compile is imported."""
    import torch._dynamo

    if "blast" not in torch._dynamo.list_backends(exclude_tags=()):  # also loads entry points
        torch._dynamo.register_backend(blast, name="blast")


_register_backend()

__version__ = "0.1.0"
__all__ = ["blast", "explain", "ExplainReport", "BlastOptions", "Candidate", "declare_mask", "refresh", "__version__"]
