"""Layer-input statistics for the sparsifier: activation-aware block scores and a least-squares refit.

Block magnitude is a poor score when a few input channels carry most of the signal. SmolLM2-135M (a
model with massive activations: residual channels of 100s to 1000s against a median of ~1) goes from
perplexity 26 to 3.5e6 when 50% of its MLP blocks (64 x 64) are pruned by magnitude in one shot. With
the second moments of each sparsified layer's inputs X, gathered on calibration batches
(``BlastSparsifier(..., calibrate=fn)``: ``fn`` runs batches through the model, at construction and
again before every mask update, so the statistics follow the pruned, trained model; or
``with sparsifier.calibration(): ...``):

* ``score="activation"`` ranks a block by ``sum W_ij^2 E[x_j^2]`` over its elements (Wanda's
  ``|W_ij| ||x_j||``, squared and summed per block);
* ``reconstruct=True`` refits the surviving blocks of every block row after each mask update so that
  the layer reproduces, on the calibration inputs, its output from just before the update -- the
  layer-wise least-squares objective of SparseGPT, solved exactly: the rows of one block row share
  their live inputs K, so ``W'[R, K] = (W[R, :] G[:, K] + damp W[R, K]) (G[K, K] + damp I)^-1`` with
  ``G = X^T X``. The ridge pulls towards the current weights, not towards zero: a zero prior shrinks
  every kept weight by ``G / (G + damp)``, and ``damp`` (a fraction of the mean diagonal) dwarfs the
  diagonal of the quiet channels when a few massive ones set that mean -- on SmolLM2 a refit that kept
  every block moved the weights, and one-shot 50% pruning came out worse (RESULTS.md).

What each is worth on SmolLM2: RESULTS.md. The cost: an ``[in, in]`` fp64 Gram matrix per sparsified
layer and one solve of up to ``in`` unknowns per block row at each mask update.
"""
from __future__ import annotations

import contextlib

import torch

DAMP = 0.01  # ridge: this fraction of the mean diagonal of G (SparseGPT's default)


class InputStats:
    """``X^T X`` and the row count of the inputs a layer saw while collecting."""

    __slots__ = ("gram", "n")

    def __init__(self):
        self.gram, self.n = None, 0

    @torch.no_grad()
    def add(self, g: torch.Tensor, n: int):
        self.gram = g if self.gram is None else self.gram + g
        self.n += n

    def second_moment(self) -> torch.Tensor:
        """``E[x_j^2]`` per input channel."""
        return torch.diagonal(self.gram) / max(self.n, 1)


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).double()  # (fp64: massive channels make G ill-conditioned)
    return x.T @ x


@contextlib.contextmanager
def collecting(modules: dict):
    """Forward hooks on ``{name: module}`` filling ``{name: InputStats}`` (yielded) from each call's
    first input. A module fed the very tensor the previous hook saw (a gated MLP's up projection
    after its gate) reuses its ``x^T x``; if it always did, it shares that module's InputStats
    after the block (one Gram matrix kept, and ``refit_`` solves both weights at once)."""
    stats = {n: InputStats() for n in modules}
    src = {n: [] for n in modules}  # per call: whose x^T x this module added
    last = {}  # the previous hook call: x, its version, its name, its x^T x

    def hook(name, x):
        if last.get("x") is x and last["ver"] == x._version:
            src[name].append(last["name"])
        else:
            last.update(x=x, ver=x._version, name=name, g=_gram(x))
            src[name].append(name)
        stats[name].add(last["g"], x.numel() // x.shape[-1])

    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: hook(n, inp[0])) for n, m in modules.items()]
    try:
        with torch.no_grad():
            yield stats
    finally:
        for h in hooks:
            h.remove()
        last.clear()
    for n, seen in src.items():
        o = seen[0] if seen else n
        if o != n and seen == [o] * len(seen) == src[o]:  # (o computed its own every call, n reused it)
            stats[n] = stats[o]


def as_out_in(t: torch.Tensor, in_dim: int) -> torch.Tensor:
    """A ``[out, in]`` view of a weight or mask stored with its inputs along ``in_dim`` (GPT-2's Conv1D: 0)."""
    return t if in_dim == 1 else t.t()


def activation_score(w: torch.Tensor, stats: InputStats, in_dim: int) -> torch.Tensor:
    """Elementwise ``W^2 E[x^2]`` in ``w``'s own layout (the caller sums it per block)."""
    sq = stats.second_moment().to(w.device, torch.float32)
    w2 = w.detach().float().square()
    return w2 * (sq[None, :] if in_dim == 1 else sq[:, None])


@torch.no_grad()
def refit_(ws, mask: torch.Tensor, stats: InputStats, block: int, in_dim: int, damp: float = DAMP):
    """Least-squares refit of the blocks live in ``mask`` (bool, per ``block``) of a weight -- or of
    several weights that share ``mask`` and ``stats`` (a gated MLP's gate and up: one system per block
    row, their right-hand sides side by side) -- against its current output on the collected inputs,
    ridge-regularized towards the current weights; dead blocks come out zero. In place."""
    Ws = [as_out_in(w, in_dim) for w in ([ws] if isinstance(ws, torch.Tensor) else ws)]
    m = as_out_in(mask, in_dim)
    dev = Ws[0].device
    G = stats.gram.to(dev, torch.float64)
    d = G.shape[0]
    lam = damp * torch.diagonal(G).mean()
    A = G + lam * torch.eye(d, dtype=G.dtype, device=dev)
    W0 = torch.stack([W.to(torch.float64) for W in Ws])  # [n, out, in]
    new = torch.zeros_like(W0)
    cols = torch.arange(d, device=dev)
    for r in range(m.shape[0]):
        K = cols[m[r].to(dev).repeat_interleave(block)[:d]]
        if K.numel() == 0:
            continue
        R = slice(r * block, min((r + 1) * block, W0.shape[1]))
        rhs = (W0[:, R] @ G[:, K] + lam * W0[:, R][:, :, K]).reshape(-1, K.numel())  # [n * rows, |K|]
        new[:, R, K] = torch.linalg.solve(A[K][:, K], rhs.T).T.reshape(len(Ws), -1, K.numel())
    for W, n in zip(Ws, new):
        W.copy_(n.to(W.dtype))
