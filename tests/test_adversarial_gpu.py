"""Issue 27's cases on the CUDA path (Triton kernels): the regression tests of test_adversarial.py and the
property tests of test_property.py, small. GPU-only (``@pytest.mark.gpu``)."""
import functools

import pytest
import torch
import torch.nn as nn
from hypothesis import Phase, given, settings, strategies as st
from torch._dynamo.utils import counters

from blast_compile import compress as C
from blast_compile import masks
from blast_compile.formats import cdiv, expand_mask
from blast_compile.ops.activations import dense_mlp
from blast_compile.testing import random_block_mask
from conftest import tol
from test_adversarial import FUSED_OPTS, FUSED_IDS, check_compiled_compressed_ragged_d_out, half_dead_mlp, op
from test_property import (ACTS, FUSED_OPTS as PROP_OPTS, NAN, _FAST, _chain, _close, _compressed, _key, _op,
                           _packed_args, _poison, _ref, mlps)

pytestmark = [pytest.mark.gpu,
              pytest.mark.filterwarnings("ignore:blast. weights of MLP .* hold NaN/Inf:RuntimeWarning")]
CUDA = "cuda"
F16 = torch.float16


@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    """Each example is a new sparsity pattern, so new kernels: compile them, but tune none."""
    monkeypatch.setenv("BLAST_TUNE", "0")


# A CUDA fault (an illegal address) kills the process's CUDA context: every later example then fails while it is
# drawn, shrinking cannot run and hypothesis reports a flaky strategy instead of the example. So the GPU property
# tests do not shrink, and each example says what it is first (pytest shows it with the failure).
_GPU_PROP = dict(_FAST, phases=(Phase.explicit, Phase.reuse, Phase.generate), report_multiple_bugs=False)


def _say(m, **kw):
    desc = {k: m[k] for k in ("d", "h", "d_out", "block", "gated", "bias", "zero", "sparsity", "seed", "dtype")}
    print("example:", desc, kw, flush=True)


def _cuda(m, dtype=torch.float32):
    return m.to(CUDA, dtype)


@pytest.mark.parametrize("make_opt", FUSED_OPTS, ids=FUSED_IDS)
def test_gpu_fused_optimizer_steps_are_seen_by_the_op(make_opt):
    m = _cuda(half_dead_mlp())
    ps = [m[0].weight, m[0].bias, m[2].weight, m[2].bias]
    opt = make_opt(ps)
    m(torch.randn(8, 64, device=CUDA)).sum().backward()
    try:  # (a torch whose fused kernel for this optimizer runs on the CPU only says so at the first step)
        opt.step()
    except RuntimeError as e:
        if "supported devices" in str(e):
            pytest.skip(f"this torch has no fused CUDA kernel for it: {e}")
        raise
    opt.zero_grad()
    x = torch.randn(8, 64, device=CUDA)
    compiled = None
    for step in range(4):
        with torch.no_grad():
            y, compiled = op(x, ps[0], ps[1], None, None, ps[2], ps[3], "relu", compiled)
            torch.testing.assert_close(y, m(x), rtol=2e-3, atol=2e-3, msg=f"step {step}")
        m(torch.randn(8, 64, device=CUDA)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_gpu_fused_adam_training_compiled_matches_eager():
    torch._dynamo.reset()
    m, ref = _cuda(half_dead_mlp(seed=1)), _cuda(half_dead_mlp(seed=1))
    cm = torch.compile(m, backend="blast")
    opt, opt_ref = (torch.optim.AdamW(k.parameters(), lr=1e-2, fused=True) for k in (m, ref))
    x = torch.randn(16, 64, device=CUDA)
    for step in range(4):
        loss, loss_ref = cm(x).square().mean(), ref(x).square().mean()
        torch.testing.assert_close(loss, loss_ref, rtol=2e-3, atol=2e-3, msg=f"step {step}")
        loss.backward()
        loss_ref.backward()
        opt.step(), opt_ref.step(), opt.zero_grad(), opt_ref.zero_grad()
    assert counters["blast"]["mlp_fused"] >= 1


def test_gpu_data_rebinding_compiled():
    torch._dynamo.reset()
    m = _cuda(half_dead_mlp(seed=3), F16)
    cm = torch.compile(m, backend="blast")
    ps = list(m.parameters())
    base = torch.nn.utils.parameters_to_vector(ps).detach()
    x = torch.randn(8, 64, device=CUDA, dtype=F16)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), **tol(F16))
        for it in range(12):
            noise = torch.randn_like(base) * 0.3 * ((base != 0) if it % 3 else 1)
            torch.nn.utils.vector_to_parameters(base + noise, ps)
            torch.testing.assert_close(cm(x), m(x), **tol(F16), msg=f"iteration {it}")
    assert counters["blast"]["mlp_fused"] == 1


