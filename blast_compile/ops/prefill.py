"""Forward launchers: ``forward`` / ``forward_packed`` and the prefill path (M > ``codegen.DECODE_MAX_M``, or
training): ``mlp_hidden`` (gate and up in one program, act and product in the epilogue) writes H, then ``bsmm``
computes ``Y = H W2^T`` CSR by output block-row; both grids visit long rows first. Decode-sized calls go to
``decode.py``. Rows of x with a NaN/Inf come out all-NaN (what eager's dense product gives).
"""
from __future__ import annotations

import logging

import torch

from .. import codegen
from ..formats import cdiv
from . import configs as C
from . import tune
from .activations import in_dtype
from .launch import lowered, rows_at_most  # (lowered ops: see launch.traced)


log = logging.getLogger("blast_compile.ops")

from .decode import _count_eager_decode, _decode
from .tables import _tma_ok, _descs, _module, _static, saved_count, _live_copies


def _forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, packed, d_out, d_hidden, keep=0, flags=None):
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

    # NaN/Inf rows of x, per 256-column slice (mlp_hidden writes every slice: no fill to launch first)
    n_fl = cdiv(d_in, 256)
    if n_live:
        flag = torch.empty(n_fl, m, device=x2d.device, dtype=torch.int32)
    else:  # no hidden kernel to flag them
        n_fl, flag = 1, (~torch.isfinite(x2d).all(1)).to(torch.int32)
    if flags is not None:  # (the backward reads them instead of scanning x again: ``backward(flags=...)``)
        flags.append(flag)
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
        t = C.Tile.of(cfg)
        tma = t.variant >= C.PREFILL_TMA and tma_h
        descs = _descs(tma, (x2d, (t.bm, p.bd)), (w1, (p.bh, p.bd)), (w3 if gated else w1, (p.bh, p.bd)))
        if n_live:
            mod.mlp_hidden[(cdiv(m, t.bm), n_live)](
                x2d, x2d.stride(0), h, h.stride(0), pre_a, pre_u, flag, m, d_in, d_hidden,
                w1, off["in1"], s1[0], s1[1], b1, w3_, off3_, s3[0], s3[1], b3,
                ix.in_rowptr, ix.in_cols, ix.order_h, *descs, None, None, 0, 0,
                BM=t.bm, BS=p.bh, num_warps=t.num_warps, num_stages=t.num_stages, STORE_PRE=n_saved > 1, SCAN=3,
                WIDE=min(t.variant, 1) and gated,
                TMA=(1 + packed) if tma else 0, GROUP=t.group, **common)

    def h_configs():  # (wide tiles in the in-projection are for the gated kernel: gate|up side by side)
        cs = C.PREFILL_CONFIGS if gated else list(dict.fromkeys(
            t._replace(variant=t.variant if t.variant >= C.PREFILL_TMA else 0)
            for t in map(C.Tile.of, C.PREFILL_CONFIGS)))
        return C._candidates(cs, C.PREFILL_TMA, tma_h, m)

    run_h(tune._choose("hidden", sig, m, h_configs, run_h, shape=(d_in, d_hidden, d_out) + ((1,) * (n_saved > 1)),
                  memo=plan.cache))  # (storing a, u or not: tuned apart)

    tma_y = st.tma_dn and _tma_ok(h)

    def run_y(cfg):
        t = C.Tile.of(cfg)
        tma = t.variant >= C.PREFILL_TMA and tma_y
        hd, wd = _descs(tma, (h, (t.bm, p.bh)), (w2, (p.bd, p.bh)))
        mod.bsmm[(cdiv(m, t.bm), p.n_out)](
            h, h.stride(0), None, y, y.stride(0), b2, flag, n_fl, m, d_hidden, d_out,
            w2, off["dn_csr"], s2[0], s2[1], None, None, s2[0], s2[1],
            ix.dn_rowptr, ix.dn_cols, ix.order_o, hd, None, wd, None,
            DTYPE=DT, BO=p.bd, BI=p.bh, BS=p.bd, ALIGNED=sig.aligned, HAS_B=b2 is not None, DUAL=False,
            NANROW=3, BM=t.bm, num_warps=t.num_warps, num_stages=t.num_stages, WIDE=min(t.variant, 1),
            TMA=(1 + packed) if tma else 0, GROUP=t.group)

    run_y(tune._choose("down", sig, m, lambda: C._candidates(C.PREFILL_CONFIGS, C.PREFILL_TMA, tma_y, m), run_y,
                  shape=(d_in, d_hidden, d_out), memo=plan.cache))
    return (y, saved[:n_saved] if isinstance(saved, list) else saved) if keep else y


def forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, keep=0, copies=None, flags=None):
    """``[M, d_out]`` in x2d.dtype; weights are the dense ``[out, in]`` tensors (any strides).
    ``keep`` 1 / 2: ``(y, S)``, what the backward reads instead of recomputing (see ``_forward``).
    For the backward to read instead of redoing (``backward(copies=..., flags=...)``): ``copies``, a list that
    gets the packed x.dtype copies of fp32 master weights (left empty when the weights are used as they are);
    ``flags``, a list that gets x's NaN/Inf row flags ([slices, M] int32; left empty at decode sizes)."""
    if any(w is not None and w.dtype != x2d.dtype for w in (w1, w3, w2)):  # fp32 masters under autocast
        _, mod = _module(plan, activation, w3 is not None, b1 is not None, b3 is not None, x2d.dtype)
        p1, p3, p2 = _live_copies(plan, mod, x2d.dtype, w1, w3, w2)
        if copies is not None:
            copies.extend((p1, p3, p2))
        return _forward(x2d, p1, b1, p3, b3, p2, b2, plan, activation, True, w2.shape[0], w1.shape[0], keep, flags)
    return _forward(x2d, w1, b1, w3, b3, w2, b2, plan, activation, False, w2.shape[0], w1.shape[0], keep, flags)


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
