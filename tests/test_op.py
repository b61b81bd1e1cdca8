"""blast::sparse_mlp against eager: values, every gradient, staleness, NaN, declared masks."""
import itertools

import pytest
import torch
from hypothesis import given, strategies as st
from torch._dynamo.utils import counters

from blast_compile import masks
from blast_compile.formats import cdiv, choose_block, expand_mask, pattern_from_weights
from blast_compile.ops.activations import ACTIVATIONS, dense_mlp
from blast_compile.testing import random_block_mask
from conftest import tol

ACTS = sorted(ACTIVATIONS)


def make_mlp(d, h, *, gated, bias, dtype, sparsity, block=(16, 16), seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    bh, bd = block

    def w(o, i, bo, bi):
        t = torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5
        m = random_block_mask(cdiv(o, bo), cdiv(i, bi), sparsity, g)
        return (t * expand_mask(m, bo, bi, t.shape)).to(dtype).requires_grad_(requires_grad)

    def b(n):
        return (torch.randn(n, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(requires_grad) if bias else None

    w1 = w(h, d, bh, bd)
    w3 = w(h, d, bh, bd) if gated else None
    w2 = w(d, h, bd, bh)
    return dict(w1=w1, b1=b(h), w3=w3, b3=b(h) if gated else None, w2=w2, b2=b(d))


def compile_time(p, act):
    """What the backend decides at compile time: block shape and pattern key."""
    ch = choose_block(p["w1"], p["w3"], p["w2"])
    bh, bd = (ch.bh, ch.bd) if ch else (16, 16)
    key = pattern_from_weights(p["w1"], p["w3"], p["w2"], bh, bd, activation=act,
                               has_b1=p["b1"] is not None, has_b3=p["b3"] is not None).key
    return bh, bd, key


def call(x, p, act, max_density=1.0, compiled=None):
    bh, bd, key = compiled or compile_time(p, act)
    return torch.ops.blast.sparse_mlp(x, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], act, bh, bd, key, max_density)


def ref(x, p, act):
    return dense_mlp(x, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], act)


@pytest.mark.parametrize("gated,bias,act", list(itertools.product([False, True], [False, True], ACTS)))
def test_values_and_all_gradients(gated, bias, act):
    dtype = torch.float64
    p = make_mlp(37, 75, gated=gated, bias=bias, dtype=dtype, sparsity=0.7, requires_grad=True, seed=hash((gated, bias, act)) % 1000)
    x = torch.randn(3, 5, 37, dtype=dtype, requires_grad=True)
    y, r = call(x, p, act), ref(x, p, act)
    torch.testing.assert_close(y, r, **tol(dtype))
    ins = [x] + [t for t in p.values() if t is not None]
    gy = torch.randn_like(r)
    got = torch.autograd.grad(y, ins, gy)
    exp = torch.autograd.grad(r, ins, gy)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, **tol(dtype))


