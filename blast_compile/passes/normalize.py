"""Read the many spellings a Dynamo graph uses for "linear" and "activation".

Dynamo graphs are not normalized: a linear is ``torch._C._nn.linear`` (or
``F.linear``, or GPT-2's ``Conv1D`` as ``torch.addmm(bias, x, W[in, out])``, or
Falcon's ``x @ W.T (+ b)``, or one half of a chunked gate|up linear, or a
compressed layer's ``blast::block_linear(x, blocks, row_ptr, col_idx, ...)``),
and an activation can be one call (``torch.relu``, ``F.gelu(approximate=...)``,
``x.relu()``) or arithmetic that HF modules inline (``NewGELUActivation`` is
``0.5*x*(1+tanh(c*(x+0.044715*x**3)))``, ``relu(x)**2``, ``x*sigmoid(x)``).

Nothing here rewrites the graph: these are classification functions the
matcher calls. Activations are identified by *value*, not by spelling: the
pointwise region between the pre-activation ``a`` and its output is evaluated
in float64 on sample points and compared with each canonical activation. That
accepts every spelling (and every constant written to any precision) at once,
and it is safe because the region may only use the analytic ops of
:data:`POINTWISE` with Python-number constants, plus ``relu`` applied to ``a``
itself: such a function is analytic on each side of 0, so agreeing on many
points on both sides pins it down.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops.activations import ACTIVATIONS

# --- linear ------------------------------------------------------------------

#: ``linear(x, weight, bias=None)`` with weight ``[out, in]``.
LINEAR_FUNCTIONS = {torch._C._nn.linear, F.linear, torch.ops.aten.linear.default}
#: ``addmm(bias, x, weight)`` with weight ``[in, out]`` (GPT-2 ``Conv1D``).
ADDMM_FUNCTIONS = {torch.addmm, torch.ops.aten.addmm.default}
#: ``blast::block_linear(x, blocks, row_ptr, col_idx, bias, out_features)``: a compressed
#: ``BlockSparseLinear`` (see :mod:`blast_compile.compress`); Dynamo records the packet.
BLOCK_LINEAR = "blast::block_linear"


@dataclasses.dataclass
class Linear:
    node: Node  # the output
    x: Node
    weight: Node  # the dense weight, or the packed blocks [nnz, bo, bi] of a compressed layer
    bias: Optional[Node]
    transposed: bool  # weight is stored [in, out]: the op gets torch.t(weight)
    index: Optional[tuple] = None  # compressed layer: (row_ptr, col_idx) nodes; None for dense
    out_features: Optional[int] = None  # compressed layer's output size
    rows: Optional[tuple] = None  # (start, stop): the projection is rows start:stop of weight (and bias)
    via: tuple = ()  # nodes between the whole linear and this part of it (fused gate|up: linear, chunk)

    @property
    def packed(self) -> bool:
        return self.index is not None


def _op_name_of(target) -> Optional[str]:
    """``ns::name`` of a custom op (packet or overload), else None."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def _as_block_linear(node: Node) -> Optional[Linear]:
    x, blocks = _arg(node, 0, "x"), _arg(node, 1, "blocks")
    row_ptr, col_idx = _arg(node, 2, "row_ptr"), _arg(node, 3, "col_idx")
    b, out = _arg(node, 4, "bias"), _arg(node, 5, "out_features")
    if not all(isinstance(n, Node) for n in (x, blocks, row_ptr, col_idx)) or not (b is None or isinstance(b, Node)):
        return None
    if isinstance(out, bool) or not isinstance(out, int):
        return None
    return Linear(node, x, blocks, b, False, index=(row_ptr, col_idx), out_features=out)


def _arg(node: Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


#: ``x @ w``: a linear when ``w`` is a 2-D weight (stored ``[in, out]``) or its transpose (Falcon's
#: ``FalconLinear``: ``x @ self.weight.T``, plus ``+ self.bias``).
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul}
ADD_FUNCTIONS = {operator.add, torch.add}


