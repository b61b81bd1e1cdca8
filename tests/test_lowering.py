"""Lowered MLPs on CPU: how they trace (tests/_trace_lowered.py, in a subprocess with a fake CUDA target) and the
guard that keeps a compiled pattern honest (the compiled graph stubbed out: its kernels need a GPU)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from blast_compile.formats import pattern_from_weights
from blast_compile.guard import GraphGuard, Watch
from blast_compile.masks import clear_mask, declare_mask
from blast_compile.ops.sparse_mlp import weights_plan
from blast_compile.testing import zero_blocks_

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def traces():
    cases = ["prefill", "decode", "dynamic", "train", "train_plain", "train_pre", "autocast", "export",
             "export_dynamic", "export_hf", "packed", "decode_splitk", "decode_pf", "decode_splitk_pf",
             "train_plain_autocast", "decode_split_y"]
    out = subprocess.run([sys.executable, os.path.join(HERE, "_trace_lowered.py"), *cases], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    lines = [json.loads(s) for s in out.stdout.splitlines() if s.startswith("{")]
    got = {c["case"]: c for c in lines}
    assert set(cases) <= set(got), out.stdout[-2000:] + out.stderr[-4000:]
    return got


def test_split_k_decode_lowered_takes_its_scratch_by_address(traces):
    """DECODE_PATH "splitk" in a lowered op: its scratch (fp32 partial sums, counters, flags; the kernels leave
    it zero) is its plan's, passed by address -- no fill per call, no scratch input for Inductor to clone: the
    two kernels, and nothing of the weights or tables written or copied (the kernels' pointer bitcasts keep
    AOTAutograd's analysis of what they store to exact)."""
    (g,) = traces["decode_splitk"]["fw"]
    assert kernels(g) == ["mlp_decode_in", "mlp_decode_dn"] and g["fills"] == [], g
    assert not g["writes_input"] and not g["copies"], g


def test_split_y_decode_lowered_takes_its_scratch_by_address(traces):
    """The sliced decode whose ``bsmm`` splits each row slice's reduction over programs: its scratch (partial sums,
    counters the kernel leaves zero) is the plan's, passed by address like split-K's -- the two kernels, no fill,
    nothing written or copied that Inductor sees."""
    (g,) = traces["decode_split_y"]["fw"]
    assert kernels(g) == ["mlp_hidden", "bsmm"] and g["fills"] == [], g
    assert not g["writes_input"] and not g["copies"], g


def test_lowered_kernels_take_no_int_past_int32(traces):
    """Inductor's user-kernel signature (torch 2.11) fails on a plain int argument past int32 (the split-K
    scratch address once): the lowered compile then fell back to the opaque op. Every traced kernel's ints fit."""
    for case, t in traces.items():
        for g in t.get("fw", []) + t.get("joint", []):
            assert not g.get("big_ints"), (case, g)


@pytest.mark.parametrize("case,inputs", [("decode", 7), ("prefill", 4)])
def test_inference_graph_takes_only_the_tables_its_kernels_read(traces, case, inputs):
    """Each graph input is checked and passed at every call (host time): an inference graph's lowered op reads
    the 9 tables its two kernels read (CSR rows, columns and order of W1/W3 and of W2; W1, W3 and W2 block
    offsets), not the backward's or other paths' of the same plan (25 before), and gets them packed into one
    buffer per dtype (int32 indices, int64 offsets): two graph inputs."""
    (g,) = traces[case]["fw"]
    assert traces[case]["tables"] == [[9, 2]], traces[case]
    assert g["inputs"] == inputs + 2, g  # x and the weights (decode: and three biases), then the table buffers


def test_training_graph_takes_its_tables_packed(traces):
    """A training MLP's forward and backward read 25 tables (the backward's CSC lists, dW's live and dead blocks):
    two buffers in the joint graph, not 25 inputs saved for the backward one by one."""
    assert traces["train"]["tables"] == [[25, 2]], traces["train"]
    (g,) = traces["train"]["joint"]
    assert g["inputs"] == 5 + 2, g  # x, the three weights, the tangent; the two table buffers


def test_decode_with_w2_prefetch_lowers_without_writes(traces):
    """The sliced decode whose kernel 1 prefetches W2 into L2 (a lowered op's stand-in for PDL): the prefetch is
    in the traced kernel, and AOTAutograd still sees it write only H (an impure inline asm would count as a
    write to every input: weights cloned per call)."""
    (g,) = traces["decode_pf"]["fw"]
    assert kernels(g) == ["mlp_hidden", "bsmm"], g
    assert [k for k, _ in g["prefetch"]] == ["mlp_hidden"], g
    assert not g["writes_input"] and not g["copies"] and not g["fills"], g
    (g,) = traces["decode_splitk_pf"]["fw"]  # split-K's kernel 1 likewise
    assert kernels(g) == ["mlp_decode_in", "mlp_decode_dn"], g
    assert [k for k, _ in g["prefetch"]] == ["mlp_decode_in"], g
    assert not g["writes_input"] and not g["copies"] and not g["fills"], g


def test_export_of_a_transformers_model(traces):
    """A transformers Llama exports with every MLP lowered (dynamic sequence length, logits out)."""
    t = traces["export_hf"]
    if "unsupported" in t:
        pytest.skip(f"plain torch.export of this transformers model fails on torch {torch.__version__}: "
                    f"{t['unsupported']}")
    assert t["targets"].count("blast.mlp.default") == 2 and t["counters"]["lowered"] == 2, t
    assert not [x for x in t["targets"] if "sparse_mlp" in x]


def test_compressed_mlp_is_lowered(traces):
    """blast::packed_mlp (a compressed model) becomes blast::mlp_packed: two launches in the graph, no copies;
    exported, the program calls blast::mlp_packed and never the opaque op."""
    t = traces["packed"]
    assert t["counters"]["lowered_packed"] == t["counters"]["mlp_fused_packed"] == 2, t["counters"]
    for g in t["fw"]:
        assert kernels(g) == ["mlp_hidden", "bsmm"] and not g["copies"] and not g["writes_input"], g
    e = traces["export_packed"]
    assert e["targets"].count("blast.mlp_packed.default") == 1 and not [x for x in e["targets"] if "packed_mlp" in x]


def _packed_watch(copied):
    from blast_compile.guard import PackedWatch
    from blast_compile.ops import packed_mlp

    torch.manual_seed(0)
    blocks = [torch.randn(3, 16, 16), torch.randn(2, 16, 16)]
    index = [torch.tensor([0, 2, 3]), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2]), torch.tensor([1, 0])]
    plan = packed_mlp.packed_plan(blocks[0], index[0], index[1], None, None, None, None, None, blocks[1], index[2],
                                  index[3], None, "relu", 16, 16, 32, 32, 32, "test")
    w = PackedWatch("p", plan, [(blocks[0], []), None, (blocks[1], []), None, None, None],
                    [(index[0], []), (index[1], []), None, None, (index[2], []), (index[3], [])],
                    copied=[copied, False, False])
    return w, blocks, index


