"""The kv_eviction pass through slimfx.runtime.generate: exact with a budget covering
everything, real memory saved with a small one, nothing recompiled."""

import pytest
import torch

import slimfx
from slimfx.compiler.config import ConfigError
from slimfx.passes.kv_eviction.policies import POLICIES
from slimfx.runtime import generate
from slimfx.runtime.models import tiny_model


def _config(**options):
    return {"pipelines": {"evict": ["kv_eviction"]}, "compile": {"pipeline": "evict"}, "passes": {"kv_eviction": options}}


@pytest.fixture(scope="module")
def reference(sharp_model, prompt):
    tokens, stats = generate(sharp_model, prompt, max_new_tokens=16, capacity=64)
    return tokens, stats


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"duo", "d2o"}))  # they need an artifact: below, test_eviction_d2o.py
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
    """The error found while compiling reaches the caller as itself (not wrapped by dynamo)."""
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(policy="h2o", budget=8, n_sink=4, window=8))
    assert str(err.value) == "passes.kv_eviction.budget (layer 0): got 8; allowed: >= 13 for policy 'h2o' (n_sink 4 + window 8 + 1 slot to choose)"


def test_h2o_mean_mass_reaches_the_site_and_ranks_differently(sharp_model, prompt):
    """`mass = "mean"` is H2O's per-query normalisation: the sites' layout carries it, and
    on a budget below the prompt it keeps other tokens than the paper's sum does."""
    from slimfx.runtime.generate import get_generator

    kept = {}
    for mass in ("sum", "mean"):
        cfg = _config(policy="h2o", budget=16, n_sink=0, window=4, mass=mass)
        generate(sharp_model, prompt, max_new_tokens=4, capacity=64, config=cfg)
        store = get_generator(sharp_model, 2, 64, config=cfg, codegen="auto").store
        assert all(c.layout.split("/")[4] == ("1.0" if mass == "mean" else "0.0") for c in store.sites.values())
        kept[mass] = [sorted(c.slot_pos[0, h][c.slot_pos[0, h] >= 0].tolist()) for c in store.sites.values()
                      for h in range(c.slot_pos.shape[1])]
    assert kept["sum"] != kept["mean"]


def test_mean_mass_with_another_policy_is_a_config_error(sharp_model, prompt):
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(policy="a2sf", budget=16, mass="mean"))
    assert str(err.value).startswith("passes.kv_eviction.mass (layer 0): got 'mean' with policy 'a2sf'; allowed: 'sum'")


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


# ----------------------------------------------------------------------------- SCOPE


def test_scope_with_room_for_everything_is_token_identical(sharp_model, prompt, reference):
    # 40 prompt tokens fit in `budget`, 16 generated ones in `decode_budget`.
    tokens, _ = generate(sharp_model, prompt, max_new_tokens=16, capacity=64,
                         config=_config(policy="h2o", budget=40, decode_budget=24, n_sink=2, window=8))
    assert torch.equal(tokens, reference[0])


def test_scope_freezes_the_prompt_selection_and_slides_generated_tokens(sharp_model, prompt):
    from slimfx.runtime.generate import get_generator

    cfg = _config(policy="h2o", budget=16, decode_budget=10, n_sink=2, window=4)
    generate(sharp_model, prompt, max_new_tokens=20, capacity=64, config=cfg)
    store = get_generator(sharp_model, 2, 64, config=cfg, codegen="auto").store
    for cache in store.sites.values():
        assert cache.capacity == 26
        prompt_part, decode_part = cache.slot_pos[..., :16], cache.slot_pos[..., 16:]
        assert ((prompt_part >= 0) & (prompt_part < 40)).all()  # 16 prompt tokens, chosen at prefill
        # 20 tokens generated (positions 40..59; the last is sampled, not fed): 10 slots hold the
        # 4 most recent (window) and 6 others, all generated ones.
        assert ((decode_part >= 40) & (decode_part < 59)).all()
        assert torch.isin(torch.arange(55, 59), decode_part[0, 0].long()).all()


def test_scope_decode_budget_must_exceed_the_window(sharp_model, prompt):
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64,
                 config=_config(policy="h2o", budget=16, decode_budget=4, n_sink=2, window=4))
    assert str(err.value).startswith("passes.kv_eviction.decode_budget (layer 0): got 4; allowed: 0 (off) or > window (4)")


# ----------------------------------------------------------------------------- DuoAttention


def _duo_config(tmp_path, scores, **options):
    from slimfx.passes.kv_eviction import retrieval_heads

    path = retrieval_heads.save(torch.tensor(scores, dtype=torch.float32), tmp_path / "duo.safetensors", {"method": "test"})
    cfg = _config(policy="duo", **options)
    cfg["artifacts"] = {"duo_heads": str(path)}
    return cfg


def test_duo_with_room_for_everything_is_token_identical(sharp_model, prompt, reference, tmp_path):
    cfg = _duo_config(tmp_path, [[0.9, 0.1], [0.2, 0.8]], budget=64, n_sink=2, window=8, retrieval_fraction=0.5)
    tokens, _ = generate(sharp_model, prompt, max_new_tokens=16, capacity=64, config=cfg)
    assert torch.equal(tokens, reference[0])


