"""Find MLPs in a Dynamo graph, and the reasons to leave one dense.

Two patterns, anchored at the down projection (the last linear):

* plain: ``down(act(fc(x)))``
* gated: ``down(act(gate(x)) * up(x))``, the product in either operand order; gate and up
  may be the two halves of one linear (``chunk``/``split`` of a fused gate|up projection)

"linear" and "act" are whatever :mod:`.normalize` recognizes (a compressed
``block_linear`` included: all three layers compressed, or none); row-preserving
views may sit anywhere between the nodes (GPT-2's ``Conv1D`` flattens to 2-D
and back). A match is only *structure*. Whether replacing it by one fused node
keeps eager's meaning is decided by :data:`CHECKS`, functions that each return
``None`` or ``(tag, reason)``; the tag names the counter
``counters["blast"]["dense_<tag>"]``.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
import re
from typing import List, Optional

import torch
from torch.fx import GraphModule, Node

from ..ops.activations import ACTIVATIONS
from .normalize import (Activation, Linear, as_half, as_linear, classify_activation, example_value, is_mul, same,
                        same_shape, static_size, strip_views)


@dataclasses.dataclass
class MLPMatch:
    kind: str  # "plain" | "gated"
    act: Activation
    gate: Linear  # W1 (the only in-projection of a plain MLP)
    up: Optional[Linear]  # W3
    down: Linear  # W2; its output node is what the fused node replaces
    x: Optional[Node]  # what the fused node reads: a view of the input whose rows match the output's
    interior: List[Node]  # nodes that die with the rewrite (besides down.node)
    mul: Optional[Node] = None  # the gated product
    # (enabled, dtype) of autocast where a ``with torch.autocast`` block of the compiled code sets it for this
    # MLP (``check_autocast``); None: the ambient state, which Dynamo guards on
    autocast: Optional[tuple] = None

    @property
    def nodes(self) -> List[Node]:
        return self.interior + [self.down.node]

    @property
    def linears(self) -> List[Linear]:
        return [lin for lin in (self.gate, self.up, self.down) if lin is not None]

    @property
    def packed(self) -> bool:
        """Every linear is a compressed ``block_linear`` (mixed MLPs are refused by ``check_packed``)."""
        return all(lin.packed for lin in self.linears)


def _pick_x(gate: Linear, out: Node) -> Optional[Node]:
    """The view of the MLP input (along its view chain) whose leading dims are the output's."""
    root, chain = strip_views(gate.x)
    want = example_value(out)
    for c in [gate.x, root] + chain:
        v = example_value(c)
        if isinstance(v, torch.Tensor) and isinstance(want, torch.Tensor) and same_shape(v.shape[:-1], want.shape[:-1]):
            return c
    return None


def _in_proj(node) -> Optional[Linear]:
    """A gated MLP's gate or up projection: a linear, or one half of a fused gate|up linear."""
    return as_linear(node) or as_half(node)


def _gated(down: Linear, order):
    prod, views = strip_views(down.x)
    if not is_mul(prod):
        return
    for g_side, u_side in (prod.args, prod.args[::-1]):
        u_root, u_views = strip_views(u_side)
        up = _in_proj(u_root)
        act = classify_activation(g_side, order) if up is not None else None
        gate = _in_proj(act.pre) if act is not None else None
        if gate is None or gate.node is up.node or strip_views(gate.x)[0] is not strip_views(up.x)[0]:
            continue
        if (gate.rows is None) != (up.rows is None) or (gate.rows and gate.via[0] is not up.via[0]):
            continue  # halves of two different fused linears, or half and whole: not one MLP
        via = list(dict.fromkeys(gate.via + up.via))
        interior = sorted([*via, gate.node, *act.nodes, up.node, *u_views, prod, *views], key=order.get)
        yield MLPMatch("gated", act, gate, up, down, _pick_x(gate, down.node), interior, prod)


def _plain(down: Linear, order):
    act = classify_activation(down.x, order)
    gate = as_linear(act.pre) if act is not None else None
    if gate is not None:
        yield MLPMatch("plain", act, gate, None, down, _pick_x(gate, down.node), [gate.node, *act.nodes])


def _match_at(down: Linear, order) -> Optional[MLPMatch]:
    """The MLP ending in ``down``: one with a fusable activation if any reading has one."""
    found = [*_plain(down, order), *_gated(down, order)]
    return next((m for m in found if m.act.name), found[0] if found else None)


