"""Options a user passes with ``torch.compile(..., backend="blast", options={...})``
and the per-MLP record every pass fills in (what ``explain`` prints)."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Mapping, Optional, Tuple, Union


def default_cache_dir() -> str:
    return os.environ.get("BLAST_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "blast_compile"
    )


# BlastOptions.save_hidden -> blast::sparse_mlp_train's ``save`` (None: chosen per MLP by the rewrite)
_SAVE_LEVELS = {False: 0, "h": 1, "all": 2, True: None, "auto": None}


@dataclasses.dataclass
class BlastOptions:
    block_sizes: Tuple[int, ...] = (16, 32, 64, 128)  # block sizes tried on each side
    min_sparsity: float = 0.5  # fuse only when at least this fraction of blocks is dead
    strict: bool = False  # raise on internal errors instead of falling back to Inductor
    kernel_dir: Optional[str] = None  # generated Triton sources; default <cache>/kernels
    max_runtime_density: float = 0.75  # if weights change and get denser than this: run dense
    inductor: bool = True  # False: hand the rewritten graph to aot_eager instead (debugging)
    # training on CUDA, what each fused MLP's forward keeps for its backward instead of recomputing it:
    # "h": the hidden activations (rows x hidden); "all": also the pre-activations (3 x rows x hidden for
    # a gated MLP, 2 plain); True ("auto"): "all" where recomputing them costs more than writing and
    # reading them (passes/rewrite.py, SAVE_PRE_MIN_K), else "h"; False: nothing (least memory, slowest)
    save_hidden: Union[bool, str] = True
    # CUDA: fused MLPs become Triton kernels that Inductor launches from its own code (passes/lower.py);
    # False: the opaque op, which runs Python per call (the old path, for comparison)
    lower: bool = True
    # lowered kernels launched through Inductor's static CUDA launcher, as its own kernels are, instead of
    # Triton's Python launcher (a few us less host time per launch). Process-wide: backend.py, _static_launch
    static_launch: bool = True

    @classmethod
    def from_options(cls, options: Optional[Mapping]) -> "BlastOptions":
        """Validated options: a bad value is a ValueError naming the option and what it may be."""
        options = _as_dict(options)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - names
        if unknown:
            raise ValueError(f"unknown blast option(s) {sorted(unknown)}; known: {sorted(names)}")
        o = cls(**{k: _CHECKS[k](v) for k, v in options.items()})
        if o.kernel_dir is None:
            o.kernel_dir = os.path.join(default_cache_dir(), "kernels")
        return o

    @property
    def save_level(self) -> Optional[int]:
        """``blast::sparse_mlp_train``'s ``save``: 0 none, 1 H, 2 H and the pre-activations; None: auto."""
        return _SAVE_LEVELS[self.save_hidden]


def _bad(name: str, value, allowed: str):
    return ValueError(f"blast option {name} must be {allowed}, not {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _block_sizes(v) -> Tuple[int, ...]:
    from .formats import BLOCK_CHOICES

    allowed = f"a block size or a non-empty list of them, each one of {', '.join(map(str, BLOCK_CHOICES))}"
    seq = (v,) if _is_int(v) else tuple(v) if isinstance(v, (list, tuple)) else None
    if not seq or not all(_is_int(b) and b in BLOCK_CHOICES for b in seq):
        raise _bad("block_sizes", v, allowed)
    return tuple(dict.fromkeys(int(b) for b in seq))


def _fraction(name: str):
    def check(v) -> float:
        if not (_is_real(v) and 0.0 <= v <= 1.0):
            raise _bad(name, v, "a number in [0, 1]")
        return float(v)

    return check


def _flag(name: str):
    def check(v) -> bool:
        if not isinstance(v, bool):  # ("false" is truthy: no guessing)
            raise _bad(name, v, "True or False")
        return v

    return check


def _kernel_dir(v) -> Optional[str]:
    if v is None:
        return None
    if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise _bad("kernel_dir", v, "a directory path (str or os.PathLike) or None")
    return os.fspath(v)


def _save_hidden(v):
    if not (isinstance(v, bool) or (isinstance(v, str) and v in _SAVE_LEVELS)):
        raise _bad("save_hidden", v, "True ('auto'), False, 'all' or 'h'")
    return v


_CHECKS = {
    "block_sizes": _block_sizes,
    "min_sparsity": _fraction("min_sparsity"),
    "strict": _flag("strict"),
    "kernel_dir": _kernel_dir,
    "max_runtime_density": _fraction("max_runtime_density"),
    "inductor": _flag("inductor"),
    "save_hidden": _save_hidden,
    "lower": _flag("lower"),
    "static_launch": _flag("static_launch"),
}


def _as_dict(options) -> dict:
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"blast: options must be a dict of option names to values, not {options!r}")
    return dict(options)


def split_options(options: Optional[Mapping]) -> Tuple[BlastOptions, dict]:
    """``torch.compile(..., options=...)`` -> (validated blast options, Inductor config patches).

    Any key that is not a blast option must be an Inductor config key. Raised here, before any graph is
    touched, so that a bad option is the user's error and never an internal one that falls back."""
    options = _as_dict(options)
    names = {f.name for f in dataclasses.fields(BlastOptions)}
    ours = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    from torch._inductor import config as inductor_config

    keys = getattr(inductor_config, "_config", None)  # (full dotted names: "cpp.cxx", "triton.cudagraphs")
    bad = [k for k in rest if not (k in keys if keys is not None else hasattr(inductor_config, k.split(".")[0]))]
    if bad:
        raise ValueError(
            f"unknown option(s) {bad}: blast options are {sorted(names)}, anything else must be an Inductor config key"
        )
    return BlastOptions.from_options(ours), rest


@dataclasses.dataclass
class Candidate:
    """One MLP the passes looked at, and what became of it."""

    module: str  # module path from nn_module_stack, e.g. "model.layers.0.mlp"
    kind: str  # "plain" | "gated"
    activation: str  # canonical name: relu, relu2, gelu, gelu_tanh, silu
    d_in: int = 0
    hidden: int = 0
    d_out: int = 0
    bias: bool = False
    dtype: str = ""
    device: str = ""
    block: Optional[Tuple[int, int]] = None  # (bh, bd)
    sparsity: Optional[float] = None  # fraction of dead blocks (area weighted)
    decision: str = "dense"  # "fused" | "dense"
    reason: str = ""
    pattern_key: str = ""
    kernel: str = ""  # which implementation runs it
    kernel_source: str = ""  # path of generated Triton source, if any
    nodes: Tuple[str, ...] = ()  # FX node names that were replaced

    def row(self):
        return dataclasses.asdict(self)
