"""Tiny run of every kernel (decode, prefill, backward incl. SDDMM) for compute-sanitizer."""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.setdefault("BLAST_TUNE", "0")
from test_kernels import check_forward, check_backward  # noqa: E402

for mode in ("sliced", "splitk"):  # both decode paths
    os.environ["BLAST_DECODE"] = mode
    check_forward(3, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7)
os.environ["BLAST_DECODE"] = ""
check_forward(70, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7)
check_backward(70, 192, 448, True, True, "silu", torch.bfloat16, (64, 32), "cuda", declare=True, sparsity=0.7)
torch.cuda.synchronize()
print("sanitize script ok")
