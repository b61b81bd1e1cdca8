"""Issue 27: the wrong answers and crashes adversarial testing found, one regression test each (CPU path;
the GPU versions are in test_adversarial_gpu.py). Each compares against eager PyTorch."""
import copy
import json
import math
import os
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from blast_compile import compress as C
from blast_compile import masks
from blast_compile import config
from blast_compile.config import BlastOptions
from blast_compile.formats import cdiv, choose_block, expand_mask, pattern_from_weights
from blast_compile.ops.activations import dense_mlp
from blast_compile.testing import SwiGLU, random_block_mask, sparsify_mlps_
from conftest import tol

FUSED_OPTS = [
    lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, fused=True),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-1, fused=True),
]
FUSED_IDS = ["Adam", "AdamW", "SGD", "Adagrad"]


def op(x, w1, b1, w3, b3, w2, b2, act, compiled=None, max_density=1.0):
    """``blast::sparse_mlp`` as the backend would emit it (block shape and key from the weights now)."""
    if compiled is None:
        ch = choose_block(w1, w3, w2)
        bh, bd = (ch.bh, ch.bd) if ch else (16, 16)
        key = pattern_from_weights(w1, w3, w2, bh, bd, activation=act, has_b1=b1 is not None,
                                   has_b3=b3 is not None).key
        compiled = bh, bd, key
    return torch.ops.blast.sparse_mlp(x, w1, b1, w3, b3, w2, b2, act, *compiled, max_density), compiled


def half_dead_mlp(d=64, h=128, bias=True, seed=0):
    """The issue's MLP: hidden units 32.. dead on both sides (W1 rows, W2 columns)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(d, h, bias=bias), nn.ReLU(), nn.Linear(h, d, bias=bias))
    with torch.no_grad():
        m[0].weight[32:] = 0
        m[2].weight[:, 32:] = 0
    return m


# --- 1. fused optimizers --------------------------------------------------------------------------------

@pytest.mark.parametrize("make_opt", FUSED_OPTS, ids=FUSED_IDS)
def test_fused_optimizer_steps_are_seen_by_the_op(make_opt):
    """Fused optimizers write the weights without moving ``_version``: the op must still see the new
    values (CPU: its packed copies of the live blocks) and a pattern they change."""
    m = half_dead_mlp()
    ps = [m[0].weight, m[0].bias, m[2].weight, m[2].bias]
    opt = make_opt(ps)
    x = torch.randn(8, 64)
    compiled = None
    for step in range(4):
        y, compiled = op(x, ps[0], ps[1], None, None, ps[2], ps[3], "relu", compiled)
        torch.testing.assert_close(y, m(x), **tol(torch.float32), msg=f"step {step}")
        m(torch.randn(8, 64)).square().mean().backward()  # dense grads: dead blocks come alive too
        vers = [p._version for p in ps]
        opt.step()
        opt.zero_grad()
        assert [p._version for p in ps] == vers  # (the premise: fused steps move no version counter)


def test_fused_adam_training_compiled_matches_eager():
    """The issue's case: 4 fused-Adam steps of a compiled model beside an eager twin."""
    torch._dynamo.reset()
    m, ref = half_dead_mlp(seed=1), half_dead_mlp(seed=1)
    cm = torch.compile(m, backend="blast")
    opt, opt_ref = (torch.optim.Adam(k.parameters(), lr=1e-2, fused=True) for k in (m, ref))
    x = torch.randn(16, 64)
    for step in range(4):
        loss, loss_ref = cm(x).square().mean(), ref(x).square().mean()
        torch.testing.assert_close(loss, loss_ref, **tol(torch.float32), msg=f"step {step}")
        loss.backward()
        loss_ref.backward()
        opt.step(), opt_ref.step(), opt.zero_grad(), opt_ref.zero_grad()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol(torch.float32))
    assert counters["blast"]["mlp_fused"] >= 1


def test_fused_optimizer_with_declared_masks_keeps_the_plan_fresh():
    """With declared masks the op skips the look at the weights after a step; it must still drop its
    packed CPU copies after a fused step (the sparsifier's hand-off with HF's adamw_torch_fused)."""
    m = half_dead_mlp(bias=False)
    w1, w2 = m[0].weight, m[2].weight
    masks.declare_mask(w1, torch.arange(8)[:, None].expand(8, 4) < 2, (16, 16))
    masks.declare_mask(w2, torch.arange(8)[None, :].expand(4, 8) < 2, (16, 16))
    try:
        opt = torch.optim.AdamW([w1, w2], lr=1e-2, fused=True)
        x = torch.randn(8, 64)
        compiled = (16, 16, "declared")
        for _ in range(3):
            y, _ = op(x, w1, None, None, None, w2, None, "relu", compiled)
            torch.testing.assert_close(y, m(x), **tol(torch.float32))
            y.square().mean().backward()  # through the op: dW on declared-live blocks only
            opt.step()
            opt.zero_grad()
        assert counters["blast"]["masked_weight_update"] >= 2
    finally:
        masks.clear_mask(w1), masks.clear_mask(w2)


# --- 2. .data rebinding ---------------------------------------------------------------------------------

def test_data_rebinding_never_brings_back_an_old_plan():
    """``vector_to_parameters(base + noise, ...)`` (evolution strategies) rebinds every ``p.data`` to a fresh
    tensor each iteration; freed tensors' addresses come back, with the old plans keyed on them."""
    m = half_dead_mlp(seed=2)
    ps = list(m.parameters())
    base = torch.nn.utils.parameters_to_vector(ps).detach()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64)
    compiled = None
    for it in range(30):
        noise = torch.randn(base.shape, generator=g) * 0.1 * ((base != 0) if it % 3 else 1)  # every third: revived
        torch.nn.utils.vector_to_parameters(base + noise, ps)
        y, compiled = op(x, ps[0], ps[1], None, None, ps[2], ps[3], "relu", compiled)
        torch.testing.assert_close(y, m(x), **tol(torch.float32), msg=f"iteration {it}")


