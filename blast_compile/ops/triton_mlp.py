"""CUDA implementation of ``blast::sparse_mlp``: launchers for the generated Triton kernels.

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
    rows) and re-zero it. Scratch and counters live in ``plan.cache``, so two streams must not
    run the same plan's split-K decode at once. Not bitwise repeatable (atomics add in any
    order; ``torch.use_deterministic_algorithms(True)`` keeps decode on the sliced path). Wins
    on large patterns at M = 1. At M = 1 (``GEMV_MAX_M``) both kernels are
    multiply-reduce GEMVs (``BM = 1``) instead of 16-row tensor-core tiles, and kernel 1
    reads per-chunk column/offset tables (``_flat_in``) so its weight loads wait on one
    index load, not two.

  Kernel 2 can be a programmatic dependent launch that L2-prefetches its own W2 rows before it
  waits for kernel 1 (the weights do not depend on it): always on the
  sliced path; tuned per shape and M on split-K, where it sometimes costs (its waiting programs
  hold SM slots kernel 1 could use).

  ``DECODE_PATH = "sliced" | "splitk"`` forces one. ``DECODE_PATH = "fused"``: the one-launch decode
  (``_decode_fused``, ``mlp_decode_fused``): the sliced path's two phases in a persistent grid of at most one
  program per SM with a grid barrier between them; opt-in until it has been timed on a GPU;
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

import functools
import logging
import math

import torch
import triton
from torch._dynamo.utils import counters

from .. import codegen
from ..formats import cdiv
from . import gather, launch, tune
from .tune import _hint, _interpret
from .activations import in_dtype
from .launch import lowered, rows_at_most, traced  # (lowered ops: see launch.traced)
from .plans import outside_graph_pool as _pool, version, warn_once

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


log = logging.getLogger("blast_compile.ops")

# forward() itself turns rows of x holding NaN/Inf into NaN rows (sparse_mlp skips its own fix-up)
HANDLES_NONFINITE = True

# small tuning spaces; the first entry is the untuned default
# split-K decode: (in-blocks per program, down blocks per program, num_warps, early), early: kernel 2
# 0 launched after kernel 1, 1 launched early (PDL), 2 early and prefetching its W2 into L2
# (small chunks on few warps win: more programs = more blocks in flight and shorter serial tails; whether
# PDL and the prefetch pay depends on the shape and M, so they are tuned too; 4-block chunks spill registers.
# Measurements: NOTES_KERNELS.md, docs/history.md)
DECODE_CONFIGS = [(1, 1, 2, 2), (1, 1, 2, 1), (1, 1, 2, 0), (1, 1, 1, 2), (1, 1, 1, 1), (1, 1, 1, 0),
                  (2, 1, 2, 1), (2, 2, 2, 1)]
# sliced decode: (rows per program BS, blocks per unrolled step CH, num_warps, num_stages), tuned
# separately for both kernels
# (2 stages, not 1: Triton's pipeliner then issues the next step's loads early; the list is the winners of a
# sweep over many signatures, where 16-row slices won almost everywhere)
DECODE_SLICE_CONFIGS = [(16, 4, 4, 2), (16, 1, 4, 3), (16, 2, 4, 2), (16, 4, 8, 2), (32, 4, 4, 2), (16, 8, 4, 2),
                        (32, 1, 4, 3), (16, 4, 4, 3)]
# prefill: (BM, num_warps, num_stages, wide); wide: one 128-wide gate|up dot per step, and two live
# blocks (or dA|dU) per down/dX step -- K = 128 (template: _in_proj_wide, _bsmm_step_wide)
# (1-2 stages: at small d most hidden blocks have one live in-block, so a program is one step and
# the pipeline's shared memory only caps how many programs share an SM)
# variant PREFILL_TMA: every tile loaded by TMA (Hopper+, 16-bit, 16-byte aligned rows; else the
# wide variant runs instead; bench/probes/tma_probe.py measured it: TMA tiles like 128 rows on 4 warps)
PREFILL_TMA = 2
PREFILL_CONFIGS = [(64, 4, 3, 0), (128, 8, 3, 0), (64, 4, 4, 0), (128, 4, 3, 0), (128, 8, 4, 0), (256, 8, 3, 0),
                   (64, 4, 2, 0), (64, 4, 3, 1), (128, 8, 3, 1), (128, 4, 3, 1), (128, 8, 4, 1), (256, 8, 2, 1),
                   (64, 4, 2, 1), (64, 4, 1, 1), (32, 4, 2, 1),
                   (128, 4, 3, 2), (128, 4, 2, 2), (64, 4, 2, 2), (64, 4, 3, 2), (128, 8, 2, 2), (256, 8, 3, 2),
                   (64, 4, 1, 2), (128, 8, 1, 2)]
# backward kernel 1 (three fp32 [BM, BH] tiles live at once: a/u, dh; no 256-row tiles; at 128-wide
# blocks only 8 warps hold them and 3 stages do not fit: the (64, 8, 2) configs)
# wide 1: 128-wide gate|up recompute; 2: also 2-block dh steps; BACKWARD_TMA: both loops by TMA
BACKWARD_TMA = 3
BACKWARD_CONFIGS = [(64, 4, 3, 0), (64, 4, 2, 0), (128, 8, 3, 0), (64, 8, 3, 0),
                    (64, 4, 3, 1), (64, 4, 4, 1), (128, 8, 3, 1), (64, 4, 3, 2), (128, 8, 3, 2),
                    (64, 4, 2, 1), (64, 4, 1, 1), (64, 4, 2, 2), (32, 4, 2, 1),
                    (64, 4, 3, 3), (64, 4, 2, 3), (128, 8, 3, 3), (128, 8, 2, 3), (64, 8, 3, 3),
                    (64, 8, 2, 0), (64, 8, 2, 1), (64, 8, 2, 3), (64, 4, 1, 3), (64, 8, 1, 3), (128, 8, 1, 3)]
# Every prefill/backward config with wide or TMA tiles is also tuned with its programs grouped
# (5th element: M tiles per group, GROUP_ROWS rows; template ``_tile``): a wave of programs then
# shares a few M tiles of activations in L2 instead of reading every M tile's. Measured per kernel
# by ``bench/tiles.py`` (grouped and launch-order timings of one config side by side): it pays most for
# the down projection, dX and backward kernel 1 at large M (NOTES_KERNELS.md).
GROUP_ROWS = 512


def _grouped(configs):
    return configs + [(*c, GROUP_ROWS // c[0]) for c in configs if c[3] and GROUP_ROWS // c[0] > 1]


PREFILL_CONFIGS = _grouped(PREFILL_CONFIGS)
BACKWARD_CONFIGS = _grouped(BACKWARD_CONFIGS)
# dX (dA W1 + dU W3) also tries variant TWO_LOOPS: TMA with the dA and dU halves in two loops (template
# ``bsmm``; elsewhere it is plain TMA). At 128x128 blocks one dual TMA step is four [>= 128, 128] tiles: past
# 64 rows they overflow shared memory (so the fitting TMA configs read each weight tile for 64 rows only),
# and the pointer variants need 255 registers; two loops hold two tiles a stage: 128/256-row tiles fit.
TWO_LOOPS = 3
DX_CONFIGS = _grouped([(128, 8, 2, 3), (128, 8, 3, 3), (128, 4, 2, 3), (256, 8, 2, 3), (256, 8, 3, 3),
                       (64, 4, 3, 3), (64, 4, 2, 3), (128, 8, 1, 3), (128, 4, 1, 3), (64, 4, 1, 3), (256, 8, 1, 3)])
# backward kernel 1 reading the forward's pre-activations (LOAD_PRE): one fp32 accumulator (dh), so the
# larger tiles and one-stage pairs of the down projection's list fit
# (256-row tiles lost at 64x64 and 128x128 blocks: docs/history.md)
BACKWARD_PRE_CONFIGS = _grouped([(128, 4, 3, 3), (128, 8, 3, 3), (128, 4, 2, 3), (64, 4, 3, 3), (64, 4, 2, 3),
                                 (128, 4, 1, 3), (64, 4, 1, 3), (64, 4, 3, 0), (128, 8, 3, 0)])


def _cfg(cfg):
    """(BM, num_warps, num_stages, variant, group) of a prefill/backward config (a config persisted
    before the group element has none: 0, launch order)."""
    return (*cfg, 0)[:5]


# ... each also with a and u loaded before the dh loop (6th element 1: template LOAD_PRE 2) where holding
# them costs <= 64 registers a thread (_pre_fits): at 64-wide blocks the loop is ~6 short steps and
# the loads after it wait on HBM with nothing else to do.
# 7th element: a register cap (ptxas maxnreg) for [64, 64] tiles: the kernel is latency-bound, and 96
# registers (some spilled) let 5 programs share an SM instead of 3 (168 and 128 gained nothing). Lowered ops
# drop the cap (Inductor cannot pass it): their warm-up tunes without it too.
BACKWARD_PRE_CONFIGS = (BACKWARD_PRE_CONFIGS + [(*_cfg(c), 1) for c in BACKWARD_PRE_CONFIGS]
                        + [(64, 4, 2, 3, 8, 1, 96), (64, 4, 2, 3, 16, 1, 96), (64, 4, 2, 3, 8, 0, 96)])


def _pre_cfg(cfg):
    """(early, register cap) of a LOAD_PRE config: its 6th and 7th elements, 0 where absent."""
    return (*cfg[5:], 0, 0)[:2]


def _pre_fits(cfg, bh, gated):
    """Whether a LOAD_PRE config is worth tuning at hidden blocks of bh (see above). Never where the
    epilogue's three fp32 [BM, bh] tiles (dh, a, u) alone overflow 255 registers a thread: those spill
    kilobytes (offline ptxas) and ran 2-3x slower (NOTES_KERNELS.md)."""
    early, cap = _pre_cfg(cfg)
    return (3 * cfg[0] * bh <= 255 * 32 * cfg[1]
            and (not early or cfg[0] * bh * (1 + gated) <= 64 * 2 * 32 * cfg[1])
            and (not cap or cfg[0] * bh <= 64 * 64))


def _for_m(configs, m):
    """The configs worth timing at M rows: a group holding every M tile is the launch order, so such a
    grouped config would only repeat its launch-order twin (never empty: a forced list stays)."""
    return [c for c in configs if _cfg(c)[4] < cdiv(_hint(m), c[0])] or configs


def _candidates(configs, var, tma_ok, m):
    """What the tuner times for a prefill/backward kernel at M rows: ``_with_tma``, then ``_for_m``.
    (Passed to ``_choose`` inside a lambda: it is built only on a tuning miss, never per call.)"""
    return _for_m(_with_tma(configs, var, tma_ok), m)


# False: never the TMA variants (comparisons, tests)
TMA = True

# split-K decode with M <= this uses a multiply-reduce GEMV (BM = 1 at M = 1) instead of tensor-core
# dots on 16 rows (0: never): the dots' [16, 64] accumulators and operand tiles cost 130+ registers for
# one live row (a 3-D GEMV was slower than the dots: docs/history.md)
GEMV_MAX_M = 1
# ... and its configs (as DECODE_CONFIGS; one block per program on 2 warps won the sweep)
DECODE_GEMV_CONFIGS = [(1, 1, 2, 2), (1, 1, 2, 1), (1, 1, 2, 0), (1, 1, 1, 2), (1, 1, 1, 0), (1, 1, 4, 2),
                       (2, 1, 4, 2), (2, 1, 2, 1)]




# decode path: "" (the faster of sliced and split-K, timed once per shape), "sliced" or "splitk" (tests,
# comparisons); PDL: programmatic dependent launch where the GPU has it (False: never)
DECODE_PATH = ""
PDL = True


def outside_graph_pool(fn, device):
    """``plans.outside_graph_pool``; while tracing, plan state can only come from the op's inputs."""
    if traced():
        raise RuntimeError("blast: a lowered op needs plan state its compile-time warm-up did not build")
    return _pool(fn, device)