@given(
    d=st.integers(1, 70), h=st.integers(1, 90), m=st.integers(0, 9),
    gated=st.booleans(), bias=st.booleans(), act=st.sampled_from(ACTS),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    sparsity=st.floats(0.0, 1.0), three_d=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_forward(d, h, m, gated, bias, act, dtype, sparsity, three_d, seed):
    p = make_mlp(d, h, gated=gated, bias=bias, dtype=dtype, sparsity=sparsity, seed=seed)
    x = torch.randn((2, m, d) if three_d else (m, d), generator=torch.Generator().manual_seed(seed)).to(dtype)
    torch.testing.assert_close(call(x, p, act), ref(x, p, act), **tol(dtype))


def test_weight_changed_in_place_is_never_stale():
    p = make_mlp(64, 128, gated=True, bias=False, dtype=torch.float32, sparsity=0.8)
    x = torch.randn(4, 64)
    ct = compile_time(p, "silu")
    y0 = call(x, p, "silu", compiled=ct)
    torch.testing.assert_close(y0, ref(x, p, "silu"))
    with torch.no_grad():  # same pattern, new values
        p["w1"].mul_(2.0)
    torch.testing.assert_close(call(x, p, "silu", compiled=ct), ref(x, p, "silu"))
    assert counters["blast"]["pattern_revalidated"] >= 1
    with torch.no_grad():  # revive every dead block: the pattern must follow
        p["w2"].add_(0.01)
    torch.testing.assert_close(call(x, p, "silu", compiled=ct), ref(x, p, "silu"))
    assert counters["blast"]["pattern_changed"] >= 1


@pytest.mark.parametrize("lead", [(4,), (2, 3)])
def test_output_can_be_modified_in_place_under_autograd(lead):
    """Falcon does ``mlp_output += attention_output``: autograd refuses that on a custom op's output
    that is a view of an intermediate, so the output must not be one (reshape made it one)."""
    p = make_mlp(64, 128, gated=True, bias=True, dtype=torch.float64, sparsity=0.8, requires_grad=True)
    x = torch.randn(*lead, 64, dtype=torch.float64, requires_grad=True)
    y, r = call(x, p, "silu"), ref(x, p, "silu")
    assert y._base is None
    y += 1.0
    r = r + 1.0
    ins = [x] + [t for t in p.values() if t is not None]
    for a, b in zip(torch.autograd.grad(y.square().sum(), ins), torch.autograd.grad(r.square().sum(), ins)):
        torch.testing.assert_close(a, b)


def test_writes_through_data_need_refresh():
    """``w.data`` shares the storage but not the version counter: a block revived through it is
    invisible to the O(1) check (the op would skip it) until ``blast_compile.refresh()``."""
    import blast_compile

    p = make_mlp(64, 128, gated=True, bias=False, dtype=torch.float32, sparsity=0.8)
    x = torch.randn(4, 64)
    ct = compile_time(p, "silu")
    call(x, p, "silu", compiled=ct)
    v = p["w2"]._version
    p["w2"].data.add_(0.01)  # every dead block of W2 revived, version counter untouched
    assert p["w2"]._version == v
    assert not torch.allclose(call(x, p, "silu", compiled=ct), ref(x, p, "silu"))  # the documented limit
    blast_compile.refresh()
    torch.testing.assert_close(call(x, p, "silu", compiled=ct), ref(x, p, "silu"))
    assert counters["blast"]["pattern_changed"] >= 1


def test_new_weight_at_a_freed_address_gets_its_own_plan():
    """Plans are keyed by address + version; a freed weight's address can be reused by a
    new tensor that also has version 0 — it must not inherit the old plan."""
    x = torch.randn(3, 64)
    ct = None
    for seed in range(6):
        p = make_mlp(64, 128, gated=False, bias=False, dtype=torch.float32, sparsity=0.8, seed=seed)
        ct = ct or compile_time(p, "relu")  # same key every time: the worst case
        torch.testing.assert_close(call(x, p, "relu", compiled=ct), ref(x, p, "relu"))
        del p


def test_nan_and_inf_propagate_like_eager():
    p = make_mlp(32, 64, gated=False, bias=True, dtype=torch.float32, sparsity=0.9)
    x = torch.randn(5, 32)
    x[1, 3] = float("nan")
    x[3, 0] = float("inf")
    torch.testing.assert_close(call(x, p, "relu"), ref(x, p, "relu"), equal_nan=True)


def test_declared_mask_gives_masked_weight_gradient():
    p = make_mlp(32, 64, gated=True, bias=False, dtype=torch.float64, sparsity=0.6, requires_grad=True)
    block_masks = {}
    for k in ("w1", "w3", "w2"):
        w = p[k]
        bm = random_block_mask(cdiv(w.shape[0], 16), cdiv(w.shape[1], 16), 0.5)
        with torch.no_grad():
            w.mul_(expand_mask(bm, 16, 16, w.shape))
        masks.declare_mask(w, bm, (16, 16))
        block_masks[k] = bm
    try:
        x = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
        y = call(x, p, "silu")
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, p["w1"], p["w3"], p["w2"]], gy)
        r = ref(x, p, "silu")
        exp = torch.autograd.grad(r, [x, p["w1"], p["w3"], p["w2"]], gy)
        torch.testing.assert_close(got[0], exp[0])
        for g_, e_, k in zip(got[1:], exp[1:], ("w1", "w3", "w2")):
            em = expand_mask(block_masks[k], 16, 16, p[k].shape).double()
            torch.testing.assert_close(g_, e_ * em)  # eager grad, masked
    finally:
        for k in ("w1", "w3", "w2"):
            masks.clear_mask(p[k])