def test_packed_watch_new_values_keep_the_graph_a_new_index_does_not():
    w, blocks, index = _packed_watch(copied=False)
    assert w.valid()
    blocks[0].mul_(2)  # read where stored: new values are seen
    assert w.valid()
    blocks[1][0, 0, 0] = float("nan")
    assert not w.valid()
    blocks[1][0, 0, 0] = 0.0
    assert w.valid()
    index[1][2] = 1  # another pattern
    assert not w.valid()


def test_packed_watch_copied_blocks_must_not_change():
    w, blocks, _ = _packed_watch(copied=True)
    assert w.valid()
    blocks[1].mul_(2)  # (not copied)
    assert w.valid()
    blocks[0].mul_(2)  # the kernels read a copy taken at compile time
    assert not w.valid()


@pytest.mark.parametrize("case", ["export", "export_dynamic"])
def test_export_holds_the_lowered_op_and_its_tables(traces, case):
    """blast_compile.export: the ExportedProgram calls blast::mlp (kept whole for AOTInductor), never the
    opaque op, with the index tables as constants of the program; a dynamic row range stays one symbol."""
    t = traces[case]
    assert t["targets"].count("blast.mlp.default") == 1 and not [x for x in t["targets"] if "sparse_mlp" in x]
    assert t["counters"]["lowered"] == 1 and t["counters"]["exported"] == 1
    assert any(c.startswith("_blast_table_") for c in t["constants"])
    assert (t["rows"] == "40") != (case == "export_dynamic"), t["rows"]


