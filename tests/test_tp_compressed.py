"""Tensor parallelism on compressed weights (issue 28): each rank holds its own live blocks only,
loads them straight from a checkpoint, saves back the unsharded file; TP training through the fused
op with declared masks; the memory plan's per-rank numbers against what the sharded model holds.

Multi-rank tests spawn 2 CPU processes under gloo (``test_tp._spawn``); every rank builds the same
model from one seed and checks its sharded result against the single-device model.
"""
import copy
import os

import pytest
import torch

import blast_compile  # noqa: F401  (registers the ops)
from blast_compile import compress as C
from blast_compile import distributed as bd
from blast_compile import masks, memory_plan
from blast_compile import tp_checkpoint as K
from blast_compile import tp_compressed as T
from blast_compile.formats import block_mask, expand_mask
from blast_compile.testing import sparsify_mlps_

from test_tp import _free_port, _spawn, make_model

transformers = pytest.importorskip("transformers")

LLAMA = dict(hidden_size=128, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=False)


def _llama(seed=0, block=32):
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    sparsify_mlps_(m, 0.9, block=block, seed=seed)
    C.compress_(m, block_sizes=(block,))
    return m


def _ids():
    return torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------- single process


def test_shard_index_roundtrip():
    """Rows/columns cut out of a CSR layer hold exactly the dense weight's blocks there."""
    torch.manual_seed(0)
    w = torch.randn(128, 96)
    w.mul_(expand_mask(block_mask(torch.rand(8, 6) < 0.3, 1, 1), 16, 16, w.shape))
    lin = C.BlockSparseLinear.from_dense(w, None, (16, 16))
    rows = torch.tensor([1, 2, 5, 7])
    sel, ptr, col = T.shard_rows(lin.row_ptr, lin.col_idx, rows)
    part = C.BlockSparseLinear(96, 64, (16, 16), sel.numel(), False)
    part.blocks.data, part.row_ptr, part.col_idx = lin.blocks[sel], ptr, col
    torch.testing.assert_close(part.to_dense(), w.reshape(8, 16, 96)[rows].reshape(64, 96), rtol=0, atol=0)
    cols = torch.tensor([0, 3, 4])
    sel, ptr, col = T.shard_cols(lin.row_ptr, lin.col_idx, cols, 6)
    part = C.BlockSparseLinear(48, 128, (16, 16), sel.numel(), False)
    part.blocks.data, part.row_ptr, part.col_idx = lin.blocks[sel], ptr, col
    torch.testing.assert_close(part.to_dense(), w.reshape(128, 6, 16)[:, cols].reshape(128, 48), rtol=0, atol=0)


def test_split_hidden_balances_and_errors():
    costs = torch.tensor([9, 9, 9, 9, 0, 0, 1, 1])
    bins = T.split_hidden(costs, 2)
    assert sorted(len(b) for b in bins) == [4, 4]
    assert [int(costs[b].sum()) for b in bins] == [19, 19]
    assert T.split_hidden(costs, 2, balance=False) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="equal count"):
        T.split_hidden(costs, 3)


def test_memory_plan_tp_counts_and_gpus():
    p = memory_plan.plan("llama-3.1-405b", 0.9)
    assert (p.gpus_dense, p.gpus_sparse) == (10, 3)
    # 3 GPUs would hold the bytes, but 8 KV heads do not split 3 ways: the runnable plan is TP 4
    assert p.gpus_tp == 4 and p.tp == 4 and p.rank_bytes <= 80 * 2**30
    assert memory_plan.tp_sizes(memory_plan.CONFIGS["llama-3.1-405b"]) == [1, 2, 4, 8]
    # one rank holds what the single-device plan counts
    assert memory_plan.plan("llama-3.1-8b", 0.9, tp=1).rank_bytes == memory_plan.plan("llama-3.1-8b", 0.9).sparse_bytes
    assert "replicated" in memory_plan.ASSUMES and "KV cache" in memory_plan.ASSUMES


# --------------------------------------------------------------------------- 2 ranks: compressed shards


def _theoretical_mlp_bytes(ref, model, ranks):
    """Compressed MLP blocks / ranks + this rank's own index and biases."""
    blocks = sum(m.blocks.numel() * m.blocks.element_size() for m in ref.modules() if isinstance(m, C.BlockSparseLinear))
    own_idx = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, C.BlockSparseLinear)
                  for t in (m.row_ptr, m.col_idx) + ((m.bias,) if m.bias is not None else ()))
    return blocks / ranks + own_idx


