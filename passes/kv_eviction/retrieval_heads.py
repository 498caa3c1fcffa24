"""The DuoAttention retrieval-head artifact: its format, writer and reader, and the head choice.

A safetensors file (written by `slimfx calibrate duo-heads`, calibrate/duo_heads.py)
holding `retrieval_score` [n_layers, n_kv_heads] float32 and JSON metadata. The
`kv_eviction` pass with policy "duo" reads it (`load`) and keeps the top
`retrieval_fraction` of all kv heads whole (`select_retrieval`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimfx.compiler.config import ConfigError

ARTIFACT_TENSOR = "retrieval_score"


def save(scores: torch.Tensor, path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({ARTIFACT_TENSOR: scores.contiguous().float()}, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})
    return path


def load(path, key: str, n_layers: int | None = None, n_kv_heads: int | None = None) -> torch.Tensor:
    """The artifact's scores, checked against the model's [n_layers, n_kv_heads] (when given)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"artifacts.{key}: {path} does not exist; allowed: a file written by `slimfx calibrate duo-heads`")
    try:
        with safe_open(str(path), framework="pt") as f:
            scores = f.get_tensor(ARTIFACT_TENSOR)
    except Exception as exc:  # not safetensors, or no such tensor
        raise ConfigError(f"artifacts.{key}: {path} is not a duo-heads artifact ({type(exc).__name__}: {exc})") from None
    shape = " x ".join(str(s) for s in scores.shape)
    if scores.dim() != 2:
        raise ConfigError(f"artifacts.{key}: {path} scores are {shape or 'a scalar'}; allowed: [layers, kv heads] "
                          "(a file written by `slimfx calibrate duo-heads`)")
    if n_layers is not None and tuple(scores.shape) != (n_layers, n_kv_heads):
        raise ConfigError(f"artifacts.{key}: {path} scores {shape} heads; this model has "
                          f"{n_layers} layers x {n_kv_heads} kv heads (calibrate on this model)")
    if not torch.isfinite(scores).all():  # NaN would rank heads arbitrarily, without a word
        raise ConfigError(f"artifacts.{key}: {path} holds NaN or inf scores; allowed: finite scores "
                          "(a file written by `slimfx calibrate duo-heads`)")
    return scores


def select_retrieval(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool [n_layers, n_kv_heads]: the top `fraction` of all heads by score (at least one
    when fraction > 0; ties broken by lower layer, then lower head, deterministically)."""
    n = scores.numel()
    count = min(n, max(1 if fraction > 0 else 0, round(fraction * n)))
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:count]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)
