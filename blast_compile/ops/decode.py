"""Decode launchers (M <= ``codegen.DECODE_MAX_M``): the sliced path and split-K;
``_decode`` picks one (see ``triton_mlp``'s docstring for how each works and when it wins).
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import triton

from .. import codegen
from ..formats import cdiv
from . import configs as C
from . import tune
from .tune import _interpret
from . import launch
from .launch import lowered, rows_at_most  # (lowered ops: see launch.traced)
from .plans import warn_once

log = logging.getLogger("blast_compile.ops")

from .tables import outside_graph_pool


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

            return tab(ix.in_cols, n_in), tab(off["in1"], 0), tab(off3, 0)

        t = off[key] = outside_graph_pool(build, start.device)
    return t


class _Scratch:
    """A plan's split-K scratch (not a table of a lowered op, whose kernels get its address)."""

    __slots__ = ("buf", "offs")

    def __init__(self, buf, offs):
        self.buf, self.offs = buf, offs

    def __iter__(self):
        return iter((self.buf, self.offs))


def _scratch_key(device, gated, d_hidden, d_out):
    return ("dec_scratch", str(device), gated, d_hidden, d_out)


def _decode_scratch(plan, device, gated, d_hidden, d_out, m):
    """Split-K's scratch ``(buf, offsets)``: fp32 G|U and Y, int32 completion counters (per hidden block column,
    per output block), the per-row NaN/Inf flag of x and the finisher count, all zero before a call, as parts of
    one int32 buffer at word ``offsets`` (the kernels read the fp32 parts through a bitcast pointer). The
    kernels leave it zero again, so a plan keeps one, for ``DECODE_MAX_M`` rows.

    A lowered op passes the kernels its address (an int: ``buf`` is then that int): a graph buffer its kernels
    wrote would be cloned around them, and a fresh one per call would need a fill launch. Where the graph
    outlives this process (``torch.export``: ``launch.one_graph``) it zeroes a fresh one per call instead."""
    return _plan_scratch(plan, _scratch_key(device, gated, d_hidden, d_out), device,
                         lambda rows: _scratch_layout(plan, gated, d_hidden, d_out, rows), m)


def _plan_scratch(plan, key, device, layout, m):
    """A scratch the kernels leave zero ``(buf or its address, offsets)``, kept in ``plan.cache[key]`` (``layout(rows)``:
    its word offsets and size for that many rows; kept for ``DECODE_MAX_M``); see ``_decode_scratch``."""
    if lowered() and launch.one_graph():
        offs, n = layout(m)
        return torch.zeros(n, device=device, dtype=torch.int32), offs
    t = plan.cache.get(key)
    if t is None:
        offs, n = layout(codegen.DECODE_MAX_M)
        t = plan.cache[key] = _Scratch(outside_graph_pool(
            lambda: torch.zeros(n, device=device, dtype=torch.int32), device), offs)
        plan.cache["dec_scratch_new"] = True  # (for _drop_idle_scratch)
    return (t.buf.data_ptr() if lowered() else t.buf), t.offs


def _scratch_args(scr):
    """A scratch as the kernels take it: ``((ptr, 0), False)`` for a tensor, ``((low 31 bits, the rest), True)`` for
    an address (a lowered op's: SCR_ADDR; an int argument must fit int32)."""
    if isinstance(scr, int):
        return (scr & 0x7FFFFFFF, scr >> 31), True
    return (scr, 0), False


def _split_scratch(plan, device, split, m):
    """The split ``bsmm``'s scratch: fp32 partial sums, a [BM, bs] slot per program, and one int32 counter per output
    row slice, zero at rest (``bsmm`` SPLIT). Slots for BM = 32 (no guard on a symbolic M) and any slice width
    (n_out * bd * split * 32 words whatever bs is; n_out * bd counters at most), for up to 8 parts: one scratch serves
    every split config a plan times (kernels of one plan run one after another); kept while the plan lives once a
    chosen config used it (a lowered graph keeps its address: ``_ran``)."""
    p = plan.pattern
    top = max(8, split)
    n = p.n_out * p.bd * top * 32
    return _plan_scratch(plan, ("dec_scratch_y", str(device), top), device,
                         lambda rows: ((0, n), n + p.n_out * p.bd), m)


