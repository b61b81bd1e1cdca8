"""Issue-27 sweep, step 2 (triton 3.6 venv): compile every recorded launch (sweep_record.py's jsonl) for
GPUTarget("cuda", 90, 32) with triton's own binder/specialization (stand-in tensors at the recorded dtypes and
byte offsets from a 512-byte-aligned base, as compile_kernel.py), deduplicated by what triton compiles
(kernel source, signature, constexprs, attrs, options), then nvdisasm each cubin and run sass_scan.scan on it.
usage: venv/bin/python sweep_compile.py REC.jsonl OUTDIR [--jobs N] [--only KERNEL,...] [--keys FILE]
env TRITON_PTXAS_PATH: another ptxas (e.g. triton 3.9's 12.9). Writes OUTDIR/results.jsonl (one line per compile:
key, kernel, flags, stats, the cases/configs that map to it) and, for flagged compiles, cubin/ptx/sass."""
import os, sys, json, hashlib, importlib.util, argparse, subprocess, signal, time
ap = argparse.ArgumentParser()
ap.add_argument("rec"); ap.add_argument("out"); ap.add_argument("--jobs", type=int, default=2)
ap.add_argument("--only", default=""); ap.add_argument("--keys", default="")
ap.add_argument("--dry", action="store_true")
ap.add_argument("--filter", default="", help="python expression on r (the record), e.g. r['kw'].get('BH')==32")
ap.add_argument("--keep", action="store_true", help="keep ptx/sass of every compile, not only flagged ones")
A = ap.parse_args()
os.makedirs(A.out, exist_ok=True)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(A.out, "triton_cache"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime import jit as J
from triton.tools.tensor_descriptor import TensorDescriptor
import sass_scan

NVDIS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
TL = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


class Dt(str):
    pass


def dt(s):
    d = Dt(s)
    d.itemsize = {"torch.float16": 2, "torch.bfloat16": 2, "torch.float32": 4, "torch.int32": 4,
                  "torch.int64": 8, "torch.int8": 1, "torch.uint8": 1, "torch.bool": 1}[s]
    d.is_floating_point = "float" in s
    return d


class FakeTensor:  # what native_specialize_impl reads: dtype (its str) and data_ptr (alignment)
    def __init__(self, dtype, ptr):
        self.dtype, self._p = dt(dtype), ptr

    def data_ptr(self):
        return self._p


MODS = {}


def kernel_fn(path, name):
    if path not in MODS:
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        MODS[path] = mod
    return getattr(MODS[path], name)


BINDERS = {}


def prepare(r):
    fn = kernel_fn(r["module"], r["kernel"])
    base = 0x7f0000000000
    args = []
    for i, a in enumerate(r["args"]):
        k = a["kind"]
        if k == "tensor":
            args.append(FakeTensor(a["dtype"], base + 0x1000000 * i + a["off"]))
        elif k == "tdesc":
            args.append(TensorDescriptor(FakeTensor(a["dtype"], base + 0x1000000 * i + a["off"]), a["shape"],
                                         a["strides"], a["block"], a.get("padding", "zero")))
        elif k == "none":
            args.append(None)
        else:
            args.append(a["value"])
    kw = dict(r["kw"])
    if "DTYPE" in kw:
        kw["DTYPE"] = TL[kw["DTYPE"]]
    kw["debug"] = False
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):
        kw["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    b = BINDERS.get(id(fn))
    if b is None:
        b = BINDERS[id(fn)] = J.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = b(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args, specialization, options)
    key = hashlib.sha1(repr((r["kernel"], fn.cache_key, sorted(signature.items()), sorted(map(repr, constexprs.items())),
                             sorted(map(repr, attrs.items())), sorted(options.__dict__.items()))).encode()).hexdigest()[:20]
    return fn, key, signature, constexprs, attrs, options


def _alarm(*a):
    raise TimeoutError("compile timeout")


def work(item):
    key, r = item
    t0 = time.time()
    res = dict(key=key, kernel=r["kernel"])
    try:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(300)
        fn, key2, signature, constexprs, attrs, options = prepare(r)
        src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
        k = triton.compile(src, target=target, options=options.__dict__)
        signal.alarm(0)
        cub = k.asm["cubin"]
        d = os.path.join(A.out, "work", key)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "k.cubin"), "wb") as f:
            f.write(cub)
        sass = subprocess.run([NVDIS, "-c", os.path.join(d, "k.cubin")], capture_output=True, text=True).stdout
        flags, stats = sass_scan.scan(sass, maybe=True)
        md = k.metadata
        res.update(flags=flags, stats=stats, shared=md.shared, num_warps=md.num_warps, num_stages=md.num_stages,
                   n_regs=getattr(k, "n_regs", None), secs=round(time.time() - t0, 1),
                   cubin_sha=hashlib.sha256(cub).hexdigest()[:16])
        if A.keep or any(f["kind"] == "never" for f in flags):
            with open(os.path.join(d, "k.ptx"), "w") as f:
                f.write(k.asm["ptx"])
            with open(os.path.join(d, "k.sass"), "w") as f:
                f.write(sass)
            with open(os.path.join(d, "k.ttgir"), "w") as f:
                f.write(k.asm["ttgir"])
        else:
            os.remove(os.path.join(d, "k.cubin"))
            os.rmdir(d)
    except Exception as e:
        signal.alarm(0)
        res.update(error=repr(e)[:300] + " ... " + repr(e)[-700:], secs=round(time.time() - t0, 1))
    return res


