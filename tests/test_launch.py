"""``ops.launch``: the direct launch path must launch what Triton's JIT would, with the arguments in
the kernel's order, and go back to the JIT whenever Triton could specialize differently."""
import inspect

import pytest
import torch

from blast_compile.ops import launch
from conftest import tol


class FakeCompiled:
    def __init__(self, log, key):
        self.log, self.key = log, key
        self.function, self.packed_metadata = f"fn{key}", f"meta{key}"

    def run(self, g0, g1, g2, stream, function, meta, launch_meta, enter, exit_, *vals):
        self.log.append(("direct", self.key, (g0, g1, g2), vals))


class FakeJIT:
    """What ``Kernel`` reads of a ``triton.runtime.jit.JITFunction``: ``params`` and ``run``."""

    def __init__(self):
        def kern(x, n, y, BLOCK, FLAG=False):  # (the last two as constexprs would be)
            pass

        self.params = [_Param(p) for p in inspect.signature(kern).parameters.values()]
        self.log, self.n_compiled = [], 0

    def run(self, *args, grid, warmup, **kw):
        self.n_compiled += 1
        vals = list(args) + [kw.get(p.name, p.default) for p in self.params[len(args):]]
        self.log.append(("jit", self.n_compiled, tuple(grid), tuple(vals), warmup))
        return FakeCompiled(self.log, self.n_compiled)

    def __getitem__(self, grid):
        return lambda *a, **kw: self.run(*a, grid=grid, warmup=False, **kw)


class _Param:
    def __init__(self, p):
        self.name, self.default = p.name, p.default
        self.has_default = p.default is not inspect.Parameter.empty


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setitem(launch._ON, "on", True)
    monkeypatch.setattr(launch, "_driver", _Driver)


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7


def test_direct_launch_after_first_with_arguments_in_kernel_order(on):
    fake = FakeJIT()
    k = launch.Kernel(fake)
    x, y = torch.zeros(8), torch.zeros(8)
    k[(3,)](x, 5, y, BLOCK=4)
    k[(4, 2)](x, 5, y, BLOCK=4)
    assert [e[0] for e in fake.log] == ["jit", "direct"]
    assert fake.log[1][2] == (4, 2, 1) and fake.log[1][3] == (x, 5, y, 4, False)  # default filled in


@pytest.mark.parametrize("change", ["int_value", "one", "alignment", "dtype", "constexpr", "option", "none"])
def test_what_triton_specializes_on_goes_back_to_the_jit(on, change):
    fake = FakeJIT()
    k = launch.Kernel(fake)
    buf = torch.zeros(64)
    x, y = buf[:16], torch.zeros(8)
    args, kw = [x, 32, y], dict(BLOCK=4)
    k[(1,)](*args, **kw)
    if change == "int_value":
        args[1] = 48
    elif change == "one":
        args[1] = 1
    elif change == "alignment":
        args[0] = buf[1:17]  # 4-byte offset: no longer 16-byte aligned
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        kw["BLOCK"] = 8
    elif change == "option":
        kw["num_warps"] = 8
    else:
        args[2] = None
    k[(1,)](*args, **kw)
    k[(1,)](*args, **kw)
    assert [e[0] for e in fake.log] == ["jit", "jit", "direct"]


def test_unknown_argument_types_and_hooks_always_take_the_jit(on, monkeypatch):
    fake = FakeJIT()
    k = launch.Kernel(fake)
    for _ in range(2):
        k[(1,)](object(), 1, torch.zeros(1), BLOCK=4)
    assert [e[0] for e in fake.log] == ["jit", "jit"]
    monkeypatch.setattr(launch, "_hooks_idle", lambda: False)
    for _ in range(2):
        k[(1,)](torch.zeros(1), 1, torch.zeros(1), BLOCK=4)
    assert [e[0] for e in fake.log] == ["jit"] * 4


