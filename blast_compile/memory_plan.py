"""How much memory a block-sparse model needs, and on how many GPUs it fits.

Only the MLP weights shrink. Each MLP matrix keeps ``round((1 - s) * n_blocks)``
live ``block x block`` blocks (what :func:`testing.random_block_mask` makes and
:func:`compress.compress_` stores) plus its index: one int32 column per live
block and an int32 ``row_ptr`` of ``n_block_rows + 1``. Everything else
(embeddings, attention, norms, lm_head) stays dense. Optional extras: the KV
cache for ``kv_tokens`` tokens (``batch * context``) and a fixed activation
overhead.

    blast memory-plan --model llama-3.1-405b --sparsity 0.9 [--gpu-gb 80] [--tp 4]

Tensor parallel (what :mod:`blast_compile.tp_compressed` builds and :func:`tp_rank_bytes` counts
tensor by tensor, so ``tp_compressed.weight_bytes`` of the sharded model measures the same numbers):
each MLP's live blocks are split over the ranks by hidden blocks (gate/up rows, down columns, every
rank its own ``row_ptr``), attention ``q/k/v/o`` by heads, and embeddings, lm_head and norms are
replicated on every rank. A TP size must divide the KV heads and the hidden blocks; ``gpus_tp``
is the smallest such size whose ranks fit (weights per rank + KV cache / ranks + overhead), which
can be more than ``gpus_sparse`` (total bytes / GPU size, as if everything split perfectly).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Dict, Optional, Sequence, Union

from .formats import BLOCK_CHOICES, cdiv

# Public architecture hyper-parameters (Meta's config.json files).
CONFIGS: Dict[str, dict] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "llama-3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=128256,
                           tie_word_embeddings=False, head_dim=128),
}

GiB = 2**30


@dataclasses.dataclass
class Plan:
    model: str
    sparsity: float
    block: int
    dtype_bytes: int
    params: int  # dense parameter count (tied embeddings once)
    mlp_params: int
    dense_bytes: int  # all weights, dense
    mlp_dense_bytes: int
    mlp_sparse_bytes: int  # live blocks + index
    index_bytes: int  # part of mlp_sparse_bytes
    sparse_bytes: int  # all weights with the MLPs compressed
    kv_bytes: int
    overhead_bytes: int
    gpu_gb: float
    usable: float
    gpus_dense: int
    gpus_sparse: int
    tp: int = 1  # the TP size the per-rank numbers are for (gpus_tp unless asked for)
    rank_bytes: int = 0  # weights per rank at ``tp`` (mean over ranks; the sum over ranks is exact)
    tp_total_bytes: int = 0  # weights summed over the ``tp`` ranks (replicated tensors counted per rank)
    gpus_tp: int = 0  # smallest runnable TP size whose ranks fit; 0: none up to 64

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.sparse_bytes

    @property
    def reduction(self) -> float:
        """Fraction of the weight bytes saved."""
        return self.saved_bytes / self.dense_bytes

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(saved_bytes=self.saved_bytes, reduction=self.reduction, assumes=ASSUMES)
        return d


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def mlp_matrix_sparse_bytes(rows: int, cols: int, sparsity: float, block: int, dtype_bytes: int):
    """(bytes of live blocks, bytes of index) of one ``[rows, cols]`` matrix."""
    nr, nc = cdiv(rows, block), cdiv(cols, block)
    live = nr * nc - int(round(sparsity * nr * nc))
    return live * block * block * dtype_bytes, 4 * live + 4 * (nr + 1)


def tp_rank_bytes(config, sparsity: float, tp: int, block: int = 64, dtype_bytes: int = 2,
                  gated: bool = True) -> int:
    """Weight bytes summed over ``tp`` ranks of the model ``tp_compressed`` shards (MLP live blocks and
    attention split, every rank its own MLP ``row_ptr``, embeddings/lm_head/norms replicated)."""
    d, h, n_layers = (_get(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    n_heads = _get(config, "num_attention_heads")
    n_kv = _get(config, "num_key_value_heads") or n_heads
    head_dim = _get(config, "head_dim") or d // n_heads
    attn = (d * n_heads * head_dim * 2 + d * n_kv * head_dim * 2) * dtype_bytes
    if _get(config, "attention_bias", False):
        attn += (n_heads * head_dim + 2 * n_kv * head_dim + d) * dtype_bytes  # q/k/v split, o's on rank 0
    n_in = 2 if gated else 1
    mlp = 0
    for rows, cols in [(h, d)] * n_in + [(d, h)]:
        b, i = mlp_matrix_sparse_bytes(rows, cols, sparsity, block, dtype_bytes)
        nr = cdiv(rows, block)
        mlp += b + i - 4 * (nr + 1)  # blocks and col_idx split; row_ptr per rank below
        mlp += 4 * (nr + tp) if rows == h else 4 * tp * (nr + 1)  # hidden rows split / every rank all rows
    if _get(config, "mlp_bias", False):
        mlp += (n_in * h + d) * dtype_bytes  # in-projection biases split, down's on rank 0
    vocab = _get(config, "vocab_size")
    tied = bool(_get(config, "tie_word_embeddings", False))
    replicated = (vocab * d * (1 if tied else 2) + (2 * n_layers + 1) * d) * dtype_bytes
    return n_layers * (attn + mlp) + tp * replicated


def tp_sizes(config, block: int = 64, limit: int = 64):
    """TP sizes ``tp_compressed`` can run: dividing the KV heads and the MLP's hidden blocks."""
    n_kv = _get(config, "num_key_value_heads") or _get(config, "num_attention_heads")
    n_hb = _get(config, "intermediate_size") // block
    return [t for t in range(1, limit + 1) if n_kv % t == 0 and n_hb % t == 0]


