"""What every launcher shares: the device index tables of a plan, the per-weight block offset tables, the
generated module of a signature, TMA descriptors, and the per-(plan, weights) record ``_Static``.

Per plan (``plan.cache``) we keep the device index tables: the CSR/CSC lists, long-rows-first orders, and
per-weight block offset tables (element offset of each live block; in-block strides are passed per call). Dense
weights (any strides) and packed ``[nnz, bo, bi]`` weights differ only in these offsets. All tables are built on
the first call; later calls do no host syncs, so CUDA graphs can capture them.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from torch import Tensor

from .. import codegen
from . import configs as C
from . import launch
from .tune import _interpret
from .launch import lowered, traced  # (lowered ops: see launch.traced)
from .plans import outside_graph_pool as _pool

log = logging.getLogger("blast_compile.ops")

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def outside_graph_pool(fn, device):
    """``plans.outside_graph_pool``; while tracing, plan state can only come from the op's inputs."""
    if traced():
        raise RuntimeError("blast: a lowered op needs plan state its compile-time warm-up did not build")
    return _pool(fn, device)


# --- per-plan tables ----------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class DeviceTables:
    """A pattern's index lists on the device, as the kernels read them (``formats.MLPPattern`` keeps the host
    copy): int32, except the int64 ones that torch uses as gather indices (``_INT64``). One per plan, built on
    its first call (no host syncs later, so CUDA graphs can capture the calls)."""

    in_rowptr: Tensor  # CSR of the in-projection: live in-blocks per hidden block row
    in_cols: Tensor
    in_rows: Tensor  # hidden block row of each CSR in-block
    live: Tensor  # the hidden block rows that are computed
    order_h: Tensor  # ... longest first (the prefill/backward grids visit long rows first)
    all_h: Tensor  # 0 .. n_h - 1
    dn_colptr: Tensor  # CSC of the down projection: live blocks per hidden block column
    dn_rows: Tensor
    csc_dn_cols: Tensor  # hidden column of each CSC down block
    csc_dn_pos: Tensor  # CSR position of each CSC down block (packed weights are stored in CSR order)
    dn_rowptr: Tensor  # CSR of the down projection: live blocks per output block row
    dn_cols: Tensor
    dn_rows_r: Tensor  # output row of each CSR down block
    order_o: Tensor  # output block rows, longest first
    in_colptr: Tensor  # CSC of the in-projection (for dX)
    in_csc_rows: Tensor
    in_csc_cols: Tensor
    in_csc_pos: Tensor  # CSR position of each CSC in-block
    all_in: Tensor  # 0 .. n_in - 1

    _INT64 = ("in_rows", "dn_rows_r", "csc_dn_cols", "csc_dn_pos", "in_csc_cols", "in_csc_pos")

    @classmethod
    def build(cls, p, device) -> "DeviceTables":
        """From the host pattern ``p`` (a CPU copy: no device syncs while building)."""
        in_cnt = (p.in_rowptr[1:] - p.in_rowptr[:-1]).long()
        in_rows = torch.repeat_interleave(torch.arange(p.n_h), in_cnt)
        live = p.hidden_live.long()
        order_h = live[torch.argsort(in_cnt[live], descending=True, stable=True)]
        dn_cnt = (p.dn_rowptr[1:] - p.dn_rowptr[:-1]).long()
        order_o = torch.argsort(dn_cnt, descending=True, stable=True)
        dn_rows_r = torch.repeat_interleave(torch.arange(p.n_out), dn_cnt)
        pos_dn = torch.full((p.n_out, p.n_h), -1, dtype=torch.long)
        pos_dn[dn_rows_r, p.dn_cols.long()] = torch.arange(p.nnz_dn)
        csc_dn_cols = torch.repeat_interleave(torch.arange(p.n_h), (p.dn_colptr[1:] - p.dn_colptr[:-1]).long())
        csc_dn_pos = pos_dn[p.dn_rows.long(), csc_dn_cols]
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
        return cls(**{k: v.to(device, torch.int64 if k in cls._INT64 else torch.int32) for k, v in host.items()})


def _index_tables(plan, device) -> DeviceTables:
    t = plan.cache.get("index")
    if t is None:
        t = plan.cache["index"] = DeviceTables.build(plan.pattern, device)
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
        t["in" + name] = _offsets(ix, ix.in_rows, ix.in_cols.long(), bh, bd, w.stride(), pk)
        t["in_csc" + name] = _offsets(ix, ix.in_csc_rows, ix.in_csc_cols, bh, bd, w.stride(),
                                      ix.in_csc_pos if packed else None)
    t["dn_csc"] = _offsets(ix, ix.dn_rows.long(), ix.csc_dn_cols, bd, bh, w2.stride(),
                           ix.csc_dn_pos if packed else None)
    t["dn_csr"] = _offsets(ix, ix.dn_rows_r, ix.dn_cols.long(), bd, bh, w2.stride(), ar_dn if packed else None)
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
    if not C.TMA or TensorDescriptor is None or lowered():
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
    st.n_live = st.ix.live.numel()
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


def _live_copies(plan, mod, dtype, w1, w3, w2):
    """Packed ``dtype`` copies of the live blocks (``forward_packed``'s layout), one launch for the three
    weights: fp32 master weights under autocast are cast once per call, not per M tile on load (and each
    launch is host time in a default-mode training step)."""
    p = plan.pattern
    ix = _index_tables(plan, w1.device)
    off = _weight_tables(plan, w1, w3, w2, False)
    n_in, n_dn = ix.in_rows.numel(), ix.dn_rows_r.numel()
    gated = w3 is not None
    p1 = torch.empty(n_in, p.bh, p.bd, device=w1.device, dtype=dtype)
    p3 = torch.empty(n_in, p.bh, p.bd, device=w1.device, dtype=dtype) if gated else None
    p2 = torch.empty(n_dn, p.bd, p.bh, device=w1.device, dtype=dtype)
    grid = n_in * (2 if gated else 1) + n_dn
    if grid:
        # (not gated: W1 stands in for W3 and its copy, read and written by no program)
        w3_, off3, p3_ = (w3, off["in3"], p3) if gated else (w1, off["in1"], w1)
        mod.pack_blocks[(grid,)](w1, off["in1"], w1.stride(0), w1.stride(1), w3_, off3, w3_.stride(0), w3_.stride(1),
                                 ix.in_rows, ix.in_cols, n_in, w1.shape[0], w1.shape[1], p1, p3_,
                                 w2, off["dn_csr"], w2.stride(0), w2.stride(1), ix.dn_rows_r, ix.dn_cols, w2.shape[0],
                                 p2, BH=p.bh, BD=p.bd, GATED=gated, num_warps=4)
    return [p1, p3, p2]


def _n_sm(device) -> int:
    if _interpret() or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
