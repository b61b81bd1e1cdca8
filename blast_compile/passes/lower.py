"""Lower each fused ``blast::sparse_mlp`` node on CUDA to ``blast::mlp`` (``ops/lowered.py``), whose kernels
Inductor launches from its own code (a compressed MLP's ``blast::packed_mlp``: ``blast::mlp_packed``).

For every such node, with the real weights in hand (only the backend has them):

1. build the node's plan from the weights, as the opaque op would at its first call;
2. warm up: run the lowered op's body once on the real weights and a dummy input of the graph's M
   (its example value; a dynamic M's hint), and, if the graph will be differentiated, its backward --
   this tunes every kernel the trace will launch and builds every device table it will read;
3. register the plan (``lowered.register``: the tables the warm-up read, packed into one buffer per dtype), add
   those buffers to the graph (AOTAutograd lifts them to inputs, each one checked and passed per call; in-place
   changes to them would be seen by the compiled code), and swap the node for ``blast::mlp``
   (``blast::mlp_train`` for ``sparse_mlp_train``) reading them.

What the compiled code assumes -- the pattern of the weights at compile time -- is checked before every
call of the compiled graph by ``guard.GraphGuard`` (``Watch``, one per lowered MLP, made here).
Counters: ``lowered``, ``lowered_train``, ``lowered_packed``, ``lower_skipped_<why>``.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, List, Optional

import torch
import torch.utils._pytree as pytree
from torch._dynamo.source import ConstantSource
from torch._dynamo.utils import counters
from torch.fx import GraphModule, Node
from torch.utils._python_dispatch import TorchDispatchMode

from .. import codegen
from ..ops import launch, lowered, sparse_mlp  # (lowered: registers blast::mlp, mlp_train, mlp_backward)
from ..ops.tune import _hint
from .match import is_dtensor
from .normalize import example_value

if TYPE_CHECKING:
    from ..guard import Watch

log = logging.getLogger("blast_compile.passes")

_OPAQUE = (torch.ops.blast.sparse_mlp.default, torch.ops.blast.sparse_mlp_train.default)
_PACKED = torch.ops.blast.packed_mlp.default
_VIEWS = (torch.t, torch.narrow)  # what rewrite puts between a parameter and the fused node


def _chain(node, ctx):
    """``(tensor, [(view fn, args), ...])``: the graph input behind ``node`` and the views the rewrite put on
    it (``rewrite._view``), or None."""
    if node is None or not isinstance(node, Node):
        return None
    if node.op == "call_function" and node.target in _VIEWS:
        base = _chain(node.args[0], ctx)
        return None if base is None else (base[0], base[1] + [(node.target, tuple(node.args[1:]))])
    t = ctx.value(node)
    return (t, []) if isinstance(t, torch.Tensor) else None


def _real(node, ctx):
    """The real tensor behind a graph input or a view of one, else None."""
    c = _chain(node, ctx)
    if c is None:
        return None
    t, views = c
    for fn, args in views:
        t = fn(t, *args)
    return t


def _why_not(x, ws) -> Optional[str]:
    if any(w is None or not isinstance(w, torch.Tensor) for w in ws):
        return "weights"
    if not isinstance(x, torch.Tensor) or not x.is_cuda or any(not w.is_cuda for w in ws):
        return "device"
    if is_dtensor(x) or any(is_dtensor(w) for w in ws):
        return "dtensor"
    return None


def lowerable(gm: GraphModule) -> bool:
    return any(n.op == "call_function" and (n.target in _OPAQUE or n.target is _PACKED) for n in gm.graph.nodes)


class _Tables:
    """Adds a lowered plan's tables to the graph as buffers (AOTAutograd lifts them to inputs)."""

    def __init__(self, gm, fake_mode):
        self.gm, self.fake_mode, self.n = gm, fake_mode, 0

    def nodes(self, tensors):
        tabs = []
        for t in tensors:
            attr = f"_blast_table_{self.n}"
            self.n += 1
            self.gm.register_buffer(attr, t, persistent=False)
            if hasattr(self.gm, "_param_name_to_source"):  # (AOTAutograd wants a source for every lifted buffer)
                self.gm._param_name_to_source[attr] = ConstantSource(attr)
            tab = self.gm.graph.get_attr(attr)
            if self.fake_mode is not None:
                tab.meta["example_value"] = self.fake_mode.from_tensor(t, static_shapes=True)
            tabs.append(tab)
        return tabs