def _check_compressed(rank, mesh, directory):
    ws = mesh.size()
    ids = _ids()
    ref = _llama()
    with torch.no_grad():
        want = ref(ids).logits

    # in memory: shard an identical model; eager (unfused block_linear chain), then one packed op per MLP
    m = copy.deepcopy(ref)
    rep = T.shard_compressed_(m, mesh)
    assert len(rep.mlps) == 2 and len(rep.attention) == 2
    assert not any(isinstance(mod, torch.nn.Linear) and "mlp" in n for n, mod in m.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, want, rtol=1e-5, atol=1e-5)
    held = T.weight_bytes(m)
    theory = _theoretical_mlp_bytes(ref, m, ws)
    assert theory / held["mlp"] >= 0.95, (theory, held)
    assert held["mlp"] <= T.weight_bytes(ref)["mlp"] / ws * 1.05
    # the memory plan counts what the sharded model holds: exactly in sum over ranks, per rank to the balance
    plan = memory_plan.plan(LLAMA, 0.9, block=32, dtype_bytes=4, tp=ws)
    rows = [None] * ws
    torch.distributed.all_gather_object(rows, held["total"])
    assert sum(rows) == plan.tp_total_bytes, (rows, plan.tp_total_bytes)
    assert abs(held["total"] - plan.rank_bytes) <= 0.02 * plan.rank_bytes
    for layer in m.model.layers:
        T.fuse_packed_eager_(layer.mlp, "silu")
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, want, rtol=1e-5, atol=1e-5)

    # straight from the checkpoint: only this rank's blocks are read
    m2 = C.from_pretrained(directory, tp=mesh)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, want, rtol=1e-5, atol=1e-5)
    read = m2._blast_bytes_read
    for name, mod in m2.named_modules():
        if isinstance(mod, C.BlockSparseLinear):
            assert read[f"{name}.blocks"] == mod.blocks.numel() * mod.blocks.element_size(), name
    got = [None] * ws
    torch.distributed.all_gather_object(got, {k: v for k, v in read.items() if k.endswith(".blocks")})
    full = {n + ".blocks": mod.blocks.numel() * mod.blocks.element_size() for n, mod in ref.named_modules()
            if isinstance(mod, C.BlockSparseLinear)}
    assert {k: sum(g[k] for g in got) for k in full} == full  # every block read once, by one rank
    assert sum(read.values()) < 0.75 * os.path.getsize(os.path.join(directory, "model.safetensors"))

    # save: rank 0 gathers and writes the unsharded file, tensor for tensor
    K.save_pretrained_sharded(m2, os.path.join(directory, "resaved"), mesh)
    if rank == 0:
        from safetensors.torch import load_file

        a = load_file(os.path.join(directory, "model.safetensors"))
        b = load_file(os.path.join(directory, "resaved", "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        C.from_pretrained(os.path.join(directory, "resaved"))  # blast.json agrees

    # compiled with the blast backend: each rank's MLP becomes one packed op
    from torch._dynamo.utils import counters

    mlp = make_model("llama")
    C.compress_(mlp, block_sizes=(16,))
    mref = copy.deepcopy(mlp)
    T.shard_compressed_(mlp, mesh)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    counters.clear()
    with torch.no_grad():
        y = torch.compile(mlp, backend="blast", options={"strict": True})(x)
    torch.testing.assert_close(y, mref(x), rtol=1e-5, atol=1e-5)
    assert counters["blast"]["mlp_fused_packed"] == 1, dict(counters["blast"])


def test_tp_compressed_two_ranks(tmp_path):
    C.save_pretrained(_llama(), str(tmp_path))
    _spawn(_check_compressed, 2, str(tmp_path))


# --------------------------------------------------------------------------- 2 ranks: training


def _declare(mlp, block=(16, 16)):
    for lin in bd.mlp_projections(mlp):
        if lin is not None:
            masks.declare_mask(lin.weight, block_mask(lin.weight, *block), block)


def _grads(model):
    from torch.distributed.tensor import DTensor

    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}


def _check_training(rank, mesh):
    from blast_compile.backend import rewrite_graph
    from blast_compile.config import BlastOptions
    from torch._dynamo.backends.debugging import aot_eager

    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    for kind, act in (("llama", "silu"), ("fc", "gelu")):
        for compiled in (False, True):
            m = make_model(kind)
            _declare(m.mlp)
            ref = copy.deepcopy(m)
            for a, b in zip(bd.mlp_projections(ref.mlp), bd.mlp_projections(m.mlp)):
                if a is not None:
                    masks.declare_mask(a.weight, *masks.declared_mask(b.weight))
            bd.balance_hidden_(ref.mlp, mesh.size(), block=(16, 16))  # the permutation TP applies
            bd.parallelize_blast_mlp(m, mesh, block=(16, 16))
            bd.fuse_mlp_eager_(ref.mlp, act, block=(16, 16))
            if compiled:
                def backend(gm, example_inputs):
                    new, _ = rewrite_graph(gm, example_inputs, BlastOptions.from_options({"strict": True}))
                    return aot_eager(new, example_inputs)

                run = torch.compile(m, backend=backend)
            else:
                bd.fuse_mlp_eager_(m.mlp, act, block=(16, 16))
                run = m
            y, yr = run(x), ref(x)
            torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
            y.square().sum().backward()
            yr.square().sum().backward()
            g, gr = _grads(m), _grads(ref)
            for n in gr:
                torch.testing.assert_close(g[n], gr[n], rtol=1e-4, atol=1e-5, msg=f"{kind} compiled={compiled} {n}")
            w = bd.mlp_projections(ref.mlp)[0].weight
            dead = ~expand_mask(masks.declared_mask(w)[0], 16, 16, w.shape)
            assert dead.any() and not g["mlp." + ("gate_proj" if kind == "llama" else "fc1") + ".weight"][dead].any()

    # the training forward (what the rewrite emits on CUDA) on DTensors, and its backward
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor import DTensor

    m = make_model("llama").mlp
    _declare(m)
    w = [p.weight.detach() for p in (m.gate_proj, m.up_proj, m.down_proj)]
    dts = []
    for t, pl in zip(w, (Shard(0), Shard(0), Shard(1))):
        d = torch.nn.Parameter(distribute_tensor(t, mesh, [pl]))
        bd.shard_declared_mask(t, d, pl, mesh) if masks.declared_mask(t) else None
        dts.append(d)
    xl = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    xd = DTensor.from_local(xl, mesh, [Replicate()], run_check=False)
    key = bd.op_args(dts[0], None, dts[1], None, dts[2], "silu", (16, 16))[2]
    y, saved = torch.ops.blast.sparse_mlp_train(xd, dts[0], None, dts[1], None, dts[2], None, "silu", 16, 16, key, 0.75)
    assert y.placements == (Partial(),) and saved.placements == (Shard(saved.ndim - 1),)
    y.full_tensor().square().sum().backward()
    wr = [t.clone().requires_grad_() for t in w]
    xr = xl.detach().clone().requires_grad_()
    from blast_compile.ops.activations import dense_mlp

    dense_mlp(xr, wr[0], None, wr[1], None, wr[2], None, "silu").square().sum().backward()
    for d, r, t in zip(dts, wr, w):
        want = r.grad * expand_mask(masks.declared_mask(t)[0], 16, 16, t.shape)  # W * mask: no dW on dead blocks
        torch.testing.assert_close(d.grad.full_tensor(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_tp_training_declared_masks_two_ranks():
    _spawn(_check_training)


# --------------------------------------------------------------------------- GPU


def _gpu_entry(rank, ws, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=ws, device_id=torch.device("cuda", rank))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (ws,))
        ref = _llama().to(torch.bfloat16).cuda()
        ids = _ids().cuda()
        base = torch.cuda.memory_allocated()
        m = copy.deepcopy(ref)
        T.shard_compressed_(m, mesh)  # (the unsharded copy's MLP and attention tensors are freed)
        held = torch.cuda.memory_allocated() - base
        assert _theoretical_mlp_bytes(ref, m, ws) / T.weight_bytes(m)["mlp"] >= 0.95
        assert T.weight_bytes(m)["total"] <= held <= T.weight_bytes(m)["total"] * 1.02 + 2**16, held
        with torch.no_grad():
            want = ref(ids).logits
            torch.testing.assert_close(m(ids).logits, want, rtol=3e-2, atol=3e-2)
            y = torch.compile(m, backend="blast")(ids).logits
        torch.testing.assert_close(y, want, rtol=3e-2, atol=3e-2)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp_compressed_gpu_two_ranks():
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    mp.spawn(_gpu_entry, args=(2, _free_port()), nprocs=2, join=True)