def test_data_rebinding_compiled():
    torch._dynamo.reset()
    m = half_dead_mlp(seed=3)
    cm = torch.compile(m, backend="blast")
    ps = list(m.parameters())
    base = torch.nn.utils.parameters_to_vector(ps).detach()
    x = torch.randn(8, 64)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
        for it in range(12):
            noise = torch.randn(base.shape) * 0.3 * ((base != 0) if it % 3 else 1)  # every third: dead blocks revived
            torch.nn.utils.vector_to_parameters(base + noise, ps)
            torch.testing.assert_close(cm(x), m(x), **tol(torch.float32), msg=f"iteration {it}")
    assert counters["blast"]["mlp_fused"] == 1


def test_snapshot_sees_versions_storages_layouts_and_fused_steps():
    from blast_compile.ops.watch import Snapshot, watch

    base = torch.randn(256)
    p = nn.Parameter(base[:64].view(8, 8).clone())
    q = nn.Parameter(torch.randn(8, 8))  # not watched
    watch(p)
    snap = Snapshot([p, None, q])
    assert not snap.changed([p, None, q])
    assert snap.changed([p, q, None]) and snap.changed([p, None])
    with torch.no_grad():
        p.add_(1)
    assert snap.changed([p, None, q])
    snap.update([p, None, q])
    for rebind in (lambda: base[:64].view(8, 8), lambda: base[64:128].view(8, 8), lambda: base[:64].view(8, 8).t(),
                   lambda: base[:32].view(4, 8)):
        p.data = rebind()  # another storage, then the same storage at another offset / stride / shape
        assert snap.changed([p, None, q])
        snap.update([p, None, q])
        assert not snap.changed([p, None, q])
    p.data = torch.randn(8, 8)
    snap.update([p, None, q])
    p.grad, q.grad = torch.ones(8, 8), torch.ones(8, 8)
    torch.optim.SGD([q], lr=0.1, fused=True).step()
    assert not snap.changed([p, None, q])  # (q is not watched: a fused step on it is not counted)
    torch.optim.SGD([p], lr=0.1, fused=True).step()
    assert snap.changed([p, None, q])
    # layout=False (the op's plans: their key holds the layout) still sees versions, storages, steps
    p.data = base[:64].view(8, 8)
    lean = Snapshot([p], layout=False)
    p.data = base[64:128].view(8, 8)
    assert not lean.changed([p]) and snap.changed([p, None, q])
    p.data = torch.randn(8, 8)
    assert lean.changed([p])
    lean.update([p])
    with torch.no_grad():
        p.mul_(2)
    assert lean.changed([p])


def test_snapshot_survives_address_reuse():
    """A rebound parameter's old storage is freed and its address may come back for the next tensor: the
    snapshot holds the old StorageImpl (not its data), so the new storage is never mistaken for it."""
    from blast_compile.ops.watch import Snapshot

    p = nn.Parameter(torch.randn(64, 64))
    snap = Snapshot([p])
    for _ in range(20):  # (whether the allocator hands the first address back is its business)
        p.data = torch.randn(64, 64)
        assert snap.changed([p])


def test_snapshot_update_keeps_the_refs_of_storages_that_did_not_move():
    """A training step re-takes every weight (guard.GraphGuard): an update keeps the weak ref of a storage seen at the
    same position (the ref held it, so an equal address is the same storage) and takes a new one where it moved --
    still blind to nothing across 20 rebinds that may reuse the freed address."""
    from blast_compile.ops.watch import Snapshot

    p, q = nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(64, 64))
    snap = Snapshot([p, None, q])
    ref_p, ref_q = snap._refs[0], snap._refs[2]
    with torch.no_grad():
        q.add_(1)
    assert snap.changed([p, None, q])
    snap.update([p, None, q])
    assert snap._refs[0] is ref_p and snap._refs[2] is ref_q and not snap.changed([p, None, q])
    for _ in range(20):
        p.data = torch.randn(64, 64)
        assert snap.changed([p, None, q])
        snap.update([p, None, q])
        assert not snap.changed([p, None, q]) and snap._refs[2] is ref_q
    assert snap._refs[0] is not ref_p


