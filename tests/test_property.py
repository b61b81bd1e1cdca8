"""Property tests of the fused ops against eager PyTorch, generating what adversarial testing found bugs
with (issue 27): widths the block does not divide, all-zero and NaN/Inf-holding weights (in hidden units
the pattern skips, too), fused optimizers over several steps, ``.data`` rebinding, masks declared finer
than the fused block, compressed MLPs with and without bias, 0-row inputs.

The ops are called directly (a ``torch.compile`` per example would cost seconds); ``blast::sparse_mlp``
is called as the backend emits it, and ``blast::sparse_mlp_backward`` directly too, to check that its
outputs have the strides its fake promises (Inductor asserts them). GPU versions: test_adversarial_gpu.py.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from blast_compile import compress as C
from blast_compile import masks
from blast_compile.formats import BLOCK_CHOICES, cdiv, expand_mask, pattern_from_weights
from blast_compile.ops.activations import ACTIVATIONS, dense_mlp
from conftest import tol

# NaN/Inf weights: the op says once per MLP that it runs them densely (expected here)
pytestmark = pytest.mark.filterwarnings("ignore:blast. weights of MLP .* hold NaN/Inf:RuntimeWarning")
# examples per run: >= 2,000 in all (CI); HYPOTHESIS_PROFILE=thorough multiplies them by 5
_SCALE = 5 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 1
_FAST = dict(deadline=None, suppress_health_check=list(HealthCheck))
ACTS = sorted(ACTIVATIONS)
NAN, INF = float("nan"), float("inf")
FUSED_OPTS = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
}


@st.composite
def mlps(draw, device="cpu", dtypes=(torch.float64, torch.float32)):
    """An MLP as the op receives it: shapes, block, weights with dead blocks / rows / columns."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    d = draw(st.integers(1, 80))
    h = draw(st.integers(1, 96))
    d_out = draw(st.integers(1, 80))
    bh, bd = draw(st.sampled_from(BLOCK_CHOICES)), draw(st.sampled_from(BLOCK_CHOICES))
    gated, bias = draw(st.booleans()), draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    zero = draw(st.sampled_from(["blocks", "blocks", "all", "hidden_rows", "hidden_cols", "none"]))
    sparsity = draw(st.sampled_from([0.3, 0.6, 0.9]))

    def w(o, i, bo, bi):
        t = torch.randn(o, i, generator=g, dtype=torch.float64) / max(i, 1) ** 0.5
        m = torch.rand(cdiv(o, bo), cdiv(i, bi), generator=g) >= sparsity
        return t * expand_mask(m, bo, bi, t.shape)

    p = dict(w1=w(h, d, bh, bd), w3=w(h, d, bh, bd) if gated else None, w2=w(d_out, h, bd, bh))
    p.update(b1=torch.randn(h, generator=g, dtype=torch.float64) * 0.1 if bias else None,
             b3=torch.randn(h, generator=g, dtype=torch.float64) * 0.1 if bias and gated else None,
             b2=torch.randn(d_out, generator=g, dtype=torch.float64) * 0.1 if bias else None)
    units = torch.randperm(h, generator=g)[: max(1, h // 3)]
    if zero == "all":
        for k in ("w1", "w3", "w2"):
            if p[k] is not None:
                p[k].zero_()
    elif zero == "hidden_rows":  # hidden units dead on the in-side (their down columns live)
        for k in ("w1", "w3", "b1", "b3"):
            if p[k] is not None:
                p[k][units] = 0
    elif zero == "hidden_cols":  # hidden units whose output nothing reads
        p["w2"][:, units] = 0
    elif zero == "none":
        pass
    p = {k: (v.to(dtype=dtype, device=device) if v is not None else None) for k, v in p.items()}
    return dict(p=p, block=(bh, bd), d=d, h=h, d_out=d_out, units=units, zero=zero, dtype=dtype,
                seed=seed, sparsity=sparsity, gated=gated, bias=bias)


def _key(p, act, block):
    return pattern_from_weights(p["w1"], p["w3"], p["w2"], *block, activation=act, has_b1=p["b1"] is not None,
                                has_b3=p["b3"] is not None).key


def _op(x, p, act, block, key, max_density=1.0):
    return torch.ops.blast.sparse_mlp(x, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], act, *block, key,
                                      max_density)


def _ref(x, p, act):
    return dense_mlp(x, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], act)


def _close(a, b, dtype, msg=""):
    torch.testing.assert_close(a, b, equal_nan=True, **tol(dtype), msg=msg)


def _poison(draw, m, what):
    """NaN or Inf somewhere in a weight or bias -- in a hidden unit the pattern may skip when it can."""
    p, units = m["p"], m["units"]
    k = draw(st.sampled_from([k for k in ("w1", "w3", "w2", "b1", "b3") if p[k] is not None]))
    u = int(units[draw(st.integers(0, len(units) - 1))])
    t = p[k]
    if t.dim() == 1:
        t[u] = what
    elif k == "w2":
        t[draw(st.integers(0, t.shape[0] - 1)), u] = what
    else:
        t[u, draw(st.integers(0, t.shape[1] - 1))] = what
    return k


