"""Default-mode decode (no CUDA graphs): host time per token of a compiled Llama-3.2-1B-shaped model,
one backend per process (``inductor``, ``blast``; ``BLAST_PDL=0`` for blast without programmatic
dependent launches), with the host cost of a plain ``torch.empty`` measured in the same process
after the decode loop and the Python threads alive.

Why (round 12, H200): in a torch.profiler trace of default-mode decode, every host operation of the
blast-compiled model -- ``aten::empty``, ``cuLaunchKernel``, the generated wrapper's own Python --
took 2-3x as long as in the Inductor-compiled model run earlier in the same process, not only the
fused op. This separates "the op is slow" from "the whole process runs slow after blast".

    for b in inductor blast; do python bench/probes/decode_host.py $b --out bench/results; done
"""
import argparse
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

from bench._results import run_meta, write_json  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("backend", choices=["inductor", "blast"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    from types import SimpleNamespace

    from transformers import StaticCache

    from bench.e2e import build

    model, cfg, _ = build(SimpleNamespace(small=False, layers=args.layers, sparsity=0.9, block=64), "cuda",
                          torch.bfloat16)
    fn = torch.compile(model, backend=args.backend)
    n = args.tokens
    pos = [torch.tensor([32 + i], device="cuda") for i in range(2 * n + 4)]  # made up front: no per-token copy
    res = dict(run_meta(), bench="decode_host", backend=args.backend, pdl=os.environ.get("BLAST_PDL", "1"),
               layers=args.layers, reps=[])
    with torch.no_grad():
        cache = StaticCache(config=cfg, max_cache_len=2 * n + 40)
        ids = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
        tok = model(ids, past_key_values=cache, cache_position=torch.arange(32, device="cuda"),
                    use_cache=True).logits[:, -1:].argmax(-1)

        def step(i):
            return fn(tok, past_key_values=cache, cache_position=pos[i], use_cache=True).logits

        for i in range(4):
            step(i)
        torch.cuda.synchronize()
        for rep in range(2):
            t = time.perf_counter()
            for i in range(4 + rep * n, 4 + (rep + 1) * n):
                step(i)
            host = (time.perf_counter() - t) / n
            torch.cuda.synchronize()
            total = (time.perf_counter() - t) / n
            t = time.perf_counter()
            for _ in range(1000):
                torch.empty(256, device="cuda")
            empty_us = (time.perf_counter() - t) * 1e3
            row = dict(host_ms_per_token=host * 1e3, ms_per_token=total * 1e3, torch_empty_us=empty_us,
                       threads=[t.name for t in threading.enumerate()])
            res["reps"].append(row)
            print(args.backend, row, flush=True)
    write_json(args.out, f"decode_host_{args.backend}_pdl{res['pdl']}.json", res)


if __name__ == "__main__":
    main()
