"""``blast::sparse_mlp``: the one node a block-sparse MLP becomes.

Meaning: ``down(act(gate(x)) [* up(x)])`` with the dense weights as given, i.e.
exactly what eager computes. The op receives the *dense* weight tensors and
reads only their live blocks, so a weight updated in place is read fresh. What
can go stale is the pattern (which blocks are live); it is re-derived whenever a
weight may have changed (an O(1) check per call, :class:`.watch.Snapshot`: version
counters, storages, fused-optimizer steps), so the op is never wrong:

* the compile-time pattern is identified by ``pattern_key`` (a hash of block
  shape and masks). It is an op argument, so Inductor/AOTAutograd caches can
  never reuse a graph for a different pattern, and a fresh process rebuilds the
  same kernels from the weights + key;
* a weight change that keeps the pattern reuses everything; one that changes it
  re-indexes (and re-specializes kernels); one that makes the MLP too dense
  runs the dense computation.

Inputs with NaN/Inf: eager's dense product spreads them across the whole row
(``0 * inf = nan``); on CPU such rows are recomputed densely, on CUDA rows with
a non-finite input are poisoned with NaN (what eager gives for those rows).
Weights or biases with NaN/Inf (seen when the plan is built) run dense: the pattern
skips hidden units whose output is provably zero or unused, and eager multiplies a
NaN there by zero (NaN).

Autocast: the rewrite passes the ambient autocast dtype (``compute_dtype``); the op then computes
like the autocast linears it replaces -- inputs in that dtype, output in it, gradients returned in
each input's own dtype. The plan stays keyed on the parameters themselves (fp32 masters): the CUDA
path packs x.dtype copies of the live blocks per call (one small launch per weight); the CPU path
casts copies. (The rewrite casts an fp32 x in the graph, where Inductor fuses it.)

Autograd: ``blast::sparse_mlp_backward`` recomputes the pre-activations (``x`` is saved),
computes dX through the transposed live blocks, and dW either dense (the weight holds zeros but
means a dense matrix) or on live blocks only, when the sparsifier declared a mask (see
:mod:`..masks`). Training on CUDA the rewrite emits ``blast::sparse_mlp_train`` instead: the same
forward, also returning what the backward would otherwise recompute (``BlastOptions.save_hidden``):
``save=1`` the hidden activations H its kernels write anyway (one ``rows x hidden`` tensor per MLP;
dW2 reads it instead of the backward kernel writing it again); ``save=2`` (the op's default; the rewrite picks per MLP) also the pre-activations
a [and u], so the backward's first kernel does not recompute the two in-projections (three tensors
for a gated MLP; dense autograd keeps more).
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch
from torch import Tensor
from .._counters import counters

from .. import masks as _masks
from ..formats import block_mask, build_pattern, expand_mask, _mlp_masks
from . import gather
from .plans import PlanCache, as_output, ident, outside_graph_pool, owner, refs, warm_kernels, warn_once
from .watch import Snapshot, watch
from .activations import dense_mlp, in_dtype

log = logging.getLogger("blast_compile.ops")

_PLANS = PlanCache()  # (pattern key, weight identities) -> _Plan


class _Plan:
    __slots__ = ("snap", "mask_snap", "mask_blocks", "masked", "finite", "pattern", "packed", "dense", "dev_pattern",
                 "dw_masks", "dw_fix", "cache", "raw_masks", "refs")

    def __init__(self):
        self.cache = {}


def _declared_block_mask(w, bo, bi):
    """``(block mask, fix)``: ``w``'s declared mask re-expressed at the MLP's block shape (bool
    ``[O/bo, I/bi]``; None if no mask is declared), and where that is not exact -- a fused block
    holding declared-dead parts (declared at 32x32, fused at 64x64) -- the declared element mask, by
    which dW is masked (dW of ``W * mask`` is zero on dead entries), else None."""
    d = _masks.declared_mask(w)
    if d is None:
        return None, None
    m, (mo, mi) = d
    m = m.to(w.device, torch.bool)
    if (mo, mi) == (bo, bi):
        return m, None
    elem = expand_mask(m, mo, mi, w.shape)
    bm = block_mask(elem, bo, bi)
    return bm, (None if torch.equal(expand_mask(bm, bo, bi, w.shape), elem) else elem)


def live_masks(w1, w3, w2, block_h, block_d):
    """``(m_in, m_dn, declared, dw_fix, masked)``: the MLP's live blocks (block masks of the in-projection and the
    down projection), each weight's declared mask at the MLP's blocks and its fix (``_declared_block_mask``), and
    whether the layer is ``W * mask`` (every weight declared, each mask exact at the blocks): then the masks are
    the pattern, whatever the weights hold outside them; else every block holding a non-zero, plus every
    declared-live block."""
    fixes = [_declared_block_mask(w, *((block_d, block_h) if i == 2 else (block_h, block_d))) if w is not None
             else (None, None) for i, w in enumerate((w1, w3, w2))]
    decl, dw_fix = [f[0] for f in fixes], [f[1] for f in fixes]
    masked = all(d is not None for d, w in zip(decl, (w1, w3, w2)) if w is not None) and all(f is None for f in dw_fix)
    if masked:
        return (decl[0] if w3 is None else decl[0] | decl[1]), decl[2], decl, dw_fix, True
    m_in, m_dn = _mlp_masks(w1, w3, w2, block_h, block_d)
    for i, dm in enumerate(decl):
        if dm is not None:
            if i < 2:
                m_in = m_in | dm
            else:
                m_dn = m_dn | dm
    return m_in, m_dn, decl, dw_fix, False


def _all_finite(ts) -> bool:
    """No NaN/Inf in any of ``ts`` (one host sync). A non-finite weight in a hidden unit the pattern skips
    would vanish from the fused result, while eager spreads it (``0 * nan``): such plans run dense."""
    flags = [torch.isfinite(t).all() for t in ts if t is not None and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def weights_plan(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density) -> _Plan:
    """The live-block plan for these weights, re-derived only when they may have changed
    (:class:`~.watch.Snapshot`: version counters, storages, fused-optimizer steps)."""
    sk = (pattern_key, ident(w1), ident(w3), ident(w2), b1 is not None, b3 is not None)
    ws = (w1, w3, w2)
    # an alias (Inductor's per-call view of a parameter) answers for neither versions nor lifetime
    own = [owner(t, search=True) for t in ws]
    seen = (*own, owner(b1), owner(b3), owner(b2))
    decl = [_masks.declared_mask(t) for t in ws]
    mask_ts = [d[0] if d is not None else None for d in decl]
    mask_blocks = tuple(d[1] if d is not None else None for d in decl)
    plan = _PLANS.get(sk)
    if plan is not None and plan.mask_blocks == mask_blocks and not plan.mask_snap.changed(mask_ts):
        if not plan.snap.changed(seen):
            return plan
        if plan.masked and plan.finite:
            # Every weight means W * (its declared mask) and no mask moved: new values (an optimizer
            # step) need no look at the weights, no host sync -- nor a check for NaN (README).
            plan.snap.update(seen)
            plan.packed = None
            counters["blast"]["masked_weight_update"] += 1
            return plan
    old = plan

    def build():
        plan = old
        m_in, m_dn, decl_b, dw_fix, masked = live_masks(w1, w3, w2, block_h, block_d)
        finite = _all_finite((w1, w3, w2, b1, b3, b2))
        if plan is not None and plan.finite == finite and _same_masks(plan, m_in, m_dn, decl_b, dw_fix):
            # values moved (an optimizer step, a copy_; a mask re-declared as it was) but no block changed
            # liveness: keep the indices, refresh the packed (CPU) copy of the blocks.
            plan.snap.update(seen)
            plan.mask_snap.update(mask_ts)
            plan.mask_blocks = mask_blocks
            plan.packed = None
            counters["blast"]["pattern_revalidated"] += 1
            return plan
        plan = _Plan()
        # (layout=False for the weights: the cache key holds their offsets, shapes and strides, owners
        # answer for versions, storages and fused steps; the biases are not in the key)
        plan.snap = Snapshot(seen, layout=(False, False, False, True, True, True))
        plan.mask_snap = Snapshot(mask_ts)
        plan.mask_blocks = mask_blocks
        plan.masked, plan.finite = masked, finite
        plan.raw_masks = (m_in, m_dn)
        plan.refs = refs(*own)
        for t in (*own, *mask_ts):  # count fused-optimizer steps on them from now on
            watch(t)
        counters["blast"]["plans_built"] += 1
        pat = build_pattern(m_in, m_dn, block_h, block_d, activation=activation, gated=w3 is not None,
                            has_b1=b1 is not None, has_b3=b3 is not None)
        plan.pattern = pat
        plan.dw_masks = decl_b
        plan.dw_fix = dw_fix
        plan.dense = pat.density > max_density or not finite
        plan.packed = None
        plan.dev_pattern = pat.to(w1.device) if w1.device.type != "cpu" else pat
        if pat.key != pattern_key:
            counters["blast"]["pattern_changed"] += 1
            log.info("blast: pattern %s changed to %s (%s)%s", pattern_key, pat.key, pat.summary(),
                     "; running dense" if plan.dense else "; re-indexed")
        if not finite:
            counters["blast"]["dense_nonfinite_weights"] += 1
            warn_once(("nonfinite", pattern_key), f"blast: weights of MLP {pattern_key} hold NaN/Inf; computing it "
                      "densely (as eager does: a skipped hidden unit would drop them)")
        elif plan.dense:
            warn_once(("dense", pattern_key), f"blast: weights of MLP {pattern_key} are now {pat.density:.0%} dense; computing it densely")
        return plan

    plan = outside_graph_pool(build, w1.device)
    if plan is old:  # same live blocks: the plan was refreshed in place
        return plan
    _PLANS.put(sk, plan)
    return plan


def _same_masks(plan, m_in, m_dn, decl, fix) -> bool:
    """True when the live blocks (and declared masks) are what the plan was built from."""
    old_in, old_dn = plan.raw_masks
    if not (torch.equal(old_in, m_in) and torch.equal(old_dn, m_dn)):
        return False
    for a, b in zip(plan.dw_masks + plan.dw_fix, decl + fix):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            return False
    return True


def _packed(plan, w1, w3, w2, params=None):
    """The CPU path's packed live blocks, kept with the plan. ``params``: the op's own weights when
    ``w1, w3, w2`` may be cast copies of them (autocast): copies are packed per call, not kept."""
    if params is not None and any(a is not b for a, b in zip(params, (w1, w3, w2))):
        return gather.PackedMLP(plan.dev_pattern, w1, w3, w2)
    if plan.packed is None:
        plan.packed = gather.PackedMLP(plan.dev_pattern, w1, w3, w2)
    return plan.packed


def _nonfinite_rows(x2d):
    return ~torch.isfinite(x2d).all(dim=1)


def _cuda_forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, keep=0):
    from . import triton_mlp

    warm_kernels(plan, x2d, lambda d: triton_mlp.forward(d, w1, b1, w3, b3, w2, b2, plan, activation))
    return triton_mlp.forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, keep)


def _forward(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density, compute_dtype,
             keep=0):
    """(y, S): S ``[n, rows, d_hidden]`` as the CUDA kernels kept it (``triton_mlp.forward(keep=...)``)
    when ``keep`` and they ran, else None."""
    d_out = w2.shape[0]
    # the plan (pattern, declared masks, version checks) belongs to the parameters themselves
    plan = weights_plan(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density)
    orig_w = (w1, w3, w2)
    x, b1, b3, b2 = in_dtype(compute_dtype, x, b1, b3, b2)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    h = None
    if plan.dense or x2d.shape[0] == 0:
        return dense_mlp(x, *in_dtype(compute_dtype, w1, b1, w3, b3, w2, b2), activation), h
    if x.device.type == "cuda":
        # weights as stored: fp32 masters are cast per call as packed copies of their live blocks
        y = _cuda_forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, keep)  # kernels poison non-finite rows
        if keep:
            y, h = y
    else:
        w1, w3, w2 = in_dtype(compute_dtype, w1, w3, w2)
        y = gather.forward(x2d, plan.dev_pattern, _packed(plan, w1, w3, w2, orig_w), b1, b3, b2, activation, d_out)
        bad = _nonfinite_rows(x2d)
        if bool(bad.any()):  # (over every row, as eager: PyTorch's CPU GELU of inf is inf for one element, NaN in
            # a longer tensor, so the bad rows alone could differ from eager's answer)
            y[bad] = dense_mlp(x2d, w1, b1, w3, b3, w2, b2, activation)[bad]
    return as_output(y.contiguous(), (*lead, d_out)), h


@torch.library.custom_op("blast::sparse_mlp", mutates_args=())
def sparse_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w3: Optional[Tensor],
    b3: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    activation: str,
    block_h: int,
    block_d: int,
    pattern_key: str,
    max_density: float,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``compute_dtype``: the ambient autocast dtype at compile time (the linears would run in it)."""
    return _forward(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density,
                    compute_dtype)[0]