# --- per-plan tables ----------------------------------------------------------------------------

def _index_tables(plan, device):
    """Index lists and long-rows-first orders (independent of the weights' strides)."""
    t = plan.cache.get("index")
    if t is not None:
        return t
    p = plan.pattern  # CPU copy: no device syncs while building
    in_cnt = (p.in_rowptr[1:] - p.in_rowptr[:-1]).long()
    in_rows = torch.repeat_interleave(torch.arange(p.n_h), in_cnt)
    live = p.hidden_live.long()
    order_h = live[torch.argsort(in_cnt[live], descending=True, stable=True)]
    dn_cnt = (p.dn_rowptr[1:] - p.dn_rowptr[:-1]).long()
    order_o = torch.argsort(dn_cnt, descending=True, stable=True)
    dn_rows_r = torch.repeat_interleave(torch.arange(p.n_out), dn_cnt)  # output row of each CSR down block
    # CSR position of every block (to address packed weights from CSC order)
    pos_dn = torch.full((p.n_out, p.n_h), -1, dtype=torch.long)
    pos_dn[dn_rows_r, p.dn_cols.long()] = torch.arange(p.nnz_dn)
    csc_dn_cols = torch.repeat_interleave(torch.arange(p.n_h), (p.dn_colptr[1:] - p.dn_colptr[:-1]).long())
    csc_dn_pos = pos_dn[p.dn_rows.long(), csc_dn_cols]
    # CSC of the in-projection (for dX)
    pos_in = torch.full((p.n_h, p.n_in), -1, dtype=torch.long)
    pos_in[in_rows, p.in_cols.long()] = torch.arange(p.nnz_in)
    mt = p.mask_in.t()
    in_colptr = torch.zeros(p.n_in + 1, dtype=torch.long)
    in_colptr[1:] = torch.cumsum(mt.sum(1), 0)
    nz = mt.nonzero()
    in_csc_rows, in_csc_cols = nz[:, 1], nz[:, 0]
    in_csc_pos = pos_in[in_csc_rows, in_csc_cols]
    host = dict(
        in_rowptr=p.in_rowptr, in_cols=p.in_cols, in_rows=in_rows, live=p.hidden_live, order_h=order_h,
        all_h=torch.arange(p.n_h), dn_colptr=p.dn_colptr, dn_rows=p.dn_rows, csc_dn_cols=csc_dn_cols,
        csc_dn_pos=csc_dn_pos, dn_rowptr=p.dn_rowptr, dn_cols=p.dn_cols, dn_rows_r=dn_rows_r, order_o=order_o,
        in_colptr=in_colptr, in_csc_rows=in_csc_rows, in_csc_cols=in_csc_cols, in_csc_pos=in_csc_pos,
        all_in=torch.arange(p.n_in),
    )
    keep64 = {"in_rows", "dn_rows_r", "csc_dn_cols", "csc_dn_pos", "in_csc_cols", "in_csc_pos"}
    t = {k: v.to(device, torch.int64 if k in keep64 else torch.int32) for k, v in host.items()}
    plan.cache["index"] = t
    return t


def _offsets(idx, rows, cols, bo, bi, stride, packed_pos=None):
    """Element offset of block (rows[z], cols[z]) of a dense weight, or of packed block packed_pos[z]."""
    if packed_pos is not None:
        return (packed_pos * (bo * bi)).contiguous()
    return (rows * (bo * stride[0]) + cols * (bi * stride[1])).contiguous()


def _weight_tables(plan, w1, w3, w2, packed):
    """Block offset tables for these weights (keyed by strides; packed weights by layout)."""
    key = ("offsets", packed, tuple(w1.stride()), None if w3 is None else tuple(w3.stride()), tuple(w2.stride()))
    t = plan.cache.get(key)
    if t is not None:
        return t
    p = plan.pattern
    ix = _index_tables(plan, w1.device)
    bh, bd = p.bh, p.bd
    ar_in = torch.arange(p.nnz_in, device=w1.device)
    ar_dn = torch.arange(p.nnz_dn, device=w1.device)
    t = {}
    for name, w in (("1", w1), ("3", w3)):
        if w is None:
            continue
        pk = ar_in if packed else None
        t["in" + name] = _offsets(ix, ix["in_rows"], ix["in_cols"].long(), bh, bd, w.stride(), pk)
        t["in_csc" + name] = _offsets(ix, ix["in_csc_rows"], ix["in_csc_cols"], bh, bd, w.stride(),
                                      ix["in_csc_pos"] if packed else None)
    t["dn_csc"] = _offsets(ix, ix["dn_rows"].long(), ix["csc_dn_cols"], bd, bh, w2.stride(),
                           ix["csc_dn_pos"] if packed else None)
    t["dn_csr"] = _offsets(ix, ix["dn_rows_r"], ix["dn_cols"].long(), bd, bh, w2.stride(), ar_dn if packed else None)
    plan.cache[key] = t
    return t


def _split(ptr, items, ch):
    """Work chunks of <= ch consecutive CSR entries for each of ``items`` (rows): (item, start, n)."""
    cnt = (ptr[1:] - ptr[:-1]).long()[items]
    nch = (cnt + ch - 1) // ch
    item = torch.repeat_interleave(items, nch)
    first = torch.repeat_interleave(torch.cumsum(nch, 0) - nch, nch)
    start = ptr.long()[item] + (torch.arange(int(nch.sum())) - first) * ch
    n = torch.minimum(torch.full_like(start, ch), ptr.long()[item + 1] - start)
    return item, start, n


