"""The fused ops and their implementations: sparse_mlp (op + autograd), packed_mlp (compressed MLPs,
inference), gather (torch), triton_mlp (CUDA). ``lowered`` (blast::mlp, the triton_ops Inductor traces into) is
imported by the lowering pass: it pulls in Inductor, which ``import blast_compile`` need not."""
from . import watch as _watch
from . import sparse_mlp  # noqa: F401  registers torch.ops.blast.sparse_mlp
from . import packed_mlp  # noqa: F401  registers torch.ops.blast.packed_mlp (compressed MLPs)

_watch.install()  # counts fused-optimizer steps on the weights the fused ops read (they move no _version)
