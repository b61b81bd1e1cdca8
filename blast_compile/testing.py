"""Helpers to make block-sparse weights for demos, tests and benchmarks."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from . import layouts
from .formats import cdiv, expand_mask

def mlp_weights(model: torch.nn.Module) -> Dict[str, Tuple[str, str]]:
    """``{weight name: (MLP module name, role)}`` for the projections of every MLP :mod:`layouts` finds."""
    return {f"{q}.weight": (mlp.name, role) for mlp in layouts.mlp_modules(model) for role, q in mlp.quals.items()}


class SwiGLU(torch.nn.Module):
    """The Llama MLP, ``down(silu(gate(x)) * up(x))``, with HF's names: the reference gated MLP."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, h, bias=False)
        self.up_proj = torch.nn.Linear(d, h, bias=False)
        self.down_proj = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def random_block_mask(rows: int, cols: int, sparsity: float, generator: Optional[torch.Generator] = None,
                      keep_one: bool = True) -> torch.Tensor:
    """bool [rows, cols] with round(sparsity * rows * cols) dead blocks, chosen uniformly."""
    n = rows * cols
    dead = min(int(round(sparsity * n)), n - 1 if keep_one else n)
    perm = torch.randperm(n, generator=generator)
    m = torch.ones(n, dtype=torch.bool)
    m[perm[:dead]] = False
    return m.reshape(rows, cols)


@torch.no_grad()
def zero_blocks_(w: torch.Tensor, sparsity: float, block=(64, 64), generator=None) -> torch.Tensor:
    """Zero a random ``sparsity`` fraction of ``w``'s blocks in place; returns the block mask."""
    bo, bi = block
    m = random_block_mask(cdiv(w.shape[0], bo), cdiv(w.shape[1], bi), sparsity, generator)
    w.mul_(expand_mask(m, bo, bi, w.shape).to(w.dtype).to(w.device))
    return m


@torch.no_grad()
def sparsify_mlps_(model: torch.nn.Module, sparsity: float, block: int = 64, seed: int = 0,
                   names: Iterable[str] = ()) -> int:
    """Zero random blocks of every MLP weight of ``model`` (found by :mod:`layouts`, plus the weights
    named in ``names``); returns how many weights.

    Gate and up projections of one MLP get the same mask, as the BLaST sparsifier
    gives them (the fused kernel reads the union of the two); so do the two halves
    of a fused gate|up weight.
    """
    g = torch.Generator().manual_seed(seed)
    roles = mlp_weights(model)
    extra = set(names)
    count = 0
    gate_masks = {}  # MLP name -> (shape, mask) of its gate
    for name, p in model.named_parameters():
        if p.dim() != 2 or not (name in roles or name in extra):
            continue
        mlp, role = roles.get(name, (None, None))
        if role == "up" and mlp in gate_masks and gate_masks[mlp][0] == p.shape:
            p.mul_(expand_mask(gate_masks[mlp][1], block, block, p.shape).to(p.dtype).to(p.device))
        elif role == "gate_up" and p.shape[0] % (2 * block) == 0:
            half = p.shape[0] // 2
            m = zero_blocks_(p[:half], sparsity, (block, block), g)
            p[half:].mul_(expand_mask(m, block, block, p[half:].shape).to(p.dtype).to(p.device))
        else:
            m = zero_blocks_(p, sparsity, (block, block), g)
            if role == "gate":
                gate_masks[mlp] = (p.shape, m)
        count += 1
    return count
