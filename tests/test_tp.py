"""Tensor parallelism of block-sparse MLPs: hidden-block balancing, DTensor sharding of
``blast::sparse_mlp``, TP-sharded models vs the single-process model.

Multi-rank tests spawn 2 CPU processes (gloo, 127.0.0.1, a free port); every
rank builds the same unsharded model from one seed, keeps a copy as the
reference and checks its sharded output against it.
"""
import os
import socket
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import blast_compile  # noqa: F401  (registers the op)
from blast_compile import distributed as bd
from blast_compile.formats import expand_mask
from blast_compile.testing import SwiGLU

# --------------------------------------------------------------------------- models


class FcMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.norm = nn.LayerNorm(mlp_dim(mlp))
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def mlp_dim(mlp):
    g, _, _ = bd.mlp_projections(mlp)
    return g.in_features


def _skewed_mask(ro, ri, sparsity, along_rows, gen):
    """Block mask with ~(1-sparsity) live blocks, crowded into the first hidden blocks."""
    n_h = ro if along_rows else ri
    skew = torch.linspace(4.0, 0.25, n_h)  # hidden block 0 is ~16x likelier live than the last
    score = torch.rand(ro, ri, generator=gen) * (skew[:, None] if along_rows else skew[None, :])
    m = torch.zeros(ro * ri, dtype=torch.bool)
    m[score.flatten().topk(max(1, round((1 - sparsity) * ro * ri))).indices] = True
    return m.reshape(ro, ri)


@torch.no_grad()
def skew_sparsify_(mlp, sparsity=0.9, block=(16, 16), seed=0):
    """Zero ``sparsity`` of the blocks of every projection, skewed along the hidden dim;
    gate and up share their live blocks (as a sparsifier leaves them)."""
    g, u, d = bd.mlp_projections(mlp)
    bh, bdim = block
    gen = torch.Generator().manual_seed(seed)
    m_in = _skewed_mask(g.out_features // bh, g.in_features // bdim, sparsity, True, gen)
    # down: its own random blocks, but only in hidden blocks the in-projection uses (a hidden
    # block dead on one side is dead on both after fusion, and would cost nothing)
    m_dn = _skewed_mask(d.out_features // bdim, d.in_features // bh, sparsity, False, gen)
    m_dn = (m_dn & m_in.any(1)[None, :]) | m_in.t()
    for lin in (g, u):
        if lin is not None:
            lin.weight.mul_(expand_mask(m_in, bh, bdim, lin.weight.shape).to(lin.weight.dtype))
    d.weight.mul_(expand_mask(m_dn, bdim, bh, d.weight.shape).to(d.weight.dtype))


def make_model(kind, d=64, h=512, seed=0):
    torch.manual_seed(seed)
    mlp = SwiGLU(d, h) if kind == "llama" else FcMLP(d, h)
    skew_sparsify_(mlp, 0.9, (16, 16), seed)
    return Block(mlp)


# --------------------------------------------------------------------------- single-process tests


@pytest.mark.parametrize("kind", ["llama", "fc"])
@pytest.mark.parametrize("ws", [2, 4])
def test_balance_keeps_function_and_improves(kind, ws):
    m = make_model(kind)
    ref = m.mlp
    import copy

    bal = copy.deepcopy(m.mlp)
    x = torch.randn(5, 64)
    rep = bd.balance_hidden_(bal, ws, block=(16, 16))
    torch.testing.assert_close(bal(x), ref(x), rtol=1e-5, atol=1e-5)
    assert rep.imbalance_after <= rep.imbalance_before
    assert sum(rep.load_after) == sum(rep.load_before) == int(rep.costs.sum())
    # the skewed pattern is badly split contiguously, and LPT fixes most of it
    assert rep.imbalance_before > 1.3, rep.summary()
    # greedy bound: no rank exceeds the mean by more than one hidden block's cost
    assert max(rep.load_after) <= sum(rep.load_after) / ws + int(rep.costs.max()), rep.summary()
    assert rep.imbalance_after - 1 < 0.25 * (rep.imbalance_before - 1), rep.summary()
    # the loads are what the permuted weights hold: recount on the new weights
    g, u, d = bd.mlp_projections(bal)
    costs = bd.hidden_block_costs(g.weight, u.weight if u is not None else None, d.weight, 16, 16)
    assert [int(c) for c in costs.reshape(ws, -1).sum(1)] == rep.load_after


def test_balance_weights_tuple_and_errors():
    m = make_model("fc")
    f = m.mlp
    w = (f.fc1.weight.detach().clone(), f.fc1.bias.detach().clone(), None, None, f.fc2.weight.detach().clone())
    rep = bd.balance_hidden_(w, 2, block=(16, 16))
    x = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(F.gelu(F.linear(x, w[0], w[1])), w[4], f.fc2.bias), f(x))
    assert sorted(rep.perm.tolist()) == list(range(32))
    with pytest.raises(ValueError, match="whole"):
        bd.balance_hidden_(w, 3, block=(16, 16))


def test_lpt_equal_bins():
    bins = bd.lpt_equal_bins([9, 1, 8, 2, 7, 3, 6, 4], 2)
    assert sorted(len(b) for b in bins) == [4, 4]
    loads = [sum([9, 1, 8, 2, 7, 3, 6, 4][j] for j in b) for b in bins]
    assert max(loads) - min(loads) <= 2


def test_balance_permutes_declared_masks():
    from blast_compile import masks

    m = make_model("llama").mlp
    for lin in (m.gate_proj, m.up_proj, m.down_proj):
        bo, bi = 16, 16
        from blast_compile.formats import block_mask

        masks.declare_mask(lin.weight, block_mask(lin.weight, bo, bi), (bo, bi))
    bd.balance_hidden_(m, 2, block=(16, 16))
    from blast_compile.formats import block_mask

    for lin in (m.gate_proj, m.down_proj):
        dm, _ = masks.declared_mask(lin.weight)
        assert torch.equal(dm | block_mask(lin.weight, 16, 16), dm)  # no live block outside the mask


def test_tp_plan_names():
    m = make_model("llama")
    assert bd.mlp_module_names(m) == ["mlp"]
    plan = bd.tp_plan(m, style="torch")
    assert set(plan) == {"mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert isinstance(bd.tp_plan(make_model("fc"))["mlp"], bd.BlastMLPParallel)


# --------------------------------------------------------------------------- 2-process tests


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, ws=2, *args):
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(ws, _free_port(), fn, args), nprocs=ws, join=True)