def test_compile_only_compiles_and_launches_nothing(on, monkeypatch):
    """Inside ``compile_only`` a launch asks the JIT to compile (warmup) and keeps nothing for direct
    launches; outside it, and in other threads meanwhile, launches run as before."""
    import threading

    monkeypatch.setattr(launch, "INTERPRET", False)
    fake = FakeJIT()
    k = launch.Kernel(fake)
    x, y = torch.zeros(8), torch.zeros(8)
    seen = []
    with launch.compile_only():
        k[(3,)](x, 5, y, BLOCK=4)
        t = threading.Thread(target=lambda: seen.append(getattr(launch._THREAD, "compile_only", False)))
        t.start()
        t.join()
    k[(3,)](x, 5, y, BLOCK=4)
    assert [(e[0], e[4]) for e in fake.log] == [("jit", True), ("jit", False)]
    assert seen == [False]


def test_tuner_precompiles_candidates_on_threads(monkeypatch):
    """``tune._precompile``: every candidate once, on worker threads, with launches compile-only;
    a candidate that fails is left for the timing loop; one thread (or one config): nothing."""
    import threading
    from blast_compile.ops import tune

    calls = []

    def run(cfg):
        calls.append((cfg, threading.current_thread().name, launch._THREAD.compile_only))
        if cfg == 3:
            raise RuntimeError("does not compile")

    monkeypatch.setattr(tune, "COMPILE_THREADS", 4)
    tune._precompile([1, 2, 3, 4, 5], run)
    assert sorted(c for c, _, _ in calls) == [1, 2, 3, 4, 5]
    assert all(name.startswith("blast-compile") and only for _, name, only in calls)
    assert not getattr(launch._THREAD, "compile_only", False)
    calls.clear()
    tune._precompile([1], run)
    monkeypatch.setattr(tune, "COMPILE_THREADS", 1)
    tune._precompile([1, 2], run)
    assert calls == []


def test_precompile_on_the_plan_worker_does_not_wait_on_it(monkeypatch):
    """Tuning can run on the one plan worker (``plans.outside_graph_pool``: a compiled model's warm-up); the
    compile threads then build plan tables themselves, as that worker would, instead of queueing work for
    it while it waits for them (a deadlock)."""
    from blast_compile.ops import plans, tune

    seen = []
    monkeypatch.setattr(tune, "COMPILE_THREADS", 3)
    plans._ON_WORKER.on = True
    try:
        tune._precompile([1, 2, 3], lambda cfg: seen.append(getattr(plans._ON_WORKER, "on", False)))
    finally:
        plans._ON_WORKER.on = False
    assert seen == [True, True, True]


def test_off_switch(monkeypatch):
    monkeypatch.setitem(launch._ON, "on", False)
    fake = FakeJIT()
    k = launch.Kernel(fake)
    for _ in range(3):
        k[(1,)](torch.zeros(1), 2, torch.zeros(1), BLOCK=4)
    assert [e[0] for e in fake.log] == ["jit"] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sliced", "splitk"])
def test_gpu_direct_launches_match_jit_launches(path, monkeypatch):
    """The op on CUDA with direct launches: same results as with Triton's JIT launches, bitwise on the
    deterministic (sliced) path, across M = 1 (an int Triton turns into a constant), other M, and an x
    that is not 16-byte aligned (a view at an odd offset)."""
    from blast_compile.ops import configs, triton_mlp
    from blast_compile.ops.sparse_mlp import weights_plan
    from blast_compile.testing import SwiGLU, sparsify_mlps_

    monkeypatch.setattr(configs, "DECODE_PATH", path)
    monkeypatch.setenv("BLAST_TUNE", "0")
    torch.manual_seed(0)
    mlp = SwiGLU(256, 512).cuda().half()
    sparsify_mlps_(mlp, 0.8, block=64)
    w1, w3, w2 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    buf = torch.randn(40 * 256 + 1, device="cuda", dtype=torch.float16)
    outs = {}
    for fast in (False, True, True):
        monkeypatch.setitem(launch._ON, "on", fast)
        got = []
        for m, off in ((1, 0), (5, 0), (1, 1), (16, 1), (40, 0), (40, 1), (1, 0)):
            x = buf[off: off + m * 256].view(m, 256)
            plan = weights_plan(x, w1, None, w3, None, w2, None, "silu", 64, 64, "", 1.0)
            y = triton_mlp.forward(x, w1, None, w3, None, w2, None, plan, "silu")
            torch.testing.assert_close(y, mlp(x), **tol(torch.float16))
            got.append(y)
        outs.setdefault(fast, []).append(got)
    for a, b in zip(outs[False][0], outs[True][1]):
        if path == "sliced":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **tol(torch.float16))