def test_too_dense_after_change_runs_dense_and_is_correct():
    p = make_mlp(32, 64, gated=False, bias=False, dtype=torch.float32, sparsity=0.9)
    x = torch.randn(3, 32)
    ct = compile_time(p, "gelu")
    call(x, p, "gelu", max_density=0.5, compiled=ct)
    with torch.no_grad():
        p["w1"].normal_()
        p["w2"].normal_()
    torch.testing.assert_close(call(x, p, "gelu", max_density=0.5, compiled=ct), ref(x, p, "gelu"))
    assert counters["blast"]["pattern_changed"] == 1


@pytest.mark.parametrize("gated", [False, True])
def test_dense_fallback_plan_has_eager_gradients(gated):
    p = make_mlp(24, 40, gated=gated, bias=True, dtype=torch.float64, sparsity=0.1, requires_grad=True)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    y, r = call(x, p, "gelu_tanh", max_density=0.2), ref(x, p, "gelu_tanh")  # 90% dense > 0.2: runs dense
    torch.testing.assert_close(y, r)
    ins = [x] + [t for t in p.values() if t is not None]
    gy = torch.randn_like(r)
    for a, b in zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(r, ins, gy)):
        torch.testing.assert_close(a, b)


def test_opcheck():
    p = make_mlp(32, 48, gated=True, bias=True, dtype=torch.float32, sparsity=0.5, requires_grad=True)
    x = torch.randn(4, 32, requires_grad=True)
    ch = choose_block(p["w1"], p["w3"], p["w2"])
    key = pattern_from_weights(p["w1"], p["w3"], p["w2"], ch.bh, ch.bd, activation="silu", has_b1=True, has_b3=True).key
    args = (x, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], "silu", ch.bh, ch.bd, key, 1.0)
    torch.library.opcheck(torch.ops.blast.sparse_mlp.default, args)


def test_declared_mask_means_w_times_mask():
    """With every weight's mask declared, values outside the mask are not part of the layer."""
    p = make_mlp(32, 64, gated=False, bias=False, dtype=torch.float64, sparsity=0.0)
    bms = {}
    for k in ("w1", "w2"):
        w = p[k]
        bms[k] = random_block_mask(cdiv(w.shape[0], 16), cdiv(w.shape[1], 16), 0.6)
        masks.declare_mask(w, bms[k], (16, 16))
    try:
        x = torch.randn(4, 32, dtype=torch.float64)
        masked = {k: (v * expand_mask(bms[k], 16, 16, v.shape) if k in bms else v) for k, v in p.items()}
        torch.testing.assert_close(call(x, p, "relu"), ref(x, masked, "relu"))
        with torch.no_grad():
            p["w1"].add_(1.0)  # an update touching dead blocks too: still W * mask
        masked["w1"] = p["w1"] * expand_mask(bms["w1"], 16, 16, p["w1"].shape)
        torch.testing.assert_close(call(x, p, "relu"), ref(x, masked, "relu"))
        assert counters["blast"]["masked_weight_update"] >= 1
    finally:
        for k in ("w1", "w2"):
            masks.clear_mask(p[k])


def test_outside_graph_pool_nested_does_not_deadlock(monkeypatch):
    """A plan built off the graph pool (on the worker thread) that builds more tables lazily calls
    ``outside_graph_pool`` again from the worker: it must run there, not wait on the one worker
    (round 9: every first compiled CUDA call hung). CUDA calls are stubbed: runs on CPU."""
    import contextlib
    import threading

    from blast_compile.ops import plans

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"synchronize": lambda s: None})())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    dev = torch.device("cuda", 0)
    got, names = [], []

    def inner():
        names.append(threading.current_thread().name)
        return 7

    def outer():
        names.append(threading.current_thread().name)
        return plans.outside_graph_pool(inner, dev) + 1

    t = threading.Thread(target=lambda: got.append(plans.outside_graph_pool(outer, dev)), daemon=True)
    t.start()
    t.join(timeout=20)
    assert got == [8], "outside_graph_pool deadlocked when nested"
    assert names[0] == names[1] and names[0].startswith("blast-plan")  # both on the worker
