"""Triton source per MLP signature, cached on disk, plus a persisted tuning table.

Specialization is where a compiler beats a library: the generated module is
fixed to one block shape, activation (inlined), gated/plain, bias set, dtype,
alignment of the block offsets (16-element ``multiple_of`` hints -> 16-byte
loads) and, for balanced patterns (same live count in every hidden block-row),
a compile-time trip count for the in-projection loop.

The source is rendered from ``templates/mlp_kernels.py.tmpl`` into
``<kernel_dir>/blast_mlp_<hash>.py`` (the hash covers the template and the
signature, so a fresh process renders the same file) and imported with
importlib: ``@triton.jit`` needs ``inspect.getsource``, which ``exec`` breaks.

Tuning results (launch configs per kernel, signature and M bucket) live in
``<kernel_dir>/tuning.json`` so a second process does not tune again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from . import toolchain

log = logging.getLogger("blast_compile.codegen")

_TEMPLATE = Path(__file__).with_name("templates") / "mlp_kernels.py.tmpl"
_LOCK = threading.Lock()
_MODULES: dict = {}
_BY_SIG: dict = {}  # (signature, kernel dir) -> module: the per-launch lookup, no path or hash work
_KERNEL_DIR: Optional[str] = None
_TUNING: Optional[dict] = None

ACT_BODIES = {
    # (where(a <= 0, 0, a), not maximum: a NaN stays NaN, as in eager)
    "relu": "    return tl.where(a <= 0.0, 0.0, a)",
    "relu2": "    r = tl.where(a <= 0.0, 0.0, a)\n    return r * r",
    "gelu": "    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))",
    # tanh(z) = 2 sigmoid(2z) - 1 (tl has no tanh on every supported version)
    "gelu_tanh": "    t = 2.0 * tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a)) - 1.0\n"
                 "    return 0.5 * a * (1.0 + t)",
    "silu": "    return a * tl.sigmoid(a)",
}
# d act(a) / da in fp32 (the backward kernel recomputes it; eager's formulas, activations.act_grad)
ACT_GRAD_BODIES = {
    # (eager's threshold_backward passes the gradient where not a <= 0: at a NaN too)
    "relu": "    return tl.where(a <= 0.0, 0.0, 1.0)",
    "relu2": "    return tl.where(a <= 0.0, 0.0, 2.0 * a)",
    "gelu": "    return 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + a * tl.exp(-0.5 * a * a) * 0.3989422804014327",
    "gelu_tanh": "    t = 2.0 * tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a)) - 1.0\n"
                 "    return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * a * a)",
    "silu": "    s = tl.sigmoid(a)\n    return s * (1.0 + a * (1.0 - s))",
}
_DTYPES = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32"}


def set_kernel_dir(path) -> None:
    """Where generated sources and the tuning table go (``BlastOptions.kernel_dir``)."""
    global _KERNEL_DIR, _TUNING
    path = os.path.abspath(os.path.expanduser(str(path)))
    if path != _KERNEL_DIR:
        _KERNEL_DIR, _TUNING = path, None


def get_kernel_dir() -> str:
    if _KERNEL_DIR is None:
        from ..config import default_cache_dir

        set_kernel_dir(os.path.join(default_cache_dir(), "kernels"))
    return _KERNEL_DIR


@dataclasses.dataclass(frozen=True)
class Signature:
    """Everything a generated module is specialized for."""

    bh: int
    bd: int
    activation: str
    gated: bool
    has_b1: bool
    has_b3: bool
    dtype: str  # "float16" | "bfloat16" | "float32"
    aligned: bool  # every block offset and the row strides are multiples of 16 elements
    nnz_in: int = -1  # live in-blocks per live hidden row when uniform (balanced), else -1
    dot_precision: str = "tf32"  # tl.dot's input_precision for fp32 operands: "ieee" | "tf32"
    tnsp_fix: bool = False  # no transposed-B wgmma dots in the backward (``toolchain.py``)

    @property
    def tl_dtype(self) -> str:
        return _DTYPES[getattr(torch, self.dtype)]

    def digest(self) -> str:
        d = _DIGESTS.get(self)  # memoized: this runs on every kernel launch's host path
        if d is None:
            h = hashlib.sha1(_template_bytes())
            h.update(repr(dataclasses.astuple(self)).encode())
            d = _DIGESTS[self] = h.hexdigest()[:16]
        return d


_DIGESTS: dict = {}


def _template_bytes() -> bytes:
    global _TEMPLATE_BYTES
    if _TEMPLATE_BYTES is None:
        _TEMPLATE_BYTES = _TEMPLATE.read_bytes()
    return _TEMPLATE_BYTES


_TEMPLATE_BYTES: Optional[bytes] = None


def signature(pattern, activation, gated, has_b1, has_b3, dtype, aligned=True) -> Signature:
    if activation not in ACT_BODIES:
        raise ValueError(f"unknown activation {activation!r}")
    nnz = pattern.uniform_in_nnz()
    dt = str(dtype).replace("torch.", "")
    # fp32 follows torch's own fp32 matmuls (read when the plan is built): TF32 only where they use it
    prec = "tf32" if dt != "float32" or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return Signature(pattern.bh, pattern.bd, activation, bool(gated), bool(has_b1), bool(has_b3), dt, bool(aligned),
                     -1 if nnz is None else int(nnz), prec, toolchain.tnsp_fix_needed())


def render(sig: Signature) -> str:
    comment = (f"block {sig.bh}x{sig.bd}, activation {sig.activation}, {'gated' if sig.gated else 'plain'}, "
               f"b1={sig.has_b1} b3={sig.has_b3}, {sig.dtype}, aligned={sig.aligned}, "
               + (f"uniform {sig.nnz_in} live in-blocks per hidden row (constexpr trip count)"
                  if sig.nnz_in >= 0 else "ragged rows (trip count read from in_rowptr)"))
    return _template_bytes().decode().format(
        spec_comment=comment, act_name=sig.activation,
        act_body=ACT_BODIES[sig.activation], act_grad_body=ACT_GRAD_BODIES[sig.activation], trip="NNZ" if sig.nnz_in >= 0 else "n",
        dot_precision=sig.dot_precision, tnsp_fix=int(sig.tnsp_fix),
    )


def source_path(sig: Signature) -> Path:
    return Path(get_kernel_dir()) / f"blast_mlp_{sig.digest()}.py"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def generate(sig: Signature) -> Path:
    """Write the module's source if it is not on disk yet; returns its path."""
    path = source_path(sig)
    text = render(sig)
    if not path.exists() or path.read_text() != text:
        _write_atomic(path, text)
        log.debug("blast: generated %s", path)
    return path


