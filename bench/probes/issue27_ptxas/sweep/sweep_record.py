"""Issue-27 sweep, step 1 (global env: torch cpu + triton 3.9, TRITON_INTERPRET=1): drive the product's launchers
(triton_mlp.forward decode/prefill/training keep=2, backward with and without saved pre-activations, with declared
dW masks -> sddmm; autocast-style fp32 masters -> pack_blocks + packed variants) and record every kernel launch the
product would make for EVERY candidate config of the tuner (tune._choose is patched to run all candidates), without
executing any kernel. PDL is forced on (as on Hopper), SM count 132 (H100).
usage: python sweep_record.py OUT.jsonl [REPO]   (REPO default: this checkout)
env CASES=quick|full; TNSP_FIX=0|1: the kernels as generated for a sound / a faulty ptxas (codegen/toolchain.py,
default 1; on this CPU machine the product itself would pick 0)"""
import os, sys, json, itertools
os.environ["TRITON_INTERPRET"] = "1"
os.environ["BLAST_TUNE"] = "0"
out_path = sys.argv[1]
REPO = sys.argv[2] if len(sys.argv) > 2 else os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../.."))
os.environ["BLAST_CACHE_DIR"] = os.path.join(os.path.dirname(os.path.abspath(out_path)), "blastcache")
sys.path.insert(0, REPO)
import torch
from blast_compile import codegen
codegen.toolchain.tnsp_fix_needed = lambda: os.environ.get("TNSP_FIX", "1") == "1"
codegen.set_kernel_dir(os.path.join(os.path.dirname(os.path.abspath(out_path)), "kernels"))
from blast_compile.formats import cdiv, expand_mask
from blast_compile.ops import backward as B, tune, triton_mlp, configs as C, launch, decode as D, tables as T
from blast_compile.ops.sparse_mlp import weights_plan
from blast_compile.sparsify import options as _o  # noqa (import side effects only)
from triton.tools.tensor_descriptor import TensorDescriptor

codegen.lookup_config = lambda key: None
CTX = {}
REC = []
SEEN = set()


def desc(a):
    if isinstance(a, torch.Tensor):
        return dict(kind="tensor", dtype=str(a.dtype), off=a.storage_offset() * a.element_size())
    if isinstance(a, TensorDescriptor):
        b = a.base
        return dict(kind="tdesc", dtype=str(b.dtype), off=b.storage_offset() * b.element_size(),
                    shape=[int(s) for s in a.shape], strides=[int(s) for s in a.strides],
                    block=[int(s) for s in a.block_shape], padding=getattr(a, "padding", "zero"))
    if a is None:
        return dict(kind="none")
    if isinstance(a, bool):
        return dict(kind="bool", value=a)
    if isinstance(a, int):
        return dict(kind="int", value=a)
    if isinstance(a, float):
        return dict(kind="float", value=a)
    raise TypeError(type(a))


class Rec:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __getitem__(self, grid):
        def launch_(*args, **kw):
            kwd = {k: (str(v) if k == "DTYPE" else v) for k, v in kw.items()}
            r = dict(kernel=self.name, module=self.fn.fn.__code__.co_filename, grid=[int(g) for g in grid],
                     args=[desc(a) for a in args], kw=kwd)
            key = json.dumps([r["kernel"], r["module"], r["args"], sorted(kwd.items())], sort_keys=True)
            r["case"] = CTX.get("case")
            r["cfg"] = CTX.get("cfg")
            if key not in SEEN:
                SEEN.add(key)
                REC.append(r)
        return launch_


def _getattr(self, name):
    fn = getattr(self._mod, name)
    if hasattr(fn, "fn") and hasattr(fn, "__getitem__") and name[0] != "_":
        return Rec(name, fn)
    return fn


launch.Module.__getattr__ = _getattr


def choose(kind, sig, m, configs, run, **kw):
    cands = list(configs() if callable(configs) else configs)
    for c in cands:
        CTX["cfg"] = [kind, list(c)]
        try:
            run(c)
        except Exception as e:  # noqa
            print("run failed", kind, c, repr(e)[:200], file=sys.stderr)
    CTX["cfg"] = [kind, list(cands[0]), "chosen"]
    return cands[0]


tune._choose = choose
D._pdl_ok = lambda device: C.PDL
T._n_sm = lambda device: 132
B._n_sm = lambda device: 132


def _decode(args):  # both decode paths
    D._decode_sliced(*args)
    return D._decode_splitk(*args)


D._decode = _decode
import blast_compile.ops.prefill as P
P._decode = _decode


