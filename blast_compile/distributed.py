"""Tensor parallelism for block-sparse MLPs, on PyTorch's own stack (DTensor).

Megatron-style MLP sharding: gate/up (or fc1) are column-parallel (weight rows
``Shard(0)``), down (or fc2) is row-parallel (weight columns ``Shard(1)``), the
input is replicated and the output is a ``Partial`` sum: one all-reduce per MLP.
Each rank owns a contiguous slice of the hidden units, so it can run the fused
block-sparse MLP on its *local* shards with no communication inside the MLP.

Three pieces:

* :func:`balance_hidden_` - block sparsity is rarely uniform across the hidden
  dimension, and a contiguous split can give one rank most of the live blocks
  (it then sets the decode latency). Permuting hidden units never changes the
  MLP's function, so we permute whole hidden blocks (LPT, equal-count bins) to
  equalize live blocks per rank before sharding.
* :class:`BlastMLPParallel` / :func:`parallelize_blast_mlp` - a ``ParallelStyle``
  for a whole MLP module (``distribute_module``: shard the weights, make the
  input a ``Replicate`` DTensor, all-reduce + ``to_local`` the output). Inside the
  MLP the Dynamo graph is the same ``linear -> act [* linear] -> linear`` as
  without TP, just on DTensors, so the fusion pass matches it unchanged.
  :func:`tp_plan` gives the equivalent stock ``ColwiseParallel``/``RowwiseParallel``
  plan (which puts no-op ``redistribute`` calls between the projections).
* a DTensor sharding rule for ``blast::sparse_mlp`` (``register_sharding``): with
  x ``Replicate``, w1/b1/w3/b3 ``Shard(0)``, w2 ``Shard(1)`` the op runs on the
  local shards and returns ``Partial``. b2 is requested as ``Partial`` so DTensor
  keeps it on one rank's sum only (it would be added world_size times otherwise).

Training: ``blast::sparse_mlp_train`` and ``blast::sparse_mlp_backward`` have rules too (the backward's
gradients come out sharded like the weights, dX ``Partial``), and declared masks follow the weights to
their local shards (:func:`shard_declared_mask`), so TP gradients are the single-device ones.
Compressed models are sharded by :mod:`blast_compile.tp_compressed` instead (packed blocks are not
DTensor shards).

What the fusion pass must do with DTensor weights (see TP_NOTES.md): example
inputs of weight placeholders are ``DTensor`` Parameters (``isinstance(w,
nn.Parameter)`` holds, ``type(w) is nn.Parameter`` does not) and some example
inputs are not tensors at all (the ``DeviceMesh``); detect on
:func:`local` (``w.to_local()``), i.e. on this rank's shard, and emit the op with
the DTensor nodes as arguments and the *local* pattern's key.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel

from . import layouts
from . import masks as _masks
from .formats import choose_block, pattern_from_weights

log = logging.getLogger("blast_compile.distributed")

def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's shard of a DTensor (a plain tensor as is). Detection must read this."""
    return t.to_local() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- sharding rule
@register_sharding(torch.ops.blast.sparse_mlp.default)
def _sparse_mlp_sharding(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density, *rest):
    """Placements (output, inputs) DTensor may pick from; it takes the cheapest for the given inputs."""
    opt = lambda t, p: None if t is None else p  # noqa: E731
    tail = [None] * (5 + len(rest))  # activation, block_h, block_d, pattern_key, max_density[, compute_dtype]
    # Tensor parallel: hidden units sharded, one partial sum per rank. b2 as Partial:
    # DTensor turns a Replicate bias into a partial one (counted once in the sum).
    tp = ([Partial()], [Replicate(), Shard(0), opt(b1, Shard(0)), opt(w3, Shard(0)), opt(b3, Shard(0)),
                        Shard(1), opt(b2, Partial()), *tail])
    # Everything replicated (any other layout gets gathered: correct, not fast).
    rep = ([Replicate()], [Replicate(), Replicate(), opt(b1, Replicate()), opt(w3, Replicate()),
                           opt(b3, Replicate()), Replicate(), opt(b2, Replicate()), *tail])
    # Data parallel over rows of x with replicated weights.
    dp = ([Shard(0)], [Shard(0), *rep[1][1:]])
    return [tp, rep, dp] if x.ndim > 1 else [tp, rep]


