"""The activations the backend fuses, with their derivatives (backward recomputes them)."""
import math

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def relu2(a):
    return torch.square(F.relu(a))


def gelu_tanh(a):
    return F.gelu(a, approximate="tanh")


ACTIVATIONS = {
    "relu": F.relu,
    "relu2": relu2,
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
}


def act_grad(name: str, a: torch.Tensor) -> torch.Tensor:
    """d act(a) / da, in a's dtype (computed in fp32 for half inputs): the formulas the Triton backward
    kernels use (codegen.ACT_GRAD_BODIES). The CPU path takes eager's own backward ops instead
    (:func:`act_backward`), which differ where ``a`` is not finite."""
    af = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    if name == "relu":
        g = (af > 0).float()
    elif name == "relu2":
        g = 2 * F.relu(af)
    elif name == "silu":
        s = torch.sigmoid(af)
        g = s * (1 + af * (1 - s))
    elif name == "gelu":
        g = 0.5 * (1 + torch.erf(af / math.sqrt(2))) + af * torch.exp(-0.5 * af * af) / math.sqrt(2 * math.pi)
    elif name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (af + 0.044715 * af ** 3)
        t = torch.tanh(inner)
        g = 0.5 * (1 + t) + 0.5 * af * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * af * af)
    else:
        raise ValueError(f"unknown activation {name!r}")
    return g.to(a.dtype)


def act_backward(name: str, dh: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``dL/da`` from ``dL/dh`` for ``h = act(a)`` with the ops eager's autograd runs for ``ACTIVATIONS[name]``,
    so that it agrees everywhere, NaN and Inf included: ReLU's backward is a ``where`` (eager passes the
    gradient through at a NaN pre-activation, and gives 0, not ``inf * 0``, where ``a <= 0``)."""
    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward(dh, F.relu(a), 0)
    if name == "relu2":  # square(relu(a)): pow's backward, then relu's
        r = F.relu(a)
        return aten.threshold_backward(dh * (2 * r), r, 0)
    if name == "silu":
        return aten.silu_backward(dh, a)
    if name == "gelu":
        return aten.gelu_backward(dh, a)
    if name == "gelu_tanh":
        return aten.gelu_backward(dh, a, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def hidden_grads(dh, a, u, activation: str):
    """``(dL/da, dL/du)`` from ``dL/dh`` for ``h = act(a) [* u]`` (``du`` is None when not gated), as eager
    computes them (the product's backward, then the activation's)."""
    if u is None:
        return act_backward(activation, dh, a), None
    return act_backward(activation, dh * u, a), dh * ACTIVATIONS[activation](a)


def in_dtype(dtype, *ts):
    """``ts`` with every tensor in ``dtype`` (copies only where it differs; None entries and a None
    dtype pass through): what ``F.linear`` does to its inputs under autocast."""
    if dtype is None:
        return ts
    return tuple(t if (t is None or t.dtype == dtype) else t.to(dtype) for t in ts)


def dense_mlp(x, w1, b1, w3, b3, w2, b2, activation: str):
    """Eager meaning of the fused node: ``down(act(gate(x)) [* up(x)])``."""
    h = ACTIVATIONS[activation](F.linear(x, w1, b1))
    if w3 is not None:
        h = h * F.linear(x, w3, b3)
    return F.linear(h, w2, b2)
