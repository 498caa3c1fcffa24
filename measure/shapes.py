"""Named model shapes for `slimfx bench`: HF Llama configs with random weights (decode
speed depends on shapes, not on values). Sizes are the published configs'."""

from __future__ import annotations

import torch

from slimfx.measure.errors import UsageError

_COLUMNS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "tie_word_embeddings", "rope_theta", "max_position_embeddings")
# One row a shape, in _COLUMNS' order; every shape has rms_norm_eps 1e-5.
_ROWS = {
    #                hidden  inter  layers heads kv  head  vocab   tied   rope_theta max_positions
    "smollm2-135m": (576,   1536,  30,    9,    3,  64,   49152,  True,  100000.0,  8192),  # the default model
    "llama-3.2-1b": (2048,  8192,  16,    32,   8,  64,   128256, True,  500000.0,  131072),
    "llama-3.1-8b": (4096,  14336, 32,    32,   8,  128,  128256, False, 500000.0,  131072),
    "tiny":         (64,    128,   2,     4,    2,  16,   256,    True,  10000.0,   4096),  # tests, CPU smoke runs
}
SHAPES: dict[str, dict] = {name: dict(zip(_COLUMNS, row), rms_norm_eps=1e-5) for name, row in _ROWS.items()}


def shape_config(name: str):
    """The LlamaConfig of shape `name` (one of SHAPES)."""
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise UsageError(f"--shape {name}: unknown; allowed: {', '.join(SHAPES)}")
    return LlamaConfig(**SHAPES[name])


def build(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0):
    """A LlamaForCausalLM of shape `name` with seeded random weights, built directly on
    `device` in `dtype` (no fp32 copy of an 8B model on the host), eval mode, sdpa."""
    from transformers import LlamaForCausalLM

    config = shape_config(name)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
