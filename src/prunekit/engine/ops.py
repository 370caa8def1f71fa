"""The vocabulary of functional ops the walker understands, and how to read an fx node's arguments.

Torch functions, Tensor methods and the aten ops of ``torch.export`` graphs reach the walker under many
spellings (``add``/``add_``/``aten.add.Tensor``); :func:`op_name` maps a node to one canonical name, and the
sets below classify names by how they move channels: element-wise (positively homogeneous or not),
binary, reshape, permute, reduce, pool/upsample, softmax, and ops that return no tensor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

#: element-wise ops that commute with positive per-channel scaling (a merge may pass them)
PH_UNARY = {
    "relu", "leaky_relu", "contiguous", "clone", "detach", "to", "float", "double", "half", "bfloat16",
    "type", "type_as", "cpu", "cuda", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "identity", "alias", "lift_fresh_copy", "_to_copy", "positive",
    "requires_grad", "abs",
}
NONPH_UNARY = {
    "sigmoid", "tanh", "silu", "gelu", "hardswish", "hardsigmoid", "relu6", "hardtanh", "elu", "selu",
    "celu", "softplus", "mish", "softsign", "tanhshrink", "logsigmoid", "log_sigmoid", "exp", "log",
    "sqrt", "rsqrt", "square", "pow", "sin", "cos", "erf", "clamp", "clamp_min", "clamp_max", "clip",
    "sign", "floor", "ceil", "round", "reciprocal", "log1p", "expm1", "neg", "threshold", "hardshrink",
    "softshrink", "rrelu", "nan_to_num", "prelu_scalar", "silu_", "masked_fill",
}
BINARY = {"add", "sub", "rsub", "mul", "div", "truediv", "true_divide", "maximum", "minimum", "fmax",
           "fmin", "where", "addcmul", "addcdiv", "lerp", "iadd", "isub", "imul", "itruediv", "radd",
           "rmul", "floordiv"}
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
            "_unsafe_view", "ravel"}
PERMUTE = {"permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "numpy_T", "mT"}
REDUCE_PH = {"mean", "sum", "amax", "amin", "max", "min", "nanmean", "nansum"}
REDUCE = REDUCE_PH | {"std", "var", "norm", "logsumexp", "prod", "median", "var_mean", "std_mean"}
POOL = {f"{p}{k}d" for k in (1, 2, 3) for p in (
    "max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool", "_adaptive_avg_pool",
    "fractional_max_pool")} | {f"max_pool{k}d_with_indices" for k in (1, 2, 3)}
UPSAMPLE = {"interpolate", "upsample", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
             "upsample_bilinear2d", "upsample_linear1d", "upsample_trilinear3d", "upsample_bicubic2d",
             "_upsample_nearest_exact2d"}
SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax", "softmin"}
NONTENSOR = {"size", "dim", "numel", "getattr", "sym_size", "sym_numel", "sym_stride", "stride",
              "_assert", "_assert_async", "_assert_tensor_metadata", "_assert_scalar", "is_contiguous",
              "item", "tolist", "eq", "ne", "lt", "le", "gt", "ge", "floordiv", "mod", "_set_grad_enabled"}


def op_name(node: fx.Node) -> str:
    """Canonical op name of a call node (in-place ``_`` suffix and aliases folded)."""
    t = node.target
    if node.op == "call_method":
        name = t
    elif isinstance(t, torch._ops.OpOverload):
        name = t.overloadpacket.__name__
    elif isinstance(t, torch._ops.OpOverloadPacket):
        name = t.__name__
    else:
        name = getattr(t, "__name__", str(t))
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return {"concat": "cat", "concatenate": "cat", "absolute": "abs", "multiply": "mul", "subtract": "sub",
            "divide": "div", "narrow_copy": "narrow"}.get(name, name)


def node_arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    """Argument ``i`` of ``node``, given positionally or as keyword ``key``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def is_shape(s: Any) -> bool:
    """Whether a recorded shape-tree entry is the shape of one tensor."""
    return isinstance(s, torch.Size)