def find_mlps(gm: GraphModule) -> List[MLPMatch]:
    """Every MLP in graph order; a node belongs to at most one match."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found, claimed = [], set()
    for node in gm.graph.nodes:
        down = as_linear(node)
        m = _match_at(down, order) if down is not None else None
        if m is None or claimed.intersection(m.nodes):
            continue
        claimed.update(m.nodes)
        found.append(m)
    return found


# --- provenance ------------------------------------------------------------------------

def _clean_path(path: str) -> str:
    """``L['self']._modules['layers']._modules['0'].mlp`` -> ``layers.0.mlp``."""
    path = re.sub(r"getattr\(([^,]*), '([^']*)'\)", r"\1.\2", path)
    path = re.sub(r"\._modules\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    path = re.sub(r"^L\['[^']*'\]", "", path)  # the compiled module itself
    path = re.sub(r"^G\['([^']*)'\]", r"\1", path)  # a global module keeps its name
    return path.strip(".")


def module_path(m: MLPMatch) -> str:
    """The innermost module that holds all the MLP's linears ("<root>" for the compiled module)."""
    stacks = []
    for lin in m.linears:
        st = lin.node.meta.get("nn_module_stack") or {}
        stacks.append([v[0] if isinstance(v, tuple) else str(v) for v in st.values()])
    common = []
    for entries in zip(*stacks):
        if any(e != entries[0] for e in entries):
            break
        common.append(entries[0])
    return _clean_path(common[-1]) or "<root>" if common else "<root>"


# --- checks ----------------------------------------------------------------------------

def _is_autocast_call(node: Node, which: str) -> bool:
    """Dynamo's ``_enter_autocast`` / ``_exit_autocast`` call for a ``with torch.autocast(...)`` in the code."""
    t = node.target
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    return node.op in ("call_function", "call_method") and which in str(name).lower()


UNKNOWN_BLOCK = "unknown"  # before a block's exit whose enter is not in this graph: the state is unknown


def autocast_blocks(gm: GraphModule) -> dict:
    """Node -> the ``with torch.autocast(...)`` blocks traced into the graph that it runs inside (their
    ``_enter_autocast`` nodes, outermost first); nodes outside every block are absent. Graph order is run order,
    so a block is the span between its enter and exit. An exit whose enter is not in this graph (the block
    opened before a graph break) leaves every node before it in an unknown state (``UNKNOWN_BLOCK``); an enter
    with no exit covers every node after it."""
    blocks, stack, seen = {}, [], []
    for n in gm.graph.nodes:
        if _is_autocast_call(n, "enter_autocast"):
            stack.append(n)
        elif _is_autocast_call(n, "exit_autocast"):
            if stack:
                stack.pop()
            else:
                blocks.update(dict.fromkeys(seen, UNKNOWN_BLOCK))
        elif stack:
            blocks[n] = tuple(stack)
        seen.append(n)
    return blocks


def block_state(enters, device: str):
    """(enabled, dtype) of autocast on ``device`` inside the blocks ``enters`` (outermost first), starting from
    the ambient state; None where an argument is not a constant of the graph."""
    enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    for e in enters:
        args = list(e.args) + [None] * 4
        dev, dt, on = args[0], args[1], args[2]
        if any(isinstance(a, Node) for a in args[:4]) or not isinstance(dev, str) or not isinstance(on, bool):
            return None
        if dev == device:
            enabled, dtype = on, (dt if dt is not None else dtype)
    return enabled, dtype


