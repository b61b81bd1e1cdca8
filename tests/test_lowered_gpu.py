"""Fused MLPs lowered into Inductor's own code (GPU): same answers as eager, kernels in Inductor's output code,
no per-MLP Python at run time, and the guard that keeps the compiled pattern honest."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import blast_compile  # noqa: F401
from blast_compile.masks import declare_mask
from blast_compile.testing import SwiGLU, sparsify_mlps_, zero_blocks_
from conftest import tol

pytestmark = pytest.mark.gpu


class Stack(torch.nn.Module):
    """Residual MLPs with a norm each: Inductor has its own work around every fused node."""

    def __init__(self, d=128, h=384, n=2, gated=True, bias=False, act="silu"):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(n))
        self.ups = torch.nn.ModuleList(torch.nn.Linear(d, h, bias=bias) for _ in range(n))
        self.gates = torch.nn.ModuleList(torch.nn.Linear(d, h, bias=bias) for _ in range(n)) if gated else None
        self.downs = torch.nn.ModuleList(torch.nn.Linear(h, d, bias=bias) for _ in range(n))
        self.act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[act]

    def forward(self, x):
        for i in range(len(self.ups)):
            z = self.norms[i](x)
            h = self.act(self.gates[i](z)) * self.ups[i](z) if self.gates is not None else self.act(self.ups[i](z))
            x = x + self.downs[i](h)
        return x


def sparse_stack(dtype=torch.bfloat16, sparsity=0.8, block=32, seed=0, **kw):
    torch.manual_seed(seed)
    m = Stack(**kw)
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        if p.dim() == 2:
            zero_blocks_(p.data, sparsity, (block, block), g)
    return m.cuda().to(dtype)


def compiled(m, **kw):
    torch._dynamo.reset()
    return torch.compile(m, backend="blast", **kw)


@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (False, True, "gelu"), (True, True, "relu")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowered_matches_eager_every_m(gated, bias, act, dtype):
    m = sparse_stack(dtype, gated=gated, bias=bias, act=act)
    cm = compiled(m)
    with torch.no_grad():
        for rows in (1, 5, 16, 33, 130, 1000, 7, 1):  # decode and prefill, static then dynamic M
            x = torch.randn(rows, 128, device="cuda", dtype=dtype)
            torch.testing.assert_close(cm(x), m(x), **tol(dtype))
    assert counters["blast"]["lowered"] >= 2
    assert counters["blast"]["graph_fallback_calls"] == 0


def test_output_code_launches_the_kernels_and_no_opaque_op():
    from torch._inductor.utils import run_and_get_code

    m = sparse_stack()
    cm = compiled(m)
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out, codes = run_and_get_code(cm, x)
    code = "\n".join(codes)
    assert "mlp_hidden" in code and "bsmm" in code
    assert "blast.sparse_mlp" not in code and "blast::sparse_mlp" not in code
    torch.testing.assert_close(out, m(x), **tol(torch.bfloat16))


def test_no_python_per_mlp_call(monkeypatch):
    """After compile, a call runs no blast op Python: the launchers are not entered at all."""
    from blast_compile.ops import lowered, triton_mlp

    m = sparse_stack()
    cm = compiled(m)
    x = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        cm(x)
        calls = []
        monkeypatch.setattr(triton_mlp, "forward", lambda *a, **k: calls.append(1))
        monkeypatch.setattr(lowered, "forward", lambda *a, **k: calls.append(1))
        y = cm(x)
    assert not calls
    torch.testing.assert_close(y, m(x), **tol(torch.bfloat16))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_graphs_and_values_stay_fresh(mode):
    m = sparse_stack()
    cm = compiled(m, mode=mode)
    x = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(cm(x).clone(), m(x), **tol(torch.bfloat16))
        m.ups[0].weight.mul_(0.5)  # same pattern, new values: read fresh, no fallback
        torch.testing.assert_close(cm(x).clone(), m(x), **tol(torch.bfloat16))
    assert counters["blast"]["graph_fallback_calls"] == 0


def test_revived_block_falls_back_correctly_and_recovers():
    m = sparse_stack()
    cm = compiled(m)
    x = torch.randn(40, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        cm(x)
        assert counters["blast"]["lowered"] >= 1, dict(counters["blast"])
        w = m.ups[0].weight
        both = torch.stack([w, m.gates[0].weight])  # a block dead in gate and up (the kernels read their union)
        # ... in a hidden block that W2 reads (the pattern drops hidden units no output uses: reviving a block
        # there changes nothing the kernels compute)
        used = (m.downs[0].weight.view(4, 32, 12, 32) != 0).any(3).any(1).any(0)
        dead = ((both.view(2, 12, 32, 4, 32) == 0).all(4).all(2).all(0) & used[:, None]).nonzero()[0]
        keep = w[dead[0] * 32, dead[1] * 32].clone()
        w[dead[0] * 32, dead[1] * 32] = 1.0  # a dead block comes alive
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            y = cm(x)
        said = [str(c.message) for c in seen]
        assert any("no longer fit" in c for c in said), (sorted(counters["blast"].items()), said)
        torch.testing.assert_close(y, m(x), **tol(torch.bfloat16))
        assert counters["blast"]["graph_fallback_calls"] == 1
        w[dead[0] * 32, dead[1] * 32] = keep  # back inside the compiled pattern: the compiled graph again
        torch.testing.assert_close(cm(x), m(x), **tol(torch.bfloat16))
        assert counters["blast"]["graph_fallback_calls"] == 1


def test_data_rebinding_and_fused_optimizer_are_seen():
    m = sparse_stack(torch.float32)
    cm = compiled(m)
    x = torch.randn(40, 128, device="cuda")
    with torch.no_grad():
        cm(x)
        m.ups[0].weight.data = torch.randn_like(m.ups[0].weight)  # dense now: must not run the old pattern
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(cm(x), m(x), **tol(torch.float32))
    m2 = sparse_stack(torch.float32, seed=1)
    cm2 = compiled(m2)
    opt = torch.optim.Adam(m2.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        opt.zero_grad()
        cm2(x).square().mean().backward()
        opt.step()  # (dense gradients: dead blocks come alive, the guard must notice)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(cm2(x), m2(x), **tol(torch.float32))


@pytest.mark.parametrize("declare", [False, True])
def test_training_gradients_match_eager(declare):
    m = sparse_stack(torch.float32)
    if declare:
        for p in m.parameters():
            if p.dim() == 2:
                declare_mask(p, (p.detach().view(p.shape[0] // 32, 32, p.shape[1] // 32, 32) != 0).any(3).any(1),
                             (32, 32))
    ref = sparse_stack(torch.float32)
    cm = compiled(m)
    x = torch.randn(3, 50, 128, device="cuda", requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    cm(x).square().mean().backward()
    ref(xr).square().mean().backward()
    torch.testing.assert_close(x.grad, xr.grad, **tol(torch.float32))
    for (n, p), pr in zip(m.named_parameters(), ref.parameters()):
        g = pr.grad
        if declare and p.dim() == 2:
            g = g * (p.detach() != 0)  # W * mask: no gradient on dead blocks
        torch.testing.assert_close(p.grad, g, **tol(torch.float32), msg=n)
    assert counters["blast"]["lowered_train"] >= 2


def test_autocast_fp32_masters():
    m = sparse_stack(torch.float32)
    cm = compiled(m)
    x = torch.randn(64, 128, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        y = cm(x)
        r = m(x)
    torch.testing.assert_close(y.float(), r.float(), **tol(torch.bfloat16))


def test_second_model_of_the_same_class_gets_its_own_decision():
    torch._dynamo.reset()
    dense = Stack().cuda().to(torch.bfloat16)
    sparse = sparse_stack()
    x = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(dense, backend="blast")(x), dense(x), **tol(torch.bfloat16))
        assert counters["blast"]["lowered"] == 0
        torch.testing.assert_close(torch.compile(sparse, backend="blast")(x), sparse(x), **tol(torch.bfloat16))
    assert counters["blast"]["lowered"] >= 2


def test_llama_model_lowered_logits_match():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    sparsify_mlps_(model, 0.9, block=64)
    ids = torch.randint(0, 512, (2, 37), device="cuda")
    torch._dynamo.reset()
    cm = torch.compile(model, backend="blast")
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, model(ids).logits, atol=5e-2, rtol=5e-2)
    assert counters["blast"]["lowered"] == 2


def test_swiglu_module_decode_sizes():
    m = SwiGLU(256, 512)
    with torch.no_grad():
        for lin in (m.gate_proj, m.up_proj, m.down_proj):
            zero_blocks_(lin.weight, 0.9, (64, 64))
    m = m.cuda().half()
    cm = compiled(m)
    with torch.no_grad():
        for rows in (1, 2, 3, 8, 17, 31):
            x = torch.randn(rows, 256, device="cuda", dtype=torch.half)
            torch.testing.assert_close(cm(x), m(x), **tol(torch.float16))


_LAUNCHERS = r"""
import gc, json, sys, torch
from torch._inductor.runtime.hints import HeuristicType
from torch._inductor.runtime.triton_heuristics import CachingAutotuner
from blast_compile.testing import SwiGLU, sparsify_mlps_