@sparse_mlp.register_fake
def _(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density, compute_dtype=None):
    return x.new_empty((*x.shape[:-1], w2.shape[0]), dtype=compute_dtype or x.dtype)


def _saved_shape(x, w1, w3, save):
    """Shape of ``sparse_mlp_train``'s second output (its fake and real outputs must agree):
    ``[n, *rows, d_hidden]``, n = ``triton_mlp.saved_count``; n = 0 off CUDA."""
    n = 0
    if x.is_cuda:
        from .triton_mlp import saved_count

        n = saved_count(save, w3 is not None)
    return (n, *x.shape[:-1], w1.shape[0])


def _train(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density, compute_dtype=None,
           save=2):
    """``sparse_mlp`` for training: also returns what the CUDA backward would recompute, kept until
    the backward: H (``save=1``), then a [and u] (``save=2``), stacked ``[n, *rows, d_hidden]``. It
    holds garbage where nothing reads it (dead hidden blocks; all of it where the kernels did not
    run: dense fallback, no rows). Off CUDA it is empty (n = 0) and the backward recomputes."""
    y, s = _forward(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density,
                    compute_dtype, keep=save)
    shape = _saved_shape(x, w1, w3, save)
    return y, (x.new_empty(shape, dtype=y.dtype) if s is None else s.view(shape))


