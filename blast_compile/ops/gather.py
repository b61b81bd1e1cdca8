"""Plain-torch implementation of the fused MLP: gather the live blocks, multiply block by block.

This is the CPU kernel (and the reference the Triton kernels are checked against;
it runs on any device).

Live blocks are packed once per weight version (``pack_blocks``) into a
``[nnz, bo, bi]`` tensor; a block-sparse product is then a batched matmul of the
packed blocks against the matching slices of the input, scattered into the
output with ``index_add_``. Work is chunked over rows to bound the gathered
temporaries.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..formats import cdiv
from .activations import ACTIVATIONS, hidden_grads

_CHUNK_ELEMS = 1 << 24


def pad2(w: torch.Tensor, ro: int, ri: int) -> torch.Tensor:
    o, i = w.shape
    if o == ro and i == ri:
        return w
    return F.pad(w, (0, ri - i, 0, ro - o))


def pack_blocks(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """``[nnz, bo, bi]``: the blocks (rows[z], cols[z]) of ``w`` (zero padded at ragged edges)."""
    o, i = w.shape
    wp = pad2(w, cdiv(o, bo) * bo, cdiv(i, bi) * bi)
    wb = wp.reshape(cdiv(o, bo), bo, cdiv(i, bi), bi)
    return wb[rows.long(), :, cols.long(), :]


def rows_of(ptr: torch.Tensor, nnz: Optional[int] = None) -> torch.Tensor:
    """Block-row (int64) of each block of a CSR pointer; ``nnz`` given: no host sync (``output_size``)."""
    counts = (ptr[1:] - ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts, output_size=nnz)


def pos_table(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """long ``[n_rows, n_cols]``: the packed index of block (r, c), -1 where the layer holds none."""
    pos = torch.full((n_rows, n_cols), -1, dtype=torch.long, device=cols.device)
    pos[rows.long(), cols.long()] = torch.arange(cols.numel(), device=cols.device)
    return pos


def select_blocks(pos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  blocks: torch.Tensor) -> Optional[torch.Tensor]:
    """``blocks`` (``[nnz, bo, bi]``, indexed by ``pos``) at (rows, cols) in that order, zero where the layer
    holds no block; None when that is ``blocks`` as stored (the common case: no copy)."""
    idx = pos[rows.long(), cols.long()]
    if idx.numel() == blocks.shape[0] and bool((idx == torch.arange(idx.numel(), device=idx.device)).all()):
        return None
    padded = torch.cat([blocks.detach(), blocks.new_zeros(1, *blocks.shape[1:])])
    return padded[torch.where(idx < 0, blocks.shape[0], idx).to(blocks.device)]


def bsmm(x: torch.Tensor, packed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_out_blocks: int) -> torch.Tensor:
    """``y[M, n_out_blocks*bo] = x @ W^T`` (fp32; fp64 for fp64 ``x``) with ``W`` given by its live packed blocks.

    ``x`` is ``[M, n_in_blocks*bi]`` (already padded). Block z maps input
    block ``cols[z]`` to output block ``rows[z]``. On CPU the products run in the accumulation dtype;
    elsewhere in ``x.dtype`` (the GPU's bmm accumulates in fp32), so the blocks are not copied to fp32
    -- that copy would eat the memory compression saves.
    """
    m = x.shape[0]
    nnz, bo, bi = packed.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.new_zeros(m, n_out_blocks, bo, dtype=acc)
    if nnz == 0 or m == 0:
        return y.reshape(m, n_out_blocks * bo)  # (no -1: it cannot be inferred from 0 elements)
    cdt = acc if x.device.type == "cpu" else x.dtype
    xb = x.reshape(m, -1, bi)
    rows_l, cols_l = rows.long(), cols.long()
    pk = packed.to(cdt).transpose(1, 2)  # [nnz, bi, bo]
    step = max(1, _CHUNK_ELEMS // max(1, nnz * (bi + bo)))
    for s in range(0, m, step):
        xg = xb[s : s + step, cols_l].to(cdt).transpose(0, 1)  # [nnz, mc, bi]
        prod = torch.bmm(xg, pk)  # [nnz, mc, bo]
        y[s : s + step].index_add_(1, rows_l, prod.transpose(0, 1).to(acc))
    return y.reshape(m, n_out_blocks * bo)


class PackedMLP:
    """The live blocks of one MLP's weights, packed for the CPU kernels."""

    def __init__(self, pattern, w1, w3, w2):
        p = pattern
        self.in_rows = rows_of(p.in_rowptr)
        self.dn_rows_r = rows_of(p.dn_rowptr)  # output block-row of each down block (CSR order)
        self.p1 = pack_blocks(w1, self.in_rows, p.in_cols, p.bh, p.bd)
        self.p3 = pack_blocks(w3, self.in_rows, p.in_cols, p.bh, p.bd) if w3 is not None else None
        self.p2 = pack_blocks(w2, self.dn_rows_r, p.dn_cols, p.bd, p.bh)


def _pad_cols(x, n):
    return x if x.shape[1] == n else F.pad(x, (0, n - x.shape[1]))


def _bias(b, n, dtype):
    if b is None:
        return None
    return F.pad(b, (0, n - b.shape[0])).to(dtype)


def forward_hidden(x2d, pattern, packed: PackedMLP, b1, b3, activation):
    """Pre-activations and hidden state in fp32, padded to whole blocks: (a, u, h)."""
    p = pattern
    hp = p.n_h * p.bh
    xp = _pad_cols(x2d, p.n_in * p.bd)
    a = bsmm(xp, packed.p1, packed.in_rows, p.in_cols, p.n_h)
    if b1 is not None:
        a = a + _bias(b1, hp, a.dtype)
    act = ACTIVATIONS[activation]
    # Round like eager does: eager's linear returns x.dtype, then act runs in x.dtype.
    a_r = a.to(x2d.dtype)
    h = act(a_r)
    u = None
    if packed.p3 is not None:
        u = bsmm(xp, packed.p3, packed.in_rows, p.in_cols, p.n_h)
        if b3 is not None:
            u = u + _bias(b3, hp, u.dtype)
        u = u.to(x2d.dtype)
        h = h * u
    return a_r, u, h


def forward(x2d, pattern, packed: PackedMLP, b1, b3, b2, activation, d_out):
    p = pattern
    _, _, h = forward_hidden(x2d, pattern, packed, b1, b3, activation)
    y = bsmm(h, packed.p2, packed.dn_rows_r, p.dn_cols, p.n_out)[:, :d_out]
    if b2 is not None:
        y = y + b2
    return y.to(x2d.dtype)


def backward(dy, x2d, pattern, packed: PackedMLP, w1, b1, w3, b3, w2, b2, activation, needs, dw_masks):
    """All gradients of the fused MLP. ``dw_masks[i]`` (block masks or None) restricts dW."""
    p = pattern
    m, d_in = x2d.shape
    a, u, h = forward_hidden(x2d, pattern, packed, b1, b3, activation)
    acc = torch.float32 if dy.dtype != torch.float64 else dy.dtype
    dyp = _pad_cols(dy, p.n_out * p.bd).to(acc)
    # dh = dy @ W2 : W2^T's live blocks are W2's transposed (in -> out swapped)
    p2t = packed.p2.transpose(1, 2)
    dh = bsmm(dyp, p2t, p.dn_cols, packed.dn_rows_r, p.n_h).to(dy.dtype)
    da, du = hidden_grads(dh, a, u, activation)
    grads = {}
    H = w1.shape[0]
    if needs[0]:
        dx = bsmm(da, packed.p1.transpose(1, 2), p.in_cols, packed.in_rows, p.n_in)
        if du is not None:
            dx = dx + bsmm(du, packed.p3.transpose(1, 2), p.in_cols, packed.in_rows, p.n_in)
        grads["x"] = dx[:, :d_in].to(x2d.dtype)
    da, h = da[:, :H], h[:, :H]
    du = du[:, :H] if du is not None else None
    dense_dw = any(needs[i] and dw_masks[k] is None for i, k in ((1, 0), (3, 1), (5, 2)) if (i != 3 or w3 is not None))
    if dense_dw:
        # A weight without a declared mask has a dense gradient, also on its zero blocks,
        # and that needs every hidden unit (the pattern skips units whose output is
        # unused or provably zero). It is a dense product anyway: compute it densely.
        h_f, da_f, du_f = dense_hidden_grads(dy, x2d, w1, b1, w3, b3, w2, activation)
    pick = lambda k, sparse, full: full if (dense_dw and dw_masks[k] is None) else sparse  # noqa: E731
    if needs[5]:
        grads["w2"] = _dw(dy, pick(2, h, h_f if dense_dw else None), dw_masks[2], p.bd, p.bh)
    grads["b2"] = dy.sum(0) if (needs[6] and b2 is not None) else None
    if needs[1]:
        grads["w1"] = _dw(pick(0, da, da_f if dense_dw else None), x2d, dw_masks[0], p.bh, p.bd)
    grads["b1"] = da.sum(0).to(dy.dtype) if (needs[2] and b1 is not None) else None
    if du is not None:
        if needs[3]:
            grads["w3"] = _dw(pick(1, du, du_f if dense_dw else None), x2d, dw_masks[1], p.bh, p.bd)
        grads["b3"] = du.sum(0).to(dy.dtype) if (needs[4] and b3 is not None) else None
    return grads


def dense_hidden_grads(dy, x2d, w1, b1, w3, b3, w2, activation):
    """Dense ``(h, dL/da, dL/du)`` of the MLP, recomputing the forward (du None if not gated)."""
    a = F.linear(x2d, w1, b1)
    u = F.linear(x2d, w3, b3) if w3 is not None else None
    g = ACTIVATIONS[activation](a)
    da, du = hidden_grads(dy @ w2, a, u, activation)
    return (g * u if u is not None else g), da, du


def dense_backward(dy, x2d, w1, b1, w3, b3, w2, b2, activation, needs, dw_masks, bh, bd):
    """Every gradient of the MLP with dense products (the fallback for non-sparse plans)."""
    h, da, du = dense_hidden_grads(dy, x2d, w1, b1, w3, b3, w2, activation)
    g = {"x": None, "w1": None, "b1": None, "w3": None, "b3": None, "w2": None, "b2": None}
    if needs[0]:
        g["x"] = da @ w1 + (du @ w3 if du is not None else 0)
    if needs[1]:
        g["w1"] = _dw(da, x2d, dw_masks[0], bh, bd)
    if needs[2] and b1 is not None:
        g["b1"] = da.sum(0)
    if du is not None and needs[3]:
        g["w3"] = _dw(du, x2d, dw_masks[1], bh, bd)
    if du is not None and needs[4] and b3 is not None:
        g["b3"] = du.sum(0)
    if needs[5]:
        g["w2"] = _dw(dy, h, dw_masks[2], bd, bh)
    if needs[6] and b2 is not None:
        g["b2"] = dy.sum(0)
    return g


def _dw(dout, inp, mask, bo, bi):
    """``dout^T @ inp``; with a declared block mask only the live blocks are computed."""
    if mask is None:
        return (dout.t() @ inp.to(dout.dtype)).to(inp.dtype)
    o, i = dout.shape[1], inp.shape[1]
    live = mask.nonzero()
    r, c = live[:, 0], live[:, 1]
    do = _pad_cols(dout, mask.shape[0] * bo).reshape(dout.shape[0], mask.shape[0], bo)  # (0 rows: no -1)
    ip = _pad_cols(inp, mask.shape[1] * bi).reshape(inp.shape[0], mask.shape[1], bi)
    acc = torch.float32 if dout.dtype != torch.float64 else dout.dtype
    blocks = torch.bmm(do[:, r].to(acc).permute(1, 2, 0), ip[:, c].to(acc).transpose(0, 1))  # [nnz, bo, bi]
    full = torch.zeros(mask.shape[0], bo, mask.shape[1], bi, dtype=acc, device=dout.device)
    full[r, :, c, :] = blocks
    return full.reshape(mask.shape[0] * bo, mask.shape[1] * bi)[:o, :i].to(dout.dtype)
