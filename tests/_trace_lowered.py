"""Trace lowered MLPs on a machine without a GPU (run by tests/test_lowering.py in a subprocess).

Triton's front end only needs a target to turn a kernel into TTIR, which is what AOTAutograd reads to find
the tensors a user kernel writes; a fake CUDA target stands in for the GPU, the compile-time warm-up builds
its tables but launches nothing, and the compiled graphs are captured, not run. Prints one JSON line per
case: what the forward and joint graphs hold.
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["BLAST_TUNE"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class _FakeDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(name)


triton.runtime.driver.set_active(_FakeDriver())

import torch._dynamo.backends.registry as registry  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch._functorch.partitioners import default_partition  # noqa: E402

import blast_compile  # noqa: E402,F401
from blast_compile.masks import declare_mask  # noqa: E402
from blast_compile.ops import configs, launch  # noqa: E402
from blast_compile.passes import lower as lower_pass  # noqa: E402

from blast_compile.passes import rewrite as rewrite_pass  # noqa: E402

lower_pass._why_not = lambda x, ws: None  # CPU tensors stand in for CUDA ones
blast_compile.export._lowers = lambda flat: True
# ... also for the training op (forward keeps H [and the pre-activations] for the backward), CUDA-only otherwise
rewrite_pass._training_on_cuda = lambda m: torch.is_grad_enabled()
_launch = launch.Kernel.launch
launch.Kernel.launch = lambda self, grid, args, kw: (_launch(self, grid, args, kw) if launch.traced()
                                                     else launch.note_uses(args, kw))

GRAPHS = {}


class Captured(Exception):
    pass


def _capture(kind):
    def compiler(gm, inputs):
        GRAPHS.setdefault(kind, []).append(gm)

        def run(*args):
            raise Captured()

        return run

    return compiler


def _partition(joint, inputs, **kw):
    GRAPHS.setdefault("joint", []).append(joint)
    return default_partition(joint, inputs, **kw)


_lookup = registry.lookup_backend
registry.lookup_backend = lambda name: (aot_autograd(fw_compiler=_capture("fw"), bw_compiler=_capture("bw"),
                                                     partition_fn=_partition) if name == "aot_eager" else _lookup(name))


def describe(gm):
    """Kernels launched (name, grid) and whether any kernel writes a graph input or the graph copies into one."""
    inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernels, writes_input, prefetch, big_ints = [], [], [], []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
            k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            name = getattr(getattr(k, "fn", k), "__name__", str(k))
            kernels.append([name, str(n.kwargs["grid"])])
            if n.kwargs["kwargs"].get("PF"):
                prefetch.append([name, n.kwargs["kwargs"]["PF"]])
            consts = kernel_side_table.get_constant_args(n.kwargs["constant_args_idx"])
            for arg, v in {**n.kwargs["kwargs"], **consts}.items():
                if isinstance(v, int) and not isinstance(v, bool) and not -2**31 <= v < 2**31:
                    big_ints.append(f"{name}.{arg}")
            for arg in n.kwargs.get("tensors_to_clone", []):
                if n.kwargs["kwargs"][arg] in inputs:
                    writes_input.append(f"{name}.{arg}")
        if n.op == "call_function" and "copy_" in str(n.target) and n.args[0] in inputs:
            writes_input.append(f"copy_ into {n.args[0].name}")
    # copies functionalization adds around a kernel that writes views, or gets one tensor twice
    copies = sorted(str(n.target).split(".")[-2] for n in gm.graph.nodes if n.op == "call_function"
                    and any(k in str(n.target) for k in ("scatter", "copy", "clone")))
    # tensors filled before a kernel can write them (each one more launch in Inductor's code)
    fills = sorted(str(n.target).split(".")[-2] for n in gm.graph.nodes if n.op == "call_function"
                   and any(k in str(n.target) for k in ("aten.zeros", "aten.full", "aten.fill", "aten.zero_")))
    return {"kernels": kernels, "writes_input": writes_input, "copies": copies, "fills": fills, "inputs": len(inputs),
            "prefetch": prefetch, "big_ints": big_ints}


class MLP(torch.nn.Module):
    def __init__(self, d=64, h=128, gated=True, bias=False, act="silu"):
        super().__init__()
        self.g = torch.nn.Linear(d, h, bias=bias)
        self.u = torch.nn.Linear(d, h, bias=bias) if gated else None
        self.d = torch.nn.Linear(h, d, bias=bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[act]

    def forward(self, x):
        h = self.act(self.g(x))
        if self.u is not None:
            h = h * self.u(x)
        return x + self.d(h)


def sparse_mlp(dtype=torch.float16, declare=False, **kw):
    torch.manual_seed(0)
    m = MLP(**kw).to(dtype)
    with torch.no_grad():
        for lin in (m.g, m.u):
            if lin is not None:
                lin.weight[:, 16:] = 0
                lin.weight[64:] = 0
        m.d.weight[:, 64:] = 0
    if declare:
        for p in m.parameters():
            if p.dim() == 2:
                declare_mask(p, (p.detach().view(p.shape[0] // 16, 16, -1, 16) != 0).any(3).any(1), (16, 16))
    return m


def run(name, m, xs, train=False, autocast=None, save_hidden=True):
    from blast_compile.ops import lowered

    counters.clear()
    GRAPHS.clear()
    lowered.LOWERED.clear()
    torch._dynamo.reset()
    cm = torch.compile(m, backend="blast", options={"inductor": False, "block_sizes": (16,), "strict": True,
                                                    "save_hidden": save_hidden})
    for x in xs:
        try:
            with torch.set_grad_enabled(train), torch.autocast("cpu", autocast, enabled=autocast is not None):
                cm(x.requires_grad_(train))
        except Captured:
            pass
    out = {"case": name, "counters": dict(counters["blast"]), "graphs": len(GRAPHS.get("fw", [])),
           "fw": [describe(g) for g in GRAPHS.get("fw", [])], "joint": [describe(g) for g in GRAPHS.get("joint", [])],
           # per lowered op: how many tables its plan reads, and in how many buffers the op gets them
           "tables": [[len(e.where), len(e.tensors)] for e in lowered.LOWERED.values()]}
    print(json.dumps(out), flush=True)


def run_export(name, m, x, dynamic):
    """``blast_compile.export.export``: what the ExportedProgram holds, and what it computes (on CPU the lowered
    kernels launch nothing, so only the graph is checked here; tests/test_lowered_gpu.py runs it)."""
    counters.clear()
    torch._dynamo.reset()
    dyn = ({0: torch.export.Dim("rows", min=2, max=4096)},) if dynamic else None
    ep = blast_compile.export.export(m, (x,), dynamic_shapes=dyn, options={"block_sizes": (16,), "strict": True})
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    sig = ep.graph_signature
    print(json.dumps({"case": name, "counters": dict(counters["blast"]), "targets": targets,
                      "constants": sorted(sig.lifted_tensor_constants) + sorted(sig.buffers),
                      "params": len(sig.parameters), "rows": str(ep.graph_module.graph.find_nodes(
                          op="placeholder")[-1].meta["val"].shape[0])}), flush=True)


def main(cases):
    h = torch.float16
    if "prefill" in cases:
        run("prefill", sparse_mlp(), [torch.randn(40, 64, dtype=h)])
    if "decode" in cases:
        run("decode", sparse_mlp(bias=True, act="gelu"), [torch.randn(1, 64, dtype=h)])
    if "dynamic" in cases:
        run("dynamic", sparse_mlp(), [torch.randn(r, 64, dtype=h) for r in (40, 100, 300, 1000)])
    if "train" in cases:
        run("train", sparse_mlp(torch.float32, declare=True), [torch.randn(2, 40, 64)], train=True)
    if "train_pre" in cases:  # the forward keeps the pre-activations too (save_hidden="all")
        run("train_pre", sparse_mlp(torch.float32), [torch.randn(2, 40, 64)], train=True, save_hidden="all")
    if "train_plain" in cases:
        run("train_plain", sparse_mlp(torch.float32, gated=False, bias=True, act="relu"), [torch.randn(40, 64)],
            train=True)
    if "decode_splitk" in cases:  # split-K decode lowered (DECODE_PATH "splitk"), compiled to TTIR for sm_90
        configs.DECODE_PATH = "splitk"
        try:
            run("decode_splitk", sparse_mlp(bias=True), [torch.randn(3, 64, dtype=h)])
        finally:
            configs.DECODE_PATH = ""
    if "decode_split_y" in cases:  # sliced decode, bsmm's reduction split over programs (scratch by address)
        saved = configs.DECODE_SLICE_CONFIGS
        configs.DECODE_PATH, configs.DECODE_SLICE_CONFIGS = "sliced", [configs.DECODE_SPLIT_CONFIGS[0]]
        try:
            run("decode_split_y", sparse_mlp(bias=True), [torch.randn(3, 64, dtype=h)])
        finally:
            configs.DECODE_PATH, configs.DECODE_SLICE_CONFIGS = "", saved
    if "decode_pf" in cases:  # sliced decode with kernel 1 prefetching W2 (GPU-only: forced here), TTIR for sm_90
        from blast_compile.ops import decode

        configs.DECODE_PATH, ok = "sliced_pf", decode._prefetch_ok
        decode._prefetch_ok = lambda *a: True
        try:
            run("decode_pf", sparse_mlp(bias=True), [torch.randn(3, 64, dtype=h)])
            configs.DECODE_PATH = "splitk"  # (lowered split-K: kernel 1 prefetches W2 wherever it can)
            run("decode_splitk_pf", sparse_mlp(bias=True), [torch.randn(3, 64, dtype=h)])
        finally:
            configs.DECODE_PATH, decode._prefetch_ok = "", ok
    if "packed" in cases:  # a compressed MLP (blast::packed_mlp), inference; compiled, then exported
        from blast_compile import compress
        from blast_compile.testing import SwiGLU, sparsify_mlps_

        torch.manual_seed(0)
        m = SwiGLU(64, 128).to(h)
        sparsify_mlps_(m, 0.75, block=16)
        assert len(compress.compress_(m, block_sizes=(16,)).compressed) == 1
        run("packed", m.eval(), [torch.randn(40, 64, dtype=h), torch.randn(3, 64, dtype=h)])
        run_export("export_packed", m, torch.randn(40, 64, dtype=h), dynamic=True)
    if "export" in cases:
        run_export("export", sparse_mlp(), torch.randn(40, 64, dtype=h), dynamic=False)
    if "export_dynamic" in cases:
        run_export("export_dynamic", sparse_mlp(bias=True, act="gelu"), torch.randn(40, 64, dtype=h), dynamic=True)
    if "export_hf" in cases:  # a transformers Llama, keyword-free call, dynamic sequence length
        import transformers

        from blast_compile.testing import sparsify_mlps_

        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                       max_position_embeddings=64, use_cache=False)
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg).eval().to(h)
        ids, dyn = (torch.randint(0, 97, (2, 9)),), ({1: torch.export.Dim("seq", min=2, max=64)},)
        sparsify_mlps_(m, 0.75, block=16)
        counters.clear()
        torch._dynamo.reset()
        try:
            ep = blast_compile.export.export(m, ids, options={"block_sizes": (16,)}, dynamic_shapes=dyn)
        except Exception as e:
            try:  # (some torch / transformers pairs cannot export this model at all: torch 2.12.1, transformers 5.25)
                torch.export.export(m, ids, dynamic_shapes=dyn)
            except Exception:
                print(json.dumps({"case": "export_hf", "unsupported": f"{type(e).__name__}: {e}"[:300]}), flush=True)
            else:
                raise
        else:
            print(json.dumps({"case": "export_hf", "counters": dict(counters["blast"]),
                              "targets": [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]}),
                  flush=True)
    if "autocast" in cases:
        run("autocast", sparse_mlp(torch.float32), [torch.randn(40, 64)], autocast=torch.bfloat16)
    if "train_plain_autocast" in cases:  # one pack_blocks launch for W1 and W2 (W1 stands in for the absent W3)
        run("train_plain_autocast", sparse_mlp(torch.float32, declare=True, gated=False), [torch.randn(2, 40, 64)],
            train=True, autocast=torch.bfloat16)


if __name__ == "__main__":
    main(sys.argv[1:])
