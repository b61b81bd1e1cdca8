"""Tensor-parallel decode: a Llama-3.1-8B-shaped decoder (4 layers by default, random
weights, MLPs 90% block-sparse) on 1 vs 2 GPUs, dense vs blast.

gpt-fast-style model (static KV cache, CUDA-graph capturable): attention q/k/v
ColwiseParallel + o RowwiseParallel (stock styles), MLP BlastMLPParallel with
hidden-block balancing (one all-reduce per MLP; "blast-nobal": contiguous split).
"compressed" (issue 28): the MLPs compressed (packed live blocks, dense weights freed) and sharded with
``tp_compressed.shard_compressed_`` (each rank keeps its own hidden blocks' packed blocks, one
``blast::packed_mlp`` + all-reduce per MLP), attention as above; ``local_mlp_bytes`` per rank is the
memory it holds. Against "dense" (the dense TP baseline) it is the issue's decode comparison.
MLP sparsity is skewed along the hidden dim (``--skew``, 1 = uniform random). "blast" makes each MLP one
``blast::sparse_mlp`` call on its local shards (``fuse_mlp_eager_``: no compiler,
so the number does not depend on the pass). With ``--compile`` the step is also
compiled with ``backend="blast"`` on the unfused model, so the pass must find and fuse the
MLPs (``mlp_fused_by_pass``), / Inductor (dense).

Timing: batch 1, one token per step at a growing position (greedy-decode shape,
no lm_head), one decode step captured in a CUDA graph and replayed; the plain
eager loop (DTensor dispatch overhead included) is reported too. Memory: peak
allocated per GPU and local parameter bytes.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 bench/tp.py --out bench/results   # 2 GPUs
    torchrun --nproc_per_node=2 bench/tp.py --device cpu --small --out /tmp           # CPU smoke (gloo)
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (KINDS.md)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blast_compile import distributed as bd  # noqa: E402
from blast_compile.ops import triton_mlp, tune  # noqa: E402
from blast_compile.compress import compress_  # noqa: E402
from blast_compile.testing import SwiGLU, sparsify_mlps_  # noqa: E402
from blast_compile.tp_compressed import fuse_packed_eager_, shard_compressed_  # noqa: E402


def rope(x, cos, sin):  # x [B, T, H, hd]
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d, n_heads, n_kv, hd):
        super().__init__()
        self.hd = hd
        self.q_proj = nn.Linear(d, n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, n_kv * hd, bias=False)
        self.v_proj = nn.Linear(d, n_kv * hd, bias=False)
        self.o_proj = nn.Linear(n_heads * hd, d, bias=False)
        self.k_cache = self.v_cache = None

    def setup_cache(self, max_len, dtype, device):
        kv = bd.local(self.k_proj.weight).shape[0] // self.hd  # local kv heads under TP
        self.k_cache = torch.zeros(1, kv, max_len, self.hd, dtype=dtype, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)

    def forward(self, x, pos, cos, sin, mask):
        b, t, _ = x.shape
        q = rope(self.q_proj(x).view(b, t, -1, self.hd), cos, sin).transpose(1, 2)
        k = rope(self.k_proj(x).view(b, t, -1, self.hd), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.hd).transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        o = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["dim"]
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.attn = Attention(d, cfg["heads"], cfg["kv_heads"], d // cfg["heads"])
        self.mlp = SwiGLU(d, cfg["hidden"])

    def forward(self, x, pos, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), pos, cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg["layers"]))
        self.norm = nn.RMSNorm(cfg["dim"], eps=1e-5)
        hd = cfg["dim"] // cfg["heads"]
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(cfg["max_len"]).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        self.max_len = cfg["max_len"]

    def setup_cache(self, dtype, device):
        for l in self.layers:
            l.attn.setup_cache(self.max_len, dtype, device)

    def forward(self, x, pos):  # x [1, T, D] embeddings, pos [T] long
        cos, sin = self.cos[pos][None, :, None, :], self.sin[pos][None, :, None, :]
        mask = (torch.arange(self.max_len, device=x.device)[None, :] <= pos[:, None])[None, None]
        for l in self.layers:
            x = l(x, pos, cos, sin, mask)
        return self.norm(x)


@torch.no_grad()
def skew_sparsify_(model, sparsity, block, skew, seed=0):
    """Zero ``sparsity`` of each MLP's blocks, hidden block 0 ``skew**2``x likelier live than the last
    (gate and up share blocks): a contiguous TP split is then unbalanced."""
    from blast_compile.formats import expand_mask

    g = torch.Generator().manual_seed(seed)
    for l in model.layers:
        m = l.mlp
        h, d = m.gate_proj.weight.shape
        nh, nd = h // block, d // block
        w = torch.linspace(skew, 1 / skew, nh)
        for lin, shape, along in ((m.gate_proj, (nh, nd), 0), (m.down_proj, (nd, nh), 1)):
            sc = torch.rand(shape, generator=g) * (w[:, None] if along == 0 else w[None, :])
            keep = torch.zeros(sc.numel(), dtype=torch.bool)
            keep[sc.flatten().topk(round((1 - sparsity) * sc.numel())).indices] = True
            mask = expand_mask(keep.reshape(shape), block, block, lin.weight.shape).to(lin.weight)
            lin.weight.mul_(mask)
            if lin is m.gate_proj:
                m.up_proj.weight.mul_(mask)


LLAMA_8B = dict(dim=4096, hidden=14336, heads=32, kv_heads=8)
SMALL = dict(dim=256, hidden=1024, heads=8, kv_heads=4)


def _live_per_rank(mlp, ws, block):
    c = bd.hidden_block_costs(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, block, block)
    return c.reshape(ws, -1).sum(1).tolist()


def build(args, device, dtype, ws, mode, mesh, fuse=True):
    cfg = dict(SMALL if args.small else LLAMA_8B, layers=args.layers, max_len=args.max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(cfg).to(dtype).eval()
    if args.skew > 1:
        skew_sparsify_(model, args.sparsity, args.block, args.skew)
    else:
        sparsify_mlps_(model, args.sparsity, block=args.block)
    info = {}
    compressed = mode.startswith("compressed")
    if compressed:  # packed live blocks only (the dense MLP weights are freed)
        compress_(model, block_sizes=(args.block,))
    if ws > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        contiguous = None if compressed else max(
            bd.BalanceReport._imb(_live_per_rank(l.mlp, ws, args.block)) for l in model.layers)
        if compressed:  # each rank keeps its own hidden blocks' packed blocks (plain tensors + all-reduce)
            rep = shard_compressed_(model, mesh, balance=not mode.endswith("-nobal"), attention=False)
            loads = [sum(m["blocks_per_rank"][r] for m in rep.mlps.values()) for r in range(ws)]
            info["stored_blocks_per_rank"] = loads
        else:
            reps = bd.parallelize_blast_mlp(model, mesh, block=(args.block, args.block),
                                            balance=not mode.endswith("-nobal"))
            # max over layers of (max / mean live MLP blocks per rank)
            info["imbalance_contiguous"] = contiguous
            info["imbalance_used"] = max((r.imbalance_after for r in reps.values()), default=contiguous)
        attn = {f"layers.{i}.attn.{p}": ColwiseParallel() for i in range(cfg["layers"]) for p in ("q_proj", "k_proj", "v_proj")}
        attn.update({f"layers.{i}.attn.o_proj": RowwiseParallel() for i in range(cfg["layers"])})
        parallelize_module(model, mesh, attn)
    if mode.startswith("blast") and fuse:  # compiled rows leave the fusion to the blast pass
        for l in model.layers:
            bd.fuse_mlp_eager_(l.mlp, "silu", block=(args.block, args.block))
    if compressed and fuse:  # one blast::packed_mlp per rank's MLP shard
        for l in model.layers:
            fuse_packed_eager_(l.mlp, "silu")
    model.setup_cache(dtype, device)
    info["local_param_bytes"] = sum(bd.local(p).numel() * bd.local(p).element_size() for p in model.parameters())
    # MLP weights this rank holds (dense shards, or packed blocks + index)
    info["local_mlp_bytes"] = sum(bd.local(t).numel() * bd.local(t).element_size() for l in model.layers
                                  for t in list(l.mlp.parameters()) + list(l.mlp.buffers()))
    return model, cfg, info


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def time_decode(model, cfg, device, dtype, steps, compile_backend=None):
    """tokens/s of one-token steps at positions 0..steps-1: (eager loop, CUDA graph)."""
    x = torch.randn(1, 1, cfg["dim"], device=device, dtype=dtype)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    step = model
    if compile_backend:
        step = torch.compile(model, backend=compile_backend, dynamic=False)
    out = {}
    with torch.no_grad():
        for i in range(3):  # warm-up (plans, kernels, compile)
            pos.fill_(i)
            step(x, pos)
        sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            pos.fill_(i % cfg["max_len"])
            step(x, pos)
        sync(device)
        out["eager_tok_s"] = steps / (time.perf_counter() - t0)
        if device != "cuda":
            return out
        try:
            g = tune.capture([lambda: step(x, pos)], warm=2)
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                pos.fill_(i % cfg["max_len"])  # a device op, outside the graph: positions move
                g.replay()
            sync(device)
            out["graph_tok_s"] = steps / (time.perf_counter() - t0)
        except Exception as e:  # report, keep going
            out["graph_error"] = f"{type(e).__name__}: {e}"[:400]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--modes", default="dense,blast,blast-nobal,compressed")
    ap.add_argument("--skew", type=float, default=2.0, help="hidden-block liveness skew (1: uniform random)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (slow to build)")
    args = ap.parse_args()
    device, dtype = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float32)

    ws = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if ws > 1:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
            dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()),
                                    timeout=datetime.timedelta(seconds=180))
        else:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (ws,)) if ws > 1 else None
    results = []
    sizes = [1] + ([ws] if ws > 1 else [])
    for n in sizes:
        for mode in args.modes.split(","):
            if n == 1 and mode.endswith("-nobal"):
                continue
            for backend in [None] + (["inductor" if mode == "dense" else "blast"] if args.compile else []):
                row = dict(gpus=n, mode=mode, compiled=backend)
                if n == 1 and rank != 0:  # single-GPU rows run on rank 0 only
                    barrier()
                    continue
                try:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    model, cfg, info = build(args, device, dtype, n, mode, mesh if n > 1 else None,
                                             fuse=backend is None)
                    row.update(info)
                    from torch._dynamo.utils import counters

                    counters.clear()
                    row.update(time_decode(model, cfg, device, dtype, args.steps, backend))
                    if backend == "blast":
                        row["mlp_fused_by_pass"] = counters["blast"]["mlp_fused"]
                    if device == "cuda":
                        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
                    del model
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:600]
                if n == 1:
                    barrier()
                if rank == 0:
                    print(json.dumps(row), flush=True)
                # per-rank numbers for TP rows (memory, balance) gathered to rank 0
                if n > 1:
                    rows = [None] * ws
                    dist.all_gather_object(rows, row)
                    if rank == 0:
                        results.append(dict(row, per_rank=rows))
                elif rank == 0:
                    results.append(row)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(
            bench="tp", date=datetime.datetime.utcnow().isoformat(), torch=torch.__version__,
            device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            world_size=ws, nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
            model=("small" if args.small else "Llama-3.1-8B shapes") + f", {args.layers} layers, no embeddings/lm_head",
            sparsity=args.sparsity, block=args.block, skew=args.skew, steps=args.steps, dtype=str(dtype),
        )
        path = os.path.join(args.out, f"tp_{'small_' if args.small else ''}{device}_{ws}.json")
        with open(path, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        print("wrote", path)
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
