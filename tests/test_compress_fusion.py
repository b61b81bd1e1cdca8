"""Compressed MLPs (``compress_``: packed ``block_linear`` layers) fuse into one ``blast::packed_mlp`` node.

The passes run on captured Dynamo graphs (no Inductor: fast); one end-to-end
``torch.compile(backend="blast")`` on Llama. The fused graph must compute what the
compressed model computes eagerly, and what the dense model computed.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from _capture import capture
from blast_compile import compress as C
from blast_compile.config import BlastOptions
from blast_compile.ops import packed_mlp as P
from blast_compile.passes import run_passes
from blast_compile.testing import sparsify_mlps_
from conftest import skip_if_old_interpreter, tol

transformers = pytest.importorskip("transformers")

PACKED = torch.ops.blast.packed_mlp.default
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


class PlainMLP(nn.Module):
    def __init__(self, d=48, h=96):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, h), nn.Linear(h, d), nn.ReLU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _llama(layers=2):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=64, use_cache=False)
    return Logits(transformers.LlamaForCausalLM(cfg).eval()), (torch.randint(0, 97, (2, 9)),), layers


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=64, use_cache=False)
    return Logits(transformers.GPT2LMHeadModel(cfg).eval()), (torch.randint(0, 97, (2, 9)),), 2


def _plain():
    return PlainMLP().eval(), (torch.randn(3, 5, 48),), 1


def _compressed(arch, seed=0, **kw):
    """(dense model, compressed model, inputs, number of MLPs)."""
    torch.manual_seed(seed)
    model, inputs, n = {"llama": _llama, "gpt2": _gpt2, "plain": _plain}[arch]()
    sparsify_mlps_(model, 0.75, block=16, seed=seed)
    dense = copy.deepcopy(model)
    rep = C.compress_(model, **kw)
    assert len(rep.compressed) == n
    return dense, model, inputs, n


def _fuse(model, inputs, dynamic=False):
    with torch.no_grad():
        gm, ex = capture(model, *inputs, dynamic=dynamic)
        counters.clear()
        cands = run_passes(gm, ex, BlastOptions())
    return gm, [int(e) if isinstance(e, torch.SymInt) else e for e in ex], cands


def _blast():
    return {k: v for k, v in counters["blast"].items() if v}


@pytest.mark.parametrize("arch,shared,dynamic", [("llama", None, False), ("llama", True, False), ("gpt2", None, False),
                                                  ("gpt2", None, True), ("plain", None, False)])
def test_compressed_mlps_fuse_as_packed(arch, shared, dynamic):
    dense, model, inputs, n = _compressed(arch, shared_gate_up=shared)
    gm, ex, cands = _fuse(model, inputs, dynamic)
    assert _blast() == {"mlp_candidates": n, "mlp_fused": n, "mlp_fused_packed": n}, [c.reason for c in cands]
    assert [c.decision for c in cands] == ["fused"] * n
    targets = [n_.target for n_ in gm.graph.nodes if n_.op == "call_function"]
    assert targets.count(PACKED) == n and not any("block_linear" in str(t) for t in targets)
    gated = arch == "llama"
    for c in cands:
        assert c.kind == ("gated" if gated else "plain") and c.kernel == "packed"
        assert c.activation == {"llama": "silu", "gpt2": "gelu_tanh", "plain": "relu"}[arch]
        assert c.block == (16, 16) and 0.5 < c.sparsity < 0.9 and "compressed (packed)" in c.reason
        assert (c.d_in, c.hidden, c.d_out) == {"llama": (64, 192, 64), "gpt2": (48, 192, 48), "plain": (48, 96, 48)}[arch]
    with torch.no_grad():
        out = gm(*ex)[0]
        eager = model(*inputs)
        ref = dense(*inputs)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol(torch.float32))


def test_compile_compressed_llama_end_to_end():
    dense, model, inputs, n = _compressed("llama", seed=1)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        out = torch.compile(model, backend="blast", options={"strict": True})(*inputs)
        eager, ref = model(*inputs), dense(*inputs)
    torch._dynamo.reset()
    assert counters["blast"]["mlp_fused_packed"] == n and counters["blast"]["mlp_fused"] == n
    assert counters["blast"]["mlp_dense"] == 0 and counters["blast"]["fallback"] == 0
    torch.testing.assert_close(out, eager, **tol(torch.float32))
    torch.testing.assert_close(out, ref, **tol(torch.float32))


def test_mixed_block_shapes_stay_unfused_with_reason():
    _, model, inputs, _ = _compressed("plain")
    fc2 = model.fc2  # re-pack W2 with its blocks transposed: (16, 32) is not (bd, bh) = (16, 16) of fc1
    w = fc2.to_dense()
    model.fc2 = C.BlockSparseLinear.from_dense(w, fc2.bias, (16, 32), role="fc2", mlp_block=(16, 16))
    with torch.no_grad():
        gm, ex = capture(model, *inputs)
        before = gm.code
        counters.clear()
        (c,) = run_passes(gm, ex, BlastOptions())
        out = gm(*ex)[0]
        eager = model(*inputs)
    assert c.decision == "dense" and "block shape" in c.reason and "16x32" in c.reason, c.reason
    assert _blast() == {"mlp_candidates": 1, "mlp_dense": 1, "dense_block_shape": 1}
    assert gm.code == before
    torch.testing.assert_close(out, eager)


def test_mixed_packed_and_dense_layers_stay_unfused():
    _, model, inputs, _ = _compressed("plain")
    fc2 = model.fc2
    model.fc2 = nn.Linear(96, 48)
    with torch.no_grad():
        model.fc2.weight.copy_(fc2.to_dense())
        model.fc2.bias.copy_(fc2.bias)
    _, _, (c,) = _fuse(model, inputs)
    assert c.decision == "dense" and _blast() == {"mlp_candidates": 1, "mlp_dense": 1, "dense_packed_mixed": 1}


def test_grad_mode_stays_unfused_and_op_refuses_backward():
    _, model, inputs, _ = _compressed("plain")
    gm, ex = capture(model, *inputs)  # grad enabled, blocks require grad: eager block_linear trains
    (c,) = run_passes(gm, ex, BlastOptions())
    assert c.decision == "dense" and "inference-only" in c.reason and counters["blast"]["dense_requires_grad"] == 1
    args = _op_args(model, inputs[0])
    y = torch.ops.blast.packed_mlp(*args)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


def _op_args(model, x, act="relu"):
    w1, w2 = model.fc1, model.fc2
    bh, bd = w1.block
    key = P.pattern_key(bh, bd, w1.in_features, w1.out_features, w2.out_features,
                        (w1.row_ptr, w1.col_idx, None, None, w2.row_ptr, w2.col_idx))
    return (x, w1.blocks, w1.row_ptr, w1.col_idx, w1.bias, None, None, None, None, w2.blocks, w2.row_ptr,
            w2.col_idx, w2.bias, act, bh, bd, w1.out_features, w2.out_features, key)


@torch.no_grad()
def test_op_follows_in_place_changes_of_blocks_and_index():
    """The plan is cached per (key, identity, _version): in-place edits are seen, never stale."""
    _, model, (x,), _ = _compressed("plain")
    args = _op_args(model, x)
    op = torch.ops.blast.packed_mlp
    torch.testing.assert_close(op(*args), model(x), rtol=1e-6, atol=1e-6)
    model.fc1.blocks.mul_(-2.0)  # values only
    torch.testing.assert_close(op(*args), model(x), rtol=1e-6, atol=1e-6)
    assert counters["blast"]["packed_blocks_refreshed"] == 1
    w2 = model.fc2  # move W2's first live block of each block-row to a column the row does not hold
    mask = w2.block_mask()
    for r in range(mask.shape[0]):
        lo, hi = int(w2.row_ptr[r]), int(w2.row_ptr[r + 1])
        free = (~mask[r]).nonzero().flatten()
        if hi > lo and free.numel():
            w2.col_idx[lo] = int(free[0])
    order = torch.cat([torch.sort(w2.col_idx[int(w2.row_ptr[r]):int(w2.row_ptr[r + 1])]).indices + int(w2.row_ptr[r])
                       for r in range(mask.shape[0])])  # keep CSR rows sorted (blocks follow)
    w2.col_idx.copy_(w2.col_idx[order].clone())
    w2.blocks.copy_(w2.blocks[order].clone())
    assert not torch.equal(w2.block_mask(), mask)
    torch.testing.assert_close(op(*args), model(x), rtol=1e-6, atol=1e-6)
    assert counters["blast"]["pattern_changed"] == 1


@torch.no_grad()
def test_plan_matches_compress_packed_mlp():
    """The op's pattern and block order are ``compress.packed_mlp``'s (what forward_packed is tested with)."""
    for shared in (True, False):
        _, model, _, _ = _compressed("llama", shared_gate_up=shared)
        mlp = model.model.model.layers[0].mlp
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        pat, p1, _, p3, _, p2, _ = C.packed_mlp(g, u, d, "silu")
        idx = (g.row_ptr, g.col_idx, u.row_ptr, u.col_idx, d.row_ptr, d.col_idx)
        key = P.pattern_key(16, 16, 64, 192, 64, idx)
        plan = P.packed_plan(g.blocks, g.row_ptr, g.col_idx, None, u.blocks, u.row_ptr, u.col_idx, None, d.blocks,
                         d.row_ptr, d.col_idx, None, "silu", 16, 16, 64, 192, 64, key)
        blk = P.blocks_in_order(plan, g.blocks, u.blocks, d.blocks)
        assert plan.pattern.key == pat.key
        for a, b in ((blk.p1, p1), (blk.p3, p3), (blk.p2, p2)):
            assert torch.equal(a, b)
        # stored blocks used in place exactly when compress.packed_mlp does (same order, nothing dropped)
        assert (blk.p1 is g.blocks) == (p1 is g.blocks) and (blk.p2 is d.blocks) == (p2 is d.blocks)
        assert shared or blk.p1 is not g.blocks


def test_explain_shows_packed_mlps():
    import blast_compile

    _, model, inputs, n = _compressed("llama", seed=2)
    torch._dynamo.reset()
    rep = blast_compile.explain(model, *inputs, options={"inductor": False})
    torch._dynamo.reset()
    assert len(rep.fused) == n and all(c.kernel == "packed" for c in rep.fused)
    text = rep.table(width=200)  # (str() wraps at the terminal's width, which a pytest worker may set low)
    assert f"{n} of {n} MLPs fused" in text and "compressed (packed)" in text and "packed_mlp" in rep.graph_code()


INTERP = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packed_case(arch):
    """(the compressed MLP module, its w1, w3, w2 layers, activation, packed_mlp's plan for them)."""
    _, model, _, _ = _compressed(arch)
    mlp = next(m for m in model.modules() if hasattr(m, "_blast_mlp"))
    r = {k: model.get_submodule(q) for k, q in mlp._blast_mlp["roles"].items()}
    w1, w3, w2 = r.get("gate", r.get("fc1")), r.get("up"), r.get("down", r.get("fc2"))
    act = "silu" if w3 is not None else "relu"
    idx = [t for m in (w1, w3, w2) for t in _layer(m)[1:3]]
    key = P.pattern_key(*w1.block, w1.in_features, w1.out_features, w2.out_features, idx)
    plan = P.packed_plan(*_layer(w1), *_layer(w3), *_layer(w2), act, *w1.block, w1.in_features, w1.out_features,
                         w2.out_features, key)
    return mlp, w1, w3, w2, act, plan


def _layer(m):
    return (m.blocks, m.row_ptr, m.col_idx, m.bias) if m is not None else (None,) * 4


@pytest.mark.skipif(not INTERP, reason="runs in a child process under TRITON_INTERPRET=1 (test_triton_path_interpreted)")
@pytest.mark.parametrize("arch", ["plain", "llama"])
@torch.no_grad()
def test_interp_triton_forward_packed(arch):
    """The CUDA branch (plan -> triton_mlp.forward_packed) on CPU tensors, against the eager chain."""
    mlp, w1, w3, w2, act, plan = _packed_case(arch)
    for m in (3, 37):  # decode and prefill paths
        x = torch.randn(m, w1.in_features)
        blk = P.blocks_in_order(plan, w1.blocks, _layer(w3)[0], w2.blocks)
        y = P._triton_forward(x, plan, blk, w1.bias, _layer(w3)[3], w2.bias, act, w2.out_features)
        torch.testing.assert_close(y, mlp(x), **tol(torch.float32))


@pytest.mark.skipif(not INTERP, reason="runs in a child process under TRITON_INTERPRET=1 (test_triton_path_interpreted)")
@pytest.mark.parametrize("arch", ["plain", "llama"])
@torch.no_grad()
def test_interp_lowered_packed_matches_the_chain(arch):
    """blast::mlp_packed's body as the compile-time warm-up runs it (passes/lower._lower_packed): the plan's
    re-packed copies, where the stored order is not the pattern's, read from the plan's cache (graph tables)."""
    import copy as _copy

    from blast_compile.ops import launch, lowered

    mlp, w1, w3, w2, act, base = _packed_case(arch)
    plan = _copy.copy(base)
    plan.cache = {"d_hidden": w1.out_features, "d_out": w2.out_features, "blocks": list(base.copies)}
    for m in (3, 37):
        x = torch.randn(m, w1.in_features)
        with launch.lowering("warm"):
            y = lowered.run_packed(plan, x, w1.blocks, w1.bias, _layer(w3)[0], _layer(w3)[3], w2.blocks, w2.bias, act,
                                   w2.out_features)
        torch.testing.assert_close(y, mlp(x), **tol(torch.float32))


def test_triton_path_interpreted(tmp_path):
    if INTERP:
        pytest.skip("already in the interpreter child")
    skip_if_old_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1", BLAST_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "interp_",
                        os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "4 passed" in r.stdout, r.stdout[-2000:]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_compressed_llama_compiles(dtype):
    dense, model, inputs, n = _compressed("llama", seed=3)
    model, dense = model.to("cuda", dtype), dense.to("cuda", dtype)
    ids = inputs[0].cuda()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="blast", options={"strict": True})(ids)
        eager, ref = model(ids), dense(ids)
    torch._dynamo.reset()
    assert counters["blast"]["mlp_fused_packed"] == n
    assert counters["blast"]["lowered_packed"] == n  # (Inductor launches the kernels: no Python per call)
    torch.testing.assert_close(out, eager, **tol(dtype))
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)  # dense: other summation order
