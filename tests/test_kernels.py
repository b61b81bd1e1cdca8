"""Generated Triton kernels (blast_compile.codegen + ops.triton_mlp) against eager and the gather kernel.

* ``interp_*`` tests run the kernels on CPU tensors under ``TRITON_INTERPRET=1``.
  Triton reads that variable when a kernel is decorated, so they run in a child
  pytest process started by ``test_interpreter_suite`` (with a fresh kernel dir);
  in the parent process they are skipped.
* ``gpu`` tests run on CUDA (bf16/fp16, every variant) and skip without a GPU.
* codegen tests check the on-disk cache: the same signature renders the same file
  in a fresh process, and tuned configs persist.
"""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from blast_compile import codegen, masks
from blast_compile.formats import cdiv, expand_mask, pattern_from_weights
from blast_compile.ops import backward as backward_ops, configs, decode as decode_ops, gather, tables, triton_mlp, tune
from blast_compile.ops.activations import dense_mlp
from blast_compile.ops.sparse_mlp import _packed, weights_plan
from blast_compile.testing import SwiGLU, random_block_mask
from conftest import force_split_y, force_splitk, skip_if_old_interpreter, tol

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
interp = pytest.mark.skipif(not INTERP, reason="runs in a child process under TRITON_INTERPRET=1 (test_interpreter_suite)")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _memcheck():
    """Under the interpreter every test's kernels run under ``memcheck``: an access outside the kernel's
    tensor arguments fails the test that made it."""
    if not INTERP:
        yield
        return
    from memcheck import memcheck

    with memcheck():
        yield


def make(d, h, *, gated, bias, dtype, block, sparsity=0.6, seed=0, device="cpu", dead_rows=False, transposed_w1=False,
         tied=False, fused_gate_up=False):
    """Random block-sparse MLP weights; ``tied``: gate and up share one block mask (the sparsifier's way);
    ``fused_gate_up``: W1 and W3 are the two row halves of one tensor (Phi-3's gate_up_proj), views."""
    g = torch.Generator().manual_seed(seed)
    bh, bd = block
    masks_made = []

    def w(o, i, bo, bi, like=None):
        t = torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5
        m = masks_made[like] if like is not None else random_block_mask(cdiv(o, bo), cdiv(i, bi), sparsity, g)
        if dead_rows:  # a whole dead block-row and block-column
            m[0] = False
            m[:, -1] = False
        masks_made.append(m)
        return (t * expand_mask(m, bo, bi, t.shape)).to(device, dtype)

    def b(n):
        return (torch.randn(n, generator=g, dtype=torch.float64) * 0.1).to(device, dtype) if bias else None

    w1 = w(h, d, bh, bd)
    if transposed_w1:  # GPT-2's Conv1D: the weight is a transposed view
        w1 = w1.t().contiguous().t()
    w3 = w(h, d, bh, bd, like=0 if tied else None) if gated else None
    if fused_gate_up:
        gu = torch.cat([w1, w3])
        w1, w3 = gu.narrow(0, 0, h), gu.narrow(0, h, h)
    return dict(w1=w1, b1=b(h), w3=w3, b3=b(h) if gated else None, w2=w(d, h, bd, bh), b2=b(d))


def plan_for(x, p, act, block):
    pat = pattern_from_weights(p["w1"], p["w3"], p["w2"], *block, activation=act,
                               has_b1=p["b1"] is not None, has_b3=p["b3"] is not None)
    return weights_plan(x, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], act, *block, pat.key, 1.0)


def args(p):
    return p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"]


def check_forward(m, d, h, gated, bias, act, dtype, block, device, **kw):

    p = make(d, h, gated=gated, bias=bias, dtype=dtype, block=block, device=device, **kw)
    x = torch.randn(m, d, dtype=dtype, device=device)
    plan = plan_for(x, p, act, block)
    y = triton_mlp.forward(x, *args(p), plan, act)
    assert y.shape == (m, d) and y.dtype == dtype
    torch.testing.assert_close(y, dense_mlp(x, *args(p), act), **tol(dtype))
    return x, p, plan, y


def check_backward(m, d, h, gated, bias, act, dtype, block, device, declare=False, **kw):
    """Every gradient vs the gather kernel (the reference semantics of blast::sparse_mlp_backward).
    With ``tied`` masks gate and up declare one mask object (dW of both in one launch)."""
    p = make(d, h, gated=gated, bias=bias, dtype=dtype, block=block, device=device, **kw)
    if declare:
        for name, (bo, bi) in (("w1", block), ("w3", block), ("w2", block[::-1])):
            if p[name] is not None:
                mk = p["w1"]._blast_mask[0] if (name == "w3" and kw.get("tied")) else _block_mask(p[name], bo, bi)
                masks.declare_mask(p[name], mk, (bo, bi))
    x = torch.randn(m, d, dtype=dtype, device=device)
    dy = torch.randn(m, d, dtype=dtype, device=device)
    plan = plan_for(x, p, act, block)
    needs = [True] * 7
    got = triton_mlp.backward(dy, x, *args(p), plan, act, needs)
    # reference: the gather kernel on CPU copies (same dtype)
    pc = {k: (v.cpu() if v is not None else None) for k, v in p.items()}
    if declare:
        for name, (bo, bi) in (("w1", block), ("w3", block), ("w2", block[::-1])):
            if pc[name] is not None:
                masks.declare_mask(pc[name], _block_mask(pc[name], bo, bi), (bo, bi))
    xc, dyc = x.cpu(), dy.cpu()
    plan_c = plan_for(xc, pc, act, block)
    want = gather.backward(dyc, xc, plan_c.pattern, _packed(plan_c, pc["w1"], pc["w3"], pc["w2"]), *args(pc), act,
                           needs, plan_c.dw_masks)
    for k, v in want.items():
        if v is None:
            assert got.get(k) is None, k
            continue
        t = tol(dtype)
        torch.testing.assert_close(got[k].float().cpu(), v.float(), rtol=t["rtol"], atol=t["atol"] * 4, msg=lambda s: f"{k}: {s}")
    if declare:  # dW is zero off the declared live blocks
        dm = expand_mask(plan.dw_masks[0], *block, p["w1"].shape)
        assert (got["w1"][~dm.to(got["w1"].device)] == 0).all()
    for q in (p, pc):
        for name in ("w1", "w3", "w2"):
            if q[name] is not None:
                masks.clear_mask(q[name])


def _block_mask(w, bo, bi):
    from blast_compile.formats import block_mask

    return block_mask(w, bo, bi)


# --- CPU, interpreter (child process) ---------------------------------------------------------

INTERP_FWD = [
    # m, d, h, gated, bias, act, dtype, block
    (3, 37, 75, True, True, "silu", torch.float32, (16, 16)),  # decode, ragged dims, biases
    (1, 40, 64, False, False, "gelu", torch.float16, (16, 16)),  # decode, fp16
    (37, 37, 75, True, False, "relu2", torch.float16, (16, 32)),  # prefill, odd M, non-square block
    (33, 48, 96, False, True, "gelu_tanh", torch.float32, (32, 16)),  # prefill, plain
    (5, 32, 64, True, True, "relu", torch.float32, (16, 16)),
    (2, 70, 96, True, True, "silu", torch.float32, (32, 64)),  # decode: block rows split over programs
]


@interp
@pytest.mark.parametrize("m,d,h,gated,bias,act,dtype,block", INTERP_FWD)
def test_interp_forward(m, d, h, gated, bias, act, dtype, block):
    check_forward(m, d, h, gated, bias, act, dtype, block, "cpu")


@interp
@pytest.mark.parametrize("m", [2, 40])
def test_interp_empty_rows_cols_and_transposed(m):
    """A dead hidden block-row, a dead output block-row, and a transposed W1 view."""
    _, p, plan, y = check_forward(m, 40, 80, True, False, "silu", torch.float32, (16, 16), "cpu",
                                  dead_rows=True, transposed_w1=True, sparsity=0.5)
    assert plan.pattern.hidden_live.numel() < plan.pattern.n_h


@interp
@pytest.mark.parametrize("m,gated", [(3, True), (35, False)])
def test_interp_packed(m, gated):

    x, p, plan, y = check_forward(m, 37, 75, gated, True, "silu", torch.float32, (16, 16), "cpu")
    pk = gather.PackedMLP(plan.dev_pattern, p["w1"], p["w3"], p["w2"])
    y2 = triton_mlp.forward_packed(x, pk.p1, p["b1"], pk.p3, p["b3"], pk.p2, p["b2"], plan, "silu")
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)


@interp
@pytest.mark.parametrize("m,gated,bias,act,dtype,declare", [
    (3, True, True, "silu", torch.float32, False),
    (37, False, True, "gelu", torch.float32, True),
    (34, True, False, "relu2", torch.float16, True),
    (5, False, False, "gelu_tanh", torch.float16, False),
])
def test_interp_backward(m, gated, bias, act, dtype, declare):
    check_backward(m, 37, 75, gated, bias, act, dtype, (16, 16), "cpu", declare=declare)


@interp
@pytest.mark.parametrize("force", [None, "wide", "tma"])
@pytest.mark.parametrize("m,gated,act,dtype,block", [
    (5, True, "relu2", torch.float16, (32, 128)),  # issue 27's case: the shape ptxas 12.8 miscompiled
    (37, False, "gelu", torch.float32, (16, 32)),
])
def test_interp_backward_without_transposed_b_dots(m, gated, act, dtype, block, force, monkeypatch):
    """With a ptxas that miscompiles transposed-B wgmma dots (``codegen/toolchain.py``), backward's dh and dX dots
    run transposed (``DH_T``, ``bsmm`` TR): the same gradients as eager, in every loop variant."""
    monkeypatch.setattr(codegen.toolchain, "tnsp_fix_needed", lambda: True)
    if force == "wide":
        force_wide(monkeypatch)
    elif force == "tma":
        force_tma(monkeypatch)
    check_backward(m, 34 if block == (32, 128) else 70, 71 if block == (32, 128) else 75, gated, True, act, dtype,
                   block, "cpu", declare=True, sparsity=0.5)
    fixed = [mod for (sig, _), mod in codegen._BY_SIG.items() if sig.tnsp_fix and sig.bh == block[0]]
    assert fixed and "DH_T = tl.constexpr(1)" in open(fixed[0].__file__).read()


def force_wide(monkeypatch, bm=32, dh_wide=True, group=0):
    """Run the prefill/backward kernels with the wide variants (tuning is off in tests: the first
    config is the one launched); ``dh_wide``: backward's dh steps too (wide level 2); ``group``: M
    tiles per group of programs (0: launch order)."""
    g = (group,) if group else ()
    monkeypatch.setattr(configs, "PREFILL_CONFIGS", [(bm, 4, 3, 1, *g)])
    monkeypatch.setattr(configs, "BACKWARD_CONFIGS", [(bm, 4, 3, 2 if dh_wide else 1, *g)])


