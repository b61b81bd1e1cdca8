"""One registry of MLP layouts (blast_compile.layouts): every consumer that finds MLPs by name
(compress, the sparsifier, tensor parallel, the test helpers) accepts every layout it supports."""
import pytest
import torch
from torch import nn

from blast_compile import compress as C
from blast_compile import distributed as D
from blast_compile import layouts
from blast_compile.sparsifier import BlastSparsifier
from blast_compile.testing import mlp_weights, sparsify_mlps_

D_MODEL, HIDDEN, BLOCK = 32, 64, 16
IDS = [lay.family for lay in layouts.LAYOUTS]


def _proj(layout, d_in, d_out):
    if layout.conv1d:
        from transformers.pytorch_utils import Conv1D

        return Conv1D(d_out, d_in)
    return nn.Linear(d_in, d_out)


class MLP(nn.Module):
    """A module holding one MLP in ``layout``'s names (nested paths as sub-modules)."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        for role, path in layout.roles:
            parent = self
            *heads, leaf = path.split(".")
            for h in heads:
                if not hasattr(parent, h):
                    parent.add_module(h, nn.Module())
                parent = getattr(parent, h)
            out = {"gate_up": 2 * HIDDEN, "down": D_MODEL, "fc2": D_MODEL}.get(role, HIDDEN)
            parent.add_module(leaf, _proj(layout, HIDDEN if out == D_MODEL else D_MODEL, out))

    def forward(self, x):
        p = {role: layouts.get_path(self, path) for role, path in self.layout.roles}
        if "gate_up" in p:
            g, u = p["gate_up"](x).chunk(2, dim=-1)
            return p["down"](nn.functional.silu(g) * u)
        if "gate" in p:
            return p["down"](nn.functional.silu(p["gate"](x)) * p["up"](x))
        return p["fc2"](nn.functional.gelu(p["fc1"](x)))


class Model(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = MLP(layout)

    def forward(self, x):
        return self.layers[0].mlp(x)


def _model(layout):
    torch.manual_seed(0)
    return Model(layout).eval()


@pytest.mark.parametrize("layout", layouts.LAYOUTS, ids=IDS)
def test_registry_finds_the_mlp(layout):
    (found,) = layouts.mlp_modules(_model(layout))
    assert found.name == "layers.0.mlp" and found.layout is layout
    assert found.quals == {role: f"layers.0.mlp.{path}" for role, path in layout.roles}


@pytest.mark.parametrize("layout", layouts.LAYOUTS, ids=IDS)
def test_testing_helper_sparsifies_every_projection_and_ties_gate_up(layout):
    m = _model(layout)
    assert sparsify_mlps_(m, 0.75, block=BLOCK) == len(layout.roles)
    assert set(mlp_weights(m)) == {f"layers.0.mlp.{p}.weight" for _, p in layout.roles}
    mlp = m.layers[0].mlp
    for _, path in layout.roles:
        w = layouts.get_path(mlp, path).weight
        live = w.reshape(w.shape[0] // BLOCK, BLOCK, -1, BLOCK).abs().sum((1, 3)) > 0
        assert 0 < live.float().mean() < 0.5
    if "gate" in layout.paths:
        assert torch.equal(mlp.get_submodule(layout.paths["gate"]).weight == 0,
                           mlp.get_submodule(layout.paths["up"]).weight == 0)
    if layout.fused_gate_up:
        w = mlp.get_submodule(layout.paths["gate_up"]).weight
        assert torch.equal(w[:HIDDEN] == 0, w[HIDDEN:] == 0)


@pytest.mark.parametrize("layout", layouts.LAYOUTS, ids=IDS)
def test_sparsifier_selects_ties_and_reports_every_layout(layout):
    m = _model(layout)
    sp = BlastSparsifier(m, target_sparsity=0.5, block_size=BLOCK, schedule="constant")
    assert set(sp.layers) == {f"layers.0.mlp.{p}" for _, p in layout.roles}
    if "gate" in layout.paths:
        assert [f"layers.0.mlp.{layout.paths['gate']}", f"layers.0.mlp.{layout.paths['up']}"] in sp.groups
    if layout.fused_gate_up:
        w = m.layers[0].mlp.get_submodule(layout.paths["gate_up"]).weight
        assert torch.equal(w[:HIDDEN] == 0, w[HIDDEN:] == 0)  # the halves share one mask
    else:
        use = sp.hidden_use()["layers.0.mlp"]
        assert use["hidden_blocks"] == HIDDEN // BLOCK and 0 <= use["orphan_frac"] <= 1


@pytest.mark.parametrize("layout", layouts.LAYOUTS, ids=IDS)
def test_compress_packs_every_layout_but_a_fused_gate_up(layout):
    m = _model(layout)
    sparsify_mlps_(m, 0.75, block=BLOCK)
    x = torch.randn(3, D_MODEL)
    with torch.no_grad():
        ref = m(x)
    rep = C.compress_(m, block_sizes=(BLOCK,))
    packed = [n for n, mod in m.named_modules() if isinstance(mod, C.BlockSparseLinear)]
    if layout.fused_gate_up:  # compress_ does not split a fused weight: the MLP stays dense
        assert packed == [] and not rep.compressed
        return
    assert sorted(packed) == sorted(f"layers.0.mlp.{p}" for _, p in layout.roles)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert C.named_mlps(m, compressed=True) == [("layers.0.mlp", {r: f"layers.0.mlp.{p}" for r, p in layout.roles})]


@pytest.mark.parametrize("layout", layouts.LAYOUTS, ids=IDS)
def test_tensor_parallel_shards_the_linear_direct_child_layouts(layout):
    m = _model(layout)
    mlp = m.layers[0].mlp
    if layout not in D.TP_LAYOUTS:  # Conv1D, a fused gate|up weight, or projections spread over a layer
        assert layout.conv1d or layout.fused_gate_up or layout.nested
        assert D.mlp_projections(mlp) is None and D.mlp_module_names(m) == []
        return
    g, u, d = D.mlp_projections(mlp)
    p = layout.paths
    assert g is mlp.get_submodule(p.get("gate", p.get("fc1"))) and d is mlp.get_submodule(p.get("down", p.get("fc2")))
    assert (u is None) == ("up" not in p)
    assert D.mlp_module_names(m) == ["layers.0.mlp"]
    plan = D.tp_plan(m, style="torch")
    assert set(plan) == {"layers.0.mlp"} | {f"layers.0.mlp.{path}" for _, path in layout.roles}
