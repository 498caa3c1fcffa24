"""MiKV (passes/kv_eviction/mikv_op.py): evicted tokens kept at low precision instead of dropped.

The op against a dense reference built from its two tiers, the high tier against
the evict variant's tier, exactness with a budget covering everything, and, on the sharp
tiny model, that MiKV stays closer to the full cache than plain eviction at equal budget."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.compiler.config import ConfigError
from slimfx.passes.kv_eviction import OPTIONS, _check_options, rewrite_mikv
from slimfx.passes.kv_eviction.eviction_op import evict_site
from slimfx.passes.kv_eviction.mikv_op import FORMATS, mikv_site
from slimfx.runtime import generate
from slimfx.runtime.attention_op import attention_ref
from slimfx.runtime.generate import get_generator
from slimfx.runtime.kv_quant import get_format, token_error_bound
from slimfx.runtime.kv_store import plain_site

B, HQ, HKV = 2, 4, 2
POLICIES = ("streaming", "h2o", "a2sf", "tova", "keyformer", "snapkv")  # duo is refused (test below)
PARAM = {"a2sf": 0.9, "keyformer": 1.0, "snapkv": 4}


# ----------------------------------------------------------------------------- op level


def _site(budget: int, capacity: int, D: int, fmt: str, **layout):
    """A MiKV site and its two tiers (high, low)."""
    site = mikv_site(B, HKV, budget, capacity, D, fmt=fmt, **layout)
    return site, site.main, site.tiers["low"]


def _stream(total: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, total, D, generator=g) * 2 for h in (HQ, HKV, HKV))


def _feed(q, k, v, prompt: int, step_fn):
    """Prefill `prompt` tokens, then decode one token at a time; step_fn(q, k, v, pos, t_end) -> out."""
    outs = [step_fn(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], torch.arange(prompt).expand(B, prompt), prompt)]
    for t in range(prompt, q.shape[2]):
        outs.append(step_fn(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.full((B, 1), t), t + 1))
    return torch.cat(outs, dim=2)


def _dequantized_low(low, fmt: str):
    """The low tier's keys/values as floats, decoded with kv_quant directly (not the op's helper)."""
    fmt = get_format(fmt)
    out = []
    for codes, scale, zero in ((low.k, low.k_scale, low.k_zero), (low.v, low.v_scale, low.v_zero)):
        G = scale.shape[-1]
        rows = codes.unflatten(-1, (G, -1))
        if fmt.symmetric:
            x = rows.float() * scale[..., None]
        else:
            from slimfx.runtime.kv_quant import unpack

            x = unpack(rows, fmt.bits).float() * scale.float()[..., None] + zero.float()[..., None]
        out.append(x.flatten(-2))
    return out


def _check_tiers(high, low, fmt_name: str, k, v, seen: int, n_sink: int, window: int):
    """Every token 0..seen-1 is in exactly one tier; the high tier holds it exactly, the low
    tier within kv_quant's documented bound; sinks and the recent window are high."""
    fmt = get_format(fmt_name)
    lk, lv = _dequantized_low(low, fmt_name)
    for b in range(B):
        for h in range(HKV):
            hi_pos = high.slot_pos[b, h][high.slot_pos[b, h] >= 0].tolist()
            lo_pos = low.slot_pos[b, h][low.slot_pos[b, h] >= 0].tolist()
            assert sorted(hi_pos + lo_pos) == list(range(seen))  # exactly one tier each
            assert set(range(min(n_sink, seen))) | set(range(max(0, seen - window), seen)) <= set(hi_pos)
            for slot in (high.slot_pos[b, h] >= 0).nonzero().flatten().tolist():
                p = int(high.slot_pos[b, h, slot])
                assert torch.equal(high.k[b, h, slot], k[b, h, p]) and torch.equal(high.v[b, h, slot], v[b, h, p])
            for slot in (low.slot_pos[b, h] >= 0).nonzero().flatten().tolist():
                p = int(low.slot_pos[b, h, slot])
                assert slot == p % low.capacity
                for x, got, scale, zero in ((k, lk, low.k_scale, low.k_zero), (v, lv, low.v_scale, low.v_zero)):
                    G = scale.shape[-1]
                    row = x[b, h, p].view(G, -1)
                    bound = token_error_bound(row, scale[b, h, slot], zero[b, h, slot] if zero.numel() else None, fmt)
                    assert ((got[b, h, slot].view(G, -1) - row).abs() <= bound).all()


