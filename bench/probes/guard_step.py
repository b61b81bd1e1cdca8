"""Host cost of the graph guard per training step (CPU is enough: it is host work): six lowered MLPs' watches with
declared masks, a fused AdamW step between calls, the guard's ``compiled`` a no-op. Prints the guard's share.

    python bench/probes/guard_step.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from test_lowering import Calls, make_guard  # noqa: E402

from blast_compile.guard import GraphGuard  # noqa: E402

guards = [make_guard(declare=True) for _ in range(6)]
guard = GraphGuard(Calls(), Calls(), [w for g, *_ in guards for w in g.watches])
params = [p for *_, ws in guards for p in ws]
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
for p in params:
    p.grad = torch.zeros_like(p)
N = 2000
for with_guard in (False, True, False, True):
    for _ in range(20):
        opt.step()
    t = time.perf_counter()
    for _ in range(N):
        opt.step()
        if with_guard:
            guard()
    print(f"optimizer step{' + guard' if with_guard else ''}: {(time.perf_counter() - t) / N * 1e6:.1f} us")
