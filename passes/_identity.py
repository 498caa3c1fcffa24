"""Which model a calibrated artifact was made for (not a pass: not listed in PASS_MODULES).

Plans (layer skipping, KV sharing) record the model's identity and are refused for
another: the blocks of the unmodified model, hidden size, vocabulary and a fingerprint of
the token embedding."""

from __future__ import annotations

import hashlib

import torch
import torch.fx

from slimfx.compiler.anatomy import Anatomy, param_path
from slimfx.compiler.config import ConfigError
from slimfx.passes._graph import graph_input_value

IDENTITY_FIELDS = {"blocks": int, "hidden": int, "vocab": int, "fingerprint": str}


def weight_fingerprint(weight: torch.Tensor) -> str:
    """12 hex digits identifying a weight matrix: a hash of 4096 evenly strided entries
    rounded to bfloat16, so the model loaded in float32 or bfloat16 hashes alike."""
    flat = weight.detach().flatten()
    sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.bfloat16)
    return hashlib.sha256(sample.view(torch.int16).numpy().tobytes()).hexdigest()[:12]


def _identity(anatomy: Anatomy, embedding) -> dict:
    return {"blocks": anatomy.model_blocks, "hidden": anatomy.hidden_size, "vocab": anatomy.vocab_size,
            "fingerprint": weight_fingerprint(embedding) if isinstance(embedding, torch.Tensor) else None}


def model_identity(gm: torch.fx.GraphModule, anatomy: Anatomy, example_inputs) -> dict:
    """{blocks, hidden, vocab, fingerprint} of the model behind a graph: blocks of the
    unmodified model, fingerprint of its token embedding (None when the graph does not
    read the embedding as a parameter)."""
    weight = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr") and anatomy.embedding and param_path(node) == anatomy.embedding:
            weight = graph_input_value(gm, node, example_inputs)
            break
    return _identity(anatomy, weight)


def identity_of_model(model: torch.nn.Module, anatomy: Anatomy) -> dict:
    """model_identity for a model whose graph was captured without its inputs (inspect)."""
    weight = model.get_parameter(anatomy.embedding) if anatomy.embedding else None
    return _identity(anatomy, weight)


def describe_model(identity: dict) -> str:
    return (f"{identity['blocks']} blocks, hidden {identity['hidden']}, vocab {identity['vocab']}, "
            f"weights {identity['fingerprint'] or '?'}")


def check_plan_model(plan: dict, identity: dict, where: str, written_by: str = "slimfx calibrate skip") -> None:
    """ConfigError (one line) unless `plan` was made for the model `identity` describes."""
    if any(plan["model"][k] != identity[k] for k in IDENTITY_FIELDS):
        raise ConfigError(f"{where}: the plan was made for another model ({describe_model(plan['model'])}); this model has "
                          f"{describe_model(identity)}; allowed: a plan from `{written_by}` for this model")