def test_duo_streaming_heads_hold_fewer_slots_for_real(sharp_model, prompt, reference, tmp_path):
    from slimfx.runtime.generate import get_generator

    slimfx.clear_reports()
    cfg = _duo_config(tmp_path, [[0.9, 0.1], [0.2, 0.8]], budget=16, n_sink=2, window=8, retrieval_fraction=0.5)
    _, stats = generate(sharp_model, prompt, max_new_tokens=8, capacity=64, config=cfg)
    details = next(r.details for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" and r.applied)
    assert details["retrieval_heads"] == {0: [0], 1: [1]}  # the top half of the scores
    store = get_generator(sharp_model, 2, 64, config=cfg, codegen="auto").store
    for index, retrieval in ((0, 0), (1, 1)):
        cache = store.sites[index]
        assert cache.heads == (1 - retrieval,) and cache.k.shape[1:3] == (1, 16)  # streaming head: 16 slots
        whole = cache.tiers["retrieval"]
        assert whole.heads == (retrieval,) and whole["k"].shape[1:3] == (1, 64)
        assert (whole.slot_pos[0, 0] >= 0).sum() == 47  # everything fed so far is kept
        kept = cache.slot_pos[0, 0]
        assert sorted(kept[kept >= 0].tolist()) == [0, 1] + list(range(33, 47))  # sinks + most recent
    # Per site and sequence: the retrieval head's 64 plain slots, the streaming head's 16 slots
    # with a policy score each, and the two head-index vectors: 5/8 of the full store and a little.
    D, B = sharp_model.config.head_dim, 2
    plain_slot = 2 * D * 4 + 4  # fp32 K and V, int32 position
    site = B * (64 * plain_slot + 16 * (plain_slot + 4)) + 2 * 8
    assert reference[1]["kv_bytes"] == 2 * B * 2 * 64 * plain_slot
    assert stats["kv_bytes"] == 2 * site


def test_duo_without_its_artifact_is_a_config_error(sharp_model, prompt):
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(policy="duo", budget=16, n_sink=2, window=4))
    assert str(err.value).startswith("artifacts.duo_heads: missing")


def test_duo_with_a_low_precision_tier_is_rejected_before_the_artifact_is_read(sharp_model, prompt):
    cfg = _config(policy="duo", budget=16, n_sink=2, window=4, evicted="int4")  # no artifact given either
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=cfg)
    assert "passes.kv_eviction.evicted (layer" in str(err.value)
    assert "with policy 'duo'; allowed: 'drop'" in str(err.value)


def test_duo_artifact_of_another_model_is_rejected(sharp_model, prompt, tmp_path):
    cfg = _duo_config(tmp_path, [[0.9, 0.1, 0.3]], budget=16, n_sink=2, window=4)
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=cfg)
    assert "this model has 2 layers x 2 kv heads" in str(err.value)


def test_duo_retrieval_selection_is_the_top_fraction():
    from slimfx.passes.kv_eviction.retrieval_heads import select_retrieval

    scores = torch.tensor([[0.1, 0.5, 0.2], [0.7, 0.0, 0.3]])
    assert select_retrieval(scores, 0.5).tolist() == [[False, True, False], [True, False, True]]
    assert select_retrieval(scores, 0.01).sum() == 1 and select_retrieval(scores, 0.0).sum() == 0


# ----------------------------------------------------------------------------- budget as a fraction


def test_fraction_of_the_prompt_resolves_to_a_rounded_absolute_budget():
    from slimfx.compiler.pipeline import specialise

    cfg = _config(policy="h2o", budget_fraction=0.5, n_sink=2, window=4)
    cfg["passes"]["kv_eviction"]["layers"] = {"1": {"budget_fraction": 0.05, "window": 20}, "0": {"window": 8}}
    raw = specialise(cfg, 40)["passes"]["kv_eviction"]
    assert raw["budget"] == 32 and raw["budget_fraction"] == 0.0  # 20 tokens, rounded up to 32
    assert raw["layers"]["1"]["budget"] == 23  # 2 tokens -> 16, below the policy's minimum 2 + 20 + 1
    assert "budget" not in raw["layers"]["0"]  # inherits the resolved top-level budget
    plain = _config(policy="h2o", budget=16)
    assert specialise(plain, 40) is plain


def test_fraction_budget_through_generate_equals_the_absolute_one(sharp_model, prompt):
    by_fraction, _ = generate(sharp_model, prompt, max_new_tokens=8, capacity=64,
                              config=_config(policy="h2o", budget_fraction=0.25, n_sink=2, window=4))
    absolute, _ = generate(sharp_model, prompt, max_new_tokens=8, capacity=64, config=_config(policy="h2o", budget=16, n_sink=2, window=4))
    assert torch.equal(by_fraction, absolute)


def test_a_fractional_budget_error_says_where_its_budget_came_from():
    """A budget_fraction is checked before any prompt is known, at a long prompt: the error
    names the budget and window it resolved to, which the user never wrote."""
    from slimfx.compiler.config import load_config
    from slimfx.passes import kv_eviction

    cfg = load_config(_config(policy="h2o", budget_fraction=0.25, decode_budget=64))
    with pytest.raises(ConfigError) as err:
        kv_eviction.check_config(cfg.pass_config("kv_eviction"))
    assert str(err.value) == ("passes.kv_eviction.decode_budget (layer all): got 64; allowed: 0 (off) or > window (8192), so "
                              "generated tokens outside the recent window can be evicted (budget_fraction 0.25 checked at a "
                              "65536-token prompt: budget 16384; a window of -1 grows with it)")