def _entry(rank, ws, port, fn, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ws)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        fn(rank, init_device_mesh("cpu", (ws,)), *args)
        dist.barrier()  # no rank tears gloo down while its peer still talks (SIGABRT otherwise)
    finally:
        dist.destroy_process_group()
    # Checks passed (a failure raised above and reaches mp.spawn). Leave without running
    # C++ static destructors: gloo's threads can abort there ("terminate called without an
    # active exception"), a teardown flake seen in about 1 of 10 runs on 2 cores.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _check_eager(rank, mesh):
    import copy

    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    for kind in ("llama", "fc"):
        for style in ("blast", "torch"):
            m = make_model(kind)
            ref = copy.deepcopy(m)
            reps = bd.parallelize_blast_mlp(m, mesh, style=style, block=(16, 16))
            assert reps["mlp"].imbalance_after <= reps["mlp"].imbalance_before
            g, u, d = bd.mlp_projections(m.mlp)
            assert isinstance(g.weight, DTensor) and g.weight.placements == (Shard(0),)
            assert d.weight.placements == (Shard(1),) and g.weight.to_local().shape[0] == 256
            y = m(x)
            assert type(y) is torch.Tensor
            torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)

            # the fused op on the DTensor weights: local detection + the sharding rule
            xr = DTensor.from_local(m.norm(x), mesh, [Replicate()], run_check=False)
            act = "silu" if kind == "llama" else "gelu"
            yf = bd.sparse_mlp_call(xr, g.weight, g.bias, u.weight if u is not None else None,
                                    u.bias if u is not None else None, d.weight, d.bias, act, block=(16, 16))
            assert yf.placements == (Partial(),)
            torch.testing.assert_close(x + yf.full_tensor(), ref(x), rtol=1e-5, atol=1e-5)

    # the sharding rule traced by AOTAutograd (what compile_fx does after the pass)
    torch.manual_seed(0)
    w1, w3, w2, b2 = torch.randn(128, 64), torch.randn(128, 64), torch.randn(64, 128), torch.randn(64)
    w1[:96] = 0
    dts = [distribute_tensor(t, mesh, [p]) for t, p in ((w1, Shard(0)), (w3, Shard(0)), (w2, Shard(1)), (b2, Replicate()))]

    # what the pass emits: the op on the DTensor nodes, with the key of this rank's local pattern
    from blast_compile.formats import pattern_from_weights

    key = pattern_from_weights(*(bd.local(t) for t in (dts[0], dts[1], dts[2])), 16, 16, activation="silu",
                               has_b1=False, has_b3=False).key

    def f(xl, a, c, b, bb):
        xd = DTensor.from_local(xl, mesh, [Replicate()], run_check=False)
        y = torch.ops.blast.sparse_mlp(xd, a, None, c, None, b, bb, "silu", 16, 16, key, 0.75)
        return y.redistribute(mesh, [Replicate()]).to_local()

    xl = torch.randn(4, 64)
    from blast_compile.ops.activations import dense_mlp

    from torch._dynamo.utils import counters

    counters.clear()
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(xl, *dts),
                               dense_mlp(xl, w1, None, w3, None, w2, b2, "silu"), rtol=1e-4, atol=1e-4)
    assert counters["blast"]["pattern_changed"] == 0  # the op ran on the local shards the key describes


