"""Compile mlp_hidden_bwd for the recorded issue-27 launch for sm_90 without a GPU, replicating the JIT's own
binder/specialization (native_specialize_impl) on stand-in tensors with the recorded dtypes and 16-byte alignment.
usage: python compile_kernel.py OUTDIR [num_stages] [num_warps]"""
import json, os, sys, importlib.util, inspect
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
os.environ["TRITON_CACHE_DIR"] = os.path.join(out, "triton_cache")
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime import jit as J

rec = json.load(open("/tmp/issue27/launch_record.json"))[0]
spec = importlib.util.spec_from_file_location("blast_kmod", rec["module_file"])
mod = importlib.util.module_from_spec(spec); sys.modules["blast_kmod"] = mod; spec.loader.exec_module(mod)
fn = mod.mlp_hidden_bwd

class FakeTensor:  # what native_specialize_impl reads: dtype (its str) and data_ptr (alignment)
    def __init__(self, dtype, ptr): self.dtype, self._p = dtype, ptr
    def data_ptr(self): return self._p

base = 0x7f0000000000  # caching-allocator blocks are >= 512-byte aligned; add the recorded storage offsets
args = []
for i, a in enumerate(rec["args"]):
    if a["kind"] == "tensor":
        args.append(FakeTensor(a["dtype"], base + 0x100000 * i + a["storage_byte_offset"]))
    elif a["kind"] == "none": args.append(None)
    elif a["kind"] in ("int", "bool", "float"): args.append(a["value"])
    else: raise SystemExit(f"unsupported arg {a}")
kw = dict(rec["kw"])
kw["DTYPE"] = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[kw["DTYPE"]]
if len(sys.argv) > 2: kw["num_stages"] = int(sys.argv[2])
if len(sys.argv) > 3: kw["num_warps"] = int(sys.argv[3])
kw["debug"] = False
if hasattr(triton.knobs.compilation, "instrumentation_mode"):
    kw["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
binder = J.create_function_from_signature(fn.signature, fn.params, backend)
bound_args, specialization, options = binder(*args, **kw)
options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args, specialization, options)
with open(os.path.join(out, "specialization.txt"), "w") as f:
    f.write(f"triton {triton.__version__}\n")
    for (name, v), s in zip(bound_args.items(), specialization):
        f.write(f"{name:16s} {s!r:40s} {v if not isinstance(v, FakeTensor) else ('tensor', v.dtype, hex(v.data_ptr()))}\n")
    f.write(f"\nsignature={signature}\nconstexprs={constexprs}\nattrs={attrs}\noptions={options}\n")
src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
k = triton.compile(src, target=target, options=options.__dict__)
for name, text in k.asm.items():
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(os.path.join(out, f"mlp_hidden_bwd.{name}"), mode) as f: f.write(text)
md = k.metadata
mdd = md._asdict() if hasattr(md, "_asdict") else dict(md.__dict__)
json.dump({k_: (v if isinstance(v, (int, float, str, bool, type(None), list)) else repr(v)) for k_, v in mdd.items()},
          open(os.path.join(out, "metadata.json"), "w"), indent=1)
print(out, "triton", triton.__version__, "shared", mdd.get("shared"), "num_warps", mdd.get("num_warps"),
      "num_stages", mdd.get("num_stages"), "global_scratch", mdd.get("global_scratch_size"),
      "profile_scratch", mdd.get("profile_scratch_size"))