def test_optimizer_from_outside_torch_optim_writing_through_data():
    """An optimizer that is not torch.optim's may write without moving ``_version`` (apex, bitsandbytes:
    kernels on raw pointers); its steps are counted like fused ones."""
    class RawSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, dict(lr=lr))

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.data.add_(p.grad, alpha=-g["lr"])  # (no version bump)

    m = half_dead_mlp(seed=4)
    ps = [m[0].weight, m[0].bias, m[2].weight, m[2].bias]
    opt = RawSGD(ps, lr=0.5)
    x = torch.randn(8, 64)
    compiled = None
    for step in range(3):
        y, compiled = op(x, ps[0], ps[1], None, None, ps[2], ps[3], "relu", compiled)
        torch.testing.assert_close(y, m(x), **tol(torch.float32), msg=f"step {step}")
        m(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()


# --- 3. safetensors header dtype edits ------------------------------------------------------------------

def _edit_header(path, out, edit):
    """Rewrite the JSON header of a safetensors file (``edit(header) -> header``), same length (padded)."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    new = json.dumps(edit(hdr), separators=(",", ":")).encode()
    assert len(new) <= n, "edit made the header longer"
    open(out, "wb").write(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


def _small_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sparsify_mlps_(model, 0.75, block=16)
    C.compress_(model)
    return cfg, model


@pytest.mark.parametrize("key,old,new", [
    ("model.layers.0.mlp.gate_proj.col_idx", "I32", "F32"),
    ("__nonpersistent__.model.rotary_emb.inv_freq", "F32", "I32"),
    ("model.layers.0.mlp.gate_proj.blocks", "BF16", "F16"),
    ("model.layers.0.mlp.down_proj.blocks", "BF16", "I16"),
    ("model.norm.weight", "BF16", "F16"),
    ("model.layers.0.mlp.up_proj.row_ptr", "I32", "U32"),
    ("model.layers.0.mlp.up_proj.blocks", "F32", "I32"),
])
@pytest.mark.parametrize("recorded", [True, False], ids=["dtypes_recorded", "older_file"])
def test_header_dtype_edits_are_a_value_error(tmp_path, key, old, new, recorded):
    """The checksums cover bytes; a header edit reinterprets them. Files record their dtypes now; files
    without that record still get the model's structural checks (kind of each tensor, int32 indices,
    blocks and bias in one dtype) -- a float-to-float edit of those is then undetectable (skipped)."""
    transformers = pytest.importorskip("transformers")
    cfg, model = _small_llama()
    if old == "BF16":
        model = model.to(torch.bfloat16)
    if not recorded and {old, new} <= {"BF16", "F16", "F32"}:
        pytest.skip("a float-to-float edit of a file without recorded dtypes loads (documented)")
    path = str(tmp_path / "m.safetensors")
    C.save_compressed(model, path)

    def edit(h):
        assert h[key]["dtype"] == old, h[key]
        h[key]["dtype"] = new
        return h

    def drop_record(h):
        h["__metadata__"].pop("dtypes")
        return h

    if not recorded:  # as written before the dtypes were recorded
        _edit_header(path, path, drop_record)
    bad = str(tmp_path / "bad.safetensors")
    _edit_header(path, bad, edit)
    if not recorded:
        _edit_header(path, str(tmp_path / "ok.safetensors"), lambda h: h)
        C.load_compressed(lambda: transformers.LlamaForCausalLM(cfg), str(tmp_path / "ok.safetensors"))
    with pytest.raises(ValueError, match="dtype"):
        C.load_compressed(lambda: transformers.LlamaForCausalLM(cfg), bad)


def test_from_pretrained_without_blast_json_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    _, model = _small_llama()
    d = str(tmp_path / "ckpt")
    C.save_pretrained(model, d)
    os.remove(os.path.join(d, "blast.json"))
    with pytest.raises(FileNotFoundError, match="blast.json.*save_pretrained"):
        C.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        C.from_pretrained(str(tmp_path / "nowhere"))


# --- 4. sparsifier block sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("bs", [24, 100, 8, 256, 0, -16, 16.5, True, "64"])
def test_sparsifier_rejects_block_sizes_the_backend_cannot_use(bs):
    from blast_compile.sparsifier import BlastSparsifier

    m = nn.Sequential()
    m.mlp = nn.Module()
    m.mlp.fc1, m.mlp.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)
    with pytest.raises(ValueError, match=r"block_size.*16, 32, 64, 128"):
        BlastSparsifier(m, 0.5, block_size=bs, end_step=10)


def test_declared_mask_finer_than_the_fused_block_gets_no_gradient_on_dead_parts():
    """Masks declared at 32x32 on an MLP fused at 64x64: a live 64-block holds declared-dead 32-blocks.
    ``W * mask`` means their gradient is zero (else they come back after the sparsifier's hand-off)."""
    torch.manual_seed(0)
    w1 = torch.randn(128, 64, dtype=torch.float64)
    w2 = torch.randn(64, 128, dtype=torch.float64)
    m1 = random_block_mask(4, 2, 0.5, torch.Generator().manual_seed(1))
    m2 = random_block_mask(2, 4, 0.5, torch.Generator().manual_seed(2))
    w1 *= expand_mask(m1, 32, 32, w1.shape)
    w2 *= expand_mask(m2, 32, 32, w2.shape)
    w1.requires_grad_(), w2.requires_grad_()
    masks.declare_mask(w1, m1, (32, 32))
    masks.declare_mask(w2, m2, (32, 32))
    try:
        x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
        key = pattern_from_weights(w1, None, w2, 64, 64, activation="gelu", has_b1=False, has_b3=False).key
        y, _ = op(x, w1, None, None, None, w2, None, "gelu", (64, 64, key))
        r = dense_mlp(x, w1, None, None, None, w2, None, "gelu")
        torch.testing.assert_close(y, r)
        gy = torch.randn_like(y)
        got, exp = torch.autograd.grad(y, [x, w1, w2], gy), torch.autograd.grad(r, [x, w1, w2], gy)
        torch.testing.assert_close(got[0], exp[0])
        torch.testing.assert_close(got[1], exp[1] * expand_mask(m1, 32, 32, w1.shape))
        torch.testing.assert_close(got[2], exp[2] * expand_mask(m2, 32, 32, w2.shape))
    finally:
        masks.clear_mask(w1), masks.clear_mask(w2)


# --- 5. NaN/Inf in weights of skipped hidden units --------------------------------------------------------

def _nan_cases():
    nan, inf = float("nan"), float("inf")
    return {
        "w1_nan": lambda p: p["w1"].__setitem__((40, 3), nan),
        "w1_inf": lambda p: p["w1"].__setitem__((40, 3), inf),
        "b1_nan": lambda p: p["b1"].__setitem__(40, nan),
        "w2_nan_dead_row": lambda p: p["w2"].__setitem__((5, 100), nan),  # W1 rows 96.. dead
        "w2_inf_dead_row": lambda p: p["w2"].__setitem__((5, 100), -inf),
    }


@pytest.mark.parametrize("case", list(_nan_cases()))
@pytest.mark.parametrize("late", [False, True], ids=["at_build", "after_build"])
def test_non_finite_weights_of_skipped_hidden_units_propagate_like_eager(case, late):
    torch.manual_seed(0)
    p = dict(w1=torch.randn(128, 64), b1=torch.randn(128), w3=None, b3=None, w2=torch.randn(64, 128),
             b2=torch.randn(64))
    p["w2"][:, 32:48] = 0  # hidden units 32..47: W2 columns dead (W1 rows live)
    p["w1"][96:] = 0  # hidden units 96..: W1 rows dead
    p["b1"][96:] = 0
    x = torch.randn(6, 64)
    args = lambda: (x, p["w1"], p["b1"], None, None, p["w2"], p["b2"], "silu")  # noqa: E731
    compiled = None
    if late:  # a plan exists, then the weights change in place
        _, compiled = op(*args())
    _nan_cases()[case](p)
    y, _ = op(*args(), compiled)
    torch.testing.assert_close(y, dense_mlp(*args()), equal_nan=True)


# --- 6. ReLU's gradient at NaN ------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["relu", "relu2"])
@pytest.mark.parametrize("gated", [False, True])
def test_gradient_at_nan_pre_activation_matches_eager(act, gated):
    torch.manual_seed(0)
    d, h = 32, 64
    w = lambda o, i: (torch.randn(o, i, dtype=torch.float64) * (torch.rand(o, i) < 0.5)  # noqa: E731
                      * expand_mask(random_block_mask(cdiv(o, 16), cdiv(i, 16), 0.6), 16, 16, (o, i))).requires_grad_()
    w1, w2 = w(h, d), w(d, h)
    w3 = w(h, d) if gated else None
    x = torch.randn(4, d, dtype=torch.float64)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x.requires_grad_()
    y, _ = op(x, w1, None, w3, None, w2, None, act)
    r = dense_mlp(x, w1, None, w3, None, w2, None, act)
    torch.testing.assert_close(y, r, equal_nan=True)
    ins = [t for t in (x, w1, w3, w2) if t is not None]
    gy = torch.randn_like(r)
    for a, b in zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(r, ins, gy)):
        torch.testing.assert_close(a, b, equal_nan=True)


