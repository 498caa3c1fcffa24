"""Named model shapes for `slimfx bench`: HF Llama configs with random weights (decode
speed depends on shapes, not on values). Sizes are the published configs'."""

from __future__ import annotations

import torch

from slimfx.measure.errors import UsageError

SHAPES: dict[str, dict] = {
    # SmolLM2-135M(-Instruct): the default model.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5),
    # A toy shape for tests and CPU smoke runs.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True,
                 rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


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
