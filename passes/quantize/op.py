"""The ops a quantized graph calls (DESIGN.md decision 4), one per weight format:

    torch.ops.slimfx.qlinear_int8(x, qweight, scale, bias)                      int8 [N, K], scale f32 [N]
    torch.ops.slimfx.qlinear_fp8(x, qweight, scale, bias)                       float8_e4m3fn [N, K], scale f32 [N]
    torch.ops.slimfx.qlinear_int4(x, qweight, scale, offset, group_size, bias)  uint8 [N, K/2], f16 [N, K/G] x2

x [..., K] -> [..., N] in x's dtype; layouts in passes/quantize/formats.py. On CUDA the
Triton kernels run (codegen/kernels/gemv_int8.py, gemv_int4.py); elsewhere the
references (dequantize + matmul). SLIMFX_QLINEAR=ref|triton|auto overrides (triton
on CPU needs TRITON_INTERPRET=1 set before the kernels are imported).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from slimfx.runtime.custom_ops import custom_op

_IMPL_ENV = "SLIMFX_QLINEAR"
_IMPLS = ("auto", "ref", "triton")


def _use_triton(x: torch.Tensor) -> bool:
    mode = os.environ.get(_IMPL_ENV, "auto")
    if mode not in _IMPLS:
        raise ValueError(f"{_IMPL_ENV}={mode!r}; allowed: {', '.join(_IMPLS)}")
    return x.is_cuda if mode == "auto" else mode == "triton"


def _out_like(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _per_channel_op(kind: str):
    """slimfx::qlinear_<kind>: x [..., K] @ (qweight [N, K] * scale[:, None]).T + bias. One
    kernel serves int8 and fp8 weights: it only converts the weight tile to float, which
    GPUs do for fp8 e4m3 in hardware (sm_89+; checked when the pass picks fp8)."""

    @custom_op(f"slimfx::qlinear_{kind}", mutates_args=())
    def qlinear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        from slimfx.codegen.kernels.gemv_int8 import gemv_int8, gemv_int8_ref

        return (gemv_int8 if _use_triton(x) else gemv_int8_ref)(x, qweight, scale, bias)

    @qlinear.register_fake
    def _fake(x, qweight, scale, bias):
        return _out_like(x, qweight.shape[0])

    return qlinear


qlinear_int8 = _per_channel_op("int8")
qlinear_fp8 = _per_channel_op("fp8")


@custom_op("slimfx::qlinear_int4", mutates_args=())
def qlinear_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., K] @ W_hat.T + bias with W_hat the packed int4 group-wise weight."""
    from slimfx.codegen.kernels.gemv_int4 import gemv_int4, gemv_int4_ref

    return (gemv_int4 if _use_triton(x) else gemv_int4_ref)(x, qweight, scale, offset, group_size, bias)


@qlinear_int4.register_fake
def _qlinear_int4_fake(x, qweight, scale, offset, group_size, bias):
    return _out_like(x, qweight.shape[0])


def op_for(kind: str):
    """The op overload the quantize pass emits for a format kind."""
    return {
        "int8": torch.ops.slimfx.qlinear_int8.default,
        "fp8": torch.ops.slimfx.qlinear_fp8.default,
        "int4": torch.ops.slimfx.qlinear_int4.default,
    }[kind]