@register_sharding(torch.ops.blast.sparse_mlp_train.default)
def _sparse_mlp_train_sharding(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density,
                               *rest):
    """The training forward: ``sparse_mlp``'s placements, plus its second output (what the backward reads,
    ``[n, *rows, hidden]``) sharded along the hidden units like the weights' rows."""
    tp, rep, *dp = _sparse_mlp_sharding(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key,
                                        max_density, *rest)
    # saved is [n, *x.shape[:-1], hidden]: TP shards its last dim, DP its rows (dim 1)
    out = [([tp[0][0], Shard(x.ndim)], tp[1]), ([Replicate(), Replicate()], rep[1])]
    return out + [([Shard(0), Shard(1)], d[1]) for d in dp]


def _sparse_mlp_backward_strategy(op_schema):
    """DTensor strategy of ``blast::sparse_mlp_backward`` (its output is a list, which ``register_sharding``
    cannot describe): the rank computes the gradients of its own hidden units.

    TP: dy and x ``Replicate``, w1/b1/w3/b3 ``Shard(0)``, w2 ``Shard(1)``, b2 ``Replicate`` -> dx ``Partial``
    (each rank's hidden units contribute a part), dW1/dB1/dW3/dB3 ``Shard(0)``, dW2 ``Shard(1)``, dB2
    ``Replicate`` (every rank sums the whole replicated dy). The grad of b2 must be whole on every rank: the
    forward asked for b2 as ``Partial`` below autograd, so autograd's b2 is the replicated parameter.
    Fallback: everything replicated. Unneeded gradients are empty tensors (``Replicate``)."""
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy

    def spec(a):  # an OpStrategy (a DTensor argument) -> its spec; anything else as is
        return a.strategies[0].output_spec if hasattr(a, "strategies") else a

    args = [spec(a) for a in op_schema.args_schema]
    dy, x, w1, b1, w3, b3, w2, b2 = args[:8]
    needs = args[13]
    saved = args[15] if len(args) > 15 else spec(op_schema.kwargs_schema.get("saved"))
    R = Replicate()
    grads_of = (x, w1, b1, w3, b3, w2, b2)
    # (needs[i] and an input to differentiate) -> a real gradient; else the op returns an empty tensor
    real = [bool(needs[i]) and grads_of[i] is not None for i in range(7)]
    tp_out = [Partial(), Shard(0), Shard(0), Shard(0), Shard(0), Shard(1), R]
    tp_in = [R, R, Shard(0), Shard(0), Shard(0), Shard(0), Shard(1), R]
    rows = []
    for outs, ins, sv in ((tp_out, tp_in, Shard(saved.ndim - 1) if saved is not None else None), ([R] * 7, [R] * 8, R)):
        row = [pl if real[i] else R for i, pl in enumerate(outs)]
        row += [pl if t is not None else None for t, pl in zip((dy, x, w1, b1, w3, b3, w2, b2), ins)]
        if saved is not None:
            row.append(sv)
        rows.append(row)
    return expand_to_full_mesh_op_strategy(op_schema.get_mesh_from_args(), op_schema, rows, input_index=7)


def _register_backward_strategy():
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    op = torch.ops.blast.sparse_mlp_backward.default
    # static from `activation` on (strings, ints, the needs list): they change the result placements
    static = next(i for i, a in enumerate(op._schema.arguments) if a.name == "activation")
    DTensor._op_dispatcher.sharding_propagator.register_op_strategy(
        op, _sparse_mlp_backward_strategy, RuntimeSchemaInfo(static, needs_pytree=True))


_register_backward_strategy()


# --------------------------------------------------------------------------- MLP discovery
# The layouts this module shards: nn.Linear projections that are direct children of the MLP module
# (a fused gate|up weight would split across ranks as [all gate | all up], not per hidden unit).
TP_LAYOUTS = tuple(lay for lay in layouts.LAYOUTS if not (lay.fused_gate_up or lay.conv1d or lay.nested))


