"""Where a default-mode training step's host time goes: SmolLM2-135M's shape cut to a few layers, dense Inductor vs
backend="blast" (90% blocks dead, declared masks, bf16 autocast, fused AdamW), profiled with CPU and CUDA activities.

The full 30-layer step measured 75.9 ms for blast against 48.0 ms for dense while its kernels took 26.0 ms against
31.0 ms (bench/results/sparsify_speed_fused_h100/): host-bound. This says per step: wall time, GPU kernel time,
host-to-device syncs (cudaStreamSynchronize, cudaMemcpy* D2H, cudaEventSynchronize) and the top host ops.
Side ``blast_static``: the same with Inductor launching the user-defined (blast) kernels through its static CUDA
launcher (``static_launch_user_defined_triton_kernels``; off by default in torch, and never for PDL launches),
as Inductor launches its own -- a suspect for the host time, since Triton's launcher costs more per launch.

    python bench/probes/train_host_profile.py --layers 4 --out /tmp/out
"""
import argparse
import json
import os
import sys
import time

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsify_gpu import train_step  # noqa: E402  (bench/: the speed stage's step)


def build(layers: int):
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).cuda().train()


def side(blast: bool, args, static: bool = False):
    from torch._dynamo.utils import counters

    from blast_compile.sparsifier import BlastSparsifier
    from blast_compile.sparsify.data import mlp_layers
    from blast_compile.sparsify.run import Objective

    torch._dynamo.reset()
    counters.clear()
    torch._inductor.config.static_launch_user_defined_triton_kernels = static
    model = build(args.layers)
    model.config.use_cache = False
    if blast:
        BlastSparsifier(model, target_sparsity=0.9, block_size=64, schedule="constant",
                        layers=mlp_layers(model)).hand_off()
    x = torch.randint(0, 49152, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    fn = torch.compile(Objective(model, 0.0), backend="blast" if blast else "inductor")
    step = train_step(fn, x, opt)

    t = time.time()
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    compile_s = time.time() - t
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    host_ms = (time.perf_counter() - t) / args.steps * 1e3  # (the host returns before the GPU finishes...)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) / args.steps * 1e3  # (... this waits for it)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    syncs = {e.key: e.count // 2 for e in ev if any(s in e.key for s in (
        "Synchronize", "cudaMemcpy", "_local_scalar_dense", "aten::item", "nonzero"))}
    cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:30]
    gpu = sum(e.self_device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) / 2e3
    return {"compile_and_warmup_s": compile_s, "host_ms": host_ms, "wall_ms": wall_ms, "gpu_ms_profiled": gpu,
            "syncs_per_step": syncs, "counters": dict(counters["blast"]),
            "top_host": [{"name": e.key[:100], "self_cpu_ms": e.self_cpu_time_total / 2e3, "calls": e.count // 2}
                         for e in cpu]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sides", default="dense,blast,blast_static")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers}
    for name in args.sides.split(","):
        res[name] = r = side(name != "dense", args, static=name == "blast_static")
        print(name, {k: r[k] for k in ("compile_and_warmup_s", "host_ms", "wall_ms", "gpu_ms_profiled")},
              r["syncs_per_step"], flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "train_host_profile.json"), "w") as f:  # (after each side: a cut run keeps it)
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