@interp
@pytest.mark.parametrize("m,gated,bias,act,dtype,block,declare", [
    (37, True, True, "silu", torch.float32, (16, 16), True),  # odd M, ragged dims, biases
    (40, False, False, "gelu", torch.float16, (16, 32), False),  # plain: only the 2-block steps are wide
    (33, True, False, "relu2", torch.float16, (32, 16), True),
])
@pytest.mark.parametrize("dh_wide", [False, True])
def test_interp_wide_tiles(m, gated, bias, act, dtype, block, declare, dh_wide, monkeypatch):
    """The wide variants (128-wide gate|up dot; two live blocks or dA|dU per down/dX/dh step, odd
    live counts masking the second half) against eager and the gather backward."""
    force_wide(monkeypatch, dh_wide=dh_wide)
    check_forward(m, 70 if block == (16, 16) else 64, 75, gated, bias, act, dtype, block, "cpu", sparsity=0.5,
                  dead_rows=True)
    check_backward(m, 70 if block == (16, 16) else 64, 75, gated, bias, act, dtype, block, "cpu", declare=declare,
                   sparsity=0.5)


def force_tma(monkeypatch, bm=32, nw=4, group=0, two_loops=False):
    """Run the prefill/backward kernels with their TMA variants (first config, tuning off);
    ``two_loops``: dX's dA and dU halves in two loops (variant TWO_LOOPS; plain TMA elsewhere)."""
    g = (group,) if group else ()
    var = configs.TWO_LOOPS if two_loops else configs.PREFILL_TMA
    monkeypatch.setattr(configs, "PREFILL_CONFIGS", [(bm, nw, 3, var, *g)])
    monkeypatch.setattr(configs, "BACKWARD_CONFIGS", [(bm, nw, 3, configs.BACKWARD_TMA, *g)])
    monkeypatch.setattr(configs, "SDDMM_CONFIGS", [(bm, nw, 3, 1)])


@interp
@pytest.mark.parametrize("m,bm,group", [(37, 16, 2), (70, 16, 3), (33, 16, 4)])
@pytest.mark.parametrize("force", [force_wide, force_tma])
def test_interp_grouped_tiles(m, bm, group, force, monkeypatch):
    """Programs in groups of M tiles (template ``_tile``): a last group smaller than the others
    (3 tiles in groups of 2, 5 in groups of 3) and one larger than the grid (3 tiles, groups of 4)."""
    force(monkeypatch, bm=bm, group=group)
    check_forward(m, 70, 75, True, True, "silu", torch.float16, (16, 16), "cpu", sparsity=0.5, dead_rows=True)
    check_backward(m, 70, 75, True, True, "silu", torch.float16, (16, 16), "cpu", declare=True, sparsity=0.5)


class _NanEmpty:
    """``torch`` as ``triton_mlp`` sees it, except that ``empty`` comes back NaN-filled: a kernel that
    leaves part of an output unwritten then fails the comparison (fresh CPU memory is often zero)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*a, **k):
        t = torch.empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@interp
@pytest.mark.parametrize("fill", [1, 2])
@pytest.mark.parametrize("tied,split,block", [(True, False, (16, 16)), (False, True, (16, 16)),
                                              (True, False, (32, 16)), (True, True, (64, 16))])
def test_interp_dw_fill(tied, split, block, fill, monkeypatch):
    """dW's dead blocks are zeroed by the sddmm programs themselves (FILL 1: before the products, 2: 16
    rows a step, the rest after), round robin: every block of every dW written, with NaN-filled fresh
    buffers; tied (dual) and untied, one M split and several, blocks zeroed in 1, 2 and 4 steps."""
    monkeypatch.setattr(backward_ops, "torch", _NanEmpty())
    monkeypatch.setattr(configs, "DW_FILL", fill)
    monkeypatch.setattr(configs, "SDDMM_CONFIGS", [(16, 4, 3, 0)])  # 5 steps over 70 rows
    if split:
        monkeypatch.setattr(configs, "SDDMM_MIN_ROWS", 16)
    check_backward(70, 72, 88 if block[0] == 16 else 200, True, False, "silu", torch.float32, block, "cpu",
                   declare=True, tied=tied, sparsity=0.7, dead_rows=True)


@interp
@pytest.mark.parametrize("g", [2, 4])
@pytest.mark.parametrize("tied,split,block", [(True, False, (16, 16)), (False, True, (16, 16)),
                                              (True, True, (32, 16)), (False, False, (16, 32))])
def test_interp_dw_grouped(tied, split, block, g, monkeypatch):
    """dW with G live blocks of a block row per program (``sddmm`` G): rows whose live count is not a
    multiple of G (the padding repeats a block), ragged last blocks (88 = 5.5 x 16), tied (dual) and
    untied, one M split and several (the reduction scatters a group), NaN-filled fresh buffers."""
    monkeypatch.setattr(backward_ops, "torch", _NanEmpty())
    monkeypatch.setattr(configs, "SDDMM_CONFIGS", [(16, 4, 3, 0, g)])
    if split:
        monkeypatch.setattr(configs, "SDDMM_MIN_ROWS", 16)
    check_backward(70, 72, 88, True, False, "silu", torch.float32, block, "cpu", declare=True, tied=tied,
                   sparsity=0.5, dead_rows=True)


@interp
def test_interp_backward_choices_memoized(monkeypatch):
    """Every backward launch (kernel 1, dX, dW) remembers its table answer in the plan's cache: a
    second backward looks no config up (the lookup builds a key string per launch: host time)."""
    first = {"hidden_bwd": configs.BACKWARD_CONFIGS[0], "dx_dual": configs.PREFILL_CONFIGS[0],
             "dw2": configs.SDDMM_CONFIGS[0], "dw": configs.SDDMM_CONFIGS[0]}
    looked = []

    def lookup(key):  # a persisted table holding the first config of every kind
        looked.append(key.split("|")[0])
        return first.get(looked[-1])

    monkeypatch.setattr(codegen, "lookup_config", lookup)
    p = make(70, 75, gated=True, bias=False, dtype=torch.float32, block=(16, 16), tied=True)
    for name, (bo, bi) in (("w1", (16, 16)), ("w3", (16, 16)), ("w2", (16, 16))):
        mk = p["w1"]._blast_mask[0] if name == "w3" else _block_mask(p[name], bo, bi)
        masks.declare_mask(p[name], mk, (bo, bi))
    x, dy = torch.randn(37, 70), torch.randn(37, 70)
    plan = plan_for(x, p, "silu", (16, 16))
    g1 = triton_mlp.backward(dy, x, *args(p), plan, "silu", [True] * 7)
    n = len(looked)
    assert sorted(set(looked)) == ["dw", "dw2", "dx_dual", "hidden_bwd"]
    g2 = triton_mlp.backward(dy, x, *args(p), plan, "silu", [True] * 7)
    assert len(looked) == n  # all from the plan's memo
    for k in g1:
        if g1[k] is not None:
            torch.testing.assert_close(g2[k], g1[k])
    for name in ("w1", "w3", "w2"):
        masks.clear_mask(p[name])


@interp
@pytest.mark.parametrize("m", [37, 5])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("pre_cfg", [(32, 4, 2, 0, 0, 0), (32, 4, 2, 0, 0, 1), (32, 4, 2, 0, 0, 1, 96)])
def test_interp_backward_reads_forward_h(m, gated, pre_cfg, monkeypatch):
    """What the forward kept (``forward(keep=1)``: H; ``keep=2``: H and the pre-activations; the prefill
    kernels even at decode-sized M) handed to the backward: the same gradients as recomputing, and the
    counters say dW2 read H and kernel 1 the pre-activations; a wrong-shaped one is ignored. Kernel 1
    loads them after its dh loop, or before it (6th element; template LOAD_PRE 2), with a register cap
    (7th)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(configs, "BACKWARD_PRE_CONFIGS", [pre_cfg])

    p = make(70, 75, gated=gated, bias=True, dtype=torch.float32, block=(16, 16))
    ws = ("w1", "w3", "w2") if gated else ("w1", "w2")
    for name in ws:
        masks.declare_mask(p[name], _block_mask(p[name], 16, 16), (16, 16))
    x, dy = torch.randn(m, 70), torch.randn(m, 70)
    plan = plan_for(x, p, "silu", (16, 16))
    y1, s1 = triton_mlp.forward(x, *args(p), plan, "silu", keep=1)
    y2, s2 = triton_mlp.forward(x, *args(p), plan, "silu", keep=2)
    assert s1.shape == (1, m, 75) and s2.shape == (3 if gated else 2, m, 75)
    for y in (y1, y2):
        torch.testing.assert_close(y, triton_mlp.forward(x, *args(p), plan, "silu"), **tol(torch.float32))
    want = triton_mlp.backward(dy, x, *args(p), plan, "silu", [True] * 7)
    c = counters["blast"]
    cases = [(s1, 1, 0), (s2, 1, 1), (s2[:1], 1, 0), (s2[:, :, :-1], 0, 0)] + [(s2[:2], 0, 0)] * gated
    for s_in, n_h, n_pre in cases:
        used, pre = c["saved_hidden_used"], c["saved_pre_used"]
        got = triton_mlp.backward(dy, x, *args(p), plan, "silu", [True] * 7, s_in)
        for k, v in want.items():
            if v is not None:
                torch.testing.assert_close(got[k], v, msg=lambda s: f"{k}: {s}")
        assert (c["saved_hidden_used"] - used, c["saved_pre_used"] - pre) == (n_h, n_pre)
    for name in ws:
        masks.clear_mask(p[name])


@interp
def test_interp_kernel1_tuned_apart_with_and_without_h(monkeypatch):
    """Backward kernel 1 writing H (dW2 wanted, no H from the forward) or not: two tuning keys."""
    keys = []
    monkeypatch.setattr(codegen, "lookup_config", lambda key: keys.append(key) or None)
    p = make(70, 75, gated=True, bias=False, dtype=torch.float32, block=(16, 16))
    for name in ("w1", "w3", "w2"):
        masks.declare_mask(p[name], _block_mask(p[name], 16, 16), (16, 16))
    x, dy = torch.randn(37, 70), torch.randn(37, 70)
    plan = plan_for(x, p, "silu", (16, 16))
    for needs_w2 in (True, False):
        triton_mlp.backward(dy, x, *args(p), plan, "silu", [True] * 5 + [needs_w2, True])
    k1 = [k for k in keys if k.startswith("hidden_bwd|")]
    assert len(k1) == 2 and k1[0] != k1[1]
    for name in ("w1", "w3", "w2"):
        masks.clear_mask(p[name])