def wts(o, i, bo, bi, g, density=0.7):
    m = torch.rand(cdiv(o, bo), cdiv(i, bi), generator=g) < density
    m[0, 0] = True
    t = torch.randn(o, i, generator=g) / i ** 0.5
    return t * expand_mask(m, bo, bi, t.shape), m


def run_case(dtype, act, gated, bh, bd, d, h, dout, ms, bias, tag, master=False):
    g = torch.Generator().manual_seed(1234)
    w1, m1 = wts(h, d, bh, bd, g)
    w3, m3 = wts(h, d, bh, bd, g) if gated else (None, None)
    w2, m2 = wts(dout, h, bd, bh, g)
    wdt = torch.float32 if master else dtype
    w1, w2 = w1.to(wdt), w2.to(wdt)
    w3 = w3.to(wdt) if gated else None
    b1 = torch.randn(h).to(wdt) if bias else None
    b3 = torch.randn(h).to(wdt) if (bias and gated) else None
    b2 = torch.randn(dout).to(wdt) if bias else None
    x0 = torch.randn(8, d, dtype=dtype)
    plan = weights_plan(x0, w1, b1, w3, b3, w2, b2, act, bh, bd, f"k{tag}", 1.0)
    # declared dW masks (sparse dW: sddmm + sddmm_reduce), gate/up tied when both gated
    plan.dw_masks = (m1 | (m3 if gated else False), (m1 | m3) if gated else None, m2)
    for m in ms:
        CTX["case"] = dict(tag=tag, dtype=str(dtype), act=act, gated=gated, block=[bh, bd], d=d, h=h, dout=dout,
                           M=m, bias=bias, master=master)
        x = torch.randn(m, d, dtype=dtype)
        dy = torch.randn(m, dout, dtype=dtype)
        # inference forward (decode paths at M <= 32, prefill above)
        triton_mlp.forward(x, w1, b1, w3, b3, w2, b2, plan, act)
        needs = [True, True, bias, gated, bias and gated, True, bias]
        # training: forward keep=2 then backward reading the pre-activations; and backward recomputing them
        y, saved = triton_mlp.forward(x, w1, b1, w3, b3, w2, b2, plan, act, keep=2)
        triton_mlp.backward(dy, x, w1, b1, w3, b3, w2, b2, plan, act, needs, saved)
        triton_mlp.backward(dy, x, w1, b1, w3, b3, w2, b2, plan, act, needs, None)
        # keep=1 (H only)
        y, s1 = triton_mlp.forward(x, w1, b1, w3, b3, w2, b2, plan, act, keep=1)
        triton_mlp.backward(dy, x, w1, b1, w3, b3, w2, b2, plan, act, needs, s1)
    return plan


CASES = os.environ.get("CASES", "full")
dtypes = [torch.float16, torch.bfloat16]
kinds = [("relu2", True), ("silu", True), ("gelu", False)]
blocks = [(16, 16), (32, 32), (64, 64), (128, 128), (32, 128), (128, 32)]
MS = [1, 5, 16, 128, 1024]
n = 0
for dt, (act, gated), (bh, bd) in itertools.product(dtypes, kinds, blocks):
    if CASES == "quick" and (dt != torch.float16 or act != "relu2"):
        continue
    # ragged, unaligned rows (like the 34/71/21 at these blocks): pointer variants only, no TMA
    d, h, dout = 2 * bd + 34, 3 * bh + 7, bd + 21
    run_case(dt, act, gated, bh, bd, d, h, dout, MS, bias=(act == "gelu"), tag=f"rag{n}"); n += 1
    # aligned shapes (16-byte rows): TMA variants too
    d, h, dout = 4 * bd, 4 * bh, 2 * bd
    run_case(dt, act, gated, bh, bd, d, h, dout, MS, bias=False, tag=f"al{n}"); n += 1
# autocast-style fp32 masters (pack_blocks + packed kernels, TMA=2 / 4) and the exact shape
run_case(torch.float16, "relu2", True, 32, 128, 34, 71, 21, [5], bias=False, tag="issue27")
run_case(torch.bfloat16, "silu", True, 64, 64, 256, 512, 128, [5, 1024], bias=False, tag="master", master=True)
run_case(torch.float16, "gelu", False, 128, 128, 512, 512, 256, [16, 1024], bias=True, tag="master2", master=True)
with open(out_path, "w") as f:
    for r in REC:
        f.write(json.dumps(r) + "\n")
from collections import Counter
print(len(REC), "unique launches", Counter(r["kernel"] for r in REC))