# --- 7. activations identified by structure -------------------------------------------------------------

def _sqrt2pi():
    return math.sqrt(2.0 / math.pi)


# spellings that are the canonical activation: each must fuse, as that activation
ACT_VARIANTS = {
    "gelu_erf_python": (lambda a: a * 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0))), "gelu"),
    "gelu_tanh_expanded": (lambda a: 0.5 * a + 0.5 * a * torch.tanh(_sqrt2pi() * a + _sqrt2pi() * 0.044715 * a ** 3),
                           "gelu_tanh"),
    "gelu_tanh_div2": (lambda a: a * (1 + torch.tanh(_sqrt2pi() * (a + 0.044715 * a * a * a))) / 2, "gelu_tanh"),
    "gelu_tanh_8_digits": (lambda a: 0.5 * a * (1 + torch.tanh(0.79788456 * a * (1 + 0.044715 * a * a))), "gelu_tanh"),
    "relu_inplace": (lambda a: F.relu(a, inplace=True), "relu"),
    "relu_pow_float": (lambda a: torch.pow(torch.relu(a), 2.0), "relu2"),
    "silu_sigmoid_method_right": (lambda a: a.sigmoid().mul(a), "silu"),
    "silu_plus_zero_times": (lambda a: F.silu(a) + 0.0 * torch.tanh(a), "silu"),
    "neg_neg_relu": (lambda a: -(-torch.relu(a)), "relu"),
}
# functions that agree with a supported activation on many points, or almost: none may fuse
ACT_IMPOSTORS = {
    "relu_plus_bump_at_200": lambda a: torch.relu(a) + 1000 * torch.exp(-(((a - 200) / 10) ** 2)),
    "relu_scaled": lambda a: torch.relu(a) * 1.0001,
    "relu_scaled_9e-7": lambda a: torch.relu(a * 1.0000009),  # (within the old 1e-6 tolerance: fused as relu)
    "gelu_tanh_7_digits": lambda a: 0.5 * a * (1 + torch.tanh(0.7978846 * a * (1 + 0.044715 * a * a))),
    "gelu_tanh_wrong_constant": lambda a: 0.5 * a * (1 + torch.tanh(0.79 * (a + 0.044715 * a ** 3))),
    "gelu_plus_tiny_cubic": lambda a: F.gelu(a) + 1e-3 * a ** 3,
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),
    "silu_times_sigmoid": lambda a: a * torch.sigmoid(a) * torch.sigmoid(a),
    "gelu_erf_wrong_scale": lambda a: 0.5 * a * (1.0 + torch.erf(a / 1.4)),
    "relu_minus_relu_of_minus": lambda a: torch.relu(a) - torch.relu(-a),  # (the identity)
    "bump_far_from_probe_points": lambda a: F.silu(a) + torch.exp(-((a - 1e4) ** 2)),
}


