"""Compressed block-sparse weights: exactness, freed memory, save/load checks, memory plan."""
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F

from blast_compile import compress as C
from blast_compile import memory_plan
from blast_compile.formats import expand_mask
from blast_compile.ops import gather
from blast_compile.testing import random_block_mask, sparsify_mlps_, zero_blocks_

transformers = pytest.importorskip("transformers")


def _llama(seed=0, inter=192, layers=2):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=64)
    torch.manual_seed(seed)
    return cfg, transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(seed=0):
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=64)
    torch.manual_seed(seed)
    return cfg, transformers.GPT2LMHeadModel(cfg).eval()


def _bert(seed=0):
    cfg = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                                  vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(seed)
    return cfg, transformers.BertModel(cfg).eval()


def _out(model, ids):
    with torch.no_grad():
        o = model(ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _dense_shapes(model):
    return {tuple(t.shape) for t in list(model.parameters()) + list(model.buffers())}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_compress_roundtrip(arch):
    cfg, model = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}[arch]()
    n_mlp_weights = sparsify_mlps_(model, 0.75, block=16)
    assert n_mlp_weights == 2 * (3 if arch == "llama" else 2)
    ids = torch.randint(0, 97, (2, 9))
    ref = _out(model, ids)
    mlp_shapes = {tuple(p.shape) for n, p in model.named_parameters() if "mlp" in n or "intermediate" in n
                  or ("output.dense" in n and "attention" not in n)}
    mlp_shapes = {s for s in mlp_shapes if len(s) == 2}
    n_dense = sum(p.numel() for p in model.parameters())
    mlp_numel = sum(p.numel() for n, p in model.named_parameters() if tuple(p.shape) in mlp_shapes and p.dim() == 2)

    rep = C.compress_(model, block_sizes=(16,))
    assert len(rep.mlps) == 2 and len(rep.compressed) == 2
    assert all(r.block == (16, 16) for r in rep.compressed)
    torch.testing.assert_close(_out(model, ids), ref, rtol=1e-5, atol=1e-5)

    # the dense MLP weights are gone: no tensor of their shape, parameter count dropped as expected
    assert not (mlp_shapes & _dense_shapes(model)), mlp_shapes & _dense_shapes(model)
    sl = [m for m in model.modules() if isinstance(m, C.BlockSparseLinear)]
    assert len(sl) == n_mlp_weights and all(not hasattr(m, "weight") for m in sl)
    live = sum(m.blocks.numel() for m in sl)
    n_sparse = sum(p.numel() for p in model.parameters())
    assert n_sparse == n_dense - mlp_numel + live
    # each weight keeps its own 25% of blocks (separate gate/up masks: random masks do not share)
    nb = [(m.out_features // 16) * (m.in_features // 16) for m in sl]
    assert live == sum(n - round(0.75 * n) for n in nb) * 16 * 16
    assert rep.bytes_saved == 4 * (mlp_numel - live) - sum(4 * (m.col_idx.numel() + m.row_ptr.numel()) for m in sl)
    roles = sorted(m.blast_role for m in sl)
    assert roles == (["down", "down", "gate", "gate", "up", "up"] if arch == "llama" else ["fc1", "fc1", "fc2", "fc2"])

    assert C.decompress_(model) == n_mlp_weights
    assert not any(isinstance(m, C.BlockSparseLinear) for m in model.modules())
    torch.testing.assert_close(_out(model, ids), ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == n_dense


def test_min_sparsity_and_dense_mlps_skipped():
    cfg, model = _llama()
    zero_blocks_(model.model.layers[0].mlp.down_proj.weight, 0.3, (16, 16))  # too dense
    rep = C.compress_(model, min_sparsity=0.5)
    assert rep.compressed == [] and len(rep.mlps) == 2
    assert "min_sparsity" in rep.mlps[0].reason and "no zero" in rep.mlps[1].reason
    assert not any(isinstance(m, C.BlockSparseLinear) for m in model.modules())


def _shared_mask_llama(sparsity=0.8, block=16):
    cfg, model = _llama(inter=160)  # 160 = 10 blocks of 16: ragged vs 32/64
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            m = random_block_mask(160 // block, 64 // block, sparsity, g)
            for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
                w.mul_(expand_mask(m, block, block, w.shape).float())
            zero_blocks_(mlp.down_proj.weight, sparsity, (block, block), g)
    return cfg, model


def test_shared_gate_up_and_packed_mlp_mapping():
    """Gate/up with one mask share the index; packed_mlp feeds the fused kernels' pattern order."""
    cfg, model = _shared_mask_llama()
    mlp = model.model.layers[0].mlp
    # one hidden block-row dead in W2 only: build_pattern drops it, so the mapping must select
    with torch.no_grad():
        mlp.down_proj.weight[:, 16:32] = 0
        # layer 1: down's live columns = gate/up's live rows, so nothing is dropped
        m1 = model.model.layers[1].mlp
        mask = C.block_mask(m1.gate_proj.weight, 16, 16)
        m1.down_proj.weight.normal_().mul_(expand_mask(mask.t(), 16, 16, m1.down_proj.weight.shape).float())
    x = torch.randn(5, 64)
    ref = mlp(x)
    rep = C.compress_(model, block_sizes=(16,))
    assert all(r.shared_in_mask for r in rep.compressed)
    assert torch.equal(mlp.gate_proj.col_idx, mlp.up_proj.col_idx)
    assert mlp._blast_mlp["block"] == (16, 16) and mlp._blast_mlp["gated"]
    pat, p1, b1, p3, b3, p2, b2 = C.packed_mlp(mlp.gate_proj, mlp.up_proj, mlp.down_proj, "silu")
    assert 1 not in pat.hidden_live.tolist()
    assert p1.shape[0] == pat.nnz_in < mlp.gate_proj.nnz and p2.shape[0] == pat.nnz_dn
    packed = types.SimpleNamespace(in_rows=gather.rows_of(pat.in_rowptr), dn_rows_r=gather.rows_of(pat.dn_rowptr),
                                   p1=p1, p3=p3, p2=p2)
    y = gather.forward(x, pat, packed, b1, b3, b2, "silu", 64)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # layer 1 has nothing to drop: the stored tensors are used as they are
    _, q1, _, q3, _, q2, _ = C.packed_mlp(m1.gate_proj, m1.up_proj, m1.down_proj, "silu")
    assert q1 is m1.gate_proj.blocks and q3 is m1.up_proj.blocks and q2 is m1.down_proj.blocks


@pytest.mark.parametrize("shape,block,bias", [((50, 37), (16, 32), True), ((64, 64), (32, 16), False)])
def test_block_linear_op_and_grads(shape, block, bias):
    torch.manual_seed(0)
    o, i = shape
    w = torch.randn(o, i, dtype=torch.float64)
    zero_blocks_(w, 0.6, block)
    b = torch.randn(o, dtype=torch.float64) if bias else None
    lin = C.BlockSparseLinear.from_dense(w, b, block, requires_grad=True)
    torch.testing.assert_close(lin.to_dense(), w, rtol=0, atol=0)
    x = torch.randn(3, 4, i, dtype=torch.float64, requires_grad=True)
    y = lin(x)
    torch.testing.assert_close(y, F.linear(x, w, b))
    dy = torch.randn_like(y)
    y.backward(dy)
    wd = w.clone().requires_grad_(True)
    xd = x.detach().clone().requires_grad_(True)
    F.linear(xd, wd, b).backward(dy)
    torch.testing.assert_close(x.grad, xd.grad)
    # live-block gradients = dense gradient restricted to the stored blocks
    g = C.BlockSparseLinear.from_dense(wd.grad * expand_mask(lin.block_mask(), *block, w.shape), None, block,
                                       mask=lin.block_mask())
    torch.testing.assert_close(lin.blocks.grad, g.blocks)
    if bias:
        torch.testing.assert_close(lin.bias.grad, dy.reshape(-1, o).sum(0))
    torch.library.opcheck(torch.ops.blast.block_linear.default,
                          (x.detach().float(), lin.blocks.detach().float(), lin.row_ptr, lin.col_idx,
                           None if b is None else b.float(), o))


def _strip_config(m):
    del m.config
    return m


def test_save_load_roundtrip_and_errors(tmp_path):
    cfg, model = _gpt2()  # tied lm_head/wte + Conv1D
    sparsify_mlps_(model, 0.8, block=16)
    C.compress_(model)
    model = model.to(torch.bfloat16)  # buffers and weights in bf16: the file must carry both
    ids = torch.randint(0, 97, (1, 11))
    out = _out(model, ids)
    path = str(tmp_path / "m.safetensors")
    C.save_compressed(model, path)

    factory = lambda: transformers.GPT2LMHeadModel(cfg)  # noqa: E731
    m2 = C.load_compressed(factory, path).eval()
    torch.testing.assert_close(_out(m2, ids), out, rtol=0, atol=0)
    assert m2.lm_head.weight is m2.transformer.wte.weight
    assert not any(t.is_meta for t in list(m2.parameters()) + list(m2.buffers()))
    assert m2.transformer.h[0].mlp._blast_mlp["block"] == model.transformer.h[0].mlp.c_fc.blast_block

    # mismatched model: different intermediate size / config
    cfg_b = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=64, n_inner=96)
    with pytest.raises(ValueError, match="differs|match"):
        C.load_compressed(lambda: transformers.GPT2LMHeadModel(cfg_b), path)
    with pytest.raises(ValueError, match="model_type='llama'"):
        C.load_compressed(lambda: _llama()[1], path)
    # no config to compare: the layer shapes catch it
    with pytest.raises(ValueError, match="model layer is 96x48"):
        C.load_compressed(lambda: _strip_config(transformers.GPT2LMHeadModel(cfg_b)), path)

    # corrupted tensor data: flip bytes near the end of the file (tensor payload)
    data = bytearray(open(path, "rb").read())
    for k in (len(data) - 7, len(data) // 2 + 100):
        bad = bytearray(data)
        bad[k] ^= 0xFF
        bp = str(tmp_path / f"bad{k}.safetensors")
        open(bp, "wb").write(bytes(bad))
        with pytest.raises(ValueError, match="checksum mismatch"):
            C.load_compressed(factory, bp)
    trunc = str(tmp_path / "trunc.safetensors")
    open(trunc, "wb").write(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match="readable"):
        C.load_compressed(factory, trunc)


def test_save_pretrained_dir(tmp_path):
    cfg, model = _shared_mask_llama()
    C.compress_(model)
    ids = torch.randint(0, 97, (2, 6))
    out = _out(model, ids)
    d = str(tmp_path / "ckpt")
    C.save_pretrained(model, d)
    assert sorted(os.listdir(d)) == ["blast.json", "config.json", "model.safetensors"]
    m2 = C.from_pretrained(d)
    torch.testing.assert_close(_out(m2, ids), out, rtol=0, atol=0)
    # the file holds no dense MLP weight
    from safetensors import safe_open

    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        assert not any(k.endswith("mlp.gate_proj.weight") for k in f.keys())


def test_from_pretrained_names_a_model_cls_that_does_not_match(tmp_path):
    """A model_cls other than the saved class failed on a layer or attribute that did not say why (LlamaModel: "no
    Linear/Conv1D at 'model.layers.0.mlp.gate_proj'"; GPT2LMHeadModel: "'LlamaConfig' object has no attribute
    'embd_pdrop'"). A subclass of the saved class still loads."""
    _, model = _shared_mask_llama()
    C.compress_(model)
    d = str(tmp_path / "ckpt")
    C.save_pretrained(model, d)
    for cls in (transformers.LlamaModel, transformers.GPT2LMHeadModel, transformers.MistralForCausalLM):
        with pytest.raises(ValueError, match=f"model_cls={cls.__name__} does not match.*holds a LlamaForCausalLM "
                                             r"\(model_type='llama'\)"):
            C.from_pretrained(d, model_cls=cls)
    with pytest.raises(TypeError, match="model_cls must be an nn.Module class, not 'LlamaForCausalLM'"):
        C.from_pretrained(d, model_cls="LlamaForCausalLM")

    class Mine(transformers.LlamaForCausalLM):
        pass

    ids = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(_out(C.from_pretrained(d, model_cls=Mine), ids), _out(model, ids), rtol=0, atol=0)


def test_save_pretrained_refuses_an_uncompressed_model(tmp_path):
    """A dense model would be written as it is, with "layers": {}: say so instead, write nothing."""
    _, model = _llama()
    d = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=r"no compressed layers: call blast_compile.compress.compress_\(model\)"):
        C.save_pretrained(model, str(d))
    assert not d.exists()
    with pytest.raises(ValueError, match="needs a transformers model"):
        C.save_pretrained(torch.nn.Linear(4, 4), str(d))


def test_memory_plan_hand_calculation():
    cfg = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
    p = memory_plan.plan(cfg, 0.9, block=64, dtype_bytes=2, gpu_gb=1e-4, kv_tokens=10)
    head = 128 // 4
    attn = 128 * 128 * 2 + 128 * 2 * head * 2
    params = 3 * (attn + 3 * 128 * 320 + 2 * 128) + 128 + 2 * 1000 * 128
    assert p.params == params
    # W1/W3: 5x2 blocks -> 9 dead, 1 live; W2: 2x5 -> 1 live. Index: 1 col + (rows + 1) ptrs
    mlp_sparse = 3 * (3 * 64 * 64 * 2 + 4 * (1 + 6) * 2 + 4 * (1 + 3))
    assert p.mlp_sparse_bytes == mlp_sparse
    assert p.sparse_bytes == 2 * params - 3 * 3 * 128 * 320 * 2 + mlp_sparse
    assert p.kv_bytes == 2 * 3 * 2 * head * 10 * 2
    assert p.gpus_dense == math.ceil((2 * params + p.kv_bytes) / (1e-4 * 2**30))
    # the compressor stores exactly what the plan counts
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, max_position_embeddings=64))
    dense = sum(t.numel() * t.element_size() for t in model.parameters())
    assert dense == 4 * params
    sparsify_mlps_(model, 0.9, block=64)
    C.compress_(model, block_sizes=(64,))
    idx = [t for m in model.modules() if isinstance(m, C.BlockSparseLinear) for t in (m.row_ptr, m.col_idx)]
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + idx)
    p4 = memory_plan.plan(cfg, 0.9, block=64, dtype_bytes=4)
    assert held == p4.sparse_bytes


