"""Backward launchers: ``mlp_hidden_bwd`` recomputes the pre-activations (or reads them where the training
forward kept them) and gets dH through W2's transposed live blocks in one kernel; dX goes through W1/W3's
(``bsmm`` with swapped strides); dW densely (torch matmul) or, for declared masks, on the live blocks only
(``sddmm``).
"""
from __future__ import annotations

import logging

import torch
from torch._dynamo.utils import counters

from ..formats import cdiv
from . import configs as C
from . import gather, tune
from .tune import _hint
from .activations import in_dtype
from .plans import version

log = logging.getLogger("blast_compile.ops")

from .tables import outside_graph_pool, _index_tables, _weight_tables, _strides, _tma_ok, _descs, _module, _tl_dtype, saved_count, _n_sm, _live_copies


# --- backward ---------------------------------------------------------------------------------------

def _bsmm(mod, sig, x, x2, w, off, sw, wb, offb, swb, rowptr, idx, order, n_out_blocks, bo, bi, n_in, n_out,
          out_dtype, packed, memo=None, flag=None, flag_layout=1):
    """out = X W^T (+ X2 W2^T) through live blocks (backward: dX), config tuned per signature, shape and M
    (``memo``: the plan's cache, see ``_choose``); rows with ``flag`` set come out NaN (``flag_layout`` 1: one
    flag per row; 3: the forward's [slices, M])."""
    m = x.shape[0]
    out = torch.empty(m, n_out, device=x.device, dtype=out_dtype)
    x2 = x if x2 is None else x2
    # TMA here reads W's blocks as stored, [bi, bo] (the transposed pattern: swapped strides, sw[0] == 1)
    tma_ok = sw[0] == 1 and swb[0] == 1 and _tma_ok(x, x2, w, wb)

    dual = x2 is not x

    def run(cfg):
        t = C.Tile.of(cfg)
        tma = t.variant >= C.PREFILL_TMA and tma_ok
        descs = _descs(tma, (x, (t.bm, bi)), (x2, (t.bm, bi)), (w, (bi, bo)), (wb, (bi, bo)))
        if not dual:  # (the second operand's pointers are not read: None, see _forward)
            descs = (descs[0], None, descs[2], None)
        mod.bsmm[(cdiv(m, t.bm), n_out_blocks)](
            x, x.stride(0), x2 if dual else None, out, out.stride(0), None, flag,
            flag.shape[0] if flag is not None and flag_layout == 3 else 0, m, n_in, n_out,
            w, off, sw[0], sw[1], wb if dual else None, offb if dual else None, swb[0], swb[1], rowptr, idx, order,
            *descs,
            DTYPE=_tl_dtype(mod, out_dtype), BO=bo, BI=bi, BS=bo, ALIGNED=sig.aligned, HAS_B=False,
            DUAL=dual, NANROW=flag_layout if flag is not None else 0, BM=t.bm, num_warps=t.num_warps,
            num_stages=t.num_stages,
            WIDE=min(t.variant, 1), TMA=(3 + packed) if tma else 0, GROUP=t.group, TWO_LOOPS=t.variant == C.TWO_LOOPS,
            TR=sig.tnsp_fix)

    run(tune._choose("dx_dual" if dual else "dx", sig, m,
                lambda: C._candidates(C.PREFILL_CONFIGS + C.DX_CONFIGS if dual else C.PREFILL_CONFIGS, C.PREFILL_TMA, tma_ok, m),
                run, shape=(n_in, n_out), memo=memo))
    return out