def _tp_match(mlp: nn.Module):
    return layouts.match(mlp, TP_LAYOUTS, accept=lambda m: isinstance(m, nn.Linear))


def mlp_projections(mlp: nn.Module) -> Optional[Tuple[nn.Module, Optional[nn.Module], nn.Module]]:
    """(in/gate, up or None, down) linears of an MLP module of a :data:`TP_LAYOUTS` family, else None."""
    found = _tp_match(mlp)
    if found is None:
        return None
    _, subs = found
    return subs.get("gate", subs.get("fc1")), subs.get("up"), subs.get("down", subs.get("fc2"))


def mlp_module_names(model: nn.Module) -> List[str]:
    """Qualified names of every MLP module :func:`mlp_projections` recognizes."""
    return [n for n, m in model.named_modules() if mlp_projections(m) is not None]


# --------------------------------------------------------------------------- balancing
@dataclasses.dataclass
class BalanceReport:
    """Live blocks per rank before (contiguous split) and after the permutation."""

    world_size: int
    block: Tuple[int, int]  # (bh, bd)
    perm: Tensor  # hidden-block permutation: new block i is old block perm[i]
    costs: Tensor  # live blocks per hidden block (old order)
    load_before: List[int]
    load_after: List[int]

    @staticmethod
    def _imb(load):
        mean = sum(load) / len(load)
        return max(load) / mean if mean > 0 else 1.0

    @property
    def imbalance_before(self) -> float:
        """max / mean live blocks per rank with the contiguous split."""
        return self._imb(self.load_before)

    @property
    def imbalance_after(self) -> float:
        return self._imb(self.load_after)

    def summary(self) -> str:
        return (f"{self.world_size} ranks, block {self.block[0]}x{self.block[1]}: live blocks per rank "
                f"{self.load_before} (imbalance {self.imbalance_before:.3f}) -> {self.load_after} "
                f"(imbalance {self.imbalance_after:.3f})")


def hidden_block_costs(w1: Tensor, w3: Optional[Tensor], w2: Tensor, bh: int, bd: int) -> Tensor:
    """Blocks the fused kernel reads per hidden block j: gate+up row j, down column j.

    Uses the kernel's own pattern (hidden blocks whose output is provably zero or
    unused are dropped), so the cost is what a rank actually streams.
    """
    pat = pattern_from_weights(w1, w3, w2, bh, bd, activation="relu", has_b1=False, has_b3=False)
    n_proj = 2 if w3 is not None else 1
    return (n_proj * pat.mask_in.sum(1) + pat.mask_dn.sum(0)).to(torch.int64)


def lpt_equal_bins(costs: Sequence[int], bins: int) -> List[List[int]]:
    """Longest-processing-time greedy into ``bins`` bins of exactly len(costs)/bins items."""
    n = len(costs)
    cap = n // bins
    order = sorted(range(n), key=lambda j: (-int(costs[j]), j))
    loads, out = [0] * bins, [[] for _ in range(bins)]
    for j in order:
        b = min((b for b in range(bins) if len(out[b]) < cap), key=lambda b: (loads[b], b))
        out[b].append(j)
        loads[b] += int(costs[j])
    return [sorted(o) for o in out]


def _rank_loads(costs: Tensor, world_size: int) -> List[int]:
    return [int(c) for c in costs.reshape(world_size, -1).sum(1)]


def _permute_declared(w: Tensor, elem_perm: Tensor, dim: int, bh: int):
    d = _masks.declared_mask(w)
    if d is None:
        return
    m, (bo, bi) = d
    b = bo if dim == 0 else bi
    if bh % b:
        raise ValueError(f"declared mask block {(bo, bi)} does not tile hidden block {bh}: cannot permute it")
    blk_perm = elem_perm[::b] // b
    m = m.index_select(dim, blk_perm.to(m.device))
    _masks.declare_mask(w, m, (bo, bi))


MLPWeights = Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Tensor]  # w1, b1, w3, b3, w2


