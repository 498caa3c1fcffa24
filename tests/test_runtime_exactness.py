"""The runtime never answers wrongly: sliding-window layers read exactly their window
(a ring sized to it), hand-written attention is bound like SDPA, a mask that disagrees
with the config is refused by name, and what it runs is token-identical to the
unmodified model. (The architecture matrix is in
test_families.py.)"""

from __future__ import annotations

import importlib

import pytest
import torch

from slimfx.compiler.errors import UsageError
from slimfx.runtime.exactness import sliding_window_layers
from slimfx.runtime.generate import generate
from tests.test_runtime_generate import DEVICE, hf_greedy, lively_tiny


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
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    tokens, stats = generate(model, ids, max_new_tokens=12, prefill_chunk=16)
    assert torch.equal(tokens, hf_greedy(model, ids, torch.ones_like(ids), 12))
    per_slot = 2 * (2 * 16 * 4 + 4)  # kv heads x (K and V fp32 + int32 position)
    assert stats["kv_bytes"] == 2 * 8 * per_slot  # two layers, 8 slots each, whatever the length


def test_eviction_leaves_sliding_layers_to_their_window():
    import slimfx

    model = _sliding_mistral(8)
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    slimfx.clear_reports()
    cfg = {"pipelines": {"e": ["kv_eviction"]}, "compile": {"pipeline": "e"},
           "passes": {"kv_eviction": {"policy": "h2o", "budget": 6, "n_sink": 1, "window": 2}}}
    tokens, _ = generate(model, ids, max_new_tokens=6, prefill_chunk=16, config=cfg)
    assert torch.equal(tokens, hf_greedy(model, ids, torch.ones_like(ids), 6))
    notes = [n for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" for n in r.notes]
    assert any("a sliding-window layer; its ring of 8 slots already bounds it" in n for n in notes)


def test_request_within_the_window_runs_exactly():
    model = _sliding_mistral(32)
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    tokens, _ = generate(model, ids, max_new_tokens=8)
    assert torch.equal(tokens, hf_greedy(model, ids, torch.ones_like(ids), 8))


def test_hand_written_attention_runs_exactly():
    """HF "eager" attention (matmul -> softmax -> matmul) is bound like SDPA: the scale is
    read off the scores, the mask dropped for the store's causal read."""
    model = lively_tiny("llama_gqa")
    model.config._attn_implementation = "eager"
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    tokens, _ = generate(model, ids, max_new_tokens=6)
    assert torch.equal(tokens, hf_greedy(model, ids, torch.ones_like(ids), 6))


def test_a_mask_window_the_config_does_not_name_is_refused(monkeypatch):
    """The store sizes and masks sliding sites by the config: where the model's own mask keeps
    another window, the runtime would read other positions, so it refuses. The refusal reaches
    the caller as itself, not wrapped in dynamo's BackendCompilerFailed."""
    gen_module = importlib.import_module("slimfx.runtime.generate")  # the module (the package exports the function)
    model = _sliding_mistral(8)
    monkeypatch.setattr(gen_module, "site_windows", lambda m: {})
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with pytest.raises(UsageError, match=r"cannot run this model exactly: it bound 0 of 2 attention sites \(sites 0,1: the model's "
                                         r"mask keeps a sliding window of 8 positions but its config names none"):
        generate(model, ids, max_new_tokens=2, prefill_chunk=32)
