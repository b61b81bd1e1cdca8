"""Launch-config spaces of the generated kernels and the switches tests and benchmarks flip.

Every launcher reads these through the module (``configs.PREFILL_CONFIGS``), at call time, so that setting one
here (``monkeypatch.setattr(configs, ...)``) changes what runs. The first entry of each list is the untuned default.
"""
from __future__ import annotations

from typing import NamedTuple

from ..formats import cdiv
from .tune import _hint


def _of(cls, cfg):
    """``cfg`` as a ``cls`` record: a list entry, a tuple a test sets, or one persisted before a field existed
    (the missing trailing fields take their defaults)."""
    return cfg if isinstance(cfg, cls) else cls(*cfg)


class SplitK(NamedTuple):
    """A split-K decode config (``mlp_decode_in`` + ``mlp_decode_dn``)."""
    in_blocks: int  # live in-blocks per kernel-1 program
    dn_blocks: int  # live down blocks per kernel-2 program
    num_warps: int
    early: int  # kernel 2: 0 launched after kernel 1, 1 launched early (PDL), 2 early and prefetching W2 into L2
    of = classmethod(_of)


class Slice(NamedTuple):
    """A sliced-decode config, for either of its kernels (``mlp_hidden`` / ``bsmm`` on one M tile)."""
    rows: int  # rows of a weight block per program (BS)
    blocks: int  # blocks per unrolled step (CH)
    num_warps: int
    num_stages: int
    split: int = 1  # bsmm only: programs sharing a row slice's reduction (SPLIT)
    of = classmethod(_of)


class Tile(NamedTuple):
    """A prefill or backward config: M tiles of ``bm`` rows."""
    bm: int
    num_warps: int
    num_stages: int
    variant: int = 0  # 0 pointer loads; 1 (2) wide steps; PREFILL_TMA / BACKWARD_TMA / TWO_LOOPS: TMA tiles
    group: int = 0  # M tiles per program group (0: launch order)
    early: int = 0  # backward reading the pre-activations: a and u loaded before the dh loop
    maxnreg: int = 0  # register cap (ptxas maxnreg; 0: none)
    of = classmethod(_of)


class DwTile(NamedTuple):
    """A dW (``sddmm``) config."""
    bm: int  # M rows per step
    num_warps: int
    num_stages: int
    variant: int = 0  # 1: tiles loaded by TMA
    blocks: int = 1  # live blocks of a block row per program (G)
    of = classmethod(_of)


def _records(cls, configs):
    return [cls.of(c) for c in configs]


# small tuning spaces; the first entry is the untuned default
# split-K decode (``SplitK``)
# (small chunks on few warps win: more programs = more blocks in flight and shorter serial tails; whether
# PDL and the prefetch pay depends on the shape and M, so they are tuned too; 4-block chunks spill registers.
# Measurements: NOTES_KERNELS.md, docs/history.md)
DECODE_CONFIGS = _records(SplitK, [(1, 1, 2, 2), (1, 1, 2, 1), (1, 1, 2, 0), (1, 1, 1, 2), (1, 1, 1, 1), (1, 1, 1, 0),
                                   (2, 1, 2, 1), (2, 2, 2, 1)])
# sliced decode (``Slice``), tuned separately for both kernels
# (2 stages, not 1: Triton's pipeliner then issues the next step's loads early; the list is the winners of a
# sweep over many signatures, where 16-row slices won almost everywhere)
DECODE_SLICE_CONFIGS = _records(Slice, [(16, 4, 4, 2), (16, 1, 4, 3), (16, 2, 4, 2), (16, 4, 8, 2), (32, 4, 4, 2),
                                        (16, 8, 4, 2), (32, 1, 4, 3), (16, 4, 4, 3)])
# ... the sliced bsmm with each row slice's reduction split over programs (``Slice.split``): a short output dimension
# (64 block rows at 8B) otherwise gives kernel 2 a fraction of a wave (BENCHMARKS.md, "Decode against its byte
# floor": it wins at M = 8-16 where the output dimension is short). Weighed with the others unless DECODE_SPLIT_Y
# is off
DECODE_SPLIT_CONFIGS = _records(Slice, [(16, 4, 4, 2, 2), (16, 2, 4, 2, 4), (16, 4, 4, 2, 4), (16, 1, 4, 3, 4),
                                        (16, 2, 4, 2, 8)])
DECODE_SPLIT_Y = True


