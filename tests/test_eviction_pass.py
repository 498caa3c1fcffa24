"""The kv_eviction pass through slimfx.runtime.generate: exact with a budget covering
everything, real memory saved with a small one, nothing recompiled."""

import pytest
import torch

import slimfx
from slimfx.compiler.config import ConfigError
from slimfx.runtime import generate
from slimfx.runtime.eviction import POLICIES
from slimfx.runtime.models import tiny_model


def _config(**options):
    return {"pipelines": {"evict": ["kv_eviction"]}, "compile": {"pipeline": "evict"}, "passes": {"kv_eviction": options}}


@pytest.fixture(scope="module")
def sharp_model():
    # Scaled weights make attention peaked, so which tokens are kept changes the output.
    model = tiny_model("llama_gqa", layers=2, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(sharp_model, prompt):
    tokens, stats = generate(sharp_model, prompt, max_new_tokens=16, capacity=64)
    return tokens, stats


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_budget_at_least_total_length_is_token_identical(sharp_model, prompt, reference, policy):
    tokens, _ = generate(sharp_model, prompt, max_new_tokens=16, capacity=64,
                         config=_config(policy=policy, budget=64, n_sink=2, window=8))
    assert torch.equal(tokens, reference[0])


def test_small_budget_saves_memory_and_is_reported(sharp_model, prompt, reference):
    slimfx.clear_reports()
    tokens, stats = generate(sharp_model, prompt, max_new_tokens=16, capacity=64,
                             config=_config(policy="h2o", budget=16, n_sink=2, window=4))
    assert stats["kv_bytes"] < reference[1]["kv_bytes"] * 16 / 64 + 1024  # buffers really shrank
    results = [r for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction"]
    assert results and all(r.applied and r.nodes_rewritten == 2 for r in results)
    assert results[0].bytes_saved > 0
    assert not torch.equal(tokens, reference[0])  # 16 of 56 tokens kept: the output changes


def test_per_layer_budget_override(sharp_model, prompt):
    slimfx.clear_reports()
    cfg = _config(policy="tova", budget=16, n_sink=2, window=4)
    cfg["passes"]["kv_eviction"]["layers"] = {"1": {"budget": 32}}
    generate(sharp_model, prompt, max_new_tokens=4, capacity=64, config=cfg)
    details = next(r.details for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" and r.applied)
    assert details["budgets"] == {0: 16, 1: 32}


def test_budget_below_policy_minimum_is_a_config_error(sharp_model, prompt):
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(policy="h2o", budget=8, n_sink=4, window=8))
    inner = err.value.inner_exception
    assert isinstance(inner, ConfigError)
    assert str(inner) == "passes.kv_eviction.budget (layer 0): got 8; allowed: >= 13 for policy 'h2o' (n_sink 4 + window 8 + 1 slot to choose)"


def test_kv_eviction_without_runtime_is_skipped():
    """Through plain torch.compile (no runtime store) the pass leaves the graph alone and says why."""
    model = tiny_model("llama_gqa")
    ids = torch.randint(0, 128, (1, 6))
    slimfx.clear_reports()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="slimfx", options={"config": _config(policy="h2o", budget=64)})(ids).logits
    assert torch.equal(out, ref)
    result = slimfx.last_report().passes[0]
    assert result.name == "kv_eviction" and not result.applied and "kv_runtime" in result.notes[0]