def _chunks(plan, ch_in, ch_dn, device):
    """Decode work lists (built on the host from the CPU pattern, once per chunk size).

    ``in``/``dn``: (item, start, n) per chunk; ``dn_tot``: how many chunks its hidden column
    has (the column's completion count); ``empty``: output blocks no live down block touches.
    """
    key = ("chunks", ch_in, ch_dn)
    t = plan.cache.get(key)
    if t is None:  # (first use of these chunk sizes may come inside a CUDA-graph warm-up)
        t = plan.cache[key] = outside_graph_pool(lambda: _build_chunks(plan, ch_in, ch_dn, device), device)
    return t


def _build_chunks(plan, ch_in, ch_dn, device):
    p = plan.pattern
    t = {}
    for name, ptr, items, ch in (("in", p.in_rowptr, p.hidden_live.long(), ch_in),
                                 ("dn", p.dn_colptr, torch.arange(p.n_h), ch_dn)):
        item, start, n = _split(ptr, items, ch)
        t[name] = (item.to(device, torch.int32), start.to(device, torch.int32), n.to(device, torch.int32))
        t["n_" + name] = int(item.numel())
        if name == "dn":
            per_col = torch.bincount(item, minlength=p.n_h)
            t["dn_tot"] = per_col[item].to(device, torch.int32)
    empty = ((p.dn_rowptr[1:] - p.dn_rowptr[:-1]) == 0).nonzero().flatten()
    t["empty"] = empty.to(device, torch.int32) if empty.numel() else torch.zeros(1, device=device, dtype=torch.int32)
    t["n_empty"] = int(empty.numel())
    return t


def _flat_in(ix, off, off3, ch, ci, n_in):
    """Split-K kernel 1's per-chunk [n_chunks, ci] column / W1 / W3 offset tables (FLAT; padding: column
    ``n_in``, out of range). Built on the device once per chunk size, kept with the offset tables."""
    key = ("flat_in", ci)
    t = off.get(key)
    if t is None:
        _, start, n = ch["in"]

        def build():
            k = torch.arange(ci, device=start.device)
            ok = k[None, :] < n[:, None]
            idx = torch.where(ok, start[:, None].long() + k[None, :], 0)

            def tab(src, pad):
                return torch.where(ok, src[idx], pad).flatten().contiguous()

            return tab(ix["in_cols"], n_in), tab(off["in1"], 0), tab(off3, 0)

        t = off[key] = outside_graph_pool(build, start.device)
    return t


def _decode_scratch(plan, device, gated, d_hidden, d_out):
    """Persistent fp32 scratch (G|U, Y), int32 completion counters (per hidden block column, per
    output block), the per-row NaN/Inf flag of x and the finisher count: all zero between calls
    (the decode kernels leave them so)."""
    key = ("dec_scratch", str(device), gated, d_hidden, d_out)
    t = plan.cache.get(key)
    if t is None:
        mm = codegen.DECODE_MAX_M
        p = plan.pattern
        t = (torch.zeros(mm, (2 if gated else 1) * d_hidden, device=device, dtype=torch.float32),
             torch.zeros(mm, d_out, device=device, dtype=torch.float32),
             torch.zeros(max(1, p.n_h), device=device, dtype=torch.int32),
             torch.zeros(max(1, p.n_out), device=device, dtype=torch.int32),
             torch.zeros(mm, device=device, dtype=torch.int32),
             torch.zeros(1, device=device, dtype=torch.int32))
        plan.cache[key] = t
    return t


def _strides(w, packed):
    """In-block (out, in) strides of a weight: a packed [nnz, bo, bi] tensor's last two."""
    return (w.stride(1), w.stride(2)) if packed else (w.stride(0), w.stride(1))


# --- TMA ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _hopper(index) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _tma_ok(*ts) -> bool:
    """Every tensor can be read through a TMA descriptor: Hopper or newer (or the interpreter), one
    16-bit dtype, unit inner stride, 16-byte aligned base and rows, packed blocks contiguous."""
    if not TMA or TensorDescriptor is None or lowered():
        # (a lowered op's trace cannot carry host-side descriptors: wrap_triton would keep the trace's
        # fake tensors in them; its warm-up tunes without them too)
        return False
    t0 = ts[0]
    if not (_hopper(t0.device.index or 0) if t0.device.type == "cuda" else _interpret()):
        return False
    for t in ts:
        if (t.dtype != t0.dtype or t.dtype not in (torch.float16, torch.bfloat16) or not t.numel()
                or t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1])
                or (t.dim() == 3 and not t.is_contiguous())):
            return False
    return True


def _desc(t, block):
    """TMA descriptor of a 2-D tensor, or of packed blocks ``[nnz, bo, bi]`` as ``[nnz * bo, bi]`` rows
    (the kernels turn a block's element offset into its (row, col) there: ``_w_tma``)."""
    if t.dim() == 3:
        return TensorDescriptor(t, [t.shape[0] * t.shape[1], t.shape[2]], [t.shape[2], 1], list(block))
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], list(block))


def _descs(on, *specs):
    """TMA descriptors of (tensor, block) pairs, or as many Nones (the pointer variants' arguments)."""
    return tuple(_desc(t, block) if on else None for t, block in specs)


def _with_tma(configs, var, ok):
    """The configs to tune over: without TMA its variants (``var`` and above) would only repeat the wide ones."""
    return [c for c in configs if c[3] < var or ok] or configs


# --- forward ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _launchable(mod):
    """``mod`` with its kernels launched through ``launch.Kernel`` (less host time per launch); one
    wrapper per module, which keeps the compiled kernels it has seen (codegen keeps modules alive)."""
    return launch.Module(mod)


def _module(plan, activation, gated, has_b1, has_b3, dtype):
    key = ("sig", activation, gated, has_b1, has_b3, dtype)
    sig = plan.cache.get(key)
    if sig is None:
        sig = codegen.signature(plan.pattern, activation, gated, has_b1, has_b3, dtype)
        plan.cache[key] = sig
    return sig, _launchable(codegen.load(sig))


