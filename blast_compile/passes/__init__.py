"""FX passes on the Dynamo graph: find MLPs, detect block sparsity, fuse.

Read in pipeline order:

1. :mod:`.normalize` - which nodes are a linear, a row view, an activation
   (tables of spellings; activations identified by the structure of their op graph);
2. :mod:`.match` - ``linear -> act -> linear`` and ``down(act(gate(x)) * up(x))``
   anchored at every linear, then :data:`.match.CHECKS` (reasons to stay dense);
3. :mod:`.decide` - the real weights -> block shape, sparsity, fused or dense;
4. :mod:`.rewrite` - one ``blast::sparse_mlp`` node per fused MLP.

Compressed MLPs (``compress_``: every projection a ``blast::block_linear`` on
packed live blocks) go through the same matcher: ``normalize`` reads
``block_linear`` as a linear whose weight is the (blocks, row_ptr, col_idx)
triple, the checks add one block shape per MLP, and the MLP becomes one
``blast::packed_mlp`` node (no detection: the index tensors are the pattern).

``run_passes`` returns one :class:`~blast_compile.config.Candidate` per MLP it
looked at and counts in ``torch._dynamo.utils.counters["blast"]``:
``mlp_candidates``, ``mlp_fused`` (``mlp_fused_packed`` of them compressed), ``mlp_dense``
and ``dense_<tag>`` per refusal (tags: autocast, activation, shared_intermediate, inplace_write,
packed_mixed, weight_not_param, input, shape, block_shape, dtype, device, no_values,
requires_grad, no_zeros, low_sparsity, too_dense). A graph without a fused MLP
is left exactly as it was.
"""
from __future__ import annotations

import logging
from typing import List

import torch
from torch._dynamo.utils import counters

from ..config import BlastOptions, Candidate
from ..ops.plans import register_weights
from .decide import decide, decide_packed, describe
from .match import Context, find_mlps, refusal
from .rewrite import fuse_mlp, fuse_packed_mlp

log = logging.getLogger("blast_compile.passes")


def run_passes(gm: torch.fx.GraphModule, example_inputs, opts: BlastOptions) -> List[Candidate]:
    """Fuse the block-sparse MLPs of ``gm`` in place; one Candidate per MLP found."""
    ctx = Context(gm, example_inputs)
    candidates, fused, replaced = [], 0, {}
    for m in find_mlps(gm):
        c = describe(m, ctx)
        # the decision belongs to these weights: the backend guards on their identity (backend._guard_weights)
        c._sources = [ctx.source(lin.weight) for lin in m.linears]
        counters["blast"]["mlp_candidates"] += 1
        refused = refusal(m, ctx)
        if refused is not None:
            tag, c.reason = refused
            pattern = None
        elif m.packed:
            tag, pattern = decide_packed(m, ctx, c)
        else:
            tag, pattern = decide(m, ctx, opts, c)
        if pattern is not None:
            if m.packed:
                fuse_packed_mlp(gm, m, pattern, replaced)
                counters["blast"]["mlp_fused_packed"] += 1
            else:
                node = fuse_mlp(gm, m, pattern, opts, replaced)
                save = node.kwargs.get("save", 0)
                if save:  # (training on CUDA: what the forward keeps for the backward, save_hidden)
                    c.reason += "; forward keeps " + ("H, pre-activations" if save == 2 else "H") + " for backward"
                # the op may get per-call aliases of these (views in the graph): see plans.owner
                register_weights(*(ctx.value(lin.weight) for lin in m.linears))
            fused += 1
            counters["blast"]["mlp_fused"] += 1
            log.info("blast: fused %s MLP %s (%s): %s", c.kind, c.module, c.activation, c.reason)
        else:
            counters["blast"]["mlp_dense"] += 1
            counters["blast"][f"dense_{tag}"] += 1
            log.info("blast: kept %s MLP %s dense: %s", c.kind, c.module, c.reason)
        candidates.append(c)
    if fused:
        gm.graph.lint()
        gm.recompile()
    return candidates


__all__ = ["run_passes"]
