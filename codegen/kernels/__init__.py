"""Kernels, each a triplet (DESIGN.md decision 5): `_name_kernel` (@triton.jit), the host
wrapper `name()`, and `name_ref()` in plain PyTorch beside it, the definition."""

from __future__ import annotations

import os

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
