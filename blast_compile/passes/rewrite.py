"""Replace a matched MLP by one ``blast::sparse_mlp`` node (a compressed MLP: ``blast::packed_mlp``;
training on CUDA: ``blast::sparse_mlp_train``, which also hands what its backward would recompute to it).

The new node takes the place of the down projection's output, so everything
after the MLP (residual adds, GPT-2's final ``.view``) is untouched. It reads
the dense weights themselves (GPT-2 ``Conv1D`` weights through ``torch.t``, the
halves of a fused gate|up weight through ``torch.narrow``: views), never copies:
the op re-derives its pattern if the weights change.
Its ``meta`` is the down projection's (stack trace, ``nn_module_stack``,
``example_value``: same shape by construction, see ``match._pick_x``), so
provenance survives into AOTAutograd/Inductor logs.
"""
from __future__ import annotations

import operator

import torch
from torch._dynamo.utils import counters
from torch.fx import GraphModule, Node

from ..config import BlastOptions
from ..formats import MLPPattern
from ..ops import packed_mlp as _packed_op  # noqa: F401  registers torch.ops.blast.packed_mlp
from ..ops import sparse_mlp as _op  # noqa: F401  registers torch.ops.blast.sparse_mlp
from .match import MLPMatch, autocast_dtype, is_dtensor
from .normalize import example_value


def _view(graph, src: Node, fn, *args) -> Node:
    """``fn(src, *args)`` as a new node (a view of a weight), with the weight's provenance."""
    t = graph.call_function(fn, (src, *args))
    t.meta = {k: v for k, v in src.meta.items() if k in ("nn_module_stack", "stack_trace")}
    v = example_value(src)
    if isinstance(v, torch.Tensor):
        t.meta["example_value"] = fn(v, *args)
    return t


def _as_out_in(graph, lin) -> Node:
    """``lin``'s weight as ``[out, in]``: GPT-2 Conv1D's through ``torch.t``; one half of a fused
    gate|up weight through ``torch.narrow`` (its rows)."""
    w = _view(graph, lin.weight, torch.t) if lin.transposed else lin.weight
    return _rows(graph, w, lin)


def _rows(graph, t: Node, lin):
    if t is None or lin.rows is None:
        return t
    r0, r1 = lin.rows
    return _view(graph, t, torch.narrow, 0, r0, r1 - r0)


def _cast_x(graph, x: Node, orig: Node, cdt) -> Node:
    """Under autocast, cast x to the compute dtype in the graph rather than in the op: Inductor
    fuses the cast into whatever made x (an RMSNorm, typically), the op saves the smaller x for
    backward, and dX's cast back fuses into the norm's backward (in the op: 3 extra copies)."""
    v = example_value(orig)
    if cdt is None or not isinstance(v, torch.Tensor) or v.dtype == cdt:
        return x
    counters["blast"]["x_cast_in_graph"] += 1
    c = graph.call_method("to", (x, cdt))
    c.meta = {k: val for k, val in orig.meta.items() if k in ("nn_module_stack", "stack_trace")}
    c.meta["example_value"] = v.to(cdt)
    return c


def _training_on_cuda(m: MLPMatch) -> bool:
    """The graph is traced for autograd (grad mode on, the input or a weight wants a gradient) on CUDA:
    only there does the backward read what the forward kept (``blast::sparse_mlp_train``). Not for
    DTensors: tensor parallel has a sharding rule for ``blast::sparse_mlp`` only (``distributed.py``)."""
    if not torch.is_grad_enabled():
        return False
    vals = [example_value(n) for n in (m.x, m.gate.weight, m.down.weight, m.up.weight if m.up else None)
            if n is not None]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    if any(is_dtensor(v) for v in vals):
        return False
    return any(v.is_cuda for v in vals) and any(v.requires_grad for v in vals)


# save_hidden=True ("auto") keeps the pre-activations too where the backward's recompute of them
# is heavier than writing and reading them: the in-projection's mean live width per live hidden
# block (K) at least this. Keeping them paid for the 8B MLP (K = 410) and cost the 34M model (K ~ 90);
# 256 sits between the two measured points, not swept (docs/history.md, round 14).
SAVE_PRE_MIN_K = 256


