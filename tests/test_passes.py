"""The FX passes on captured Dynamo graphs: match every spelling, refuse what is unsafe,
and the rewritten graph computes what eager computes (no Inductor: fast)."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given, settings, strategies as st
from torch._dynamo.utils import counters

from _capture import capture
from blast_compile.config import BlastOptions
from blast_compile.formats import choose_block
from blast_compile.passes import run_passes
from blast_compile.testing import zero_blocks_
from conftest import tol

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

FUSED = torch.ops.blast.sparse_mlp.default


def _new_gelu(x):  # HF NewGELUActivation / GPT-2, written out
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


# spelling -> (activation callable, canonical name)
SPELLINGS = {
    "torch.relu": (torch.relu, "relu"),
    "nn.ReLU": (nn.ReLU(), "relu"),
    "F.relu": (lambda a: torch.nn.functional.relu(a), "relu"),
    "method_relu": (lambda a: a.relu(), "relu"),
    "F.gelu": (F.gelu, "gelu"),
    "F.gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), "gelu_tanh"),
    "nn.GELU_tanh": (nn.GELU(approximate="tanh"), "gelu_tanh"),
    "F.silu": (F.silu, "silu"),
    "sigmoid_x": (lambda a: torch.sigmoid(a) * a, "silu"),
    "x_method_sigmoid": (lambda a: a * a.sigmoid(), "silu"),
    "square_relu": (lambda a: torch.square(torch.relu(a)), "relu2"),
    "relu_pow2": (lambda a: F.relu(a) ** 2, "relu2"),
    "relu_times_relu": (lambda a: torch.relu(a) * torch.relu(a), "relu2"),
    "new_gelu_arith": (_new_gelu, "gelu_tanh"),
    "reshaped_gelu": (lambda a: F.gelu(a.reshape(-1, a.shape[-1])).view(a.shape), "gelu"),
    **{f"ACT2FN[{k}]": (ACT2FN[k], v) for k, v in [
        ("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
        ("silu", "silu"), ("swish", "silu"), ("relu", "relu"), ("relu2", "relu2")]},
}


class MLP(nn.Module):
    def __init__(self, d=32, h=64, d_out=None, act=F.gelu, bias=True, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=bias, dtype=dtype)
        self.fc2 = nn.Linear(h, d_out or d, bias=bias, dtype=dtype)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Gated(nn.Module):
    def __init__(self, d=32, h=64, d_out=None, act=F.silu, bias=False, mul=operator.mul, swap=False, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(d, h, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(h, d_out or d, bias=bias, dtype=dtype)
        self.act, self.mul, self.swap = act, mul, swap

    def forward(self, x):
        g, u = self.act(self.gate_proj(x)), self.up_proj(x)
        return self.down_proj(self.mul(u, g) if self.swap else self.mul(g, u))


class GPT2MLP(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.c_fc, self.c_proj, self.act = Conv1D(h, d), Conv1D(d, h), ACT2FN["gelu_new"]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Holder(nn.Module):
    """``model.layers.<i>.mlp`` around MLPs, with a residual between them."""

    def __init__(self, *mlps):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in mlps)
        for layer, mlp in zip(self.model.layers, mlps):
            layer.mlp = mlp

    def forward(self, x):
        for layer in self.model.layers:
            x = x + layer.mlp(x)
        return x


def sparsify(model, sparsity=0.9, block=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:
            zero_blocks_(p, sparsity, (block, block), g)
    return model


def fuse(model, *inputs, dynamic=False, **options):
    """Capture, run the passes, check the rewritten graph against eager; returns (gm, candidates)."""
    gm, ex = capture(model, *inputs, dynamic=dynamic)
    cands = run_passes(gm, ex, BlastOptions.from_options(options))
    with torch.no_grad():
        out = gm(*[int(e) if isinstance(e, torch.SymInt) else e for e in ex])[0]
        ref = model(*inputs)
    torch.testing.assert_close(out, ref, **tol(ref.dtype))
    return gm, cands


def n_fused(gm):
    return sum(n.target is FUSED for n in gm.graph.nodes)


def blast_counters():
    """The passes' counters (not the op's run-time ones, e.g. ``plans_built`` when ``fuse`` runs the graph)."""
    return {k: v for k, v in counters["blast"].items() if v and k != "plans_built"}


# --- matching ------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_activation_spelling_is_fused(spelling):
    act, name = SPELLINGS[spelling]
    torch.manual_seed(0)
    gm, (c,) = fuse(sparsify(MLP(act=act)), torch.randn(2, 5, 32))
    assert (c.decision, c.activation, c.kind) == ("fused", name, "plain"), c.reason
    assert n_fused(gm) == 1
    assert not any(n.op in ("call_function", "call_method") and n.target is not FUSED for n in gm.graph.nodes), gm.code
    assert blast_counters() == {"mlp_candidates": 1, "mlp_fused": 1}


@pytest.mark.parametrize("mul", [operator.mul, torch.mul, lambda a, b: a.mul(b)], ids=["operator", "torch", "method"])
@pytest.mark.parametrize("swap", [False, True], ids=["act_first", "up_first"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_either_order_and_bias(mul, swap, bias):
    torch.manual_seed(0)
    gm, (c,) = fuse(sparsify(Gated(mul=mul, swap=swap, bias=bias)), torch.randn(3, 32))
    assert (c.decision, c.kind, c.activation, c.bias) == ("fused", "gated", "silu", bias)
    node = next(n for n in gm.graph.nodes if n.target is FUSED)
    gate, up = node.args[1].name, node.args[3].name
    assert "gate_proj" in gate and "up_proj" in up  # w1 is the activated side whatever the order


class MatmulMLP(nn.Module):
    """Linears written as matmuls (Falcon's ``FalconLinear``: ``x @ self.weight.T`` then ``+ self.bias``)."""

    SPELL = {"T": lambda x, w: x @ w.T, "mT": lambda x, w: x @ w.mT, "t()": lambda x, w: x @ w.t(),
             "torch.t": lambda x, w: torch.matmul(x, torch.t(w)),
             "transpose": lambda x, w: x @ w.transpose(0, 1), "stored_in_out": lambda x, w: x @ w}

    def __init__(self, spell, bias, d=32, h=64):
        super().__init__()
        io = spell == "stored_in_out"
        self.w1 = nn.Parameter(torch.randn(*((d, h) if io else (h, d))) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(*((h, d) if io else (d, h))) / h ** 0.5)
        self.b1 = nn.Parameter(torch.randn(h) * 0.1) if bias else None
        self.b2 = nn.Parameter(torch.randn(d) * 0.1) if bias else None
        self.mm = self.SPELL[spell]

    def forward(self, x):
        a = self.mm(x, self.w1)
        a = a + self.b1 if self.b1 is not None else a
        y = self.mm(F.gelu(a), self.w2)
        return self.b2 + y if self.b2 is not None else y


@pytest.mark.parametrize("spell", sorted(MatmulMLP.SPELL))
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_spellings_of_linear(spell, bias):
    torch.manual_seed(0)
    gm, (c,) = fuse(sparsify(MatmulMLP(spell, bias)), torch.randn(2, 5, 32))
    assert (c.decision, c.kind, c.activation, c.hidden, c.d_in) == ("fused", "plain", "gelu", 64, 32)
    assert c.bias == bias  # b1 goes into the fused node; "b2 + y" stays an add after it (the bare matmul matched first)


def test_matmul_with_a_non_bias_add_is_not_a_linear():
    """``x @ W.T + r`` with r a residual (not a 1-D vector) is no linear-with-bias."""
    class Res(MatmulMLP):
        def forward(self, x):
            return F.gelu(x @ self.w1.T) @ self.w2.T + x

    torch.manual_seed(0)
    gm, (c,) = fuse(sparsify(Res("T", False)), torch.randn(3, 32))
    assert c.decision == "fused" and not c.bias


class FusedGateUp(nn.Module):
    """Phi-3 / GLM: one gate|up linear, split in halves (``chunk`` or ``split``, either half the gate)."""

    def __init__(self, d=32, h=64, bias=False, split="chunk", up_first=False):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)
        self.split, self.up_first, self.h = split, up_first, h

    def forward(self, x):
        gu = self.gate_up_proj(x)
        if self.split == "chunk":
            a, b = gu.chunk(2, dim=-1)
        elif self.split == "torch.chunk":
            a, b = torch.chunk(gu, 2, -1)
        else:
            a, b = torch.split(gu, self.h, dim=-1)
        gate, up = (b, a) if self.up_first else (a, b)
        return self.down_proj(up * F.silu(gate))