class ActMLP(nn.Module):
    def __init__(self, act, d=32, h=64):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, h), nn.Linear(h, d), act
        with torch.no_grad():
            self.fc1.weight[h // 2:] = 0
            self.fc2.weight[:, h // 2:] = 0

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _passes(model, x):
    from _capture import capture
    from blast_compile.passes import run_passes

    gm, ex = capture(model, x)
    cands = run_passes(gm, ex, BlastOptions())
    with torch.no_grad():
        torch.testing.assert_close(gm(*ex)[0], model(x), **tol(torch.float32))
    return gm, cands


@pytest.mark.parametrize("variant", list(ACT_VARIANTS))
def test_activation_spellings_fuse_by_structure(variant):
    act, name = ACT_VARIANTS[variant]
    torch.manual_seed(0)
    _, (c,) = _passes(ActMLP(act), torch.randn(3, 32) * 3)
    assert (c.decision, c.activation) == ("fused", name), c.reason


@pytest.mark.parametrize("impostor", list(ACT_IMPOSTORS))
def test_activations_that_only_look_supported_stay_dense(impostor):
    torch.manual_seed(0)
    m = ActMLP(ACT_IMPOSTORS[impostor])
    with torch.no_grad():  # pre-activations near 200, where the bump is
        m.fc1.bias[:32] = 200.0
    _, cands = _passes(m, torch.randn(3, 32) * 0.01)
    assert all(c.decision == "dense" for c in cands), [(c.activation, c.reason) for c in cands]
    assert counters["blast"]["mlp_fused"] == 0


def test_bit_cast_round_trip_is_not_a_view():
    """``(relu(a).view(torch.int32) * 2).view(torch.float32) / 2`` reinterprets bits: not relu."""
    torch.manual_seed(0)
    gm, cands = _passes(ActMLP(lambda a: (torch.relu(a).view(torch.int32) * 2).view(torch.float32) / 2),
                        torch.randn(3, 32))
    assert all(c.decision == "dense" for c in cands) and counters["blast"]["mlp_fused"] == 0


def test_value_probe_cannot_decide(monkeypatch):
    """The probe only confirms: with it made to agree with anything, an impostor still stays dense; with
    it made to disagree, a true spelling is refused (the structure and the values must both agree)."""
    from blast_compile.passes import normalize

    monkeypatch.setattr(normalize, "_probe_agrees", lambda *a: True)
    _, cands = _passes(ActMLP(ACT_IMPOSTORS["relu_plus_bump_at_200"]), torch.randn(3, 32))
    assert all(c.decision == "dense" for c in cands)
    monkeypatch.setattr(normalize, "_probe_agrees", lambda *a: False)
    _, (c,) = _passes(ActMLP(torch.relu), torch.randn(3, 32))
    assert c.decision == "dense" and "values do not agree" in c.reason


# --- 8. backward when the block does not divide d_in ----------------------------------------------------

@pytest.mark.parametrize("d_in,m", [(16, 5), (40, 8)])
def test_backward_when_the_block_is_wider_than_d_in(d_in, m):
    """All-zero weights make 128x128 the block: the x-gradient must come back contiguous (Inductor
    asserts the strides its fake promised)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d_in, 16, bias=False), nn.ReLU(), nn.Linear(16, d_in, bias=False))
    with torch.no_grad():
        net[0].weight.zero_()
        net[2].weight[:, 8:] = 0
    x = torch.randn(m, d_in, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.compile(net, backend="blast")(x).sum().backward()
    g = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for a, p in zip(g, net.parameters()):
        torch.testing.assert_close(a, p.grad)
    assert counters["blast"]["mlp_fused"] == 1


def test_op_outputs_are_contiguous():
    """Every gradient the backward op returns is contiguous (what its fake says), also when the blocks
    are padded past d_in / d_out."""
    torch.manual_seed(0)
    w1 = torch.zeros(16, 20, dtype=torch.float64, requires_grad=True)
    w2 = torch.zeros(36, 16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    key = pattern_from_weights(w1, None, w2, 128, 128, activation="relu", has_b1=False, has_b3=False).key
    gs = torch.ops.blast.sparse_mlp_backward(torch.randn(3, 36, dtype=torch.float64), x, w1, None, None, None, w2,
                                             None, "relu", 128, 128, key, 1.0, [True] * 7)
    assert all(g.is_contiguous() for g in gs)


# --- 9. compiled compressed MLP, no bias, ragged d_out ----------------------------------------------------

class FcMLP(nn.Module):
    def __init__(self, d=100, h=64, bias=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def check_compiled_compressed_ragged_d_out(bias, device, dtype):
    """A compressed MLP whose d_out (100) is not a multiple of its block, compiled: eager's answer, fused."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = FcMLP(bias=bias).eval()
    with torch.no_grad():
        m.fc1.weight[32:] = 0
        m.fc2.weight[:, 32:] = 0
    m = m.to(device, dtype)
    assert C.compress_(m).compressed
    x = torch.randn(4, 100, device=device, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="blast")(x), m(x), **tol(dtype))
    assert counters["blast"]["mlp_fused_packed"] == 1


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_compressed_mlp_with_ragged_d_out(bias):
    check_compiled_compressed_ragged_d_out(bias, "cpu", torch.float32)


# --- 10. zero rows ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(0,), (0, 3), (2, 0)])
def test_block_sparse_linear_on_zero_rows(lead):
    torch.manual_seed(0)
    w = torch.randn(40, 24) * expand_mask(random_block_mask(3, 2, 0.5), 16, 16, (40, 24))
    lin = C.BlockSparseLinear.from_dense(w, torch.randn(40), (16, 16), requires_grad=True)
    x = torch.randn(*lead, 24, requires_grad=True)
    y = lin(x)
    assert y.shape == (*lead, 40)
    y.sum().backward()
    assert x.grad.shape == x.shape and lin.blocks.grad is not None and not lin.blocks.grad.any()


# --- 11. options ------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("block_sizes", [16, 24]), ("block_sizes", (7,)), ("block_sizes", "16"), ("block_sizes", [8]),
    ("block_sizes", []), ("block_sizes", [0]), ("block_sizes", [-16]), ("block_sizes", [16.0]),
    ("block_sizes", True), ("min_sparsity", True), ("min_sparsity", "0.5"), ("min_sparsity", 1.5),
    ("min_sparsity", float("nan")), ("max_runtime_density", 5), ("max_runtime_density", float("nan")),
    ("max_runtime_density", "abc"), ("max_runtime_density", -0.1), ("strict", "no"), ("strict", 1),
    ("inductor", "false"), ("inductor", None), ("kernel_dir", 123), ("save_hidden", 1), ("save_hidden", "pre"),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_bad_option_values_are_rejected_with_name_and_allowed_values(name, value):
    with pytest.raises(ValueError, match=f"blast option {name}.*must be") as e:
        config.split_options({name: value})
    assert repr(value) in str(e.value) or str(value) in str(e.value)


@pytest.mark.parametrize("options", [[], "strict", 3, {1: True}])
def test_options_must_be_a_dict_of_names(options):
    with pytest.raises(TypeError, match="options"):
        config.split_options(options)


def test_good_options_are_kept():
    o, rest = config.split_options({"block_sizes": 32, "min_sparsity": 0, "max_runtime_density": 1, "strict": True,
                             "kernel_dir": __file__ + ".d", "inductor": False, "save_hidden": "h",
                             "max_autotune": False})
    assert (o.block_sizes, o.min_sparsity, o.max_runtime_density, o.strict, o.inductor) == ((32,), 0.0, 1.0, True, False)
    assert isinstance(o.kernel_dir, str) and rest == {"max_autotune": False}
    assert config.split_options(None)[0] == BlastOptions.from_options({})


def test_bad_option_raises_from_torch_compile_instead_of_falling_back():
    torch._dynamo.reset()
    m = half_dead_mlp()
    with pytest.raises(Exception, match="blast option block_sizes"):
        torch.compile(m, backend="blast", options={"block_sizes": [8]})(torch.randn(2, 64))
    assert counters["blast"]["fallback"] == 0


@pytest.mark.parametrize("key", ["max_autotune", "triton.cudagraphs"])
def test_inductor_keys_with_inductor_off_are_rejected(key):
    """inductor=False compiles with aot_eager, which reads no Inductor config: the keys would do nothing."""
    import blast_compile

    m, x = half_dead_mlp(), torch.randn(2, 64)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=rf"\['{key}'\].*inductor=False"):
        torch.compile(m, backend="blast", options={"inductor": False, key: True})(x)
    assert counters["blast"]["graphs"] == 0
    rep = blast_compile.explain(m, x, options={key: True})  # (explain's own inductor=False: they are dropped)
    assert [c.decision for c in rep.candidates] == ["fused"]