@pytest.mark.parametrize("where", ["w1", "b1", "w2"])
def test_gpu_non_finite_weights_of_skipped_hidden_units(where):
    torch.manual_seed(0)
    p = dict(w1=torch.randn(128, 64), b1=torch.randn(128), w3=None, b3=None, w2=torch.randn(64, 128), b2=None)
    p["w2"][:, 32:48] = 0
    p["w1"][96:] = 0
    p["b1"][96:] = 0
    p = {k: v.to(CUDA, F16) if v is not None else None for k, v in p.items()}
    x = torch.randn(6, 64, device=CUDA, dtype=F16)
    args = lambda: (x, p["w1"], p["b1"], None, None, p["w2"], p["b2"], "silu")  # noqa: E731
    _, compiled = op(*args())
    {"w1": lambda: p["w1"].__setitem__((40, 3), NAN), "b1": lambda: p["b1"].__setitem__(40, float("inf")),
     "w2": lambda: p["w2"].__setitem__((5, 100), NAN)}[where]()
    y, _ = op(*args(), compiled)
    torch.testing.assert_close(y, dense_mlp(*args()), equal_nan=True, **tol(F16))


@pytest.mark.parametrize("act", ["relu", "relu2", "silu"])
def test_gpu_gradient_at_nan_pre_activation_matches_eager(act):
    """A NaN input row: eager's ReLU passes the gradient through at NaN (threshold_backward)."""
    torch.manual_seed(0)
    d, h = 64, 128
    w = lambda o, i: (torch.randn(o, i) * expand_mask(random_block_mask(cdiv(o, 32), cdiv(i, 32), 0.6), 32, 32,  # noqa
                                                       (o, i))).to(CUDA, F16).requires_grad_()
    w1, w2 = w(h, d), w(d, h)
    x = torch.randn(4, d, device=CUDA, dtype=F16)
    x[1, 5] = NAN
    x.requires_grad_()
    y, _ = op(x, w1, None, None, None, w2, None, act)
    r = dense_mlp(x, w1, None, None, None, w2, None, act)
    torch.testing.assert_close(y, r, equal_nan=True, **tol(F16))
    gy = torch.randn_like(r)
    for a, b in zip(torch.autograd.grad(y, [x, w1, w2], gy), torch.autograd.grad(r, [x, w1, w2], gy)):
        torch.testing.assert_close(a, b, equal_nan=True, **tol(F16))


def test_gpu_declared_mask_finer_than_the_fused_block():
    torch.manual_seed(0)
    w1, w2 = torch.randn(128, 64), torch.randn(64, 128)
    m1, m2 = random_block_mask(4, 2, 0.5), random_block_mask(2, 4, 0.5)
    w1 = (w1 * expand_mask(m1, 32, 32, w1.shape)).to(CUDA, F16).requires_grad_()
    w2 = (w2 * expand_mask(m2, 32, 32, w2.shape)).to(CUDA, F16).requires_grad_()
    masks.declare_mask(w1, m1.to(CUDA), (32, 32))
    masks.declare_mask(w2, m2.to(CUDA), (32, 32))
    try:
        x = torch.randn(5, 64, device=CUDA, dtype=F16, requires_grad=True)
        p = dict(w1=w1, b1=None, w3=None, b3=None, w2=w2, b2=None)
        y = _op(x, p, "gelu", (64, 64), _key(p, "gelu", (64, 64)))
        r = _ref(x, p, "gelu")
        gy = torch.randn_like(r)
        got, exp = torch.autograd.grad(y, [x, w1, w2], gy), torch.autograd.grad(r, [x, w1, w2], gy)
        torch.testing.assert_close(got[0], exp[0], **tol(F16))
        torch.testing.assert_close(got[1], exp[1] * expand_mask(m1, 32, 32, w1.shape).to(CUDA), **tol(F16))
        torch.testing.assert_close(got[2], exp[2] * expand_mask(m2, 32, 32, w2.shape).to(CUDA), **tol(F16))
    finally:
        masks.clear_mask(w1), masks.clear_mask(w2)