class Context:
    """What the checks and detection read: example values and sources of graph inputs."""

    def __init__(self, gm: GraphModule, example_inputs):
        self.gm = gm
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = dict(zip(self.placeholders, example_inputs))
        self.autocast_blocks = autocast_blocks(gm)

    def value(self, node: Optional[Node]):
        """The real tensor behind a graph input (placeholder or get_attr), else None."""
        if node is None:
            return None
        if node.op == "placeholder":
            return self.inputs.get(node)
        if node.op == "get_attr":
            obj = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            return obj
        return None

    def is_param(self, node: Node) -> bool:
        """A module parameter/buffer (not a user input, not computed in the graph)."""
        if node.op == "get_attr":
            return isinstance(self.value(node), torch.Tensor)
        if node.op != "placeholder" or not isinstance(self.value(node), torch.Tensor):
            return False
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None) or getattr(node, "_dynamo_source", None)
        if source is None:  # no provenance left: trust only real Parameters
            return isinstance(self.value(node), torch.nn.Parameter)
        name = _source_name(source)
        return "_parameters[" in name or "_buffers[" in name

    def source(self, node: Node):
        """Dynamo's source of graph input ``node`` (e.g. ``L['self']._modules['fc1']._parameters['weight']``)."""
        if node is None or node.op != "placeholder":
            return None
        return getattr(node.meta.get("grapharg"), "source", None) or getattr(node, "_dynamo_source", None)

    def owner(self, node: Node) -> Optional[str]:
        """Name of the module holding parameter/buffer ``node`` (None when provenance is lost)."""
        if node.op == "get_attr":
            return str(node.target).rpartition(".")[0]
        source = getattr(node.meta.get("grapharg"), "source", None) or getattr(node, "_dynamo_source", None)
        if source is None:
            return None
        name = _source_name(source)
        owner = re.sub(r"\._(parameters|buffers)\['[^']*'\]$", "", name)
        return owner if owner != name else None


def _source_name(source) -> str:
    return source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", source))


def is_dtensor(t) -> bool:
    """A DTensor (tensor-parallel weight), told by its interface: no torch.distributed import."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def weight_of(lin: Linear, ctx: Context):
    """(weight as ``[out, in]``, bias): the real tensors behind ``lin`` (GPT-2 Conv1D weights
    transposed, one half of a fused gate|up its rows: views)."""
    w, b = ctx.value(lin.weight), ctx.value(lin.bias)
    if lin.transposed and isinstance(w, torch.Tensor) and w.dim() == 2:
        w = w.t()
    if lin.rows is not None:
        r0, r1 = lin.rows
        w, b = (t[r0:r1] if isinstance(t, torch.Tensor) else t for t in (w, b))
    return w, b


def _weights(m: MLPMatch):
    """(role, node) for every weight and bias the fused node reads."""
    out = []
    for role, lin in (("w1", m.gate), ("w3", m.up), ("w2", m.down)):
        if lin is not None:
            out.append((role, lin.weight))
            if lin.bias is not None:
                out.append(("b" + role[1], lin.bias))
    return out


def _indices(m: MLPMatch):
    """(role, node) for the index tensors of a compressed MLP's layers."""
    return [(f"{role}.{what}", n) for role, lin in (("w1", m.gate), ("w3", m.up), ("w2", m.down))
            if lin is not None and lin.packed for what, n in zip(("row_ptr", "col_idx"), lin.index)]


def check_autocast(m, ctx):
    """An MLP inside ``with torch.autocast`` blocks of the compiled code computes in the state they set (read
    from the block's constant arguments into ``m.autocast``); blocks elsewhere -- e.g. a rotary embedding
    computed with autocast off -- leave it on the ambient state. Kept dense: an MLP that straddles a block's
    edge, or whose block state is unknown (opened before a graph break) or not constant."""
    nodes = m.nodes + [lin.node for lin in m.linears]
    stacks = {ctx.autocast_blocks.get(n, ()) for n in nodes}
    if len(stacks) > 1:
        return "autocast", "the MLP straddles the edge of a torch.autocast block of the compiled code"
    (enters,) = stacks
    if enters == ():
        return None
    xv = example_value(m.x)
    state = block_state(enters, xv.device.type) if enters != UNKNOWN_BLOCK and isinstance(xv, torch.Tensor) else None
    if state is None:
        return "autocast", ("the MLP runs inside a torch.autocast block whose state the graph does not pin "
                            "(opened before a graph break, or set from a run-time value)")
    m.autocast = state


def check_activation(m, ctx):
    if m.act.name is None:
        return "activation", f"activation ({m.act.ops}) is not one of {', '.join(ACTIVATIONS)}: {m.act.why}"


def check_private(m, ctx):
    inside = set(m.nodes)
    for n in m.interior:
        for u in n.users:
            if u not in inside:
                return "shared_intermediate", f"intermediate {n.name} is also used by {u.name}"


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.setitem}


