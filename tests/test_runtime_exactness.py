"""The runtime never answers wrongly: what its KV store cannot reproduce (sliding-window
layers past their window, attention it cannot bind) is refused by name, what it can
is token-identical to the unmodified model."""

from __future__ import annotations

import pytest
import torch

from slimfx.compiler.errors import UsageError
from slimfx.runtime.exactness import sliding_window_layers
from slimfx.runtime.generate import generate
from slimfx.runtime.models import tiny_model
from tests.test_runtime_generate import hf_greedy, lively_tiny


def _sliding_mistral(window: int):
    model = lively_tiny("mistral")
    model.config.sliding_window = window
    return model


def test_sliding_window_layers_read_from_the_config():
    model = _sliding_mistral(8)
    assert sliding_window_layers(model.config) == (8, [0, 1])
    model.config.sliding_window = None
    assert sliding_window_layers(model.config) == (None, [])


def test_request_past_the_window_is_refused_by_name():
    model = _sliding_mistral(8)
    ids = torch.randint(1, 128, (1, 6))
    with pytest.raises(UsageError, match=r"layers 0, 1 use sliding-window attention \(window 8\).*spans 10 tokens.*allowed: prompt \+ new tokens <= 8"):
        generate(model, ids, max_new_tokens=4)


def test_request_within_the_window_runs_exactly():
    model = _sliding_mistral(32)
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    tokens, _ = generate(model, ids, max_new_tokens=8)
    assert torch.equal(tokens, hf_greedy(model, ids, torch.ones_like(ids), 8))


def test_attention_the_store_cannot_bind_is_refused():
    """Eager matmul-softmax attention is not bound by the store: running it without a
    cache would attend to each step's own token only. The refusal reaches the caller as
    itself, not wrapped in dynamo's BackendCompilerFailed."""
    model = tiny_model("llama_gqa", attn_implementation="eager")
    with pytest.raises(UsageError, match=r"cannot run this model exactly: it bound 0 of 2 attention sites \(sites 0,1: not an SDPA call"):
        generate(model, torch.randint(1, 128, (1, 5)), max_new_tokens=2)