def _dense_attention(q, high, low, fmt: str, q_pos):
    """Attention of queries q [B, Hq, T, D] at positions q_pos [T] over both tiers as stored
    (high exact, low dequantized), by explicit softmax per head."""
    lk, lv = _dequantized_low(low, fmt)
    D = q.shape[-1]
    out = torch.empty_like(q)
    for b in range(B):
        for hq in range(HQ):
            h = hq // (HQ // HKV)
            pos = torch.cat([high.slot_pos[b, h], low.slot_pos[b, h]]).long()
            keys = torch.cat([high.k[b, h], lk[b, h]])
            vals = torch.cat([high.v[b, h], lv[b, h]])
            for t, p in enumerate(q_pos):
                seen = (pos >= 0) & (pos <= p)
                w = torch.softmax((keys[seen] @ q[b, hq, t]) / math.sqrt(D), dim=0)
                out[b, hq, t] = w @ vals[seen]
    return out


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(POLICIES), fmt=st.sampled_from(FORMATS), D=st.sampled_from([8, 64]),
       prompt=st.integers(6, 14), steps=st.integers(1, 6), extra=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_op_matches_dense_reference_over_both_tiers(policy, fmt, D, prompt, steps, extra, seed):
    n_sink, window = 2, 2
    budget = n_sink + window + 1 + extra
    total = prompt + steps
    q, k, v = _stream(total, D, seed)
    site, high, low = _site(budget, total, D, fmt, policy=policy, n_sink=n_sink, window=window, param=PARAM.get(policy, 0.0))

    def step(qs, ks, vs, pos, seen):
        out = attention_ref(qs, ks, vs, pos, site)
        _check_tiers(high, low, fmt, k, v, seen, n_sink, window)
        if qs.shape[2] == 1:  # decode reads the tiers as they are after its write
            torch.testing.assert_close(out, _dense_attention(qs, high, low, fmt, pos[0].tolist()), rtol=1e-5, atol=1e-5)
        else:  # the first prefill attends over the exact prompt
            full = attention_ref(qs, ks, vs, pos, plain_site(B, HKV, total, D))
            torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
        return out

    _feed(q, k, v, prompt, step)
    assert (low.slot_pos >= 0).any() == (total > budget)  # something was demoted iff it had to be


def test_second_prefill_chunk_attends_over_the_low_tier():
    """A later chunk sees earlier evicted tokens dequantized (prefill over both tiers)."""
    D, fmt = 8, "int4"
    q, k, v = _stream(20, D, seed=5)
    site, high, low = _site(6, 20, D, fmt, policy="h2o", n_sink=1, window=2)
    attention_ref(q[:, :, :12], k[:, :, :12], v[:, :, :12], torch.arange(12).expand(B, 12), site)
    assert (low.slot_pos >= 0).sum() == B * HKV * 6
    # The reference reads the tiers as they were before the chunk: copy them first.
    before_high = SimpleNamespace(**{f: t.clone() for f, t in high.buffers.items()})
    before_low = SimpleNamespace(**{f: t.clone() for f, t in low.buffers.items()})
    pos = torch.arange(12, 20).expand(B, 8)
    out = attention_ref(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], pos, site)
    both = SimpleNamespace(k=torch.cat([before_high.k, k[:, :, 12:]], 2), v=torch.cat([before_high.v, v[:, :, 12:]], 2),
                           slot_pos=torch.cat([before_high.slot_pos, pos[:, None, :].expand(B, HKV, 8).int()], 2))
    torch.testing.assert_close(out, _dense_attention(q[:, :, 12:], both, before_low, fmt, list(range(12, 20))), rtol=1e-5, atol=1e-5)
    _check_tiers(high, low, fmt, k, v, 20, 1, 2)