train = sys.argv[1] == "train"
if sys.argv[1] == "splitk":  # decode through split-K (its own kernels, the scratch passed by address)
    from blast_compile.ops import configs
    configs.DECODE_PATH = "splitk"
torch.manual_seed(0)
m = torch.nn.Sequential(SwiGLU(128, 384), SwiGLU(128, 384)).cuda()
sparsify_mlps_(m, 0.8, block=32)
if not train:
    m = m.to(torch.bfloat16)
else:  # (declared masks, as the sparsifier trains: dW then runs blast's sddmm, not a dense mm)
    from blast_compile.masks import declare_mask
    for p in m.parameters():
        if p.dim() == 2:
            declare_mask(p, (p.detach().view(p.shape[0] // 32, 32, -1, 32) != 0).any(3).any(1), (32, 32))
cm = torch.compile(m, backend="blast", options={"strict": True})
for rows in ((40, 300) if train else (1, 40, 300)):
    x = torch.randn(rows, 128, device="cuda", dtype=torch.float32 if train else torch.bfloat16, requires_grad=train)
    with torch.autocast("cuda", torch.bfloat16, enabled=train), torch.set_grad_enabled(train):
        y = cm(x)
    if train:
        y.float().sum().backward()
torch.cuda.synchronize()


def static(o):  # (a static launcher is marked; Triton's is not. Else: what the tuner's compile results say)
    if o.launchers and all(getattr(f, "_is_static", False) for f in o.launchers):
        return True
    return hasattr(o, "is_statically_launchable") and o.is_statically_launchable()


def why(o):  # (what the static launcher says of the first compiled config)
    if not getattr(o, "compile_results", None):
        return "no compile results left to ask"
    try:
        from torch._inductor.runtime.static_triton_launcher import StaticallyLaunchedCudaKernel
        StaticallyLaunchedCudaKernel(o.compile_results[0].kernel)
        return "accepted when asked again"
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:200]


tuners = [o for o in gc.get_objects() if issubclass(type(o), CachingAutotuner)]  # (type: a dead weakproxy raises)
user = [o for o in tuners if o.heuristic_type == HeuristicType.USER_AUTOTUNE]
print(json.dumps({"user": sorted({o.fn.__name__ for o in user}),
                  "not_static": {o.fn.__name__: why(o) for o in tuners if not static(o)}}))
"""


@pytest.mark.parametrize("case", ["infer", "train", "splitk"])
def test_lowered_kernels_get_inductors_static_launcher(case):
    """Option ``static_launch`` (the default): Inductor launches blast's kernels -- decode, prefill, training forward
    and backward -- through its static launcher, as it launches its own (Triton's Python launcher costs more host
    time per launch). In a fresh process without the variable, so the backend's own setting is what is tested."""
    import json
    import os
    import subprocess
    import sys

    from blast_compile.backend import STATIC_LAUNCH_ENV

    env = {k: v for k, v in os.environ.items() if k != STATIC_LAUNCH_ENV}
    out = subprocess.run([sys.executable, "-c", _LAUNCHERS, case], capture_output=True, text=True, timeout=900,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    expect = {"infer": {"mlp_hidden", "bsmm"}, "train": {"mlp_hidden", "bsmm", "mlp_hidden_bwd", "sddmm"},
              "splitk": {"mlp_decode_in", "mlp_decode_dn"}}[case]
    assert expect <= set(res["user"]), res
    assert not res["not_static"], res


_RUN_PACKAGE = """
import sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
xs, refs = torch.load(sys.argv[2])
assert "blast_compile" not in sys.modules
for x, ref in zip(xs, refs):
    y = runner(x)
    y = y[0] if isinstance(y, (list, tuple)) else y
    torch.testing.assert_close(y, ref, atol=float(sys.argv[3]), rtol=float(sys.argv[3]))
print("ok", len(xs))
"""


@pytest.mark.parametrize("dynamic", [False, True])
def test_aoti_package_runs_the_sparse_kernels_in_a_fresh_process(tmp_path, dynamic):
    import subprocess
    import sys

    from blast_compile.export import aoti_package, export

    dtype = torch.float16
    m = sparse_stack(dtype).eval()
    rows = [40, 2, 33, 1000, 7] if dynamic else [40]
    dyn = ({0: torch.export.Dim("rows", min=2, max=4096)},) if dynamic else None
    x0 = torch.randn(40, 128, device="cuda", dtype=dtype)
    counters.clear()
    ep = export(m, (x0,), dynamic_shapes=dyn)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "blast.mlp.default" in targets and not any("sparse_mlp" in t for t in targets), targets
    path = aoti_package(m, (x0,), str(tmp_path / "m.pt2"), dynamic_shapes=dyn)
    xs = [torch.randn(r, 128, device="cuda", dtype=dtype) for r in rows]
    with torch.no_grad():
        refs = [m(x) for x in xs]
    torch.save((xs, refs), tmp_path / "io.pt")
    out = subprocess.run([sys.executable, "-c", _RUN_PACKAGE, path, str(tmp_path / "io.pt"), str(tol(dtype)["atol"])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # the package's kernels are blast's, not a dense matmul of the whole weight
    import zipfile

    names = zipfile.ZipFile(path).namelist()
    sources = "".join(zipfile.ZipFile(path).read(n).decode(errors="ignore") for n in names
                      if n.endswith((".cpp", ".h", ".json")))
    assert "mlp_hidden" in sources or "decode" in sources, [n for n in names][:40]


def test_cpp_wrapper_runs_the_lowered_kernels():
    m = sparse_stack(torch.bfloat16)
    cm = compiled(m, options={"cpp_wrapper": True})
    counters.clear()
    with torch.no_grad():
        for rows in (1, 40, 300):
            x = torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(cm(x), m(x), **tol(torch.bfloat16))
    assert counters["blast"]["lowered"] >= 2


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("path", ["splitk", "sliced_pf", "sliced_split"])
def test_lowered_decode_paths_match_eager(monkeypatch, mode, path):
    """Decode paths a lowered op takes when timed faster or asked (DECODE_PATH): split-K inside Inductor's code
    (its plan's scratch passed by address; the GEMV at M = 1, the dots above), the sliced decode whose kernel
    1 prefetches W2 into L2, and the sliced decode whose ``bsmm`` splits its reduction (its scratch by address too);
    every decode M, then prefill, against eager; under CUDA graphs too."""
    from blast_compile.ops import configs

    if path == "sliced_split":
        from conftest import force_split_y

        force_split_y(monkeypatch, configs.DECODE_SPLIT_CONFIGS[1])
        path = "sliced"
    monkeypatch.setattr(configs, "DECODE_PATH", path)
    m = sparse_stack(torch.bfloat16, bias=True)
    cm = compiled(m, mode=mode)
    with torch.no_grad():
        for rows in (1, 1, 16, 17, 32, 5, 40, 1):
            x = torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(cm(x).clone(), m(x), **tol(torch.bfloat16))
