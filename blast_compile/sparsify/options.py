"""Every knob of ``blast sparsify``, its default, and the checks made before anything is loaded.

Defaults are the recipe that worked best on SmolLM2-135M (RESULTS.md): blocks chosen on calibration inputs
(greedy OBS on the refit's loss), a least-squares refit at every mask update, distillation from the dense
model, a cubic ramp over the first half of the token budget. Budgets and intervals are counted in tokens,
so a run means the same whatever batch shape it is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Optional, Sequence, Tuple

from ..formats import BLOCK_CHOICES


class SparsifyError(ValueError):
    """Bad input, raised before training starts; ``arg`` names the option (``--sparsity``, ``MODEL``...)."""

    def __init__(self, arg: str, msg: str):
        super().__init__(f"{arg}: {msg}")
        self.arg = arg


@dataclasses.dataclass
class Options:
    model: str = ""                       # transformers model directory or a .gguf file
    data: Sequence[str] = ()              # training text: raw text files, or .safetensors token files
    out: Optional[str] = None             # output directory (None: nothing written; library use)
    sparsity: Optional[float] = 0.9       # fraction of MLP weight blocks pruned, in (0, 1)
    dense_baseline: bool = False          # fine-tune dense with the same budget and recipe (no pruning)
    eval: Sequence[str] = ()              # held-out files (default: see data.load_data)
    eval_fraction: float = 0.02           # raw text without --eval: this tail of it is held out
    eval_tokens: int = 0                  # cap per held-out set (0: all)
    tokens: int = 20_000_000              # training budget
    seq: int = 512
    batch: int = 32                       # sequences per step
    lr: float = 5e-4
    schedule: str = "cosine"              # lr after warm-up: cosine (down to min_lr x lr) or constant
    warmup: float = 0.02                  # fraction of the budget
    min_lr: float = 0.1
    weight_decay: float = 0.0
    block: int = 64
    freeze_last: float = 0.5              # masks frozen for this last fraction of the budget
    mask_updates: int = 20                # mask updates on the ramp (each one recalibrates and refits)
    score: Optional[str] = None           # block selection (None: obs with --refit, else activation)
    refit: bool = True
    sequential: Optional[bool] = None     # mask updates layer by layer, each calibrated on the layers pruned before
                                          # (None: wherever an update calibrates: --score activation/obs or --refit)
    calib_tokens: int = 4096
    distill: Optional[float] = None       # KL-to-the-dense-model weight (None: 1 sparse, 0 dense baseline)
    regrow: float = 0.0
    skip_layers: Sequence[int] = ()
    train: str = "all"                    # all parameters, or only the MLPs'
    device: str = "auto"
    compile: str = "auto"                 # auto: default on CUDA, none on CPU
    compile_sparse: Optional[bool] = None  # hand the frozen-mask phase to backend="blast" (None: when compiling)
    blast_min_sparsity: Optional[float] = None  # backend option min_sparsity (None: the backend's default)
    eval_points: int = 8                  # held-out evaluations over the run (the curve)
    val_fraction: float = 0.02            # tail of the training tokens kept out of training to choose the model
    keep: str = "best"                    # the model saved: best (lowest validation ppl at the final masks) or last
    checkpoint_every: int = 0             # tokens between checkpoints (0: a quarter of the budget)
    resume: bool = False
    stop_at: int = 0                      # stop after this many tokens with a checkpoint (0: run to the end)
    curve: bool = False                   # write curve.json + curve.png
    compare: Sequence[str] = ()           # other runs' report.json drawn on the curve
    bench_mlp: bool = True
    bench_rows: Sequence[int] = ()        # rows of the MLP timing (default: 1 and batch x seq, at most 4096)
    seed: int = 0
    progress: bool = True

    # options that define a run: a checkpoint resumes only under the same ones
    RUN_KEYS = ("model", "sparsity", "dense_baseline", "tokens", "seq", "batch", "lr", "schedule", "warmup",
                "min_lr", "weight_decay", "block", "freeze_last", "mask_updates", "score", "refit", "sequential",
                "calib_tokens", "distill", "regrow", "skip_layers", "train", "seed", "val_fraction")

    @property
    def distill_weight(self) -> float:
        if self.distill is not None:
            return float(self.distill)
        return 0.0 if self.dense_baseline else 1.0

    @property
    def recalibrates(self) -> bool:
        """A mask update calibrates on the model's inputs (activation scores or the refit need them)."""
        return self.block_score in ("activation", "obs") or self.refit

    @property
    def block_score(self) -> str:
        return self.score or ("obs" if self.refit else "activation")

    @property
    def sequential_updates(self) -> bool:
        return self.recalibrates if self.sequential is None else bool(self.sequential)

    def run_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.RUN_KEYS}
        d["model"] = os.path.abspath(d["model"]) if d["model"] else d["model"]
        d["skip_layers"] = list(d["skip_layers"])
        d["sequential"] = self.sequential_updates  # (what the run does: a default resolved, as an explicit flag)
        d["score"] = self.block_score
        return d


