"""MLP layouts: how each model family names an MLP's projections, in one registry.

Used wherever the library finds MLPs by module name: :mod:`compress`,
:mod:`sparsifier`, :mod:`distributed` and :mod:`testing`. (The backend finds MLPs
by their dataflow in the graph instead, whatever the names.)

A layout maps roles to attribute paths under the MLP's module:

* gated MLPs ``down(act(gate(x)) * up(x))``: roles ``gate``, ``up``, ``down``, or
  ``gate_up`` + ``down`` for one fused projection whose first half of output rows
  is the gate and second half the up projection (Phi-3, GLM);
* plain MLPs ``fc2(act(fc1(x)))``: roles ``fc1``, ``fc2``.

Projections are ``nn.Linear`` (weight ``[out, in]``) or, for GPT-2-style models,
HF's ``Conv1D`` (weight ``[in, out]``). Order matters: the first layout whose
projections all exist wins, so gated ``w1/w3/w2`` comes before plain ``w1/w2``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

IN_ROLES = ("gate", "up", "gate_up", "fc1")  # read the MLP's input; their output rows are hidden units
OUT_ROLES = ("down", "fc2")  # read the hidden units


@dataclasses.dataclass(frozen=True)
class Layout:
    family: str  # an example of a model family that uses it
    roles: Tuple[Tuple[str, str], ...]  # (role, attribute path under the MLP module)
    conv1d: bool = False  # projections are HF Conv1D (GPT-2): weight [in, out]
    shared: Tuple[str, ...] = ()  # paths attention blocks use too: only the MLP module around them tells

    @property
    def paths(self) -> Dict[str, str]:
        return dict(self.roles)

    @property
    def gated(self) -> bool:
        return "down" in self.paths

    @property
    def fused_gate_up(self) -> bool:
        return "gate_up" in self.paths

    @property
    def nested(self) -> bool:
        """Some projection sits deeper than a direct child (BERT: the layer holds both sub-blocks)."""
        return any("." in p for _, p in self.roles)


LAYOUTS: Tuple[Layout, ...] = (
    Layout("llama", (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))),
    Layout("mixtral-expert", (("gate", "w1"), ("up", "w3"), ("down", "w2"))),
    Layout("phi3", (("gate_up", "gate_up_proj"), ("down", "down_proj"))),
    Layout("opt", (("fc1", "fc1"), ("fc2", "fc2"))),
    Layout("gpt2", (("fc1", "c_fc"), ("fc2", "c_proj")), conv1d=True, shared=("c_proj",)),
    Layout("gpt-neox", (("fc1", "dense_h_to_4h"), ("fc2", "dense_4h_to_h"))),
    Layout("gpt-j", (("fc1", "fc_in"), ("fc2", "fc_out"))),
    Layout("w1-w2", (("fc1", "w1"), ("fc2", "w2"))),
    Layout("bert", (("fc1", "intermediate.dense"), ("fc2", "output.dense")),  # siblings under the layer
           shared=("output.dense",)),
)


def is_conv1d(m) -> bool:
    """HF's Conv1D (GPT-2): ``y = x @ W + b`` with ``W`` ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def is_projection(m) -> bool:
    """A dense projection: ``nn.Linear`` or HF ``Conv1D``."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def get_path(root: nn.Module, path: str):
    """The submodule at dotted ``path`` under ``root``, or None."""
    m = root
    for p in path.split("."):
        m = getattr(m, p, None) if isinstance(m, nn.Module) else None
        if m is None:
            return None
    return m


def projections(module: nn.Module, layout: Layout) -> Optional[Dict[str, nn.Module]]:
    """``{role: submodule}`` if every path of ``layout`` exists under ``module``, else None."""
    subs = {role: get_path(module, path) for role, path in layout.roles}
    return None if any(s is None for s in subs.values()) else subs


@dataclasses.dataclass
class MLPModule:
    name: str  # the MLP's module ("" for the model itself)
    layout: Layout
    quals: Dict[str, str]  # role -> qualified name of the projection
    modules: Dict[str, nn.Module]  # role -> projection


def match(module: nn.Module, layouts: Sequence[Layout] = LAYOUTS,
          accept: Callable[[nn.Module], bool] = is_projection) -> Optional[Tuple[Layout, Dict[str, nn.Module]]]:
    """The first layout of ``layouts`` whose projections all exist under ``module`` and are accepted."""
    for layout in layouts:
        subs = projections(module, layout)
        if subs is not None and all(accept(s) for s in subs.values()):
            return layout, subs
    return None


def mlp_modules(model: nn.Module, layouts: Sequence[Layout] = LAYOUTS,
                accept: Callable[[nn.Module], bool] = is_projection) -> List[MLPModule]:
    """Every MLP of ``model`` found by name, outermost first; a projection belongs to one MLP only."""
    out, taken = [], set()
    for name, mod in model.named_modules():
        found = match(mod, layouts, accept)
        if found is None:
            continue
        layout, subs = found
        quals = {role: f"{name}.{path}" if name else path for role, path in layout.roles}
        if not taken & set(quals.values()):
            out.append(MLPModule(name, layout, quals, subs))
            taken |= set(quals.values())
    return out


def leaf_names(layouts: Sequence[Layout] = LAYOUTS) -> frozenset:
    """Projection names that mean an MLP wherever they appear (direct children, not shared with attention)."""
    return frozenset(p for lay in layouts for _, p in lay.roles if "." not in p and p not in lay.shared)


def tied_gate_up_paths(layouts: Sequence[Layout] = LAYOUTS) -> Tuple[Tuple[str, str], ...]:
    """(gate path, up path) of the gated layouts with separate projections: pairs that share a mask."""
    return tuple((lay.paths["gate"], lay.paths["up"]) for lay in layouts if "gate" in lay.paths)


def fused_gate_up_names(layouts: Sequence[Layout] = LAYOUTS) -> frozenset:
    """Attribute names of fused gate|up projections (``gate_up_proj``)."""
    return frozenset(lay.paths["gate_up"] for lay in layouts if lay.fused_gate_up)


__all__ = ["IN_ROLES", "LAYOUTS", "Layout", "MLPModule", "OUT_ROLES", "fused_gate_up_names", "get_path", "is_conv1d", "leaf_names",
           "is_projection", "match", "mlp_modules", "projections", "tied_gate_up_paths"]
