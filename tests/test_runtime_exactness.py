"""The runtime never answers wrongly: sliding-window layers read exactly their window
(a ring sized to it), attention the store cannot bind is refused by name, and what it
runs is token-identical to the unmodified model. (The architecture matrix is in
test_families.py.)"""

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


def test_request_past_the_window_runs_exactly_on_a_ring_of_the_window():
    model = _sliding_mistral(8)
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    tokens, stats = generate(model, ids, max_new_tokens=12, prefill_chunk=16)
    assert torch.equal(tokens, hf_greedy(model, ids, torch.ones_like(ids), 12))
    per_slot = 2 * (2 * 16 * 4 + 4)  # kv heads x (K and V fp32 + int32 position)
    assert stats["kv_bytes"] == 2 * 8 * per_slot  # two layers, 8 slots each, whatever the length


def test_eviction_leaves_sliding_layers_to_their_window():
    import slimfx

    model = _sliding_mistral(8)
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    slimfx.clear_reports()
    cfg = {"pipelines": {"e": ["kv_eviction"]}, "compile": {"pipeline": "e"},
           "passes": {"kv_eviction": {"policy": "h2o", "budget": 6, "n_sink": 1, "window": 2}}}
    tokens, _ = generate(model, ids, max_new_tokens=6, prefill_chunk=16, config=cfg)
    assert torch.equal(tokens, hf_greedy(model, ids, torch.ones_like(ids), 6))
    notes = [n for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" for n in r.notes]
    assert any("a sliding-window layer; its ring of 8 slots already bounds it" in n for n in notes)


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