def decode_y_configs():
    """The sliced decode's ``bsmm`` configs the tuner weighs."""
    return DECODE_SLICE_CONFIGS + (DECODE_SPLIT_CONFIGS if DECODE_SPLIT_Y else [])

# prefill (``Tile``); variant 1, wide: one 128-wide gate|up dot per step, and two live
# blocks (or dA|dU) per down/dX step -- K = 128 (template: _in_proj_wide, _bsmm_step_wide)
# (1-2 stages: at small d most hidden blocks have one live in-block, so a program is one step and
# the pipeline's shared memory only caps how many programs share an SM)
# variant PREFILL_TMA: every tile loaded by TMA (Hopper+, 16-bit, 16-byte aligned rows; else the
# wide variant runs instead; bench/probes/tma_probe.py measured it: TMA tiles like 128 rows on 4 warps)
PREFILL_TMA = 2
PREFILL_CONFIGS = _records(Tile, [(64, 4, 3, 0), (128, 8, 3, 0), (64, 4, 4, 0), (128, 4, 3, 0), (128, 8, 4, 0),
                                  (256, 8, 3, 0), (64, 4, 2, 0), (64, 4, 3, 1), (128, 8, 3, 1), (128, 4, 3, 1),
                                  (128, 8, 4, 1), (256, 8, 2, 1), (64, 4, 2, 1), (64, 4, 1, 1), (32, 4, 2, 1),
                                  (128, 4, 3, 2), (128, 4, 2, 2), (64, 4, 2, 2), (64, 4, 3, 2), (128, 8, 2, 2),
                                  (256, 8, 3, 2), (64, 4, 1, 2), (128, 8, 1, 2)])
# backward kernel 1 (three fp32 [BM, BH] tiles live at once: a/u, dh; no 256-row tiles; at 128-wide
# blocks only 8 warps hold them and 3 stages do not fit: the (64, 8, 2) configs)
# wide 1: 128-wide gate|up recompute; 2: also 2-block dh steps; BACKWARD_TMA: both loops by TMA
BACKWARD_TMA = 3
BACKWARD_CONFIGS = _records(Tile, [(64, 4, 3, 0), (64, 4, 2, 0), (128, 8, 3, 0), (64, 8, 3, 0), (64, 4, 3, 1),
                                   (64, 4, 4, 1), (128, 8, 3, 1), (64, 4, 3, 2), (128, 8, 3, 2), (64, 4, 2, 1),
                                   (64, 4, 1, 1), (64, 4, 2, 2), (32, 4, 2, 1), (64, 4, 3, 3), (64, 4, 2, 3),
                                   (128, 8, 3, 3), (128, 8, 2, 3), (64, 8, 3, 3), (64, 8, 2, 0), (64, 8, 2, 1),
                                   (64, 8, 2, 3), (64, 4, 1, 3), (64, 8, 1, 3), (128, 8, 1, 3)])
# Every prefill/backward config with wide or TMA tiles is also tuned with its programs grouped
# (``group``: M tiles per group, GROUP_ROWS rows; template ``_tile``): a wave of programs then
# shares a few M tiles of activations in L2 instead of reading every M tile's. Measured per kernel
# by ``bench/tiles.py`` (grouped and launch-order timings of one config side by side): it pays most for
# the down projection, dX and backward kernel 1 at large M (NOTES_KERNELS.md).
GROUP_ROWS = 512


