"""Host cost of a lowered MLP's index tables in a compiled training step, on CPU: 6 layers, each a custom op
``y = x @ w`` whose forward and backward take k int32 buffers as a list (as ``blast::mlp_train`` /
``blast::mlp_backward`` take theirs: graph inputs, saved for the backward). Default-mode Inductor, tiny shapes, so
the step is all host time.

    python bench/probes/table_inputs.py

2026-12-07, this repository's 2-core CPU machine, torch 2.13, two runs: 281 / 298 / 520 and 263 / 294 / 519 us a
step at k = 0 / 1 / 25, i.e. 1.6-1.7 us per table per layer per step, ~5 us for the first. A lowered training
MLP passed 25 tables, ~0.2-0.3 ms a step for the 34M model's 6 layers. ``lowered.register`` now packs them into
one buffer per dtype (2 inputs) whose views the traced kernels take: about the k = 1-2 rows plus Inductor's
``reinterpret_tensor`` per view argument. The last variant here (one buffer, 25 views of it passed to the op:
481 / 468 us) overstates that: its views are op inputs, saved for the backward one by one, where the lowered
op saves its two buffers and makes the views inside its trace.
"""
import time
from typing import List

import torch


@torch.library.custom_op("toy::mm", mutates_args=())
def mm(x: torch.Tensor, w: torch.Tensor, tables: List[torch.Tensor]) -> torch.Tensor:
    return x @ w


@mm.register_fake
def _(x, w, tables):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("toy::mm_bwd", mutates_args=())
def mm_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, tables: List[torch.Tensor]) -> List[torch.Tensor]:
    return [dy @ w.t(), x.t() @ dy]


@mm_bwd.register_fake
def _(dy, x, w, tables):
    return [x.new_empty(x.shape), w.new_empty(w.shape)]


def setup(ctx, inputs, output):
    x, w, tables = inputs
    ctx.save_for_backward(x, w, *tables)
    ctx.k = len(tables)


def bwd(ctx, dy):
    x, w, *tables = ctx.saved_tensors
    dx, dw = torch.ops.toy.mm_bwd(dy, x, w, tables)
    return dx, dw, [None] * ctx.k


mm.register_autograd(bwd, setup_context=setup)


class Layer(torch.nn.Module):
    def __init__(self, d, k, packed=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, d) * 0.01)
        if packed:  # one buffer, k views of it (``lowered.register``'s packing: one input, views in the graph)
            self.register_buffer("flat", torch.arange(8 * k, dtype=torch.int32), persistent=False)
        for i in range(0 if packed else k):
            self.register_buffer(f"t{i}", torch.arange(8, dtype=torch.int32), persistent=False)
        self.k, self.packed = k, packed

    def forward(self, x):
        if self.packed:
            return x + mm(x, self.w, [self.flat[8 * i:8 * i + 8] for i in range(self.k)])
        return x + mm(x, self.w, [getattr(self, f"t{i}") for i in range(self.k)])


def run(k, layers=6, d=8, iters=300, packed=False):
    torch._dynamo.reset()
    m = torch.nn.Sequential(*[Layer(d, k, packed) for _ in range(layers)])
    f = torch.compile(m)
    x = torch.randn(4, d)

    def step():
        f(x).sum().backward()

    for _ in range(5):
        step()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            step()
        ts.append((time.perf_counter() - t) / iters * 1e6)
    return sorted(ts)[2]


base = None
for k, packed in ((0, False), (1, False), (25, False), (25, True), (0, False)):
    us = run(k, packed=packed)
    base = us if base is None else base
    print(f"k={k:2d} tables/layer{' (one buffer, k views)' if packed else ''}: {us:7.1f} us/step  "
          f"(+{(us - base) / 6 / max(k, 1):.2f} us per table per layer)", flush=True)
