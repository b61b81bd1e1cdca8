"""Block-sparse formats: find the zero blocks of an MLP and index the live ones.

An MLP is described by its in-projection(s) ``W1`` (and ``W3`` for the up
projection of a gated MLP), both ``[H, D_in]``, and its down projection ``W2``
``[D_out, H]``. One block shape serves the whole MLP: ``(bh, bd)`` where ``bh``
tiles the hidden dimension (rows of W1/W3, columns of W2) and ``bd`` tiles the
model dimensions (columns of W1/W3, rows of W2). Sharing ``bh`` is what lets a
fused kernel pair hidden block ``j`` of the in-projection with block-column
``j`` of the down projection.

:class:`MLPPattern` is the runtime plan: live-block index lists for the
in-projection (CSR over hidden block-rows), the down projection (CSC over
hidden block-columns, for kernels that keep ``h_j`` on chip, and CSR over
output block-rows, for kernels that tile the output), and the list of hidden
blocks that can contribute at all. Everything is derived from the *weights*,
so the kernels read live blocks straight out of the dense tensors (block
coordinates + strides) and values are never stale.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Optional, Sequence

import torch

BLOCK_CHOICES = (16, 32, 64, 128)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_mask(w: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """``bool[ceil(O/bo), ceil(I/bi)]``: True where the block has a non-zero (or NaN) entry.

    Ragged edges are padded with zeros, so a partial block is live only if it has a
    non-zero element. NaN/Inf count as live, so they propagate as in eager.
    """
    o, i = w.shape
    ro, ri = cdiv(o, bo), cdiv(i, bi)
    nz = (w.detach() != 0)
    if ro * bo != o or ri * bi != i:
        nz = torch.nn.functional.pad(nz, (0, ri * bi - i, 0, ro * bo - o))
    return nz.reshape(ro, bo, ri, bi).any(dim=3).any(dim=1)


def expand_mask(mask: torch.Tensor, bo: int, bi: int, shape: Sequence[int]) -> torch.Tensor:
    """Element mask of ``shape`` from a block mask (the inverse of :func:`block_mask`)."""
    full = mask.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return full[: shape[0], : shape[1]]


@dataclasses.dataclass
class BlockChoice:
    """Result of detection for one MLP: the block shape and what it captures."""

    bh: int
    bd: int
    sparsity: float  # fraction of dead blocks, over all MLP weights (area weighted)
    captured: float  # fraction of the zero elements that fall in dead blocks
    density: float  # 1 - sparsity

    def as_dict(self):
        return dataclasses.asdict(self)


def _mlp_masks(w1, w3, w2, bh, bd):
    m1 = block_mask(w1, bh, bd)
    if w3 is not None:
        m1 = m1 | block_mask(w3, bh, bd)
    m2 = block_mask(w2, bd, bh)
    return m1, m2


class _MaskPyramid:
    """Non-zero map of a weight at 16x16 granularity, OR-pooled to any block shape."""

    def __init__(self, w: torch.Tensor, base: int = 16, top: int = 128):
        self.shape = tuple(w.shape)
        o, i = self.shape
        po, pi = cdiv(o, top) * top, cdiv(i, top) * top
        nz = torch.nn.functional.pad((w.detach() != 0), (0, pi - i, 0, po - o))
        self.base = base
        self.m = nz.reshape(po // base, base, pi // base, base).any(3).any(1)

    def mask(self, bo: int, bi: int) -> torch.Tensor:
        fo, fi = bo // self.base, bi // self.base
        r, c = self.m.shape
        m = self.m.reshape(r // fo, fo, c // fi, fi).any(3).any(1)
        return m[: cdiv(self.shape[0], bo), : cdiv(self.shape[1], bi)]

    def dead_area(self, bo: int, bi: int) -> int:
        """Elements of the real (unpadded) weight that lie in dead blocks."""
        m = self.mask(bo, bi)
        o, i = self.shape
        rs = torch.full((m.shape[0],), bo, dtype=torch.float64, device=m.device)
        rs[-1] = o - bo * (m.shape[0] - 1)
        cs = torch.full((m.shape[1],), bi, dtype=torch.float64, device=m.device)
        cs[-1] = i - bi * (m.shape[1] - 1)
        return int(rs @ (~m).double() @ cs)


def choose_block(
    w1: torch.Tensor,
    w3: Optional[torch.Tensor],
    w2: torch.Tensor,
    blocks: Sequence[int] = BLOCK_CHOICES,
    tolerance: float = 0.98,
) -> Optional[BlockChoice]:
    """Pick the block shape ``(bh, bd)`` that captures the zero blocks.

    Every pair from ``blocks`` is tried. A bigger block is cheaper to index and
    feeds tensor cores better, so among the shapes that capture at least
    ``tolerance`` of the best sparsity we take the one with the largest area.
    Returns None when no weight element is zero at all.
    """
    blocks = [b for b in blocks if b in BLOCK_CHOICES]
    if not blocks:
        raise ValueError(f"block sizes must be among {BLOCK_CHOICES}")
    ws = [w for w in (w1, w3, w2) if w is not None]
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w.detach() == 0).sum()) for w in ws)
    if total == 0 or zeros == 0:
        return None
    p1 = _MaskPyramid(w1 if w3 is None else (w1 != 0) | (w3 != 0))
    p2 = _MaskPyramid(w2)
    n_in = 2 if w3 is not None else 1
    results = []
    for bh in blocks:
        for bd in blocks:
            dead = p1.dead_area(bh, bd) * n_in + p2.dead_area(bd, bh)
            sp = dead / total
            results.append(BlockChoice(bh, bd, sp, dead / zeros, 1 - sp))
    best = max(r.sparsity for r in results)
    if best <= 0:
        return max(results, key=lambda r: r.bh * r.bd)
    ok = [r for r in results if r.sparsity >= tolerance * best]
    return max(ok, key=lambda r: (r.bh * r.bd, r.sparsity, r.bh))


_ACT_ZERO_AT_ZERO = {"relu": True, "relu2": True, "gelu": True, "gelu_tanh": True, "silu": True}


@dataclasses.dataclass
class MLPPattern:
    """Live-block indices of one MLP for a given block shape (int32, on one device)."""

    bh: int
    bd: int
    n_h: int  # hidden block count
    n_in: int  # input block count (columns of W1)
    n_out: int  # output block count (rows of W2)
    in_rowptr: torch.Tensor  # [n_h + 1]
    in_cols: torch.Tensor  # [nnz_in]   block-column of W1/W3 for each live block, grouped by hidden block-row
    dn_colptr: torch.Tensor  # [n_h + 1]
    dn_rows: torch.Tensor  # [nnz_dn]   block-row of W2, grouped by hidden block-column
    dn_rowptr: torch.Tensor  # [n_out + 1]
    dn_cols: torch.Tensor  # [nnz_dn]   hidden block of W2, grouped by output block-row
    hidden_live: torch.Tensor  # [n_live] hidden blocks whose h_j can be non-zero and is used
    mask_in: torch.Tensor  # bool [n_h, n_in]
    mask_dn: torch.Tensor  # bool [n_out, n_h]
    key: str  # hash of (block shape, masks): equal keys => identical pattern
    # live blocks as the weights hold them (any non-zero element; gate|up: their union), before
    # build_pattern drops hidden blocks that cannot contribute: the count sp.summary() shows too
    live_in: int = -1
    live_dn: int = -1

    @property
    def nnz_in(self) -> int:
        return int(self.in_cols.numel())

    @property
    def nnz_dn(self) -> int:
        return int(self.dn_rows.numel())

    @property
    def density(self) -> float:
        tot = self.mask_in.numel() + self.mask_dn.numel()
        return (self.nnz_in + self.nnz_dn) / max(tot, 1)

    def uniform_in_nnz(self) -> Optional[int]:
        """nnz per hidden block-row if the same for every live row (balanced sparsity)."""
        cnt = self.mask_in.sum(1)[self.hidden_live.long()]
        if cnt.numel() and bool((cnt == cnt[0]).all()):
            return int(cnt[0])
        return None

    def to(self, device) -> "MLPPattern":
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return MLPPattern(**kw)

    def summary(self) -> str:
        """Live blocks per weight (counted as ``BlastSparsifier.summary`` counts them), then what
        the kernels read once hidden blocks that cannot contribute are dropped."""
        live_in = self.live_in if self.live_in >= 0 else self.nnz_in
        live_dn = self.live_dn if self.live_dn >= 0 else self.nnz_dn
        s = (f"block {self.bh}x{self.bd}, in {live_in}/{self.mask_in.numel()} live, "
             f"down {live_dn}/{self.mask_dn.numel()} live, {self.hidden_live.numel()}/{self.n_h} hidden blocks used")
        if (live_in, live_dn) != (self.nnz_in, self.nnz_dn):
            s += f"; kernels read {self.nnz_in} + {self.nnz_dn} blocks"
        return s


def _csr(mask: torch.Tensor):
    counts = mask.sum(1, dtype=torch.int32)
    ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(counts, 0)
    cols = mask.nonzero()[:, 1].to(torch.int32)  # nonzero is row-major: grouped by row
    return ptr, cols


def pattern_key(bh: int, bd: int, mask_in: torch.Tensor, mask_dn: torch.Tensor) -> str:
    h = hashlib.sha1()
    h.update(f"{bh}x{bd}|{tuple(mask_in.shape)}|{tuple(mask_dn.shape)}|".encode())
    h.update(mask_in.to(torch.uint8).contiguous().numpy().tobytes())
    h.update(mask_dn.to(torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_pattern(
    mask_in: torch.Tensor,
    mask_dn: torch.Tensor,
    bh: int,
    bd: int,
    *,
    activation: str,
    gated: bool,
    has_b1: bool,
    has_b3: bool,
) -> MLPPattern:
    """Index the live blocks of an MLP given its block masks.

    A hidden block ``j`` is dropped (and its down column with it) when ``h_j`` is
    provably zero: its in-projection row is dead, there is no bias feeding it and
    ``act(0) == 0`` (for gated MLPs: either the gate or the up side is zero). A
    hidden block whose down column is dead is dropped too: nothing reads it.
    """
    mask_in = mask_in.cpu().bool()
    mask_dn = mask_dn.cpu().bool()
    n_h, n_in = mask_in.shape
    n_out = mask_dn.shape[0]
    row_live = mask_in.any(1)
    if gated:
        # h = act(g) * u: zero if u is zero (row dead and no up-bias); the union mask
        # covers gate and up, so a dead union row means both are 0 (+ biases).
        h_nonzero = row_live | torch.tensor(has_b3 and (has_b1 or not _ACT_ZERO_AT_ZERO[activation]))
    else:
        h_nonzero = row_live | torch.tensor(has_b1 or not _ACT_ZERO_AT_ZERO[activation])
    used = mask_dn.any(0)
    hidden_live = (h_nonzero & used).nonzero().flatten().to(torch.int32)
    keep = torch.zeros(n_h, dtype=torch.bool)
    keep[hidden_live.long()] = True
    # Dead hidden blocks: drop their rows and columns so kernels never visit them.
    # (A row kept for its bias but with no live in-blocks keeps nnz 0: the kernel
    # still computes act(bias) for it.)
    m_in = mask_in & keep[:, None]
    m_dn = mask_dn & keep[None, :]
    in_rowptr, in_cols = _csr(m_in)
    dn_colptr, dn_rows = _csr(m_dn.t())
    dn_rowptr, dn_cols = _csr(m_dn)
    return MLPPattern(
        bh=bh, bd=bd, n_h=n_h, n_in=n_in, n_out=n_out,
        in_rowptr=in_rowptr, in_cols=in_cols,
        dn_colptr=dn_colptr, dn_rows=dn_rows,
        dn_rowptr=dn_rowptr, dn_cols=dn_cols,
        hidden_live=hidden_live, mask_in=m_in, mask_dn=m_dn,
        key=pattern_key(bh, bd, m_in, m_dn), live_in=int(mask_in.sum()), live_dn=int(mask_dn.sum()),
    )


def pattern_from_weights(w1, w3, w2, bh, bd, *, activation, has_b1, has_b3) -> MLPPattern:
    m_in, m_dn = _mlp_masks(w1, w3, w2, bh, bd)
    return build_pattern(
        m_in, m_dn, bh, bd, activation=activation, gated=w3 is not None,
        has_b1=has_b1, has_b3=has_b3,
    )


def dense_flops(m: int, d_in: int, h: int, d_out: int, gated: bool) -> int:
    return 2 * m * h * d_in * (2 if gated else 1) + 2 * m * h * d_out


def block_bytes(pattern: MLPPattern, itemsize: int, gated: bool) -> int:
    per = pattern.bh * pattern.bd * itemsize
    return per * (pattern.nnz_in * (2 if gated else 1) + pattern.nnz_dn)


__all__ = [
    "BLOCK_CHOICES", "BlockChoice", "MLPPattern", "block_mask", "expand_mask",
    "choose_block", "build_pattern", "pattern_from_weights", "pattern_key", "cdiv",
    "dense_flops", "block_bytes", "math",
]
