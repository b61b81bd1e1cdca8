"""Detection: read an MLP's real weights and decide fused or dense.

The weights' values are visible only here, in the backend, because with
``inline_inbuilt_nn_modules`` a parameter's example input *is* the Parameter.
``formats.choose_block`` finds the block shape that captures the zeros; an MLP
is fused when at least ``opts.min_sparsity`` of its blocks are dead.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..config import BlastOptions, Candidate
from ..formats import MLPPattern, choose_block, pattern_from_weights
from .match import Context, MLPMatch, module_path
from .normalize import example_value


def local(t):
    """This rank's shard of a DTensor (tensor-parallel weights); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def weights(m: MLPMatch, ctx: Context):
    """(w1, b1, w3, b3, w2, b2) as ``[out, in]`` tensors (GPT-2 Conv1D weights transposed: a view)."""
    out = []
    for lin in (m.gate, m.up, m.down):
        if lin is None:
            out += [None, None]
            continue
        w = ctx.value(lin.weight)
        out += [w.t() if lin.transposed else w, ctx.value(lin.bias)]
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
        w1, _, _, _, w2, _ = weights(m, ctx)
        c.hidden, c.d_in = (int(s) for s in w1.shape)
        c.d_out = int(w2.shape[0])
    except Exception:  # shapes unknown or odd: the shape check says why
        pass
    return c


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
    c.pattern_key = pat.key
    c.decision = "fused"
    c.reason = f"{choice.sparsity:.0%} of blocks dead ({pat.summary()})"
    return None, pat
