"""End-to-end: torch.compile(backend="blast") on CPU (few, since each compile costs seconds)."""
import logging
import os
import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import blast_compile
from blast_compile.config import BlastOptions, split_options
from blast_compile.testing import SwiGLU, sparsify_mlps_
from conftest import force_splitk, tol


class Block(torch.nn.Module):
    """An MLP with a residual and a norm around it, so Inductor gets real work too."""

    def __init__(self, d=64, h=192):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.mlp = SwiGLU(d, h)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def sparsify_weights_(m, sparsity=0.9):
    """Random dead 32x32 blocks in every 2-D weight of ``m`` (whatever its names); returns ``m``."""
    from blast_compile.testing import zero_blocks_

    g = torch.Generator().manual_seed(0)
    for p in m.parameters():
        if p.dim() == 2:
            zero_blocks_(p.data, sparsity, (32, 32), g)
    return m


def sparse_block(sparsity=0.9, seed=0):
    torch.manual_seed(seed)
    m = Block()
    sparsify_mlps_(m, sparsity, block=32, seed=seed)
    return m


def test_entry_point_registered_without_import():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "blast"]
    assert eps and eps[0].value == "blast_compile.backend:blast"
    assert "blast" in torch._dynamo.list_backends(exclude_tags=())


def test_compile_fuses_and_matches_eager_and_weight_updates_are_seen():
    torch._dynamo.reset()
    m = sparse_block()
    x = torch.randn(2, 7, 64)
    cm = torch.compile(m, backend="blast")
    torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
    assert counters["blast"]["mlp_fused"] == 1
    # the same compiled code, after in-place weight changes: never stale
    with torch.no_grad():
        m.mlp.up_proj.weight.mul_(-1.5)  # same pattern, new values
    torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.mlp.down_proj.weight.normal_()  # every block alive now
    torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
    m.load_state_dict(state)  # back to the sparse weights
    torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
    # dynamic batch: a new M must not produce wrong answers
    x2 = torch.randn(5, 3, 64)
    torch.testing.assert_close(cm(x2), m(x2), **tol(torch.float32))


def test_model_made_under_inference_mode(monkeypatch):
    """Weights made under torch.inference_mode() have no version counter (reading it raises): the
    fused model still runs and matches eager, warns once that in-place changes to such weights are
    not tracked, and follows them after blast_compile.refresh()."""
    from blast_compile.ops import plans

    monkeypatch.setattr(plans, "_WARNED", set())
    torch._dynamo.reset()
    with torch.inference_mode():
        m = sparse_block()
        x = torch.randn(2, 7, 64)
        cm = torch.compile(m, backend="blast")
        with pytest.warns(RuntimeWarning, match="inference tensors"):
            torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
        assert counters["blast"]["mlp_fused"] == 1
        m.mlp.down_proj.weight.normal_()  # every block alive; no version counter moves
        blast_compile.refresh()
        torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))


def train_like_eager(m, m_ref, x, steps=2):
    """``steps`` SGD steps of ``m`` compiled with blast and of ``m_ref`` eager: every gradient equal
    (the second step runs on weights changed by the first). Returns the compiled ``m``."""
    torch._dynamo.reset()
    cm = torch.compile(m, backend="blast")
    opt, opt_ref = (torch.optim.SGD(k.parameters(), lr=0.1) for k in (m, m_ref))
    for _ in range(steps):
        loss, loss_ref = cm(x).square().mean(), m_ref(x).square().mean()
        loss.backward()
        loss_ref.backward()
        for (n, p), p_ref in zip(m.named_parameters(), m_ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, **tol(torch.float32), msg=n)
        opt.step(), opt_ref.step(), opt.zero_grad(), opt_ref.zero_grad()
    return cm


def test_training_step_matches_eager():
    train_like_eager(sparse_block(seed=1), sparse_block(seed=1), torch.randn(3, 5, 64))
    assert counters["blast"]["mlp_fused"] >= 1


