"""blast-compile: BLaST block-sparse MLPs as a torch.compile backend.

    torch.compile(model, backend="blast")        # detect -> fuse -> Triton -> Inductor
    blast_compile.explain(model, *inputs)        # what was fused, and why not

Folders read in pipeline order: passes/ (detect + rewrite), codegen/ (Triton
source per sparsity pattern), ops/ (the fused op: kernels + autograd).
"""
import logging

from . import ops as _ops  # noqa: F401  (registers the blast:: ops)
from .backend import blast
from .config import BlastOptions, Candidate
from .explain import ExplainReport, explain
from .masks import declare_mask

logging.getLogger("blast_compile").addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["blast", "explain", "ExplainReport", "BlastOptions", "Candidate", "declare_mask", "__version__"]
