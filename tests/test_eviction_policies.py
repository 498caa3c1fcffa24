"""Invariants of the eviction policies over random score streams (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.compiler.config import ConfigError
from slimfx.passes.kv_eviction.policies import POLICIES, make_policy, snapkv_scores


@st.composite
def store_states(draw):
    """A random store: B x Hkv x C slots holding distinct positions < seen, some empty."""
    B, H, C = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(8, 40))
    n_sink, window = draw(st.integers(0, 4)), draw(st.integers(0, 8))
    budget = draw(st.integers(n_sink + window + 1, n_sink + window + 1 + C))
    seen = draw(st.integers(1, 3 * C))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    slot_pos = torch.full((B, H, C), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            n = min(seen, int(torch.randint(0, C + 1, (1,), generator=g)))
            pos = torch.randperm(seen, generator=g)[:n]
            slots = torch.randperm(C, generator=g)[:n]
            slot_pos[b, h, slots] = pos
    scores = torch.rand(B, H, C, generator=g)
    return dict(slot_pos=slot_pos, scores=scores, seen=torch.full((B,), seen), n_sink=n_sink, window=window, budget=budget)


def _policy(name, s):
    return make_policy(name, s["budget"], n_sink=s["n_sink"], window=s["window"])


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=60, deadline=None)
@given(s=store_states())
def test_keep_mask_follows_the_rule(name, s):
    policy = _policy(name, s)
    pos, scores, seen = s["slot_pos"], s["scores"], s["seen"]
    keep = policy.keep_mask(scores, pos, seen)
    prio = policy.priority(scores, pos, seen)
    filled = pos >= 0
    sinks = filled & (pos < s["n_sink"])
    recent = filled & (pos >= seen.view(-1, 1, 1) - s["window"])
    assert not (keep & ~filled).any(), "an empty slot is never kept"
    assert (keep | ~(sinks | recent)).all(), "sinks and the recent window are always kept"
    protected = (sinks | recent).sum(-1)
    assert (keep.sum(-1) <= torch.clamp(protected, min=s["budget"])).all(), "never more than the budget (beyond protected)"
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in pos.shape[:2])):
        b, h = idx.tolist()
        cand = (filled & ~(sinks | recent))[b, h]
        room = max(s["budget"] - int(protected[b, h]), 0)
        kept_c = keep[b, h] & cand
        assert int(kept_c.sum()) == min(room, int(cand.sum())), "the budget is filled when candidates remain"
        if kept_c.any() and (cand & ~kept_c).any():
            assert prio[b, h][kept_c].min() >= prio[b, h][cand & ~kept_c].max(), "kept candidates outrank dropped ones"


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=40, deadline=None)
@given(s=store_states(), n_new=st.integers(1, 4))
def test_victims_prefer_empty_slots_and_spare_protected(name, s, n_new):
    policy = _policy(name, s)
    pos, scores, seen = s["slot_pos"], s["scores"], s["seen"]
    C = pos.shape[-1]
    n_new = min(n_new, C)
    victims = policy.victim_slots(scores, pos, seen, n_new)
    assert victims.shape == (*pos.shape[:2], n_new)
    chosen_pos = torch.gather(pos, -1, victims)
    empty = (pos < 0).sum(-1, keepdim=True)
    prot = policy.protected(pos, seen)
    n_unprot = ((pos >= 0) & ~prot).sum(-1, keepdim=True)
    # The first min(n_new, #empty) victims are empty slots.
    first_empty = torch.arange(n_new)[None, None, :] < empty
    assert (chosen_pos[first_empty] < 0).all()
    # A protected slot is chosen only when empty + unprotected slots run out.
    chosen_prot = torch.gather(prot, -1, victims)
    allowed = torch.arange(n_new)[None, None, :] >= (empty + n_unprot)
    assert not (chosen_prot & ~allowed).any()


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=30, deadline=None)
@given(s=store_states())
def test_compact_keeps_exactly_the_kept_tokens(name, s):
    policy = _policy(name, s)
    pos, scores, seen = s["slot_pos"], s["scores"], s["seen"]
    B, H, C = pos.shape
    k = torch.randn(B, H, C, 4)
    v = torch.randn(B, H, C, 4)
    keep = policy.keep_mask(scores, pos, seen)
    budget = s["budget"]
    k2, v2, sc2, pos2 = policy.compact(k, v, scores, pos, seen, budget)
    cap = min(budget, C)  # compaction never grows a buffer
    assert pos2.shape == (B, H, cap) and k2.shape == (B, H, cap, 4)
    for b in range(B):
        for h in range(H):
            want = sorted(pos[b, h][keep[b, h]].tolist())
            got = pos2[b, h][pos2[b, h] >= 0]
            assert sorted(got.tolist()) == want
            for p in got.tolist():  # each kept token carries its own key and value
                src = (pos[b, h] == p).nonzero()[0, 0]
                dst = (pos2[b, h] == p).nonzero()[0, 0]
                assert torch.equal(k2[b, h, dst], k[b, h, src]) and torch.equal(v2[b, h, dst], v[b, h, src])


def test_streaming_keeps_sinks_and_most_recent():
    policy = make_policy("streaming", budget=8, n_sink=2, window=3)
    pos = torch.arange(20).view(1, 1, 20)
    keep = policy.keep_mask(torch.rand(1, 1, 20), pos, torch.tensor([20]))
    assert pos[keep].tolist() == [0, 1, 14, 15, 16, 17, 18, 19]


def test_h2o_keeps_heavy_hitters():
    policy = make_policy("h2o", budget=6, n_sink=1, window=2)
    pos = torch.arange(12).view(1, 1, 12)
    scores = torch.zeros(1, 1, 12)
    scores[0, 0, [3, 5, 7]] = torch.tensor([5.0, 9.0, 7.0])
    keep = policy.keep_mask(scores, pos, torch.tensor([12]))
    assert pos[keep].tolist() == [0, 3, 5, 7, 10, 11]


def test_tova_ranks_alike_across_heads():
    policy = make_policy("tova", budget=4, n_sink=0, window=0)
    pos = torch.arange(10).expand(1, 2, 10)
    keep = policy.keep_mask(torch.rand(1, 2, 10), pos, torch.tensor([10]))
    assert torch.equal(keep[0, 0], keep[0, 1])


def test_budget_below_minimum_is_a_config_error():
    with pytest.raises(ConfigError, match=r"budget: got 10; allowed: >= 69 for policy 'h2o'"):
        make_policy("h2o", 10, n_sink=4, window=64)
    with pytest.raises(ConfigError, match="policy: got 'h3o'"):
        make_policy("h3o", 256)


def test_snapkv_scores_prefer_attended_keys():
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 1, 4, 2, 40, 8
    q = torch.randn(B, Hq, T, D)
    k = torch.randn(B, Hkv, T, D) * 0.1
    k[:, :, 9] = q[:, ::2, -1] * 3  # key 9 matches the last queries strongly
    k[:, :, 9] += q[:, 1::2, -1] * 3
    s = snapkv_scores(q, k, obs_window=8, pool=3)
    assert s.shape == (B, Hkv, T)
    assert (s[..., 8:11].amax(-1) >= s[..., :8].amax(-1)).all()


def _one_query_at_a_time(q, keys, q_pos, k_pos, scores, scale, decay):
    """The decode rule scores = decay * scores + mass, applied for each query in turn,
    written out plainly: the reference a prefill chunk's scores must equal."""
    B, Hq, T, D = q.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    out = torch.cat([scores, torch.zeros(B, Hkv, N - scores.shape[2])], dim=2).double()
    for t in range(T):
        mass = torch.zeros(B, Hkv, N, dtype=torch.float64)
        for b in range(B):
            for h in range(Hq):
                g = h // (Hq // Hkv)
                visible = (k_pos[b, g] >= 0) & (k_pos[b, g] <= q_pos[b, t])
                if not visible.any():
                    continue
                logits = (keys[b, g].double() @ q[b, h, t].double()) * scale
                mass[b, g] += torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
        out = decay * out + mass
    return out