@torch.no_grad()
def balance_hidden_(mlp: Union[nn.Module, MLPWeights], world_size: int,
                    block: Optional[Tuple[int, int]] = None) -> BalanceReport:
    """Permute whole hidden blocks of an MLP in place so each TP rank gets ~equal live blocks.

    ``mlp`` is an MLP module (gate/up/down or fc1/fc2) or ``(w1, b1, w3, b3, w2)``
    (w3/b1/b3 may be None). Rows of w1/w3 (and b1/b3) and columns of w2 move
    together, so the function is unchanged. ``block`` is ``(bh, bd)``; by default
    the block shape detection picks. The hidden block count must split evenly
    across ``world_size`` (TP shards equal slices). Call it on every rank with the
    same weights (it is deterministic), before sharding.
    """
    if isinstance(mlp, nn.Module):
        proj = mlp_projections(mlp)
        if proj is None:
            raise ValueError(f"{type(mlp).__name__} is not an MLP of a TP_LAYOUTS family (gate/up/down, fc1/fc2, ...)")
        g, u, d = proj
        w1, b1, w3, b3, w2 = g.weight, g.bias, (u.weight if u is not None else None), (u.bias if u is not None else None), d.weight
    else:
        w1, b1, w3, b3, w2 = mlp
    if any(is_dtensor(t) for t in (w1, w3, w2)):
        raise ValueError("balance_hidden_ works on unsharded weights: call it before parallelizing")
    H = w1.shape[0]
    if block is None:
        ch = choose_block(w1, w3, w2)
        block = (ch.bh, ch.bd) if ch is not None else (min(128, H // world_size), 128)
    bh, bd = block
    if H % (bh * world_size):
        raise ValueError(f"hidden size {H} does not split into {world_size} ranks of whole {bh}-blocks")
    costs = hidden_block_costs(w1, w3, w2, bh, bd)
    bins = lpt_equal_bins(costs.tolist(), world_size)
    perm = torch.tensor([j for b in bins for j in b], dtype=torch.int64)
    before = _rank_loads(costs, world_size)
    after = _rank_loads(costs[perm], world_size)
    if after == before or max(after) >= max(before):
        perm = torch.arange(costs.numel())  # contiguous split is already as good: keep it
        after = before
    elem = (perm[:, None] * bh + torch.arange(bh)).flatten()
    if not torch.equal(perm, torch.arange(perm.numel())):
        for t in (w1, w3, b1, b3):
            if t is not None:
                t.copy_(t.index_select(0, elem.to(t.device)))
        w2.copy_(w2.index_select(1, elem.to(w2.device)))
        for t in (w1, w3):
            if t is not None:
                _permute_declared(t, elem, 0, bh)
        _permute_declared(w2, elem, 1, bh)
    rep = BalanceReport(world_size, (bh, bd), perm, costs, before, after)
    log.info("blast: balanced hidden blocks: %s", rep.summary())
    return rep


def shard_declared_mask(full: Tensor, sharded, placement, mesh) -> None:
    """Carry ``full``'s declared mask (the sparsifier's ``W * mask``) over to this rank's local shard.

    Declared masks are found by storage, and a DTensor's local shard is new storage: without this, TP
    training would compute dense dW (not the single-device gradient). ``placement`` is ``Shard(0)``
    (rows) or ``Shard(1)`` (columns); a shard that does not hold whole mask blocks raises ValueError."""
    d = _masks.declared_mask(full)
    if d is None or not isinstance(placement, Shard):
        return
    m, (bo, bi) = d
    loc = sharded._local_tensor
    dim, blk = placement.dim, (bo, bi)[placement.dim]
    n, ws = full.shape[dim], mesh.size()
    if n % ws or (n // ws) % blk:
        raise ValueError(f"declared mask blocks {(bo, bi)} do not tile a {ws}-way shard of dim {dim} ({n}): "
                         "TP gradients would not be the masked ones")
    per = n // ws // blk
    r = mesh.get_local_rank()
    _masks.declare_mask(loc, m.narrow(dim, r * per, per).clone(), (bo, bi))


# --------------------------------------------------------------------------- parallel styles
class BlastMLPParallel(ParallelStyle):
    """Tensor-parallel style for a whole MLP module (gate/up/down or fc1/fc2).

    Same sharding as ``ColwiseParallel`` on gate/up + ``RowwiseParallel`` on down
    (one all-reduce per MLP), applied at the MLP level so no layout change sits
    between the projections: gate/up weight+bias ``Shard(0)``, down weight
    ``Shard(1)``, down bias ``Replicate``; input made a ``Replicate`` DTensor
    (``input_layout`` describes a local input), output all-reduced to
    ``Replicate`` and, with ``use_local_output``, returned as a plain tensor.
    """

    def __init__(self, *, input_layout=None, use_local_output: bool = True):
        super().__init__()
        self.input_layout = input_layout or Replicate()
        self.use_local_output = use_local_output

    def _partition(self, name, module, mesh):
        proj = mlp_projections(module)
        if proj is None:
            return
        g, u, d = proj
        for m, (wp, bp) in ((g, (Shard(0), Shard(0))), (u, (Shard(0), Shard(0))), (d, (Shard(1), Replicate()))):
            if m is None:
                continue
            for pname, pl in (("weight", wp), ("bias", bp)):
                p = getattr(m, pname, None)
                if p is not None and not is_dtensor(p):
                    dt = distribute_tensor(p, mesh, [pl], src_data_rank=getattr(self, "src_data_rank", 0))
                    new = nn.Parameter(dt, requires_grad=p.requires_grad)
                    m.register_parameter(pname, new)
                    if pname == "weight":
                        shard_declared_mask(p, new, pl, mesh)

    def _input_fn(self, mod, inputs, mesh):
        x = inputs[0]
        if not is_dtensor(x):
            x = DTensor.from_local(x, mesh, (self.input_layout,), run_check=False)
        if tuple(x.placements) != (Replicate(),):
            x = x.redistribute(mesh, (Replicate(),))
        return (x, *inputs[1:])

    def _output_fn(self, mod, out, mesh):
        out = out.redistribute(mesh, (Replicate(),))  # the one all-reduce of this MLP
        return out.to_local() if self.use_local_output else out

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if mlp_projections(module) is None:
            raise ValueError(f"BlastMLPParallel: {type(module).__name__} is not an MLP of a TP_LAYOUTS family "
                             "(gate/up/down, fc1/fc2, ... linears as direct children)")
        if device_mesh.ndim != 1:
            raise ValueError("BlastMLPParallel needs a 1-D tensor-parallel mesh")
        return distribute_module(module, device_mesh, lambda n, m, mesh: self._partition(n, m, mesh),
                                 self._input_fn, self._output_fn)

    def __repr__(self):
        return f"BlastMLPParallel(input_layout={self.input_layout}, use_local_output={self.use_local_output})"


def tp_plan(model: nn.Module, style: str = "blast") -> Dict[str, ParallelStyle]:
    """A ``parallelize_module`` plan for every recognized MLP of ``model``.

    ``style="blast"``: one :class:`BlastMLPParallel` per MLP. ``style="torch"``: the
    stock styles, ``PrepareModuleInput`` on the MLP (so gate and up share one
    replicated input), ``ColwiseParallel(use_local_output=False)`` on gate/up/fc1,
    ``RowwiseParallel(input_layouts=Shard(-1))`` on down/fc2. Both do one all-reduce
    per MLP; the stock plan's graph has no-op ``redistribute`` calls after gate/up.
    """
    plan: Dict[str, ParallelStyle] = {}
    for name in mlp_module_names(model):
        if style == "blast":
            plan[name] = BlastMLPParallel()
            continue
        if style != "torch":
            raise ValueError(f"style must be 'blast' or 'torch', not {style!r}")
        pre = f"{name}." if name else ""
        lay, _ = _tp_match(model.get_submodule(name))
        p = lay.paths
        gn, un, dn = p.get("gate", p.get("fc1")), p.get("up"), p.get("down", p.get("fc2"))
        plan[name] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                        use_local_output=False)
        plan[pre + gn] = ColwiseParallel(use_local_output=False)
        if un:
            plan[pre + un] = ColwiseParallel(use_local_output=False)
        plan[pre + dn] = RowwiseParallel(input_layouts=Shard(-1))
    return plan


def parallelize_blast_mlp(model: nn.Module, tp_mesh, *, balance: bool = True, style: str = "blast",
                          block: Optional[Tuple[int, int]] = None) -> Dict[str, BalanceReport]:
    """Shard every MLP of ``model`` over the 1-D ``tp_mesh`` (in place); returns balance reports.

    With ``balance`` the hidden blocks of each MLP are first permuted
    (:func:`balance_hidden_`) so ranks hold ~equal live blocks. Then
    ``torch.compile(model, backend="blast")`` fuses each rank's local MLP.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    ws = tp_mesh.size()
    reports: Dict[str, BalanceReport] = {}
    if balance and ws > 1:
        for name in mlp_module_names(model):
            try:
                reports[name] = balance_hidden_(model.get_submodule(name), ws, block)
            except ValueError as e:
                log.warning("blast: %s not balanced: %s", name or type(model).__name__, e)
    plan = tp_plan(model, style)
    if "" in plan:  # the model itself is the MLP
        parallelize_module(model, tp_mesh, plan.pop(""))
    if plan:
        parallelize_module(model, tp_mesh, plan)
    return reports


# --------------------------------------------------------------------------- eager fused call
def op_args(w1, b1, w3, b3, w2, activation: str, block: Optional[Tuple[int, int]] = None) -> Tuple[int, int, str]:
    """``(block_h, block_d, pattern_key)`` for ``blast::sparse_mlp``, detected on this rank's local shards."""
    lw1, lw3, lw2 = local(w1), local(w3), local(w2)
    if block is None:
        ch = choose_block(lw1, lw3, lw2)
        block = (ch.bh, ch.bd) if ch is not None else (128, 128)
    bh, bd = block
    key = pattern_from_weights(lw1, lw3, lw2, bh, bd, activation=activation, has_b1=b1 is not None,
                               has_b3=b3 is not None).key
    return bh, bd, key


def sparse_mlp_call(x: Tensor, w1, b1, w3, b3, w2, b2, activation: str, *, block: Optional[Tuple[int, int]] = None,
                    max_density: float = 0.75) -> Tensor:
    """``torch.ops.blast.sparse_mlp`` with the pattern detected on this rank's local shards.

    Works for plain tensors and for DTensors (via the sharding rule above); the
    pass emits the same call. Detection runs on every call: for a loop use
    :func:`fuse_mlp_eager_`.
    """
    bh, bd, key = op_args(w1, b1, w3, b3, w2, activation, block)
    return torch.ops.blast.sparse_mlp(x, w1, b1, w3, b3, w2, b2, activation, bh, bd, key, max_density)


def fuse_mlp_eager_(mlp: nn.Module, activation: str, *, block: Optional[Tuple[int, int]] = None,
                    max_density: float = 0.75) -> nn.Module:
    """Make ``mlp.forward`` one ``blast::sparse_mlp`` call, without the compiler (eager decode, benchmarks).

    Works before or after :class:`BlastMLPParallel` (its hooks still make the input
    a DTensor and all-reduce the output). The pattern is detected once, here;
    the op re-derives it if the weights change later.
    """
    g, u, d = mlp_projections(mlp)
    w = (g.weight, g.bias, u.weight if u is not None else None, u.bias if u is not None else None, d.weight)
    bh, bdim, key = op_args(*w, activation, block)

    def forward(x):
        return torch.ops.blast.sparse_mlp(x, g.weight, g.bias, u.weight if u is not None else None,
                                          u.bias if u is not None else None, d.weight, d.bias,
                                          activation, bh, bdim, key, max_density)

    mlp.forward = forward
    return mlp


__all__ = [
    "BalanceReport", "BlastMLPParallel", "balance_hidden_", "shard_declared_mask", "mlp_module_names", "hidden_block_costs", "is_dtensor",
    "fuse_mlp_eager_", "local", "lpt_equal_bins", "op_args", "mlp_projections", "parallelize_blast_mlp", "sparse_mlp_call", "tp_plan",
]