def writes_in_place(n: Node) -> bool:
    """Whether ``n`` writes a tensor in place (Dynamo's graphs keep ``x.mul_``, ``x += y``, ``x[i] = v``,
    ``F.relu(x, inplace=True)``; AOTAutograd removes them only later)."""
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.startswith("_")
    if n.op != "call_function":
        return False
    t = n.target
    if t in _INPLACE_OPERATORS or "out" in n.kwargs:
        return True
    schema = getattr(t, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(t, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    try:
        return inspect.signature(t).bind(*n.args, **n.kwargs).arguments.get("inplace") is True
    except (TypeError, ValueError):  # (no Python signature, or not these arguments)
        return n.kwargs.get("inplace") is True


def check_no_writes(m, ctx):
    """The fused node reads the input and the weights at the down projection: eager's in-projections read them
    earlier. A write in place between the two (to anything: aliasing is not worth proving here) keeps it dense.
    The MLP's own nodes may write their intermediates (``F.relu(h, inplace=True)``)."""
    order = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
    own = set(m.nodes) | {lin.node for lin in m.linears}
    first = min(order[n] for n in own if n in order)
    end = order[m.down.node]
    for n in ctx.gm.graph.nodes:
        if first < order[n] < end and n not in own and writes_in_place(n):
            return "inplace_write", (f"{n.name} writes a tensor in place between the MLP's in-projection and its "
                                     "down projection (the fused node would read it after the write)")


def check_packed(m, ctx):
    kinds = {lin.packed for lin in m.linears}
    if len(kinds) > 1:
        return "packed_mixed", "the MLP mixes compressed (block_linear) and dense layers"
    cdt = autocast_dtype(m) if m.packed else None
    if cdt is not None:  # (blast::packed_mlp has no autocast rule; block_linear has: a no-op where all are cdt)
        vals = [example_value(m.x)] + [ctx.value(n) for _, n in _weights(m)]
        if any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != cdt for v in vals):
            return "autocast", ("a compressed MLP under torch.autocast with inputs or blocks not in its dtype runs "
                                "its block_linear chain, which casts as F.linear does")


def check_params(m, ctx):
    for role, w in _weights(m) + _indices(m):
        if not ctx.is_param(w):
            return "weight_not_param", f"{role} ({w.name}) is not a module parameter or buffer"
    for role, lin in (("w1", m.gate), ("w3", m.up), ("w2", m.down)):
        if lin is not None and lin.packed:  # blocks, row_ptr, col_idx of one BlockSparseLinear
            owners = {ctx.owner(n) for n in (lin.weight, *lin.index)}
            if len(owners) > 1 and None not in owners:
                return "weight_not_param", f"{role}'s blocks and index come from different modules: {sorted(owners)}"


def _check_packed_shapes(m, ctx):
    """Compressed layers: one MLP block shape, (bh, bd) for W1/W3 and (bd, bh) for W2, and sizes that chain."""
    blk = {role: ctx.value(lin.weight) for role, lin in (("w1", m.gate), ("w3", m.up), ("w2", m.down)) if lin is not None}
    if any(t.dim() != 3 for t in blk.values()):
        return "shape", "compressed blocks must be [nnz, bo, bi]"
    shapes = {r: tuple(int(s) for s in t.shape[1:]) for r, t in blk.items()}
    bh, bd = shapes["w1"]
    if shapes["w2"] != (bd, bh) or shapes.get("w3", (bh, bd)) != (bh, bd):
        return "block_shape", ("compressed layers do not share one MLP block shape (bh, bd): "
                               + ", ".join(f"{r} {a}x{b}" for r, (a, b) in shapes.items()))
    h = m.gate.out_features
    xv, hv = example_value(m.gate.x), example_value(m.down.x)
    ok = (m.up is None or m.up.out_features == h) and isinstance(hv, torch.Tensor) and same(hv.shape[-1], h)
    if xv.dim() < 1 or static_size(xv.shape[-1]) is None:
        return "shape", "the input's feature size is symbolic (nothing in the model pins it; mark it static)"
    for lin, (bo, bi) in ((m.gate, (bh, bd)), (m.up, (bh, bd)), (m.down, (bd, bh))):
        if lin is None:
            continue
        row_ptr, col_idx = (ctx.value(n) for n in lin.index)
        b = ctx.value(lin.bias)
        ok &= row_ptr.dim() == 1 and row_ptr.numel() == -(-lin.out_features // bo) + 1
        ok &= col_idx.dim() == 1 and col_idx.numel() == ctx.value(lin.weight).shape[0]
        ok &= b is None or tuple(b.shape) == (lin.out_features,)
    return _chain_verdict(m, ok, "compressed layer shapes")


def _chain_verdict(m, ok: bool, what: str):
    """The end of both shape checks: the gated product and the row layout."""
    if m.mul is not None:  # act(gate) and up must not broadcast against each other
        a, b = (example_value(n) for n in m.mul.args)
        ok &= same_shape(a.shape, b.shape)
    if not ok:
        return "shape", f"{what} do not chain"
    if m.x is None:
        return "shape", "the MLP reshapes rows between input and output"


def check_input(m, ctx):
    if not isinstance(example_value(m.gate.x), torch.Tensor):
        return "input", "input is not a tensor"


def check_shapes(m, ctx):
    if m.packed:
        return _check_packed_shapes(m, ctx)
    w = {}
    for lin, r in ((m.gate, "1"), (m.up, "3"), (m.down, "2")):
        if lin is not None:
            if lin.rows is not None and is_dtensor(ctx.value(lin.weight)):
                return "shape", "a fused gate|up weight is a DTensor (its halves are not split per rank here)"
            w["w" + r], b = weight_of(lin, ctx)
            if lin.bias is not None:
                w["b" + r] = b
    if any(w[r].dim() != 2 for r in ("w1", "w3", "w2") if r in w) or any(w[r].dim() != 1 for r in ("b1", "b3", "b2") if r in w):
        return "shape", "weights must be 2-D and biases 1-D"
    h, d = w["w1"].shape
    ok = w["w2"].shape[1] == h and ("w3" not in w or w["w3"].shape == w["w1"].shape)
    ok &= all(w[r].shape[0] == n for r, n in (("b1", h), ("b3", h), ("b2", w["w2"].shape[0])) if r in w)
    xv = example_value(m.gate.x)
    ok &= xv.dim() >= 1 and same(xv.shape[-1], d)
    return _chain_verdict(m, ok, "weight shapes")


def autocast_dtype(m: "MLPMatch"):
    """The dtype the MLP's linears run in under autocast -- the ambient state (Dynamo guards on it, so it holds
    for this graph) or the traced block's (``m.autocast``) -- or None. The fused op then casts like ``F.linear``
    would."""
    xv = example_value(m.x)
    if not isinstance(xv, torch.Tensor):
        return None
    dev = xv.device.type
    enabled, cdt = m.autocast or (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
    if not enabled:
        return None
    if xv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None  # autocast leaves float64 alone
    return cdt


def check_dtype_device(m, ctx):
    ts = [example_value(m.gate.x)] + [ctx.value(n) for _, n in _weights(m)]
    dtypes = {t.dtype for t in ts}
    # under autocast the linears cast every input to one dtype, and so does the fused op
    autocast_ok = (autocast_dtype(m) is not None and not m.packed
                   and dtypes <= {torch.float32, torch.float16, torch.bfloat16})
    if len(dtypes) > 1 and not autocast_ok:
        return "dtype", "mixed dtypes " + "/".join(sorted({str(t.dtype).replace("torch.", "") for t in ts}))
    if not ts[0].is_floating_point():
        return "dtype", f"{ts[0].dtype} is not a floating dtype"
    if len({t.device for t in ts + [ctx.value(n) for _, n in _indices(m)]}) > 1:
        return "device", "tensors on several devices"


def check_real_values(m, ctx):
    for role, n in _weights(m) + _indices(m):
        t = ctx.value(n)
        if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
            return "no_values", f"{role} has no values (fake or meta tensor)"


def check_packed_grad(m, ctx):
    if m.packed and any(getattr(example_value(lin.node), "requires_grad", False) for lin in m.linears):
        return "requires_grad", ("compressed MLP needs gradients here; the packed fusion is inference-only "
                                 "(run under torch.no_grad() to fuse it)")


CHECKS = [check_autocast, check_activation, check_private, check_no_writes, check_packed, check_params, check_input,
          check_shapes, check_dtype_device, check_real_values, check_packed_grad]


def refusal(m: MLPMatch, ctx: Context):
    """The first ``(tag, reason)`` that keeps ``m`` dense, or None."""
    for check in CHECKS:
        r = check(m, ctx)
        if r is not None:
            return r
    return None