def test_a_mask_re_declared_unchanged_is_looked_at_once():
    """Re-declaring the same masks (new tensors, same blocks) refreshes the plan in place, once: not a look
    at the weights (and a host sync) at every later call."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(64, 32), torch.randn(32, 64)
    m1, m2 = random_block_mask(4, 2, 0.5), random_block_mask(2, 4, 0.5)
    w1 *= expand_mask(m1, 16, 16, w1.shape)
    w2 *= expand_mask(m2, 16, 16, w2.shape)
    x = torch.randn(3, 32)
    try:
        masks.declare_mask(w1, m1, (16, 16)), masks.declare_mask(w2, m2, (16, 16))
        op(x, w1, None, None, None, w2, None, "relu", (16, 16, "k"))
        masks.declare_mask(w1, m1.clone(), (16, 16)), masks.declare_mask(w2, m2.clone(), (16, 16))
        for _ in range(3):
            y, _ = op(x, w1, None, None, None, w2, None, "relu", (16, 16, "k"))
        torch.testing.assert_close(y, dense_mlp(x, w1, None, None, None, w2, None, "relu"))
        assert counters["blast"]["plans_built"] == 1 and counters["blast"]["pattern_revalidated"] == 1
    finally:
        masks.clear_mask(w1), masks.clear_mask(w2)


def test_rebound_weights_seen_through_inductors_aliases():
    """GPT-2's Conv1D weights reach the op as per-call aliases (``torch.t(W)`` -> ``reinterpret_tensor``) with a
    version counter of their own, mapped back to the parameter by its storage. After ``W.data = t`` (a new
    storage) the map must still find the parameter: else each call's alias is a new layer (a plan built per
    call) and in-place steps on the parameter are seen only by that accident."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class GPT2MLP(nn.Module):
        def __init__(self, d=64, h=128):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(h, d), Conv1D(d, h)

        def forward(self, x):
            return self.c_proj(torch.relu(self.c_fc(x)))

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = GPT2MLP()
    with torch.no_grad():
        m.c_fc.weight[:, 64:] = 0  # [in, out]: hidden units 64.. dead
        m.c_proj.weight[64:] = 0
    cm = torch.compile(m, backend="blast")
    x = torch.randn(4, 64)
    ws = [m.c_fc.weight, m.c_proj.weight]
    opt = torch.optim.SGD(ws, lr=0.5)  # (not fused: moves the weights' version counters, not their aliases')
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
        for p in ws:
            p.data = p.detach().clone()  # rebound: a new storage, same values
        torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
    built = counters["blast"]["plans_built"]
    for step in range(3):
        m(torch.randn(4, 64)).square().mean().backward()
        for p in ws:
            p.grad *= p != 0  # the pattern stays: a step only revalidates it
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(cm(x), m(x), **tol(torch.float32), msg=f"step {step}")
            torch.testing.assert_close(cm(x), m(x), **tol(torch.float32), msg=f"step {step}, again")
    assert counters["blast"]["plans_built"] == built and counters["blast"]["pattern_revalidated"] == 3
    assert counters["blast"]["mlp_fused"] == 1


def test_owner_map_follows_rebinding_without_growing():
    from blast_compile.ops import plans

    w = nn.Parameter(torch.randn(32, 16))
    plans.register_weights(w)
    n = len(plans._OWNERS)
    for _ in range(20):
        w.data = torch.randn(32, 16)
        # an alias without a base, as Inductor's reinterpret_tensor
        alias = torch.empty(0).set_(w.untyped_storage(), w.storage_offset(), w.shape, w.stride())
        assert plans.owner(alias, search=True) is w
    assert len(plans._OWNERS) <= n + 1
    stranger = torch.randn(32, 16)
    assert plans.owner(stranger, search=True) is stranger


@pytest.mark.parametrize("cap, ptxas, fix", [((9, 0), (12, 8), True), ((9, 0), (12, 9), False),
                                             ((9, 0), (13, 0), False), ((8, 0), (12, 8), False),
                                             ((9, 0), None, False)])