def _transpose_of(node) -> Optional[Node]:
    """``w`` when ``node`` is ``w.T`` / ``w.t()`` / ``torch.t(w)`` / ``w.transpose(0, 1)`` of a 2-D ``w``."""
    if not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return None
    w, rest = node.args[0], tuple(node.args[1:])
    ok = ((node.op == "call_function" and node.target is getattr and rest in (("T",), ("mT",)))
          or (node.op == "call_method" and node.target == "t" and not rest)
          or (node.op == "call_function" and node.target is torch.t and not rest)
          or (node.op in ("call_method", "call_function") and node.target in ("transpose", torch.transpose)
              and sorted(d % 2 for d in rest if isinstance(d, int)) == [0, 1] and len(rest) == 2))
    v = example_value(w)
    return w if ok and isinstance(v, torch.Tensor) and v.dim() == 2 else None


def _as_matmul_linear(node: Node) -> Optional[Linear]:
    if node.target in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
        for mm, b in (node.args, node.args[::-1]):
            lin = _as_matmul_linear(mm) if isinstance(mm, Node) and mm.op == "call_function" else None
            bv, out = example_value(b), example_value(mm)
            if (lin is not None and lin.bias is None and isinstance(bv, torch.Tensor) and bv.dim() == 1
                    and isinstance(out, torch.Tensor) and same(bv.shape[0], out.shape[-1])):
                return dataclasses.replace(lin, node=node, bias=b)
        return None
    if node.target not in MATMUL_FUNCTIONS or len(node.args) != 2 or node.kwargs:
        return None
    x, wt = node.args
    xv = example_value(x)
    if not isinstance(x, Node) or not isinstance(xv, torch.Tensor) or xv.dim() < 2:
        return None  # (a 1-D x would drop the row dimension)
    w = _transpose_of(wt)
    if w is not None:
        return Linear(node, x, w, None, False)
    v = example_value(wt)
    if isinstance(wt, Node) and wt.op in ("placeholder", "get_attr") and isinstance(v, torch.Tensor) and v.dim() == 2:
        return Linear(node, x, wt, None, True)  # x @ W with W stored [in, out]
    return None


def as_linear(node) -> Optional[Linear]:
    """The linear ``node`` computes, or None."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    if _op_name_of(node.target) == BLOCK_LINEAR:
        return _as_block_linear(node)
    if node.target in MATMUL_FUNCTIONS or node.target in ADD_FUNCTIONS:
        return _as_matmul_linear(node)
    if node.target in LINEAR_FUNCTIONS:
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        transposed = False
    elif node.target in ADDMM_FUNCTIONS:
        if any(_arg(node, i, k, 1) != 1 for i, k in ((3, "beta"), (4, "alpha"))) or "out" in node.kwargs:
            return None
        b, x, w = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
        transposed = True
    else:
        return None
    if not isinstance(x, Node) or not isinstance(w, Node) or not (b is None or isinstance(b, Node)):
        return None
    return Linear(node, x, w, b, transposed)


#: ``torch.chunk(t, 2, dim)`` / ``t.chunk(2, dim)`` and ``split(t, size, dim)`` into two halves.
CHUNK_FUNCTIONS = {torch.chunk: "chunks", torch.split: "split_size_or_sections"}
CHUNK_METHODS = {"chunk": "chunks", "split": "split_size"}


def as_half(node) -> Optional[Linear]:
    """``getitem(chunk(linear(x, W, b), 2, dim=-1), k)``: one half of a fused projection (Phi-3's
    and GLM's ``gate_up_proj``) read as a linear of rows ``k*h:(k+1)*h`` of W (and b), or None."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem
            and len(node.args) == 2 and node.args[1] in (0, 1)):
        return None
    ch, k = node.args
    if not isinstance(ch, Node) or not ch.args:
        return None
    if ch.op == "call_function" and ch.target in CHUNK_FUNCTIONS:
        name = CHUNK_FUNCTIONS[ch.target]
    elif ch.op == "call_method" and ch.target in CHUNK_METHODS:
        name = CHUNK_METHODS[ch.target]
    else:
        return None
    lin = as_linear(ch.args[0])
    if lin is None or lin.packed or lin.transposed:
        return None
    full = example_value(lin.node)
    n = _arg(ch, 1, name)
    dim = _arg(ch, 2, "dim", 0)
    if not isinstance(full, torch.Tensor) or full.dim() < 1 or not isinstance(dim, int) or dim % full.dim() != full.dim() - 1:
        return None
    out = full.shape[-1]
    if not isinstance(out, int) or out % 2:
        return None
    h = out // 2
    if n != (2 if name.startswith("chunk") else h):
        return None
    return dataclasses.replace(lin, node=node, rows=(k * h, (k + 1) * h), via=(lin.node, ch))