@functools.lru_cache(maxsize=None)
def _tl_dtype(mod, dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


class _Static:
    """What a forward launch needs that depends only on the plan, the weights' layout and the dtype:
    kept in ``plan.cache`` (except for packed copies made per call), so that a call's host path is
    the launches themselves (default mode without CUDA graphs is host-bound at prefill sizes)."""

    __slots__ = ("sig", "mod", "ix", "off", "s1", "s2", "s3", "off3", "common", "n_live", "tma_in", "tma_dn")


def _static(plan, w1, w3, w2, b1, b3, packed, activation, dtype) -> _Static:
    gated = w3 is not None
    key = ("static", activation, dtype, w1.dtype, b1 is not None, b3 is not None, gated,
           w1.stride(), None if w3 is None else w3.stride(), w2.stride())
    st = None if packed else plan.cache.get(key)
    if st is not None:
        return st
    p = plan.pattern
    st = _Static()
    st.sig, st.mod = _module(plan, activation, gated, b1 is not None, b3 is not None, dtype)
    st.ix = _index_tables(plan, w1.device)
    st.off = _weight_tables(plan, w1, w3, w2, packed)
    st.s1, st.s2 = _strides(w1, packed), _strides(w2, packed)
    st.s3 = _strides(w3, packed) if gated else (0, 0)
    st.off3 = st.off["in3"] if gated else st.off["in1"]
    st.common = dict(DTYPE=_tl_dtype(st.mod, dtype), BH=p.bh, BD=p.bd, NNZ=st.sig.nnz_in, ALIGNED=st.sig.aligned,
                     GATED=gated, HAS_B1=b1 is not None, HAS_B3=b3 is not None)
    st.n_live = st.ix["live"].numel()
    # the weights' half of _tma_ok (x and H are checked per call)
    st.tma_in = w1.dtype == dtype and _tma_ok(w1, w3 if gated else w1)
    st.tma_dn = w2.dtype == dtype and _tma_ok(w2)
    if not packed:
        plan.cache[key] = st
    return st


def saved_count(keep, gated) -> int:
    """How many ``[M, d_hidden]`` tensors ``forward(keep=...)`` keeps: H (keep 1), H and the
    pre-activations a [and u] (keep 2)."""
    return 0 if not keep else 1 if keep == 1 else 3 if gated else 2


def _forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, packed, d_out, d_hidden, keep=0):
    """fp32 master weights under autocast reach here as packed x.dtype copies of their live blocks
    (``forward``). Packed weights in another dtype than x (``forward_packed`` called directly) are
    cast on load by the prefill kernels and copied for decode. ``keep`` (training): the prefill kernels
    at any M, and ``(y, S)`` back, S ``[saved_count, M, d_hidden]``: H, then a [and u] for keep 2
    (written on live hidden blocks only)."""
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    decode = not keep and rows_at_most(x2d.shape[0], codegen.DECODE_MAX_M)
    if decode:
        w1, w3, w2 = in_dtype(x2d.dtype, w1, w3, w2)
    p = plan.pattern
    m, d_in = x2d.shape
    gated = w3 is not None
    st = _static(plan, w1, w3, w2, b1, b3, packed, activation, x2d.dtype)
    sig, mod, ix, off, s1, s2, s3, off3, common, n_live = (st.sig, st.mod, st.ix, st.off, st.s1, st.s2, st.s3, st.off3,
                                                          st.common, st.n_live)
    # pointer arguments a kernel does not read are None, not a stand-in tensor: in a lowered op every tensor
    # argument is an input of Inductor's kernel call, and a tensor passed twice gets copied
    w3_, off3_ = (w3, off3) if gated else (None, None)
    DT = common["DTYPE"]
    if decode:
        _count_eager_decode(plan, x2d)
        args = (x2d, b2, plan, m, d_in, d_hidden, d_out, sig, mod, ix, off, s1, s2, s3, w1, w2, w3_, off3_, b1, b3,
                common, n_live)
        return _decode(args)

    flag = torch.zeros(m, device=x2d.device, dtype=torch.int32)  # NaN/Inf rows of x (set by mlp_hidden)
    if not n_live:  # no hidden kernel to flag them
        flag.copy_(~torch.isfinite(x2d).all(1))
    n_saved = saved_count(keep, gated)
    if lowered():  # one tensor each: a kernel writing views of one buffer would be copied around (functionalized)
        saved = [torch.empty(m, d_hidden, device=x2d.device, dtype=x2d.dtype) for _ in range(max(n_saved, 1))]
    else:  # one [n, M, H] tensor, the opaque training op's second output
        saved = torch.empty(max(n_saved, 1), m, d_hidden, device=x2d.device, dtype=x2d.dtype)
    h = saved[0]
    pre_a = saved[1] if n_saved > 1 else None
    pre_u = saved[2] if n_saved > 2 else None
    y = torch.empty(m, d_out, device=x2d.device, dtype=x2d.dtype)

    tma_h = st.tma_in and _tma_ok(x2d)

    def run_h(cfg):
        bm, nw, ns, var, grp = _cfg(cfg)
        tma = var >= PREFILL_TMA and tma_h
        descs = _descs(tma, (x2d, (bm, p.bd)), (w1, (p.bh, p.bd)), (w3 if gated else w1, (p.bh, p.bd)))
        if n_live:
            mod.mlp_hidden[(cdiv(m, bm), n_live)](
                x2d, x2d.stride(0), h, h.stride(0), pre_a, pre_u, flag, m, d_in, d_hidden,
                w1, off["in1"], s1[0], s1[1], b1, w3_, off3_, s3[0], s3[1], b3,
                ix["in_rowptr"], ix["in_cols"], ix["order_h"], *descs,
                BM=bm, BS=p.bh, num_warps=nw, num_stages=ns, STORE_PRE=n_saved > 1, SCAN=1,
                WIDE=min(var, 1) and gated,
                TMA=(1 + packed) if tma else 0, GROUP=grp, **common)

    def h_configs():  # (wide tiles in the in-projection are for the gated kernel: gate|up side by side)
        cs = PREFILL_CONFIGS if gated else list(dict.fromkeys(
            (*c[:3], c[3] if c[3] >= PREFILL_TMA else 0, *c[4:]) for c in PREFILL_CONFIGS))
        return _candidates(cs, PREFILL_TMA, tma_h, m)

    run_h(tune._choose("hidden", sig, m, h_configs, run_h, shape=(d_in, d_hidden, d_out) + ((1,) * (n_saved > 1)),
                  memo=plan.cache))  # (storing a, u or not: tuned apart)

    tma_y = st.tma_dn and _tma_ok(h)

    def run_y(cfg):
        bm, nw, ns, var, grp = _cfg(cfg)
        tma = var >= PREFILL_TMA and tma_y
        hd, wd = _descs(tma, (h, (bm, p.bh)), (w2, (p.bd, p.bh)))
        mod.bsmm[(cdiv(m, bm), p.n_out)](
            h, h.stride(0), None, y, y.stride(0), b2, flag, 0, m, d_hidden, d_out,
            w2, off["dn_csr"], s2[0], s2[1], None, None, s2[0], s2[1],
            ix["dn_rowptr"], ix["dn_cols"], ix["order_o"], hd, None, wd, None,
            DTYPE=DT, BO=p.bd, BI=p.bh, BS=p.bd, ALIGNED=sig.aligned, HAS_B=b2 is not None, DUAL=False,
            NANROW=1, BM=bm, num_warps=nw, num_stages=ns, WIDE=min(var, 1), TMA=(1 + packed) if tma else 0,
            GROUP=grp)

    run_y(tune._choose("down", sig, m, lambda: _candidates(PREFILL_CONFIGS, PREFILL_TMA, tma_y, m), run_y,
                  shape=(d_in, d_hidden, d_out), memo=plan.cache))
    return (y, saved[:n_saved] if isinstance(saved, list) else saved) if keep else y


# decode calls of one MLP outside CUDA-graph capture before we say that decode runs without graphs
EAGER_DECODE_WARN = 256


def _count_eager_decode(plan, x2d):
    """The opaque op's decode without CUDA graphs is host-bound: a call's Python and two launches outlast its
    kernels, and the dense model it replaces launches cuBLAS cheaper. Say so once, after enough calls that it
    is not a graph warm-up. (A lowered op has no Python per call: it never gets here.)"""
    if not x2d.is_cuda or lowered() or torch.cuda.is_current_stream_capturing():
        return
    n = plan.cache["eager_decode"] = plan.cache.get("eager_decode", 0) + 1
    if n == EAGER_DECODE_WARN:
        warn_once("eager_decode", "blast: decode-sized calls (M <= 16) of the opaque fused op are running "
                  "without CUDA graphs; each spends more time in Python and launches than in its kernels, so "
                  "decode can be slower than the dense model. On CUDA with Inductor (the default) fused MLPs are "
                  "lowered and launch no Python; else compile with mode='reduce-overhead' for decode.")


@functools.lru_cache(maxsize=None)
def _pdl_supported(index) -> bool:
    """Hopper or newer and a Triton with ``gdc_wait`` and ``launch_pdl`` (cached: every decode call asks)."""
    try:
        import triton.language.extra.cuda as tl_cuda
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return (hasattr(tl_cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__
            and torch.cuda.get_device_capability(index)[0] >= 9)


def _pdl_ok(device) -> bool:
    """Programmatic dependent launch on ``device`` (``PDL = False`` turns it off)."""
    if device.type != "cuda" or _interpret() or lowered() or not PDL:
        return False  # (Inductor launches a lowered op's kernels: it has no programmatic dependent launch)
    return _pdl_supported(device.index if device.index is not None else torch.cuda.current_device())


def _prefetch_lines(w, s_in, bi, pdl):
    """(PF, PF_LINE) for a decode kernel 2 that prefetches rows of ``w``'s blocks: 128-byte lines
    per block row and elements per line; (0, 64) = no prefetch (no PDL, or rows not contiguous)."""
    if not (pdl and s_in == 1):
        return 0, 64
    line = 128 // w.element_size()
    return triton.next_power_of_2(cdiv(bi, line)), line


def _decode(args):
    """Decode (M <= ``codegen.DECODE_MAX_M``): the sliced path or split-K, whichever was faster for
    this (signature, shape, live-block count, M bucket) when first timed (CUDA graphs; persisted like
    the configs). ``DECODE_PATH`` forces one. Under ``torch.use_deterministic_algorithms(True)`` always the
    sliced path: split-K adds fp32 partial sums with atomics, in any order. ``args``: ``_decode_sliced``'s."""
    mode = DECODE_PATH
    if mode == "fused":  # (deterministic; no state between calls when lowered)
        return _decode_fused(*args)
    if lowered():  # split-K keeps scratch between calls: a lowered op has no state of its own
        return _decode_sliced(*args)
    if torch.are_deterministic_algorithms_enabled():
        if mode == "splitk":
            warn_once(("deterministic", mode), "blast: DECODE_PATH='splitk' ignored under "
                      "torch.use_deterministic_algorithms(True): its atomics are not deterministic; "
                      "using the sliced decode")
        return _decode_sliced(*args)
    paths = {"sliced": _decode_sliced, "splitk": _decode_splitk}
    if mode in paths:
        return paths[mode](*args)
    x2d, _, plan, m, d_in, d_hidden, d_out, sig = args[:8]
    mk = tune._memo_key("dec_path", id(sig), codegen.m_bucket(m))
    choice = plan.cache.get(mk)
    if choice is not None:
        return paths[choice](*args)
    dev = tune._device_name(x2d.device.index) if x2d.is_cuda else "cpu"
    # which path wins depends on how much there is to stream (the signature does not say): key by
    # the shape and the live-block count in quarter-octaves
    p = plan.pattern
    nnz = round(4 * math.log2(max(1, p.nnz_in + p.nnz_dn)))
    key = f"dec_path|{sig.digest()}|{d_in}x{d_hidden}x{d_out}|nnz{nnz}|m{codegen.m_bucket(m)}|{dev}"
    choice = codegen.lookup_config(key)
    if choice is None:
        if not tune._may_tune():
            return _decode_sliced(*args)
        times = {name: tune._graph_time(lambda f=f: f(*args)) for name, f in paths.items()}
        choice = [min(times, key=times.get)]
        codegen.store_config(key, choice)
        log.info("blast: decode path %s -> %s (%s)", key, choice[0],
                 ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))
    plan.cache[mk] = choice[0]
    return paths[choice[0]](*args)