class FusedGateUpBlock(torch.nn.Module):
    """Phi-3's MLP: one gate|up linear, chunked."""

    def __init__(self, d=64, h=192):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.gate_up_proj = torch.nn.Linear(d, 2 * h, bias=False)
        self.down_proj = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(self.norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(up * torch.nn.functional.silu(gate))


def test_fused_gate_up_training_and_weight_changes():
    """The fused op reads the halves of the gate|up weight as views: its gradient is assembled from
    both halves, and an in-place change of the whole weight is seen by both."""
    def make():
        torch.manual_seed(2)
        return sparsify_weights_(FusedGateUpBlock())

    m, x = make(), torch.randn(3, 5, 64)
    cm = train_like_eager(m, make(), x)
    assert counters["blast"]["mlp_fused"] == 1
    with torch.no_grad():
        m.gate_up_proj.weight.normal_()  # every block of both halves alive
        torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))


class Conv1DBlock(torch.nn.Module):
    """GPT-2's MLP: Conv1D weights stored [in, out] (``addmm(b, x, W)``); the op reads ``torch.t(W)``."""

    def __init__(self, d=64, h=192):
        super().__init__()
        self.w_fc, self.b_fc = torch.nn.Parameter(torch.randn(d, h) / d ** 0.5), torch.nn.Parameter(torch.zeros(h))
        self.w_proj, self.b_proj = torch.nn.Parameter(torch.randn(h, d) / h ** 0.5), torch.nn.Parameter(torch.zeros(d))

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        a = torch.nn.functional.gelu(torch.addmm(self.b_fc, x2, self.w_fc))
        return torch.addmm(self.b_proj, a, self.w_proj).view(x.shape)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("block", ["conv1d", "fused_gate_up"])
@pytest.mark.parametrize("grad", [False, True])
def test_weight_views_keep_their_plan_and_see_in_place_changes(block, grad, dev):
    """Inductor hands the op a view of a weight (``torch.t(W)``, a ``narrow`` half) as a fresh alias
    every call, with a version counter of its own. The plan must survive across calls (it was rebuilt
    on every call) and still follow in-place changes of the parameter (the alias's counter never moves).
    On CUDA in fp16 (the kernels on offset and transposed views of a weight)."""
    torch.manual_seed(0)
    dtype = torch.float32 if dev == "cpu" else torch.float16
    m = sparsify_weights_(Conv1DBlock() if block == "conv1d" else FusedGateUpBlock()).to(dev, dtype)
    ws = [p for p in m.parameters() if p.dim() == 2]
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        cm = torch.compile(m, backend="blast")
        for rows in (5, 5, 1, 300):  # prefill and decode kernels on CUDA
            x = torch.randn(3, rows, 64, device=dev, dtype=dtype)
            torch.testing.assert_close(cm(x), m(x), **tol(dtype))
        # every graph Dynamo made for the lengths fused its MLP, and all of them share one plan
        assert counters["blast"]["mlp_fused"] == counters["blast"]["graphs"] and counters["blast"]["plans_built"] == 1
        with torch.no_grad():
            ws[0].add_(0.01 * torch.randn_like(ws[0]) * (ws[0] == 0))  # every dead block of W1 revived
        torch.testing.assert_close(cm(x), m(x), **tol(dtype))
        assert counters["blast"]["pattern_changed"] == 1  # (the opaque op's plan, once)
        # on CUDA the MLPs were lowered: the graph that ran left its compiled kernels for the opaque op, once
        assert counters["blast"]["graph_pattern_changed"] == (dev == "cuda")


class _MLPInAutocast(nn.Module):
    """A compiled training step's usual spelling: ``with torch.autocast(...)`` inside the compiled code."""

    def __init__(self, mlp, enabled=True):
        super().__init__()
        self.mlp, self.enabled = mlp, enabled

    def forward(self, x):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.enabled):
            return self.mlp(x)


