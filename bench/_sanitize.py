"""Tiny run of every kernel (decode, prefill, backward incl. SDDMM) for compute-sanitizer."""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.setdefault("BLAST_TUNE", "0")
from test_kernels import check_forward, check_backward  # noqa: E402
from blast_compile.ops import configs, triton_mlp  # noqa: E402

for mode in ("sliced", "splitk"):  # both decode paths
    configs.DECODE_PATH = mode
    check_forward(3, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7)
for cfg in ((2, 1, 2, 2), (1, 1, 2, 0)):  # split-K's M=1 GEMV: flat tables with padding; early or not
    configs.DECODE_GEMV_CONFIGS = [cfg]
    check_forward(1, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7)
configs.DECODE_PATH, saved = "sliced", configs.DECODE_SLICE_CONFIGS  # the sliced bsmm's split reduction
configs.DECODE_SLICE_CONFIGS = [configs.Slice(16, 2, 4, 2, 4)]
for m in (3, 20):  # both decode tiles (BM 16 / 32)
    check_forward(m, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7)
configs.DECODE_SLICE_CONFIGS = saved
configs.DECODE_PATH = ""
check_forward(70, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7)
check_backward(70, 192, 448, True, True, "silu", torch.bfloat16, (64, 32), "cuda", declare=True, sparsity=0.7)
# the wide prefill/backward variants (128-wide gate|up dots, 2-block steps), fp32 masters packed by pack_blocks
configs.PREFILL_CONFIGS, configs.BACKWARD_CONFIGS = [(64, 4, 3, 1)], [(64, 4, 3, 2)]
check_forward(70, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7, seed=1)
check_backward(70, 192, 448, True, False, "silu", torch.bfloat16, (64, 64), "cuda", declare=True, sparsity=0.7)
# the TMA variants (tiles through tensor descriptors; ragged rows/edges zero-filled by their bounds)
configs.PREFILL_CONFIGS, configs.BACKWARD_CONFIGS = [(64, 4, 3, 2)], [(64, 4, 3, 3)]
configs.SDDMM_CONFIGS = [(64, 4, 3, 1)]
check_forward(70, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7, seed=2)
check_backward(70, 192, 448, True, True, "silu", torch.bfloat16, (64, 32), "cuda", declare=True, sparsity=0.7)
# dX's dA and dU halves in two TMA loops; dW's zeros written by the dW kernel (the default FILL)
configs.PREFILL_CONFIGS = [(64, 4, 3, configs.TWO_LOOPS)]
check_backward(70, 192, 448, True, False, "silu", torch.bfloat16, (64, 64), "cuda", declare=True, sparsity=0.7)
# programs in groups of M tiles (3 tiles of 32 rows in groups of 2: a short last group)
configs.PREFILL_CONFIGS, configs.BACKWARD_CONFIGS = [(32, 4, 3, 2, 2)], [(32, 4, 3, 3, 2)]
check_forward(70, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7, seed=3)
check_backward(70, 192, 448, True, True, "silu", torch.bfloat16, (64, 32), "cuda", declare=True, sparsity=0.7)
from test_kernels import args, make, plan_for  # noqa: E402
w = make(192, 448, gated=True, bias=False, dtype=torch.float32, block=(64, 64), device="cuda")
x = torch.randn(70, 192, device="cuda", dtype=torch.bfloat16)
triton_mlp.forward(x, *args(w), plan_for(x, w, "silu", (64, 64)), "silu")  # fp32 masters: pack_blocks
# the training forward keeping H and the pre-activations, backward kernel 1 reading them (LOAD_PRE), TMA and not
w = make(192, 448, gated=True, bias=True, dtype=torch.bfloat16, block=(64, 64), device="cuda", dead_rows=True)
x, dy = torch.randn(70, 192, device="cuda", dtype=torch.bfloat16), torch.randn(70, 192, device="cuda", dtype=torch.bfloat16)
for cfg in ((64, 4, 2, 3), (64, 4, 3, 0), (64, 4, 2, 3, 0, 1, 96)):  # loaded after / before the dh loop, capped
    configs.BACKWARD_PRE_CONFIGS = [cfg]
    plan = plan_for(x, w, "silu", (64, 64))
    plan.cache.clear()
    _, s = triton_mlp.forward(x, *args(w), plan, "silu", keep=2)
    triton_mlp.backward(dy, x, *args(w), plan, "silu", [True] * 7, s)
# dW over two and four live blocks of a row per program (gathered input tiles, padded rows), with an M split
for cfg in ((32, 4, 3, 0, 2), (32, 4, 3, 0, 4)):
    configs.SDDMM_CONFIGS = [cfg]
    check_backward(70, 192, 448, True, False, "silu", torch.bfloat16, (64, 64), "cuda", declare=True, sparsity=0.5)
    configs.SDDMM_MIN_ROWS = 16
    check_backward(70, 192, 448, True, False, "silu", torch.bfloat16, (64, 64), "cuda", declare=True, tied=True,
                   sparsity=0.5)
    configs.SDDMM_MIN_ROWS = 256
torch.cuda.synchronize()
print("sanitize script ok")