def check(o: Options, files: bool = True) -> None:
    """Raise :class:`SparsifyError` naming the first bad option; checks what needs no model loaded
    (``files=False``: the caller passes the model and tokens itself, so MODEL and TEXT are not looked at)."""
    if o.dense_baseline:
        if o.sparsity not in (None, 0, 0.0):
            raise SparsifyError("--sparsity", "a dense baseline prunes nothing: leave --sparsity out")
    elif o.sparsity is None or not 0.0 < float(o.sparsity) < 1.0:
        raise SparsifyError("--sparsity", f"{o.sparsity} is outside (0, 1): the fraction of MLP blocks pruned, "
                                          "e.g. 0.9 (for a dense fine-tune with the same budget: --dense-baseline)")
    for name, v, lo in (("--seq", o.seq, 2), ("--batch", o.batch, 1), ("--mask-updates", o.mask_updates, 1),
                        ("--eval-points", o.eval_points, 1), ("--tokens", o.tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise SparsifyError(name, f"{v!r} must be an integer >= {lo}")
    if o.tokens < o.batch * o.seq:
        raise SparsifyError("--tokens", f"{o.tokens} is less than one step ({o.batch} x {o.seq} tokens)")
    for name, v in (("--eval-tokens", o.eval_tokens), ("--calib-tokens", o.calib_tokens),
                    ("--checkpoint-every", o.checkpoint_every), ("--stop-at", o.stop_at)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SparsifyError(name, f"{v!r} must be an integer >= 0")
    if not (isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and o.lr > 0):
        raise SparsifyError("--lr", f"{o.lr!r} must be a finite number > 0")
    for name, v, lo, hi in (("--warmup", o.warmup, 0, 1), ("--min-lr", o.min_lr, 0, 1),
                            ("--freeze-last", o.freeze_last, 0, 1), ("--regrow", o.regrow, 0, 1),
                            ("--eval-fraction", o.eval_fraction, 0, 0.5)):
        if not (isinstance(v, (int, float)) and lo <= v < hi) or (name == "--eval-fraction" and v == 0):
            raise SparsifyError(name, f"{v!r} is outside [{lo}, {hi})" if name != "--eval-fraction"
                                else f"{v!r} is outside (0, 0.5)")
    if not (isinstance(o.val_fraction, (int, float)) and 0 <= o.val_fraction < 0.5):
        raise SparsifyError("--val-fraction", f"{o.val_fraction!r} is outside [0, 0.5)")
    if o.keep not in ("best", "last"):
        raise SparsifyError("--keep", f"{o.keep!r} is not best or last")
    if o.keep == "best" and o.val_fraction == 0:
        raise SparsifyError("--keep", "best needs a validation split to choose by: --val-fraction > 0 "
                                      "(or --keep last)")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise SparsifyError("--weight-decay", f"{o.weight_decay} must be a finite number >= 0")
    if o.distill is not None and not (math.isfinite(o.distill) and o.distill >= 0):
        raise SparsifyError("--distill", f"{o.distill} must be a finite number >= 0")
    if o.blast_min_sparsity is not None and not 0 <= o.blast_min_sparsity < 1:
        raise SparsifyError("--blast-min-sparsity", f"{o.blast_min_sparsity} is outside [0, 1)")
    if o.sequential and not o.recalibrates:
        raise SparsifyError("--sequential", "has nothing to recalibrate: it needs --score activation, --score obs "
                                            "or --refit")
    if o.block not in BLOCK_CHOICES:
        raise SparsifyError("--block", f"{o.block} is not one of {', '.join(map(str, BLOCK_CHOICES))} (the block "
                                       "sizes the blast backend fuses)")
    if o.block_score == "obs" and not o.refit:
        raise SparsifyError("--score", "obs picks the blocks whose loss the refit repairs best: it needs --refit")
    for name, v, ok in (("--score", o.block_score, ("activation", "obs", "magnitude", "movement")),
                        ("--schedule", o.schedule, ("cosine", "constant")), ("--train", o.train, ("all", "mlp")),
                        ("--compile", o.compile, ("auto", "none", "default", "reduce-overhead")),
                        ("--device", o.device.split(":")[0], ("auto", "cpu", "cuda"))):
        if v not in ok:
            raise SparsifyError(name, f"{v!r} is not one of {', '.join(ok)}")
    if o.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SparsifyError("--device", f"{o.device}: no CUDA device here")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in o.skip_layers):
        raise SparsifyError("--skip-layers", f"{list(o.skip_layers)}: decoder layer indices (>= 0)")
    if any(not isinstance(r, int) or r < 1 for r in o.bench_rows):
        raise SparsifyError("--bench-rows", f"{list(o.bench_rows)}: row counts (>= 1)")
    if files:
        _check_model_path(o.model)
        if not o.data:
            raise SparsifyError("TEXT", "no training text given")
    for arg, paths in (("TEXT", o.data if files else ()), ("--eval", o.eval if files else ()),
                       ("--compare", o.compare)):
        for p in paths:
            _check_readable(arg, p)
    if o.out is not None and os.path.exists(o.out) and not os.path.isdir(o.out):
        raise SparsifyError("--out", f"{o.out} exists and is not a directory")


def _check_model_path(path: str) -> None:
    if not path:
        raise SparsifyError("MODEL", "no model given (a transformers model directory or a .gguf file)")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SparsifyError("MODEL", f"{path} has no config.json: not a transformers model directory")
    elif os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise SparsifyError("MODEL", f"{path}: a model is a transformers directory or a .gguf file")
        _check_readable("MODEL", path)
    else:
        raise SparsifyError("MODEL", f"{path}: no such file or directory")


def _check_readable(arg: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise SparsifyError(arg, f"cannot read {path} ({e.strerror or e})") from None


# ------------------------------------------------------------------ command line
def _tokens(text: str) -> int:
    """``20M``, ``500k``, ``1e6``, ``65536`` -> int."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 20M, 500k, 65536)") from None
    if v < 0 or v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole, non-negative token count")
    return int(v)


def _ints(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None


def _number(kind):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``blast sparsify`` (types only; :func:`check` validates ranges with the model's help)."""
    d = Options()
    p.add_argument("model", metavar="MODEL", help="pretrained causal LM: a transformers model directory or a .gguf file")
    p.add_argument("data", metavar="TEXT", nargs="+",
                   help="training text: raw text files (tokenized with the model's tokenizer) or .safetensors token "
                        "files (tensor 'train'; any other tensor is a held-out set; examples/prepare_data.py --model)")
    p.add_argument("--out", required=True, help="output directory: model/, masks.safetensors, report.json")
    p.add_argument("--sparsity", type=_number(float), default=None,
                   help=f"fraction of MLP weight blocks pruned, in (0, 1) (default: {d.sparsity})")
    p.add_argument("--dense-baseline", action="store_true",
                   help="fine-tune dense with the same budget and recipe instead (the reference for the sparse runs)")
    p.add_argument("--eval", nargs="+", default=[], metavar="FILE",
                   help="held-out text or token files (default: the token files' held-out tensors, else the last "
                        "--eval-fraction of the raw text)")
    p.add_argument("--eval-fraction", type=_number(float), default=d.eval_fraction)
    p.add_argument("--eval-tokens", type=_tokens, default=d.eval_tokens, help="cap per held-out set (0: all)")
    p.add_argument("--tokens", type=_tokens, default=d.tokens, help="training budget in tokens (20M, 500k, ...)")
    p.add_argument("--seq", type=_number(int), default=d.seq, help="tokens per sequence")
    p.add_argument("--batch", type=_number(int), default=d.batch, help="sequences per step")
    p.add_argument("--lr", type=_number(float), default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--schedule", default=d.schedule, help="lr after warm-up: cosine or constant")
    p.add_argument("--warmup", type=_number(float), default=d.warmup, help="warm-up, fraction of the budget")
    p.add_argument("--min-lr", type=_number(float), default=d.min_lr, help="cosine floor, fraction of --lr")
    p.add_argument("--weight-decay", type=_number(float), default=d.weight_decay)
    p.add_argument("--block", type=_number(int), default=d.block, help="block size (square) of the masks")
    p.add_argument("--freeze-last", type=_number(float), default=d.freeze_last,
                   help="fraction of the budget trained with the final masks")
    p.add_argument("--mask-updates", type=_number(int), default=d.mask_updates,
                   help="mask updates on the ramp (each recalibrates, and refits with --refit)")
    p.add_argument("--score", default=d.score,
                   help="block selection: obs (greedy Optimal Brain Surgeon on the refit's loss, hidden units "
                        "weighted by what the MLP's output reads of them; needs --refit), activation (W^2 E[x^2]), "
                        "magnitude or movement (default: obs, or activation with --no-refit)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=d.refit,
                   help="least-squares refit of the surviving blocks at each mask update")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=d.sequential,
                   help="each mask update prunes decoder layer by decoder layer, recalibrating before each, so a "
                        "layer is scored and refit on the inputs of the layers pruned before it (one calibration "
                        "pass per layer and update; default: on where updates calibrate, i.e. --score activation "
                        "or obs, or --refit)")
    p.add_argument("--calib-tokens", type=_tokens, default=d.calib_tokens,
                   help="training tokens run through the model before each mask update (activation/obs score, refit)")
    p.add_argument("--distill", type=_number(float), default=None,
                   help="weight of KL(dense model || student) in the loss (default: 1 sparse, 0 --dense-baseline)")
    p.add_argument("--regrow", type=_number(float), default=d.regrow, help="RigL regrowth fraction per update")
    p.add_argument("--skip-layers", type=_ints, default=(), help="comma list of decoder layers whose MLP stays dense")
    p.add_argument("--train", default=d.train, help="all: every parameter; mlp: the MLP weights only")
    p.add_argument("--device", default=d.device, help="auto (cuda if present), cpu, cuda[:N]")
    p.add_argument("--compile", default=d.compile,
                   help="torch.compile mode of training: auto (default on CUDA, none on CPU), none, default, "
                        "reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-sparse", action=argparse.BooleanOptionalAction, default=None,
                   help="once the masks are frozen, train through torch.compile(backend='blast') (default: on when "
                        "compiling)")
    p.add_argument("--blast-min-sparsity", type=_number(float), default=None,
                   help="backend option min_sparsity for the frozen-mask phase")
    p.add_argument("--eval-points", type=_number(int), default=d.eval_points, help="held-out evaluations over the run")
    p.add_argument("--val-fraction", type=_number(float), default=d.val_fraction,
                   help="tail of the training tokens held out as a validation set: it chooses the saved model "
                        "(--keep best), never the held-out sets the report measures (0: none)")
    p.add_argument("--keep", default=d.keep,
                   help="the model saved and reported: best (lowest validation perplexity among the evaluations "
                        "with the final masks; a small text is overfit long before a large budget ends) or last")
    p.add_argument("--checkpoint-every", type=_tokens, default=d.checkpoint_every,
                   help="tokens between checkpoints (0: a quarter of the budget)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors if there is one")
    p.add_argument("--stop-at", type=_tokens, default=0,
                   help="stop after this many tokens, leaving a checkpoint (--resume continues; 0: run to the end)")
    p.add_argument("--curve", action="store_true", help="write curve.json and curve.png (held-out ppl vs tokens)")
    p.add_argument("--compare", nargs="+", default=[], metavar="REPORT",
                   help="report.json of other runs (e.g. the dense baseline) to draw on the curve")
    p.add_argument("--bench-mlp", action=argparse.BooleanOptionalAction, default=d.bench_mlp,
                   help="time one fused MLP against dense on this device for the report")
    p.add_argument("--bench-rows", type=_ints, default=(), help="rows of the MLP timing (default: 1,min(batch*seq,4096))")
    p.add_argument("--seed", type=_number(int), default=d.seed)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def from_args(a: argparse.Namespace) -> Options:
    fields = {f.name for f in dataclasses.fields(Options)}
    kw = {k: v for k, v in vars(a).items() if k in fields}
    if kw.get("sparsity") is None and not kw.get("dense_baseline"):
        kw["sparsity"] = Options.sparsity
    for k in ("data", "eval", "compare", "skip_layers", "bench_rows"):
        kw[k] = tuple(kw.get(k) or ())
    return Options(**kw)


__all__ = ["Options", "SparsifyError", "add_arguments", "check", "from_args"]