class _AutocastOffThenMLP(nn.Module):
    """Older transformers' Llama rotary embedding: a ``with torch.autocast(..., enabled=False)`` block in the
    traced code, next to (not around) the MLP."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            r = (x.float() * 0.5).sin()
        return self.mlp(x + r.to(x.dtype))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_ambient_autocast_fused_op_computes_like_autocast_linears(x_dtype):
    """fp32 parameters under ``torch.autocast`` (mixed-precision training): the linears run in bf16
    in eager, so the fused node does too -- bf16 output, fp32 gradients in the parameters' dtype.
    A bf16 input with fp32 weights is fused too (autocast makes the dtypes agree)."""
    check_autocast("cpu", x_dtype, rows=15)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("x_dtype,m,wrap", [(torch.float32, 300, None), (torch.bfloat16, 300, None),
                                             (torch.float32, 4, None), (torch.float32, 300, _AutocastOffThenMLP),
                                             (torch.float32, 300, _MLPInAutocast)])
def test_gpu_ambient_autocast(x_dtype, m, wrap):
    """The CUDA kernels read fp32 weight blocks and cast them on chip (prefill, backward); decode
    (m=4) gets cast copies. ``wrap``: an autocast-off block beside the MLP, or the autocast block inside the
    compiled code instead of around it (both lowered into the same graph)."""
    check_autocast("cuda", x_dtype, rows=m, wrap=wrap, ambient=wrap is not _MLPInAutocast)


def test_autocast_block_beside_the_mlp_does_not_keep_it_dense():
    """An autocast block elsewhere in the graph leaves the MLP on the ambient autocast state: fused, as eager."""
    check_autocast("cpu", torch.float32, rows=9, wrap=_AutocastOffThenMLP)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_block_around_the_mlp_in_the_compiled_code(x_dtype):
    """``with torch.autocast`` inside the compiled code, none outside: the MLP computes in the block's dtype."""
    check_autocast("cpu", x_dtype, rows=7, wrap=_MLPInAutocast, ambient=False)


def test_autocast_off_block_around_the_mlp_under_ambient_autocast():
    """Ambient bf16 autocast, the MLP inside ``torch.autocast(enabled=False)``: fp32, as eager."""
    check_autocast("cpu", torch.float32, rows=6, wrap=lambda mlp: _MLPInAutocast(mlp, enabled=False),
                   compute=torch.float32)


def check_autocast(dev, x_dtype, rows, wrap=None, ambient=True, compute=torch.bfloat16):
    """``wrap(mlp)`` compiled vs eager under ambient bf16 autocast (or none): fused, its output in ``compute``
    (the dtype the MLP's linears run in), every gradient in its input's dtype."""
    torch._dynamo.reset()
    m = sparse_block(seed=2).mlp.to(dev)
    m = wrap(m) if wrap else m
    x = torch.randn(rows, 64, dtype=x_dtype, device=dev, requires_grad=True)
    cm = torch.compile(m, backend="blast")
    outs, grads = [], []
    for f in (cm, m):
        with torch.autocast(dev, torch.bfloat16, enabled=ambient):
            y = f(x)
        y.float().square().mean().backward()
        outs.append(y)
        grads.append([x.grad] + [p.grad for p in m.parameters()])
        x.grad = None
        m.zero_grad(set_to_none=True)
    assert counters["blast"]["mlp_fused"] == 1
    # an x of another dtype than the compute one is cast in the graph (fusable into its producer), not in the op
    assert counters["blast"]["x_cast_in_graph"] == (1 if x_dtype != compute else 0)
    assert outs[0].dtype == outs[1].dtype == compute
    torch.testing.assert_close(outs[0], outs[1], **tol(compute))
    gtol = tol(torch.float32) if compute == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for (n, _), g, r in zip([("x", None)] + list(m.named_parameters()), grads[0], grads[1]):
        assert g.dtype == r.dtype, n
        torch.testing.assert_close(g, r, **gtol, msg=n)


