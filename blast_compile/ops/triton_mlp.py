"""CUDA implementation of ``blast::sparse_mlp``: launchers for the generated Triton kernels.

One file per kernel family -- ``prefill.py`` (``forward``, ``forward_packed``), ``decode.py``, ``backward.py`` --
over ``tables.py`` (device index tables, offsets, the generated module) and ``configs.py`` (tuning spaces and
switches); the tuner is ``tune.py``. This module is their front door.

Forward paths (same meaning, eager rounding, fp32 accumulation):

* decode (M <= ``codegen.DECODE_MAX_M``), two variants; the faster one per (signature, shape,
  live-block count, M bucket) is picked once by CUDA-graph timing with a flushed L2 and persisted:

  - sliced (``_decode_sliced``): the prefill kernels with one 16/32-row M tile, every weight
    block's rows split over several programs (16-row slices), CH live blocks per unrolled
    step, and programmatic dependent launch (``bsmm`` is scheduled while ``mlp_hidden``
    drains: its launch and index loads overlap the tail, it waits before reading H). No atomics, no scratch, no
    state between calls: deterministic. Wins where the fixed per-call cost dominates
    (small patterns, M = 16);
  - split-K (``_decode_splitk``): ``mlp_decode_in`` (one program per chunk of <= CH live
    in-blocks of a hidden block-row, fp32 atomics into a G/U scratch; extra programs write
    the output blocks no down block touches) and ``mlp_decode_dn`` (one program per chunk of
    live down blocks of a hidden column: h_j from G_j/U_j in registers, atomics into an fp32
    output scratch). Completion counters (``sem="acq_rel"``) let the last chunk of each hidden
    column re-zero G_j/U_j and the last contributor to each output block cast it (+ b2, NaN
    rows) and re-zero it. Scratch and counters live in ``plan.cache``, so two streams must not run the same
    plan's split-K decode at once. Not bitwise repeatable (atomics add in any
    order; ``torch.use_deterministic_algorithms(True)`` keeps decode on the sliced path). Wins
    on large patterns at M = 1. At M = 1 (``GEMV_MAX_M``) both kernels are
    multiply-reduce GEMVs (``BM = 1``) instead of 16-row tensor-core tiles, and kernel 1
    reads per-chunk column/offset tables (``_flat_in``) so its weight loads wait on one
    index load, not two.

  Kernel 2 can be a programmatic dependent launch that L2-prefetches its own W2 rows before it
  waits for kernel 1 (the weights do not depend on it): always on the
  sliced path; tuned per shape and M on split-K, where it sometimes costs (its waiting programs
  hold SM slots kernel 1 could use).

  A third variant, sliced with prefetch (``sliced_pf``): ``mlp_hidden`` first sends W2's live blocks into L2,
  spread over all its programs, so they stream in the same pass as W1/W3 and ``bsmm`` reads L2. It stands in
  for the PDL prefetch where there is none: a lowered op's kernels are launched by Inductor, which has no PDL
  for user kernels. A lowered op's split-K prefetches the same way in ``mlp_decode_in``, and gets its plan's
  scratch by address (two 31-bit ints: no buffer for Inductor to clone, no fill per call); it weighs the three paths
  as the opaque op does. (An exported graph would carry the address out of the process: there split-K only
  when asked for, with a zeroed scratch per call.)

  ``DECODE_PATH = "sliced" | "splitk" | "sliced_pf"`` forces one. A one-launch decode
  (both sliced phases in a persistent grid with a grid barrier) was built and measured 2.2-3x slower than both
  (BENCHMARKS.md), and removed;
* prefill: ``mlp_hidden`` (gate and up in one program, act and product in the
  epilogue) writes H, then ``bsmm`` computes ``Y = H W2^T`` CSR by output
  block-row; both grids visit long rows first. On Hopper+ with 16-bit tensors whose rows
  are 16-byte aligned, every prefill and backward kernel also has a TMA variant (tiles
  through host-side tensor descriptors: no per-element address math or masks, ragged
  edges zero-filled by the descriptor bounds) that the tuner weighs against the pointer
  variants (``PREFILL_TMA``, ``BACKWARD_TMA``; ``TMA = False``: off).

Per plan (``plan.cache``) we keep the device index tables: the CSR/CSC lists,
long-rows-first orders, and per-weight block offset tables (element offset of
each live block; in-block strides are passed per call). Dense weights (any
strides) and packed ``[nnz, bo, bi]`` weights differ only in these offsets. All
tables are built on the first call; later calls do no host syncs, so CUDA graphs
can capture them.

Rows of x with a NaN/Inf come out all-NaN (what eager's dense product gives): the
kernel that reads x flags them (``HANDLES_NONFINITE``), the output epilogue writes NaN.

Backward: ``mlp_hidden_bwd`` recomputes the pre-activations (or reads them where the training
forward kept them: ``forward(keep=2)``) and gets dH through W2's transposed live blocks in one
kernel, dX goes through W1/W3's (``bsmm`` with swapped strides), and dW densely (torch matmul)
or, for declared masks, on the live blocks only (``sddmm``).
"""

from __future__ import annotations

from .backward import backward
from .prefill import forward, forward_packed
from .tables import saved_count

# forward() itself turns rows of x holding NaN/Inf into NaN rows (sparse_mlp skips its own fix-up)
HANDLES_NONFINITE = True

__all__ = ["forward", "forward_packed", "backward", "saved_count", "HANDLES_NONFINITE"]