def _decode_splitk(x2d, b2, plan, m, d_in, d_hidden, d_out, sig, mod, ix, off, s1, s2, s3, w1, w2, w3_, off3, b1_,
                   b3_, common, n_live):
    """Split-K decode: ``mlp_decode_in`` + ``mlp_decode_dn`` with fp32 atomics into plan scratch and
    completion counters (module docstring)."""
    p = plan.pattern
    gated = common["GATED"]
    DT = common["DTYPE"]
    w3_, off3 = (w3_, off3) if gated else (w1, off["in1"])
    b1_, b3_ = (x2d if b is None else b for b in (b1_, b3_))
    scratch = _decode_scratch(plan, x2d.device, gated, d_hidden, d_out)
    gu, y32, colcnt, outcnt, flag, done = scratch
    y = torch.empty(m, d_out, device=x2d.device, dtype=x2d.dtype)
    dot = m > GEMV_MAX_M
    bm = max(16, triton.next_power_of_2(m)) if dot else triton.next_power_of_2(m)
    bx = max(64, min(triton.next_power_of_2(d_in), 8192 // bm))  # NaN scan: [BM, BX] x tiles
    dec = dict(BM=bm, BH=p.bh, BD=p.bd, BX=bx, ALIGNED=sig.aligned, GATED=gated, DOT=dot, DTYPE=DT)
    b2_ = b2 if b2 is not None else y32
    pdl = _pdl_ok(x2d.device)

    def run(cfg):
        ci, cd, nw, mode = cfg
        ch = _chunks(plan, ci, cd, x2d.device)
        first = bool(ch["n_in"] + ch["n_empty"])
        early = pdl and mode > 0 and first and bool(ch["n_dn"])  # kernel 2 launched early
        pf, line = _prefetch_lines(w2, s2[1], p.bh, early and mode > 1)  # ... and prefetching W2
        try:
            if first:
                cols, o1, o3 = _flat_in(ix, off, off3, ch, ci, p.n_in)
                mod.mlp_decode_in[(ch["n_in"] + ch["n_empty"],)](
                    x2d, x2d.stride(0), gu, gu.stride(0), m, d_in, d_hidden,
                    w1, o1, s1[0], s1[1], w3_, o3, s3[0], s3[1],
                    cols, *ch["in"], ch["n_in"], y, y.stride(0), b2_, ch["empty"], d_out,
                    flag, 1 if ch["n_dn"] else 0,
                    CH=ci, HAS_B=b2 is not None, PDL=early, num_warps=nw, **dec)
            if ch["n_dn"]:
                mod.mlp_decode_dn[(ch["n_dn"],)](
                    gu, gu.stride(0), y32, y32.stride(0), y, y.stride(0), x2d, x2d.stride(0),
                    m, d_in, d_hidden, d_out, b1_, b3_, b2_,
                    w2, off["dn_csc"], s2[0], s2[1], ix["dn_rows"], ix["dn_rowptr"],
                    *ch["dn"], ch["dn_tot"], colcnt, outcnt, flag, done, p.n_out - ch["n_empty"],
                    CH=cd, HAS_B1=common["HAS_B1"], HAS_B3=common["HAS_B3"], HAS_B=b2 is not None,
                    PDL=early, PF=pf, PF_LINE=line,
                    num_warps=nw, **dec, **(dict(launch_pdl=True) if early else {}))
        except Exception:  # e.g. a config that does not compile: leave the scratch zeroed
            for t in scratch:
                t.zero_()
            raise

    kind, configs = ("decode2", DECODE_CONFIGS) if dot else ("decode2g", DECODE_GEMV_CONFIGS)
    if not pdl:  # (no PDL here: the early modes are the same launch)
        configs = list(dict.fromkeys((*c[:3], 0) for c in configs))
    run(tune._choose(kind, sig, m, configs, run, graph="cold", shape=(d_in, d_hidden, d_out), memo=plan.cache))
    return y


def _decode_sliced(x2d, b2, plan, m, d_in, d_hidden, d_out, sig, mod, ix, off, s1, s2, s3, w1, w2, w3_, off3, b1_,
                   b3_, common, n_live):
    """Decode: the prefill kernels with one M tile (BM = 16 or 32 rows) and each weight block's rows
    split over BH/BS (BD/BS) programs, so thousands of small programs keep weight bytes in flight
    without split-K: no atomics, no scratch to re-zero, no counters. ``mlp_hidden`` writes H (bf16,
    as eager rounds it) and per-slice NaN/Inf row flags of x; ``bsmm`` reads them."""
    p = plan.pattern
    # one M tile holds every row (a symbolic M <= 32 guards on M <= 16 at most)
    bm = 16 if rows_at_most(m, 16) else 32
    n_sl = cdiv(d_in, 64)
    flag = torch.empty(n_sl, bm, device=x2d.device, dtype=torch.int32)
    h = torch.empty(m, d_hidden, device=x2d.device, dtype=x2d.dtype)
    y = torch.empty(m, d_out, device=x2d.device, dtype=x2d.dtype)
    if not n_live:  # no hidden kernel to write the flags
        flag.zero_()
        flag[0, :m] = (~torch.isfinite(x2d).all(1)).to(torch.int32)

    pdl = _pdl_ok(x2d.device)

    def run_h(cfg):
        bs, ch, nw, ns = cfg
        bs = min(bs, p.bh)
        mod.mlp_hidden[(1, n_live * (p.bh // bs))](
            x2d, x2d.stride(0), h, h.stride(0), None, None, flag, m, d_in, d_hidden,
            w1, off["in1"], s1[0], s1[1], b1_, w3_, off3, s3[0], s3[1], b3_,
            ix["in_rowptr"], ix["in_cols"], ix["order_h"], None, None, None,
            BM=bm, BS=bs, CH=ch, PDL=pdl, num_warps=nw, num_stages=ns, STORE_PRE=False, SCAN=2, **common)

    pf, line = _prefetch_lines(w2, s2[1], p.bh, pdl and bool(n_live))

    def run_y(cfg):
        bs, ch, nw, ns = cfg
        bs = min(bs, p.bd)
        kw = dict(launch_pdl=True) if (pdl and n_live) else {}
        mod.bsmm[(1, p.n_out * (p.bd // bs))](
            h, h.stride(0), None, y, y.stride(0), b2, flag, n_sl, m, d_hidden, d_out,
            w2, off["dn_csr"], s2[0], s2[1], None, None, s2[0], s2[1],
            ix["dn_rowptr"], ix["dn_cols"], ix["order_o"], None, None, None, None,
            DTYPE=common["DTYPE"], BO=p.bd, BI=p.bh, BS=bs, ALIGNED=sig.aligned, HAS_B=b2 is not None, DUAL=False,
            NANROW=2, CH=ch, PDL=pdl and bool(n_live), PF=pf, PF_LINE=line, BM=bm, num_warps=nw, num_stages=ns,
            **kw)

    if n_live:  # (else: nothing to launch, nothing to tune)
        run_h(tune._choose("dec_h", sig, m, DECODE_SLICE_CONFIGS, run_h, graph="cold", shape=(d_in, d_hidden, d_out),
                      memo=plan.cache))
    run_y(tune._choose("dec_y", sig, m, DECODE_SLICE_CONFIGS, run_y, graph="cold", shape=(d_in, d_hidden, d_out),
                  memo=plan.cache))
    return y


# one-launch decode: (BS1 rows per phase-1 item, BS2 rows per phase-2 item, CH blocks per unrolled step, num_warps,
# num_stages). Not timed against the two-launch paths yet (``DECODE_PATH = "fused"`` selects it): its grid barrier
# has not run on a GPU (bench/decode_floor.py --paths)
DECODE_FUSED_CONFIGS = [(16, 16, 4, 4, 2), (16, 16, 2, 4, 2), (16, 16, 4, 8, 2), (32, 16, 4, 4, 2), (16, 32, 4, 8, 2),
                        (16, 16, 1, 4, 3)]


def _grid_counter(plan, device):
    """The fused decode's barrier counter, zero at rest: the plan's own on the eager path; a lowered op
    allocates one per call (a graph input written by a kernel would be cloned around it anyway)."""
    if lowered():
        return torch.zeros(1, device=device, dtype=torch.int32)
    key = ("dec_bar", device.index)
    bar = plan.cache.get(key)
    if bar is None:
        bar = plan.cache[key] = _pool(lambda: torch.zeros(1, device=device, dtype=torch.int32), device)
    return bar


def _decode_fused(x2d, b2, plan, m, d_in, d_hidden, d_out, sig, mod, ix, off, s1, s2, s3, w1, w2, w3_, off3, b1_,
                  b3_, common, n_live):
    """Decode in one launch (``mlp_decode_fused``): both phases of the sliced path in a persistent grid of at most
    one program per SM, a grid barrier between them. Two programs of one plan must not run at once on two
    streams (they would share the counter), as for split-K."""
    p = plan.pattern
    bm = 16 if rows_at_most(m, 16) else 32
    n_sl = cdiv(d_in, 64)
    flag = torch.empty(n_sl, bm, device=x2d.device, dtype=torch.int32)
    h = torch.empty(m, d_hidden, device=x2d.device, dtype=x2d.dtype)
    y = torch.empty(m, d_out, device=x2d.device, dtype=x2d.dtype)
    bar = _grid_counter(plan, x2d.device)
    interp = _interpret()

    def run(cfg):
        bs1, bs2, ch, nw, ns = cfg
        bs1, bs2 = min(bs1, p.bh), min(bs2, p.bd)
        items = max(n_live * (p.bh // bs1), p.n_out * (p.bd // bs2), n_sl)
        grid = (min(_n_sm(x2d.device), items),)
        for phase in ((1, 2) if interp else (0,)):
            mod.mlp_decode_fused[grid](
                x2d, x2d.stride(0), h, h.stride(0), y, y.stride(0), flag, n_sl, bar, m, d_in, d_hidden, d_out,
                w1, off["in1"], s1[0], s1[1], b1_, w3_, off3, s3[0], s3[1], b3_,
                ix["in_rowptr"], ix["in_cols"], ix["order_h"], n_live,
                w2, off["dn_csr"], s2[0], s2[1], b2, ix["dn_rowptr"], ix["dn_cols"], ix["order_o"], p.n_out,
                DTYPE=common["DTYPE"], BM=bm, BH=p.bh, BD=p.bd, BS1=bs1, BS2=bs2, CH=ch, NNZ=common["NNZ"],
                ALIGNED=sig.aligned, GATED=common["GATED"], HAS_B1=common["HAS_B1"], HAS_B3=common["HAS_B3"],
                HAS_B=b2 is not None, PHASE=phase, num_warps=nw, num_stages=ns)

    run(tune._choose("dec_fused", sig, m, DECODE_FUSED_CONFIGS, run, graph="cold", shape=(d_in, d_hidden, d_out),
                     memo=plan.cache))
    return y


def _live_copies(plan, mod, dtype, w1, w3, w2):
    """Packed ``dtype`` copies of the live blocks (``forward_packed``'s layout), one launch per
    weight: fp32 master weights under autocast are cast once per call, not per M tile on load."""
    p = plan.pattern
    ix = _index_tables(plan, w1.device)
    off = _weight_tables(plan, w1, w3, w2, False)
    out = []
    for w, o, rows, cols, bo, bi in ((w1, off["in1"], ix["in_rows"], ix["in_cols"], p.bh, p.bd),
                                     (w3, off.get("in3"), ix["in_rows"], ix["in_cols"], p.bh, p.bd),
                                     (w2, off["dn_csr"], ix["dn_rows_r"], ix["dn_cols"], p.bd, p.bh)):
        if w is None:
            out.append(None)
            continue
        pk = torch.empty(rows.numel(), bo, bi, device=w.device, dtype=dtype)
        if rows.numel():
            mod.pack_blocks[(rows.numel(),)](w, o, w.stride(0), w.stride(1), rows, cols, w.shape[0], w.shape[1], pk,
                                             BO=bo, BI=bi, num_warps=4)
        out.append(pk)
    return out


def forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, keep=0):
    """``[M, d_out]`` in x2d.dtype; weights are the dense ``[out, in]`` tensors (any strides).
    ``keep`` 1 / 2: ``(y, S)``, what the backward reads instead of recomputing (see ``_forward``)."""
    if any(w is not None and w.dtype != x2d.dtype for w in (w1, w3, w2)):  # fp32 masters under autocast
        _, mod = _module(plan, activation, w3 is not None, b1 is not None, b3 is not None, x2d.dtype)
        p1, p3, p2 = _live_copies(plan, mod, x2d.dtype, w1, w3, w2)
        return _forward(x2d, p1, b1, p3, b3, p2, b2, plan, activation, True, w2.shape[0], w1.shape[0], keep)
    return _forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, False, w2.shape[0], w1.shape[0], keep)


def forward_packed(x2d, p1, b1, p3, b3, p2, b2, plan, activation, d_out=None):
    """Same, with weights given as packed live blocks.

    ``p1``/``p3``: ``[nnz_in, bh, bd]`` in ``pattern.in_cols`` order; ``p2``:
    ``[nnz_dn, bd, bh]`` in ``pattern.dn_cols`` order. ``d_out`` defaults to
    ``len(b2)``, else ``plan.cache["d_out"]``, else whole output blocks.
    """
    p = plan.pattern
    if d_out is None:
        d_out = b2.shape[0] if b2 is not None else plan.cache.get("d_out", p.n_out * p.bd)
    d_hidden = b1.shape[0] if b1 is not None else plan.cache.get("d_hidden", p.n_h * p.bh)
    return _forward(x2d, p1, b1, p3, b3, p2, b2, plan, activation, True, d_out, d_hidden)


# --- backward ---------------------------------------------------------------------------------------

def _bsmm(mod, sig, x, x2, w, off, sw, wb, offb, swb, rowptr, idx, order, n_out_blocks, bo, bi, n_in, n_out,
          out_dtype, packed, memo=None, flag=None):
    """out = X W^T (+ X2 W2^T) through live blocks (backward: dX), config tuned per signature, shape and M
    (``memo``: the plan's cache, see ``_choose``); rows with ``flag`` set come out NaN."""
    m = x.shape[0]
    out = torch.empty(m, n_out, device=x.device, dtype=out_dtype)
    x2 = x if x2 is None else x2
    # TMA here reads W's blocks as stored, [bi, bo] (the transposed pattern: swapped strides, sw[0] == 1)
    tma_ok = sw[0] == 1 and swb[0] == 1 and _tma_ok(x, x2, w, wb)

    dual = x2 is not x

    def run(cfg):
        bm, nw, ns, var, grp = _cfg(cfg)
        tma = var >= PREFILL_TMA and tma_ok
        descs = _descs(tma, (x, (bm, bi)), (x2, (bm, bi)), (w, (bi, bo)), (wb, (bi, bo)))
        if not dual:  # (the second operand's pointers are not read: None, see _forward)
            descs = (descs[0], None, descs[2], None)
        mod.bsmm[(cdiv(m, bm), n_out_blocks)](
            x, x.stride(0), x2 if dual else None, out, out.stride(0), None, flag, 0, m, n_in, n_out,
            w, off, sw[0], sw[1], wb if dual else None, offb if dual else None, swb[0], swb[1], rowptr, idx, order,
            *descs,
            DTYPE=_tl_dtype(mod, out_dtype), BO=bo, BI=bi, BS=bo, ALIGNED=sig.aligned, HAS_B=False,
            DUAL=dual, NANROW=int(flag is not None), BM=bm, num_warps=nw, num_stages=ns, WIDE=min(var, 1),
            TMA=(3 + packed) if tma else 0, GROUP=grp, TWO_LOOPS=var == TWO_LOOPS)

    run(tune._choose("dx_dual" if dual else "dx", sig, m,
                lambda: _candidates(PREFILL_CONFIGS + DX_CONFIGS if dual else PREFILL_CONFIGS, PREFILL_TMA, tma_ok, m),
                run, shape=(n_in, n_out), memo=memo))
    return out


SDDMM_MIN_ROWS = 256  # an M split of dW is at least this many rows
# the dW kernel writes the zeros of the dead blocks too (template ``sddmm``, FILL: 1 before its products,
# 2 a few rows per step); 0: a torch.zeros pass before it (tests compare them; 2 is the fastest: NOTES_KERNELS.md)
DW_FILL = 2
# (M rows per step, warps, stages, tma): tma 1 loads the tiles by TMA (as PREFILL_TMA)
# (8 warps with 32/64-row steps: at 128x128 blocks the 128-row steps overflow shared memory and 4 warps
# spill two [128, 128] fp32 accumulators)
# 5th element G: G live blocks of a block row per program (template ``sddmm``; pointer loads, tma 0).
# At 64x64 blocks a one-block program is L2-bound: each step loads as many activation bytes as it
# multiplies by (~43 FLOP/B dual); G = 2 shares the dout tile over 2 blocks (64 FLOP/B). G = 4 (85 FLOP/B)
# needs 8 warps for its accumulators and lost (the kernel takes it, no config lists it). Tuned only where
# G * BI <= 256 and the fp32 accumulators fit in 128 registers a thread (_sddmm_fits).
SDDMM_CONFIGS = [(64, 4, 3, 0), (128, 8, 3, 0), (64, 4, 4, 0), (32, 4, 3, 0), (64, 4, 2, 0),
                 (64, 4, 3, 1), (64, 4, 4, 1), (128, 8, 3, 1), (128, 4, 3, 1),
                 (64, 8, 3, 0), (64, 8, 3, 1), (64, 8, 2, 1), (32, 8, 3, 1),
                 (64, 4, 3, 0, 2), (64, 8, 3, 0, 2), (128, 8, 3, 0, 2), (64, 4, 2, 0, 2), (64, 4, 4, 0, 2),
                 (128, 4, 2, 0, 2), (32, 4, 3, 0, 2)]


def _dw_cfg(cfg):
    """(BM, warps, stages, tma, G) of a dW config (persisted 3- and 4-tuples predate tma and G)."""
    return (*cfg[:3], cfg[3] if len(cfg) > 3 else 0, cfg[4] if len(cfg) > 4 else 1)


def _sddmm_fits(cfg, bo, bi, dual):
    _, nw, _, _, g = _dw_cfg(cfg)
    return g == 1 or (g * bi <= 256 and (1 + dual) * bo * bi * g <= 128 * 32 * nw)


def _n_sm(device) -> int:
    if _interpret() or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sddmm(mod, sig, douts, inp, live, bo, bi, shape, dtype, memo=None):
    """dW = dout^T @ inp on the live blocks ``live`` (``_LiveBlocks``) for each dout in ``douts`` (one or two
    sharing the mask: gate and up); zeros elsewhere, written by the same kernel (``DW_FILL``). M is
    split over programs when there are too few live blocks to fill the GPU (deterministic two-pass
    reduction). ``memo``: see ``_choose``."""
    rows, dead_r, dead_c = live.rows, live.dead_r, live.dead_c
    nnz = rows.numel()
    fill = DW_FILL and nnz > 0
    outs = [(torch.empty if fill else torch.zeros)(shape, device=inp.device, dtype=dtype) for _ in douts]
    if not nnz:
        return outs
    inp = inp.contiguous()
    douts = [d.contiguous() for d in douts]
    m = inp.shape[0]
    dual = len(douts) == 2
    o2 = outs[1] if dual else None  # (pointers a kernel does not read are None: see _forward)
    DT = _tl_dtype(mod, dtype)

    def split_of(bm):
        split = max(1, min(cdiv(_hint(m), SDDMM_MIN_ROWS), cdiv(2 * _n_sm(inp.device), nnz)))
        m_per = cdiv(cdiv(m, split), bm) * bm
        if isinstance(m, torch.SymInt):  # (as many programs for every M: split * m_per >= M still holds)
            return split, m_per
        return cdiv(m, m_per), m_per

    tma_ok = _tma_ok(inp, *douts)

    def run(cfg):
        bm, nw, ns, tma, g = _dw_cfg(cfg)
        tma = bool(tma) and tma_ok and g == 1
        g_rows, g_cols = live.grouped(g)
        n_grp = g_rows.numel()
        split, m_per = split_of(bm)
        part = (torch.empty(split * len(douts) * n_grp * bo * bi * g, device=inp.device, dtype=torch.float32)
                if split > 1 else None)
        descs = _descs(tma, (douts[0], (bm, bo)), (douts[-1], (bm, bo)), (inp, (bm, bi)))
        if not dual:
            descs = (descs[0], None, descs[2])
        mod.sddmm[(n_grp, split)](douts[0], douts[1] if dual else None, douts[0].stride(0), inp, inp.stride(0),
                                  outs[0], o2,
                                  outs[0].stride(0), part, m, m_per, shape[0], shape[1], g_rows, g_cols, n_grp,
                                  *descs, dead_r, dead_c, dead_r.numel(), DTYPE=DT, BM=bm, BO=bo, BI=bi, DUAL=dual,
                                  SPLIT=split > 1, num_warps=nw, num_stages=ns, TMA=tma,
                                  FILL=DW_FILL if dead_r.numel() else 0, G=g)
        if split > 1:
            rs = min(16, bo)
            mod.sddmm_reduce[(n_grp, len(douts), bo // rs)](part, outs[0], o2, outs[0].stride(0), shape[0],
                                                            shape[1], g_rows, g_cols, n_grp, split, DTYPE=DT, BO=bo,
                                                            BI=bi, RS=rs, DUAL=dual, G=g, num_warps=4)

    def configs():
        return [c for c in _with_tma(SDDMM_CONFIGS, 1, tma_ok) if _sddmm_fits(c, bo, bi, dual)] or SDDMM_CONFIGS

    # the M split depends on the live-block count: part of the key
    cfg = tune._choose("dw2" if dual else "dw", sig, m, configs, run, shape=(*shape, nnz), memo=memo)
    run(cfg)
    if split_of(cfg[0])[0] > 1:  # (an M split does not depend on G)
        counters["blast"]["dw_split_m"] += 1
    return outs


class _LiveBlocks:
    """dW's blocks of one weight: live (rows, cols; row-major) and dead (dead_r, dead_c), int32, and
    the live ones in groups of G per block row (``grouped``, built once per G)."""

    def __init__(self, rows, cols, dead_r, dead_c):
        self.rows, self.cols, self.dead_r, self.dead_c = rows, cols, dead_r, dead_c
        self._groups = {1: (rows, cols)}

    def grouped(self, g):
        """(group rows [n], group cols [n * g]): each block row's live columns in runs of g, a short
        run padded with its first column (``sddmm`` G: the padding recomputes and rewrites that block)."""
        got = self._groups.get(g)
        if got is None:
            got = self._groups[g] = outside_graph_pool(lambda: _col_groups(self.rows, self.cols, g), self.rows.device)
        return got


def _col_groups(rows, cols, g):
    n = rows.numel()
    i = torch.arange(n, device=rows.device)
    first = torch.ones(n, dtype=torch.bool, device=rows.device)
    first[1:] = rows[1:] != rows[:-1]
    pos = i - torch.cummax(torch.where(first, i, 0), 0).values  # place in its block row
    new = pos % g == 0
    gid = torch.cumsum(new.long(), 0) - 1
    g_cols = cols[new].repeat_interleave(g).view(-1, g)  # (a new tensor: written in place below)
    g_cols[gid, pos % g] = cols
    return rows[new].contiguous(), g_cols.reshape(-1).contiguous()


def _mask_rc(plan, k, mask):
    """``_LiveBlocks`` of weight k (0 gate, 1 up, 2 down): its declared-live blocks whose hidden block
    is live in the plan, and all the others. On the others dW is exactly zero (h is provably zero
    there, or nothing reads it: dh is zero), and the backward kernel writes dA/dU/h only on live blocks."""
    key = ("dw_rc", k, id(mask), version(mask))
    rc = plan.cache.get(key)
    if rc is None:
        def build():
            p = plan.pattern
            live = torch.zeros(p.n_h, dtype=torch.bool, device=mask.device)
            live[p.hidden_live.to(mask.device).long()] = True
            on = mask & (live[None, :] if k == 2 else live[:, None])
            nz, dead = on.nonzero(), (~on).nonzero()
            return _LiveBlocks(*(t.to(torch.int32).contiguous() for t in (nz[:, 0], nz[:, 1], dead[:, 0], dead[:, 1])))

        # kept with the plan: made outside any CUDA-graph pool (see plans.outside_graph_pool)
        rc = plan.cache[key] = outside_graph_pool(build, mask.device)
    return rc


def _tied(plan, m1, m3) -> bool:
    """Gate and up declare the same mask (the sparsifier ties them): one dual dW launch."""
    if m1 is None or m3 is None:
        return False
    key = ("tied", id(m1), version(m1), id(m3), version(m3))
    t = plan.cache.get(key)
    if t is None:
        t = plan.cache[key] = m1 is m3 or (m1.shape == m3.shape and bool(torch.equal(m1, m3)))
    return t


def backward(dy2d, x2d, w1, b1, w3, b3, w2, b2, plan, activation, needs, saved=None):
    """Gradients like ``gather.backward``: dict with keys x, w1, b1, w3, b3, w2, b2 (None if not needed).

    Three launches on live blocks: ``mlp_hidden_bwd`` (recompute a/u, dh through W2, dA/dU/h),
    ``bsmm`` (dX through the transposed in-projection) and ``sddmm`` (dW, gate and up together
    when their masks are tied). A weight without a declared mask has a dense dW (computed densely).
    ``saved``: what ``forward(keep=...)`` kept (one [n, M, H] tensor, or a list of [M, H] ones): with H,
    kernel 1 does not write H again; with the pre-activations too, it reads them instead of recomputing
    (``LOAD_PRE``). Anything else than what the forward's kernels write is ignored (recomputed).
    """
    p = plan.pattern
    x2d = x2d.contiguous()
    dy2d = dy2d.contiguous()
    m, d_in = x2d.shape
    H, d_out = w1.shape[0], w2.shape[0]
    gated = w3 is not None
    sig, mod = _module(plan, activation, gated, b1 is not None, b3 is not None, x2d.dtype)
    ix = _index_tables(plan, x2d.device)
    # the kernels' weights: fp32 masters under autocast as packed x.dtype copies of the live blocks
    # (w1, w3, w2 themselves still give the dW shapes and dtypes)
    packed = any(w is not None and w.dtype != x2d.dtype for w in (w1, w3, w2))
    k1, k3, k2 = _live_copies(plan, mod, x2d.dtype, w1, w3, w2) if packed else (w1, w3, w2)
    off = _weight_tables(plan, k1, k3, k2, packed)
    s1, s2 = _strides(k1, packed), _strides(k2, packed)
    s3 = _strides(k3, packed) if gated else (0, 0)
    dw_masks = plan.dw_masks
    # dA/dU/h are written on live hidden blocks only; bias grads sum whole columns, so then the
    # dead columns must read as zero (dA, dU are zero there)
    new = torch.zeros if (needs[2] and b1 is not None) or (needs[4] and b3 is not None) else torch.empty
    da = new(m, H, device=x2d.device, dtype=x2d.dtype)
    du = new(m, H, device=x2d.device, dtype=x2d.dtype) if gated else None
    # (pointers a kernel does not read are None: see _forward)
    parts = None if saved is None else list(saved) if isinstance(saved, (list, tuple)) else list(saved.unbind(0))
    if parts is not None and (len(parts) not in (1, saved_count(2, gated)) or any(
            t is None or t.shape != (m, H) or t.dtype != x2d.dtype or not t.is_contiguous() for t in parts)):
        parts = None  # not what the forward's kernels wrote: recompute it here
    h_saved = parts[0] if parts is not None else None
    load_pre = parts is not None and len(parts) > 1
    pre_a = parts[1] if load_pre else None
    pre_u = parts[2] if load_pre and gated else None
    if load_pre:
        counters["blast"]["saved_pre_used"] += 1
    sparse_dw2 = needs[5] and dw_masks[2] is not None  # (the sddmm of dW2 reads H)
    store_h = sparse_dw2 and h_saved is None
    if h_saved is not None:
        h = h_saved
        if sparse_dw2:
            counters["blast"]["saved_hidden_used"] += 1
    else:
        h = torch.empty(m, H, device=x2d.device, dtype=x2d.dtype) if store_h else None
    n_live = ix["live"].numel()
    # Rows of x holding a NaN/Inf (one pass over x, no host sync). Eager's dense products make every pre-activation
    # of such a row NaN; kernel 1 makes the live ones NaN and the rest follows from them, except where eager's NaN
    # comes from a product with a dead block's zeros (dX's columns, the bias gradients of hidden units the
    # pattern drops): those are set here. Plain ReLU passes dH through at NaN (threshold_backward): its dA stays
    # finite, and so do dX and db1.
    flag = (~torch.isfinite(x2d).all(1)).to(torch.int32)
    da_nan = gated or activation != "relu"
    if n_live:
        k3_ = k3 if gated else k1
        tma_ok = _tma_ok(x2d, dy2d, k1, k3_, k2)

        def run(cfg):
            bm, nw, ns, var, grp = _cfg(cfg)
            early, cap = _pre_cfg(cfg)
            tma = var == BACKWARD_TMA and tma_ok
            descs = _descs(tma, (x2d, (bm, p.bd)), (k1, (p.bh, p.bd)), (k3_, (p.bh, p.bd)), (dy2d, (bm, p.bd)),
                           (k2, (p.bd, p.bh)))
            mod.mlp_hidden_bwd[(cdiv(m, bm), n_live)](
                x2d, x2d.stride(0), dy2d, dy2d.stride(0), da, du, h if store_h else None, pre_a, pre_u, da.stride(0),
                m, d_in, H, d_out, k1, off["in1"], s1[0], s1[1], b1, k3, off["in3"] if gated else None, s3[0], s3[1],
                b3,
                k2, off["dn_csc"], s2[1], s2[0],
                ix["in_rowptr"], ix["in_cols"], ix["dn_colptr"], ix["dn_rows"], ix["order_h"], *descs, flag,
                DTYPE=_tl_dtype(mod, x2d.dtype), BM=bm, BH=p.bh, BD=p.bd, NNZ=sig.nnz_in, ALIGNED=sig.aligned,
                GATED=gated, HAS_B1=b1 is not None, HAS_B3=b3 is not None, STORE_H=store_h,
                num_warps=nw, num_stages=ns, WIDE=min(var, 2), TMA=(1 + packed) if tma else 0, GROUP=grp,
                LOAD_PRE=(1 + bool(early)) if load_pre else 0, **({"maxnreg": cap} if cap else {}))

        def configs():  # (only when neither the plan's memo nor the table has the answer: not per call)
            if not load_pre:
                return _candidates(BACKWARD_CONFIGS, BACKWARD_TMA, tma_ok, m)
            pre = [c for c in BACKWARD_PRE_CONFIGS if _pre_fits(c, p.bh, gated)] or BACKWARD_PRE_CONFIGS
            return _candidates(pre, BACKWARD_TMA, tma_ok, m)

        run(tune._choose("hidden_bwd_pre" if load_pre else "hidden_bwd", sig, m, configs, run,
                    shape=(d_in, H, d_out, int(store_h)), memo=plan.cache))  # (writing H or not: tuned apart)
    grads = {}
    if needs[0]:
        grads["x"] = _bsmm(mod, sig, da, du if gated else None, k1, off["in_csc1"], (s1[1], s1[0]),
                           k3 if gated else k1, off["in_csc3"] if gated else off["in_csc1"], (s3[1], s3[0]) if gated else (s1[1], s1[0]),
                           ix["in_colptr"], ix["in_csc_rows"], ix["all_in"], p.n_in, p.bd, p.bh, H, d_in, x2d.dtype,
                           packed, memo=plan.cache, flag=flag if da_nan else None)
    dense_dw = any(needs[i] and dw_masks[k] is None for i, k in ((1, 0), (3, 1), (5, 2)) if (i != 3 or gated))
    if dense_dw:
        # a weight without a declared mask has a dense gradient (also on its zero blocks),
        # which needs every hidden unit: a dense product anyway, so compute it densely
        h_f, da_f, du_f = gather.dense_hidden_grads(dy2d, x2d, *in_dtype(x2d.dtype, w1, b1, w3, b3, w2), activation)

    def dense(dout, inp, w):
        return (dout.t() @ inp.to(dout.dtype)).to(w.dtype)

    # dW comes out in the weight's dtype (fp32 masters: no cast pass afterwards)
    if needs[5]:
        grads["w2"] = (dense(dy2d, h_f, w2) if dw_masks[2] is None
                       else _sddmm(mod, sig, [dy2d], h, _mask_rc(plan, 2, dw_masks[2]), p.bd, p.bh, w2.shape, w2.dtype,
                                   memo=plan.cache)[0])
    grads["b2"] = dy2d.sum(0) if (needs[6] and b2 is not None) else None
    need1, need3 = needs[1], gated and needs[3]
    if need1 and need3 and _tied(plan, dw_masks[0], dw_masks[1]):
        counters["blast"]["dw_tied"] += 1
        grads["w1"], grads["w3"] = _sddmm(mod, sig, [da, du], x2d, _mask_rc(plan, 0, dw_masks[0]), p.bh, p.bd, w1.shape,
                                          w1.dtype, memo=plan.cache)
    else:
        for name, need, k, dout, dout_f in (("w1", need1, 0, da, da_f if dense_dw else None),
                                            ("w3", need3, 1, du, du_f if dense_dw and gated else None)):
            if need:
                grads[name] = (dense(dout_f, x2d, w1) if dw_masks[k] is None
                               else _sddmm(mod, sig, [dout], x2d, _mask_rc(plan, k, dw_masks[k]), p.bh, p.bd, w1.shape,
                                           w1.dtype, memo=plan.cache)[0])
    any_bad = flag.any()

    def bias_grad(d):  # (a NaN row makes eager's whole sum NaN, the dropped hidden units' included)
        return torch.where(any_bad, float("nan"), d.sum(0).to(dy2d.dtype))

    grads["b1"] = (bias_grad(da) if da_nan else da.sum(0).to(dy2d.dtype)) if (needs[2] and b1 is not None) else None
    if gated:
        grads["b3"] = bias_grad(du) if (needs[4] and b3 is not None) else None
    return grads