@pytest.mark.parametrize("split", ["chunk", "torch.chunk", "split"])
@pytest.mark.parametrize("up_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_gate_up_projection(split, up_first, bias):
    """The two halves of one gate|up weight are the gate and up projections (row views of it)."""
    torch.manual_seed(0)
    gm, (c,) = fuse(sparsify(FusedGateUp(bias=bias, split=split, up_first=up_first)), torch.randn(2, 5, 32))
    assert (c.decision, c.kind, c.activation, c.hidden, c.d_in, c.bias) == ("fused", "gated", "silu", 64, 32, bias)
    node = next(n for n in gm.graph.nodes if n.target is FUSED)
    w1, w3 = node.args[1], node.args[3]
    assert w1.target is torch.narrow and w3.target is torch.narrow
    assert w1.args[2] == (64 if up_first else 0) and w3.args[2] == (0 if up_first else 64)


def test_fused_gate_up_half_used_elsewhere_stays_dense():
    class Leaky(FusedGateUp):
        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(up * F.silu(gate)) + up.sum(-1, keepdim=True)

    torch.manual_seed(0)
    _, (c,) = fuse(sparsify(Leaky()), torch.randn(3, 32))
    assert c.decision == "dense" and "also used" in c.reason


class Dropped(nn.Module):
    """Dropout inside the MLP (T5's ``wo(dropout(act(wi(x))))``; gated: on the product)."""

    def __init__(self, gated, p, where="inside"):
        super().__init__()
        self.mlp = Gated() if gated else MLP()
        self.drop, self.gated, self.where = nn.Dropout(p), gated, where

    def forward(self, x):
        m = self.mlp
        if self.where == "functional":  # torch.dropout(x, p, train), the eval flag a constant
            return m.fc2(torch.dropout(m.act(m.fc1(x)), self.drop.p, self.training))
        if self.gated:
            return m.down_proj(self.drop(m.act(m.gate_proj(x)) * m.up_proj(x)))
        return m.fc2(self.drop(m.act(m.fc1(x))))


@pytest.mark.parametrize("gated", [False, True])
def test_dropout_inside_fuses_only_when_it_is_the_identity(gated):
    """Eval mode (or p = 0) makes the dropout the identity: fused. Training with p > 0: it is not, the
    MLP stays dense (its random mask sits between the projections)."""
    torch.manual_seed(0)
    for p, train, fused in ((0.5, False, True), (0.0, True, True), (0.5, True, False)):
        model = sparsify(Dropped(gated, p)).train(train)
        if fused:
            gm, (c,) = fuse(model, torch.randn(3, 32))
            assert c.decision == "fused" and n_fused(gm) == 1
        else:
            gm, ex = capture(model, torch.randn(3, 32))
            cands = run_passes(gm, ex, BlastOptions())
            assert n_fused(gm) == 0 and all(c.decision != "fused" for c in cands)
    gm, (c,) = fuse(sparsify(Dropped(False, 0.3, "functional")).eval(), torch.randn(3, 32))
    assert c.decision == "fused"


@pytest.mark.parametrize("bias", [False, True])
def test_plain_bias_and_shapes_reported(bias):
    torch.manual_seed(0)
    _, (c,) = fuse(sparsify(MLP(d=32, h=80, d_out=48, bias=bias)), torch.randn(4, 32))
    assert (c.d_in, c.hidden, c.d_out, c.bias, c.dtype, c.device) == (32, 80, 48, bias, "float32", "cpu")
    assert c.block is not None and c.sparsity >= 0.5 and c.pattern_key


@pytest.mark.parametrize("dynamic", [False, True])
def test_gpt2_conv1d(dynamic):
    torch.manual_seed(0)
    m = sparsify(GPT2MLP())
    for p in (m.c_fc.bias, m.c_proj.bias):
        nn.init.normal_(p)
    gm, (c,) = fuse(m, torch.randn(2, 7, 32), dynamic=dynamic)
    assert (c.decision, c.activation, c.d_in, c.hidden, c.d_out) == ("fused", "gelu_tanh", 32, 64, 32)
    node = next(n for n in gm.graph.nodes if n.target is FUSED)
    assert node.args[1].target is torch.t and node.args[5].target is torch.t  # [in, out] weights as views


def test_provenance_and_module_path():
    torch.manual_seed(0)
    gm, cands = fuse(Holder(sparsify(Gated()), sparsify(MLP(), seed=1)), torch.randn(2, 3, 32))
    assert [c.module for c in cands] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for node in (n for n in gm.graph.nodes if n.target is FUSED):
        assert "stack_trace" in node.meta and "forward" in node.meta["stack_trace"]
        paths = [v[0] for v in node.meta["nn_module_stack"].values()]
        assert paths[-1].endswith(("down_proj", "fc2"))
        assert node.meta["example_value"].shape == (2, 3, 32)


def test_back_to_back_mlps_and_chained_linears():
    """An MLP whose input is the previous MLP's output; linears chained through acts claim once."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = sparsify(MLP()), sparsify(Gated(), seed=1)

        def forward(self, x):
            return self.b(self.a(x))

    gm, cands = fuse(Two(), torch.randn(4, 32))
    assert [c.decision for c in cands] == ["fused", "fused"] and n_fused(gm) == 2
    chain = sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)))
    gm, cands = fuse(chain, torch.randn(4, 32))
    assert len(cands) == 1 and n_fused(gm) == 1


def test_no_mlp_graph_is_unchanged():
    m = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 16))
    gm, ex = capture(m, torch.randn(2, 32))
    before = gm.code
    assert run_passes(gm, ex, BlastOptions()) == []
    assert gm.code == before and not blast_counters()


# --- refusals ----------------------------------------------------------------------------

class SharedHidden(MLP):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h), h.sum()


class ComputedWeight(MLP):
    def forward(self, x):
        return F.linear(self.act(self.fc1(x)), self.fc2.weight * 1.0, self.fc2.bias)


class UserWeight(MLP):
    def forward(self, x, w2):
        return F.linear(self.act(self.fc1(x)), w2)


class Autocast(MLP):
    """The in-projection inside an autocast block, the out-projection after it: no one state for the MLP."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            h = self.act(self.fc1(x))
        return self.fc2(h)


def test_refusals_keep_graph_dense_with_reason():
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    cases = [
        (SharedHidden(), (x,), "shared_intermediate"),
        (ComputedWeight(), (x,), "weight_not_param"),
        (UserWeight(), (x, sparsify(nn.Linear(64, 32)).weight.detach()), "weight_not_param"),
        (Autocast(), (x,), "autocast"),
        (MLP(act=ACT2FN["quick_gelu"]), (x,), "activation"),
        (MLP(), (x,), "no_zeros"),
        (sparsify(MLP(), sparsity=0.25), (x,), "low_sparsity"),
    ]
    for model, inputs, tag in cases:
        counters.clear()
        sparsify(model) if tag not in ("no_zeros", "low_sparsity") else None
        gm, ex = capture(model, *inputs)
        before = gm.code
        (c,) = run_passes(gm, ex, BlastOptions())
        assert c.decision == "dense" and c.reason, tag
        assert blast_counters() == {"mlp_candidates": 1, "mlp_dense": 1, f"dense_{tag}": 1}, (tag, c.reason)
        assert gm.code == before


def test_mixed_dtype_is_refused():
    torch.manual_seed(0)
    gm, ex = capture(sparsify(MLP()), torch.randn(3, 32))
    w2 = next(i for n, i in zip(gm.graph.nodes, ex) if "fc2" in n.name and "weight" in n.name)
    ex = [nn.Parameter(i.half()) if i is w2 else i for i in ex]  # what eager would reject
    (c,) = run_passes(gm, ex, BlastOptions())
    assert c.decision == "dense" and "float16" in c.reason and counters["blast"]["dense_dtype"] == 1


@pytest.mark.parametrize("live,want", [(4, 2), (3, 1)])
def test_save_level_auto_by_recompute_width(live, want):
    """``save_hidden=True`` ("auto") keeps the pre-activations (level 2) only where the backward's recompute
    of them is wide: the in-projection's live width per live hidden block (here ``live`` blocks of 64 of
    every hidden block-row, one row dead) at least SAVE_PRE_MIN_K = 256; explicit levels stay as given."""
    from blast_compile.formats import pattern_from_weights
    from blast_compile.passes.rewrite import SAVE_PRE_MIN_K, save_level

    assert SAVE_PRE_MIN_K == 256
    w1, w3, w2 = torch.randn(512, 1024), torch.randn(512, 1024), torch.randn(1024, 512)
    for i in range(8):  # hidden block-row i: `live` in-blocks, rotating; row 7 dead
        keep = torch.zeros(16, dtype=torch.bool)
        if i < 7:
            keep[[(i + j) % 16 for j in range(live)]] = True
        for w in (w1, w3):
            w[i * 64:(i + 1) * 64] *= keep.repeat_interleave(64)
    w2 *= (torch.rand(16, 8, generator=torch.Generator().manual_seed(0)) < 0.3).repeat_interleave(64, 0) \
        .repeat_interleave(64, 1)
    pat = pattern_from_weights(w1, w3, w2, 64, 64, activation="silu", has_b1=False, has_b3=False)
    levels = {v: save_level(BlastOptions.from_options({"save_hidden": v}), pat) for v in (True, "auto", "all", "h", False)}
    assert levels == {True: want, "auto": want, "all": 2, "h": 1, False: 0}


def test_counters_exact_mixed_model():
    torch.manual_seed(0)
    model = Holder(sparsify(Gated()), MLP(), sparsify(MLP(act=torch.relu), sparsity=0.75))
    _, cands = fuse(model, torch.randn(2, 4, 32), min_sparsity=0.6)
    assert [c.decision for c in cands] == ["fused", "dense", "fused"]
    assert blast_counters() == {"mlp_candidates": 3, "mlp_fused": 2, "mlp_dense": 1, "dense_no_zeros": 1}


# --- properties ------------------------------------------------------------------------

ACTS = ["torch.relu", "F.gelu", "F.gelu_tanh", "F.silu", "square_relu", "new_gelu_arith", "sigmoid_x"]


@settings(max_examples=25, deadline=None)
@given(
    d=st.sampled_from([16, 24, 40, 64, 128]), h=st.sampled_from([32, 56, 96, 128]),
    d_out=st.sampled_from([16, 20, 72]), block=st.sampled_from([16, 32, 64]),
    dtype=st.sampled_from([torch.float32, torch.float16]), bias=st.booleans(),
    act=st.sampled_from(ACTS), gated=st.booleans(), dead=st.sampled_from([0.8, 0.0, 0.3, 0.55, 0.95, 1.0]),
    lead=st.sampled_from([(0,), (1,), (3,), (1, 1), (2, 3)]), seed=st.integers(0, 2**16),
)
def test_property_rewrite_matches_eager(d, h, d_out, block, dtype, bias, act, gated, dead, lead, seed):
    counters.clear()
    torch.manual_seed(seed)
    cls = Gated if gated else MLP
    model = sparsify(cls(d, h, d_out, act=SPELLINGS[act][0], bias=bias, dtype=dtype), dead, block, seed)
    x = torch.randn(*lead, d, dtype=dtype)
    gm, (c,) = fuse(model, x)
    ws = [model.gate_proj.weight, model.up_proj.weight, model.down_proj.weight] if gated else \
         [model.fc1.weight, None, model.fc2.weight]
    choice = choose_block(*ws, blocks=BlastOptions().block_sizes)
    should = choice is not None and choice.sparsity >= BlastOptions().min_sparsity
    event(c.decision)
    assert (c.decision == "fused") == should and n_fused(gm) == int(should), c.reason
    assert counters["blast"]["mlp_fused"] == int(should) and counters["blast"]["mlp_dense"] == int(not should)


# --- real architectures ------------------------------------------------------------------

# more architectures, built from their config class's defaults (model type, extra config)
_MORE_HF = {
    "mistral": ("mistral", dict(num_key_value_heads=2)), "gemma": ("gemma", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("gemma2", dict(num_key_value_heads=2, head_dim=16)), "phi": ("phi", {}), "gpt_neox": ("gpt_neox", {}),
    "opt": ("opt", dict(ffn_dim=128, word_embed_proj_dim=64)), "stablelm": ("stablelm", dict(num_key_value_heads=2)),
    "starcoder2": ("starcoder2", dict(num_key_value_heads=2)), "olmo": ("olmo", dict(num_key_value_heads=2)),
    "granite": ("granite", dict(num_key_value_heads=2)), "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
    "gpt_bigcode": ("gpt_bigcode", dict(n_embd=64, n_layer=2, n_head=4, n_inner=128)),
    "cohere": ("cohere", dict(num_key_value_heads=2)), "mpt": ("mpt", dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2)),
}


def _hf(name):
    from transformers import (AutoConfig, BertConfig, FalconConfig, GlmConfig, GPT2Config, LlamaConfig, Phi3Config,
                              Qwen2Config, T5Config)

    if name in _MORE_HF:
        t, extra = _MORE_HF[name]
        return AutoConfig.for_model(t, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=128, **extra)

    small = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    return {
        "llama": LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **small),
        "qwen2": Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **small),
        "gpt2": GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=128, n_positions=32,
                           bos_token_id=0, eos_token_id=0),
        "bert": BertConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=32, **small),
        # linears as x @ W.T (FalconLinear), parallel attention, mlp_output += attention_output
        "falcon": FalconConfig(hidden_size=64, **small),
        # one gate|up linear, chunked
        "phi3": Phi3Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, pad_token_id=0, **small),
        "glm": GlmConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                         **small),
        # T5's MLPs hold a dropout between the projections (the identity in eval mode)
        "t5": T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128),
        "t5-gated": T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128,
                             feed_forward_proj="gated-gelu"),
    }[name]


class LastHidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert", "t5", "t5-gated", "phi3", "glm", "falcon", *_MORE_HF])
def test_tiny_hf_models_fuse_every_mlp(arch):
    from transformers import AutoModel, T5EncoderModel

    torch.manual_seed(0)
    cfg = _hf(arch)
    cfg.use_cache = False
    model = (T5EncoderModel(cfg) if arch.startswith("t5") else AutoModel.from_config(cfg, attn_implementation="eager"))
    model = model.eval()
    sparsify(model, 0.9)  # every 2-D weight, MLP included
    _, cands = fuse(LastHidden(model), torch.randint(0, 128, (2, 8)))
    assert [c.decision for c in cands] == ["fused", "fused"], [c.reason for c in cands]
    assert counters["blast"]["mlp_fused"] == cfg.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "falcon", "glm", "t5-gated"])
def test_gpu_tiny_hf_models_compiled(arch):
    """The whole pipeline on CUDA (Inductor + the Triton kernels), fp16: fused gate|up halves (Phi-3, GLM),
    matmul linears and ``+=`` on the op's output (Falcon), Conv1D ``torch.t(W)`` (GPT-2); one plan per MLP
    across calls of several lengths (the plans must not be rebuilt per call on views of weights)."""
    from transformers import AutoModel, T5EncoderModel

    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = _hf(arch)
    cfg.use_cache = False
    model = (T5EncoderModel(cfg) if arch.startswith("t5") else AutoModel.from_config(cfg, attn_implementation="eager"))
    model = sparsify(model.eval(), 0.9).to("cuda", torch.float16)
    cm = torch.compile(LastHidden(model), backend="blast", dynamic=False)
    with torch.no_grad():
        for n in (8, 8, 1, 24):
            ids = torch.randint(0, 128, (2, n), device="cuda")
            torch.testing.assert_close(cm(ids), model(ids).last_hidden_state, **tol(torch.float16))
    assert counters["blast"]["mlp_fused"] == 3 * cfg.num_hidden_layers  # every MLP in each of the 3 graphs
    assert counters["blast"]["plans_built"] == cfg.num_hidden_layers  # one per MLP across 3 graphs and 4 calls