# --- views -------------------------------------------------------------------

#: Reshapes that keep memory order. When they keep the last dimension they keep
#: every row intact, so a linear/activation commutes with them.
VIEW_METHODS = {"view", "reshape", "contiguous", "unsqueeze", "squeeze", "flatten", "unflatten", "view_as", "reshape_as"}
VIEW_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze}


def example_value(node):
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
    return v


def same(a, b) -> bool:
    """Statically equal sizes (ints or SymInts), without adding guards."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def same_shape(s, t) -> bool:
    return len(s) == len(t) and all(same(a, b) for a, b in zip(s, t))


#: ``F.dropout(x, p, training, inplace)`` and ``torch.dropout(x, p, train)``: the name of the
#: training flag. Not training, or p == 0, it is the identity (a model in eval mode, e.g. T5's
#: ``wo(dropout(act(wi(x))))``); Dynamo records it all the same.
DROPOUT_FUNCTIONS = {F.dropout: "training", torch.dropout: "train"}


def is_identity_dropout(node) -> bool:
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in DROPOUT_FUNCTIONS):
        return False
    p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, DROPOUT_FUNCTIONS[node.target], True)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not isinstance(training, bool):
        return False  # (computed in the graph: cannot tell)
    return not training or p == 0


def is_row_view(node) -> bool:
    """A view/reshape of its first argument that keeps the last dimension (so rows stay rows), or
    an identity dropout."""
    if not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return False
    if is_identity_dropout(node):
        return True
    if not ((node.op == "call_method" and node.target in VIEW_METHODS)
            or (node.op == "call_function" and node.target in VIEW_FUNCTIONS)):
        return False
    a, b = example_value(node.args[0]), example_value(node)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() == 0 or b.dim() == 0:
        return False
    return same(a.shape[-1], b.shape[-1]) and same(a.numel(), b.numel())


def strip_views(node):
    """Walk back through row views; returns (root, [views from root to node])."""
    chain = []
    while is_row_view(node):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


# --- activations ---------------------------------------------------------------

#: Analytic elementwise ops an activation may be built from (Python-number constants only).
POINTWISE_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow, operator.pos,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.pow, torch.square,
    torch.tanh, torch.sigmoid, torch.exp, torch.erf, torch.special.erf, torch.rsqrt, torch.sqrt,
    torch._C._nn.gelu, F.gelu, F.silu, F.tanh, F.sigmoid,
}
POINTWISE_METHODS = {
    "mul", "add", "sub", "div", "neg", "pow", "square", "tanh", "sigmoid", "exp", "erf",
    "__mul__", "__rmul__", "__add__", "__radd__", "__sub__", "__rsub__", "__truediv__", "__pow__",
}
#: Piecewise ops: allowed only on the pre-activation itself (kink at 0, analytic either side).
RELU_FUNCTIONS = {torch.relu, F.relu, torch.nn.functional.relu}
RELU_METHODS = {"relu"}
#: Keyword arguments that keep the op analytic.
_KWARG_OK = {
    "alpha": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "approximate": lambda v: v in ("none", "tanh"),
    "inplace": lambda v: isinstance(v, bool),
}


def _global_scalar(node: Node):
    """The value of a scalar computed from module-level constants only, else None.

    With ``dynamic=True`` Dynamo lifts floats such as ``math.pi`` (in GPT-2's
    ``sqrt(2 / pi)``) to graph inputs; they are globals, not user inputs, so their
    current value is the constant.
    """
    v = example_value(node)
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        v = v.node.hint
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            source = getattr(n.meta.get("grapharg"), "source", None)
            if source is None or not source.name.startswith("G["):
                return None
        todo.extend(n.all_input_nodes)
    return v


def _is_relu(node: Node) -> bool:
    return (node.op == "call_function" and node.target in RELU_FUNCTIONS) or (
        node.op == "call_method" and node.target in RELU_METHODS)


def _is_pointwise(node: Node) -> bool:
    if node.op == "call_function":
        ok = node.target in POINTWISE_FUNCTIONS or node.target in RELU_FUNCTIONS
    elif node.op == "call_method":
        ok = node.target in POINTWISE_METHODS or node.target in RELU_METHODS
    else:
        return False
    if not ok:
        return False
    for a in node.args:  # tensors of the region, or plain numbers
        if isinstance(a, Node):
            if not isinstance(example_value(a), torch.Tensor) and _global_scalar(a) is None:
                return False
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            return False
    for k, v in node.kwargs.items():
        if not _KWARG_OK.get(k, lambda v: False)(v):
            return False
    return any(isinstance(a, Node) and isinstance(example_value(a), torch.Tensor) for a in node.args)


@dataclasses.dataclass
class Activation:
    name: Optional[str]  # canonical (a key of ops.activations.ACTIVATIONS); None: not fusable
    pre: Node  # the pre-activation (a linear's output)
    nodes: list  # the region's nodes, graph order, including views; nodes[-1] is the output
    ops: str = ""  # the region's ops, for messages


def pointwise_region(out: Node, order: dict):
    """(leaf, nodes): the elementwise/row-view nodes that compute ``out`` from a single leaf node."""
    nodes, leaves, todo = set(), set(), [out]
    while todo:
        n = todo.pop()
        if n in nodes or n in leaves:
            continue
        if is_row_view(n):
            nodes.add(n)
            todo.append(n.args[0])  # shape arguments are not part of the function
        elif isinstance(n, Node) and _is_pointwise(n) and as_linear(n) is None:  # (x @ W.T + b is a linear)
            nodes.add(n)
            todo.extend(a for a in n.args if isinstance(a, Node) and isinstance(example_value(a), torch.Tensor))
        else:
            leaves.add(n)
    if len(leaves) != 1:
        return None, []
    return leaves.pop(), sorted(nodes, key=order.__getitem__)


def _samples():
    g = torch.Generator().manual_seed(0)
    pts = [torch.linspace(-8, 8, 161, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64) * 3,
           torch.tensor([0.0, 1e-4, -1e-4, 20.0, -20.0, 60.0, -60.0], dtype=torch.float64)]
    return torch.cat(pts)


_SAMPLES = _samples()


def _evaluate(pre: Node, nodes, x: torch.Tensor):
    env = {pre: x.clone()}
    for n in nodes:
        if is_row_view(n):
            env[n] = env[n.args[0]]
            continue
        args = [(env[a] if a in env else _global_scalar(a)) if isinstance(a, Node) else a for a in n.args]
        kwargs = {k: (env[v] if isinstance(v, Node) else v) for k, v in n.kwargs.items()}
        env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else n.target(*args, **kwargs)
    return env[nodes[-1]]


def identify(values: torch.Tensor, x: torch.Tensor = _SAMPLES) -> Optional[str]:
    """Name of the canonical activation whose values on ``x`` are ``values`` (float64), or None."""
    if not isinstance(values, torch.Tensor) or values.dtype != torch.float64 or values.shape != x.shape:
        return None
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(values, fn(x), rtol=1e-7, atol=1e-10, equal_nan=True):
            return name
    return None


def _op_name(n: Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def classify_activation(out: Node, order: dict) -> Optional[Activation]:
    """The activation ``out`` applies to a single pre-activation node, or None if it is not
    an elementwise function of one node. ``name`` is None for a function we cannot fuse."""
    pre, nodes = pointwise_region(out, order)
    if pre is None or all(is_row_view(n) for n in nodes):
        return None
    act = Activation(None, pre, nodes, ", ".join(_op_name(n) for n in nodes if not is_row_view(n)))
    for n in nodes:  # relu only on the pre-activation itself (see module docstring)
        if _is_relu(n) and strip_views(n.args[0])[0] is not pre:
            return act
    try:
        act.name = identify(_evaluate(pre, nodes, _SAMPLES))
    except Exception:
        pass
    return act


def is_mul(node) -> bool:
    """A product of two tensors (``operator.mul``, ``torch.mul``, ``Tensor.mul``)."""
    if not isinstance(node, Node) or node.kwargs or len(node.args) != 2:
        return False
    if not ((node.op == "call_function" and node.target in (operator.mul, torch.mul))
            or (node.op == "call_method" and node.target in ("mul", "__mul__"))):
        return False
    return all(isinstance(a, Node) and isinstance(example_value(a), torch.Tensor) for a in node.args)


__all__ = ["Linear", "as_linear", "as_half", "is_row_view", "strip_views", "Activation", "classify_activation",
           "identify", "is_mul", "example_value", "same", "same_shape"]
