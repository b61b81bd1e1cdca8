"""Fused MLPs lowered into Inductor's own code: ``blast::mlp``, ``blast::mlp_train``, ``blast::mlp_backward``, and
``blast::mlp_packed`` for compressed MLPs.

``blast::sparse_mlp`` (``sparse_mlp.py``) is opaque to Inductor: every call runs its Python (plan and
version checks, config lookups, two ~40-argument launches), 0.2-0.3 ms of host time for kernels that run
10-50 µs. These ops are ``torch.library.triton_op``s instead: while AOTAutograd traces the graph, their
bodies run on fake tensors, every kernel launch goes through ``wrap_triton``, and Inductor emits the
launches in its output code next to its own kernels -- no Python per call, CUDA graphs and AOTInductor
included.

A trace has no weight values and no time to tune, so everything that depends on them is settled
before it, at compile time (``passes/lower.py``): the pattern's plan is built from the real weights,
the op body runs once on them (the *warm-up*: real launches, the same choices a trace makes -- see
``launch.lowering``), which tunes every kernel it launches and builds every device table it reads.
Those tables (the tensors of ``plan.cache`` that a second, recorded run of the warm-up reads: not the ones
only building others or serving other paths) are packed into one buffer per dtype, which become graph buffers
passed to the op as ``tables``; inside the trace, :meth:`Lowered.plan_for` swaps views of them into a copy of
the plan, so the launchers read the trace's tensors where they read the plan's. Staleness is the backend's business (``guard.py``): these ops
assume the pattern they were compiled for.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import triton_op

from . import gather
from .activations import dense_mlp, in_dtype
from .plans import as_output


@dataclasses.dataclass
class Lowered:
    """A plan and its device tables as the op receives them (``tables``): one flat buffer per dtype, each table
    of the plan a view into one (``where``: id of the plan's view -> position in ``tensors``, element offset,
    shape; offset -1: the whole tensor, one that could not be packed)."""

    plan: object
    tensors: List[Tensor]
    where: Dict[int, Tuple[int, int, Tuple[int, ...]]]
    views: List[Tensor]  # (kept alive here: ``where``'s ids stay theirs)

    def plan_for(self, tables) -> object:
        """The plan, or (``tables`` not its own tensors: a trace) a copy reading ``tables`` instead. A tensor
        of the plan that is not a table (its warm-up never read it) stays as it is: a trace that reads it
        fails loudly (a real tensor among fake ones)."""
        if len(tables) == len(self.tensors) and all(a is b for a, b in zip(tables, self.tensors)):
            return self.plan
        if len(tables) != len(self.tensors):
            raise RuntimeError(f"blast: lowered op got {len(tables)} tables, its plan has {len(self.tensors)}")
        views: Dict[int, Tensor] = {}  # (one view per table per trace, however often the plan refers to it)

        def swap(t):
            at = self.where.get(id(t))
            if at is None:
                return t
            i, off, shape = at
            if off < 0:
                return tables[i]
            v = views.get(id(t))
            if v is None:
                v = views[id(t)] = tables[i][off:off + math.prod(shape)].view(shape)
            return v

        plan = copy.copy(self.plan)
        plan.cache = _map(self.plan.cache, swap)
        return plan


LOWERED: Dict[str, Lowered] = {}


def _map(obj, fn):
    """``obj`` with every tensor inside it (dicts, tuples, lists, plan records) replaced by ``fn(t)``."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_map(v, fn) for v in obj)
    if isinstance(obj, _records()):
        new = copy.copy(obj)
        for name in _fields(obj):
            setattr(new, name, _map(getattr(obj, name), fn))
        return new
    return obj


def _records():
    """The plan records with tensors inside (imported late: ``import blast_compile`` does not load Triton)."""
    from .backward import _LiveBlocks
    from .tables import DeviceTables, _Static

    return _Static, _LiveBlocks, DeviceTables


def _fields(obj):
    return getattr(type(obj), "__slots__", None) or list(vars(obj))


