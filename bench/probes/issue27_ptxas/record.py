# Run the issue-27 case's backward on CPU under TRITON_INTERPRET=1 and record the mlp_hidden_bwd launch.
import os, sys, json, pickle
os.environ["TRITON_INTERPRET"] = "1"
os.environ["BLAST_TUNE"] = "0"
os.environ["BLAST_CACHE_DIR"] = "/tmp/issue27/blastcache"
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/tests")
import torch
from blast_compile import codegen
codegen.set_kernel_dir("/tmp/issue27/kernels")
from blast_compile.formats import cdiv, expand_mask, pattern_from_weights
from blast_compile.ops import backward as B, tune, triton_mlp, configs as C
from blast_compile.ops.sparse_mlp import weights_plan

chosen = []
orig_choose = tune._choose
def choose(kind, sig, m, configs_, run, **kw):
    cands = list(configs_() if callable(configs_) else configs_)
    chosen.append((kind, cands[0], len(cands)))
    return cands[0]          # untuned: what _choose returns with BLAST_TUNE=0 (configs[0])
tune._choose = choose
codegen.lookup_config = lambda key: None

rec = []
def desc(a):
    if isinstance(a, torch.Tensor):
        off = a.storage_offset() * a.element_size()
        return dict(kind="tensor", dtype=str(a.dtype), shape=list(a.shape), stride=list(a.stride()),
                    storage_byte_offset=off, storage_nbytes=a.untyped_storage().nbytes(),
                    values=a.flatten().tolist() if a.dtype in (torch.int32, torch.int64) and a.numel() < 200 else None)
    if a is None: return dict(kind="none")
    if isinstance(a, (bool,)): return dict(kind="bool", value=a)
    if isinstance(a, int): return dict(kind="int", value=a)
    if isinstance(a, float): return dict(kind="float", value=a)
    return dict(kind=type(a).__name__, repr=repr(a))

class Wrap:
    def __init__(self, mod): self._mod = mod
    def __getattr__(self, name):
        fn = getattr(self._mod, name)
        if name != "mlp_hidden_bwd": return fn
        class G:
            def __getitem__(s, grid):
                def launch(*args, **kw):
                    rec.append(dict(grid=list(grid), args=[desc(a) for a in args],
                                    kw={k: (str(v) if not isinstance(v, (int, float, bool)) else v) for k, v in kw.items()},
                                    src=getattr(fn, "fn", fn).__code__.co_filename if hasattr(getattr(fn, "fn", fn), "__code__") else None,
                                    params=[p.name for p in fn.params] if hasattr(fn, "params") else None))
                    return fn[grid](*args, **kw)
                return launch
        return G()
orig_module = B._module
def _module(*a, **k):
    sig, mod = orig_module(*a, **k)
    return sig, Wrap(mod)
B._module = _module

g = torch.Generator().manual_seed(765284)
def w(o, i, bo, bi):
    t = torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5
    return t * expand_mask(torch.rand(cdiv(o, bo), cdiv(i, bi), generator=g) >= 0.3, bo, bi, t.shape)
p = dict(w1=w(71, 34, 32, 128), w3=w(71, 34, 32, 128), w2=w(21, 71, 128, 32), b1=None, b3=None, b2=None)
p = {k: v.to(torch.float16) if v is not None else None for k, v in p.items()}
x = torch.randn(5, 34, dtype=torch.float16)
pat = pattern_from_weights(p["w1"], p["w3"], p["w2"], 32, 128, activation="relu2", has_b1=False, has_b3=False)
plan = weights_plan(x, p["w1"], None, p["w3"], None, p["w2"], None, "relu2", 32, 128, pat.key, 1.0)
print("pattern masks: in", pat.mask_in.int().tolist() if hasattr(pat, "mask_in") else None)
dy = torch.randn(5, 21, dtype=torch.float16)
needs = [True, True, False, True, False, True, False]
got = triton_mlp.backward(dy, x, p["w1"], None, p["w3"], None, p["w2"], None, plan, "relu2", needs, None)
print("chosen:", chosen)
sig, mod = orig_module(plan, "relu2", True, False, False, torch.float16)
print("module file:", mod._mod.__file__ if hasattr(mod, "_mod") else mod.__file__)
print("sig:", sig)
for r in rec:
    r["module_file"] = mod._mod.__file__ if hasattr(mod, "_mod") else mod.__file__
json.dump(rec, open("/tmp/issue27/launch_record.json", "w"), indent=1)
print(json.dumps(rec, indent=None)[:6000])
# correctness vs eager on CPU (sanity)
from blast_compile.ops.activations import dense_mlp
ins = [t.detach().clone().float().requires_grad_() for t in (x, p["w1"], p["w3"], p["w2"])]
ref = torch.autograd.grad(dense_mlp(ins[0], ins[1], None, ins[2], None, ins[3], None, "relu2"), ins, dy.float())
for k, r_ in zip(("x", "w1", "w3", "w2"), ref):
    print(k, "max|diff|", (got[k].float() - r_).abs().max().item())
