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

* ``score="obs"`` (with the refit) picks the blocks by that same objective: greedy Optimal Brain Surgeon
  over column blocks (:func:`obs_keep`), each removal costed after the survivors' refit, and a gate/up
  row's cost weighted by what its hidden unit carries to the MLP's output (:func:`hidden_weights`).

What each is worth on SmolLM2: RESULTS.md. The cost: an ``[in, in]`` fp64 Gram matrix per sparsified
layer and one solve of up to ``in`` unknowns per block row at each mask update; ``obs`` adds, per block
row, an ``[in, in]`` fp64 inverse downdated once per removed block (rows side by side, up to
``OBS_CHUNK_BYTES`` of them).
"""
from __future__ import annotations

import contextlib
import heapq

import torch

DAMP = 0.01  # ridge: this fraction of the mean diagonal of G (SparseGPT's default)
OBS_CHUNK_BYTES = 1 << 30  # obs_keep: block rows searched side by side, up to this much of their H^-1


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


def _damped(G: torch.Tensor, damp: float):
    """``(G + lam I, lam)``, ``lam`` the ridge: ``damp`` x the mean diagonal of ``G``."""
    lam = damp * torch.diagonal(G).mean()
    return G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device), lam


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
    A, lam = _damped(G, damp)
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


@torch.no_grad()
def obs_keep(parts, block: int, in_dim: int, k: int, balanced: bool = False, halves: bool = False,
             damp: float = DAMP, row_weights=None) -> torch.Tensor:
    """The ``k`` blocks (``k`` per block row when ``balanced``) whose loss the refit repairs best: greedy
    Optimal Brain Surgeon over block columns, one block at a time, as SparseGPT does for single weights.

    Removing the column block ``S`` from a block row whose live inputs are ``K`` costs, after the refit of
    the rest, ``tr(W_S [Hinv_K]_SS^-1 W_S^T)`` with ``Hinv_K = (H_KK)^-1`` and ``H = G + damp I`` -- the
    refit's own objective, so the cost counts what the survivors can take over, which ``W^2 E[x^2]``
    cannot see when inputs are correlated. The greedy removes the cheapest block anywhere in the layer,
    then updates that row's weights and ``Hinv`` (a rank-``block`` downdate). Block rows are independent
    problems, so the rows' greedy sequences are computed side by side (as many ``Hinv`` at a time as
    ``OBS_CHUNK_BYTES`` holds) and the layer's greedy is their merge by next cost. ``parts``:
    ``[(weights, stats)]`` sharing one mask (tied gate and up: usually one entry, both weights on one Gram
    matrix); ``halves``: each weight is a fused gate|up whose two halves share the mask rows;
    ``row_weights``: per part, one ``[out]`` tensor per weight scaling each output row's cost
    (:func:`hidden_weights`). Dead blocks (zero weights) cost nothing and go first. Returns the bool mask
    in the weights' layout."""
    prep = []  # per part: its weights and row weights as [out, in] fp64, and H^-1 padded to whole blocks
    for p, (ws, stats) in enumerate(parts):
        Ws = [as_out_in(w, in_dim).to(torch.float64) for w in ws]
        alphas = [torch.ones(W.shape[0], dtype=torch.float64, device=W.device) if row_weights is None
                  else row_weights[p][i].to(W.device, torch.float64) for i, W in enumerate(Ws)]
        if halves:
            Ws = [h for W in Ws for h in W.chunk(2)]
            alphas = [h for a in alphas for h in a.chunk(2)]
        out, d = Ws[0].shape
        dev = Ws[0].device
        nr, nc = -(-out // block), -(-d // block)
        pad = nc * block - d  # (a ragged last column block: padded inputs that cost and cover nothing)
        G = stats.gram.to(dev, torch.float64)
        H = _damped(G, damp)[0]  # (the refit's own system: obs costs what refit_ then solves)
        Hinv = torch.nn.functional.pad(torch.linalg.inv(H), (0, pad, 0, pad))
        Hinv[d:, d:] = torch.eye(pad, dtype=Hinv.dtype, device=dev)
        prep.append((Ws, alphas, Hinv, pad))
    todo = nc - k if balanced else min(nc, nr * nc - k)  # (removals a row can need)
    per_row = sum(H.numel() for *_, H, _ in prep) * 8
    chunk = max(1, min(nr, OBS_CHUNK_BYTES // per_row))

    def row_sequences(rs):
        """Rows ``rs``' greedy, side by side: the blocks in removal order and what each removal cost."""
        c, at = len(rs), torch.arange(len(rs), device=dev)

        def rows(ts, r):  # block row r of each of ts, zero-padded to whole blocks (zero rows cost nothing)
            ts = [t[r * block:(r + 1) * block] for t in ts]
            return torch.cat([torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, block - len(t))) for t in ts])

        state = [(torch.nn.functional.pad(torch.stack([rows(Ws, r) for r in rs]), (0, pad)),
                  torch.stack([rows(alphas, r) for r in rs]), Hinv.expand(c, -1, -1).clone())
                 for Ws, alphas, Hinv, pad in prep]
        live = torch.ones(c, nc, dtype=torch.bool, device=dev)
        order, paid = [], []
        eye = torch.eye(block, dtype=torch.float64, device=dev)
        for _ in range(max(0, todo)):
            cost = 0
            for R, a, Hi in state:
                sub = Hi.view(c, nc, block, nc, block).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [c, nc, b, b]
                Wr = R.view(c, -1, nc, block).permute(0, 2, 3, 1)  # [c, nc, b, rows]
                cost = cost + (Wr * torch.linalg.solve(sub, Wr) * a[:, None, None, :]).sum(dim=(2, 3))
            cost = torch.where(live, cost, float("inf"))
            j = cost.argmin(1)
            order.append(j)
            paid.append(cost[at, j])
            S = j[:, None] * block + torch.arange(block, device=dev)  # [c, b]: each row's removed columns
            for R, _, Hi in state:
                Hs = Hi[at[:, None], S]  # [c, b, D]
                inv_ss = torch.linalg.inv(Hs.gather(2, S[:, None, :].expand(-1, block, -1)))
                Rs = R.gather(2, S[:, None, :].expand(-1, R.shape[1], -1))
                R -= Rs @ inv_ss @ Hs
                Hi -= Hs.transpose(1, 2) @ inv_ss @ Hs
                R.scatter_(2, S[:, None, :].expand(-1, R.shape[1], -1), 0.0)
                Hi[at[:, None], S] = 0
                Hi[at[:, None], :, S] = 0
                Hi[at[:, None, None], S[:, :, None], S[:, None, :]] = eye  # (keeps the dead block's solve defined)
            live[at, j] = False
        if not order:
            return [([], [])] * c
        order, paid = torch.stack(order, 1).tolist(), torch.stack(paid, 1).tolist()
        return list(zip(order, paid))

    seqs = [q for r0 in range(0, nr, chunk) for q in row_sequences(range(r0, min(nr, r0 + chunk)))]
    live = torch.ones(nr, nc, dtype=torch.bool)
    if balanced:
        for r, (order, _) in enumerate(seqs):
            live[r, order] = False
    else:
        heap = [(paid[0], r) for r, (_, paid) in enumerate(seqs) if paid]
        heapq.heapify(heap)
        at = [0] * nr
        for _ in range(max(0, nr * nc - k)):
            _, r = heapq.heappop(heap)
            live[r, seqs[r][0][at[r]]] = False
            at[r] += 1
            if at[r] < len(seqs[r][1]):
                heapq.heappush(heap, (seqs[r][1][at[r]], r))
    return as_out_in(live.to(dev), in_dim)


@torch.no_grad()
def hidden_weights(ws, stats: InputStats, w_out: torch.Tensor, out_stats: InputStats, in_dim: int,
                   out_in_dim: int) -> list:
    """Per in-projection weight (gate, up, fc1), a weight per hidden unit ``j`` for :func:`obs_keep`: what an
    error in its pre-activation costs at the MLP's output, ``||W_out[:, j]||^2 E[h_j^2] / E[a_j^2]`` -- the
    hidden unit's share of the output (``W_out`` and its inputs ``h``) per unit of the relative error of its
    pre-activation ``a`` (exact for up, where ``h = act(gate) * up``; to first order elsewhere). Unweighted,
    the refit's loss counts every hidden unit alike, and a unit the output barely reads keeps blocks that
    a loud one needs."""
    wo = as_out_in(w_out, out_in_dim).to(torch.float64)
    share = wo.square().sum(0) * out_stats.second_moment().to(wo.device, torch.float64)  # [hidden]
    G = stats.gram.to(wo.device, torch.float64) / max(stats.n, 1)
    out = []
    for w in ws:
        W = as_out_in(w, in_dim).to(torch.float64)
        pre = ((W @ G) * W).sum(1)  # E[a_j^2]
        if W.shape[0] == 2 * share.shape[0]:  # (a fused gate|up: both halves feed hidden unit j)
            s2 = share.repeat(2)
        elif W.shape[0] == share.shape[0]:
            s2 = share
        else:
            return None
        out.append(s2 / pre.clamp_min(1e-30 + 1e-12 * float(pre.max())))
    return out
