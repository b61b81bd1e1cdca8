"""Detection: read an MLP's real weights and decide fused or dense.

The weights' values are visible only here, in the backend, because with
``inline_inbuilt_nn_modules`` a parameter's example input *is* the Parameter.
``formats.choose_block`` finds the block shape that captures the zeros; an MLP
is fused when at least ``opts.min_sparsity`` of its blocks are dead and at most
``opts.max_runtime_density`` of the blocks its kernels read are live: above that the fused op runs
dense (with the default options only a lowered ``min_sparsity`` gets there).
A compressed MLP (packed ``block_linear`` layers) needs no detection: its
index tensors *are* the pattern (:func:`decide_packed`).
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..config import BlastOptions, Candidate
from ..formats import MLPPattern, cdiv, choose_block, pattern_from_weights
from ..ops.packed_mlp import pattern_key as packed_pattern_key
from .match import Context, MLPMatch, is_dtensor, module_path, weight_of
from .normalize import example_value


def local(t):
    """This rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if is_dtensor(t) else t


def weights(m: MLPMatch, ctx: Context):
    """(w1, b1, w3, b3, w2, b2) as ``[out, in]`` tensors (GPT-2 Conv1D weights transposed, the halves
    of a fused gate|up weight: views)."""
    out = []
    for lin in (m.gate, m.up, m.down):
        out += [None, None] if lin is None else weight_of(lin, ctx)
    return tuple(local(t) for t in out)


def describe(m: MLPMatch, ctx: Context) -> Candidate:
    """A dense Candidate with everything known before detection."""
    c = Candidate(module=module_path(m), kind=m.kind, activation=m.act.name or "unknown",
                  bias=any(lin.bias is not None for lin in m.linears),
                  nodes=tuple(n.name for n in m.nodes))
    xv = example_value(m.gate.x)
    if hasattr(xv, "dtype"):
        c.dtype, c.device = str(xv.dtype).replace("torch.", ""), str(xv.device)
    try:
        if m.packed:
            c.hidden, c.d_in, c.d_out = m.gate.out_features, int(xv.shape[-1]), m.down.out_features
        else:
            w1, _, _, _, w2, _ = weights(m, ctx)
            c.hidden, c.d_in = (int(s) for s in w1.shape)
            c.d_out = int(w2.shape[0])
    except Exception:  # shapes unknown or odd: the shape check says why
        pass
    return c


def decide_packed(m: MLPMatch, ctx: Context, c: Candidate) -> Tuple[Optional[str], Optional[str]]:
    """A compressed MLP (checks passed): always fused. Fills ``c``; returns (None, pattern key).

    There is no dense weight to fall back to and no sparsity threshold: the layers
    run block-sparse eagerly too, so one fused node can only save launches and the
    hidden activations' round trip through memory.
    """
    bh, bd = (int(s) for s in ctx.value(m.gate.weight).shape[1:])
    index = []
    live = total = 0
    for lin, n_cols in ((m.gate, cdiv(c.d_in, bd)), (m.up, cdiv(c.d_in, bd)), (m.down, cdiv(c.hidden, bh))):
        if lin is None:
            index += [None, None]
            continue
        row_ptr, col_idx = (local(ctx.value(n)) for n in lin.index)
        index += [row_ptr, col_idx]
        live += col_idx.numel()
        total += (row_ptr.numel() - 1) * n_cols
    key = packed_pattern_key(bh, bd, c.d_in, c.hidden, c.d_out, index)
    c.block, c.sparsity = (bh, bd), 1.0 - live / max(total, 1)
    c.pattern_key, c.decision, c.kernel = key, "fused", "packed"
    c.reason = f"compressed (packed) weights, {c.sparsity:.0%} of blocks dead ({live}/{total} stored)"
    return None, key


def decide(m: MLPMatch, ctx: Context, opts: BlastOptions, c: Candidate) -> Tuple[Optional[str], Optional[MLPPattern]]:
    """Fill ``c`` (block, sparsity, pattern, decision); returns (dense tag or None, pattern if fused)."""
    w1, b1, w3, b3, w2, b2 = weights(m, ctx)
    choice = choose_block(w1, w3, w2, blocks=opts.block_sizes)
    if choice is None:
        c.reason = "no zero weights"
        return "no_zeros", None
    c.block, c.sparsity = (choice.bh, choice.bd), choice.sparsity
    if choice.sparsity < opts.min_sparsity:
        c.reason = f"{choice.sparsity:.0%} of blocks dead < min_sparsity {opts.min_sparsity:.0%}"
        return "low_sparsity", None
    pat = pattern_from_weights(w1, w3, w2, choice.bh, choice.bd, activation=m.act.name or "unknown",
                               has_b1=b1 is not None, has_b3=b3 is not None)
    if pat.density > opts.max_runtime_density:
        # the op would compute it densely from its first call (ops/sparse_mlp.py): leave that to Inductor
        c.reason = (f"{pat.density:.0%} of blocks live > max_runtime_density {opts.max_runtime_density:.0%} "
                    "(the fused op would run it dense)")
        return "too_dense", None
    c.pattern_key = pat.key
    c.decision = "fused"
    c.reason = f"{choice.sparsity:.0%} of blocks dead ({pat.summary()})"
    return None, pat
