"""Options a user passes with ``torch.compile(..., backend="blast", options={...})``
and the per-MLP record every pass fills in (what ``explain`` prints)."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple, Union


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

    @classmethod
    def from_options(cls, options: Optional[dict]) -> "BlastOptions":
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - names
        if unknown:
            raise ValueError(f"unknown blast option(s) {sorted(unknown)}; known: {sorted(names)}")
        if "block_sizes" in options:
            bs = options["block_sizes"]
            options["block_sizes"] = (bs,) if isinstance(bs, int) else tuple(bs)
        o = cls(**options)
        if not 0.0 <= o.min_sparsity <= 1.0:
            raise ValueError("min_sparsity must be in [0, 1]")
        if o.save_hidden not in _SAVE_LEVELS:
            raise ValueError(f"save_hidden must be True ('auto'), False, 'all' or 'h', not {o.save_hidden!r}")
        if o.kernel_dir is None:
            o.kernel_dir = os.path.join(default_cache_dir(), "kernels")
        return o

    @property
    def save_level(self) -> Optional[int]:
        """``blast::sparse_mlp_train``'s ``save``: 0 none, 1 H, 2 H and the pre-activations; None: auto."""
        return _SAVE_LEVELS[self.save_hidden]


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
