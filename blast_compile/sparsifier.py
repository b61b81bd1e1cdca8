"""BLaST-style block sparsifier for training (fine-tuning and from-scratch pretraining).

    sp = BlastSparsifier(model, target_sparsity=0.9, block_size=64, end_step=steps, optimizer=opt)
    for batch in data:
        loss(model, batch).backward(); opt.step(); opt.zero_grad()
        sp.step()                      # after optimizer.step(): masks on schedule, re-applied
    sp.finalize()                      # squash: plain weights holding zero blocks

The recipe (what is known to work; BLaST's own text was not available):

* **cubic ramp** (Zhu & Gupta): ``s_t = s_f + (s_i - s_f)(1 - progress)^3``, the
  ramp spanning the first ``1 - freeze_last`` of ``[start_step, end_step]``;
  masks are recomputed every ``update_every`` steps on the ramp and frozen after.
* **block score**: the block's L2 norm (``magnitude``), ``|W * grad|``
  accumulated since the last update (``movement``), or ``W^2 E[x^2]`` from
  calibration inputs (``activation``; with ``reconstruct=True`` each update also
  refits the surviving blocks by least squares: :mod:`blast_compile.calibrate`,
  for models whose few massive input channels make magnitude a poor guide), or the blocks the
  refit repairs best (``obs``, with ``reconstruct=True``: greedy Optimal Brain Surgeon on the
  refit's own loss, gate/up rows weighted by what their hidden units carry to the output).
  Each layer keeps the same fraction of blocks; ``balanced=True`` keeps the same count in
  every block-row, which lets the fused kernels use constexpr trip counts. Measured: no faster than
  as many blocks placed freely, and worse perplexity (RESULTS.md, "Variants"); the
  per-row count also rounds coarsely on narrow weights (1 of 8 blocks is 87.5 %).
  Kept as an option, not a recommendation. With ``tie_gate_up``
  (default) a gated MLP's gate and up projections share one mask, and so do the
  two halves of a fused ``gate_up_proj`` (Phi-3, GLM): the fused op reads the
  union of both, so separate masks would cost live blocks.
* **prune-and-grow** (RigL): with ``regrow=f`` (``True``: 0.3, RigL's), an update drops ``f`` of the kept
  blocks more and re-activates as many dead blocks with the largest accumulated
  gradient norm. Grown blocks start at zero. Regrowth needs *dense* gradients:
  a fused ``blast::sparse_mlp`` computes dW only on live blocks, so run the
  regrowth phase eagerly or with Inductor (the examples switch to
  ``backend="blast"`` once masks are frozen).
* **pruned stays pruned**: a gradient hook zeroes dead-block gradients, the
  optimizer state of newly pruned blocks is zeroed (Adam moments, momentum
  buffers: momentum would otherwise revive a block), and ``step()`` re-applies
  the masks.
* **hand-off**: once masks are frozen and the model is compiled with
  ``backend="blast"``, the fused op already computes dW only on live blocks, so
  the per-step upkeep (a multiply per gradient and per weight) changes nothing. ``hand_off()`` stops it and instead checks every
  ``check_every`` steps that the dead blocks are still exactly zero; if one is
  not (a backward that did not go through the fused op), it warns, re-masks,
  clears the optimizer state there and resumes the upkeep.

Every mask change is declared with :func:`blast_compile.masks.declare_mask`, so
a compiled model's fused op re-derives its pattern (the mask tensor is new) and
computes dW only on live blocks.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from . import calibrate as _cal
from . import layouts
from . import masks as _masks
from .formats import BLOCK_CHOICES, cdiv, expand_mask

log = logging.getLogger("blast_compile.sparsifier")
REGROW_DEFAULT = 0.3  # regrow=True: the fraction of kept blocks RigL drops and regrows per update
MASKS_FORMAT = "blast-block-masks-v1"  # save_masks metadata; load_masks refuses other formats

# Module names of MLP projections (the families of blast_compile.layouts), wherever they appear.
_MLP_LEAF = re.compile(r"(^|\.)(" + "|".join(sorted(layouts.leaf_names())) + r")$")
# a fused gate|up projection: rows [0, h) and [h, 2h) are the gate and up weights (Phi-3, GLM)
_FUSED_GATE_UP = layouts.fused_gate_up_names()
_MLP_PARENT = re.compile(r"(^|\.)(mlp|feed_forward|ffn|intermediate)(\.|$)")


def _is_2d_weight_module(m: nn.Module) -> bool:
    # nn.Linear and HF's Conv1D (GPT-2: weight [in, out]); square blocks make the orientation moot.
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")


def default_layer_filter(name: str, module: nn.Module) -> bool:
    """MLP weights, by module name: ``*.gate_proj``/``fc1``/``c_fc``/``w1``... or anything under ``mlp.``."""
    return _is_2d_weight_module(module) and bool(_MLP_LEAF.search(name) or _MLP_PARENT.search(name))


def cubic_sparsity(step: int, s_i: float, s_f: float, start: int, ramp_end: int) -> float:
    if step <= start:
        return s_i
    if step >= ramp_end:
        return s_f
    p = (step - start) / max(ramp_end - start, 1)
    return s_f + (s_i - s_f) * (1.0 - p) ** 3


def _block_sum(t: torch.Tensor, b: int) -> torch.Tensor:
    """Per-block sum of ``t`` (2-D), zero-padding ragged edges: ``[ceil(O/b), ceil(I/b)]``."""
    o, i = t.shape
    ro, ri = cdiv(o, b), cdiv(i, b)
    if ro * b != o or ri * b != i:
        t = nn.functional.pad(t, (0, ri * b - i, 0, ro * b - o))
    return t.reshape(ro, b, ri, b).sum(dim=(1, 3))


def _topk_mask(score: torch.Tensor, k: int, balanced: bool, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool mask with the ``k`` best-scoring blocks (``k`` per row when balanced) among ``allowed``."""
    score = score.float().clone()
    if allowed is not None:
        score[~allowed] = -math.inf
    out = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return out
    if balanced:
        idx = torch.topk(score, min(k, score.shape[1]), dim=1).indices
        out.scatter_(1, idx, True)
    else:
        idx = torch.topk(score.flatten(), min(k, score.numel())).indices
        out.view(-1)[idx] = True
    if allowed is not None:
        out &= allowed  # k may exceed the allowed count: never pick a forbidden block
    return out