def test_internal_error_falls_back_to_inductor_with_warning(monkeypatch):
    torch._dynamo.reset()
    import blast_compile.passes as passes

    def boom(*a, **k):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(passes, "run_passes", boom)
    m = sparse_block()
    x = torch.randn(4, 64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = torch.compile(m, backend="blast")(x)
    assert any("planted failure" in str(i.message) for i in w)
    torch.testing.assert_close(out, m(x))
    assert counters["blast"]["fallback"] == 1
    torch._dynamo.reset()
    with pytest.raises(Exception, match="planted failure"):
        torch.compile(m, backend="blast", options={"strict": True})(x)


def test_bad_options_are_rejected():
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(sparse_block(), backend="blast", options={"min_sparsty": 0.2})(torch.randn(2, 64))
    for key in ("cpp.bogus_key", "__doc__", "cpp"):  # (an Inductor key is checked whole, not by its first part)
        with pytest.raises(ValueError, match="unknown option"):
            split_options({key: 1})
    keys = {"cpp.cxx": "g++", "triton.cudagraphs": True}
    assert split_options(keys)[1] == keys
    torch._dynamo.reset()
    with pytest.raises(Exception, match="save_hidden must be"):
        torch.compile(sparse_block(), backend="blast", options={"save_hidden": "pre"})(torch.randn(2, 64))
    levels = {v: BlastOptions.from_options({"save_hidden": v}).save_level for v in (True, "all", "h", False)}
    assert levels == {True: None, "all": 2, "h": 1, False: 0}  # (None: chosen per MLP, see test_passes)


def test_explain_reports_fused_and_dense_with_reasons():
    torch._dynamo.reset()
    m = torch.nn.Sequential(sparse_block(0.9), sparse_block(0.2, seed=3))
    rep = blast_compile.explain(m, torch.randn(3, 64), options={"min_sparsity": 0.5})
    kinds = sorted(c.decision for c in rep.candidates)
    assert kinds == ["dense", "fused"], rep
    fused = rep.fused[0]
    assert fused.kind == "gated" and fused.activation == "silu" and fused.block is not None
    assert fused.sparsity > 0.8 and fused.module.endswith("mlp")
    dense = [c for c in rep.candidates if c.decision == "dense"][0]
    assert "min_sparsity" in dense.reason
    text = str(rep)
    assert "fused" in text and "dense" in text and "sparse_mlp" not in text  # the table only
    assert "sparse_mlp" in rep.graph_code()


def test_an_mlp_the_op_would_run_dense_is_reported_dense():
    """min_sparsity=0 on a 90%-live MLP: explain said "fused", then the op computed it densely from its first call
    (density > max_runtime_density) with a warning. The decision now applies the op's own threshold."""
    torch._dynamo.reset()
    m, x = sparse_block(0.1).eval(), torch.randn(3, 64)
    (c,) = blast_compile.explain(m, x, options={"min_sparsity": 0}).candidates
    assert c.decision == "dense" and "max_runtime_density 75%" in c.reason, c.reason
    counters.clear()
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        y = torch.compile(m, backend="blast", options={"min_sparsity": 0, "inductor": False})(x)
        torch.testing.assert_close(y, m(x), **tol(torch.float32))
    assert not [i for i in w if "densely" in str(i.message)]
    assert counters["blast"]["dense_too_dense"] == 1 and counters["blast"]["mlp_fused"] == 0
    (c,) = blast_compile.explain(m, x, options={"min_sparsity": 0, "max_runtime_density": 1}).candidates
    assert c.decision == "fused"  # (the option says how dense a fused MLP may be)


def test_explain_after_compile_and_twice_reports_every_mlp():
    """Dynamo reuses a compiled graph: explain must still see the MLPs after the user's own
    compile, and on a second call, and leave the user's compiled model working."""
    torch._dynamo.reset()
    m = torch.nn.Sequential(sparse_block(0.9), sparse_block(0.9, seed=3)).eval()
    x = torch.randn(3, 64)
    cmodel = torch.compile(m, backend="blast")
    with torch.no_grad():
        ref = cmodel(x)
    for _ in range(2):
        rep = blast_compile.explain(m, x)
        assert len(rep.candidates) == 2 and len(rep.fused) == 2, rep
        assert sorted(c.module for c in rep.candidates) == ["0.mlp", "1.mlp"]  # as named_modules() spells them
    with torch.no_grad():
        torch.testing.assert_close(cmodel(x), ref)


def test_explain_counts_live_blocks_as_the_sparsifier_does():
    """One count of live blocks: the explain table's "in a/b live" is the weights' live blocks, what
    BlastSparsifier.summary() shows, even where the kernels skip some (unused hidden blocks)."""
    from blast_compile.sparsifier import BlastSparsifier

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = SwiGLU(64, 256)
    sp = BlastSparsifier(m, target_sparsity=0.9, block_size=16, schedule="constant")  # prunes at once
    live = {n.rpartition(".")[2]: d["live"] for n, d in sp.layer_sparsity().items()}
    (c,) = blast_compile.explain(m, torch.randn(2, 64)).candidates
    assert f"in {live['gate_proj']}/64 live" in c.reason and f"down {live['down_proj']}/64 live" in c.reason, c.reason
    assert f"{live['gate_proj']}/64" in sp.summary()


def test_explain_table_width_follows_content():
    torch._dynamo.reset()
    rep = blast_compile.explain(sparse_block(0.9), torch.randn(3, 64))
    widths = {len(line) for line in rep.table(width=400).splitlines() if line.strip()}
    assert max(widths) < 300  # as wide as the rows need, not the allowed width
    assert max(len(line) for line in rep.table(width=100).splitlines()) <= 100


def test_hf_llama_every_mlp_fused_logits_match():
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sparsify_mlps_(model, 0.9, block=32)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        out = torch.compile(model, backend="blast")(ids).logits
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    assert counters["blast"]["mlp_fused"] == cfg.num_hidden_layers


def test_rewritten_graph_keeps_dynamo_metadata_for_static_inputs():
    """AOTAutograd finds parameters/static buffers (for CUDA graphs) through Dynamo's
    annotations on the GraphModule and its placeholders; the rewrite must keep them."""
    from blast_compile.backend import _copy_graph_module

    seen = {}

    def record(gm, example_inputs):
        new = _copy_graph_module(gm)
        seen["src"] = hasattr(new, "_param_name_to_source")
        seen["nodes"] = all(hasattr(n, "_dynamo_source") for n in new.graph.nodes if n.op == "placeholder")
        seen["id"] = "dynamo_compile_id" in new.meta
        return gm

    torch._dynamo.reset()
    torch.compile(sparse_block(), backend=record)(torch.randn(2, 64))
    assert seen == {"src": True, "nodes": True, "id": True}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 48])