@pytest.mark.parametrize("policy", ["streaming", "snapkv"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_high_tier_is_managed_like_the_evict_variant(policy, fmt):
    """Policies that rank by position or by prefill scores choose the same tokens as
    the evict variant; what it drops, MiKV holds in the low tier."""
    D, budget, prompt, total = 8, 7, 12, 22
    q, k, v = _stream(total, D, seed=3)
    kw = dict(policy=policy, n_sink=2, window=3, param=PARAM.get(policy, 0.0))
    site, high, low = _site(budget, total, D, fmt, **kw)
    evict = evict_site(B, HKV, budget, D, **kw)

    def step(qs, ks, vs, pos, seen):
        out = attention_ref(qs, ks, vs, pos, site)
        attention_ref(qs, ks, vs, pos, evict)
        assert torch.equal(high.slot_pos, evict.slot_pos) and torch.equal(high.k, evict.k) and torch.equal(high.v, evict.v)
        return out

    _feed(q, k, v, prompt, step)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_budget_covering_everything_equals_full_attention(policy, fmt):
    D, prompt, total = 8, 12, 18
    q, k, v = _stream(total, D, seed=0)
    site, _, low = _site(total, total, D, fmt, policy=policy, n_sink=2, window=3, param=PARAM.get(policy, 0.0))
    mikv = _feed(q, k, v, prompt, lambda qs, ks, vs, pos, _: attention_ref(qs, ks, vs, pos, site))
    cache = plain_site(B, HKV, total, D)
    full = _feed(q, k, v, prompt, lambda qs, ks, vs, pos, _: attention_ref(qs, ks, vs, pos, cache))
    torch.testing.assert_close(mikv, full, rtol=1e-5, atol=1e-5)
    assert (low.slot_pos < 0).all()  # nothing demoted


# ----------------------------------------------------------------------------- through the runtime


def _config(**options):
    return {"pipelines": {"evict": ["kv_eviction"]}, "compile": {"pipeline": "evict"}, "passes": {"kv_eviction": options}}


SMALL = dict(policy="h2o", budget=16, n_sink=2, window=4)
CAPACITY = 64


@pytest.fixture(scope="module")
def reference(sharp_model, prompt):
    return generate(sharp_model, prompt, max_new_tokens=24, capacity=CAPACITY)


def test_budget_at_least_total_length_is_token_identical(sharp_model, prompt, reference):
    tokens, _ = generate(sharp_model, prompt, max_new_tokens=24, capacity=CAPACITY,
                         config=_config(policy="h2o", budget=CAPACITY, n_sink=2, window=4, evicted="int4"))
    assert torch.equal(tokens, reference[0])


def _forced_logits(model, ids, n_prompt: int, config) -> torch.Tensor:
    """Logits [B, S, V] of every position from n_prompt - 1 on, teacher-forced over ids [B, S+1]:
    one prefill, then one decode step per token, through the runtime (as `slimfx eval`)."""
    gen = get_generator(model, ids.shape[0], CAPACITY, config=config)
    store = gen.store
    out = []
    with torch.inference_mode():
        store.reset()
        out.append(gen.prefill(ids[:, :n_prompt], torch.full((ids.shape[0],), n_prompt), 512))
        for t in range(n_prompt, ids.shape[1] - 1):
            positions = store.step_positions(1)
            positions.copy_(store.seen[:, None])
            out.append(gen.step_fn(gen.model, ids[:, t:t + 1], positions))
            store.seen.add_(1)
    return torch.stack(out, dim=1).float()


@pytest.fixture(scope="module")
def forced(sharp_model, prompt, reference):
    """Teacher-forced runs over the full cache's own 24 greedy tokens: evicted -> (logits,
    store, kv_eviction results of its compiles); None = the full cache."""
    ids = torch.cat([prompt, reference[0]], dim=1)
    runs = {}
    for evicted in (None, "drop", "int4", "int2"):
        config = None if evicted is None else _config(**SMALL, evicted=evicted)
        slimfx.clear_reports()
        logits = _forced_logits(sharp_model, ids, 40, config)
        results = [r for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" and r.applied]
        runs[evicted] = (logits, get_generator(sharp_model, 2, CAPACITY, config=config).store, results)
    return runs


def test_mikv_is_closer_to_the_full_cache_than_dropping(forced, reference):
    """16 of 64 tokens kept in full precision (h2o): mean |logit error| and top-1 agreement
    against the full cache, teacher-forced over 24 positions of 2 sequences."""
    full = forced[None][0]
    assert torch.equal(full.argmax(-1), reference[0])  # the full cache's own greedy path
    err = {e: (forced[e][0] - full).abs().mean().item() for e in ("drop", "int4", "int2")}
    agree = {e: (forced[e][0].argmax(-1) == full.argmax(-1)).float().mean().item() for e in ("drop", "int4", "int2")}
    # Measured on this setup (torch 2.13 CPU): mean |logit error| drop 1.20, int4 0.15, int2 0.71;
    # top-1 agreement drop 0.19, int4 0.81, int2 0.27 (int8, not run here: 0.010 and 1.00).
    assert err["int4"] < err["int2"] < err["drop"]
    assert err["int4"] < err["drop"] / 4
    assert agree["int4"] > agree["int2"] > agree["drop"]


def test_bytes_counted_for_both_tiers_and_reset_empties_both(forced):
    _, store, results = forced["int4"]
    n_sites, H, D = len(store.sites), store.sites[0].n_kv_heads, store.sites[0].head_dim
    assert D % 32  # one quantization group per row (G = 1)
    per_slot_plain = 2 * D * 4 + 4  # fp32 k and v, int32 slot_pos
    per_slot_high = per_slot_plain + 4  # and an fp32 score
    per_slot_int4 = 2 * (D // 2) + 4 + 2 * 2 * 2  # packed k and v, int32 slot_pos, f16 scale + min for k and v
    site_after = 2 * H * (SMALL["budget"] * per_slot_high + CAPACITY * per_slot_int4)
    assert store.nbytes() == n_sites * site_after
    # The first graph compiled (prefill) relaid the store out; the decode graph found it done.
    assert [r.bytes_saved for r in results] == [n_sites * (2 * H * CAPACITY * per_slot_plain - site_after), 0]
    # The footprint the eval reports counts demoted tokens at the low tier's bytes per token.
    assert results[0].details["low_tier_bytes_per_token"] == {i: H * per_slot_int4 for i in store.sites}
    for cache in store.sites.values():
        assert cache.layout.startswith("mikv/") and (cache.tiers["low"].slot_pos >= 0).any()  # 63 tokens seen, 16 kept high
    store.reset()
    assert all((c.slot_pos < 0).all() and (c.tiers["low"].slot_pos < 0).all() for c in store.sites.values())


def _plain(D: int):
    return plain_site(1, 2, 32, D)


# Every option at its default (as a loaded config has them), then this test's values.
OPTS = {**{key: option.default for key, option in OPTIONS.items()},
        **dict(policy="h2o", budget=16, n_sink=2, window=4, evicted="int4")}


class _Store:
    def __init__(self, cache):
        self.sites = {0: cache}


@pytest.mark.parametrize("change, message", [
    (dict(policy="duo"), "passes.kv_eviction.evicted (layer 0): got 'int4' with policy 'duo'; allowed: 'drop' "
                         "(duo's streaming heads keep sinks + recent tokens by design; MiKV's low tier goes with a score-based policy)"),
    (dict(decode_budget=32), "passes.kv_eviction.evicted (layer 0): got 'int4' with decode_budget 32; allowed: 'drop' (MiKV and SCOPE budgets do not combine)"),
])
def test_bad_combinations_are_config_errors(change, message):
    with pytest.raises(ConfigError) as err:
        _check_options(0, dict(OPTS, budget_fraction=0.0, **change))
    assert str(err.value) == message


def test_a_format_mikv_cannot_store_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        rewrite_mikv(None, _Store(_plain(8)), 0, dict(OPTS, evicted="fp8"))
    assert str(err.value) == "passes.kv_eviction.evicted (layer 0): got 'fp8'; allowed for a low-precision tier: one of int8, int4, int2 ('drop' evicts)"


def test_head_dim_the_format_cannot_pack_is_a_config_error():
    with pytest.raises(ConfigError, match=r"passes\.kv_eviction\.evicted \(layer 0\): got 'int2'; head_dim 6 is not a multiple of 4"):
        rewrite_mikv(None, _Store(_plain(6)), 0, dict(OPTS, evicted="int2"))


def test_decode_budget_with_mikv_is_refused_through_the_pass(sharp_model, prompt):
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=CAPACITY, config=_config(**SMALL, decode_budget=8, evicted="int4"))
    assert isinstance(err.value, ConfigError)
    assert "evicted" in str(err.value) and "decode_budget" in str(err.value)
