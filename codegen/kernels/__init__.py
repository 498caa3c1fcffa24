"""Kernels, each a triplet (DESIGN.md decision 5): `_name_kernel` (@triton.jit), the host
wrapper `name()`, and `name_ref()` in plain PyTorch beside it, the definition."""

from __future__ import annotations

import os

import torch

ATTENTION_ENV = "SLIMFX_ATTENTION"
_ATTENTION_CHOICES = ("auto", "ref", "triton")


def use_attention_kernels(q) -> bool:
    """True when the attention ops run the Triton kernels for `q`, False for the references:
    kernels on CUDA tensors, references elsewhere, unless SLIMFX_ATTENTION=ref|triton|auto
    says otherwise (triton on CPU needs TRITON_INTERPRET=1 set before the kernels are imported)."""
    mode = os.environ.get(ATTENTION_ENV, "auto")
    if mode not in _ATTENTION_CHOICES:
        raise ValueError(f"{ATTENTION_ENV}={mode!r}; allowed: {', '.join(_ATTENTION_CHOICES)}")
    if mode == "auto":
        return q.is_cuda
    return mode == "triton"


def dot_precision(x: torch.Tensor) -> str:
    """`input_precision` of the kernels' tl.dot for operands of x's dtype: fp32 operands get
    "ieee" unless torch allows TF32 for CUDA matmuls (as cuBLAS and SDPA then use it), so an
    fp32 model reads attention and products at the precision of its unmodified forward.
    (Triton's default, "tf32", moved a tiny fp32 model's logits by up to 0.036 from HF's on
    an H100.) 16-bit operands: "tf32", which only ever affects fp32 operands."""
    if x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"
