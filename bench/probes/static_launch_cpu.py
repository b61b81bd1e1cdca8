"""Would Inductor's static CUDA launcher take every lowered kernel? Answered on a machine without a GPU.

Runs ``tests/_trace_lowered.py``'s cases (a fake CUDA target, the compile-time warm-up launching nothing), compiles
each kernel the warm-up would launch for sm_90 with the ptxas Triton ships, and builds Inductor's
``StaticallyLaunchedCudaKernel`` from it: that constructor is where the launcher refuses a kernel (global or
profile scratch, num_ctas > 1, a TMA descriptor argument; launch attributes such as PDL are refused before it).
Its answer depends on the installed torch and Triton, not on a GPU.

    python bench/probes/static_launch_cpu.py train decode_splitk prefill autocast

2026-12-07, torch 2.13.0+cpu, triton 3.9.0: mlp_hidden, bsmm, mlp_hidden_bwd, sddmm, mlp_decode_in, mlp_decode_dn
and pack_blocks (autocast's bf16 copies of fp32 weights) all accepted (no scratch, num_ctas 1, no PDL; sddmm_reduce,
dW's split over M at large M, is not reached by these small cases). So Triton's Python launcher is not where the
default-mode training step's host time goes with these versions (the device's torch 2.11 / triton 3.6: the GPU test
``test_lowered_kernels_get_inductors_static_launcher`` checks it there).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import _trace_lowered as T  # noqa: E402  (sets up the fake CUDA target)
from torch._inductor.runtime.static_triton_launcher import StaticallyLaunchedCudaKernel  # noqa: E402

from blast_compile.ops import launch  # noqa: E402

T._FakeDriver.get_current_stream = lambda self, device=None: 0
SEEN = {}
_launch = launch.Kernel.launch


def launch_and_check(self, grid, args, kw):
    if not launch.traced():
        kw2 = {k: v for k, v in kw.items() if k not in launch._NOT_TRACEABLE}
        try:
            k = self.fn.run(*args, grid=grid, warmup=True, **kw2)
            md = k.metadata
            info = {f: getattr(md, f, None) for f in ("global_scratch_size", "profile_scratch_size", "num_ctas",
                                                      "launch_pdl")}
            k._cubin_path = "unused"  # (the constructor only records it; loading needs a GPU)
            try:
                info["static"] = "accepted, args " + StaticallyLaunchedCudaKernel(k).arg_tys
            except Exception as e:
                info["static"] = f"refused: {type(e).__name__}: {e}"[:200]
        except Exception as e:
            info = {"compile_error": f"{type(e).__name__}: {e}"[:300]}
        SEEN.setdefault(self.fn.__name__, info)
    return _launch(self, grid, args, kw)


launch.Kernel.launch = launch_and_check
T.main(sys.argv[1:] or ["train", "decode_splitk", "prefill", "autocast"])
for name, info in SEEN.items():
    print(f"{name}: {info}")