def kernels(graph):
    return [k for k, _ in graph["kernels"]]


@pytest.mark.parametrize("case", ["prefill", "decode", "dynamic", "train", "train_plain", "train_pre", "autocast"])
def test_lowered_kernels_write_only_their_outputs(traces, case):
    """Every kernel writes tensors the graph allocated: no weight, table or input is cloned or copied back
    (AOTAutograd's analysis of the kernels' TTIR found exactly what they store to)."""
    t = traces[case]
    assert t["counters"]["lowered"] >= 1
    for g in t["fw"] + t["joint"]:
        assert g["writes_input"] == []


@pytest.mark.parametrize("case", ["prefill", "decode", "dynamic", "train", "train_plain", "train_pre", "autocast"])
def test_lowered_graphs_hold_no_copies(traces, case):
    """No scatter/copy/clone around the kernels: each writes whole tensors of its own (a kernel writing views
    of one buffer, or given one tensor for two pointers, made Inductor copy [M, hidden] tensors per call).
    Casts only: autocast's x (once, in the graph, where Inductor fuses it); the backward reads the forward's NaN/Inf
    row flags (blast::mlp_train's f) instead of scanning x and casting the result."""
    for g in traces[case]["fw"]:
        assert g["copies"] == (["_to_copy"] if case == "autocast" else [])
    for g in traces[case]["joint"]:
        assert g["copies"] == []
    if traces[case]["joint"]:
        assert traces[case]["counters"]["forward_flags_reused"] >= 1


@pytest.mark.parametrize("case", ["prefill", "decode", "dynamic", "packed"])
def test_forward_fills_nothing_before_its_kernels(traces, case):
    """The forward's NaN/Inf row flags are written slice by slice by the kernel that scans x (``_scan_x``): no
    zeroed buffer, so no fill launch in Inductor's code before the MLP's two kernels."""
    for g in traces[case]["fw"]:
        assert g["fills"] == [], g


def test_prefill_and_decode_are_two_launches(traces):
    for case in ("prefill", "decode"):
        assert kernels(traces[case]["fw"][0]) == ["mlp_hidden", "bsmm"]


def test_dynamic_m_compiles_once_for_prefill(traces):
    """Four prefill sizes: a static graph, then one dynamic graph for the other three (no guard on M's value)."""
    t = traces["dynamic"]
    assert t["counters"]["graphs"] == 2
    assert "neg" in t["fw"][1]["kernels"][0][1] or "s" in t["fw"][1]["kernels"][0][1]  # a symbolic grid


def test_training_backward_is_lowered(traces):
    joint = kernels(traces["train"]["joint"][0])
    assert joint[:2] == ["mlp_hidden", "bsmm"]
    assert "mlp_hidden_bwd" in joint and joint.count("bsmm") == 2 and "sddmm" in joint  # declared masks: dW on blocks
    plain = kernels(traces["train_plain"]["joint"][0])
    assert "mlp_hidden_bwd" in plain and "sddmm" not in plain  # no declared mask: dW is dense (a matmul)
    assert traces["train"]["counters"]["lowered_train"] == 1
    # the training op: its forward keeps H (and with save_hidden="all" the pre-activations) for the backward
    assert traces["train"]["counters"]["save_hidden"] == 1 and traces["train_pre"]["counters"]["save_preacts"] == 1