def test_memory_plan_cli(capsys):
    assert memory_plan.main(["--model", "llama-3.1-405b", "--sparsity", "0.9", "--json"]) == 0
    import json

    (row,) = json.loads(capsys.readouterr().out)
    assert row["params"] == pytest.approx(405.85e9, rel=1e-3) and row["gpus_dense"] == 10
    assert 0.7 < row["reduction"] < 0.75


@pytest.mark.parametrize("argv", [["--gpu-gb", "-80"], ["--gpu-gb", "nan"], ["--usable", "0"], ["--usable", "7"],
                                  ["--kv-tokens", "-5"], ["--overhead-gb", "-1"], ["--tp", "3"], ["--block", "7"]])
def test_memory_plan_cli_rejects_what_cannot_run(argv, capsys):
    with pytest.raises(SystemExit):
        memory_plan.main(["--model", "llama-3.1-405b", *argv])
    assert f"argument {argv[0]}" in capsys.readouterr().err


def test_compressed_export_loads_after_import_blast_compile(tmp_path):
    """A compressed model's program calls blast::block_linear: ``import blast_compile`` must register it."""
    import subprocess
    import sys

    from blast_compile.export import export
    from blast_compile.testing import SwiGLU

    m = torch.nn.Sequential(SwiGLU(64, 128)).eval()
    sparsify_mlps_(m, 0.75, block=16)
    C.compress_(m)
    x = torch.randn(4, 64)
    torch.export.save(export(m, (x,)), tmp_path / "ep.pt2")
    torch.save((x, m(x)), tmp_path / "io.pt")
    code = ("import sys, torch, blast_compile\n"
            "ep = torch.export.load(sys.argv[1]); x, ref = torch.load(sys.argv[2])\n"
            "torch.testing.assert_close(ep.module()(x), ref)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ep.pt2"), str(tmp_path / "io.pt")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compress_cuda_bf16_frees_memory():
    cfg, model = _shared_mask_llama(0.9)
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 97, (2, 9), device="cuda")
    ref = _out(model, ids)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    rep = C.compress_(model)
    torch.cuda.synchronize()
    n = sum(isinstance(m, C.BlockSparseLinear) for m in model.modules())
    # the caching allocator rounds each new tensor (blocks, row_ptr, col_idx) up to 512 bytes
    assert before - torch.cuda.memory_allocated() >= rep.bytes_saved - 3 * 512 * n > 0
    torch.testing.assert_close(_out(model, ids), ref, rtol=3e-2, atol=3e-2)


def test_sparsifier_finalize_compress_hands_over_to_compressed_inference():
    """Train-time masks -> finalize(compress=True) -> packed weights, same function, dense MLP weights gone."""
    import transformers

    from blast_compile.compress import BlockSparseLinear
    from blast_compile.sparsifier import BlastSparsifier

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sp = BlastSparsifier(model, target_sparsity=0.75, block_size=32, end_step=4, update_every=1, freeze_last=0.0)
    for _ in range(5):
        sp.step()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    sp.finalize(compress=True)
    mlp = model.model.layers[0].mlp
    assert all(isinstance(getattr(mlp, n), BlockSparseLinear) for n in ("gate_proj", "up_proj", "down_proj"))
    assert not any(p.shape == (256, 64) for p in model.parameters())  # no dense MLP weight left
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