@pytest.mark.parametrize("d_in,m", [(16, 5), (40, 8)])
def test_gpu_backward_when_the_block_is_wider_than_d_in(d_in, m):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d_in, 16, bias=False), nn.ReLU(), nn.Linear(16, d_in, bias=False))
    with torch.no_grad():
        net[0].weight.zero_()
        net[2].weight[:, 8:] = 0
    net = net.to(CUDA, F16)
    x = torch.randn(m, d_in, device=CUDA, dtype=F16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.compile(net, backend="blast")(x).sum().backward()
    g = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(F16))
    for a, p in zip(g, net.parameters()):
        torch.testing.assert_close(a, p.grad, **tol(F16))


@pytest.mark.parametrize("bias", [False, True])
def test_gpu_compiled_compressed_mlp_with_ragged_d_out(bias):
    check_compiled_compressed_ragged_d_out(bias, CUDA, F16)


@pytest.mark.parametrize("lead", [(0,), (0, 3)])
def test_gpu_zero_rows(lead):
    torch.manual_seed(0)
    w = (torch.randn(40, 24) * expand_mask(random_block_mask(3, 2, 0.5), 16, 16, (40, 24))).to(CUDA, F16)
    lin = C.BlockSparseLinear.from_dense(w, None, (16, 16), requires_grad=True)
    x = torch.randn(*lead, 24, device=CUDA, dtype=F16, requires_grad=True)
    y = lin(x)
    assert y.shape == (*lead, 40)
    y.sum().backward()
    p = dict(w1=w, b1=None, w3=None, b3=None, w2=w.t().contiguous(), b2=None)
    with torch.no_grad():
        assert _op(x, p, "relu", (16, 16), _key(p, "relu", (16, 16))).shape == (*lead, 24)


# --- the property tests, on the GPU (few examples: every pattern compiles its own kernels) -----------------

@settings(max_examples=12, **_GPU_PROP)
@given(m=mlps(device=CUDA, dtypes=(F16,)), act=st.sampled_from(ACTS), rows=st.sampled_from([(0,), (1,), (5,), (2, 3)]),
       poison=st.sampled_from([None, None, NAN]), data=st.data())
def test_gpu_property_op_values_and_gradients(m, act, rows, poison, data):
    _say(m, act=act, rows=rows, poison=poison)
    p, block = m["p"], m["block"]
    if poison is not None:
        _poison(data.draw, m, poison)
    x = torch.randn(*rows, m["d"], device=CUDA, dtype=F16)
    key = _key(p, act, block)
    ins = [x] + [t for t in p.values() if t is not None]
    for t in ins:
        t.requires_grad_(True)
    y, r = _op(x, p, act, block, key), _ref(x, p, act)
    _close(y, r, F16)
    gy = torch.randn_like(r)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(r, ins, gy))):
        _close(a, b, F16, msg=f"gradient {i}")


@functools.cache
def _fused_on_cuda(opt):
    """Whether this torch has a fused CUDA kernel for ``opt`` (Adagrad's is CPU-only: it raises at the first step)."""
    p = torch.nn.Parameter(torch.zeros(1, device=CUDA))
    p.grad = torch.ones_like(p)
    try:
        PROP_OPTS[opt]([p]).step()
    except RuntimeError as e:
        if "supported devices" in str(e):
            return False
        raise
    return True


@settings(max_examples=8, **_GPU_PROP)
@given(m=mlps(device=CUDA, dtypes=(torch.float32,)), act=st.sampled_from(ACTS),
       opt=st.sampled_from(sorted(PROP_OPTS)).filter(_fused_on_cuda),
       steps=st.integers(1, 3), revive=st.booleans())