def _gpus(total: int, gpu_gb: float, usable: float) -> int:
    return max(1, math.ceil(total / (gpu_gb * GiB * usable)))


def plan(config: Union[str, dict, object], sparsity: float, block: int = 64, dtype_bytes: int = 2,
         gpu_gb: float = 80, *, usable: float = 1.0, kv_tokens: int = 0, kv_dtype_bytes: Optional[int] = None,
         overhead_gb: float = 0.0, gated: Optional[bool] = None, tp: Optional[int] = None) -> Plan:
    """Weight memory of a Llama-style decoder, dense vs MLP block-sparse.

    ``config``: a name from :data:`CONFIGS`, a dict or an HF config. ``gpu_gb`` is in GiB
    (an "80 GB" H100 has 80 GiB); ``usable`` the fraction of it weights + KV + overhead may
    take. ``gated`` (SwiGLU, 3 MLP matrices) defaults to True unless ``hidden_act`` says
    GELU/ReLU without a gate is meant (pass it explicitly for non-Llama models). ``tp``: the TP
    size of the per-rank numbers (default: ``gpus_tp``, the smallest runnable one that fits).
    """
    name = config if isinstance(config, str) else (_get(config, "name_or_path") or _get(config, "model_type") or "custom")
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown model {config!r}; known: {sorted(CONFIGS)}")
        config = CONFIGS[config]
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError("sparsity must be in [0, 1]")
    d = _get(config, "hidden_size")
    h = _get(config, "intermediate_size")
    n_layers = _get(config, "num_hidden_layers")
    n_heads = _get(config, "num_attention_heads")
    n_kv = _get(config, "num_key_value_heads") or n_heads
    vocab = _get(config, "vocab_size")
    head_dim = _get(config, "head_dim") or d // n_heads
    tied = bool(_get(config, "tie_word_embeddings", False))
    gated = True if gated is None else gated
    attn_bias = bool(_get(config, "attention_bias", False))
    mlp_bias = bool(_get(config, "mlp_bias", False))

    attn = d * n_heads * head_dim * 2 + d * n_kv * head_dim * 2
    if attn_bias:
        attn += n_heads * head_dim * 2 + n_kv * head_dim * 2 + d
    n_mlp = 3 if gated else 2
    mlp_w = n_mlp * d * h
    mlp_b = (h * (n_mlp - 1) + d) if mlp_bias else 0
    norms = 2 * d
    embed = vocab * d * (1 if tied else 2)
    params = n_layers * (attn + mlp_w + mlp_b + norms) + d + embed

    blk, idx = 0, 0
    for rows, cols in [(h, d)] * (n_mlp - 1) + [(d, h)]:
        b, i = mlp_matrix_sparse_bytes(rows, cols, sparsity, block, dtype_bytes)
        blk, idx = blk + b, idx + i
    mlp_dense = n_layers * mlp_w * dtype_bytes
    mlp_sparse = n_layers * (blk + idx)
    dense_bytes = params * dtype_bytes
    sparse_bytes = dense_bytes - mlp_dense + mlp_sparse
    kvb = kv_dtype_bytes or dtype_bytes
    kv = 2 * n_layers * n_kv * head_dim * kv_tokens * kvb
    over = int(overhead_gb * GiB)
    cap = gpu_gb * GiB * usable

    def fits(t):
        return math.ceil(tp_rank_bytes(config, sparsity, t, block, dtype_bytes, gated) / t) + kv / t + over <= cap

    gpus_tp = next((t for t in tp_sizes(config, block) if fits(t)), 0)
    t = tp or gpus_tp or 1
    tp_total = tp_rank_bytes(config, sparsity, t, block, dtype_bytes, gated)
    return Plan(
        model=str(name), sparsity=sparsity, block=block, dtype_bytes=dtype_bytes, params=params,
        mlp_params=n_layers * mlp_w, dense_bytes=dense_bytes, mlp_dense_bytes=mlp_dense,
        mlp_sparse_bytes=mlp_sparse, index_bytes=n_layers * idx, sparse_bytes=sparse_bytes, kv_bytes=kv,
        overhead_bytes=over, gpu_gb=gpu_gb, usable=usable,
        gpus_dense=_gpus(dense_bytes + kv + over, gpu_gb, usable),
        gpus_sparse=_gpus(sparse_bytes + kv + over, gpu_gb, usable),
        tp=t, rank_bytes=math.ceil(tp_total / t), tp_total_bytes=tp_total, gpus_tp=gpus_tp,
    )