def _tensors(obj, path, out):
    """(path, tensor) of every tensor in ``obj``, first occurrence only, in a stable order."""
    if isinstance(obj, Tensor):
        if all(t is not obj for _, t in out):
            out.append((path, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{path}[{k!r}]", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{path}[{i}]", out)
    elif isinstance(obj, _records()):
        for name in _fields(obj):
            _tensors(getattr(obj, name), f"{path}.{name}", out)
    return out


def register(plan, pattern_key: str, used: Optional[set] = None) -> Tuple[str, List[Tensor]]:
    """Register a warmed-up plan; returns its name (an op argument) and its tensors (the op's ``tables``).

    Its tables are the tensors of ``plan.cache`` whose ``id`` is in ``used`` (what the warm-up read), else all:
    the cache also holds tables for paths this graph does not take (the backward's, in an inference graph).
    The index tables are copied into one flat buffer per dtype (``_pack``) and the plan reads views of those:
    every op input is checked and passed at every call of the graph, and a training graph saves it for the
    backward -- host time per tensor, 25 tables per training MLP before.

    The name is the pattern key plus a digest of what the tables hold (paths, shapes, dtypes), so a graph
    cached by Inductor or AOTAutograd in another process can only be reused with tables laid out alike."""
    found = [(p, t) for p, t in _tensors(plan.cache, "cache", []) if used is None or id(t) in used]
    h = hashlib.sha1(repr([(p, tuple(t.shape), str(t.dtype)) for p, t in found]).encode()).hexdigest()[:12]
    name = f"{pattern_key}.{h}"
    ts = [t for _, t in found]
    tensors, at = _pack(ts)
    views = {id(t): v for t, (v, _) in zip(ts, at)}
    plan.cache = _map(plan.cache, lambda t: views.get(id(t), t))
    LOWERED[name] = Lowered(plan, tensors, {id(v): w for v, w in at}, [v for v, _ in at])
    return name, tensors


# Triton (and Inductor, for a user kernel's arguments) specialize a pointer on 16-byte alignment: each table
# starts at such an offset in its buffer, as it did in an allocation of its own
_ALIGN = 16


def _pack(ts: List[Tensor]):
    """``(buffers, [(view, (position, offset, shape)) per tensor])``: the contiguous index tensors of ``ts``
    copied into one buffer per (device, dtype), each replaced by a view of it; any other tensor passed whole (a
    compressed MLP's re-packed blocks: weight-sized, and kept by its plan's record as well)."""
    groups: Dict[tuple, List[int]] = {}
    for i, t in enumerate(ts):
        if t.is_contiguous() and not (t.is_floating_point() or t.is_complex()):
            groups.setdefault((t.device, t.dtype), []).append(i)
    buffers: List[Tensor] = []
    at: List[Optional[tuple]] = [None] * len(ts)
    for (device, dtype), idx in groups.items():
        step = max(1, _ALIGN // ts[idx[0]].element_size())
        offs, n = [], 0
        for i in idx:
            offs.append(n)
            n += -(-ts[i].numel() // step) * step
        flat = torch.zeros(max(n, 1), device=device, dtype=dtype)
        for i, off in zip(idx, offs):
            t = ts[i]
            v = flat[off:off + t.numel()].view(t.shape)
            v.copy_(t)
            at[i] = (v, (len(buffers), off, tuple(t.shape)))
        buffers.append(flat)
    for i, t in enumerate(ts):
        if at[i] is None:
            at[i] = (t, (len(buffers), -1, tuple(t.shape)))
            buffers.append(t)
    return buffers, at


def _entry(name):
    ent = LOWERED.get(name)
    if ent is None:
        raise RuntimeError(f"blast: no lowered plan {name!r} in this process (the graph was compiled elsewhere "
                           "and traced here without its compile-time warm-up)")
    return ent


def _mode():
    """A trace when wrap_triton is on (fake or functional tensors); the op's eager kernel turns it off."""
    from torch._library.triton import is_wrap_triton_enabled

    return "trace" if is_wrap_triton_enabled() else "warm"


def forward(x, w1, b1, w3, b3, w2, b2, tables, plan, activation, compute_dtype=None, keep=0, copies=None,
            flags=None):
    """``(y, S)``: the op's output and (``keep``) what the backward reads, S as ``triton_mlp.forward`` keeps it;
    ``copies``, ``flags``: see ``run_forward``."""
    from . import launch

    ent = _entry(plan)
    with launch.lowering(_mode()):
        return run_forward(ent.plan_for(tables), x, w1, b1, w3, b3, w2, b2, activation, compute_dtype, keep, copies,
                           flags)


def run_forward(p, x, w1, b1, w3, b3, w2, b2, activation, compute_dtype=None, keep=0, copies=None, flags=None):
    """``forward`` on a plan (the compile-time warm-up calls it directly, under ``launch.lowering("warm")``).
    ``copies`` / ``flags``: lists that get the packed copies of fp32 master weights and x's NaN/Inf row flags
    (``triton_mlp.forward``), for the backward."""
    from . import launch, triton_mlp

    x, b1, b3, b2 = in_dtype(compute_dtype, x, b1, b3, b2)
    lead, d_out = x.shape[:-1], w2.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    if p.dense or x2d.shape[0] == 0:
        return dense_mlp(x, *in_dtype(compute_dtype, w1, b1, w3, b3, w2, b2), activation), None
    out = triton_mlp.forward(x2d, w1, b1, w3, b3, w2, b2, p, activation, keep, copies, flags)
    y, s = out if keep else (out, None)
    shape = (*lead, d_out)
    return (y.view(shape) if launch.traced() else as_output(y.contiguous(), shape)), s


def backward(dy, x, w1, b1, w3, b3, w2, b2, tables, plan, activation, needs, compute_dtype=None, saved=None,
             copies=None, flags=None):
    """Gradients ``[dx, dw1, db1, dw3, db3, dw2, db2]`` (``sparse_mlp.sparse_mlp_backward``'s meaning)."""
    from . import launch

    ent = _entry(plan)
    with launch.lowering(_mode()):
        return run_backward(ent.plan_for(tables), dy, x, w1, b1, w3, b3, w2, b2, activation, needs, compute_dtype,
                            saved, copies, flags)


def run_backward(p, dy, x, w1, b1, w3, b3, w2, b2, activation, needs, compute_dtype=None, saved=None, copies=None,
                 flags=None):
    from . import triton_mlp

    orig = (x, w1, b1, w3, b3, w2, b2)
    x, b1, b3, b2, dy = in_dtype(compute_dtype, x, b1, b3, b2, dy)
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, dy.shape[-1])
    if p.dense or x2d.shape[0] == 0:
        g = gather.dense_backward(dy2d, x2d, *in_dtype(compute_dtype, w1, b1, w3, b3, w2, b2), activation, needs,
                                  p.dw_masks, p.pattern.bh, p.pattern.bd)
    else:
        s2d = [t.reshape(-1, t.shape[-1]) for t in saved] if saved else None
        g = triton_mlp.backward(dy2d, x2d, w1, b1, w3, b3, w2, b2, p, activation, needs, s2d, copies, flags)
    for k, fix in zip(("w1", "w3", "w2"), p.cache.get("dw_fix", p.dw_fix)):
        if fix is not None and g.get(k) is not None:  # a fused block holds declared-dead parts: dW is zero there
            g[k] = torch.where(fix, g[k], 0)
    out = []
    for i, k in enumerate(("x", "w1", "b1", "w3", "b3", "w2", "b2")):
        t = g.get(k)
        out.append(x.new_empty(0) if t is None
                   else (t.reshape(orig[0].shape) if i == 0 else t).to(orig[i].dtype).contiguous())
    return out


@triton_op("blast::mlp", mutates_args=())
def mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor], b3: Optional[Tensor], w2: Tensor,
        b2: Optional[Tensor], tables: List[Tensor], plan: str, activation: str,
        compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``down(act(gate(x)) [* up(x)])`` through the live blocks of the compiled pattern ``plan``."""
    return forward(x, w1, b1, w3, b3, w2, b2, tables, plan, activation, compute_dtype)[0]


@triton_op("blast::mlp_train", mutates_args=())
def mlp_train(x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor], b3: Optional[Tensor], w2: Tensor,
              b2: Optional[Tensor], tables: List[Tensor], plan: str, activation: str,
              compute_dtype: Optional[torch.dtype] = None,
              save: int = 2) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``blast::mlp`` that also returns what its backward reads instead of recomputing (``save``: 1 H,
    2 H and the pre-activations a [and u]; see ``sparse_mlp._train``): ``(y, h, a, u, c1, c3, c2, f)``, h/a/u each
    ``[*rows, hidden]``, c1/c3/c2 the packed copies of fp32 master weights under autocast (the backward reads
    them instead of packing again), f x's NaN/Inf row flags (instead of a scan), an empty tensor where nothing is
    kept. Separate tensors, not one stacked: kernels writing views of one buffer would make Inductor copy it
    around them."""
    copies, flags = [], []
    y, s = forward(x, w1, b1, w3, b3, w2, b2, tables, plan, activation, compute_dtype, keep=save, copies=copies,
                   flags=flags)
    shape = (*x.shape[:-1], w1.shape[0])
    parts = [t.view(shape) for t in (s or ())]
    extras = [y.new_empty(0) if c is None else c for c in (copies or [None] * 3) + (flags or [None])]
    return (y, *parts, *[y.new_empty(0) for _ in range(3 - len(parts))], *extras)


@triton_op("blast::mlp_backward", mutates_args=())
def mlp_backward(dy: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor], b3: Optional[Tensor],
                 w2: Tensor, b2: Optional[Tensor], tables: List[Tensor], saved: List[Tensor], extras: List[Tensor],
                 plan: str, activation: str, needs: List[bool],
                 compute_dtype: Optional[torch.dtype] = None) -> List[Tensor]:
    """``saved``: ``mlp_train``'s h [, a [, u]] (what its forward kept; empty: recompute); ``extras``: its c1,
    c3, c2, f (empty tensors where it has none)."""
    # (a copy is [blocks, rows, cols], possibly of no blocks; an absent one a 1-D empty tensor. ``backward`` checks
    # that what it gets fits, and makes anything that does not)
    copies = [c if c.dim() == 3 else None for c in extras[:3]]
    flags = extras[3] if len(extras) > 3 else None
    return backward(dy, x, w1, b1, w3, b3, w2, b2, tables, plan, activation, needs, compute_dtype, saved or None,
                    copies, flags)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w3, b3, w2, b2, tables, plan, activation, *rest = inputs
    kept = [t for t in output[1:4] if t.numel()] if isinstance(output, tuple) else []
    extras = list(output[4:8]) if isinstance(output, tuple) else []
    ctx.n_kept, ctx.n_extras = len(kept), len(extras)
    ctx.save_for_backward(x, w1, b1, w3, b3, w2, b2, *kept, *extras, *tables)
    ctx.args = (plan, activation)
    ctx.compute_dtype = rest[0] if rest else None