def test_autocast_packs_master_weights_in_the_graph(traces):
    assert kernels(traces["autocast"]["fw"][0]).count("pack_blocks") == 1  # (one launch packs the three weights)
    # a plain MLP: W1 stands in for W3 in that launch; nothing may read as written (a copy of W1 in the graph);
    # training: the backward reads the forward's copies (blast::mlp_train's c1, c3, c2): one pack per step
    t = traces["train_plain_autocast"]
    (fw,), (joint,) = t["fw"], t["joint"]
    assert kernels(fw).count("pack_blocks") == 1 and kernels(joint).count("pack_blocks") == 1, t
    assert t["counters"]["packed_copies_reused"] >= 1, t
    assert not fw["writes_input"] and not joint["writes_input"], t
    assert "clone" not in fw["copies"] + joint["copies"], t


# --- the guard ---------------------------------------------------------------------------------------


class Calls:
    def __init__(self):
        self.n = 0

    def __call__(self, *args):
        self.n += 1
        return args


def make_guard(declare=False):
    torch.manual_seed(0)
    w1, w3, w2 = (torch.nn.Parameter(torch.randn(*s)) for s in ((64, 32), (64, 32), (32, 64)))
    g = torch.Generator().manual_seed(0)
    for w in (w1, w3, w2):
        zero_blocks_(w.data, 0.6, (16, 16), g)
    if declare:
        for w in (w1, w3, w2):
            declare_mask(w, (w.detach().view(w.shape[0] // 16, 16, -1, 16) != 0).any(3).any(1), (16, 16))
    key = pattern_from_weights(w1, w3, w2, 16, 16, activation="silu", has_b1=False, has_b3=False).key
    plan = weights_plan(None, w1, None, w3, None, w2, None, "silu", 16, 16, key, 0.75)  # (as passes/lower.py does)
    watch = Watch("p", plan, [(w1, []), (w3, []), (w2, [])], "silu")
    compiled, fallback = Calls(), Calls()
    return GraphGuard(compiled, fallback, [watch]), compiled, fallback, (w1, w3, w2)


def dead_block(w):
    return (w.detach().view(w.shape[0] // 16, 16, -1, 16) == 0).all(3).all(1).nonzero()[0].tolist()


def test_guard_new_values_in_the_pattern_keep_the_compiled_graph():
    guard, compiled, fallback, (w1, w3, w2) = make_guard()
    guard(1)
    with torch.no_grad():
        w1.mul_(2.0)  # in place, same pattern
    guard(1)
    assert (compiled.n, fallback.n) == (2, 0)
    assert counters["blast"]["graph_revalidated"] == 1


def test_guard_revived_block_runs_the_fallback_until_it_fits_again():
    guard, compiled, fallback, (w1, w3, w2) = make_guard()
    r, c = dead_block(w2)
    with torch.no_grad():
        w2[r * 16, c * 16] = 1.0
    with pytest.warns(RuntimeWarning, match="no longer fit"):
        guard(1)
    guard(1)
    assert (compiled.n, fallback.n) == (0, 2)
    with torch.no_grad():
        w2[r * 16, c * 16] = 0.0
    guard(1)
    assert (compiled.n, fallback.n) == (1, 2)


def test_guard_passes_the_inputs_as_dynamo_gave_them():
    """Dynamo calls a backend's result with the inputs unpacked, even when Inductor's result carries
    ``_boxed_call`` (copied by ``functools.wraps`` from the boxed function inside it, torch 2.11): the fallback
    gets the same inputs, not a list it was never given (a GPU-only crash before)."""
    guard, compiled, fallback, (w1, w3, w2) = make_guard()
    compiled._boxed_call = True
    guard = GraphGuard(compiled, fallback, guard.watches)
    assert not hasattr(guard, "_boxed_call")  # (Dynamo must not be told to box)
    a, b = torch.ones(2), 7
    assert guard(a, b) == (a, b)
    r, c = dead_block(w2)
    with torch.no_grad():
        w2[r * 16, c * 16] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert guard(a, b) == (a, b)
    assert (compiled.n, fallback.n) == (1, 1)


def test_guard_blocks_that_die_keep_the_compiled_graph():
    guard, compiled, fallback, (w1, w3, w2) = make_guard()
    with torch.no_grad():
        w1.zero_()
    guard(1)
    assert (compiled.n, fallback.n) == (1, 0)


def test_guard_nan_in_a_weight_runs_the_fallback():
    """A NaN where the pattern skips a hidden unit would vanish from the kernels' result: eager spreads it."""
    guard, compiled, fallback, (w1, w3, w2) = make_guard()
    with torch.no_grad():
        w1[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard(1)
    assert fallback.n == 1


def test_guard_sees_data_rebinding():
    guard, compiled, fallback, (w1, w3, w2) = make_guard()
    guard(1)
    w2.data = torch.randn_like(w2)  # moves neither the version counter nor the parameter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard(1)
    assert fallback.n == 1


def test_guard_misaligned_rebinding_runs_the_fallback():
    """Inductor compiled the kernels for the weights' alignment; a weight rebound into a flat buffer at an odd
    offset (``vector_to_parameters`` of odd-sized tensors) must not reach them."""
    guard, compiled, fallback, (w1, w3, w2) = make_guard()
    buf = torch.zeros(w2.numel() + 1)
    buf[1:] = w2.detach().flatten()
    w2.data = buf[1:].view_as(w2)  # same values, same pattern, 4 bytes off
    guard(1)
    assert (compiled.n, fallback.n) == (0, 1)


def test_guard_declared_masks_values_do_not_matter_masks_do():
    guard, compiled, fallback, (w1, w3, w2) = make_guard(declare=True)
    with torch.no_grad():
        w2.add_(1.0)  # W * mask: values outside the mask mean nothing; no look at the weights needed
    guard(1)
    assert (compiled.n, fallback.n) == (1, 0)
    m = w2._blast_mask[0].clone()
    r, c = (~m).nonzero()[0].tolist()
    m[r, c] = True
    declare_mask(w2, m, (16, 16))  # a new mask: dW's live lists no longer match
    with pytest.warns(RuntimeWarning):
        guard(1)
    assert fallback.n == 1
    for w in (w1, w3, w2):
        clear_mask(w)


def test_guard_declared_masks_training_steps_cost_no_revalidation():
    """Every weight declares its mask: optimizer steps (fused: no version moves; in place: versions move) leave the
    compiled graph without a look at the weights -- per step the guard compares masks and addresses only."""
    guard, compiled, fallback, (w1, w3, w2) = make_guard(declare=True)
    opt = torch.optim.AdamW([w1, w3, w2], lr=1e-2, fused=True)
    for w in (w1, w3, w2):
        w.grad = torch.randn_like(w)
    counters.clear()
    for _ in range(3):
        opt.step()
        with torch.no_grad():
            w2.add_(0.5)
        guard(1)
    assert (compiled.n, fallback.n) == (3, 0)
    assert counters["blast"]["graph_revalidated"] == 0
    for w in (w1, w3, w2):
        clear_mask(w)


def test_guard_declared_masks_misaligned_rebinding_runs_the_fallback():
    """... but a weight rebound at an address the kernels were not compiled for is seen (its mask is unchanged)."""
    guard, compiled, fallback, (w1, w3, w2) = make_guard(declare=True)
    guard(1)
    buf = torch.zeros(w2.numel() + 1)
    buf[1:] = w2.detach().flatten()
    w2.data = buf[1:].view_as(w2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard(1)
    assert (compiled.n, fallback.n) == (1, 1)
    for w in (w1, w3, w2):
        clear_mask(w)


def test_export_on_cpu_keeps_the_dense_graph_and_the_model_signature():
    """On CPU there is nothing AOTInductor could call for a fused MLP (its CPU op is Python): the exported program
    is the dense model's, with the model's own arguments, and computes what the model does."""
    from torch._dynamo.utils import counters

    from blast_compile.export import export
    from blast_compile.testing import SwiGLU, sparsify_mlps_

    torch.manual_seed(0)
    m = SwiGLU(64, 128).eval()
    sparsify_mlps_(m, 0.75, block=16)
    x = torch.randn(5, 64)
    counters.clear()
    ep = export(m, (x,))
    assert counters["blast"]["export_cpu_dense"] == 1
    assert not [n for n in ep.graph.nodes if "blast" in str(n.target)]
    x2 = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), m(x2))
    with pytest.raises(ValueError, match="Inductor config"):
        export(m, (x,), options={"max_autotune": True})


def test_register_packs_tables_into_aligned_views():
    """``lowered.register``: the tables a warm-up read go into one buffer per dtype, each at a 16-byte aligned
    offset (Triton specializes pointers on it), holding what the table held; the plan reads the views; tables it
    did not read stay out; float tensors (a compressed MLP's re-packed blocks) go whole. A trace's tables
    (stand-ins here) are sliced the same way."""
    from blast_compile.ops import lowered

    class Plan:
        cache = None

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 99, (9,), dtype=torch.int32, generator=g)
    b = torch.randint(0, 99, (3, 5), dtype=torch.int32, generator=g)
    c = torch.randint(0, 99, (7,), dtype=torch.int64, generator=g)
    fix = torch.rand(2, 3, generator=g) > 0.5
    blocks = torch.randn(4, 8, 8, generator=g)
    unread = torch.arange(5, dtype=torch.int32)
    plan = Plan()
    plan.cache = {"index": (a, b), "off": {"x": c, "again": a}, "fix": fix, "blocks": [blocks], "other": unread}
    originals = {k: v.clone() for k, v in (("a", a), ("b", b), ("c", c), ("fix", fix))}
    used = {id(t) for t in (a, b, c, fix, blocks)}
    name, tensors = lowered.register(plan, "k", used)
    assert [t.dtype for t in tensors] == [torch.int32, torch.int64, torch.bool, torch.float32]
    assert tensors[3] is blocks and plan.cache["blocks"][0] is blocks and plan.cache["other"] is unread
    va, vb = plan.cache["index"]
    assert plan.cache["off"]["again"] is va  # (one view per table, wherever the plan refers to it)
    for view, key, buf in ((va, "a", 0), (vb, "b", 0), (plan.cache["off"]["x"], "c", 1), (plan.cache["fix"], "fix", 2)):
        assert view.untyped_storage().data_ptr() == tensors[buf].untyped_storage().data_ptr()
        assert (view.storage_offset() * view.element_size()) % 16 == 0 and view.is_contiguous()
        assert torch.equal(view, originals[key])
    ent = lowered.LOWERED[name]
    assert ent.plan_for(tensors) is plan
    stand_ins = [t.clone() for t in tensors]
    p2 = ent.plan_for(stand_ins)
    assert p2 is not plan and p2.cache["index"][0].untyped_storage().data_ptr() == stand_ins[0].data_ptr()
    assert torch.equal(p2.cache["index"][1], originals["b"]) and torch.equal(p2.cache["fix"], originals["fix"])
    assert p2.cache["blocks"][0] is stand_ins[3] and p2.cache["other"] is unread
    assert p2.cache["off"]["again"] is p2.cache["index"][0]
    with pytest.raises(RuntimeError, match="tables"):
        ent.plan_for(stand_ins[:2])
