"""What the code generator knows about ATen ops: which fuse, how each becomes Triton.

Every fusable op is a row of a table mapping the ATen overload to a function that
builds a Triton expression (a string) from its operands' expressions. Anything not
in these tables runs as an ATen call in the generated wrapper, so an unknown op
costs speed, never correctness.

Value model inside a kernel: floating values are computed in fp32 (fp64 stays fp64),
integers and bools keep their dtype. An explicit cast (convert_element_type /
_to_copy) rounds here; kernel_source._round_like_eager rounds every other
half-precision result to its dtype, as eager does after each op. Matmul epilogues
(matmul_gen.py) are built from these same tables.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

aten = torch.ops.aten
prims = torch.ops.prims

TRITON_DTYPE = {
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
    torch.int8: "tl.int8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value of `dtype` is held in inside a kernel."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def tl_dtype(dtype: torch.dtype) -> str:
    return TRITON_DTYPE[dtype]


def scalar_literal(value) -> str:
    """A Python scalar as a Triton expression (inf/nan have no literal)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if math.isnan(value):
            return "float('nan')"
        if math.isinf(value):
            return "float('inf')" if value > 0 else "float('-inf')"
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    raise TypeError(f"not a scalar: {value!r}")


class Lit(str):
    """A Python-scalar literal operand: Triton promotes it, it has no .to()."""


class Val(str):
    """A kernel variable whose (compute) dtype is known, so no cast to it is emitted."""

    def __new__(cls, name: str, dtype: torch.dtype):
        obj = super().__new__(cls, name)
        obj.dtype = compute_dtype(dtype)
        return obj


def _cast(expr: str, dtype: torch.dtype) -> str:
    if isinstance(expr, Lit):
        return expr
    if isinstance(expr, Val) and expr.dtype == compute_dtype(dtype):
        return expr
    return f"({expr}).to({tl_dtype(compute_dtype(dtype))})"


def _binary(fmt: str) -> Callable:
    def build(out_dtype, a, b, **kwargs):
        alpha = kwargs.get("alpha", 1)
        if alpha != 1:
            b = f"({b} * {scalar_literal(alpha)})"
        return _cast(fmt.format(a=_cast(a, out_dtype), b=_cast(b, out_dtype)), out_dtype)

    return build


def _unary(fmt: str) -> Callable:
    def build(out_dtype, a):
        return _cast(fmt.format(a=_cast(a, out_dtype)), out_dtype)

    return build


def _compare(op: str) -> Callable:
    # Operands are compared in fp32 (or their own dtype); the result is a bool.
    def build(out_dtype, a, b):
        return f"(({a}) {op} ({b}))"

    return build


def _pow_scalar(out_dtype, a, exponent):
    a = _cast(a, out_dtype)
    if exponent == 2:
        return f"({a} * {a})"
    if exponent == 3:
        return f"({a} * {a} * {a})"
    if exponent == 1:
        return a
    if exponent == 0.5:
        return f"tl.sqrt({a})"
    if exponent == -1:
        return f"(1.0 / {a})"
    if exponent == -0.5:
        return f"tl.rsqrt({a})"
    raise Unsupported(f"pow exponent {exponent!r}")


def _where(out_dtype, cond, a, b):
    return _cast(f"tl.where({cond}, {_cast(a, out_dtype)}, {_cast(b, out_dtype)})", out_dtype)


def _convert(out_dtype, a, *rest, **kwargs):
    # An explicit cast to half precision rounds here, as in eager.
    if out_dtype in (torch.float16, torch.bfloat16):
        return f"({a}).to({tl_dtype(out_dtype)}).to(tl.float32)"
    return _cast(a, out_dtype)


class Unsupported(Exception):
    """This node cannot be fused; it runs as an ATen call."""


# overload -> builder(out_dtype, *operand_exprs, **scalar_kwargs) -> expr
POINTWISE: dict = {
    aten.add.Tensor: _binary("({a} + {b})"),
    aten.sub.Tensor: _binary("({a} - {b})"),
    aten.mul.Tensor: _binary("({a} * {b})"),
    aten.div.Tensor: _binary("({a} / {b})"),
    aten.maximum.default: _binary("tl.maximum({a}, {b})"),
    aten.minimum.default: _binary("tl.minimum({a}, {b})"),
    aten.neg.default: _unary("(-{a})"),
    aten.exp.default: _unary("tl.exp({a})"),
    aten.log.default: _unary("tl.log({a})"),
    aten.sqrt.default: _unary("tl.sqrt({a})"),
    aten.rsqrt.default: _unary("tl.rsqrt({a})"),
    aten.sin.default: _unary("tl.sin({a})"),
    aten.cos.default: _unary("tl.cos({a})"),
    aten.abs.default: _unary("tl.abs({a})"),
    aten.erf.default: _unary("tl.erf({a})"),
    aten.reciprocal.default: _unary("(1.0 / {a})"),
    aten.sigmoid.default: _unary("(1.0 / (1.0 + tl.exp(-{a})))"),
    aten.tanh.default: _unary("(2.0 / (1.0 + tl.exp(-2.0 * {a})) - 1.0)"),
    aten.relu.default: _unary("tl.maximum({a}, 0.0)"),
    aten.silu.default: _unary("({a} / (1.0 + tl.exp(-{a})))"),
    aten.clone.default: lambda out_dtype, a, **kw: a,
    aten.pow.Tensor_Scalar: _pow_scalar,
    aten.where.self: _where,
    aten.gt.Tensor: _compare(">"),
    aten.gt.Scalar: _compare(">"),
    aten.lt.Tensor: _compare("<"),
    aten.lt.Scalar: _compare("<"),
    aten.ge.Tensor: _compare(">="),
    aten.ge.Scalar: _compare(">="),
    aten.le.Tensor: _compare("<="),
    aten.le.Scalar: _compare("<="),
    aten.eq.Tensor: _compare("=="),
    aten.eq.Scalar: _compare("=="),
    aten.ne.Tensor: _compare("!="),
    aten.ne.Scalar: _compare("!="),
    prims.convert_element_type.default: _convert,
    aten._to_copy.default: _convert,
}

# Row reductions over the last dimension: overload -> (combine fn, identity).
# tl.reduce with the standard library's combine functions, not tl.sum/tl.max: those
# are @jit functions decorated when triton was imported, so under an interpreter
# switched on later they cannot be called; tl.reduce is patched by the interpreter
# and recognises these combine functions (numpy fast path). Same code on a GPU.
REDUCTIONS: dict = {
    aten.sum.dim_IntList: ("tl.standard._sum_combine", "0.0"),
    aten.mean.dim: ("tl.standard._sum_combine", "0.0"),
    aten.amax.default: ("tl.standard._elementwise_max", "float('-inf')"),
    aten.amin.default: ("tl.standard._elementwise_min", "float('inf')"),
}

# Ops lowered into the functional graph before partitioning, so their pieces fuse.
DECOMPOSE = [
    aten._softmax,
    aten._log_softmax,
    aten.silu,
    aten.gelu,
    aten.rsub,
    aten.linear,
    # Not aten.addmm: its decomposition upcasts half-precision operands to fp32
    # (pw_cast_for_opmath), i.e. copies every weight to fp32 on every call and runs an
    # fp32 mm. addmm stays whole: a matmul group runs it with the bias in its epilogue.
    aten.rms_norm,
]


def is_mutating(node: torch.fx.Node) -> bool:
    """True if the op writes one of its inputs (KV-cache updates, in-place ops)."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    return bool(schema.is_mutable)