# sparse_mlp's arguments and ``save``, two outputs
sparse_mlp_train = torch.library.custom_op(
    "blast::sparse_mlp_train", _train, mutates_args=(),
    schema=str(torch.ops.blast.sparse_mlp.default._schema).split("sparse_mlp", 1)[1].replace(
        ") -> Tensor", ", int save=2) -> (Tensor, Tensor)"))


@sparse_mlp_train.register_fake
def _(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density, compute_dtype=None, save=2):
    dt = compute_dtype or x.dtype
    return (x.new_empty((*x.shape[:-1], w2.shape[0]), dtype=dt),
            x.new_empty(_saved_shape(x, w1, w3, save), dtype=dt))


@torch.library.custom_op("blast::sparse_mlp_backward", mutates_args=())
def sparse_mlp_backward(
    dy: Tensor,
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w3: Optional[Tensor],
    b3: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    activation: str,
    block_h: int,
    block_d: int,
    pattern_key: str,
    max_density: float,
    needs: List[bool],
    compute_dtype: Optional[torch.dtype] = None,
    saved: Optional[Tensor] = None,
) -> List[Tensor]:
    """Gradients ``[dx, dw1, db1, dw3, db3, dw2, db2]``; an unneeded one is an empty tensor.
    Under autocast (``compute_dtype``) they are computed in it and returned in each input's dtype.
    ``saved``: ``sparse_mlp_train``'s second output (the CUDA kernels read it instead of recomputing)."""
    plan = weights_plan(x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density)
    orig = (x, w1, b1, w3, b3, w2, b2)
    orig_w = (w1, w3, w2)
    x, b1, b3, b2, dy = in_dtype(compute_dtype, x, b1, b3, b2, dy)
    if not (x.is_cuda and not plan.dense and x.numel() > 0):  # CUDA: triton_mlp packs x.dtype live blocks
        w1, w3, w2 = in_dtype(compute_dtype, w1, w3, w2)
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, dy.shape[-1])
    # (the non-finite check syncs, so only on CPU: CUDA backward must stay graph-capturable)
    if plan.dense or x2d.shape[0] == 0 or (x.device.type == "cpu" and not bool(torch.isfinite(x2d).all())):
        g = gather.dense_backward(dy2d, x2d, w1, b1, w3, b3, w2, b2, activation, needs, plan.dw_masks, block_h, block_d)
    else:
        if x.device.type == "cuda":
            from . import triton_mlp

            s2d = saved.reshape(saved.shape[0], -1, saved.shape[-1]) if saved is not None and saved.numel() else None
            g = triton_mlp.backward(dy2d, x2d, w1, b1, w3, b3, w2, b2, plan, activation, needs, s2d)
        else:
            g = gather.backward(dy2d, x2d, plan.dev_pattern, _packed(plan, w1, w3, w2, orig_w), w1, b1, w3, b3, w2,
                                b2, activation, needs, plan.dw_masks)
    for k, fix in zip(("w1", "w3", "w2"), plan.dw_fix):
        if fix is not None and g.get(k) is not None:  # a fused block holds declared-dead parts: dW is zero there
            g[k] = torch.where(fix, g[k], 0)
    grads = [g.get(k) for k in ("x", "w1", "b1", "w3", "b3", "w2", "b2")]
    out = []
    for i, g in enumerate(grads):
        if g is None:
            out.append(x.new_empty(0))
        else:
            # contiguous, as the fake says (dX of a d_in padded to whole blocks is a slice otherwise, and
            # Inductor asserts the strides)
            out.append((g.reshape(x.shape) if i == 0 else g).to(orig[i].dtype).contiguous())
    return out