def save_level(opts: BlastOptions, pattern: MLPPattern) -> int:
    """``blast::sparse_mlp_train``'s ``save`` for this MLP (``BlastOptions.save_hidden``)."""
    if opts.save_level is not None:
        return opts.save_level
    live = pattern.mask_in.sum(1)[pattern.hidden_live.long()]
    return 2 if live.numel() and float(live.float().mean()) * pattern.bd >= SAVE_PRE_MIN_K else 1


def fuse_mlp(gm: GraphModule, m: MLPMatch, pattern: MLPPattern, opts: BlastOptions, replaced: dict) -> Node:
    """Swap ``m`` for the fused node; returns it. The caller lints and recompiles.

    ``replaced`` maps earlier MLPs' outputs to their fused nodes: an MLP's input may
    be the previous MLP's output.
    """
    graph = gm.graph
    out = m.down.node
    x = replaced.get(m.x, m.x)
    with graph.inserting_before(out):
        w1 = _as_out_in(graph, m.gate)
        w3 = _as_out_in(graph, m.up) if m.up is not None else None
        w2 = _as_out_in(graph, m.down)
        b1 = _rows(graph, m.gate.bias, m.gate)
        b3 = _rows(graph, m.up.bias, m.up) if m.up is not None else None
        cdt = autocast_dtype(m)
        x = _cast_x(graph, x, m.x, cdt)
        args = (x, w1, b1, w3, b3, w2, m.down.bias, m.act.name, pattern.bh, pattern.bd, pattern.key,
                float(opts.max_runtime_density))
        args += (cdt,) if cdt is not None else ()
        save = save_level(opts, pattern) if _training_on_cuda(m) else 0
        if save:
            # the training op also returns what its backward reads instead of recomputing (ops/sparse_mlp.py)
            counters["blast"]["save_hidden"] += 1
            counters["blast"]["save_preacts"] += save == 2
            fused = graph.call_function(torch.ops.blast.sparse_mlp_train.default, args, {"save": save})
            y = graph.call_function(operator.getitem, (fused, 0))
            y.meta = dict(out.meta)
        else:
            fused = y = graph.call_function(torch.ops.blast.sparse_mlp.default, args)
    fused.meta = dict(out.meta)
    fused.meta["blast_pattern"] = pattern  # for the backend's kernel report (it takes it off again)
    out.replace_all_uses_with(y)
    replaced[out] = y
    _erase_dead(graph, reversed(m.nodes))  # interior nodes are private (check_private): all dead now
    return fused


def fuse_packed_mlp(gm: GraphModule, m: MLPMatch, key: str, replaced: dict) -> Node:
    """Swap a compressed MLP for one ``blast::packed_mlp`` node reading the stored tensors."""
    graph = gm.graph
    out = m.down.node
    x = replaced.get(m.x, m.x)
    bh, bd = (int(s) for s in example_value(m.gate.weight).shape[1:])

    def layer(lin):
        if lin is None:
            return (None, None, None, None)
        return (lin.weight, *lin.index, lin.bias)

    with graph.inserting_before(out):
        fused = graph.call_function(
            torch.ops.blast.packed_mlp.default,
            (x, *layer(m.gate), *layer(m.up), *layer(m.down), m.act.name, bh, bd,
             m.gate.out_features, m.down.out_features, key),
        )
    fused.meta = dict(out.meta)
    out.replace_all_uses_with(fused)
    replaced[out] = fused
    _erase_dead(graph, reversed(m.nodes))
    return fused


def _erase_dead(graph, nodes):
    """Erase ``nodes`` and then whatever only they used (x's views, shape and scalar arithmetic)."""
    todo, erased = list(nodes), set()
    while todo:
        n = todo.pop(0)
        if n not in erased and not n.users and n.op in ("call_function", "call_method") and not n.is_impure():
            inputs = n.all_input_nodes
            graph.erase_node(n)
            erased.add(n)
            todo.extend(inputs)