@settings(max_examples=1200 * _SCALE, **_FAST)
@given(m=mlps(), act=st.sampled_from(ACTS), rows=st.sampled_from([(0,), (1,), (3,), (7,), (2, 3), (0, 4)]),
       poison=st.sampled_from([None, None, NAN, INF, -INF]), x_bad=st.booleans(), data=st.data())
def test_property_op_values_and_gradients(m, act, rows, poison, x_bad, data):
    """Forward and every gradient equal eager's, for any shapes and block (padded ragged edges), all-zero
    weights, NaN/Inf in weights of skipped hidden units or in the input, and 0 rows; the backward op's
    outputs are contiguous (its fake's strides)."""
    p, dtype, block = m["p"], m["dtype"], m["block"]
    if poison is not None:
        event(f"poisoned {_poison(data.draw, m, poison)}")
    event(f"zero={m['zero']}")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(*rows, m["d"], generator=g, dtype=torch.float64).to(dtype)
    if x_bad and x.numel():
        x.view(-1)[data.draw(st.integers(0, x.numel() - 1))] = data.draw(st.sampled_from([NAN, INF]))
    key = _key(p, act, block)
    ins = [x] + [t for t in p.values() if t is not None]
    for t in ins:
        t.requires_grad_(True)
    y, r = _op(x, p, act, block, key), _ref(x, p, act)
    _close(y, r, dtype)
    gy = torch.randn(r.shape, generator=g, dtype=torch.float64).to(dtype)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(r, ins, gy))):
        _close(a, b, dtype, msg=f"gradient {i}")
    with torch.no_grad():
        gs = torch.ops.blast.sparse_mlp_backward(gy, x, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], act,
                                                 *block, key, 1.0, [True] * 7)
    assert all(t.is_contiguous() for t in gs)


@settings(max_examples=300 * _SCALE, **_FAST)
@given(m=mlps(dtypes=(torch.float32,)), act=st.sampled_from(ACTS), opt=st.sampled_from(sorted(FUSED_OPTS)),
       steps=st.integers(1, 4), revive=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_fused_optimizer_steps(m, act, opt, steps, revive, seed):
    """Fused optimizer steps (no ``_version`` moves) between calls: the op follows the new values and a
    pattern they change (``revive``: dense gradients bring dead blocks back)."""
    p, block = m["p"], m["block"]
    params = {k: torch.nn.Parameter(v) for k, v in p.items() if v is not None}
    p = {k: params.get(k) for k in p}
    o = FUSED_OPTS[opt](list(params.values()))
    key = _key(p, act, block)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, m["d"], generator=g)
    for step in range(steps + 1):
        with torch.no_grad():
            _close(_op(x, p, act, block, key), _ref(x, p, act), torch.float32, msg=f"after {step} steps")
        for t in params.values():
            t.grad = torch.randn(t.shape, generator=g) * (1 if revive else (t != 0))
        o.step()


@settings(max_examples=300 * _SCALE, **_FAST)
@given(m=mlps(dtypes=(torch.float32,)), act=st.sampled_from(ACTS), iters=st.integers(2, 6),
       seed=st.integers(0, 2**31 - 1))
def test_property_data_rebinding(m, act, iters, seed):
    """``vector_to_parameters(base + noise, ...)`` rebinds every ``p.data`` to a fresh tensor per iteration
    (a freed one's address comes back): never an old plan."""
    p, block = m["p"], m["block"]
    params = [torch.nn.Parameter(v) for v in p.values() if v is not None]
    p = dict(zip([k for k, v in p.items() if v is not None], params), **{k: None for k, v in p.items() if v is None})
    base = torch.nn.utils.parameters_to_vector(params).detach()
    key = _key(p, act, block)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, m["d"], generator=g)
    with torch.no_grad():
        for it in range(iters):
            noise = torch.randn(base.shape, generator=g) * 0.1 * ((base != 0) if it % 2 else 1)
            torch.nn.utils.vector_to_parameters(base + noise, params)
            _close(_op(x, p, act, block, key), _ref(x, p, act), torch.float32, msg=f"iteration {it}")