def _scratch_layout(plan, gated, d_hidden, d_out, m):
    """Word offsets of (gu [m, (1|2) H], y32 [m, d_out], colcnt, outcnt, flag [m], done) and the total."""
    p = plan.pattern
    sizes = (m * (2 if gated else 1) * d_hidden, m * d_out, max(1, p.n_h), max(1, p.n_out), m, 1)
    offs, at = [], 0
    for n in sizes:
        offs.append(at)
        at += n
    return tuple(offs), at


def _count_eager_decode(plan, x2d):
    """The opaque op's decode without CUDA graphs is host-bound: a call's Python and two launches outlast its
    kernels, and the dense model it replaces launches cuBLAS cheaper. Say so once, after enough calls that it
    is not a graph warm-up. (A lowered op has no Python per call: it never gets here.)"""
    if not x2d.is_cuda or lowered() or torch.cuda.is_current_stream_capturing():
        return
    n = plan.cache["eager_decode"] = plan.cache.get("eager_decode", 0) + 1
    if n == C.EAGER_DECODE_WARN:
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
    if device.type != "cuda" or _interpret() or lowered() or not C.PDL:
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
    """Decode (M <= ``codegen.DECODE_MAX_M``): the sliced path, split-K or sliced with prefetch, whichever was
    fastest for this (signature, shape, live-block count, M bucket) when first timed (CUDA graphs; persisted like
    the configs). ``DECODE_PATH`` forces one. Under ``torch.use_deterministic_algorithms(True)`` never
    split-K: it adds fp32 partial sums with atomics, in any order. ``args``: ``_decode_sliced``'s.

    A lowered op launches without PDL (Inductor has none for user kernels), so its kernel 2 cannot prefetch W2
    while kernel 1 runs: kernel 1 may do it instead (``sliced_pf``; split-K always, where it can), and the three
    are weighed as for the opaque op. Split-K's scratch is then passed by address (``_decode_scratch``); in an
    exported graph it would need a fill per call, so there only when asked for."""
    mode = C.DECODE_PATH
    if lowered():
        paths = {"sliced": _decode_sliced, "sliced_pf": _decode_sliced_pf}
        if not torch.are_deterministic_algorithms_enabled() and (mode == "splitk" or not launch.one_graph()):
            paths["splitk"] = _decode_splitk
        return _pick(args, paths, mode, "lowered")
    if torch.are_deterministic_algorithms_enabled():
        if mode == "splitk":
            warn_once(("deterministic", mode), "blast: DECODE_PATH='splitk' ignored under "
                      "torch.use_deterministic_algorithms(True): its atomics are not deterministic; "
                      "using the sliced decode")
        return _decode_sliced_pf(*args) if mode == "sliced_pf" else _decode_sliced(*args)
    return _pick(args, {"sliced": _decode_sliced, "splitk": _decode_splitk, "sliced_pf": _decode_sliced_pf},
                 mode, "")


def _prefetch_ok(x2d, plan, s2) -> bool:
    """Kernel 1 can prefetch W2 (strides ``s2``): a GPU (the prefetch is inline PTX), W2's block rows contiguous,
    blocks live."""
    return x2d.is_cuda and not _interpret() and s2[1] == 1 and plan.pattern.nnz_dn > 0


def _pick(args, paths, mode, tag):
    """``paths[mode]``, else the fastest of ``paths`` (``sliced_pf`` only where ``_prefetch_ok``), timed once
    and persisted; ``tag`` keeps the lowered op's choice (no PDL) apart from the opaque op's."""
    if mode in paths:
        return paths[mode](*args)
    if not _prefetch_ok(args[0], args[2], args[12]):
        paths = {k: f for k, f in paths.items() if k != "sliced_pf"}
    x2d, _, plan, m, d_in, d_hidden, d_out, sig = args[:8]
    mk = tune._memo_key("dec_path", id(sig), codegen.m_bucket(m), tag)
    choice = plan.cache.get(mk)
    if choice in paths:
        return paths[choice](*args)
    dev = tune._device_name(x2d.device.index) if x2d.is_cuda else "cpu"
    # which path wins depends on how much there is to stream (the signature does not say): key by
    # the shape and the live-block count in quarter-octaves
    p = plan.pattern
    nnz = round(4 * math.log2(max(1, p.nnz_in + p.nnz_dn)))
    key = f"dec_path{tag}|{sig.digest()}|{d_in}x{d_hidden}x{d_out}|nnz{nnz}|m{codegen.m_bucket(m)}|{dev}"
    choice = codegen.lookup_config(key)
    if choice is not None and choice[0] not in paths:  # (persisted by a version with other paths)
        choice = None
    if choice is None:
        if not tune._may_tune():
            return _decode_sliced(*args)
        times = _time_paths(args, paths, plan)
        choice = [min(times, key=times.get)]
        codegen.store_config(key, choice)
        log.info("blast: decode path %s -> %s (%s)", key, choice[0],
                 ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))
    plan.cache[mk] = choice[0]
    return paths[choice[0]](*args)