@sparse_mlp_backward.register_fake
def _(dy, x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density, needs, compute_dtype=None,
      saved=None):
    shapes = [x, w1, b1, w3, b3, w2, b2]
    return [t.new_empty(t.shape) if (t is not None and needs[i]) else x.new_empty(0) for i, t in enumerate(shapes)]


def _setup_context(ctx, inputs, output):
    x, w1, b1, w3, b3, w2, b2, activation, block_h, block_d, pattern_key, max_density, *rest = inputs
    saved = output[1] if isinstance(output, tuple) else None  # sparse_mlp_train: what the forward kept
    ctx.save_for_backward(x, w1, b1, w3, b3, w2, b2, saved)
    ctx.args = (activation, block_h, block_d, pattern_key, max_density)
    ctx.compute_dtype = rest[0] if rest else None
    ctx.n_inputs = len(inputs)


def _backward(ctx, dy, ds=None):  # (ds: nothing but this backward uses the saved tensors)
    x, w1, b1, w3, b3, w2, b2, saved = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    grads = torch.ops.blast.sparse_mlp_backward(dy, x, w1, b1, w3, b3, w2, b2, *ctx.args, needs, ctx.compute_dtype,
                                                saved)
    res = [g if (needs[i] and (i == 0 or (x, w1, b1, w3, b3, w2, b2)[i] is not None)) else None for i, g in enumerate(grads)]
    return (*res, *[None] * (ctx.n_inputs - 7))


sparse_mlp.register_autograd(_backward, setup_context=_setup_context)
sparse_mlp_train.register_autograd(_backward, setup_context=_setup_context)