def _backward(ctx, dy, *ds):  # (ds: nothing but this backward reads the kept tensors)
    x, w1, b1, w3, b3, w2, b2, *rest = ctx.saved_tensors
    kept, rest = rest[:ctx.n_kept], rest[ctx.n_kept:]
    extras, tables = rest[:ctx.n_extras], rest[ctx.n_extras:]
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    grads = torch.ops.blast.mlp_backward(dy, x, w1, b1, w3, b3, w2, b2, tables, kept, extras, *ctx.args, needs,
                                         ctx.compute_dtype)
    ins = (x, w1, b1, w3, b3, w2, b2)
    res = [g if (needs[i] and ins[i] is not None) else None for i, g in enumerate(grads)]
    # (one entry per argument as the op was called: needs_input_grad has that structure, defaults left out)
    return (*res, [None] * len(tables), *[None] * (len(ctx.needs_input_grad) - 8))


mlp.register_autograd(_backward, setup_context=_setup_context)
mlp_train.register_autograd(_backward, setup_context=_setup_context)


# --- compressed MLPs: blast::packed_mlp lowered -----------------------------------------------------------

def run_packed(p, x, p1, b1, p3, b3, p2, b2, activation, d_out):
    """A compressed MLP's live blocks through the prefill / decode kernels: the stored blocks, or where they are
    not in the pattern's order the plan's re-packed copy (``cache["blocks"]``, tables of the graph)."""
    from . import launch, triton_mlp

    c1, c3, c2 = p.cache.get("blocks", (None, None, None))
    p1, p3, p2 = (s if c is None else c for s, c in ((p1, c1), (p3, c3), (p2, c2)))
    x2d = x.reshape(-1, x.shape[-1])
    shape = (*x.shape[:-1], d_out)
    if x2d.shape[0] == 0:
        return x.new_empty(shape)
    y = triton_mlp.forward_packed(x2d, p1, b1, p3, b3, p2, b2, p, activation, d_out)
    return y.view(shape) if launch.traced() else as_output(y.contiguous(), shape)


@triton_op("blast::mlp_packed", mutates_args=())
def mlp_packed(x: Tensor, p1: Tensor, b1: Optional[Tensor], p3: Optional[Tensor], b3: Optional[Tensor], p2: Tensor,
               b2: Optional[Tensor], tables: List[Tensor], plan: str, activation: str, d_out: int) -> Tensor:
    """``blast::packed_mlp`` (a compressed MLP, inference only) through the compiled pattern ``plan``."""
    from . import launch

    ent = _entry(plan)
    with launch.lowering(_mode()):
        return run_packed(ent.plan_for(tables), x, p1, b1, p3, b3, p2, b2, activation, d_out)
