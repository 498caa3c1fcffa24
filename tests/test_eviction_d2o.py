"""D2O in the kv_eviction pass: per-site budgets from a calibrated density plan that split
the uniform total, exact with room for everything, and its one-line configuration errors.
(Its keep + merge rule against a token-by-token reference: test_eviction_reference.py.)"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.compiler.config import ConfigError
from slimfx.passes.kv_eviction.eviction_op import evict_site, merge_into, merge_targets
from slimfx.passes.kv_eviction.layer_budgets import allocate, min_budget, shares, write_plan
from slimfx.runtime import generate
from slimfx.runtime.attention_op import attention_ref


def _config(plan=None, **options):
    cfg = {"pipelines": {"evict": ["kv_eviction"]}, "compile": {"pipeline": "evict"},
           "passes": {"kv_eviction": {"policy": "d2o", **options}}}
    if plan is not None:
        cfg["artifacts"] = {"d2o_budgets": str(plan)}
    return cfg


@pytest.fixture(scope="module")
def plan(sharp_model, tmp_path_factory):
    from slimfx.calibrate.d2o_budgets import calibrate_budgets

    ids = torch.randint(1, 128, (1, 48), generator=torch.Generator().manual_seed(5))
    return write_plan(calibrate_budgets(sharp_model, ids), tmp_path_factory.mktemp("d2o") / "d2o.json")


def _budgets():
    return next(r.details["budgets"] for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" and r.applied)


def test_budget_at_least_total_length_is_token_identical(sharp_model, prompt, plan):
    """48 tokens in all: every site's budget (the plan's split of 2 x 128, or 48 each) holds them."""
    reference, _ = generate(sharp_model, prompt, max_new_tokens=8, capacity=128)
    for cfg in (_config(plan, budget=128, n_sink=2, window=8), _config(budget=48, n_sink=2, window=8, d2o_budgets="none")):
        slimfx.clear_reports()
        tokens, _ = generate(sharp_model, prompt, max_new_tokens=8, capacity=128, config=cfg)
        assert torch.equal(tokens, reference) and min(_budgets().values()) < 128  # at least one site evicts: its layout is d2o's


def test_plan_splits_the_uniform_total_by_density(sharp_model, prompt, plan):
    slimfx.clear_reports()
    tokens, _ = generate(sharp_model, prompt, max_new_tokens=8, capacity=64, config=_config(plan, budget=24, n_sink=2, window=4))
    budgets = _budgets()
    variance = json.loads(plan.read_text())["variance"]
    assert sum(budgets.values()) == 2 * 24
    denser = min(range(2), key=lambda i: variance[i])
    assert budgets[denser] > budgets[1 - denser]  # the layer with the lower variance keeps more
    slimfx.clear_reports()
    uniform, _ = generate(sharp_model, prompt, max_new_tokens=8, capacity=64, config=_config(budget=24, n_sink=2, window=4,
                                                                                              d2o_budgets="none"))
    assert _budgets() == {0: 24, 1: 24} and not torch.equal(tokens, uniform)


@settings(max_examples=60, deadline=None)
@given(share=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=12), per_site=st.integers(10, 300), minimum=st.integers(1, 10))
def test_allocation_sums_to_the_total_and_respects_the_floor(share, per_site, minimum):
    total = per_site * len(share)
    got = allocate(dict(enumerate(share)), total, minimum)
    assert sum(got.values()) == total and min(got.values()) >= minimum
    above = [i for i in got if got[i] > minimum]  # sites above the floor are in proportion, up to rounding
    for i in above:
        for j in above:
            if share[i] > share[j]:
                assert got[i] >= got[j]


def test_shares_favour_dense_layers():
    s = shares([0.5, 4.0, 2.0])
    assert abs(float(s.sum()) - 1) < 1e-9 and s[0] > s[2] > s[1]
    assert torch.allclose(s[0] / s[1], torch.tensor(torch.e, dtype=s.dtype))  # min-max normalised: at most e apart
    assert torch.allclose(shares([3.0, 3.0]), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_min_budget_is_the_smallest_legal_one():
    assert min_budget({"n_sink": -1, "window": -1}) == 9  # 4 sinks + budget // 2
    assert min_budget({"n_sink": 2, "window": 4}) == 7


def test_decode_merges_the_evicted_token_into_its_nearest_kept_key():
    """A site of 3 slots, no sinks or window: the 4th token evicts the least attended one,
    which is merged into the kept token whose key points the same way, e : e^u weighted."""
    cache = evict_site(1, 1, 3, 2, policy="d2o", n_sink=0, window=0, param=0.5)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, -1.0]])
    vals = torch.arange(8.0).view(4, 2)
    q = torch.tensor([[0.0, 1.0]]) * 4  # attends to key 1, never to keys 0 and 2
    for t in range(4):
        attention_ref(q.view(1, 1, 1, 2), keys[t].view(1, 1, 1, 2), vals[t].view(1, 1, 1, 2), torch.tensor([[t]]), cache)
    pos = cache.slot_pos[0, 0].tolist()
    evicted = 0 if 0 not in pos else 2
    kept_twin = 2 - evicted
    assert sorted(pos) == sorted({0, 1, 2, 3} - {evicted})
    u = torch.nn.functional.cosine_similarity(keys[evicted], keys[kept_twin], dim=0)
    slot = pos.index(kept_twin)
    want = (torch.e * keys[kept_twin] + u.exp() * keys[evicted]) / (torch.e + u.exp())
    # The first eviction sets the threshold to its own similarity, so it merges.
    torch.testing.assert_close(cache.k[0, 0, slot], want)
    torch.testing.assert_close(cache.tiers["main"]["merge_tau"][0, 0, 0], u)


def test_merge_leaves_untouched_slots_bit_exact_and_keeps_the_threshold_without_evictions():
    g = torch.Generator().manual_seed(0)
    kk, vv = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    ek, ev = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 3, 4, generator=g)
    tau = torch.full((1, 2, 1), 0.25)
    none = torch.zeros(1, 2, 3, dtype=torch.bool)
    target, weight = merge_targets(ek, none, kk, torch.ones(1, 2, 5, dtype=torch.bool), tau, 0.5)
    k2, v2 = merge_into(kk, vv, ek, ev, target, weight)
    assert torch.equal(k2, kk) and torch.equal(v2, vv) and torch.equal(tau, torch.full((1, 2, 1), 0.25))


@pytest.mark.parametrize("options, message", [
    ({"decode_budget": 32}, "passes.kv_eviction.decode_budget (layer all): got 32 with policy 'd2o'; allowed: 0"),
    ({"evicted": "int8"}, "passes.kv_eviction.evicted (layer all): got 'int8' with policy 'd2o'; allowed: 'drop'"),
    ({"d2o_budgets": "d2o_budgets"}, "passes.kv_eviction.d2o_budgets: 'd2o_budgets' is not a key of [artifacts]"),
    ({"merge_ema": 1.5}, "passes.kv_eviction.merge_ema: got 1.5"),
])
def test_config_errors(options, message):
    """The checks `slimfx config` / `slimfx run` make before any model loads (one line each)."""
    from slimfx.compiler.config import load_config
    from slimfx.passes import kv_eviction

    options = {"budget": 32, "n_sink": 2, "window": 4, "d2o_budgets": "none", **options}
    with pytest.raises(ConfigError) as err:
        config = load_config(_config(**options))
        kv_eviction.check_config(config.pass_config("kv_eviction"))
        config.check_artifacts()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plan_of_another_model_is_refused(sharp_model, prompt, plan, tmp_path):
    other = json.loads(plan.read_text())
    other["model"]["fingerprint"] = "000000000000"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="the plan was made for another model"):
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(path, budget=32))
    path.write_text(json.dumps(dict(json.loads(plan.read_text()), variance=[1.0])))
    with pytest.raises(ConfigError, match="the plan has 1 layers; this model has 2 attention sites"):
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(path, budget=32))


def test_layer_variances_are_the_variance_of_each_keys_received_mass(sharp_model):
    """calibrate d2o-budgets' density: per layer, the variance over keys of the attention
    mass each key receives, mean over heads, from HF's own attention weights."""
    from slimfx.calibrate.d2o_budgets import layer_variances

    ids = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(6))
    measured = layer_variances(sharp_model, ids)
    saved = sharp_model.config._attn_implementation
    sharp_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = sharp_model(ids, output_attentions=True).attentions
    finally:
        sharp_model.config._attn_implementation = saved
    expected = [float(a[0].sum(dim=-2).var(dim=-1).mean()) for a in attentions]
    assert measured == pytest.approx(expected, rel=1e-5)
    assert len(set(measured)) == len(measured)  # layers differ: the hook saw each one
    assert sharp_model.config._attn_implementation == saved
