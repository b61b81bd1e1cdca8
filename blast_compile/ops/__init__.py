"""The fused op and its implementations: sparse_mlp (op + autograd), gather (torch), triton_mlp (CUDA)."""
from . import sparse_mlp  # noqa: F401  registers torch.ops.blast.sparse_mlp