def _sddmm(mod, sig, douts, inp, live, bo, bi, shape, dtype, memo=None):
    """dW = dout^T @ inp on the live blocks ``live`` (``_LiveBlocks``) for each dout in ``douts`` (one or two
    sharing the mask: gate and up); zeros elsewhere, written by the same kernel (``DW_FILL``). M is
    split over programs when there are too few live blocks to fill the GPU (deterministic two-pass
    reduction). ``memo``: see ``_choose``."""
    rows, dead_r, dead_c = live.rows, live.dead_r, live.dead_c
    nnz = rows.numel()
    fill = C.DW_FILL and nnz > 0
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
        split = max(1, min(cdiv(_hint(m), C.SDDMM_MIN_ROWS), cdiv(2 * _n_sm(inp.device), nnz)))
        m_per = cdiv(cdiv(m, split), bm) * bm
        if isinstance(m, torch.SymInt):  # (as many programs for every M: split * m_per >= M still holds)
            return split, m_per
        return cdiv(m, m_per), m_per

    tma_ok = _tma_ok(inp, *douts)

    def run(cfg):
        bm, nw, ns, tma, g = C.DwTile.of(cfg)  # (g: live blocks of a block row per program)
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
                                  FILL=C.DW_FILL if dead_r.numel() else 0, G=g)
        if split > 1:
            rs = min(16, bo)
            mod.sddmm_reduce[(n_grp, len(douts), bo // rs)](part, outs[0], o2, outs[0].stride(0), shape[0],
                                                            shape[1], g_rows, g_cols, n_grp, split, DTYPE=DT, BO=bo,
                                                            BI=bi, RS=rs, DUAL=dual, G=g, num_warps=4)

    def configs():
        return [c for c in C._with_tma(C.SDDMM_CONFIGS, 1, tma_ok, C.DwTile) if C._sddmm_fits(c, bo, bi, dual)
                ] or C.SDDMM_CONFIGS

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


def _copies_fit(copies, plan, ix, dtype, gated) -> bool:
    """``copies`` have ``_live_copies``' layout for this plan and ``dtype`` (its index tables ``ix``)."""
    if not copies or len(copies) != 3 or copies[0] is None or copies[2] is None or (copies[1] is None) == gated:
        return False
    p, n_in, n_dn = plan.pattern, ix.in_rows.numel(), ix.dn_rows_r.numel()
    shapes = ((n_in, p.bh, p.bd), (n_in, p.bh, p.bd), (n_dn, p.bd, p.bh))
    return all(c is None or (tuple(c.shape) == s and c.dtype == dtype and c.is_contiguous())
               for c, s in zip(copies, shapes))


def backward(dy2d, x2d, w1, b1, w3, b3, w2, b2, plan, activation, needs, saved=None, copies=None, flags=None):
    """Gradients like ``gather.backward``: dict with keys x, w1, b1, w3, b3, w2, b2 (None if not needed).

    Three launches on live blocks: ``mlp_hidden_bwd`` (recompute a/u, dh through W2, dA/dU/h),
    ``bsmm`` (dX through the transposed in-projection) and ``sddmm`` (dW, gate and up together
    when their masks are tied). A weight without a declared mask has a dense dW (computed densely).
    ``saved``: what ``forward(keep=...)`` kept (one [n, M, H] tensor, or a list of [M, H] ones): with H,
    kernel 1 does not write H again; with the pre-activations too, it reads them instead of recomputing
    (``LOAD_PRE``). Anything else than what the forward's kernels write is ignored (recomputed).
    ``copies``: the forward's packed copies of fp32 master weights (``forward(copies=...)``), read instead of
    packing them again when they are what this call would pack. ``flags``: the forward's NaN/Inf row flags of
    x (``forward(flags=...)``: [slices, M] int32), read instead of scanning x again.
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
    if not packed:
        k1, k3, k2 = w1, w3, w2
    elif _copies_fit(copies, plan, ix, x2d.dtype, gated):
        k1, k3, k2 = copies
        counters["blast"]["packed_copies_reused"] += 1
    else:
        k1, k3, k2 = _live_copies(plan, mod, x2d.dtype, w1, w3, w2)
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
    n_live = ix.live.numel()
    # Rows of x holding a NaN/Inf (one pass over x, no host sync). Eager's dense products make every pre-activation
    # of such a row NaN; kernel 1 makes the live ones NaN and the rest follows from them, except where eager's NaN
    # comes from a product with a dead block's zeros (dX's columns, the bias gradients of hidden units the
    # pattern drops): those are set here. Plain ReLU passes dH through at NaN (threshold_backward): its dA stays
    # finite, and so do dX and db1.
    if flags is not None and flags.dim() == 2 and flags.shape[1] == m and flags.dtype == torch.int32:
        flag, layout = flags, 3  # (the forward's kernel wrote them for this x: no scan launched here)
        counters["blast"]["forward_flags_reused"] += 1
    else:
        flag, layout = (~torch.isfinite(x2d).all(1)).to(torch.int32), 1
    da_nan = gated or activation != "relu"
    if n_live:
        k3_ = k3 if gated else k1
        tma_ok = _tma_ok(x2d, dy2d, k1, k3_, k2)

        def run(cfg):
            t = C.Tile.of(cfg)
            tma = t.variant == C.BACKWARD_TMA and tma_ok
            descs = _descs(tma, (x2d, (t.bm, p.bd)), (k1, (p.bh, p.bd)), (k3_, (p.bh, p.bd)), (dy2d, (t.bm, p.bd)),
                           (k2, (p.bd, p.bh)))
            mod.mlp_hidden_bwd[(cdiv(m, t.bm), n_live)](
                x2d, x2d.stride(0), dy2d, dy2d.stride(0), da, du, h if store_h else None, pre_a, pre_u, da.stride(0),
                m, d_in, H, d_out, k1, off["in1"], s1[0], s1[1], b1, k3, off["in3"] if gated else None, s3[0], s3[1],
                b3,
                k2, off["dn_csc"], s2[1], s2[0],
                ix.in_rowptr, ix.in_cols, ix.dn_colptr, ix.dn_rows, ix.order_h, *descs, flag, flag.shape[0],
                DTYPE=_tl_dtype(mod, x2d.dtype), BM=t.bm, BH=p.bh, BD=p.bd, NNZ=sig.nnz_in, ALIGNED=sig.aligned,
                GATED=gated, HAS_B1=b1 is not None, HAS_B3=b3 is not None, STORE_H=store_h,
                num_warps=t.num_warps, num_stages=t.num_stages, WIDE=min(t.variant, 2), TMA=(1 + packed) if tma else 0,
                GROUP=t.group, LOAD_PRE=(1 + bool(t.early)) if load_pre else 0, FLAG=layout,
                **({"maxnreg": t.maxnreg} if t.maxnreg else {}))

        def configs():  # (only when neither the plan's memo nor the table has the answer: not per call)
            if not load_pre:
                return C._candidates(C.BACKWARD_CONFIGS, C.BACKWARD_TMA, tma_ok, m)
            pre = [c for c in C.BACKWARD_PRE_CONFIGS if C._pre_fits(c, p.bh, gated)] or C.BACKWARD_PRE_CONFIGS
            return C._candidates(pre, C.BACKWARD_TMA, tma_ok, m)

        run(tune._choose("hidden_bwd_pre" if load_pre else "hidden_bwd", sig, m, configs, run,
                    shape=(d_in, H, d_out, int(store_h)), memo=plan.cache))  # (writing H or not: tuned apart)
    grads = {}
    if needs[0]:
        grads["x"] = _bsmm(mod, sig, da, du if gated else None, k1, off["in_csc1"], (s1[1], s1[0]),
                           k3 if gated else k1, off["in_csc3"] if gated else off["in_csc1"], (s3[1], s3[0]) if gated else (s1[1], s1[0]),
                           ix.in_colptr, ix.in_csc_rows, ix.all_in, p.n_in, p.bd, p.bh, H, d_in, x2d.dtype,
                           packed, memo=plan.cache, flag=flag if da_nan else None, flag_layout=layout)
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