def _grouped(configs):
    configs = _records(Tile, configs)
    return configs + [c._replace(group=GROUP_ROWS // c.bm) for c in configs if c.variant and GROUP_ROWS // c.bm > 1]


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


# ... each also with a and u loaded before the dh loop (``early``: template LOAD_PRE 2) where holding
# them costs <= 64 registers a thread (_pre_fits): at 64-wide blocks the loop is ~6 short steps and
# the loads after it wait on HBM with nothing else to do.
# ``maxnreg``: a register cap (ptxas maxnreg) for [64, 64] tiles: the kernel is latency-bound, and 96
# registers (some spilled) let 5 programs share an SM instead of 3 (168 and 128 gained nothing). Lowered ops
# drop the cap (Inductor cannot pass it): their warm-up tunes without it too.
BACKWARD_PRE_CONFIGS = (BACKWARD_PRE_CONFIGS + [c._replace(early=1) for c in BACKWARD_PRE_CONFIGS]
                        + [Tile(64, 4, 2, 3, group=8, early=1, maxnreg=96),
                           Tile(64, 4, 2, 3, group=16, early=1, maxnreg=96), Tile(64, 4, 2, 3, group=8, maxnreg=96)])


def _pre_fits(cfg, bh, gated):
    """Whether a LOAD_PRE config is worth tuning at hidden blocks of bh (see above). Never where the
    epilogue's three fp32 [BM, bh] tiles (dh, a, u) alone overflow 255 registers a thread: those spill
    kilobytes (offline ptxas) and ran 2-3x slower (NOTES_KERNELS.md)."""
    t = Tile.of(cfg)
    return (3 * t.bm * bh <= 255 * 32 * t.num_warps
            and (not t.early or t.bm * bh * (1 + gated) <= 64 * 2 * 32 * t.num_warps)
            and (not t.maxnreg or t.bm * bh <= 64 * 64))


def _for_m(configs, m):
    """The configs worth timing at M rows: a group holding every M tile is the launch order, so such a
    grouped config would only repeat its launch-order twin (never empty: a forced list stays)."""
    return [c for c in configs if (t := Tile.of(c)).group < cdiv(_hint(m), t.bm)] or configs


def _with_tma(configs, var, ok, cls=Tile):
    """The configs to tune over: without TMA its variants (``var`` and above) would only repeat the wide ones.
    ``cls``: the configs' record (``Tile``, or ``DwTile`` for dW, whose TMA variant is 1)."""
    return [c for c in configs if cls.of(c).variant < var or ok] or configs


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
DECODE_GEMV_CONFIGS = _records(SplitK, [(1, 1, 2, 2), (1, 1, 2, 1), (1, 1, 2, 0), (1, 1, 1, 2), (1, 1, 1, 0),
                                        (1, 1, 4, 2), (2, 1, 4, 2), (2, 1, 2, 1)])

# decode path: "" (the fastest of sliced, split-K and sliced with W2 prefetched by kernel 1, timed once per shape;
# an exported graph: of the sliced two), "sliced", "splitk" or "sliced_pf" (tests, comparisons)
# PDL: programmatic dependent launch where the GPU has it (False: never)
DECODE_PATH = ""
PDL = True

# decode calls of one MLP outside CUDA-graph capture before we say that decode runs without graphs
EAGER_DECODE_WARN = 256


SDDMM_MIN_ROWS = 256  # an M split of dW is at least this many rows
# the dW kernel writes the zeros of the dead blocks too (template ``sddmm``, FILL: 1 before its products,
# 2 a few rows per step); 0: a torch.zeros pass before it (tests compare them; 2 is the fastest: NOTES_KERNELS.md)
DW_FILL = 2
# dW (``DwTile``): tma 1 loads the tiles by TMA (as PREFILL_TMA)
# (8 warps with 32/64-row steps: at 128x128 blocks the 128-row steps overflow shared memory and 4 warps
# spill two [128, 128] fp32 accumulators)
# ``blocks`` G: G live blocks of a block row per program (template ``sddmm``; pointer loads, tma 0).
# At 64x64 blocks a one-block program is L2-bound: each step loads as many activation bytes as it
# multiplies by (~43 FLOP/B dual); G = 2 shares the dout tile over 2 blocks (64 FLOP/B). G = 4 (85 FLOP/B)
# needs 8 warps for its accumulators and lost (the kernel takes it, no config lists it). Tuned only where
# G * BI <= 256 and the fp32 accumulators fit in 128 registers a thread (_sddmm_fits).
SDDMM_CONFIGS = _records(DwTile, [(64, 4, 3, 0), (128, 8, 3, 0), (64, 4, 4, 0), (32, 4, 3, 0), (64, 4, 2, 0),
                                  (64, 4, 3, 1), (64, 4, 4, 1), (128, 8, 3, 1), (128, 4, 3, 1), (64, 8, 3, 0),
                                  (64, 8, 3, 1), (64, 8, 2, 1), (32, 8, 3, 1), (64, 4, 3, 0, 2), (64, 8, 3, 0, 2),
                                  (128, 8, 3, 0, 2), (64, 4, 2, 0, 2), (64, 4, 4, 0, 2), (128, 4, 2, 0, 2),
                                  (32, 4, 3, 0, 2)])


def _sddmm_fits(cfg, bo, bi, dual):
    t = DwTile.of(cfg)
    return t.blocks == 1 or (t.blocks * bi <= 256 and (1 + dual) * bo * bi * t.blocks <= 128 * 32 * t.num_warps)