def test_gpu_property_fused_optimizer_steps(m, act, opt, steps, revive):
    _say(m, act=act, opt=opt, steps=steps, revive=revive)
    p, block = m["p"], m["block"]
    params = {k: torch.nn.Parameter(v) for k, v in p.items() if v is not None}
    p = {k: params.get(k) for k in p}
    o = PROP_OPTS[opt](list(params.values()))
    key = _key(p, act, block)
    x = torch.randn(5, m["d"], device=CUDA)
    for step in range(steps + 1):
        with torch.no_grad():
            torch.testing.assert_close(_op(x, p, act, block, key), _ref(x, p, act), rtol=2e-3, atol=2e-3,
                                       msg=f"after {step} steps")
        for t in params.values():
            t.grad = torch.randn_like(t) * (1 if revive else (t != 0))
        o.step()


@settings(max_examples=8, **_GPU_PROP)
@given(m=mlps(device=CUDA, dtypes=(F16,)), act=st.sampled_from(ACTS), rows=st.sampled_from([(0,), (1,), (4,)]),
       poison=st.sampled_from([None, None, NAN]), data=st.data())
def test_gpu_property_compressed_mlp(m, act, rows, poison, data):
    _say(m, act=act, rows=rows, poison=poison)
    if poison is not None:
        _poison(data.draw, m, poison)
    lin = _compressed(m, act)
    x = torch.randn(*rows, m["d"], device=CUDA, dtype=F16)
    with torch.no_grad():
        y = torch.ops.blast.packed_mlp(x, *_packed_args(lin, m["h"], m["d_out"], act, m["block"]))
        r = _chain(x, lin, act)
    _close(y, r, F16)
    assert y.is_contiguous()


_OOR_CASE = r'''
import sys, torch
sys.path.insert(0, "tests")
from test_property import _close, _key, _op, _ref
from blast_compile.formats import cdiv, expand_mask
g = torch.Generator().manual_seed(765284)
def w(o, i, bo, bi):
    t = torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5
    return t * expand_mask(torch.rand(cdiv(o, bo), cdiv(i, bi), generator=g) >= 0.3, bo, bi, t.shape)
p = dict(w1=w(71, 34, 32, 128), w3=w(71, 34, 32, 128), w2=w(21, 71, 128, 32), b1=None, b3=None, b2=None)
p = {k: v.to("cuda", torch.float16) if v is not None else None for k, v in p.items()}
x = torch.randn(5, 34, device="cuda", dtype=torch.float16)  # (as the run that faulted drew x and dy)
ins = [x] + [t for t in p.values() if t is not None]
for t in ins:
    t.requires_grad_()
y = _op(x, p, "relu2", (32, 128), _key(p, "relu2", (32, 128)))
gy = torch.randn_like(y)
got = torch.autograd.grad(y, ins, gy)
ref = torch.autograd.grad(_ref(x, p, "relu2"), ins, gy)
_close(y, _ref(x, p, "relu2"), torch.float16)
for a, b in zip(got, ref):
    _close(a, b, torch.float16)
torch.cuda.synchronize()
print("OK")
'''


def test_gpu_hidden_bwd_case_of_issue_27():
    """The case that faulted ("Out-of-range shared or local address" in ``mlp_hidden_bwd``'s dh loop) on two of
    three H100 hosts, in a fresh process with fresh kernel caches: fp16 gated relu2, d=34 h=71 d_out=21, block
    (32, 128), M=5, untuned. In a child process: a fault kills the CUDA context of the process it happens in."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, BLAST_TUNE="0", CUDA_LAUNCH_BLOCKING="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _OOR_CASE], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout + r.stderr)[-3000:]


@pytest.mark.parametrize("rows", [1, 40])
def test_gpu_compressed_padding_past_hidden_is_not_read(rows):
    """The lowered blast::mlp_packed (decode and prefill kernels) with non-zero padding past d_hidden written
    after compile: the guard sees the new blocks and the chain's answer is given, as eager."""
    from test_adversarial import _ragged_compressed

    m = _ragged_compressed().to(CUDA, F16)
    x = torch.randn(rows, 96, device=CUDA, dtype=F16)
    cm = torch.compile(m, backend="blast")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), **tol(F16))
        assert counters["blast"]["lowered_packed"] >= 1, dict(counters["blast"])
        for p in m.parameters():
            p.normal_(0, 0.05)
        torch.testing.assert_close(cm(x), m(x), **tol(F16))