def test_tp_eager_matches_single_process():
    _spawn(_check_eager)


def _check_compiled(rank, mesh):
    import copy

    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    m = make_model("llama")
    ref = copy.deepcopy(m)
    bd.parallelize_blast_mlp(m, mesh, block=(16, 16))
    from blast_compile.backend import rewrite_graph as rewrite
    from blast_compile.config import BlastOptions
    from torch._dynamo.backends.debugging import aot_eager

    cands = []

    def blast_aot_eager(gm, example_inputs):
        # the blast backend's rewrite, then AOTAutograd without Inductor (an Inductor compile
        # in each of 2 processes on 2 cores takes ~50 s; the GPU test covers it)
        new, cs = rewrite(gm, example_inputs, BlastOptions.from_options({"strict": True}))
        cands.extend(cs)
        return aot_eager(new, example_inputs)

    try:
        with torch.no_grad():
            y = torch.compile(m, backend=blast_aot_eager)(x)
    except Exception as e:
        if "mixed torch.Tensor and DTensor" in str(e):
            raise AssertionError("the pass detects sparsity on DTensor weights: it must read w.to_local() "
                                 "(passes/decide.py weights(); see TP_NOTES.md)") from e
        raise
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    fused = [c for c in cands if c.decision == "fused"]
    assert len(fused) == 1, [(c.module, c.decision, c.reason) for c in cands]
    assert fused[0].hidden == 256  # this rank's half of the hidden units


def test_tp_compiled_blast_matches_single_process():
    from blast_compile import passes

    if not hasattr(passes, "run_passes"):
        pytest.skip("blast_compile.passes.run_passes does not exist yet: the blast backend cannot fuse")
    # needs detection on local shards: passes/decide.py weights() must read w.to_local() (TP_NOTES.md)
    _spawn(_check_compiled)


# --------------------------------------------------------------------------- GPU


def _check_gpu(rank, mesh):
    import copy

    torch.manual_seed(0)
    m = make_model("llama", d=256, h=1024).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(m)
    bd.parallelize_blast_mlp(m, mesh, block=(16, 16))
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    g, u, d = bd.mlp_projections(m.mlp)
    from torch.distributed.tensor import DTensor, Replicate

    xr = DTensor.from_local(m.norm(x), mesh, [Replicate()], run_check=False)
    yf = bd.sparse_mlp_call(xr, g.weight, None, u.weight, None, d.weight, None, "silu")
    torch.testing.assert_close(x + yf.full_tensor(), ref(x), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(m(x), ref(x), rtol=3e-2, atol=3e-2)
    with torch.no_grad():
        y = torch.compile(m, backend="blast", options={"strict": True})(x)
    torch.testing.assert_close(y, ref(x), rtol=3e-2, atol=3e-2)
    from torch._dynamo.utils import counters

    assert counters["blast"]["mlp_fused"] == 1, dict(counters["blast"])


def _gpu_entry(rank, ws, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=ws, device_id=torch.device("cuda", rank))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        _check_gpu(rank, init_device_mesh("cuda", (ws,)))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp_gpu_two_ranks():
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast
    mp.spawn(_gpu_entry, args=(2, _free_port()), nprocs=2, join=True)
