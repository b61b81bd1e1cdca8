"""Where a default-mode training step's host time goes: SmolLM2-135M's shape cut to a few layers, dense Inductor vs
backend="blast" (90% blocks dead, declared masks, bf16 autocast, fused AdamW), profiled with CPU and CUDA activities
and with cProfile (the launchers' Python, which the torch profiler does not see).

One side per process (``--sides``), so that repeated, interleaved runs give the spread: a default-mode step's host
time moves by 10+ ms between processes on one machine (30 layers: the same blast side 57.1 and 71.5 ms).
The blast kernels go through Inductor's static CUDA launcher, as its own do (``backend.enable_static_launch``, set
when ``sparsify_gpu`` is imported); ``TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=0`` in the environment
keeps Triton's Python launcher (the choice is made in the compile workers, which read the variable when they start).
The JSON says which launcher the kernels got (cProfile's call counts).

    python bench/probes/train_host_profile.py --layers 4 --sides blast --out /tmp/out --tag r1
"""
import argparse
import cProfile
import io
import json
import os
import pstats
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


def side(blast: bool, args):
    from torch._dynamo.utils import counters

    from blast_compile.sparsifier import BlastSparsifier
    from blast_compile.sparsify.data import mlp_layers
    from blast_compile.sparsify.run import Objective

    torch._dynamo.reset()
    counters.clear()
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
    windows = []  # (host ms, wall ms) per step, per window of args.steps steps
    for _ in range(args.windows):
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        host = (time.perf_counter() - t) / args.steps * 1e3  # (the host returns before the GPU finishes...)
        torch.cuda.synchronize()
        windows.append((host, (time.perf_counter() - t) / args.steps * 1e3))  # (... this waits for it)
    wall = sorted(w for _, w in windows)
    host_ms, wall_ms = min(h for h, _ in windows), wall[len(wall) // 2]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    pr = cProfile.Profile()  # Python-level: the torch profiler does not see the launchers' Python
    pr.enable()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    pr.disable()
    py = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(35)
        py[key] = buf.getvalue()
    syncs = {e.key: e.count // 2 for e in ev if any(s in e.key for s in (
        "Synchronize", "cudaMemcpy", "_local_scalar_dense", "aten::item", "nonzero"))}
    cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:30]
    gpu = sum(e.self_device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) / 2e3
    calls = pstats.Stats(pr).stats  # {(file, line, fn): (primitive calls, calls, ...)}
    launches = {"static": sum(v[1] for k, v in calls.items() if k[0].endswith("static_triton_launcher.py")
                              and k[2] == "run") // 2,
                "triton": sum(v[1] for k, v in calls.items() if k[2] == "launch_metadata") // 2}
    return {"compile_and_warmup_s": compile_s, "host_ms_min": host_ms, "wall_ms_median": wall_ms, "windows": windows,
            "gpu_ms_profiled": gpu, "launches_per_step_by_launcher": launches,
            "static_user_kernels": bool(torch._inductor.config.static_launch_user_defined_triton_kernels),
            "syncs_per_step": syncs, "counters": dict(counters["blast"]),
            "top_host": [{"name": e.key[:100], "self_cpu_ms": e.self_cpu_time_total / 2e3, "calls": e.count // 2}
                         for e in cpu], "python_profile_2_steps": py}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="steps per timing window")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--sides", default="dense,blast")
    ap.add_argument("--tag", default="", help="appended to the JSON's name")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers}
    for name in args.sides.split(","):
        res[name] = r = side(name != "dense", args)
        keys = ("compile_and_warmup_s", "host_ms_min", "wall_ms_median", "gpu_ms_profiled", "static_user_kernels",
                "launches_per_step_by_launcher")
        print(name, args.tag, {k: r[k] for k in keys}, r["syncs_per_step"], flush=True)
        os.makedirs(args.out, exist_ok=True)
        # (after each side: a cut run keeps it)
        with open(os.path.join(args.out, f"train_host_profile{args.tag}.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