def test_issue_27_transposed_b_dots_avoided_only_with_a_faulty_ptxas(cap, ptxas, fix, monkeypatch):
    """ptxas 12.8 (Triton 3.6's) miscompiles transposed-B wgmma dots on Hopper: only there do the kernels avoid them
    (they cost speed at narrow blocks), with one warning naming TRITON_PTXAS_PATH."""
    import warnings

    from blast_compile.codegen import toolchain

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(toolchain, "ptxas_version", lambda: ptxas)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert toolchain.tnsp_fix_needed.__wrapped__() is fix
    assert [str(x.message) for x in w if "TRITON_PTXAS_PATH" in str(x.message)] == (
        [f"blast: Triton compiles with ptxas 12.8, which miscompiles some Hopper wgmma dots (wrong results or illegal "
         "memory accesses; blast's kernels avoid the ones known to fail). Point TRITON_PTXAS_PATH at a ptxas >= 12.9 "
         "(e.g. a CUDA 12.9+ or 13 toolkit's bin/ptxas) to compile with a fixed one."] if fix else [])


def test_issue_27_ptxas_version_is_read_from_triton():
    from blast_compile.codegen import toolchain

    v = toolchain.ptxas_version()
    assert v is None or (len(v) == 2 and v >= (11, 0))


# --- in-place writes between an MLP's projections (session 32's adversarial hunt) --------------------------

class _WritesBetween(nn.Module):
    """``where``: a write in place between the in-projection(s) and the down projection ("input", "weight"), an
    unrelated one before the MLP ("before": fuses), or the MLP's own in-place activation ("own": fuses)."""

    def __init__(self, gated, where):
        super().__init__()
        self.gated, self.where = gated, where
        self.g = nn.Linear(64, 128)
        self.u = nn.Linear(64, 128) if gated else None
        self.d = nn.Linear(128, 64)
        with torch.no_grad():
            for lin in (self.g, self.u):
                if lin is not None:
                    lin.weight[64:] = 0
            self.d.weight[:, 64:] = 0

    def forward(self, x):
        if self.where == "before":
            x.mul_(2.0)
        h = F.relu(self.g(x), inplace=self.where == "own")
        if self.where == "input":
            x.add_(1.0)  # eager's up projection (gated) reads the new x, its gate the old one
        elif self.where == "weight":
            self.d.weight.mul_(0.5)  # eager's down projection reads the new W2
        if self.gated:
            h = h * self.u(x)
        return self.d(h) + x


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("where", ["input", "weight", "before", "own"])
def test_a_write_in_place_between_the_projections_keeps_the_mlp_dense(gated, where):
    """The fused node reads the input and weights where the down projection was; eager's in-projections read them
    earlier. A write in between used to be seen by the fused op and not by eager (wrong values, no warning)."""
    torch.manual_seed(0)
    m, x = _WritesBetween(gated, where), torch.randn(8, 64)
    with torch.no_grad():
        ref = m(x.clone())
        torch.manual_seed(0)
        m2 = _WritesBetween(gated, where)  # (the same weights again: the first run wrote W2 where="weight")
        torch._dynamo.reset()
        counters.clear()
        out = torch.compile(m2, backend="blast")(x.clone())
    torch.testing.assert_close(out, ref)
    if where in ("input", "weight"):
        assert counters["blast"]["dense_inplace_write"] == 1 and counters["blast"]["mlp_fused"] == 0
    else:
        assert counters["blast"]["mlp_fused"] == 1


# --- compressed layers under autocast (session 32's adversarial hunt) ------------------------------------------

def _swiglu_and_compressed():
    """A SwiGLU MLP with 75% of its 16x16 blocks dead, and a compressed copy of it."""
    torch.manual_seed(0)
    dense = SwiGLU(64, 128).eval()
    sparsify_mlps_(dense, 0.75, block=16)
    packed = copy.deepcopy(dense)
    C.compress_(packed)
    return dense, packed


def test_block_linear_casts_under_autocast_as_linear_does():
    """``block_linear`` had no autocast rule: inside ``torch.autocast`` it ran in fp32 in eager (the dense layer runs
    in bf16), and a compiled graph computed something else again."""
    dense, packed = _swiglu_and_compressed()
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = dense.gate_proj(x), packed.gate_proj(x)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref)
    g_ref, = torch.autograd.grad(ref.float().sum(), x)
    g_got, = torch.autograd.grad(got.float().sum(), x)
    torch.testing.assert_close(g_got, g_ref)


@pytest.mark.parametrize("backend", ["blast", "inductor"])
def test_compressed_mlp_under_autocast_compiled_matches_eager(backend):
    dense, packed = _swiglu_and_compressed()
    x = torch.randn(4, 64)
    torch._dynamo.reset()
    counters.clear()
    # (caches off: an AOTAutograd cache entry made before block_linear had its autocast rule would be reused)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch._inductor.config.patch(force_disable_caches=True):
        ref, eager_dense = packed(x), dense(x)
        got = torch.compile(packed, backend=backend)(x)
    assert got.dtype == ref.dtype == eager_dense.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, **tol(torch.bfloat16))  # (Inductor keeps silu * up in fp32: eager rounds)
    if backend == "blast":  # (the packed op has no autocast rule: the chain runs, casting as F.linear does)
        assert counters["blast"]["dense_autocast"] == 1


def test_compressed_mlp_already_in_the_autocast_dtype_stays_fused():
    """Under autocast with x and blocks already bf16 the casts are no-ops: the packed op computes what the chain
    does, so it stays fused."""
    packed = _swiglu_and_compressed()[1].to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = packed(x)
        got = torch.compile(packed, backend="blast")(x)
    assert counters["blast"]["mlp_fused_packed"] == 1 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, **tol(torch.bfloat16))