def test_gpu_reduce_overhead_cuda_graphs(m):
    """mode="reduce-overhead": the fused op's plan state must live outside the CUDA-graph
    pool (else "tensors in the cudagraph pool not tracked as outputs"), replays must be right,
    and an in-place weight update (same pattern) must be read by the replays."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    blk = sparse_block().cuda().to(torch.bfloat16)
    x = torch.randn(2, m, 64, device="cuda", dtype=torch.bfloat16)
    cm = torch.compile(blk, backend="blast", mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(4):
            out = cm(x).clone()
        torch.testing.assert_close(out, blk(x), **tol(torch.bfloat16))
        blk.mlp.up_proj.weight.mul_(0.5)
        for _ in range(2):
            out = cm(x).clone()
        torch.testing.assert_close(out, blk(x), **tol(torch.bfloat16))
    assert counters["blast"]["mlp_fused"] == 1


@pytest.mark.gpu
def test_gpu_reduce_overhead_new_decode_chunks(monkeypatch):
    """A decode batch whose split-K chunk sizes differ from those the warm-up built (M = 1: the
    GEMV's; M = 8: the dots') builds its work tables inside a CUDA-graph trees warm-up run:
    they must still be made outside the graph pool (round 9's e2e batch 8 failed here)."""
    force_splitk(monkeypatch, DECODE_GEMV_CONFIGS=[(1, 1, 2, 2)], DECODE_CONFIGS=[(2, 2, 2, 1)])
    torch._dynamo.reset()
    blk = sparse_block().cuda().to(torch.bfloat16)
    cm = torch.compile(blk, backend="blast", mode="reduce-overhead")
    with torch.no_grad():
        for b in (1, 8, 1, 8, 8):
            x = torch.randn(b, 1, 64, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(cm(x).clone(), blk(x), **tol(torch.bfloat16))
    assert counters["blast"]["mlp_fused"] >= 1


def test_static_launch_setting(monkeypatch, caplog):
    """The lowered kernels' static launch: the variable Inductor's compile workers read is set unless the user
    set it (then theirs holds, "0" included), and the in-process patch follows it; ``static_launch=False`` leaves
    both alone."""
    from blast_compile import backend
    from blast_compile.config import BlastOptions

    env = backend.STATIC_LAUNCH_ENV
    monkeypatch.delenv(env, raising=False)
    assert backend._static_launch(BlastOptions.from_options({"static_launch": False})) == {}
    assert env not in os.environ
    assert backend._static_launch(BlastOptions()) == {"static_launch_user_defined_triton_kernels": True}
    assert os.environ[env] == "1"
    monkeypatch.setenv(env, "0")
    assert backend._static_launch(BlastOptions()) == {} and os.environ[env] == "0"
    # workers started before blast set it keep Triton's launcher: said, not hidden
    monkeypatch.delenv(env)
    monkeypatch.setattr(backend, "_compile_workers_started", lambda: True)
    with caplog.at_level(logging.INFO, logger="blast_compile.backend"):
        assert backend._static_launch(BlastOptions()) == {"static_launch_user_defined_triton_kernels": True}
    assert any("keep Triton's launcher" in r.getMessage() for r in caplog.records)
    import torch._inductor.config as ic

    assert hasattr(ic, "static_launch_user_defined_triton_kernels")  # (the key the patch names exists)


def test_lowered_graphs_compile_with_the_static_launch_patch(monkeypatch):
    """Wiring: a graph with lowered MLPs is handed to Inductor with the static-launch patch, a graph without none
    (lowering is CUDA-only: stood in for here by a ``_lower`` that reports one watch)."""
    import torch._inductor.compile_fx as cfx

    from blast_compile import backend

    class FakeWatch:
        name, plan = "mlp0", None

        def params(self):
            return []

        def masks(self):
            return []

    seen = []
    real = cfx.compile_fx
    monkeypatch.setattr(cfx, "compile_fx", lambda g, ins, config_patches=None, **kw: (
        seen.append(config_patches), real(g, ins, config_patches=config_patches, **kw))[1])
    monkeypatch.delenv(backend.STATIC_LAUNCH_ENV, raising=False)
    m, x = sparse_block(), torch.randn(4, 64)
    patched = []
    for watches in ([], [FakeWatch()]):
        monkeypatch.setattr(backend, "_lower", lambda gm, ins, opts, w=watches: (gm, w))
        torch._dynamo.reset()
        seen.clear()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(m, backend="blast")(x), m(x))
        # (compile_fx given patches calls itself again without them: the first call is the backend's)
        patched.append(bool(seen[0] and seen[0].get("static_launch_user_defined_triton_kernels")))
    torch._dynamo.reset()
    assert patched == [False, True]