if __name__ == "__main__":
    recs = [json.loads(l) for l in open(A.rec)]
    only = set(A.only.split(",")) - {""}
    keys_only = set(open(A.keys).read().split()) if A.keys else None
    groups = {}
    t0 = time.time()
    for r in recs:
        if only and r["kernel"] not in only:
            continue
        if A.filter and not eval(A.filter, {"r": r}):
            continue
        try:
            fn, key, *_ = prepare(r)
        except Exception as e:
            print("bind failed", r["kernel"], repr(e)[:300], file=sys.stderr)
            continue
        if keys_only is not None and key not in keys_only:
            continue
        g = groups.setdefault(key, dict(rec=r, uses=[]))
        g["uses"].append(dict(case=r["case"], cfg=r["cfg"], kw={k: v for k, v in r["kw"].items()}))
    print(f"{len(recs)} launches -> {len(groups)} compiles (bind {time.time() - t0:.0f}s)", flush=True)
    from collections import Counter
    print(Counter(g["rec"]["kernel"] for g in groups.values()), flush=True)
    if A.dry:
        json.dump({k: g["rec"] for k, g in groups.items()}, open(os.path.join(A.out, "groups.json"), "w"))
        sys.exit(0)
    done = set()
    rpath = os.path.join(A.out, "results.jsonl")
    if os.path.exists(rpath):
        done = {json.loads(l)["key"] for l in open(rpath)}
    order = open(A.keys).read().split() if A.keys else list(groups)
    todo = [(k, groups[k]["rec"]) for k in order if k in groups and k not in done]
    print(f"{len(todo)} to compile", flush=True)
    import multiprocessing as mp
    with mp.get_context("fork").Pool(A.jobs, maxtasksperchild=50) as pool, open(rpath, "a") as fo:
        for i, res in enumerate(pool.imap_unordered(work, todo)):
            g = groups[res["key"]]
            res["uses"] = g["uses"]
            res["rec"] = g["rec"]
            fo.write(json.dumps(res) + "\n")
            fo.flush()
            nf = sum(f["kind"] == "never" for f in res.get("flags", []))
            if nf or "error" in res or i % 50 == 0:
                print(i, res["kernel"], res["key"], "FLAGGED" if nf else "", res.get("error", ""), res["secs"],
                      f"{time.time() - t0:.0f}s", flush=True)
