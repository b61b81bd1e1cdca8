"""A small Llama-style model (gpt-fast's model.py, trimmed): RMSNorm, RoPE, SDPA attention, SwiGLU MLP.

MLP-heavy on purpose (hidden = 5.5 x dim): the MLP holds ~3/4 of the non-embedding
weights, which is what BLaST sparsifies. Module names follow Llama
(``layers.N.mlp.gate_proj/up_proj/down_proj``) so the sparsifier and the backend find them.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class Config:
    vocab_size: int = 4096
    dim: int = 512
    n_layers: int = 6
    n_heads: int = 8
    hidden: int = 2816  # 5.5 x dim, a multiple of 64 (and 128)
    max_seq: int = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> "Config":
        presets = {
            "34m": dict(dim=512, n_layers=6, n_heads=8, hidden=2816),
            "smoke": dict(dim=64, n_layers=2, n_heads=2, hidden=256, max_seq=128),
        }
        return cls(vocab_size=vocab_size, **presets[name])


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(seq, head_dim, base):
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    f = torch.outer(torch.arange(seq).float(), inv)
    return torch.stack([f.cos(), f.sin()], -1)  # [seq, hd/2, 2]


def apply_rope(x, cache):
    # x [B, T, H, hd]
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    c = cache[: x.shape[1]].view(1, x.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * c[..., 0] - xs[..., 1] * c[..., 1],
                       xs[..., 1] * c[..., 0] + xs[..., 0] * c[..., 1]], -1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.hd = c.n_heads, c.dim // c.n_heads
        self.wqkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)

    def forward(self, x, rope):
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_heads, self.hd).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden, bias=False)
        self.down_proj = nn.Linear(c.hidden, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(c.dim, c.norm_eps), RMSNorm(c.dim, c.norm_eps)
        self.attn, self.mlp = Attention(c), MLP(c)

    def forward(self, x, rope):
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.register_buffer("rope", rope_cache(c.max_seq, c.dim // c.n_heads, c.rope_base), persistent=False)
        self.apply(self._init)
        for n, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if n.endswith(("wo.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / (2 * c.n_layers) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for blk in self.layers:
            x = blk(x, self.rope)
        logits = F.linear(self.norm(x), self.embed.weight)  # tied head
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self, mlp_only=False):
        return sum(p.numel() for n, p in self.named_parameters() if not mlp_only or ".mlp." in n)