# --- 8. compressed models (adversarial pass 3) ---------------------------------------------------------

def _ragged_compressed(seed=0):
    """SwiGLU(96, 200) compressed at 32x32: the last hidden block (200 = 6 * 32 + 8) is ragged and live."""
    torch.compiler.reset()
    torch.manual_seed(seed)
    m = nn.Sequential(SwiGLU(96, 200)).eval()
    with torch.no_grad():
        for p in (m[0].gate_proj, m[0].up_proj):
            p.weight[:160] = 0
        m[0].down_proj.weight[:, :160] = 0
    assert C.compress_(m, block_sizes=[32]).compressed
    return m


def test_compressed_padding_past_hidden_is_not_read():
    """Blocks re-initialised after compress_ hold non-zero padding past d_hidden: eager's block_linear chain
    never computes those hidden units, the fused op ran them through W2's padding columns (off by ~700)."""
    m = _ragged_compressed()
    x = torch.randn(4, 96)
    cm = torch.compile(m, backend="blast")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))  # (zero padding: fused)
        for p in m.parameters():
            p.normal_()
        torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
    assert counters["blast"]["mlp_fused"] >= 1


def test_compressed_layer_checks_width_and_dtype_as_linear():
    m = _ragged_compressed()
    cm = torch.compile(m, backend="blast")
    for width in (80, 97, 128):
        for f in (m, cm):
            with pytest.raises(RuntimeError, match=f"input has {width} features, the layer takes 96"):
                f(torch.randn(3, width))
    with pytest.raises(RuntimeError, match="same dtype"):
        m(torch.randn(3, 96, dtype=torch.bfloat16))
    with torch.autocast("cpu", torch.bfloat16):  # (autocast casts both: runs)
        assert m(torch.randn(3, 96)).dtype == torch.bfloat16


def test_compressed_mlp_stays_fused_after_the_input_rank_changes():
    """A rank change makes Dynamo recompile with dynamic sizes; the layer's width check pins the feature size."""
    m = _ragged_compressed()
    cm = torch.compile(m, backend="blast")
    with torch.no_grad():
        for shape in ((1, 96), (5, 96), (2, 3, 96), (4, 5, 96)):
            x = torch.randn(shape)
            torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
    assert counters["blast"]["dense_shape"] == 0 and counters["blast"]["mlp_fused"] >= 3


def test_compressed_state_dict_with_a_bad_index_raises_on_load():
    m = _ragged_compressed()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["0.down_proj.col_idx"][0] = -1  # (would wrap around in eager)
    with pytest.raises(ValueError, match="col_idx out of range"):
        m.load_state_dict(sd)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["0.gate_proj.row_ptr"][1] = 10**6
    with pytest.raises(ValueError, match="row_ptr is not a CSR pointer"):
        m.load_state_dict(sd)


class _GeLUMLP(nn.Module):
    def __init__(self, d=64, h=128, fc2=None, fc1_weight=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), fc2 if fc2 is not None else nn.Linear(h, d)
        if fc1_weight is not None:
            self.fc1.weight = fc1_weight

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def test_compress_keeps_requires_grad_per_parameter_and_ties():
    torch.manual_seed(0)
    a = _GeLUMLP()
    b = _GeLUMLP(fc2=a.fc2, fc1_weight=a.fc1.weight)  # a shared module, a weight tied into another module
    m = nn.Sequential(a, b).eval()
    sparsify_mlps_(m, 0.75, block=32)
    for lin in (a.fc1, a.fc2):
        lin.weight.requires_grad_(False)  # (BitFit: weights frozen, biases trained)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = m(x)
    assert len(C.compress_(m, block_sizes=[32]).compressed) == 2
    assert a.fc2 is b.fc2 and b.fc1.blocks is a.fc1.blocks and b.fc1.bias is not a.fc1.bias
    assert all(p.requires_grad for n, p in m.named_parameters() if n.endswith("bias"))
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.endswith("blocks"))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, **tol(torch.float32))
        a.fc1.blocks.mul_(2)  # (still one tensor: b sees it)
        torch.testing.assert_close(b.fc1.blocks, a.fc1.blocks)


@pytest.mark.parametrize("kw, match", [
    ({"min_sparsity": "0.5"}, "min_sparsity"), ({"min_sparsity": 1.5}, "min_sparsity"),
    ({"shared_gate_up": "no"}, "shared_gate_up"), ({"block_sizes": [16.0]}, "block_sizes"),
    ({"block_sizes": [16, 24]}, "block_sizes"), ({"block_sizes": []}, "block_sizes")])
def test_compress_rejects_bad_arguments_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        C.compress_(nn.Sequential(SwiGLU(64, 128)), **kw)
    with pytest.raises(TypeError, match="nn.Module"):
        C.compress_("model")


def test_from_pretrained_refuses_the_meta_device(tmp_path):
    with pytest.raises(ValueError, match="meta"):
        C.from_pretrained(str(tmp_path), device="meta")


def test_compress_frees_each_mlps_dense_weights_as_it_goes(monkeypatch):
    """The memo that keeps ties must not keep the dense weights: peak memory would hold the model twice."""
    import weakref

    m = nn.Sequential(*[SwiGLU(64, 128) for _ in range(3)]).eval()
    sparsify_mlps_(m, 0.75, block=32)
    refs = [weakref.ref(mlp.gate_proj.weight) for mlp in m]
    alive, pack = [], C.BlockSparseLinear.from_dense.__func__

    def spy(cls, *a, **kw):
        alive.append(sum(r() is not None for r in refs))
        return pack(cls, *a, **kw)

    monkeypatch.setattr(C.BlockSparseLinear, "from_dense", classmethod(spy))
    C.compress_(m, block_sizes=[32])
    assert alive == [3, 3, 3, 2, 2, 2, 1, 1, 1] and not any(r() is not None for r in refs)