def test_autocast_blocks_span_enter_to_exit_and_fail_safe_when_unpaired():
    """The traced ``with torch.autocast`` blocks each node runs inside; before an exit whose enter is not in the
    graph (a block cut by a graph break) the state is unknown; an enter alone covers the rest."""
    from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

    from blast_compile.passes.match import UNKNOWN_BLOCK, autocast_blocks, block_state

    def graph(*ops):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        nodes, enters = {}, []
        for op in ops:
            if op.startswith("enter"):
                enters.append(g.call_function(_enter_autocast, ("cpu", torch.bfloat16, op == "enter_on", None)))
            elif op == "exit":
                g.call_function(_exit_autocast, (enters.pop(),) if enters else ())
            else:
                nodes[op] = x = g.call_function(torch.relu, (x,))
        g.output(x)
        return autocast_blocks(torch.fx.GraphModule(torch.nn.Module(), g)), nodes

    blocks, n = graph("a", "enter_on", "b", "enter_off", "c", "exit", "exit", "d")
    assert set(blocks) == {n["b"], n["c"]} and len(blocks[n["c"]]) == 2
    assert block_state(blocks[n["b"]], "cpu") == (True, torch.bfloat16)
    assert block_state(blocks[n["c"]], "cpu") == (False, torch.bfloat16)
    assert block_state(blocks[n["b"]], "cuda") == (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    blocks, n = graph("a", "exit", "b")
    assert blocks[n["a"]] == UNKNOWN_BLOCK and n["b"] not in blocks
    blocks, n = graph("a", "enter_on", "b", "c")
    assert {k.name for k in blocks} == {n["b"].name, n["c"].name, "output"}