@settings(max_examples=150 * _SCALE, **_FAST)
@given(m=mlps(dtypes=(torch.float64,)), act=st.sampled_from(ACTS), mb=st.sampled_from([16, 32, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_property_declared_masks_at_any_granularity(m, act, mb, seed):
    """Masks declared at ``mb x mb`` whatever block the op runs at: the forward is eager's on ``W * mask``
    and dW is eager's masked (zero on declared-dead entries, also inside live fused blocks)."""
    p, block = m["p"], m["block"]
    g = torch.Generator().manual_seed(seed)
    decl = {}
    for k, (bo, bi) in (("w1", (mb, mb)), ("w3", (mb, mb)), ("w2", (mb, mb))):
        if p[k] is not None:
            bm = torch.rand(cdiv(p[k].shape[0], bo), cdiv(p[k].shape[1], bi), generator=g) < 0.6
            with torch.no_grad():
                p[k].mul_(expand_mask(bm, bo, bi, p[k].shape))
            masks.declare_mask(p[k], bm, (bo, bi))
            decl[k] = expand_mask(bm, bo, bi, p[k].shape)
    try:
        x = torch.randn(3, m["d"], generator=g, dtype=torch.float64, requires_grad=True)
        ws = [p[k] for k in ("w1", "w3", "w2") if p[k] is not None]
        for t in ws:
            t.requires_grad_(True)
        y, r = _op(x, p, act, block, _key(p, act, block)), _ref(x, p, act)
        _close(y, r, torch.float64)
        gy = torch.randn(r.shape, generator=g, dtype=torch.float64)
        got, exp = torch.autograd.grad(y, [x, *ws], gy), torch.autograd.grad(r, [x, *ws], gy)
        _close(got[0], exp[0], torch.float64)
        for a, b, k in zip(got[1:], exp[1:], [k for k in ("w1", "w3", "w2") if p[k] is not None]):
            _close(a, b * decl[k], torch.float64, msg=k)
    finally:
        for k in decl:
            masks.clear_mask(p[k])


def _compressed(m, act):
    """BlockSparseLinear layers (the compressed MLP) of ``m``'s weights at its block."""
    p, (bh, bd) = m["p"], m["block"]
    lin = {}
    for k, b, blk in (("w1", "b1", (bh, bd)), ("w3", "b3", (bh, bd)), ("w2", "b2", (bd, bh))):
        if p[k] is not None:
            lin[k] = C.BlockSparseLinear.from_dense(p[k], p[b], blk)
    return lin


def _packed_args(lin, d_hidden, d_out, act, block):
    def layer(k):
        if k not in lin:
            return (None, None, None, None)
        m = lin[k]
        return (m.blocks, m.row_ptr, m.col_idx, m.bias)

    from blast_compile.ops.packed_mlp import pattern_key

    key = pattern_key(*block, lin["w1"].in_features, d_hidden, d_out,
                      [t for k in ("w1", "w3", "w2") for t in (layer(k)[1:3] if k in lin else (None, None))])
    return (*layer("w1"), *layer("w3"), *layer("w2"), act, *block, d_hidden, d_out, key)


def _chain(x, lin, act):
    """The compressed MLP run eagerly: ``block_linear -> act [* block_linear] -> block_linear``."""
    h = ACTIVATIONS[act](lin["w1"](x))
    if "w3" in lin:
        h = h * lin["w3"](x)
    return lin["w2"](h)


@settings(max_examples=300 * _SCALE, **_FAST)
@given(m=mlps(), act=st.sampled_from(ACTS), rows=st.sampled_from([(0,), (1,), (4,), (2, 3)]),
       poison=st.sampled_from([None, None, None, NAN, INF]), data=st.data())
def test_property_compressed_mlp(m, act, rows, poison, data):
    """``blast::packed_mlp`` (a compressed MLP, fused) equals the compressed layers run eagerly, with and
    without bias, ragged d_out, 0 rows, NaN/Inf in blocks of hidden units the pattern drops; contiguous."""
    if poison is not None:
        _poison(data.draw, m, poison)
    lin = _compressed(m, act)
    x = torch.randn(*rows, m["d"], dtype=m["dtype"])
    with torch.no_grad():
        y = torch.ops.blast.packed_mlp(x, *_packed_args(lin, m["h"], m["d_out"], act, m["block"]))
        r = _chain(x, lin, act)
    _close(y, r, m["dtype"])
    assert y.is_contiguous()
    if poison is None:  # and the dense model it was compressed from
        _close(y, _ref(x, m["p"], act), m["dtype"])


@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)])
def test_zero_rows_everywhere(lead):
    """0-row inputs through every op and module, forward and backward."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(40, 24), torch.randn(24, 40)
    w1[:, 16:] = 0
    w2[16:] = 0
    x = torch.randn(*lead, 24, requires_grad=True)
    p = dict(w1=w1.requires_grad_(), b1=None, w3=None, b3=None, w2=w2.requires_grad_(), b2=None)
    y = _op(x, p, "gelu", (16, 16), _key(p, "gelu", (16, 16)))
    assert y.shape == (*lead, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape and not w1.grad.any()
    lin = C.BlockSparseLinear.from_dense(w1.detach(), None, (16, 16))
    assert lin(x).shape == (*lead, 40)


def test_inf_row_through_gelu_as_eager():
    """Hypothesis found it: PyTorch's CPU GELU gives inf for a one-element tensor holding inf and NaN inside a longer
    one, so a bad row recomputed alone (one hidden unit, one row) came out -inf where eager's whole-batch MLP gives NaN."""
    p = dict(w1=torch.tensor([[1.541]]), w3=None, w2=torch.tensor([[-0.2934]]), b1=None, b3=None, b2=None)
    x = torch.tensor([[INF], [0.3], [-1.2]])
    _close(_op(x, p, "gelu", (16, 16), _key(p, "gelu", (16, 16))), _ref(x, p, "gelu"), torch.float32)
