"""A model that does not fit one GPU dense but fits 2 GPUs compressed (issue 28), end to end:
built from a config with random weights, MLPs 90% block-sparse and compressed, saved, loaded
straight into tensor-parallel shards (each rank reads its own blocks only), generating.

Model: a Llama config (default: Llama-3.1-405B-shaped layers, 16384/53248, 128 heads / 8 KV heads,
vocab 128256) with as many layers as make its *dense* bf16 weights exceed one GPU's total memory by
``--margin`` (14 layers on an 80 GB H100, ~105 GiB dense; set ``--layers`` to fix it). Dense
weights never exist whole anywhere: rank 0 builds one decoder layer at a time on its GPU (random
attention, MLP weights zero except 10% random 64x64 blocks), compresses it and moves it to host
memory, then writes the compressed checkpoint (``compress.save_pretrained``; host memory and disk:
the compressed size). Every rank then loads it with ``compress.from_pretrained(dir, tp=mesh)``
(attention split by heads, MLP live blocks by hidden blocks), fuses each MLP shard into one
``blast::packed_mlp`` and generates ``--new-tokens`` greedily with HF ``generate``.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 bench/tp_fit.py --out $OUT --dir /tmp/blast_fit
    torchrun --nproc_per_node=2 bench/tp_fit.py --device cpu --small --out /tmp/fit   # CPU smoke (gloo)

Written to ``tp_fit_<device>_<ranks>.json``: dense bytes vs one GPU's memory, the memory plan's
per-rank prediction, per rank the weight bytes held (``tp_compressed.weight_bytes``),
``torch.cuda.memory_allocated`` after loading and the peak while generating, bytes read from the
file, load / build / save times, the generated ids and tokens/s. Not run on GPUs yet.
"""
import argparse
import datetime
import json
import os
import sys
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (KINDS.md)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blast_compile import compress as C  # noqa: E402
from blast_compile import memory_plan  # noqa: E402
from blast_compile import tp_compressed as T  # noqa: E402
from blast_compile.formats import expand_mask  # noqa: E402
from blast_compile.testing import random_block_mask  # noqa: E402

L405 = dict(hidden_size=16384, intermediate_size=53248, num_attention_heads=128, num_key_value_heads=8,
            head_dim=128, vocab_size=128256)
SMALL = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
             vocab_size=512)


def config(args, total_mem):
    import transformers

    shape = SMALL if args.small else L405
    base = dict(shape, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
                torch_dtype="bfloat16")
    layers = args.layers or (2 if args.small else 0)
    if not layers:  # fewest layers whose dense weights exceed one GPU by the margin
        layers = 1
        while memory_plan.plan(dict(base, num_hidden_layers=layers), 0.0).dense_bytes <= args.margin * total_mem:
            layers += 1
    return transformers.LlamaConfig(**base, num_hidden_layers=layers)


@torch.no_grad()
def build_and_save(cfg, directory, sparsity, block, work_device, dtype):
    """Rank 0: the model one layer at a time (random weights, MLPs block-sparse, compressed), then saved."""
    import transformers

    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    g = torch.Generator(device=work_device).manual_seed(0)
    gm = torch.Generator().manual_seed(0)

    def fill(module):
        module.to_empty(device=work_device)
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)

    for layer in model.model.layers:
        layer.to_empty(device=work_device)
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "mlp" in name:  # zero, then random values in (1 - sparsity) of the blocks
                p.zero_()
                o, i = p.shape
                m = random_block_mask(o // block, i // block, sparsity, gm).to(work_device)
                p.copy_(torch.randn(p.shape, generator=g, device=work_device, dtype=p.dtype).mul_(0.02)
                        * expand_mask(m, block, block, p.shape).to(p.dtype))
            else:
                p.normal_(0.0, 0.02, generator=g)
        C.compress_(layer, block_sizes=(block,))
        layer.to("cpu")
    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        fill(mod)
        mod.to("cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # (its buffer was on meta)
    C._restore_mlp_metadata(model)
    C.save_pretrained(model, directory)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--dir", default="/tmp/blast_fit", help="where the compressed checkpoint is written")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=0, help="0: fewest that do not fit one GPU dense")
    ap.add_argument("--margin", type=float, default=1.2, help="dense bytes > margin x one GPU's memory")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke)")
    ap.add_argument("--reuse", action="store_true", help="load the checkpoint already in --dir")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()),
                                timeout=datetime.timedelta(minutes=30))
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    rank, ws = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(args.device, (ws,))
    total_mem = torch.cuda.get_device_properties(0).total_memory if cuda else 80 * 2**30
    cfg = config(args, total_mem)
    plan = memory_plan.plan(cfg.to_dict(), args.sparsity, block=args.block, dtype_bytes=2 if cuda else 4, tp=ws)
    row = dict(layers=cfg.num_hidden_layers, dense_bytes=plan.dense_bytes, one_gpu_bytes=total_mem,
               dense_fits_one_gpu=plan.dense_bytes <= total_mem, plan_rank_bytes=plan.rank_bytes,
               plan_gpus_tp=plan.gpus_tp)
    if rank == 0:
        print(json.dumps(row), flush=True)
        if not args.reuse:
            t0 = time.perf_counter()
            model = build_and_save(cfg, args.dir, args.sparsity, args.block, args.device,
                                   torch.bfloat16 if cuda else torch.float32)
            row["build_save_s"] = time.perf_counter() - t0
            row["file_bytes"] = os.path.getsize(os.path.join(args.dir, "model.safetensors"))
            del model
            if cuda:
                torch.cuda.empty_cache()
    dist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = C.from_pretrained(args.dir, args.device, tp=mesh)
    load_s = time.perf_counter() - t0
    for layer in model.model.layers:
        T.fuse_packed_eager_(layer.mlp, "silu")
    mine = dict(rank=rank, load_s=load_s, weight_bytes=T.weight_bytes(model),
                bytes_read=sum(model._blast_bytes_read.values()))
    if cuda:
        mine["allocated_after_load"] = torch.cuda.memory_allocated()
    ids = torch.tensor([[1, 450, 4996, 310, 3303, 338]], device=args.device) % cfg.vocab_size
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up (plans, kernels)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
            if cuda:
                torch.cuda.synchronize()
        mine["tok_s"] = args.new_tokens / (time.perf_counter() - t0)
        mine["generated"] = out[0, ids.shape[1]:].tolist()
        if args.small:  # small enough for one device: the sharded model must match it
            ref = C.from_pretrained(args.dir, args.device)
            with torch.no_grad():
                mine["max_abs_diff_vs_one_device"] = float((model(ids).logits - ref(ids).logits).abs().max())
    except Exception as e:  # report, do not lose the memory numbers
        mine["error"] = f"{type(e).__name__}: {e}"[:600]
    if cuda:
        mine["peak_allocated"] = torch.cuda.max_memory_allocated()
    ranks = [None] * ws
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        row["per_rank"] = ranks
        row["same_tokens_on_all_ranks"] = len({str(r.get("generated")) for r in ranks}) == 1
        row["meta"] = dict(bench="tp_fit", date=datetime.datetime.utcnow().isoformat(), torch=torch.__version__,
                           device=torch.cuda.get_device_name() if cuda else "cpu", world_size=ws,
                           sparsity=args.sparsity, block=args.block)
        print(json.dumps(row), flush=True)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"tp_fit_{'small_' if args.small else ''}{args.device}_{ws}.json")
        with open(path, "w") as f:
            json.dump(row, f, indent=1)
        print("wrote", path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
