"""Why does split-K decode at M = 16 take ~2x its M = 1 time (issue 24: 8B, 90%, 1.9x the byte floor)? One call
per (path, M) bracketed by cudaProfilerStart/Stop for Nsight Compute, untuned configs (the first of each list):

    ncu --profile-from-start off --clock-control none --set full --csv --page details \\
        python bench/probes/decode_ncu.py > ncu_decode.csv

Per kernel ncu then gives duration, DRAM / L2 throughput, L2 atomic and reduction sectors
(``lts__t_sectors_op_red``: split-K's fp32 partial sums) and warp stall reasons: whether the M = 16 kernels
wait on memory, on the atomics, or on their own latency. Without ncu it prints each call's time (CUDA graph).
"""
import os
import sys

os.environ.setdefault("BLAST_TUNE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import torch  # noqa: E402

from blast_compile.ops import configs, triton_mlp  # noqa: E402
from test_kernels import args, make, plan_for  # noqa: E402

D, H = (4096, 14336) if "--1b" not in sys.argv else (2048, 8192)
w = make(D, H, gated=True, bias=False, dtype=torch.bfloat16, block=(64, 64), device="cuda", sparsity=0.9,
         tied=True)
for path in ("splitk", "sliced"):
    configs.DECODE_PATH = path
    for m in (1, 16):
        x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
        plan = plan_for(x, w, "silu", (64, 64))
        for _ in range(3):
            triton_mlp.forward(x, *args(w), plan, "silu")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            triton_mlp.forward(x, *args(w), plan, "silu")
        g.replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(100):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        print(f"{path} M={m}: {e0.elapsed_time(e1) * 10:.1f} us per call (graph, warm L2)", file=sys.stderr, flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        triton_mlp.forward(x, *args(w), plan, "silu")  # (eager launch: ncu profiles each kernel)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
configs.DECODE_PATH = ""