def test_grouped_configs_only_where_they_change_the_order():

    cfgs = [(64, 4, 3, 1), (64, 4, 3, 1, 8), (128, 4, 3, 2, 4)]
    assert configs._for_m(cfgs, 512) == [(64, 4, 3, 1)]  # 8 and 4 tiles: grouping is the launch order
    assert configs._for_m(cfgs, 513) == cfgs
    assert configs._for_m(cfgs[1:], 64) == cfgs[1:]  # (never empty)
    assert configs.Tile.of((64, 4, 3, 1)) == configs.Tile(64, 4, 3, variant=1)  # (persisted before ``group``)
    assert configs.Tile.of((64, 4, 3, 1)).group == 0
    assert all(c.group in (0, configs.GROUP_ROWS // c.bm) for c in configs.PREFILL_CONFIGS)


def _count_tma(monkeypatch):
    """Counts launches with TMA on, per kernel name (a forced TMA config falls back silently)."""
    seen = {}
    real = tables._desc

    def spy(t, block):
        seen[tuple(block)] = seen.get(tuple(block), 0) + 1
        return real(t, block)

    monkeypatch.setattr(tables, "_desc", spy)
    return seen


@interp
@pytest.mark.parametrize("m,gated,bias,act,dtype,block,declare", [
    (37, True, True, "silu", torch.float16, (16, 16), True),  # odd M, ragged dims (72 = 4.5 blocks), biases
    (40, False, False, "gelu", torch.float16, (16, 32), False),  # plain, non-square blocks
    (33, True, False, "relu2", torch.float16, (32, 16), True),
])
def test_interp_tma_tiles(m, gated, bias, act, dtype, block, declare, monkeypatch):
    """Every prefill/backward tile loaded through TMA descriptors (rows past M and ragged edge blocks
    zero-filled by the descriptor bounds), against eager and the gather backward."""
    force_tma(monkeypatch)
    seen = _count_tma(monkeypatch)
    check_forward(m, 72, 88, gated, bias, act, dtype, block, "cpu", sparsity=0.5, dead_rows=True)
    check_backward(m, 72, 88, gated, bias, act, dtype, block, "cpu", declare=declare, sparsity=0.5)
    assert seen, "no launch took the TMA path"


@interp
@pytest.mark.parametrize("gated,bias,block", [(True, True, (16, 16)), (True, False, (32, 16))])
def test_interp_dx_two_loops(gated, bias, block, monkeypatch):
    """dX with its dA and dU halves in two TMA loops (``bsmm`` TWO_LOOPS) against eager and the gather
    backward: odd M, ragged dims, a column with no live block."""
    force_tma(monkeypatch, two_loops=True)
    seen = _count_tma(monkeypatch)
    check_backward(37, 72, 88, gated, bias, "silu", torch.float16, block, "cpu", declare=True, sparsity=0.5,
                   dead_rows=True)
    assert seen


@interp
def test_interp_tma_packed_and_fallback(monkeypatch):
    """TMA on packed [nnz, bo, bi] weights (block row = element offset // bi); fp32 and rows that are
    not 16-byte aligned (d = 37 halves) fall back to the pointer kernels with the same results."""
    force_tma(monkeypatch)
    seen = _count_tma(monkeypatch)
    x, p, plan, y = check_forward(40, 72, 88, True, True, "silu", torch.float16, (16, 16), "cpu")
    pk = gather.PackedMLP(plan.dev_pattern, p["w1"], p["w3"], p["w2"])
    n = sum(seen.values())
    y2 = triton_mlp.forward_packed(x, pk.p1, p["b1"], pk.p3, p["b3"], pk.p2, p["b2"], plan, "silu")
    assert sum(seen.values()) > n
    torch.testing.assert_close(y2, y, **tol(torch.float16))
    seen.clear()
    check_forward(40, 37, 75, True, True, "silu", torch.float16, (16, 16), "cpu")
    check_forward(40, 72, 88, True, True, "silu", torch.float32, (16, 16), "cpu")
    assert not seen


@interp
@pytest.mark.parametrize("tma", [False, True])
def test_interp_fused_gate_up_views(tma, monkeypatch):
    """W1 and W3 as the row halves of one tensor (what the rewrite passes for a fused gate|up
    weight): offset views, read in place by the prefill (pointer or TMA), decode and backward kernels."""
    if tma:
        force_tma(monkeypatch)
        seen = _count_tma(monkeypatch)
    for m in (37, 3):
        check_forward(m, 72, 88, True, True, "silu", torch.float16, (16, 16), "cpu", fused_gate_up=True)
    check_backward(37, 72, 88, True, False, "silu", torch.float16, (16, 16), "cpu", fused_gate_up=True)
    assert not tma or seen


@interp
def test_interp_launch_state_kept_with_plan(tmp_path, monkeypatch):
    """A call's host path reuses the plan's launch state (``_Static``) and its memo of chosen configs;
    packed copies (made per call) are never kept, and a memo from another kernel dir is not used."""
    def cached(plan, *head):
        return {k: v for k, v in plan.cache.items() if isinstance(k, tuple) and k[:len(head)] == head}

    monkeypatch.setattr(codegen, "_KERNEL_DIR", str(tmp_path / "a"))  # (undone after the test)
    monkeypatch.setattr(codegen, "_TUNING", None)
    x, p, plan, y = check_forward(40, 72, 88, True, True, "silu", torch.float16, (16, 16), "cpu")
    ((key, st),) = cached(plan, "static").items()
    shape = (72, 88, 72)
    codegen.store_config(tune.tuning_key("hidden", st.sig, 40, shape), [32, 4, 2, 1])
    torch.testing.assert_close(triton_mlp.forward(x, *args(p), plan, "silu"), y, **tol(torch.float16))  # (another config)
    assert cached(plan, "static") == {key: st}
    assert list(cached(plan, "chosen").values()) == [(32, 4, 2, 1)]  # from the table, remembered
    pk = gather.PackedMLP(plan.dev_pattern, p["w1"], p["w3"], p["w2"])
    triton_mlp.forward_packed(x, pk.p1, p["b1"], pk.p3, p["b3"], pk.p2, p["b2"], plan, "silu")
    assert cached(plan, "static") == {key: st}
    codegen.set_kernel_dir(tmp_path / "b")
    codegen.store_config(tune.tuning_key("hidden", st.sig, 40, shape), [64, 4, 3, 0])
    torch.testing.assert_close(triton_mlp.forward(x, *args(p), plan, "silu"), y, **tol(torch.float16))
    assert sorted(cached(plan, "chosen", "hidden").values()) == [(32, 4, 2, 1), (64, 4, 3, 0)]


@interp
@pytest.mark.parametrize("m,declare,d,h,gated", [(40, True, 48, 80, True), (37, False, 48, 80, True),
                                                 (3, False, 48, 80, True), (33, True, 37, 75, True),
                                                 (40, True, 48, 80, False), (33, False, 37, 75, False)])
@pytest.mark.parametrize("tma", [False, True])
def test_interp_fp32_master_weights_half_compute(m, declare, d, h, gated, tma, monkeypatch):
    """Autocast training: fp32 weights, fp16 activations. The kernels get packed fp16 copies of the
    live blocks (one ``pack_blocks`` launch for the weights; ragged edge blocks zero padded); dW comes out fp32,
    equal to the fp16 computation's. ``tma``: the packed copies read through TMA (d = 37: rows not 16-byte
    aligned, the pointer kernels run)."""
    if tma:
        force_tma(monkeypatch)

    p = make(d, h, gated=gated, bias=False, dtype=torch.float32, block=(16, 16), device="cpu")
    ph = {k: None if v is None else v.half() for k, v in p.items()}
    weights = ("w1", "w3", "w2") if gated else ("w1", "w2")
    if declare:
        for q in (p, ph):
            for name in weights:
                bo, bi = (16, 16)
                masks.declare_mask(q[name], _block_mask(p[name], bo, bi), (bo, bi))
    x = torch.randn(m, d, dtype=torch.float16)
    dy = torch.randn(m, d, dtype=torch.float16)
    plan, plan_h = plan_for(x, p, "silu", (16, 16)), plan_for(x, ph, "silu", (16, 16))
    y = triton_mlp.forward(x, *args(p), plan, "silu")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, triton_mlp.forward(x, *args(ph), plan_h, "silu"), **tol(torch.float16))
    torch.testing.assert_close(y, dense_mlp(x, *args(ph), "silu"), **tol(torch.float16))
    if m > codegen.DECODE_MAX_M:
        g = triton_mlp.backward(dy, x, *args(p), plan, "silu", [True] * 7)
        gh = triton_mlp.backward(dy, x, *args(ph), plan_h, "silu", [True] * 7)
        for k in ("x", *weights):
            assert g[k].dtype == (torch.float16 if k == "x" else torch.float32), k
            torch.testing.assert_close(g[k].float(), gh[k].float(), rtol=1e-2, atol=1e-2, msg=k)
        # the training forward hands its packed copies and x's row flags to the backward (blast::mlp_train): the
        # same gradients, bit for bit
        copies, flags = [], []
        _, s = triton_mlp.forward(x, *args(p), plan, "silu", keep=1, copies=copies, flags=flags)
        assert len(copies) == 3 and (copies[1] is None) != gated and flags[0].shape == (cdiv(d, 256), m)
        g2 = triton_mlp.backward(dy, x, *args(p), plan, "silu", [True] * 7, list(s.unbind(0)), copies, flags[0])
        for k in ("x", *weights):
            torch.testing.assert_close(g2[k], g[k], rtol=0, atol=0, msg=k)
    for q in (p, ph):
        for name in weights:
            masks.clear_mask(q[name])


@interp
@pytest.mark.parametrize("gated,bias,act", [(True, True, "silu"), (False, True, "relu"), (False, False, "gelu")])
def test_interp_backward_reads_the_forwards_row_flags(gated, bias, act):
    """Rows of x holding NaN/Inf: the backward reading the forward's flags (``flags``: [slices, M], d_in = 600 over
    three 256-column slices, a bad value in the last) gives what its own scan gives, NaN where eager's does."""
    p = make(600, 80, gated=gated, bias=bias, dtype=torch.float16, block=(16, 16), device="cpu")
    x = torch.randn(37, 600, dtype=torch.float16)
    x[3, 590], x[20, 7] = float("inf"), float("nan")
    dy = torch.randn(37, 600, dtype=torch.float16)
    plan = plan_for(x, p, act, (16, 16))
    flags = []
    _, s = triton_mlp.forward(x, *args(p), plan, act, keep=1, flags=flags)
    assert flags[0].shape == (3, 37) and flags[0][:, 3].any() and flags[0][:, 20].any() and not flags[0][:, 4].any()
    want = triton_mlp.backward(dy, x, *args(p), plan, act, [True] * 7, list(s.unbind(0)))
    got = triton_mlp.backward(dy, x, *args(p), plan, act, [True] * 7, list(s.unbind(0)), None, flags[0])
    for k, v in want.items():
        if v is not None:
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert got["x"][3].isnan().any() or act == "relu"


@interp
@pytest.mark.parametrize("m,bias,split", [(150, True, True), (21, False, False)])
def test_interp_backward_tied_dead_split(m, bias, split, monkeypatch):
    """Tied gate/up masks (one dual dW launch), a hidden block dropped because its down column is
    dead while its declared gate/up rows are live (dW must be exactly zero there), and dW's M split
    over programs with the two-pass reduction."""
    if split:
        monkeypatch.setattr(configs, "SDDMM_MIN_ROWS", 8)
        monkeypatch.setattr(backward_ops, "_n_sm", lambda dev: 64)
    from torch._dynamo.utils import counters

    counters.clear()
    check_backward(m, 48, 80, True, bias, "silu", torch.float32, (16, 16), "cpu", declare=True, tied=True,
                   dead_rows=True, sparsity=0.5)
    assert counters["blast"]["dw_tied"] == 1
    assert counters["blast"]["dw_split_m"] == (2 if split else 0)  # gate+up launch and down launch


def check_nonfinite(m, device, dtype, block, d=None, h=None, **kw):
    """Rows of x with NaN/Inf come out all-NaN (eager's dense product); other rows are unaffected. With d past
    256 the bad entries sit in different 256-column slices of the prefill's row flags (first, middle, last)."""
    assert triton_mlp.HANDLES_NONFINITE
    d = d or (40 if device == "cpu" else 256)
    x, p, plan, y = check_forward(m, d, h or (80 if device == "cpu" else 640), True, True, "silu", dtype, block,
                                  device, **kw)
    r1, r2 = min(1, m - 1), m // 2
    x[r1, 3] = float("nan")
    x[m - 1, -1] = float("-inf")
    x[r2, d // 2] = float("inf")
    y2 = triton_mlp.forward(x, *args(p), plan, "silu")
    bad = torch.zeros(m, dtype=torch.bool, device=device)
    bad[r1] = bad[m - 1] = bad[r2] = True
    assert torch.isnan(y2[bad]).all()
    torch.testing.assert_close(y2[~bad], y[~bad], **tol(dtype))
    assert torch.isnan(dense_mlp(x, *args(p), "silu")[bad]).all()  # what eager gives
    x[r1, 3], x[m - 1, -1], x[r2, d // 2] = 0.5, 0.25, 0.125
    y3 = triton_mlp.forward(x, *args(p), plan, "silu")  # no stale flags
    torch.testing.assert_close(y3, dense_mlp(x, *args(p), "silu"), **tol(dtype))


def check_decode_repeat(device, dtype, d, h, block, ms, reps, bitwise=True, **kw):
    """Many decode calls on one plan (alternating M, biases, dead block rows so some output blocks
    have no live down block): each one right, and the same input gives the same bits again (no
    atomics, no state carried between calls). ``bitwise=False`` (split-K: fp32 atomics add in
    any order): instead every scratch tensor and counter is back to zero after each call."""
    p = make(d, h, gated=True, bias=True, dtype=dtype, block=block, device=device, dead_rows=True, **kw)
    plan = plan_for(torch.zeros(1, d, dtype=dtype, device=device), p, "silu", block)
    assert (plan.pattern.dn_rowptr[1:] == plan.pattern.dn_rowptr[:-1]).any()  # an empty output block row
    first = {}
    for i in range(reps):
        m = ms[i % len(ms)]
        x = first.get(m, (torch.randn(m, d, dtype=dtype, device=device), None))[0]
        y = triton_mlp.forward(x, *args(p), plan, "silu")
        torch.testing.assert_close(y, dense_mlp(x, *args(p), "silu"), **tol(dtype), msg=lambda s: f"call {i} (m={m}): {s}")
        if m in first and bitwise:
            assert torch.equal(y, first[m][1]), f"call {i} (m={m}): not bitwise repeatable"
        first.setdefault(m, (x, y))
        if not bitwise:
            scratch = [v for k, v in plan.cache.items() if isinstance(k, tuple) and k[0] == "dec_scratch"]
            assert scratch and all(int(buf.count_nonzero()) == 0 for buf, _ in scratch), f"call {i} (m={m})"
    return plan


@interp
def test_interp_decode_repeat():
    check_decode_repeat("cpu", torch.float32, 40, 80, (32, 16), (3, 1, 5, 3), 4, sparsity=0.5)


@interp
@pytest.mark.parametrize("gemv", [0, 1])
def test_interp_decode_splitk(gemv, monkeypatch):
    """Split-K decode (tensor-core tiles or, at M = 1, the GEMV), ragged blocks, dead block rows, NaN rows:
    right every call and its scratch re-zeroed."""
    force_splitk(monkeypatch, GEMV_MAX_M=gemv)
    check_decode_repeat("cpu", torch.float32, 40, 80, (32, 16), (1, 3, 1), 3, bitwise=False, sparsity=0.5)
    check_nonfinite(1, "cpu", torch.float32, (16, 16))
    x, p, plan, y = check_forward(1, 37, 75, True, True, "silu", torch.float32, (16, 16), "cpu")  # packed weights
    pk = gather.PackedMLP(plan.dev_pattern, p["w1"], p["w3"], p["w2"])
    y2 = triton_mlp.forward_packed(x, pk.p1, p["b1"], pk.p3, p["b3"], pk.p2, p["b2"], plan, "silu")
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    packed = [t for k, t in plan.cache.items() if isinstance(k, tuple) and k[:2] == ("offsets", True)]
    assert packed and any(isinstance(k, tuple) and k[0] == "flat_in" for k in packed[0])
    # (the pattern above is small enough to have no kernel-1 chunk: one with many chunks of both kernels, and
    # hidden columns whose down blocks are split over several kernel-2 programs)
    plan = check_decode_repeat("cpu", torch.float32, 96, 160, (16, 16), (1, 3, 17, 1), 4, bitwise=False,
                               sparsity=0.5)
    (ch,) = [v for k, v in plan.cache.items() if isinstance(k, tuple) and k[0] == "chunks"]
    assert ch["n_in"] > 4 and ch["n_dn"] > 4 and (ch["dn_tot"] > 1).any()


@interp
@pytest.mark.parametrize("cfg", [(16, 1, 4, 2, 4), (16, 2, 4, 2, 3)])
def test_interp_decode_split_y(cfg, monkeypatch):
    """The sliced decode's ``bsmm`` with each row slice's reduction split over programs (fp32 partial sums in a
    scratch slot each, the last program of a slice adding them in slot order): eager's answer, bitwise repeatable
    (no atomics on values), its counters zero after every call, NaN rows, the M = 16/17 tile border, plain MLPs."""
    force_split_y(monkeypatch, cfg)
    plan = check_decode_repeat("cpu", torch.float32, 96, 160, (16, 16), (1, 3, 17, 1, 3), 6, sparsity=0.5)
    ((buf, offs),) = [v for k, v in plan.cache.items() if isinstance(k, tuple) and k[0] == "dec_scratch_y"]
    assert not buf[offs[1]:].any() and buf[:offs[1]].any()  # counters zero again; partial sums were written
    p = plan.pattern
    assert int((p.dn_rowptr[1:] - p.dn_rowptr[:-1]).max()) > cfg[1] * cfg[4]  # rows long enough for every part
    check_nonfinite(1, "cpu", torch.float32, (16, 16), d=96, h=160, sparsity=0.5)
    check_nonfinite(20, "cpu", torch.float32, (16, 16), d=96, h=160, sparsity=0.5)
    check_forward(5, 48, 96, False, True, "relu", torch.float32, (16, 16), "cpu")


@interp
def test_interp_decode_split_k_scratch_by_address(monkeypatch):
    """A lowered op's split-K (its compile-time warm-up runs it as the graph will) passes the kernels its plan's
    scratch by address, two 31-bit ints they turn into a pointer: right every call, the scratch zero again after
    each."""
    from memcheck import allow

    from blast_compile.ops import decode, launch

    monkeypatch.setattr(configs, "DECODE_PATH", "splitk")
    init = decode._Scratch.__init__
    monkeypatch.setattr(decode._Scratch, "__init__", lambda self, buf, offs: (allow(buf), init(self, buf, offs))[1])
    seen = []
    real = decode._decode_scratch
    monkeypatch.setattr(decode, "_decode_scratch", lambda *a: (seen.append(type(real(*a)[0])), real(*a))[1])
    with launch.lowering("warm"):
        check_decode_repeat("cpu", torch.float32, 40, 80, (32, 16), (3, 1, 5, 3), 4, bitwise=False, sparsity=0.5)
        check_forward(2, 48, 96, False, True, "relu", torch.float32, (16, 16), "cpu")
    assert len(seen) == 5 and set(seen) == {int}, seen


@interp
@pytest.mark.parametrize("faster", ["sliced", "splitk"])
def test_interp_decode_path_choice_keeps_split_k_scratch_only_if_chosen(faster, monkeypatch):
    """The decode path is timed once per plan and M bucket (fake timings here; one launch config each, so only
    the paths are timed): the faster one runs from then on, and split-K's scratch (megabytes a layer at real
    sizes), made while timing it, stays only if split-K was chosen."""
    from blast_compile.ops import decode, tune

    for name in ("DECODE_SLICE_CONFIGS", "DECODE_CONFIGS", "DECODE_GEMV_CONFIGS"):
        monkeypatch.setattr(configs, name, getattr(configs, name)[:1])
    monkeypatch.setattr(configs, "DECODE_SPLIT_Y", False)
    _tuning_on(monkeypatch, ())  # (timings: fake_time below)
    ran = []
    monkeypatch.setattr(decode, "_decode_splitk", lambda *a, f=decode._decode_splitk: (ran.append("splitk"), f(*a))[1])
    monkeypatch.setattr(decode, "_decode_sliced", lambda *a, f=decode._decode_sliced, **k: (ran.append("sliced"),
                                                                                          f(*a, **k))[1])
    timed = []

    def fake_time(fn, **kw):
        timed.append(len(ran))
        fn()
        return 1.0 if ran[-1] == faster else 2.0

    monkeypatch.setattr(tune, "_graph_time", fake_time)
    plan = check_decode_repeat("cpu", torch.float32, 40, 80, (32, 16), (1, 1), 2, bitwise=faster == "sliced",
                               sparsity=0.5)
    assert len(timed) == 2 and ran[2:] == [faster, faster], ran  # timed both once, then the faster one twice
    kept = [k for k in plan.cache if isinstance(k, tuple) and k[:1] == ("dec_scratch",)]
    assert bool(kept) == (faster == "splitk"), kept


@interp
def test_interp_compile_only_launches_run_nothing():
    """Under the interpreter too a ``compile_only`` launch (the tuner's compile threads) runs nothing: run, two
    candidates on two threads would share one scratch at once (a split ``bsmm``'s counters then go wrong)."""
    import types

    import triton
    import triton.language as tl

    from blast_compile.ops import launch

    @triton.jit
    def one(out_ptr):
        tl.store(out_ptr + tl.arange(0, 4), tl.full((4,), 1.0, tl.float32))

    mod = launch.Module(types.SimpleNamespace(one=one))
    out = torch.zeros(4)
    with launch.compile_only():
        mod.one[(1,)](out)
    assert not out.any()
    mod.one[(1,)](out)
    assert out.eq(1).all()


def _tuning_on(monkeypatch, times):
    """Tuning on with fake timings (``times``, in the order things are timed); nothing persisted."""
    from blast_compile import codegen
    from blast_compile.ops import tune

    monkeypatch.setattr(tune, "_may_tune", lambda: True)
    monkeypatch.setattr(codegen, "lookup_config", lambda key: None)
    monkeypatch.setattr(codegen, "store_config", lambda key, cfg: None)
    it = iter(times)
    monkeypatch.setattr(tune, "_graph_time", lambda fn, **kw: (fn(), next(it))[1])


@interp
@pytest.mark.parametrize("split_wins", [False, True])
def test_interp_split_y_scratch_stays_only_if_a_split_config_is_chosen(split_wins, monkeypatch):
    """The sliced decode's ``bsmm`` tuned between an unsplit and a split config: the split one's scratch, made
    while timing it, stays only if it was chosen; the answer is eager's either way."""
    monkeypatch.setattr(configs, "DECODE_PATH", "sliced")
    monkeypatch.setattr(configs, "DECODE_SLICE_CONFIGS", configs.DECODE_SLICE_CONFIGS[:1])
    monkeypatch.setattr(configs, "DECODE_SPLIT_CONFIGS", configs.DECODE_SPLIT_CONFIGS[1:2])
    _tuning_on(monkeypatch, [2.0, 1.0] if split_wins else [1.0, 2.0])  # (unsplit, split)
    plan = check_decode_repeat("cpu", torch.float32, 40, 80, (32, 16), (1, 1), 2, sparsity=0.5)
    kept = [k for k in plan.cache if isinstance(k, tuple) and k[:1] == ("dec_scratch_y",)]
    assert bool(kept) == split_wins, kept


@interp
def test_interp_scratch_a_graph_used_is_never_freed(monkeypatch):
    """Split-K run for real (DECODE_PATH forced, as a compiled graph that holds its scratch's address would have
    run it), then the path timed on the same plan with the sliced decode faster: split-K's scratch stays, the same
    buffer."""
    from blast_compile.ops import decode

    monkeypatch.setattr(configs, "DECODE_PATH", "splitk")
    for name in ("DECODE_SLICE_CONFIGS", "DECODE_CONFIGS", "DECODE_GEMV_CONFIGS"):
        monkeypatch.setattr(configs, name, getattr(configs, name)[:1])
    monkeypatch.setattr(configs, "DECODE_SPLIT_Y", False)
    p = make(40, 80, gated=True, bias=True, dtype=torch.float32, block=(32, 16), sparsity=0.5, dead_rows=True)
    plan = plan_for(torch.zeros(1, 40), p, "silu", (32, 16))

    def check():
        x = torch.randn(1, 40)
        torch.testing.assert_close(triton_mlp.forward(x, *args(p), plan, "silu"), dense_mlp(x, *args(p), "silu"),
                                   **tol(torch.float32))

    check()
    (buf,) = [v.buf for k, v in plan.cache.items() if isinstance(k, tuple) and k[0] == "dec_scratch"]
    monkeypatch.setattr(configs, "DECODE_PATH", "")
    _tuning_on(monkeypatch, [1.0, 2.0])  # (sliced, splitk)
    check()
    assert [v for k, v in plan.cache.items() if isinstance(k, tuple) and k[0] == "dec_path"] == ["sliced"]
    (kept,) = [v.buf for k, v in plan.cache.items() if isinstance(k, tuple) and k[0] == "dec_scratch"]
    assert kept is buf


@interp
def test_interp_decode_split_k_everywhere(monkeypatch):
    """Split-K decode forced: right every call (its one int32 scratch buffer, read as fp32 through bitcast
    pointers, zero again after each), ragged blocks, dead block rows, NaN rows, plain and gated, dense and packed
    weights, at the M = 16/17 tile border."""
    monkeypatch.setattr(configs, "DECODE_PATH", "splitk")
    plan = check_decode_repeat("cpu", torch.float32, 40, 80, (32, 16), (3, 1, 17, 3), 5, bitwise=False, sparsity=0.5)
    ((buf, offsets),) = [v for k, v in plan.cache.items() if isinstance(k, tuple) and k[0] == "dec_scratch"]
    assert buf.dtype == torch.int32 and not buf.any() and len(offsets) == 6
    check_nonfinite(1, "cpu", torch.float32, (16, 16))
    check_nonfinite(20, "cpu", torch.float32, (16, 16))
    check_forward(5, 48, 96, False, True, "relu", torch.float32, (16, 16), "cpu")
    check_forward(32, 48, 96, True, False, "gelu", torch.float16, (16, 32), "cpu")
    x, p, plan, y = check_forward(2, 37, 75, True, True, "silu", torch.float32, (16, 16), "cpu")
    pk = gather.PackedMLP(plan.dev_pattern, p["w1"], p["w3"], p["w2"])
    y2 = triton_mlp.forward_packed(x, pk.p1, p["b1"], pk.p3, p["b3"], pk.p2, p["b2"], plan, "silu")
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)


@interp
def test_interp_deterministic_decode_is_sliced(monkeypatch, caplog):
    """torch.use_deterministic_algorithms(True): decode takes the sliced path (no atomics) even when
    DECODE_PATH asks for split-K, says so once, and repeats bitwise."""
    from blast_compile.ops import plans, triton_mlp

    monkeypatch.setattr(configs, "DECODE_PATH", "splitk")
    plans._WARNED.discard(("deterministic", "splitk"))
    torch.use_deterministic_algorithms(True)
    try:
        with caplog.at_level("WARNING", logger="blast_compile.ops"):
            x, p, plan, y = check_forward(1, 40, 80, True, True, "silu", torch.float32, (16, 16), "cpu")
        assert torch.equal(triton_mlp.forward(x, *args(p), plan, "silu"), y)
    finally:
        torch.use_deterministic_algorithms(False)
    assert not any(isinstance(k, tuple) and k[0] == "dec_scratch" for k in plan.cache)  # split-K never ran
    assert "ignored under torch.use_deterministic_algorithms" in caplog.text


@interp
@pytest.mark.parametrize("m", [3, 37])
def test_interp_nonfinite_rows(m):
    check_nonfinite(m, "cpu", torch.float32, (16, 16))
    check_nonfinite(m, "cpu", torch.float32, (16, 16), d=600, h=96)  # three 256-column flag slices, ragged


@interp
@pytest.mark.parametrize("act,gated", [("relu", False), ("silu", True)])
def test_interp_backward_nonfinite_rows_like_eager(act, gated):
    """A NaN in a row of x: every gradient is eager's, NaN where eager's dense products spread it (dX's whole
    row, dW and the biases' gradients through the NaN hidden row), through the kernels' own backward."""
    p = make(48, 80, gated=gated, bias=True, dtype=torch.float32, block=(16, 16))
    x = torch.randn(5, 48)
    x[1, 5] = float("nan")
    dy = torch.randn(5, 48)
    g = triton_mlp.backward(dy, x, *args(p), plan_for(x, p, act, (16, 16)), act, [True] * 7)
    ps = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in p.items()}
    xr = x.clone().requires_grad_()
    dense_mlp(xr, *args(ps), act).backward(dy)
    for k, ref in (("x", xr), *((k, ps[k]) for k in ("w1", "b1", "w3", "b3", "w2", "b2"))):
        if ref is not None:
            torch.testing.assert_close(g[k], ref.grad, equal_nan=True, rtol=1e-4, atol=1e-4, msg=k)


@interp
def test_interp_memcheck_catches_an_overrun():
    """The checker itself (``_memcheck`` runs every interpreter test under it): a load one element past a
    tensor's storage is caught, else no interpreter test could fail that way."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy(src, dst, n, EXTRA: tl.constexpr):
        i = tl.arange(0, 8)
        tl.store(dst + i, tl.load(src + i, mask=i < n + EXTRA), mask=i < n)

    src, dst = torch.arange(5, dtype=torch.float32), torch.zeros(5)
    copy[(1,)](src, dst, 5, EXTRA=0)
    assert torch.equal(dst, src)
    with pytest.raises(Exception, match="outside every tensor argument"):
        copy[(1,)](src, dst, 5, EXTRA=1)


MEMCHECK_CASES = 64


@interp
def test_interp_kernels_stay_in_bounds(monkeypatch):
    """Every kernel's every access inside its arguments (``_memcheck``), over random MLPs as the property tests
    draw them (d_out != d_in, blocks wider than the layer, ragged edges, decode and prefill M, fp16/fp32,
    with and without biases) and, in each case, a random launch config from every candidate list the tuner
    weighs, either decode path and each way the forward keeps H for the backward; outputs and every gradient
    against eager. ``torch.empty`` hands out NaN (ints: -7) instead of the CPU's usual zeros, so a kernel that
    reads memory nobody wrote fails here as it would on a GPU. Seeded: a failure names its case."""
    import random

    from memcheck import checked

    r = random.Random(0)
    chosen = []

    def choose(kind, sig, m, configs_, run, **kw):  # (what the tuner would time: any of them may be picked)
        cfg = r.choice(list(configs_() if callable(configs_) else configs_))
        chosen.append((kind, cfg))
        return cfg

    def garbage(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: garbage(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: garbage(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: garbage(new_empty(self, *a, **k)))
    monkeypatch.setattr(tune, "_choose", choose)
    monkeypatch.setattr(codegen, "lookup_config", lambda key: None)
    n0 = checked[0]
    for i in range(MEMCHECK_CASES):
        d, h, d_out = r.randint(1, 80), r.randint(1, 96), r.randint(1, 80)
        block = (r.choice((16, 32, 64, 128)), r.choice((16, 32, 64, 128)))
        gated, bias, keep = r.random() < 0.5, r.random() < 0.5, r.choice((0, 1, 2))
        m, dtype = r.choice((1, 5, 16, 17, 40)), r.choice((torch.float32, torch.float16))
        act, path = r.choice(("relu", "silu", "gelu_tanh", "relu2")), r.choice(("sliced", "splitk"))
        monkeypatch.setattr(configs, "DECODE_PATH", path)
        chosen.clear()
        g = torch.Generator().manual_seed(i)

        def w(o, k, bo, bi):
            t = torch.randn(o, k, generator=g, dtype=torch.float64) / k ** 0.5
            return (t * expand_mask(random_block_mask(cdiv(o, bo), cdiv(k, bi), 0.6, g), bo, bi, t.shape)).to(dtype)

        def b(n):
            return (torch.randn(n, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None

        p = dict(w1=w(h, d, *block), b1=b(h), w3=w(h, d, *block) if gated else None, b3=b(h) if gated else None,
                 w2=w(d_out, h, *block[::-1]), b2=b(d_out))
        dead = r.choice(("none", "none", "all", "in_rows", "out_cols"))  # (no live hidden block; dead units)
        units = torch.randperm(h, generator=g)[: max(1, h // 3)]
        with torch.no_grad():
            for k in {"all": ("w1", "w3", "w2"), "in_rows": ("w1", "w3"), "out_cols": ()}.get(dead, ()):
                if p[k] is not None:
                    p[k].zero_() if dead == "all" else p[k][units].zero_()
            if dead == "out_cols":
                p["w2"][:, units] = 0
        x = torch.randn(m, d, generator=g).to(dtype)
        case = f"case {i}: d={d} h={h} d_out={d_out} block={block} gated={gated} bias={bias} M={m} {dtype} {act} " \
               f"{path} keep={keep} dead={dead}"
        try:
            plan = plan_for(x, p, act, block)
            y = triton_mlp.forward(x, *args(p), plan, act, keep)
            y, s = y if keep else (y, None)
            torch.testing.assert_close(y, dense_mlp(x, *args(p), act), **tol(dtype))
            s = s.reshape(s.shape[0], -1, s.shape[-1]) if keep else None
            dy = torch.randn(m, d_out, generator=g).to(dtype)
            got = triton_mlp.backward(dy, x, *args(p), plan, act, [True] * 7, s)
            names = [k for k in ("x", "w1", "b1", "w3", "b3", "w2", "b2") if k == "x" or p[k] is not None]
            ins = [(x if k == "x" else p[k]).detach().clone().requires_grad_(True) for k in names]
            ref = dict(zip(names, ins))
            want = torch.autograd.grad(dense_mlp(ref["x"], *(ref.get(k) for k in ("w1", "b1", "w3", "b3", "w2",
                                                                                  "b2")), act), ins, dy)
            t = tol(dtype)
            for k, v in zip(names, want):
                torch.testing.assert_close(got[k].float(), v.float(), rtol=t["rtol"], atol=t["atol"] * 4,
                                           msg=lambda e, k=k: f"d{k}: {e}")
        except Exception as e:
            raise AssertionError(f"{case}; configs {chosen}: {e}") from e
    assert checked[0] - n0 > 1000  # (the checker saw the launches)


def test_interpreter_suite(tmp_path):
    if INTERP:
        pytest.skip("already in the interpreter child")
    skip_if_old_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1", BLAST_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "interp_",
                        os.path.join(ROOT, "tests", "test_kernels.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


# --- codegen: on-disk cache ----------------------------------------------------------------------

def _pattern(act="silu", gated=True, balanced=False):
    g = torch.Generator().manual_seed(3)
    m_in = random_block_mask(8, 4, 0.5, g)
    if balanced:
        m_in = torch.zeros(8, 4, dtype=torch.bool)
        m_in[:, :2] = True
    m_dn = random_block_mask(4, 8, 0.5, g)
    from blast_compile.formats import build_pattern

    return build_pattern(m_in, m_dn, 16, 16, activation=act, gated=gated, has_b1=False, has_b3=False)


def test_kernel_info_renders_readable_cached_source(tmp_path):
    codegen.set_kernel_dir(tmp_path)
    name, path = codegen.kernel_info(_pattern(), "silu", True, False, False, False, torch.bfloat16, "cuda", m_hint=1)
    text = open(path).read()
    assert "mlp_decode" in name and os.path.dirname(path) == str(tmp_path)
    assert "block 16x16, activation silu, gated" in text and "bfloat16" in text and "a * tl.sigmoid(a)" in text
    compile(text, path, "exec")
    # balanced pattern: constexpr trip count; another activation: another file
    _, p2 = codegen.kernel_info(_pattern(balanced=True), "silu", True, False, False, False, torch.bfloat16, "cuda")
    _, p3 = codegen.kernel_info(_pattern(), "relu", True, False, False, False, torch.bfloat16, "cuda")
    assert len({path, p2, p3}) == 3
    assert "uniform 2 live in-blocks" in open(p2).read() and "range(0, NNZ)" in open(p2).read()
    assert "tl.where(a <= 0.0, 0.0, a)" in open(p3).read()
    # a fresh process renders the same file for the same signature
    code = textwrap.dedent(f"""
        import torch, sys
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from blast_compile import codegen
        from test_kernels import _pattern
        codegen.set_kernel_dir({str(tmp_path / 'fresh')!r})
        print(codegen.kernel_info(_pattern(), "silu", True, False, False, False, torch.bfloat16, "cuda")[1])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert out.returncode == 0, out.stderr
    fresh = out.stdout.strip().splitlines()[-1]
    assert os.path.basename(fresh) == os.path.basename(path) and open(fresh).read() == text


def test_decode_without_cuda_graphs_warns_once(monkeypatch, caplog):
    """Decode outside graph capture is host-bound: after EAGER_DECODE_WARN calls of one MLP the op
    says so, once; calls made while a graph is being captured do not count."""
    import types

    from blast_compile.ops import plans

    monkeypatch.setattr(plans, "_WARNED", set())
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    plan, x = types.SimpleNamespace(cache={}), types.SimpleNamespace(is_cuda=True)
    for _ in range(2 * configs.EAGER_DECODE_WARN):  # a long capture: nothing counted
        decode_ops._count_eager_decode(plan, x)
    capturing[0] = False
    with caplog.at_level("WARNING", logger="blast_compile.ops"):
        for _ in range(configs.EAGER_DECODE_WARN - 1):
            decode_ops._count_eager_decode(plan, x)
        assert "reduce-overhead" not in caplog.text
        for _ in range(2 * configs.EAGER_DECODE_WARN):
            decode_ops._count_eager_decode(plan, x)
    assert caplog.text.count("mode='reduce-overhead'") == 1


def test_tuning_table_persists(tmp_path):
    codegen.set_kernel_dir(tmp_path)
    assert codegen.lookup_config("k|x|m16") is None
    codegen.store_config("k|x|m16", [64, 4, 3])
    codegen.set_kernel_dir(tmp_path / "other")
    assert codegen.lookup_config("k|x|m16") is None
    codegen.set_kernel_dir(tmp_path)  # re-read from disk, as a new process would
    assert codegen.lookup_config("k|x|m16") == [64, 4, 3]
    assert [codegen.m_bucket(m) for m in (1, 16, 17, 1000)] == [1, 16, 32, 1024]


def test_tuned_configs_are_per_shape(tmp_path, monkeypatch):
    """Two MLP shapes with one kernel signature (same block, dtype, activation) get their own tuned
    configs: the first shape tuned must not set the config of the other (it did before round 6)."""
    codegen.set_kernel_dir(tmp_path)
    monkeypatch.setattr(tune, "_may_tune", lambda: True)
    sigs = [codegen.signature(plan_for(torch.zeros(1, 64), make(64, h, gated=True, bias=False, dtype=torch.float32,
                                                                 block=(16, 16)), "silu", (16, 16)).pattern,
                              "silu", True, False, False, torch.float32) for h in (128, 256)]
    assert sigs[0] == sigs[1]  # the signature does not know the layer's dims
    fastest = {(64, 128, 64): (64, 4, 3), (64, 256, 64): (128, 8, 3)}
    for shape, best in fastest.items():
        seen = []

        def fake_time(fn, **kw):  # times the config the launcher was just called with
            fn()
            return 0.0 if seen[-1] == best else 1.0

        monkeypatch.setattr(tune, "_graph_time", fake_time)
        got = tune._choose("hidden", sigs[0], 4096, [(64, 4, 3), (128, 8, 3)], seen.append, shape=shape)
        assert tuple(got) == best, shape
    for shape, best in fastest.items():  # persisted, one entry per shape
        assert tuple(codegen.lookup_config(tune.tuning_key("hidden", sigs[0], 4096, shape))) == best


def test_config_list_is_built_only_when_tuning(tmp_path, monkeypatch):
    """``_choose`` takes the candidate configs as a function (building the prefill list costs ~9 µs
    per launch): called on a miss, never once the plan's memo or the table answers."""
    codegen.set_kernel_dir(tmp_path)
    monkeypatch.setattr(tune, "_may_tune", lambda: True)
    monkeypatch.setattr(tune, "_graph_time", lambda fn, **kw: (fn(), float(seen[-1][0]))[1])
    sig = codegen.signature(plan_for(torch.zeros(1, 64), make(64, 128, gated=True, bias=False, dtype=torch.float32,
                                                               block=(16, 16)), "silu", (16, 16)).pattern,
                            "silu", True, False, False, torch.float32)
    built, seen, memo = [], [], {}

    def configs():
        built.append(1)
        return [(128, 8, 3, 0), (64, 4, 3, 0)]

    for _ in range(3):
        assert tuple(tune._choose("down", sig, 4096, configs, seen.append, memo=memo)) == (64, 4, 3, 0)
    assert len(built) == 1  # tuned once; then the memo
    assert tuple(tune._choose("down", sig, 4096, configs, seen.append)) == (64, 4, 3, 0)
    assert len(built) == 1  # no memo: the persisted table


# --- GPU ------------------------------------------------------------------------------------------

GPU_FWD = list(itertools.product(
    [1, 16, 33, 300],  # decode, decode, prefill (odd), prefill
    [(False, "gelu_tanh"), (True, "silu"), (False, "relu2"), (True, "gelu")],
    [False, True],  # bias
    [torch.bfloat16, torch.float16],
))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,ga,bias,dtype", GPU_FWD)
def test_gpu_forward(m, ga, bias, dtype):
    gated, act = ga
    check_forward(m, 200, 520, gated, bias, act, dtype, (64, 32), "cuda", sparsity=0.7, seed=m)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block", [(32, 32), (64, 64), (128, 128), (16, 64)])
@pytest.mark.parametrize("m", [1, 1000])
def test_gpu_blocks_transposed_and_dead(block, m):
    check_forward(m, 384, 1024, True, True, "silu", torch.bfloat16, block, "cuda", sparsity=0.8,
                  dead_rows=True, transposed_w1=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [4, 257])
def test_gpu_packed(m):

    x, p, plan, y = check_forward(m, 256, 640, True, True, "silu", torch.bfloat16, (64, 64), "cuda")
    pk = gather.PackedMLP(plan.pattern, p["w1"].cpu(), p["w3"].cpu(), p["w2"].cpu())
    y2 = triton_mlp.forward_packed(x, pk.p1.cuda(), p["b1"], pk.p3.cuda(), p["b3"], pk.p2.cuda(), p["b2"], plan, "silu")
    torch.testing.assert_close(y2, y, **tol(torch.bfloat16))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,gated,bias,act,declare", [
    (8, True, True, "silu", False), (300, True, False, "silu", True),
    (77, False, True, "gelu_tanh", True), (16, False, False, "relu", False),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backward(m, gated, bias, act, declare, dtype):
    check_backward(m, 192, 448, gated, bias, act, dtype, (64, 32), "cuda", declare=declare, sparsity=0.7)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bm,dh_wide", [(64, True), (128, True), (64, False)])
@pytest.mark.parametrize("m,gated,bias,block", [(300, True, True, (64, 32)), (1000, True, False, (64, 64)),
                                                (77, False, True, (64, 64)), (2048, True, False, (128, 64))])
def test_gpu_wide_tiles(m, gated, bias, block, bm, dh_wide, monkeypatch):
    """Wide prefill/backward variants on the GPU (the tuner may pick them; tests run untuned)."""
    force_wide(monkeypatch, bm, dh_wide)
    act = "silu" if gated else "gelu_tanh"
    check_forward(m, 256, 704, gated, bias, act, torch.bfloat16, block, "cuda", sparsity=0.7, dead_rows=True)
    check_backward(m, 256, 704, gated, bias, act, torch.bfloat16, block, "cuda", declare=True, sparsity=0.7)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bm,nw", [(64, 4), (128, 4), (128, 8)])
@pytest.mark.parametrize("m,gated,bias,block,dtype", [
    (300, True, True, (64, 32), torch.bfloat16), (1000, True, False, (64, 64), torch.float16),
    (77, False, True, (64, 64), torch.bfloat16), (2048, True, False, (128, 64), torch.bfloat16)])
def test_gpu_tma_tiles(m, gated, bias, block, dtype, bm, nw, monkeypatch):
    """TMA prefill/backward variants on the GPU, ragged dims (200 = 3.1 blocks of 64), dead rows,
    packed weights; the tuner may pick them, tests run untuned."""
    force_tma(monkeypatch, bm, nw)
    seen = _count_tma(monkeypatch)
    act = "silu" if gated else "gelu_tanh"
    x, p, plan, y = check_forward(m, 200, 520, gated, bias, act, dtype, block, "cuda", sparsity=0.7, dead_rows=True)
    pk = gather.PackedMLP(plan.pattern, *(None if p[k] is None else p[k].cpu() for k in ("w1", "w3", "w2")))
    y2 = triton_mlp.forward_packed(x, pk.p1.cuda(), p["b1"], None if pk.p3 is None else pk.p3.cuda(), p["b3"],
                                   pk.p2.cuda(), p["b2"], plan, act, d_out=200)
    torch.testing.assert_close(y2, y, **tol(dtype))
    check_backward(m, 200, 520, gated, bias, act, dtype, block, "cuda", declare=True, sparsity=0.7)
    assert seen


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,bm,group", [(1000, 64, 4), (300, 128, 2), (2048, 128, 4)])
@pytest.mark.parametrize("force", [force_wide, force_tma])
def test_gpu_grouped_tiles(m, bm, group, force, monkeypatch):
    """Grouped program order on the GPU (16 tiles in groups of 4, 3 in groups of 2)."""
    force(monkeypatch, bm=bm, group=group)
    check_forward(m, 200, 520, True, True, "silu", torch.bfloat16, (64, 64), "cuda", sparsity=0.7, dead_rows=True)
    check_backward(m, 200, 520, True, True, "silu", torch.bfloat16, (64, 64), "cuda", declare=True, sparsity=0.7)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tied,block,m", [(True, (64, 64), 1000), (False, (64, 64), 3000), (True, (32, 64), 515)])
def test_gpu_dw_grouped(tied, block, m, monkeypatch):
    """Every dW config with G live blocks of a block row per program (``SDDMM_CONFIGS``' 5th element, and
    G = 4, which no config lists), forced in turn, against the one-block config of the same step (same accumulation order: equal to
    bf16's last bit), with NaN-filled fresh buffers: tied (dual) and untied, ragged hidden (704), an M
    split (3000 rows, few blocks) and none. (The one-block kernels are checked against the reference
    elsewhere; over 3000 bf16 rows the reference's own rounding sits at that tolerance's edge.)"""
    monkeypatch.setattr(codegen, "lookup_config", lambda key: None)
    monkeypatch.setattr(configs, "SDDMM_MIN_ROWS", 256 if m == 3000 else 1 << 20)  # split over M or not
    monkeypatch.setattr(backward_ops, "torch", _NanEmpty())
    p = make(256, 704, gated=True, bias=False, dtype=torch.bfloat16, block=block, device="cuda", tied=tied,
             dead_rows=True, sparsity=0.6)
    for name, (bo, bi) in (("w1", block), ("w3", block), ("w2", block[::-1])):
        mk = p["w1"]._blast_mask[0] if (name == "w3" and tied) else _block_mask(p[name], bo, bi)
        masks.declare_mask(p[name], mk, (bo, bi))
    x, dy = (torch.randn(m, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    plan = plan_for(x, p, "silu", block)
    for cfg in [c for c in configs.SDDMM_CONFIGS if configs.DwTile.of(c).blocks > 1] + [(64, 8, 3, 0, 4)]:
        got = []
        for c in (cfg[:3] + (0,), cfg):
            monkeypatch.setattr(configs, "SDDMM_CONFIGS", [c])
            plan.cache.clear()
            got.append(triton_mlp.backward(dy, x, *args(p), plan, "silu", [True] * 7))
        for k in ("w1", "w3", "w2"):
            assert got[1][k].isfinite().all(), (cfg, k)
            torch.testing.assert_close(got[1][k], got[0][k], rtol=1e-2, atol=1e-2, msg=lambda e: f"{cfg} {k}: {e}")
    for name in ("w1", "w3", "w2"):
        masks.clear_mask(p[name])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("gated,block,m", [(True, (128, 128), 1000), (False, (64, 64), 300), (True, (64, 32), 257)])
def test_gpu_kernel1_reads_saved_preacts(gated, block, m, monkeypatch):
    """Backward kernel 1 reading the forward's pre-activations (``LOAD_PRE``), each config of its list
    forced in turn (ragged hidden 704, dead rows, biases): the same gradients as recomputing them."""
    monkeypatch.setenv("BLAST_TUNE", "0")
    monkeypatch.setattr(codegen, "lookup_config", lambda key: None)
    act = "silu" if gated else "gelu_tanh"
    p = make(256, 704, gated=gated, bias=True, dtype=torch.bfloat16, block=block, device="cuda", sparsity=0.7,
             dead_rows=True)
    ws = [k for k in ("w1", "w3", "w2") if p[k] is not None]
    for k in ws:
        bo, bi = block if k != "w2" else block[::-1]
        masks.declare_mask(p[k], _block_mask(p[k], bo, bi), (bo, bi))
    x, dy = (torch.randn(m, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    plan = plan_for(x, p, act, block)
    want = triton_mlp.backward(dy, x, *args(p), plan, act, [True] * 7)
    for cfg in list(configs.BACKWARD_PRE_CONFIGS):
        monkeypatch.setattr(configs, "BACKWARD_PRE_CONFIGS", [cfg])
        plan.cache.clear()
        _, s = triton_mlp.forward(x, *args(p), plan, act, keep=2)
        got = triton_mlp.backward(dy, x, *args(p), plan, act, [True] * 7, s)
        for k, v in want.items():
            if v is not None:
                torch.testing.assert_close(got[k].float(), v.float(), rtol=2e-2, atol=2e-2,
                                           msg=lambda e: f"{cfg} {k}: {e}")
    for k in ws:
        masks.clear_mask(p[k])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bm,nw", [(128, 8), (256, 8), (64, 4)])
@pytest.mark.parametrize("m,block,dtype", [(1000, (128, 128), torch.bfloat16), (300, (64, 32), torch.float16)])
def test_gpu_dx_two_loops(m, block, dtype, bm, nw, monkeypatch):
    """dX's two-loop TMA variant (the tuner may pick it; forced here) at the block sizes it is for,
    ragged hidden size (704 = 5.5 blocks of 128), tied masks, dead rows. Only dX is forced (kernel 1 and
    dW keep their first configs: 256-row tiles are not among theirs)."""
    monkeypatch.setattr(configs, "PREFILL_CONFIGS", [(bm, nw, 3, configs.TWO_LOOPS)])
    seen = _count_tma(monkeypatch)
    check_backward(m, 256, 704, True, False, "silu", dtype, block, "cuda", declare=True, tied=True,
                   dead_rows=True, sparsity=0.7)
    assert seen


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,bias,block", [(3000, False, (64, 64)), (515, True, (32, 64)), (2048, False, (128, 64))])
def test_gpu_backward_tied_dead_split(m, bias, block):
    """Training's case: tied gate/up masks, few live blocks over a long M (dW split over M), dead columns."""
    check_backward(m, 256, 704, True, bias, "silu", torch.bfloat16, block, "cuda", declare=True, tied=True,
                   dead_rows=True, sparsity=0.8)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dw", [(64, 8, 3, 0), (64, 8, 2, 1), (32, 8, 3, 1)])
@pytest.mark.parametrize("bwd", [(64, 8, 2, 0), (64, 8, 2, 1), (64, 8, 2, 3)])
def test_gpu_eight_warp_configs_128_blocks(dw, bwd, monkeypatch):
    """The 8-warp dW and backward-kernel-1 configs added for 128x128 blocks (the tuner may pick them;
    tests run untuned: forced), tied masks, ragged hidden size (704 = 5.5 blocks)."""
    monkeypatch.setattr(configs, "SDDMM_CONFIGS", [dw])
    monkeypatch.setattr(configs, "BACKWARD_CONFIGS", [bwd])
    check_backward(1000, 256, 704, True, False, "silu", torch.bfloat16, (128, 128), "cuda", declare=True, tied=True,
                   sparsity=0.5)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,path", [(1, "sliced"), (16, "sliced"), (1, "splitk"), (16, "splitk"), (1, "sliced_pf"),
                                    (16, "sliced_pf"), (200, "")])
def test_gpu_cuda_graph_replay(m, path, monkeypatch):
    """No host syncs after the first call: the forward captures into a CUDA graph and replays fresh
    inputs (both decode paths; their kernel 2 is a programmatic dependent launch that prefetches W2
    before waiting)."""
    monkeypatch.setattr(configs, "DECODE_PATH", path)
    x, p, plan, _ = check_forward(m, 256, 640, True, False, "silu", torch.bfloat16, (64, 64), "cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        triton_mlp.forward(x, *args(p), plan, "silu")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = triton_mlp.forward(x, *args(p), plan, "silu")
    x.copy_(torch.randn_like(x))
    with torch.no_grad():
        p["w1"].mul_(1.5)  # values are read fresh from the dense weight
    for _ in range(3):
        g.replay()
        torch.testing.assert_close(out, dense_mlp(x, *args(p), "silu"), **tol(torch.bfloat16))
        x.copy_(torch.randn_like(x))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
def test_gpu_nonfinite_rows(m):
    check_nonfinite(m, "cuda", torch.bfloat16, (64, 64), sparsity=0.7)
    check_nonfinite(m, "cuda", torch.bfloat16, (64, 64), d=1000, sparsity=0.7)  # four flag slices, ragged


@gpu
@pytest.mark.gpu
def test_gpu_decode_alternating_m():
    """Alternate M (decode and the M=32/33 border) on one plan, every call exact."""
    x, p, plan, _ = check_forward(16, 256, 640, True, True, "silu", torch.bfloat16, (64, 32), "cuda")
    for m in (1, 7, 32, 2, 16, 33, 3):
        xm = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(triton_mlp.forward(xm, *args(p), plan, "silu"), dense_mlp(xm, *args(p), "silu"),
                                   **tol(torch.bfloat16))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["splitk", "sliced", "sliced_pf"])
def test_gpu_decode_repeat_ragged_bias(dtype, path, monkeypatch):
    """Round 2's failing case (biases, (64, 32) blocks, 200 -> 520), called 60 times on one plan."""
    monkeypatch.setattr(configs, "DECODE_PATH", path)
    plan = check_decode_repeat("cuda", dtype, 200, 520, (64, 32), (1, 16, 3, 32, 7), 60, bitwise=path != "splitk",
                               sparsity=0.7)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("gemv", [1, 0])
@pytest.mark.parametrize("cfg", [(1, 1, 2, 0), (1, 1, 2, 1), (2, 1, 2, 2), (2, 2, 4, 2)])
def test_gpu_decode_splitk_configs(gemv, cfg, monkeypatch):
    """Split-K decode at M = 1 (the GEMV or 16-row dots) in every early-launch mode and with padded
    chunk tables: right, and called again right (its scratch was re-zeroed)."""
    force_splitk(monkeypatch, GEMV_MAX_M=gemv, **{"DECODE_GEMV_CONFIGS" if gemv else "DECODE_CONFIGS": [cfg]})
    check_decode_repeat("cuda", torch.bfloat16, 200, 520, (64, 32), (1, 1, 1), 3, bitwise=False, sparsity=0.7)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(16, 4, 4, 2, 2), (16, 2, 4, 2, 4), (16, 1, 4, 3, 4), (32, 2, 4, 2, 8)])
def test_gpu_decode_split_y(cfg, monkeypatch):
    """The sliced decode with ``bsmm``'s reduction split over programs: eager's answer at every decode M, bitwise
    repeatable over 60 calls on one plan (biases, ragged (64, 32) blocks, dead rows), NaN rows, and on an
    8B-sized MLP (a grid of many waves) under CUDA-graph replay with fresh inputs, the same bits as eager calls."""
    force_split_y(monkeypatch, cfg)
    check_decode_repeat("cuda", torch.bfloat16, 200, 520, (64, 32), (1, 16, 3, 32, 7), 60, sparsity=0.7)
    check_nonfinite(16, "cuda", torch.bfloat16, (64, 64), sparsity=0.7)
    p = make(4096, 14336, gated=True, bias=False, dtype=torch.bfloat16, block=(64, 64), device="cuda",
             sparsity=0.9, tied=True)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    plan = plan_for(x, p, "silu", (64, 64))
    y = triton_mlp.forward(x, *args(p), plan, "silu")
    torch.testing.assert_close(y, dense_mlp(x, *args(p), "silu"), **tol(torch.bfloat16))
    assert [k for k in plan.cache if isinstance(k, tuple) and k[0] == "dec_scratch_y"]
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        triton_mlp.forward(x, *args(p), plan, "silu")
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = triton_mlp.forward(x, *args(p), plan, "silu")
    for _ in range(20):
        x.copy_(torch.randn_like(x))
        g.replay()
        assert torch.equal(out, triton_mlp.forward(x, *args(p), plan, "silu"))
        torch.testing.assert_close(out, dense_mlp(x, *args(p), "silu"), **tol(torch.bfloat16))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("path", ["splitk", "sliced", "sliced_pf"])
def test_gpu_forward_decode_seeds(seed, path, monkeypatch):
    """Decode with biases on ragged (64, 32) blocks over several random patterns (fresh weights each)."""
    monkeypatch.setattr(configs, "DECODE_PATH", path)
    for m in (1, 16):
        check_forward(m, 200, 520, True, True, "silu", torch.bfloat16, (64, 32), "cuda", sparsity=0.7, seed=100 + seed)


@gpu
@pytest.mark.gpu
def test_gpu_op_end_to_end_autograd():
    """torch.ops.blast.sparse_mlp on CUDA (forward + backward) against eager autograd."""
    import blast_compile.ops.sparse_mlp  # noqa: F401  (registers the op)

    p = make(256, 512, gated=True, bias=True, dtype=torch.bfloat16, block=(64, 64), device="cuda", sparsity=0.8)
    p = {k: (v.requires_grad_(True) if v is not None else None) for k, v in p.items()}
    x = torch.randn(4, 33, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pat = pattern_from_weights(p["w1"], p["w3"], p["w2"], 64, 64, activation="silu", has_b1=True, has_b3=True)
    y = torch.ops.blast.sparse_mlp(x, *args(p), "silu", 64, 64, pat.key, 1.0)
    r = dense_mlp(x, *args(p), "silu")
    torch.testing.assert_close(y, r, **tol(torch.bfloat16))
    gy = torch.randn_like(y)
    ins = [x] + [v for v in args(p) if v is not None]
    g1 = torch.autograd.grad(y, ins, gy)
    g2 = torch.autograd.grad(r, ins, gy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("m", [0, 7])
def test_train_op_cpu(m):
    """Off CUDA blast::sparse_mlp_train keeps nothing ([0, rows, hidden]) and the backward recomputes: the same output
    and gradients as blast::sparse_mlp; no rows with declared masks too (the dense fallback's masked dW
    once failed to reshape 0 rows)."""
    p = make(256, 704, gated=True, bias=False, dtype=torch.float32, block=(64, 64), device="cpu", sparsity=0.7)
    for name in ("w1", "w3", "w2"):
        masks.declare_mask(p[name], _block_mask(p[name], 64, 64), (64, 64))
    p = {k: (v.requires_grad_(True) if v is not None else None) for k, v in p.items()}
    pat = pattern_from_weights(p["w1"], p["w3"], p["w2"], 64, 64, activation="silu", has_b1=False, has_b3=False)
    x = torch.randn(m, 256, requires_grad=True)
    ins = [x] + [v for v in args(p) if v is not None]
    y1, h = torch.ops.blast.sparse_mlp_train(x, *args(p), "silu", 64, 64, pat.key, 1.0)
    y2 = torch.ops.blast.sparse_mlp(x, *args(p), "silu", 64, 64, pat.key, 1.0)
    assert h.shape == (0, m, 704)
    torch.testing.assert_close(y1, y2)
    gy = torch.randn_like(y1)
    for a, b in zip(torch.autograd.grad(y1, ins, gy), torch.autograd.grad(y2, ins, gy)):
        torch.testing.assert_close(a, b)
    for name in ("w1", "w3", "w2"):
        masks.clear_mask(p[name])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,declare,autocast,save", [(300, True, False, 2), (300, True, False, 1), (5, True, False, 2),
                                                      (300, False, False, 2), (257, True, True, 2), (0, True, False, 2)])
def test_gpu_train_op_saved_hidden(m, declare, autocast, save):
    """blast::sparse_mlp_train (save 1: the forward's H kept for dW2; 2: and the pre-activations for
    kernel 1) against blast::sparse_mlp: same output and gradients; 5 rows (decode-sized: the prefill
    kernels run to make H), undeclared masks (dense dW: H unused), fp32 masters under bf16 autocast,
    no rows."""
    from torch._dynamo.utils import counters

    dt = torch.float32 if autocast else torch.bfloat16
    p = make(256, 704, gated=True, bias=False, dtype=dt, block=(64, 64), device="cuda", sparsity=0.7)
    if declare:
        for name in ("w1", "w3", "w2"):
            masks.declare_mask(p[name], _block_mask(p[name], 64, 64), (64, 64))
    p = {k: (v.requires_grad_(True) if v is not None else None) for k, v in p.items()}
    pat = pattern_from_weights(p["w1"], p["w3"], p["w2"], 64, 64, activation="silu", has_b1=False, has_b3=False)
    extra = (torch.bfloat16,) if autocast else ()
    x = torch.randn(m, 256, device="cuda", dtype=dt, requires_grad=True)
    ins = [x] + [v for v in args(p) if v is not None]
    used, pre = counters["blast"]["saved_hidden_used"], counters["blast"]["saved_pre_used"]
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        y1, h = torch.ops.blast.sparse_mlp_train(x, *args(p), "silu", 64, 64, pat.key, 1.0, *extra, save=save)
        y2 = torch.ops.blast.sparse_mlp(x, *args(p), "silu", 64, 64, pat.key, 1.0, *extra)
    assert h.shape == (3 if save == 2 else 1, m, 704)
    torch.testing.assert_close(y1, y2, **tol(torch.bfloat16))  # (5 rows: decode kernels vs prefill kernels)
    gy = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, ins, gy)
    g2 = torch.autograd.grad(y2, ins, gy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    assert counters["blast"]["saved_hidden_used"] - used == (1 if declare and m else 0)
    assert counters["blast"]["saved_pre_used"] - pre == (1 if m and save == 2 else 0)
    for name in ("w1", "w3", "w2"):
        masks.clear_mask(p[name])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("save", ["all", True])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_training_steps_compiled(mode, save):
    """A few optimizer steps of a masked SwiGLU MLP under ``torch.compile(backend="blast")``
    (with CUDA graphs too: the backward's dW tables are built outside the graph pool) track eager
    training of the same masked MLP; pruned blocks stay zero."""
    torch.manual_seed(0)
    mods = [SwiGLU(256, 704).cuda().to(torch.bfloat16) for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    g = torch.Generator().manual_seed(1)
    mk = random_block_mask(704 // 64, 256 // 64, 0.8, g).cuda()
    md = random_block_mask(256 // 64, 704 // 64, 0.8, g).cuda()
    for mod in mods:
        for lin, m in ((mod.gate_proj, mk), (mod.up_proj, mk), (mod.down_proj, md)):
            with torch.no_grad():
                lin.weight.mul_(expand_mask(m, 64, 64, lin.weight.shape).to(lin.weight.dtype))
            masks.declare_mask(lin.weight, m, (64, 64))
    torch._dynamo.reset()
    # save_hidden "all": the forward's pre-activations reach kernel 1; True ("auto") keeps H only at this
    # size (live width 4 x 0.2 x 64 < 256). torch.compile takes a mode or options: the mode goes in as options
    mode_opts = torch._inductor.list_mode_options(mode) if mode else {}
    run = torch.compile(mods[1], backend="blast", options={"save_hidden": save, **mode_opts})
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in mods]
    dense_mask = expand_mask(mk, 64, 64, (704, 256))
    for step in range(4):
        x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
        for f, mod, opt in ((mods[0], mods[0], opts[0]), (run, mods[1], opts[1])):
            loss = f(x).float().square().mean()
            loss.backward()
            for lin in (mod.gate_proj, mod.up_proj):  # eager: W * mask has no gradient off the mask
                lin.weight.grad.mul_(dense_mask.to(lin.weight.grad.dtype))
            mod.down_proj.weight.grad.mul_(expand_mask(md, 64, 64, (256, 704)).to(torch.bfloat16))
            opt.step()
            opt.zero_grad(set_to_none=True)
        for a, b in zip(mods[0].parameters(), mods[1].parameters()):
            torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-3, msg=lambda s: f"step {step}: {s}")
    assert (mods[1].gate_proj.weight[~dense_mask] == 0).all()
    assert torch._dynamo.utils.counters["blast"]["mlp_fused"] >= 1
    # the compiled training graph kept the forward's H for dW2 (blast::sparse_mlp_train)
    assert torch._dynamo.utils.counters["blast"]["save_hidden"] >= 1
    assert torch._dynamo.utils.counters["blast"]["saved_hidden_used"] >= 1
    assert (torch._dynamo.utils.counters["blast"]["saved_pre_used"] >= 1) == (save == "all")
    assert (torch._dynamo.utils.counters["blast"]["save_preacts"] >= 1) == (save == "all")
    for mod in mods:
        for lin in (mod.gate_proj, mod.up_proj, mod.down_proj):
            masks.clear_mask(lin.weight)