class _Layer:
    __slots__ = ("name", "module", "param", "mask", "emask", "score_acc", "grad_acc", "hook", "shape", "stats",
                 "in_dim")

    def __init__(self, name, module, b):
        self.name, self.module, self.param = name, module, module.weight
        self.in_dim = 0 if type(module).__name__ == "Conv1D" else 1  # (GPT-2's Conv1D: weight [in, out])
        self.stats = None  # calibrate.InputStats of the layer's inputs (score="activation", reconstruct)
        self.shape = tuple(self.param.shape)
        self.mask = torch.ones(cdiv(self.shape[0], b), cdiv(self.shape[1], b), dtype=torch.bool, device=self.param.device)
        self.emask = None  # element mask in the weight's dtype (cached: used every step)
        self.score_acc = None  # movement score accumulator
        self.grad_acc = None  # regrowth: accumulated squared block gradient norms
        self.hook = None


class BlastSparsifier:
    """Block-sparsify the MLP weights of ``model`` on a cubic schedule (see module docstring).

    ``end_step`` is the step at which training ends (required unless the schedule is
    trivially constant); ``freeze_last`` the fraction of ``[start_step, end_step]``
    during which masks no longer change; ``update_every`` defaults to ~1% of the ramp.
    ``calibrate``: a callable that runs a few batches through the model, called at construction
    and before every mask update to record the sparsified layers' inputs (``score="activation"``,
    ``reconstruct=True``; :mod:`blast_compile.calibrate`). Let it call the eager model: the
    recording uses forward hooks, which a compiled model would recompile for.
    ``sequential``: each mask update prunes decoder layer by decoder layer, calling ``calibrate`` again before each
    (after the first) so that a layer is scored and refit on the inputs the layers pruned before it give it, as
    SparseGPT does -- one calibration pass per decoder layer and update instead of one per update.
    """

    def __init__(
        self,
        model: nn.Module,
        target_sparsity: float = 0.9,
        block_size: int = 64,
        schedule: str = "cubic",
        start_step: int = 0,
        end_step: Optional[int] = None,
        update_every: Optional[int] = None,
        freeze_last: float = 0.25,
        score: str = "magnitude",
        regrow: Union[bool, float] = False,
        balanced: bool = False,
        layers: Optional[Union[Iterable, Callable[[str, nn.Module], bool]]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        initial_sparsity: float = 0.0,
        declare: bool = True,
        tie_gate_up: bool = True,
        reconstruct: bool = False,
        calibrate: Optional[Callable[[], object]] = None,
        sequential: bool = False,
    ):
        def fraction(name, v, lo=0.0, hi=1.0):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi:
                raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}), not {v!r}")

        fraction("target_sparsity", target_sparsity)
        fraction("initial_sparsity", initial_sparsity, hi=float(target_sparsity) + 1e-12)
        if not isinstance(regrow, bool):
            fraction("regrow", regrow)
        if update_every is not None and (isinstance(update_every, bool) or not isinstance(update_every, int)
                                         or update_every < 1):
            raise ValueError(f"update_every must be a positive int (steps between mask updates), not {update_every!r}")
        if schedule not in ("cubic", "linear", "constant"):
            raise ValueError(f"schedule must be cubic, linear or constant, not {schedule!r}")
        if score not in ("magnitude", "movement", "activation", "obs"):
            raise ValueError(f"score must be 'magnitude', 'movement', 'activation' or 'obs', not {score!r}")
        if score == "obs" and not reconstruct:
            raise ValueError("score='obs' picks the blocks whose loss the refit repairs best: it needs "
                             "reconstruct=True")
        if sequential and (calibrate is None or not (score == "activation" or reconstruct)):
            raise ValueError("sequential=True recalibrates before each decoder layer: it needs calibrate= and "
                             "score='activation' or reconstruct=True")
        if end_step is None:
            if schedule != "constant":
                raise ValueError("end_step (the last training step) is required for a ramp")
            end_step = start_step
        if not 0.0 <= freeze_last < 1.0:
            raise ValueError("freeze_last is a fraction in [0, 1)")
        ramp = int(round((1.0 - freeze_last) * (end_step - start_step)))  # steps from start_step to the freeze
        if schedule != "constant" and ramp <= 0:
            raise ValueError(f"the ramp is empty: it runs from start_step={start_step} to start_step + "
                             f"(1 - freeze_last) * (end_step - start_step) with end_step={end_step}, "
                             f"freeze_last={freeze_last}; "
                             "end_step must lie after start_step (or schedule='constant': one prune at the start)")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_CHOICES:
            # The fused op computes dW on whole blocks of the size the backend picks from BLOCK_CHOICES:
            # masks in other units (24) would leave declared-dead parts inside live fused blocks.
            raise ValueError(f"block_size must be one of {', '.join(map(str, BLOCK_CHOICES))} (the block sizes the "
                             f"blast backend fuses), not {block_size!r}")
        self.model = model
        self.target_sparsity = float(target_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.block_size = int(block_size)
        self.schedule = schedule
        self.start_step = int(start_step)
        self.end_step = int(end_step)
        self.freeze_last = float(freeze_last)
        self.ramp_end = self.start_step + ramp
        self.update_every = int(update_every or max(1, (self.ramp_end - self.start_step) // 100))
        self.score = score
        self.reconstruct = bool(reconstruct)
        self.calibrate = calibrate
        self.sequential = bool(sequential)
        self._outs = None  # in-projection name -> its down projection's (score="obs" weights hidden units by it)
        self.regrow = (REGROW_DEFAULT if regrow else 0.0) if isinstance(regrow, bool) else float(regrow)
        self.balanced = bool(balanced)
        self.optimizer = optimizer
        self.declare = declare
        self.step_count = 0
        self.finalized = False
        # seconds of step(): "update" (synchronized: GPU time included) / "plain" (host time only)
        self.timings: Dict[str, List[float]] = defaultdict(list)
        self.history: List[tuple] = []  # (step, sparsity target) of every mask update
        self.check_every = 0  # > 0: handed off (see hand_off)
        self.upkeep_restored = 0  # hand-off checks that found a revived dead block
        self.last_grown: Dict[str, torch.Tensor] = {}  # regrowth: blocks grown at the last update
        self.layers: Dict[str, _Layer] = {}
        for name, mod in self._select(layers):
            self.layers[name] = _Layer(name, mod, self.block_size)
        if not self.layers:
            raise ValueError("no layers to sparsify (pass layers=[...] or a filter)")
        self.tie_gate_up = bool(tie_gate_up)
        self.groups = self._groups(tie_gate_up)
        for L in self.layers.values():
            self._set_mask(L, L.mask, grown=None)
        self._set_hooks(True)
        self._recalibrate()  # (before the first masks: a one-shot prune is scored and refit with them)
        if self.initial_sparsity > 0 or self.start_step == 0:
            self._update_masks(self.sparsity_at(0))
        log.info("BlastSparsifier: %d layers, block %d, target %.0f%%, ramp %d..%d every %d steps",
                 len(self.layers), self.block_size, 100 * self.target_sparsity, self.start_step, self.ramp_end,
                 self.update_every)

    # ---------------------------------------------------------------- selection
    def _select(self, layers):
        named = list(self.model.named_modules())
        if layers is None:  # by name, plus the projections of MLPs the layouts find (BERT's output.dense)
            found = {q for mlp in layouts.mlp_modules(self.model) for q in mlp.quals.values()}
            return [(n, m) for n, m in named if default_layer_filter(n, m) or (n in found and _is_2d_weight_module(m))]
        if callable(layers):
            return [(n, m) for n, m in named if _is_2d_weight_module(m) and layers(n, m)]
        want = list(layers)
        by_name = dict(named)
        out = []
        for item in want:
            if isinstance(item, str):
                if item not in by_name:
                    raise KeyError(f"no module named {item!r}")
                if not _is_2d_weight_module(by_name[item]):
                    raise ValueError(f"layers: {item!r} is a {type(by_name[item]).__name__}, not a projection with a "
                                     "2-D weight (nn.Linear or transformers' Conv1D)")
                out.append((item, by_name[item]))
            else:
                n = next((n for n, m in named if m is item), None)
                if n is None:
                    raise KeyError("module is not part of the model")
                out.append((n, item))
        return out

    def _groups(self, tie: bool) -> List[List[str]]:
        """Layers that share one mask: a gated MLP's gate and up projections (the fused op
        reads the union of their masks, so independent masks would cost live blocks)."""
        groups, seen = [], set()
        pairs = layouts.tied_gate_up_paths()
        for n, L in self.layers.items():
            if n in seen:
                continue
            g = [n]
            parent, _, leaf = n.rpartition(".")
            for a, b in pairs if tie else ():
                if leaf == a:
                    other = f"{parent}.{b}" if parent else b
                    if other in self.layers and self.layers[other].shape == L.shape:
                        g.append(other)
            seen.update(g)
            groups.append(g)
        return groups

    # ---------------------------------------------------------------- schedule
    def sparsity_at(self, step: int) -> float:
        if self.schedule == "constant":
            return self.target_sparsity
        if self.schedule == "linear":
            if step <= self.start_step:
                return self.initial_sparsity
            p = min(1.0, (step - self.start_step) / max(self.ramp_end - self.start_step, 1))
            return self.initial_sparsity + (self.target_sparsity - self.initial_sparsity) * p
        return cubic_sparsity(step, self.initial_sparsity, self.target_sparsity, self.start_step, self.ramp_end)

    def is_update_step(self, step: int) -> bool:
        if self.finalized or step < self.start_step or step > self.ramp_end:
            return False
        return (step - self.start_step) % self.update_every == 0 or step == self.ramp_end

    @property
    def frozen(self) -> bool:
        return self.finalized or self.step_count >= self.ramp_end

    # ---------------------------------------------------------------- hooks
    def _make_hook(self, L: _Layer):
        b = self.block_size

        def hook(g):
            if self.finalized:
                return g
            if not self.frozen:
                if self.score == "movement":
                    s = _block_sum((L.param.detach() * g).abs().float(), b)
                    L.score_acc = s if L.score_acc is None else L.score_acc + s
                if self.regrow:
                    s = _block_sum(g.float().square(), b)
                    L.grad_acc = s if L.grad_acc is None else L.grad_acc + s
            return g * L.emask

        return hook

    # ---------------------------------------------------------------- masks
    @torch.no_grad()
    def _set_mask(self, L: _Layer, mask: torch.Tensor, grown: Optional[torch.Tensor]):
        b = self.block_size
        L.mask = mask.to(L.param.device, torch.bool)
        L.emask = expand_mask(L.mask, b, b, L.shape).to(L.param.dtype)
        p = L.param
        p.mul_(L.emask)
        state_mask = L.emask
        if grown is not None and bool(grown.any()):
            # RigL: new blocks start from zero (value and optimizer state).
            keep = expand_mask(~grown.to(p.device), b, b, L.shape).to(p.dtype)
            p.mul_(keep)
            state_mask = state_mask * keep
        self._zero_state(p, state_mask)
        if self.declare:
            _masks.declare_mask(p, L.mask, (b, b))

    def _zero_state(self, p: torch.Tensor, emask: torch.Tensor):
        if self.optimizer is None:
            return
        st = self.optimizer.state.get(p)
        if not st:
            return
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.mul_(emask.to(v.dtype))

    def _score(self, L: _Layer) -> torch.Tensor:
        """Squared block score (sums over a tied group)."""
        if self.score == "movement" and L.score_acc is not None:
            return L.score_acc
        if self.score == "activation":
            return _block_sum(_cal.activation_score(L.param, self._stats(L), L.in_dim), self.block_size)
        return _block_sum(L.param.detach().float().square(), self.block_size)

    def _stats(self, L: _Layer):
        if L.stats is None or L.stats.gram is None:
            raise RuntimeError(f"BlastSparsifier: layer {L.name!r} has no calibration inputs (score='activation' "
                               "and reconstruct=True need them): pass calibrate=fn, or run batches inside "
                               "`with sparsifier.calibration():` before the first mask update")
        return L.stats

    def _recalibrate(self, names: Optional[List[str]] = None):
        """Run the user's ``calibrate`` batches (if any) under ``calibration(names)``."""
        if self.calibrate is not None:
            with self.calibration(names):
                self.calibrate()

    @contextlib.contextmanager
    def calibration(self, names: Optional[List[str]] = None):
        """``with sparsifier.calibration(): model(batch) ...``: record the sparsified layers' inputs (their
        Gram matrices) for ``score="activation"`` and ``reconstruct``; they replace earlier ones. ``names``:
        only those layers'."""
        with _cal.collecting({n: self.layers[n].module for n in (names or self.layers)}) as stats:
            yield
        for n, st in stats.items():
            if st.gram is not None:
                self.layers[n].stats = st

    def _n_keep(self, L: _Layer, sparsity: float, rows: Optional[int] = None) -> int:
        r, c = L.mask.shape
        per = c if self.balanced else (rows or r) * c
        return max(1, int(round((1.0 - sparsity) * per)))

    def _mlp_sides(self):
        """Per MLP (found by :mod:`layouts`): it, and its sparsified in-projections' and out-projections' layers."""
        for mlp in layouts.mlp_modules(self.model):
            def side(roles):
                return [self.layers[q] for r, q in mlp.quals.items() if r in roles and q in self.layers]

            yield mlp, side(layouts.IN_ROLES), side(layouts.OUT_ROLES)

    def _out_layer(self, name: str) -> Optional[_Layer]:
        """The sparsified down projection of the MLP whose in-projection is ``name`` (None if it has none)."""
        if self._outs is None:
            self._outs = {L.name: lo[0] for _, li, lo in self._mlp_sides() if len(lo) == 1 for L in li}
        return self._outs.get(name)

    def _obs_mask(self, Ls: List[_Layer], k: int, halves: bool) -> torch.Tensor:
        """score="obs": the ``k`` blocks of a tied group by :func:`calibrate.obs_keep`, its rows weighted by the
        MLP's down projection where that is sparsified and calibrated too."""
        parts = {}  # (one entry when gate and up share their inputs' Gram matrix)
        for L in Ls:
            st = self._stats(L)
            parts.setdefault(id(st), (st, []))[1].append(L.param)
        down, alphas = self._out_layer(Ls[0].name), None
        if down is not None and down.stats is not None and down.stats.gram is not None:
            alphas = [_cal.hidden_weights(ws, st, down.param, down.stats, Ls[0].in_dim, down.in_dim)
                      for st, ws in parts.values()]
            alphas = None if any(a is None for a in alphas) else alphas
        return _cal.obs_keep([(ws, st) for st, ws in parts.values()], self.block_size, Ls[0].in_dim, k,
                             self.balanced, halves, row_weights=alphas)

    def _halves(self, L: _Layer) -> bool:
        """A fused gate|up weight (``gate_up_proj``: Phi-3, GLM) whose halves split on a block row: its
        two halves get one mask (the fused op reads their union, as for tied gate and up layers)."""
        return (self.tie_gate_up and L.name.rpartition(".")[2] in _FUSED_GATE_UP
                and L.shape[0] % (2 * self.block_size) == 0)

    def _stages(self) -> List[List[List[str]]]:
        """The groups by decoder layer (``layers.<i>.`` in their names; any other group alone), in model order.
        A layer's down projection is scored and refit on the hidden units of its unpruned gate and up: on those
        of the pruned ones (a second calibration pass per layer) one-shot pruning came out worse (RESULTS.md)."""
        stages: Dict[str, List[List[str]]] = {}
        for g in self.groups:
            m = re.search(r"(^|\.)layers\.(\d+)\.", g[0])
            stages.setdefault(g[0][:m.end()] if m else g[0], []).append(g)  # ("model.layers.3.": per stack)
        return list(stages.values())

    @torch.no_grad()
    def _update_masks(self, sparsity: float):
        if self.sequential and sparsity > 0 and self.calibrate is not None:  # (the constructor checked the score)
            for i, groups in enumerate(self._stages()):
                if i:  # (the first stage's inputs were just recorded: nothing was pruned before it)
                    self._recalibrate([n for g in groups for n in g])
                self._update_groups(groups, sparsity)
        else:
            self._update_groups(self.groups, sparsity)
        self.history.append((self.step_count, sparsity))

    def _update_groups(self, groups, sparsity: float):
        for names in groups:
            Ls = [self.layers[n] for n in names]
            L0 = Ls[0]
            halves = self._halves(L0)

            def fold(t):  # a fused gate|up weight: score its two halves as one
                return t[: t.shape[0] // 2] + t[t.shape[0] // 2:] if halves else t

            def unfold(m):
                return torch.cat([m, m]) if halves else m

            gacc = [fold(L.grad_acc) for L in Ls if L.grad_acc is not None]
            k = self._n_keep(L0, sparsity, rows=fold(L0.mask).shape[0])
            n_grow = int(self.regrow * k) if (self.regrow and gacc and sparsity > 0) else 0
            if self.score == "obs" and sparsity > 0:
                mask = self._obs_mask(Ls, k - n_grow, halves)
            else:  # (sparsity 0 keeps every block: no score, so none is needed before calibration)
                score = fold(sum(self._score(L) for L in Ls) if sparsity > 0
                             else torch.ones(L0.mask.shape, device=L0.mask.device))
                mask = _topk_mask(score, k - n_grow, self.balanced)
            grown = None
            if n_grow:
                # grow among the blocks not kept, by accumulated gradient norm (needs dense grads)
                grown = _topk_mask(sum(gacc), n_grow, self.balanced, allowed=~mask)
                mask = mask | grown  # RigL: every grown block (even one dropped just now) restarts from zero
                grown = unfold(grown)
                self.last_grown.update({n: grown for n in names})
            mask = unfold(mask)
            todo = [L for L in Ls if grown is not None or not torch.equal(mask, L.mask)]
            if self.reconstruct and sparsity > 0:  # survivors take over the pruned blocks' output
                stats = [self._stats(L) for L in todo]
                for st in {id(st): st for st in stats}.values():  # (gate and up: one shared, one solve)
                    same = [L for L, s in zip(todo, stats) if s is st]
                    _cal.refit_([L.param for L in same], mask, st, self.block_size, same[0].in_dim)
            for L in todo:
                self._set_mask(L, mask, grown)
            for L in Ls:
                L.score_acc = None
                L.grad_acc = None

    @torch.no_grad()
    def apply_masks(self):
        ps = [L.param for L in self.layers.values()]
        if ps:  # one multi-tensor launch, not one per weight (this runs every step)
            torch._foreach_mul_(ps, [L.emask for L in self.layers.values()])

    def _set_hooks(self, on: bool):
        for L in self.layers.values():
            if on and L.hook is None:
                L.hook = L.param.register_hook(self._make_hook(L))
            elif not on and L.hook is not None:
                L.hook.remove()
                L.hook = None

    @torch.no_grad()
    def _dead_blocks_zero(self) -> bool:
        ps = [L.param for L in self.layers.values()]
        dead = torch._foreach_mul(ps, [1 - L.emask for L in self.layers.values()])
        return float(torch.stack(torch._foreach_norm(dead)).max()) == 0.0

    @torch.no_grad()
    def _remask_all(self):
        """Dead blocks and their optimizer state back to exactly zero."""
        self.apply_masks()
        for L in self.layers.values():
            self._zero_state(L.param, L.emask)

    @torch.no_grad()
    def hand_off(self, check_every: int = 50):
        """Stop the per-step upkeep once masks are frozen and a model compiled with ``backend="blast"``
        computes on the declared masks (dW only on live blocks: dead blocks get zero gradients, so
        they and their optimizer state stay exactly zero by themselves). Every ``check_every``
        ``step()`` calls verify that (one synchronizing reduction); a revived dead block — a backward
        that did not go through the fused op — is warned about, re-masked, its optimizer state
        cleared, and the upkeep resumes."""
        if not self.frozen or self.finalized:
            raise RuntimeError("hand_off() needs frozen (not finalized) masks: call it after the ramp")
        if not self.declare:
            raise RuntimeError("hand_off() needs declared masks (declare=True): the fused op computes dW from them")
        if check_every < 1:
            raise ValueError("check_every must be >= 1")
        if self.optimizer is None and self.step_count > 0:
            raise ValueError("hand_off() after training steps needs the optimizer (BlastSparsifier(..., "
                             "optimizer=opt)): the sparsifier never cleared the optimizer state of the blocks it "
                             "pruned, and without the per-step upkeep that state would revive them")
        self._remask_all()
        self._set_hooks(False)
        self.check_every = int(check_every)

    @torch.no_grad()
    def _check_handed_off(self):
        if self._dead_blocks_zero():
            return
        self.upkeep_restored += 1
        log.warning("BlastSparsifier: dead blocks revived after hand_off() (a backward that did not go "
                    "through backend='blast'?): re-masking and resuming the per-step upkeep")
        self._remask_all()
        self._set_hooks(True)
        self.check_every = 0

    # ---------------------------------------------------------------- public API
    def step(self):
        """Call after ``optimizer.step()``: update masks when on schedule, then re-apply them
        (after ``hand_off()``: a periodic check instead)."""
        if self.finalized:
            return
        cuda = any(L.param.is_cuda for L in self.layers.values())
        self.step_count += 1
        upd = self.is_update_step(self.step_count)
        if cuda and upd:  # time the update alone, not the training step still queued before it
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if upd:
            self._recalibrate()  # the inputs as they are now, after earlier pruning and training
            self._update_masks(self.sparsity_at(self.step_count))
        elif self.check_every:
            if self.step_count % self.check_every == 0:
                self._check_handed_off()
        else:
            self.apply_masks()
        if cuda and upd:  # the update's cost is measured; a plain step leaves the host free to run ahead
            torch.cuda.synchronize()
        self.timings["update" if upd else "plain"].append(time.perf_counter() - t0)
        return upd

    def finalize(self, compress: bool = False):
        """Freeze and squash: remove hooks, leave plain weights holding zero blocks.

        ``compress=True`` hands the model to :func:`blast_compile.compress.compress_`.
        """
        with torch.no_grad():
            self.apply_masks()
        self._set_hooks(False)
        for L in self.layers.values():
            _masks.clear_mask(L.param)
            L.stats = None  # (calibration Gram matrices: [in, in] fp64 each)
        self.finalized = True
        if compress:
            try:
                from .compress import compress_
            except ImportError as e:
                raise RuntimeError("compress=True needs blast_compile.compress (not available)") from e
            return compress_(self.model)
        return self.model

    def layer_sparsity(self) -> Dict[str, dict]:
        out = {}
        for n, L in self.layers.items():
            w = L.param.detach()
            out[n] = dict(shape=L.shape, blocks=int(L.mask.numel()), live=int(L.mask.sum()),
                          block_sparsity=1.0 - float(L.mask.float().mean()),
                          zeros=float((w == 0).float().mean()))
        return out

    def sparsity(self) -> float:
        """Element-weighted fraction of sparsified weights in dead blocks."""
        dead = tot = 0
        for L in self.layers.values():
            ne = L.param.numel()
            dead += ne * (1.0 - float(L.mask.float().mean()))
            tot += ne
        return dead / max(tot, 1)

    def hidden_use(self) -> Dict[str, dict]:
        """Per MLP (found by :mod:`layouts`): hidden blocks live in the in-projections (gate/up), in the
        down projection, and in both; ``orphan_frac`` is the fraction of live blocks whose hidden
        block the other side does not use -- work the fused op drops, i.e. capacity lost."""
        by_parent = {mlp.name: (li, lo) for mlp, li, lo in self._mlp_sides()
                     if not mlp.layout.fused_gate_up}  # (its halves share one weight: not split here)

        def oi(L):  # the mask as [out blocks, in blocks] (Conv1D weights are [in, out])
            return L.mask if L.in_dim == 1 else L.mask.t()

        res = {}
        for parent, (li, lo) in by_parent.items():
            if not li or not lo or any(oi(L).shape[0] != oi(lo[0]).shape[1] for L in li):
                continue
            hin = torch.stack([oi(L).any(1) for L in li]).any(0)
            hout = torch.stack([oi(L).any(0) for L in lo]).any(0)
            both = hin & hout
            live = sum(int(L.mask.sum()) for L in li + lo)
            used = sum(int(oi(L)[both].sum()) for L in li) + sum(int(oi(L)[:, both].sum()) for L in lo)
            res[parent] = dict(hidden_blocks=int(hin.numel()), live_in=int(hin.sum()), live_down=int(hout.sum()),
                               live_both=int(both.sum()), orphan_frac=1.0 - used / max(1, live))
        return res

    def summary(self, max_rows: int = 12) -> str:
        """Per-layer table (rich, rendered to text)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"BLaST masks @ step {self.step_count}: target {self.sparsity_at(self.step_count):.1%}, "
                        f"block {self.block_size}, overall {self.sparsity():.1%}")
        for c in ("layer", "shape", "live/blocks", "block sparsity", "zero weights"):
            t.add_column(c, justify="left" if c == "layer" else "right")
        rows = list(self.layer_sparsity().items())
        half = max(1, max_rows) // 2
        shown = rows if len(rows) <= max(1, max_rows) else rows[:half] + [None] + (rows[-half:] if half else [])
        for r in shown:
            if r is None:
                t.add_row("...", "", "", "", "")
                continue
            n, d = r
            t.add_row(n, "x".join(map(str, d["shape"])), f"{d['live']}/{d['blocks']}", f"{d['block_sparsity']:.1%}",
                      f"{d['zeros']:.1%}")
        con = Console(width=120)
        with con.capture() as cap:
            con.print(t)
        return cap.get()

    def timing_summary(self) -> dict:
        def stats(v):
            return dict(n=len(v), mean_ms=1e3 * sum(v) / len(v), max_ms=1e3 * max(v)) if v else dict(n=0)

        return {k: stats(self.timings.get(k, [])) for k in ("update", "plain")}

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "finalized": self.finalized,
            "block_size": self.block_size,
            "masks": {n: L.mask.cpu().to(torch.uint8) for n, L in self.layers.items()},
            "score_acc": {n: L.score_acc for n, L in self.layers.items() if L.score_acc is not None},
            "grad_acc": {n: L.grad_acc for n, L in self.layers.items() if L.grad_acc is not None},
            "check_every": self.check_every,  # > 0: handed off (a resumed run hands off again)
            "upkeep_restored": self.upkeep_restored,
        }

    def load_state_dict(self, sd: dict):
        if sd["block_size"] != self.block_size:
            raise ValueError(f"block size {sd['block_size']} != {self.block_size}")
        self.step_count = sd["step_count"]
        self._load_masks(sd["masks"])
        for n, L in self.layers.items():
            L.score_acc = sd.get("score_acc", {}).get(n)
            L.grad_acc = sd.get("grad_acc", {}).get(n)
        self.finalized = sd.get("finalized", False)
        self.upkeep_restored = sd.get("upkeep_restored", 0)
        if self.finalized:  # (as finalize() left it: plain weights, no declared masks, no hooks)
            self._set_hooks(False)
            for L in self.layers.values():
                _masks.clear_mask(L.param)
            self.check_every = 0
            return
        if sd.get("check_every", 0) and self.frozen and not self.finalized and self.declare:
            self.hand_off(sd["check_every"])  # (re-masks: the loaded masks hold from here on)
        elif self.check_every:  # loaded into a handed-off sparsifier: the saved run kept the upkeep
            self.check_every = 0
            self._set_hooks(True)

    def _load_masks(self, masks: Dict[str, torch.Tensor]):
        """Strict, as ``load_state_dict``: a mask for every layer and for no other, each 0/1 of the layer's block
        shape, tied layers alike (the fused op reads their union: unlike masks cost live blocks). All are checked
        before any is set."""
        missing, unexpected = sorted(set(self.layers) - set(masks)), sorted(set(masks) - set(self.layers))
        if missing or unexpected:
            raise KeyError("; ".join([f"masks missing for {missing}"] * bool(missing) + [
                f"masks for layers this sparsifier does not manage: {unexpected}"] * bool(unexpected)))
        new = {}
        for n, L in self.layers.items():
            m = masks[n]
            if not isinstance(m, torch.Tensor) or m.dtype.is_floating_point or m.dtype.is_complex:
                raise TypeError(f"{n}: a mask is a bool or integer tensor (1 live, 0 dead), not "
                                f"{getattr(m, 'dtype', type(m).__name__)}")
            if tuple(m.shape) != tuple(L.mask.shape):
                raise ValueError(f"{n}: mask shape {tuple(m.shape)} != {tuple(L.mask.shape)}")
            if m.dtype != torch.bool and bool(((m != 0) & (m != 1)).any()):
                raise ValueError(f"{n}: mask holds values other than 0 and 1")
            new[n] = m.bool()
            if self._halves(L) and not torch.equal(*new[n].chunk(2)):
                raise ValueError(f"{n}: the two halves of a fused gate|up weight need one mask (tie_gate_up=True)")
        for g in self.groups:
            unlike = [n for n in g[1:] if not torch.equal(new[n], new[g[0]])]
            if unlike:
                raise ValueError(f"masks of {g[0]} and {unlike} differ: tied gate and up projections share one mask "
                                 "(tie_gate_up=False loads them apart)")
        for n, L in self.layers.items():
            self._set_mask(L, new[n], grown=None)

    def save_masks(self, path: str):
        """Block masks (uint8, one per layer) in a safetensors file; block size in the metadata."""
        from safetensors.torch import save_file

        save_file({n: L.mask.cpu().to(torch.uint8).contiguous() for n, L in self.layers.items()}, path,
                  metadata={"block_size": str(self.block_size), "step": str(self.step_count),
                            "format": MASKS_FORMAT})

    def load_masks(self, path: str):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            fmt = meta.get("format", MASKS_FORMAT)  # (a file without it: any 0/1 tensors, checked below)
            if fmt != MASKS_FORMAT:
                raise ValueError(f"{path}: format {fmt!r} is not {MASKS_FORMAT!r} (a file save_masks writes)")
            try:
                bs = int(meta.get("block_size", self.block_size))
            except ValueError:
                raise ValueError(f"{path}: block_size {meta['block_size']!r} in its metadata is not an "
                                 "integer") from None
            if bs != self.block_size:
                raise ValueError(f"{path}: block size {bs} != {self.block_size}")
            self._load_masks({k: f.get_tensor(k) for k in f.keys()})

    def plot_masks(self, path: str, max_layers: int = 36):
        """One panel per layer: live blocks white, dead black (legend in the figure), one square per
        block whatever the weight's shape. Writes ``path`` (any format matplotlib saves); returns it."""
        import matplotlib.pyplot as plt

        fig = self._mask_figure(max_layers)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _mask_figure(self, max_layers: int = 36):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        items = list(self.layers.items())[:max_layers]
        n = len(items)
        cols = min(6, n)
        rows = cdiv(n, cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows + 0.6), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        for ax, (name, L) in zip(axes.flat, items):
            ax.set_xticks([]), ax.set_yticks([])  # (the frame stays: live blocks are white like the page)
            # aspect "equal": a 16x4 block grid stays 16 by 4 squares, not a stretched landscape
            ax.imshow(L.mask.cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
            ax.set_title(f"{name}\n{1 - L.mask.float().mean():.0%} sparse", fontsize=7)
        fig.suptitle(f"block masks ({self.block_size}x{self.block_size}), step {self.step_count}")
        fig.legend(handles=[Patch(facecolor="white", edgecolor="black", label="live block"),
                            Patch(facecolor="black", edgecolor="black", label="dead (zero) block")],
                   loc="lower center", ncol=2, frameon=False, fontsize=8)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        return fig


__all__ = ["BlastSparsifier", "cubic_sparsity", "default_layer_filter"]
