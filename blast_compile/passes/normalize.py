"""Read the many spellings a Dynamo graph uses for "linear" and "activation".

Dynamo graphs are not normalized: a linear is ``torch._C._nn.linear`` (or
``F.linear``, or GPT-2's ``Conv1D`` as ``torch.addmm(bias, x, W[in, out])``, or
Falcon's ``x @ W.T (+ b)``, or one half of a chunked gate|up linear, or a
compressed layer's ``blast::block_linear(x, blocks, row_ptr, col_idx, ...)``),
and an activation can be one call (``torch.relu``, ``F.gelu(approximate=...)``,
``x.relu()``) or arithmetic that HF modules inline (``NewGELUActivation`` is
``0.5*x*(1+tanh(c*(x+0.044715*x**3)))``, ``relu(x)**2``, ``x*sigmoid(x)``).

Nothing here rewrites the graph: these are classification functions the
matcher calls. Everything is identified by its op graph: a view is a view or
reshape op (one that keeps the dtype and the rows), and an activation is read
into a canonical form (a polynomial over calls of a few functions of the
pre-activation) and compared with the canonical form of each supported
spelling, constants included (see "activations" below). Values are never what
decides: a function that agrees with relu on sample points but is not written
as relu is not relu.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops.activations import ACTIVATIONS

log = logging.getLogger("blast_compile.passes")

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


#: ``w.T`` / ``w.mT`` as Dynamo records them from torch 2.14 on (before: ``getattr(w, "T")``)
_TRANSPOSE_OPS = {getattr(torch.ops.aten, n) for n in ("numpy_T", "mT") if hasattr(torch.ops.aten, n)}


def _transpose_of(node) -> Optional[Node]:
    """``w`` when ``node`` is ``w.T`` / ``w.t()`` / ``torch.t(w)`` / ``w.transpose(0, 1)`` of a 2-D ``w``."""
    if not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return None
    w, rest = node.args[0], tuple(node.args[1:])
    ok = ((node.op == "call_function" and node.target is getattr and rest in (("T",), ("mT",)))
          or (node.op == "call_function" and node.target in _TRANSPOSE_OPS and not rest)
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


def static_size(v) -> Optional[int]:
    """``v`` as an int: an int, or a SymInt that the trace has pinned to one value (a guard in the model's own
    code, such as a width check, leaves the symbol replaced by a number); else None."""
    if isinstance(v, int):
        return v
    try:
        e = v.node.shape_env.replace(v.node.expr)
        return int(e) if e.is_number else None
    except Exception:
        return None


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
    """A view/reshape of its first argument that keeps the dtype and the last dimension (so rows stay
    rows, element for element), or an identity dropout. ``x.view(torch.int32)`` is a bit cast, not a view."""
    if not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return False
    if is_identity_dropout(node):
        return True
    if not ((node.op == "call_method" and node.target in VIEW_METHODS)
            or (node.op == "call_function" and node.target in VIEW_FUNCTIONS)):
        return False
    if any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values())):
        return False
    a, b = example_value(node.args[0]), example_value(node)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() == 0 or b.dim() == 0:
        return False
    return a.dtype == b.dtype and same(a.shape[-1], b.shape[-1]) and same(a.numel(), b.numel())


def strip_views(node):
    """Walk back through row views; returns (root, [views from root to node])."""
    chain = []
    while is_row_view(node):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


# --- activations ---------------------------------------------------------------
#
# An activation is identified by the *structure* of its op graph, the way Inductor's pattern matcher
# identifies a pattern: the pointwise region between the pre-activation ``a`` and the activation's output
# is read into a canonical form -- a polynomial over "atoms", where an atom is ``a`` itself or one of a few
# functions (tanh, erf, sigmoid, exp, relu, gelu, silu) of a polynomial -- and compared, constants to a
# relative 1e-6, with the canonical form of each supported spelling. Reading it is exact algebra
# (distributing products over sums, folding constants), so ``0.5*x*(1+tanh(c*(x+k*x**3)))``,
# ``x*0.5*(1.0+tanh(x*c*(1+k*x*x)))`` (HF's FastGELU) and ``0.5*x + 0.5*x*tanh(...)`` all read the same,
# while anything else -- another function, another constant, a term more -- does not match and stays
# dense. A value probe then confirms the match (it never decides one).

#: Functions of the region, by what they compute. ``gelu`` is split by its ``approximate`` argument.
_FUNCTIONS = {
    operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add", operator.sub: "sub",
    torch.sub: "sub", operator.truediv: "div", torch.div: "div", torch.true_divide: "div", operator.neg: "neg",
    torch.neg: "neg", operator.pos: "pos", operator.pow: "pow", torch.pow: "pow", torch.square: "square",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.special.expit: "sigmoid",
    torch.exp: "exp", torch.erf: "erf", torch.special.erf: "erf", torch.relu: "relu", F.relu: "relu",
    torch._C._nn.gelu: "gelu", F.gelu: "gelu", F.silu: "silu", torch._C._nn.silu: "silu",
}
_METHODS = {
    "mul": "mul", "__mul__": "mul", "__rmul__": "mul", "add": "add", "__add__": "add", "__radd__": "add",
    "sub": "sub", "__sub__": "sub", "__rsub__": "rsub", "div": "div", "__truediv__": "div", "true_divide": "div",
    "neg": "neg", "__neg__": "neg", "pow": "pow", "__pow__": "pow", "square": "square", "tanh": "tanh",
    "sigmoid": "sigmoid", "exp": "exp", "erf": "erf", "relu": "relu",
}
_UNARY = {"tanh", "sigmoid", "exp", "erf", "relu", "gelu", "silu", "neg", "pos", "square"}
#: keyword arguments an op of the region may have: those that leave the value alone, or that are read
_KWARGS = {
    "add": {"alpha": lambda v: _scalar(v) is not None}, "sub": {"alpha": lambda v: _scalar(v) is not None},
    "div": {"rounding_mode": lambda v: v is None}, "gelu": {"approximate": lambda v: v in ("none", "tanh")},
    "relu": {"inplace": lambda v: isinstance(v, bool)}, "silu": {"inplace": lambda v: isinstance(v, bool)},
}
# constants written to 8+ significant digits match (HF's FastGELU 0.7978845608, Megatron's 0.79788456: 1e-9 off
# sqrt(2/pi)); a constant further off is another function, which eager computes and the kernel would not (a
# relu scaled by 1.0000009 fused as relu lost that scale beyond fp64's tolerance, and fp32's where outputs cancel)
_RTOL = 2e-9
_MAX_TERMS = 64


class _NotPointwise(Exception):
    """The region uses something the canonical form cannot express: not a supported activation."""


def _op_kind(n: Node) -> Optional[str]:
    if n.op == "call_function":
        return _FUNCTIONS.get(n.target)
    if n.op == "call_method":
        return _METHODS.get(n.target)
    return None


def _scalar(a) -> Optional[float]:
    """A Python number, or a scalar node computed from globals only (``math.pi`` lifted by Dynamo)."""
    if isinstance(a, Node):
        return _global_scalar(a)
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return None
    return float(a)


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
    return float(v)


def _is_pointwise(node: Node) -> bool:
    """An elementwise op of the region: a known op whose tensor operands all have its output's shape (no
    broadcasting between region tensors, so element i depends on element i only) and dtype, the rest
    Python numbers or global scalars, and only keyword arguments that leave the value alone."""
    kind = _op_kind(node)
    if kind is None:
        return False
    out = example_value(node)
    if not isinstance(out, torch.Tensor):
        return False
    tensors = 0
    for a in node.args:
        v = example_value(a) if isinstance(a, Node) else None
        if isinstance(v, torch.Tensor):
            if not same_shape(v.shape, out.shape) or v.dtype != out.dtype:
                return False
            tensors += 1
        elif _scalar(a) is None:
            return False
    allowed = _KWARGS.get(kind, {})
    return tensors >= 1 and all(k in allowed and allowed[k](v) for k, v in node.kwargs.items())


# --- the canonical form: {monomial: coefficient}; monomial = ((atom, power), ...); atom = ("x",) | (fn, arg)

_X_ATOM = ("x",)
_X = {((_X_ATOM, 1),): 1.0}


def _const(c: float) -> dict:
    return {(): float(c)} if c else {}


def _const_value(p: dict) -> Optional[float]:
    if not p:
        return 0.0
    return p[()] if len(p) == 1 and () in p else None


def _freeze(p: dict) -> tuple:
    return tuple(sorted(p.items(), key=repr))


def _add(p: dict, q: dict, scale: float = 1.0) -> dict:
    r = dict(p)
    for m, c in q.items():
        v = r.get(m, 0.0) + scale * c
        if v:
            r[m] = v
        else:
            r.pop(m, None)
    return r


def _mono_mul(m1: tuple, m2: tuple) -> tuple:
    d = dict(m1)
    for a, k in m2:
        d[a] = d.get(a, 0) + k
    return tuple(sorted(d.items(), key=repr))


def _mul(p: dict, q: dict) -> dict:
    r: dict = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            m = _mono_mul(m1, m2)
            v = r.get(m, 0.0) + c1 * c2
            if v:
                r[m] = v
            else:
                r.pop(m, None)
    if len(r) > _MAX_TERMS:
        raise _NotPointwise("too many terms")
    return r


def _pow(p: dict, e: Optional[float]) -> dict:
    if e is None or e != int(e) or not 0 <= e <= 8:
        raise _NotPointwise(f"power {e}")
    r = _const(1.0)
    for _ in range(int(e)):
        r = _mul(r, p)
    return r


_CONST_FNS = {"tanh": math.tanh, "exp": math.exp, "erf": math.erf, "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
              "relu": lambda v: max(v, 0.0), "silu": lambda v: v / (1 + math.exp(-v)),
              "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
              "gelu_tanh": lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))}


def _call(fn: str, p: dict) -> dict:
    c = _const_value(p)
    if c is not None:
        try:
            return _const(_CONST_FNS[fn](c))
        except (OverflowError, ValueError) as e:
            raise _NotPointwise(f"{fn}({c})") from e
    return {(((fn, _freeze(p)), 1),): 1.0}


def _canonical(out: Node, pre: Node) -> dict:
    """The canonical form of the region computing ``out`` from ``pre`` (raises _NotPointwise)."""
    memo: dict = {}

    def read(a) -> dict:
        if a is pre:
            return _X
        if not isinstance(a, Node):
            c = _scalar(a)
            if c is None:
                raise _NotPointwise(repr(a))
            return _const(c)
        if a in memo:
            return memo[a]
        if is_row_view(a):
            r = read(a.args[0])
        elif not isinstance(example_value(a), torch.Tensor) and _scalar(a) is not None:
            r = _const(_scalar(a))
        elif _is_pointwise(a):
            r = op(a)
        else:
            raise _NotPointwise(a.name)
        memo[a] = r
        return r

    def op(n: Node) -> dict:
        kind = _op_kind(n)
        args = [read(v) for v in n.args]
        alpha = _scalar(n.kwargs.get("alpha", 1.0))
        if kind in _UNARY and len(args) != 1:
            raise _NotPointwise(f"{kind} with {len(args)} arguments")
        if kind not in _UNARY and len(args) != 2:
            raise _NotPointwise(f"{kind} with {len(args)} arguments")
        if kind == "mul":
            return _mul(*args)
        if kind == "add":
            return _add(args[0], args[1], alpha)
        if kind == "sub":
            return _add(args[0], args[1], -alpha)
        if kind == "rsub":
            return _add(args[1], args[0], -1.0)
        if kind == "div":
            c = _const_value(args[1])
            if not c:
                raise _NotPointwise("division by a non-constant")
            return _mul(args[0], _const(1.0 / c))
        if kind == "pow":
            return _pow(args[0], _const_value(args[1]))
        if kind == "neg":
            return _mul(args[0], _const(-1.0))
        if kind == "pos":
            return args[0]
        if kind == "square":
            return _mul(args[0], args[0])
        if kind == "gelu":
            approx = n.kwargs.get("approximate", "none")
            if approx not in ("none", "tanh"):
                raise _NotPointwise(f"gelu approximate={approx!r}")
            return _call("gelu" if approx == "none" else "gelu_tanh", args[0])
        return _call(kind, args[0])

    return read(out)


def _close(p: dict, q: dict) -> bool:
    """Same monomials (atoms compared recursively), coefficients equal to a relative ``_RTOL``."""
    if len(p) != len(q):
        return False
    rest = list(q.items())
    for m, c in p.items():
        for i, (m2, c2) in enumerate(rest):
            if abs(c - c2) <= _RTOL * max(abs(c), abs(c2)) and _mono_close(m, m2):
                del rest[i]
                break
        else:
            return False
    return True


def _mono_close(m1: tuple, m2: tuple) -> bool:
    if len(m1) != len(m2):
        return False
    rest = list(m2)
    for a, k in m1:
        for i, (b, j) in enumerate(rest):
            if k == j and _atom_close(a, b):
                del rest[i]
                break
        else:
            return False
    return True


def _atom_close(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    return a[0] == "x" or a == b or _close(dict(a[1]), dict(b[1]))


def _spellings() -> dict:
    """Canonical name -> the canonical forms of its supported spellings."""
    x, half, one = _X, _const(0.5), _const(1.0)
    c = math.sqrt(2.0 / math.pi)
    relu = _call("relu", x)
    tanh_arg = _mul(_const(c), _add(x, _mul(_const(0.044715), _pow(x, 3))))
    return {
        "relu": [relu],
        "relu2": [_mul(relu, relu)],
        "gelu": [_call("gelu", x),  # and 0.5 x (1 + erf(x / sqrt 2)) (HF's GELU "python" form)
                 _mul(_mul(half, x), _add(one, _call("erf", _mul(x, _const(1 / math.sqrt(2.0))))))],
        "gelu_tanh": [_call("gelu_tanh", x),  # and 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (NewGELU, FastGELU)
                      _mul(_mul(half, x), _add(one, _call("tanh", tanh_arg)))],
        "silu": [_call("silu", x), _mul(x, _call("sigmoid", x))],
    }


_SPELLINGS = _spellings()


def identify_structure(out: Node, pre: Node) -> Tuple[Optional[str], str]:
    """(canonical name or None, why not) of the activation the region ``pre -> out`` computes."""
    try:
        form = _canonical(out, pre)
    except _NotPointwise as e:
        return None, f"not an elementwise function of the pre-activation ({e})"
    except RecursionError:
        return None, "its op graph is too deep to read"
    for name, forms in _SPELLINGS.items():
        if any(_close(form, f) for f in forms):
            return name, ""
    return None, "its op graph matches none of the supported spellings"


@dataclasses.dataclass
class Activation:
    name: Optional[str]  # canonical (a key of ops.activations.ACTIVATIONS); None: not fusable
    pre: Node  # the pre-activation (a linear's output)
    nodes: list  # the region's nodes, graph order, including views; nodes[-1] is the output
    ops: str = ""  # the region's ops, for messages
    why: str = ""  # name None: why not


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
        kwargs = {k: (env[v] if isinstance(v, Node) else v) for k, v in n.kwargs.items() if k != "inplace"}
        env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else n.target(*args, **kwargs)
    return env[nodes[-1]]


def _probe_agrees(name: str, pre: Node, nodes) -> bool:
    """The region's float64 values on sample points are the canonical activation's (a confirmation of
    the structural match, which guards this module's own reading; it never decides a match)."""
    try:
        values = _evaluate(pre, nodes, _SAMPLES)
    except Exception:  # (an op that will not run on a 1-D float64 probe: nothing to confirm with)
        return True
    return (isinstance(values, torch.Tensor) and values.shape == _SAMPLES.shape
            and torch.allclose(values.double(), ACTIVATIONS[name](_SAMPLES), rtol=1e-8, atol=1e-12, equal_nan=True))


def _op_name(n: Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def classify_activation(out: Node, order: dict) -> Optional[Activation]:
    """The activation ``out`` applies to a single pre-activation node, or None if it is not
    an elementwise function of one node. ``name`` is None for a function we cannot fuse (``why`` says why)."""
    pre, nodes = pointwise_region(out, order)
    if pre is None or all(is_row_view(n) for n in nodes):
        return None
    act = Activation(None, pre, nodes, ", ".join(_op_name(n) for n in nodes if not is_row_view(n)))
    name, act.why = identify_structure(out, pre)
    if name is not None and not _probe_agrees(name, pre, nodes):
        act.why = f"its op graph reads as {name}, but its values do not agree"
        log.warning("blast: activation (%s) reads as %s by structure but its values disagree: not fused", act.ops, name)
        name = None
    act.name = name
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
           "identify_structure", "is_mul", "example_value", "same", "same_shape"]