def load(sig: Signature):
    """The imported generated module for ``sig`` (generated on first use)."""
    mod = _BY_SIG.get((sig, _KERNEL_DIR))
    if mod is not None:
        return mod
    with _LOCK:
        path = source_path(sig)
        mod = _MODULES.get(path)
        if mod is not None:
            _BY_SIG[(sig, _KERNEL_DIR)] = mod
            return mod
        generate(sig)
        name = path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _MODULES[path] = mod
        _BY_SIG[(sig, _KERNEL_DIR)] = mod
        torch._dynamo.utils.counters["blast"]["kernels_loaded"] += 1
        return mod


def kernel_info(pattern, activation, gated, has_b1, has_b3, has_b2, dtype, device, m_hint=None):
    """``(kernel name, source path)`` of what runs this MLP; generates the source (no GPU needed)."""
    sig = signature(pattern, activation, gated, has_b1, has_b3, dtype)
    path = generate(sig)
    if m_hint is None:
        which = "decode (M<=%d): sliced mlp_hidden + bsmm or split-K mlp_decode_in + mlp_decode_dn | mlp_hidden + bsmm" % DECODE_MAX_M
    elif m_hint <= DECODE_MAX_M:
        which = "sliced mlp_hidden + bsmm or split-K mlp_decode_in + mlp_decode_dn (timed per signature)"
    else:
        which = "mlp_hidden + bsmm"
    return f"triton {path.stem}: {which}", str(path)


DECODE_MAX_M = 32


# --- tuning table -----------------------------------------------------------------------------

def m_bucket(m: int) -> int:
    """Next power of two (tuning key): nearby M share a config."""
    return 1 << max(0, (int(m) - 1).bit_length())


def _tuning_path() -> Path:
    return Path(get_kernel_dir()) / "tuning.json"


def tuning_table() -> dict:
    global _TUNING
    if _TUNING is None:
        try:
            _TUNING = json.loads(_tuning_path().read_text())
        except (OSError, ValueError):
            _TUNING = {}
    return _TUNING


def lookup_config(key: str):
    return tuning_table().get(key)


def store_config(key: str, cfg: dict) -> None:
    """Record a tuned config; merged with what other processes wrote meanwhile."""
    with _LOCK:
        table = tuning_table()
        table[key] = cfg
        try:
            on_disk = json.loads(_tuning_path().read_text())
        except (OSError, ValueError):
            on_disk = {}
        on_disk.update(table)
        table.update(on_disk)
        path = _tuning_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(on_disk, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


__all__ = ["set_kernel_dir", "get_kernel_dir", "Signature", "signature", "render", "generate", "load",
           "kernel_info", "m_bucket", "lookup_config", "store_config", "DECODE_MAX_M"]