def _time_paths(args, paths, plan):
    """Each path's time (CUDA graphs); what their runs use is not marked as used (``_ran``)."""
    plan.cache["dec_timing"] = True
    try:
        return {name: tune._graph_time(lambda f=f: f(*args)) for name, f in paths.items()}
    finally:
        del plan.cache["dec_timing"]


def _ran(plan, scratch):
    """A call ran (not timed: ``_time_paths``) kernels that use the plan's ``scratch``: it stays while the plan
    lives, since a lowered graph holds its address."""
    if not plan.cache.get("dec_timing"):
        plan.cache[("ran", scratch)] = True


def _drop_idle_scratch(plan):
    """Free the scratch (megabytes a layer) that only timing used -- split-K's when another path won, the split
    ``bsmm``'s when an unsplit config did. Looks only after a scratch was made: no scan of the cache per call."""
    if plan.cache.get("dec_timing") or not plan.cache.pop("dec_scratch_new", False):
        return
    for name in ("dec_scratch", "dec_scratch_y"):
        if not plan.cache.get(("ran", name)):
            for k in [k for k in plan.cache if isinstance(k, tuple) and k[:1] == (name,)]:
                del plan.cache[k]


def _decode_splitk(x2d, b2, plan, m, d_in, d_hidden, d_out, sig, mod, ix, off, s1, s2, s3, w1, w2, w3_, off3, b1_,
                   b3_, common, n_live):
    """Split-K decode: ``mlp_decode_in`` + ``mlp_decode_dn`` with fp32 atomics into plan scratch and
    completion counters (module docstring)."""
    p = plan.pattern
    gated = common["GATED"]
    DT = common["DTYPE"]
    w3_, off3 = (w3_, off3) if gated else (w1, off["in1"])
    b1_, b3_ = (x2d if b is None else b for b in (b1_, b3_))
    scr, (o_gu, o_y32, o_col, o_out, o_flag, o_done) = _decode_scratch(plan, x2d.device, gated, d_hidden, d_out, m)
    s_gu, s_y = (2 if gated else 1) * d_hidden, d_out  # (row strides of gu and y32, in words)
    y = torch.empty(m, d_out, device=x2d.device, dtype=x2d.dtype)
    dot = m > C.GEMV_MAX_M
    bm = max(16, triton.next_power_of_2(m)) if dot else triton.next_power_of_2(m)
    bx = max(64, min(triton.next_power_of_2(d_in), 8192 // bm))  # NaN scan: [BM, BX] x tiles
    scr_args, by_addr = _scratch_args(scr)
    dec = dict(BM=bm, BH=p.bh, BD=p.bd, BX=bx, ALIGNED=sig.aligned, GATED=gated, DOT=dot, DTYPE=DT, SCR_ADDR=by_addr)
    b2_ = b2 if b2 is not None else x2d  # (not read without HAS_B)
    pdl = _pdl_ok(x2d.device)
    # a lowered op (no PDL): kernel 1 prefetches W2 for kernel 2
    prefetch = lowered() and _prefetch_ok(x2d, plan, s2)

    def run(cfg):
        ci, cd, nw, mode = C.SplitK.of(cfg)
        ch = _chunks(plan, ci, cd, x2d.device)
        first = bool(ch["n_in"] + ch["n_empty"])
        early = pdl and mode > 0 and first and bool(ch["n_dn"])  # kernel 2 launched early
        pf, line = _prefetch_lines(w2, s2[1], p.bh, early and mode > 1)  # ... and prefetching W2
        try:
            if first:
                cols, o1, o3 = _flat_in(ix, off, off3, ch, ci, p.n_in)
                grid = ch["n_in"] + ch["n_empty"]
                pf_in, pf_in_kw = (_prefetch_args(w2, off["dn_csc"], s2, p, grid) if prefetch and ch["n_dn"]
                                   else ((None, None, 0, 0), {}))
                mod.mlp_decode_in[(grid,)](
                    x2d, x2d.stride(0), *scr_args, o_gu, s_gu, m, d_in, d_hidden,
                    w1, o1, s1[0], s1[1], w3_, o3, s3[0], s3[1],
                    cols, *ch["in"], ch["n_in"], y, y.stride(0), b2_, ch["empty"], d_out,
                    o_flag, 1 if ch["n_dn"] else 0, *pf_in,
                    CH=ci, HAS_B=b2 is not None, PDL=early, num_warps=nw, **dec, **pf_in_kw)
            if ch["n_dn"]:
                mod.mlp_decode_dn[(ch["n_dn"],)](
                    *scr_args, o_gu, s_gu, o_y32, s_y, y, y.stride(0), x2d, x2d.stride(0),
                    m, d_in, d_hidden, d_out, b1_, b3_, b2_,
                    w2, off["dn_csc"], s2[0], s2[1], ix.dn_rows, ix.dn_rowptr,
                    *ch["dn"], ch["dn_tot"], o_col, o_out, o_flag, o_done, p.n_out - ch["n_empty"],
                    CH=cd, HAS_B1=common["HAS_B1"], HAS_B3=common["HAS_B3"], HAS_B=b2 is not None,
                    PDL=early, PF=pf, PF_LINE=line,
                    num_warps=nw, **dec, **(dict(launch_pdl=True) if early else {}))
        except Exception:  # e.g. a config that does not compile: leave the scratch zeroed
            if not by_addr:
                scr.zero_()
            elif not launch.traced():
                plan.cache[_scratch_key(x2d.device, gated, d_hidden, d_out)].buf.zero_()
            raise

    kind, configs = ("decode2", C.DECODE_CONFIGS) if dot else ("decode2g", C.DECODE_GEMV_CONFIGS)
    if not pdl:  # (no PDL here: the early modes are the same launch)
        configs = list(dict.fromkeys(C.SplitK.of(c)._replace(early=0) for c in configs))
    run(tune._choose(kind, sig, m, configs, run, graph="cold", shape=(d_in, d_hidden, d_out), memo=plan.cache))
    _ran(plan, "dec_scratch")
    _drop_idle_scratch(plan)
    return y


def _sliced_buffers(x2d, m, d_in, d_hidden, d_out):
    """``(BM, slices, flag, H, Y)`` of a sliced or fused decode: one M tile holds every row (a symbolic M <= 32
    guards on M <= 16 at most), x's NaN/Inf row flags per 64-column slice, H and Y."""
    bm = 16 if rows_at_most(m, 16) else 32
    n_sl = cdiv(d_in, 64)
    dev = x2d.device
    return (bm, n_sl, torch.empty(n_sl, bm, device=dev, dtype=torch.int32),
            torch.empty(m, d_hidden, device=dev, dtype=x2d.dtype), torch.empty(m, d_out, device=dev, dtype=x2d.dtype))


def _decode_sliced_pf(*args):
    """``_decode_sliced`` with ``mlp_hidden`` prefetching W2's live blocks into L2 for ``bsmm``."""
    return _decode_sliced(*args, prefetch=True)


def _prefetch_args(w2, off2, s2, p, programs):
    """``mlp_hidden``'s (pf_w, pf_off, pf_s, pf_n) and (PF, PF_LPR, PF_LINE): every 128-byte line of W2's live
    blocks, spread over ``programs`` programs, at most 64 lines a program per step."""
    line = 128 // w2.element_size()
    lpr = cdiv(p.bh, line)
    n = p.nnz_dn * p.bd * lpr
    return (w2, off2, s2[0], n), dict(PF=min(64, triton.next_power_of_2(cdiv(n, programs))), PF_LPR=lpr,
                                       PF_LINE=line)


def _decode_sliced(x2d, b2, plan, m, d_in, d_hidden, d_out, sig, mod, ix, off, s1, s2, s3, w1, w2, w3_, off3, b1_,
                   b3_, common, n_live, prefetch=False):
    """Decode: the prefill kernels with one M tile (BM = 16 or 32 rows) and each weight block's rows
    split over BH/BS (BD/BS) programs, so thousands of small programs keep weight bytes in flight
    without split-K: no atomics, no scratch to re-zero, no counters. ``mlp_hidden`` writes H (bf16,
    as eager rounds it) and per-slice NaN/Inf row flags of x; ``bsmm`` reads them. ``prefetch``: ``mlp_hidden``
    first sends W2's live blocks into L2 (``_prefetch_args``)."""
    p = plan.pattern
    if prefetch and not _prefetch_ok(x2d, plan, s2):
        raise ValueError("blast: DECODE_PATH='sliced_pf' needs a GPU and W2 with contiguous rows")
    bm, n_sl, flag, h, y = _sliced_buffers(x2d, m, d_in, d_hidden, d_out)
    if not n_live:  # no hidden kernel to write the flags
        flag.zero_()
        flag[0, :m] = (~torch.isfinite(x2d).all(1)).to(torch.int32)

    pdl = _pdl_ok(x2d.device)

    def run_h(cfg):
        bs, ch, nw, ns, _ = C.Slice.of(cfg)
        bs = min(bs, p.bh)
        programs = n_live * (p.bh // bs)
        pf_in, pf_in_kw = _prefetch_args(w2, off["dn_csr"], s2, p, programs) if prefetch else ((None, None, 0, 0), {})
        mod.mlp_hidden[(1, programs)](
            x2d, x2d.stride(0), h, h.stride(0), None, None, flag, m, d_in, d_hidden,
            w1, off["in1"], s1[0], s1[1], b1_, w3_, off3, s3[0], s3[1], b3_,
            ix.in_rowptr, ix.in_cols, ix.order_h, None, None, None, *pf_in,
            BM=bm, BS=bs, CH=ch, PDL=pdl, num_warps=nw, num_stages=ns, STORE_PRE=False, SCAN=2, **common, **pf_in_kw)

    pf, line = _prefetch_lines(w2, s2[1], p.bh, pdl and bool(n_live))

    def run_y(cfg):
        bs, ch, nw, ns, split = C.Slice.of(cfg)
        bs = min(bs, p.bd)
        kw = dict(launch_pdl=True) if (pdl and n_live) else {}
        n_slices = p.n_out * (p.bd // bs)
        if split > 1:  # (each slice's reduction over `split` programs: partial sums in a scratch, counted)
            scr, (o_part, o_cnt) = _split_scratch(plan, x2d.device, split, m)
            (scr_ptr, scr_hi), by_addr = _scratch_args(scr)
            kw.update(scr_ptr=scr_ptr, scr_hi=scr_hi, part_off=o_part, cnt_off=o_cnt, SPLIT=split, SCR_ADDR=by_addr)
        mod.bsmm[(1, n_slices * split)](
            h, h.stride(0), None, y, y.stride(0), b2, flag, n_sl, m, d_hidden, d_out,
            w2, off["dn_csr"], s2[0], s2[1], None, None, s2[0], s2[1],
            ix.dn_rowptr, ix.dn_cols, ix.order_o, None, None, None, None,
            DTYPE=common["DTYPE"], BO=p.bd, BI=p.bh, BS=bs, ALIGNED=sig.aligned, HAS_B=b2 is not None, DUAL=False,
            NANROW=2, CH=ch, PDL=pdl and bool(n_live), PF=pf, PF_LINE=line, BM=bm, num_warps=nw, num_stages=ns,
            **kw)

    if n_live:  # (else: nothing to launch, nothing to tune)
        run_h(tune._choose("dec_hpf" if prefetch else "dec_h", sig, m, C.DECODE_SLICE_CONFIGS, run_h, graph="cold",
                           shape=(d_in, d_hidden, d_out), memo=plan.cache))
    cfg = tune._choose("dec_y", sig, m, C.decode_y_configs, run_y, graph="cold", shape=(d_in, d_hidden, d_out),
                       memo=plan.cache)
    run_y(cfg)
    if C.Slice.of(cfg).split > 1:
        _ran(plan, "dec_scratch_y")
    _drop_idle_scratch(plan)
    return y