def lower(gm: GraphModule, ctx, fake_mode=None) -> List["Watch"]:
    """Lower every fused CUDA node of ``gm`` in place; returns one ``guard.Watch`` per lowered node."""
    from ..guard import Watch

    watches = []
    tables = _Tables(gm, fake_mode)
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _PACKED]:
        w = _lower_packed(gm, node, ctx, tables)
        if w is not None:
            watches.append(w)
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _OPAQUE]:
        (x_n, w1_n, b1_n, w3_n, b3_n, w2_n, b2_n, act, bh, bd, key, max_density, *rest) = node.args
        cdt = rest[0] if rest else None
        save = node.kwargs.get("save", 0) if node.target is _OPAQUE[1] else 0
        w1, b1, w3, b3, w2, b2 = (_real(n, ctx) for n in (w1_n, b1_n, w3_n, b3_n, w2_n, b2_n))
        xv = example_value(x_n)
        why = _why_not(xv, [w1, w2] + ([w3] if w3_n is not None else []))
        if why is not None:
            counters["blast"][f"lower_skipped_{why}"] += 1
            log.info("blast: %s not lowered (%s): the opaque op runs it", node.name, why)
            continue
        # the eager op's plan for these weights, with a cache of its own (the tables the trace reads, only)
        base = sparse_mlp.weights_plan(None, w1, b1, w3, b3, w2, b2, act, bh, bd, key, max_density)
        plan = sparse_mlp._Plan()
        for f in sparse_mlp._Plan.__slots__:
            if f != "cache":
                setattr(plan, f, getattr(base, f))
        rows = _warm_rows(xv)
        needs = [bool(t is not None and t.requires_grad) for t in (xv, w1, b1, w3, b3, w2, b2)]
        train = torch.is_grad_enabled() and any(needs)
        plan.cache["dw_fix"] = plan.dw_fix  # (read by the backward: a trace must get them as tables)
        used = _warm_up(plan, rows, xv, (w1, b1, w3, b3, w2, b2), act, cdt, save, needs if train else None)
        name, tensors = lowered.register(plan, key, used)
        with gm.graph.inserting_before(node):
            tabs = tables.nodes(tensors)
            args = (x_n, w1_n, b1_n, w3_n, b3_n, w2_n, b2_n, tabs, name, act, cdt)
            if save:
                new = gm.graph.call_function(torch.ops.blast.mlp_train.default, args + (save,))
            else:
                new = gm.graph.call_function(torch.ops.blast.mlp.default, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        counters["blast"]["lowered"] += 1
        counters["blast"]["lowered_train"] += bool(save) or train
        watches.append(Watch(name, plan, [_chain(n, ctx) for n in (w1_n, w3_n, w2_n)], act,
                             [_chain(n, ctx) for n in (b1_n, b3_n, b2_n)]))
        log.info("blast: lowered %s (%s): %d table buffers, warm-up at M=%d%s", node.name, name, len(tensors), rows,
                 " with backward" if train else "")
    if watches:
        gm.graph.lint()
        gm.recompile()
    return watches


def _lower_packed(gm, node, ctx, tables) -> Optional["Watch"]:
    """A compressed MLP (``blast::packed_mlp``) -> ``blast::mlp_packed``. Blocks stored in the pattern's order are
    read where they are stored; a layer whose blocks needed re-packing (a hidden block the pattern drops, gate
    and up indexed apart) reads the plan's re-packed copy, a table -- then a change of its blocks' values sends
    the graph to the opaque op (``guard.PackedWatch``)."""
    from ..guard import PackedWatch
    from ..ops import packed_mlp

    (x_n, bl1_n, rp1_n, ci1_n, b1_n, bl3_n, rp3_n, ci3_n, b3_n, bl2_n, rp2_n, ci2_n, b2_n, act, bh, bd, d_hidden,
     d_out, key) = node.args
    ins = [_real(n, ctx) for n in (bl1_n, rp1_n, ci1_n, b1_n, bl3_n, rp3_n, ci3_n, b3_n, bl2_n, rp2_n, ci2_n, b2_n)]
    bl1, rp1, ci1, b1, bl3, rp3, ci3, b3, bl2, rp2, ci2, b2 = ins
    xv = example_value(x_n)
    why = _why_not(xv, [bl1, bl2] + ([bl3] if bl3_n is not None else []))
    if why is None and (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ins)):
        why = "grad"  # (inference only: the opaque op raises a clear error on backward)
    if why is None:
        base = packed_mlp.packed_plan(bl1, rp1, ci1, b1, bl3, rp3, ci3, b3, bl2, rp2, ci2, b2, act, bh, bd,
                                      _hint(xv.shape[-1]), d_hidden, d_out, key)
        if not base.finite:
            why = "nonfinite"
        elif not base.pad_zero:
            why = "padding"
    if why is not None:
        counters["blast"][f"lower_skipped_{why}"] += 1
        log.info("blast: %s not lowered (%s): the opaque op runs it", node.name, why)
        return None
    plan = copy.copy(base)
    plan.cache = {"d_hidden": d_hidden, "d_out": d_out, "blocks": list(base.copies)}
    rows = _warm_rows(xv)
    x = torch.zeros(rows, _hint(xv.shape[-1]), device=bl1.device, dtype=xv.dtype)
    used = _warm(bl1.device, lambda: lowered.run_packed(plan, x, bl1, b1, bl3, b3, bl2, b2, act, d_out))
    name, tensors = lowered.register(plan, key, used)
    with gm.graph.inserting_before(node):
        args = (x_n, bl1_n, b1_n, bl3_n, b3_n, bl2_n, b2_n, tables.nodes(tensors), name, act, d_out)
        new = gm.graph.call_function(torch.ops.blast.mlp_packed.default, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    counters["blast"]["lowered"] += 1
    counters["blast"]["lowered_packed"] += 1
    log.info("blast: lowered compressed %s (%s): %d table buffers, warm-up at M=%d", node.name, name, len(tensors), rows)
    return PackedWatch(name, plan, [_chain(n, ctx) for n in (bl1_n, bl3_n, bl2_n, b1_n, b3_n, b2_n)],
                       [_chain(n, ctx) for n in (rp1_n, ci1_n, rp3_n, ci3_n, rp2_n, ci2_n)],
                       copied=[c is not None for c in base.copies])


def _warm_rows(xv) -> int:
    """The M the warm-up runs at: the graph's (its hint, if dynamic); past decode where an exported range
    reaches past it (``launch.one_graph_for_all_rows``: the trace will pick the prefill kernels)."""
    rows = math.prod(_hint(s) for s in xv.shape[:-1])
    if launch.one_graph() and rows <= codegen.DECODE_MAX_M and not launch.rows_at_most(
            math.prod(xv.shape[:-1]), codegen.DECODE_MAX_M):
        rows = codegen.DECODE_MAX_M + 1
    return rows


class _Uses(TorchDispatchMode):
    """Adds the ``id`` of every tensor an aten op receives to ``ids``."""

    def __init__(self, ids):
        super().__init__()
        self.ids = ids

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ids.update(id(a) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def _warm(device, body) -> set:
    """Run a lowered op's body now (``launch.lowering("warm")``: real launches, the choices a trace makes):
    it tunes and builds what the trace reads. Then once more, as the trace will (every choice made, every table
    built), noting the ``id`` of every tensor it reads -- in a kernel launch or an aten op; those of the plan
    become the op's tables (``lowered.register``)."""
    from torch._library.triton import set_wrap_triton_enabled

    ids: set = set()
    with set_wrap_triton_enabled(False), launch.lowering("warm"), torch.no_grad():
        body()
        seen = counters["blast"].copy()  # (the second run counts nothing: it repeats what the first did)
        with launch.recording_uses(ids), _Uses(ids):
            body()
        counters["blast"].clear()
        counters["blast"].update(seen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ids


def _warm_up(plan, rows, xv, weights, act, cdt, save, needs) -> set:
    """Warm up ``blast::mlp`` (and its backward, ``needs``) on the real weights; returns ``_warm``'s ids."""
    w1 = weights[0]
    x = torch.zeros(rows, _hint(xv.shape[-1]), device=w1.device, dtype=cdt or xv.dtype)

    def body():
        # (as blast::mlp_train hands its backward the packed copies of fp32 master weights and x's row flags)
        copies, flags = [], []
        y, s = lowered.run_forward(plan, x, *weights, act, cdt, keep=save, copies=copies if save else None,
                                   flags=flags if save else None)
        if needs is not None:
            lowered.run_backward(plan, torch.zeros_like(y), x, *weights, act, needs, cdt, s, copies or None,
                                 flags[0] if flags else None)

    return _warm(w1.device, body)


__all__ = ["lower"]