@pytest.mark.parametrize("name", ["h2o", "a2sf", "tova"])
@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 6), old=st.integers(0, 5), hkv=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_prefill_scores_equal_feeding_the_chunk_token_by_token(name, T, old, hkv, seed):
    """At prefill every accumulating policy ranks by its paper's decode rule applied
    to each prompt query in turn: H2O's plain sum, A2SF's forgetting factor, TOVA's last
    query alone (decay 0)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, D = 2, 2 * hkv, 8
    q = torch.randn(B, Hq, T, D, generator=g)
    keys = torch.randn(B, hkv, old + T, D, generator=g)
    q_pos = torch.arange(old, old + T).expand(B, T).clone()
    q_pos[1, : T // 2] = -1  # left padding in the second sequence
    k_pos = torch.cat([torch.arange(old).expand(B, hkv, old), q_pos[:, None, :].expand(B, hkv, T)], dim=2).clone()
    scores = torch.rand(B, hkv, old, generator=g)
    policy = make_policy(name, 64, n_sink=0, window=0)
    got = policy.prefill_scores(q, q_pos, keys, k_pos, scores, 0.35)
    want = _one_query_at_a_time(q, keys, q_pos, k_pos, scores, 0.35, policy.decay)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_tova_keeps_what_the_last_prompt_token_attends_to():
    """TOVA at the end of a prompt: the kept set is the top of the last query's
    head-averaged attention, whatever earlier queries looked at."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 1, 4, 2, 24, 16
    q = torch.randn(B, Hq, T, D, generator=g)
    keys = torch.randn(B, Hkv, T, D, generator=g)
    pos = torch.arange(T).expand(B, T)
    k_pos = pos[:, None, :].expand(B, Hkv, T)
    policy = make_policy("tova", 8, n_sink=0, window=0)
    scores = policy.prefill_scores(q, pos, keys, k_pos, torch.zeros(B, Hkv, 0), D**-0.5)
    keep = policy.keep_mask(scores, k_pos, torch.tensor([T]))
    last = torch.softmax((q[:, :, -1:] @ keys.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * D**-0.5, -1)[:, :, 0]
    expected = last.mean(1).topk(8).indices.sort().values  # [B, 8], the same set for every head
    for h in range(Hkv):
        assert keep[0, h].nonzero().flatten().tolist() == expected[0].tolist()


@pytest.mark.parametrize("name, budget, want", [("streaming", 100, (4, 0)), ("h2o", 100, (0, 50)), ("a2sf", 100, (0, 50)),
                                                ("tova", 100, (0, 0)), ("keyformer", 100, (0, 30)), ("snapkv", 100, (0, 32))])
def test_sinks_and_window_default_to_the_papers(name, budget, want):
    policy = make_policy(name, budget)
    assert (policy.n_sink, policy.window) == want
    assert (make_policy(name, budget, n_sink=2, window=5).n_sink, make_policy(name, budget, n_sink=2, window=5).window) == (2, 5)
