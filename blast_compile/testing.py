"""Helpers to make block-sparse weights for demos, tests and benchmarks."""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

from .formats import cdiv, expand_mask

# Module-name suffixes of MLP projections in common architectures.
MLP_WEIGHT_NAMES = re.compile(
    r"(gate_proj|up_proj|down_proj|fc1|fc2|c_fc|mlp\.c_proj|w1|w2|w3|dense_h_to_4h|dense_4h_to_h|"
    r"intermediate\.dense|(?<!attention\.)output\.dense|mlp\.fc_in|mlp\.fc_out)\.weight$"
)


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
    """Zero random blocks of every MLP weight (by name) of ``model``; returns how many weights.

    Gate and up projections of one MLP get the same mask, as the BLaST sparsifier
    gives them (the fused kernel reads the union of the two).
    """
    g = torch.Generator().manual_seed(seed)
    count = 0
    gate_masks = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and (MLP_WEIGHT_NAMES.search(name) or name in set(names)):
            prefix = name.rsplit(".", 2)[0]
            tied = _TIED.get(name.rsplit(".", 2)[-2])
            if tied and (prefix, tied) in gate_masks and gate_masks[prefix, tied][0] == p.shape:
                m = gate_masks[prefix, tied][1]
                p.mul_(expand_mask(m, block, block, p.shape).to(p.dtype).to(p.device))
            else:
                m = zero_blocks_(p, sparsity, (block, block), g)
            gate_masks[prefix, name.rsplit(".", 2)[-2]] = (p.shape, m)
            count += 1
    return count


_TIED = {"up_proj": "gate_proj", "w3": "w1"}