ASSUMES = ("Assumes: MLP live blocks split over the TP ranks by hidden blocks (balanced; measured within ~1-2% "
           "per rank), attention split by heads, embeddings/lm_head/norms replicated on every rank; KV cache = "
           "--kv-tokens tokens (batch x context) split by KV heads (default 0: not counted); activations and "
           "workspace = --overhead-gb per GPU (default 0: not counted); a TP size divides the KV heads and the "
           "hidden blocks.")


def _gib(b: int) -> str:
    return f"{b / GiB:,.1f} GiB"


def table(plans: Sequence[Plan]):
    from rich.table import Table

    p0 = plans[0]
    t = Table(title=f"weight memory, {p0.dtype_bytes}-byte weights, {p0.block}x{p0.block} blocks, "
                    f"{p0.gpu_gb:g} GiB GPUs (usable {p0.usable:.0%})")
    t.add_column("model", no_wrap=True)
    for c in ("sparsity", "params", "MLP share", "dense", "block-sparse", "index", "saved",
              "KV + overhead", "GPUs dense", "GPUs sparse", "TP GPUs", "GiB/rank"):
        t.add_column(c, justify="right")
    for p in plans:
        t.add_row(p.model, f"{p.sparsity:.0%}", f"{p.params / 1e9:.2f} B", f"{p.mlp_params / p.params:.0%}",
                  _gib(p.dense_bytes), _gib(p.sparse_bytes), f"{p.index_bytes / 2**20:,.1f} MiB", f"{p.reduction:.1%}",
                  _gib(p.kv_bytes + p.overhead_bytes), str(p.gpus_dense), str(p.gpus_sparse),
                  str(p.gpus_tp or "-"), f"{p.rank_bytes / GiB:,.1f} (tp {p.tp})")
    t.caption = ASSUMES
    return t


def main(argv=None) -> int:
    from .cli import fraction, number, positive_int

    ap = argparse.ArgumentParser(prog="blast memory-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", action="append", choices=sorted(CONFIGS),
                    help="built-in config (repeatable; default: all)")
    ap.add_argument("--sparsity", type=fraction(lo_open=False), action="append",
                    help="MLP block sparsity in [0, 1), e.g. 0.9 (repeatable; default: 0.5, 0.9, 0.95)")
    ap.add_argument("--block", type=int, choices=BLOCK_CHOICES, default=64, help="block size (square)")
    ap.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per weight (2: bf16)")
    ap.add_argument("--gpu-gb", type=number(0, False), default=80, help="GiB per GPU")
    ap.add_argument("--usable", type=number(0, False, 1), default=1.0, help="fraction of GPU memory for weights + KV")
    ap.add_argument("--kv-tokens", type=number(0, True, kind=int), default=0, help="KV cache tokens (batch x context)")
    ap.add_argument("--overhead-gb", type=number(0, True), default=0.0, help="activation/workspace overhead, GiB")
    ap.add_argument("--tp", type=positive_int, default=None,
                    help="TP size of the weights/rank column (default: the smallest that fits)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    for m in (a.model or list(CONFIGS)):
        if a.tp is not None and a.tp not in tp_sizes(CONFIGS[m], a.block, limit=max(64, a.tp)):
            ap.error(f"argument --tp: {m} cannot run at TP {a.tp} (tensor parallel splits the KV heads and the MLP's "
                     f"hidden blocks evenly: TP sizes {tp_sizes(CONFIGS[m], a.block)})")
    plans = [plan(m, s, a.block, a.dtype_bytes, a.gpu_gb, usable=a.usable, kv_tokens=a.kv_tokens,
                  overhead_gb=a.overhead_gb, tp=a.tp)
             for m in (a.model or list(CONFIGS)) for s in (a.sparsity or [0.5, 0.9, 0.95])]
    if a.json:
        import json

        print(json.dumps([p.as_dict() for p in plans], indent=1))
    else:
        from rich.console import Console

        Console(width=max(140, Console().width)).print(table(plans))
    return 0


__all__ = ["CONFIGS", "Plan", "plan", "main", "table", "mlp_matrix_sparse_bytes", "tp_rank_bytes", "tp_sizes",
           "ASSUMES"]
