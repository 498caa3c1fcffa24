"""The eviction attention op: exact with a large budget, the policy's rule with a small one."""

import pytest
import torch

from slimfx.passes.kv_eviction.eviction_op import evict_site
from slimfx.passes.kv_eviction.policies import POLICIES
from slimfx.runtime.attention_op import attention_ref
from slimfx.runtime.kv_store import plain_site

B, HQ, HKV, D = 2, 4, 2, 8


def _empty(cap, **layout):
    return evict_site(B, HKV, cap, D, **layout) if layout else plain_site(B, HKV, cap, D)


def _stream(T_prompt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = T_prompt + steps
    q = torch.randn(B, HQ, total, D, generator=g)
    k = torch.randn(B, HKV, total, D, generator=g)
    v = torch.randn(B, HKV, total, D, generator=g)
    return q, k, v


def _run(cache, q, k, v, T_prompt):
    outs = []
    pos = torch.arange(T_prompt).expand(B, T_prompt)
    outs.append(attention_ref(q[:, :, :T_prompt], k[:, :, :T_prompt], v[:, :, :T_prompt], pos, cache))
    for t in range(T_prompt, q.shape[2]):
        p = torch.full((B, 1), t)
        outs.append(attention_ref(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], p, cache))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_budget_covering_everything_equals_full_attention(policy):
    q, k, v = _stream(12, 6)
    full = _run(_empty(18), q, k, v, 12)
    evict = _run(_empty(18, policy=policy, n_sink=2, window=3, param=0.9 if policy != "snapkv" else 4), q, k, v, 12)
    torch.testing.assert_close(evict, full, rtol=1e-5, atol=1e-5)


# D2O merges evicted keys into kept ones: its held keys are checked in test_eviction_reference.py.
@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"d2o"}))
def test_small_budget_keeps_the_rule_and_true_positions(policy):
    n_sink, window, cap = 2, 3, 8
    q, k, v = _stream(14, 10, seed=1)
    param = 0.9 if policy != "snapkv" else 4
    cache = _empty(cap, policy=policy, n_sink=n_sink, window=window, param=param)
    k_cache, slot_pos = cache.k, cache.slot_pos
    pos = torch.arange(14).expand(B, 14)
    attention_ref(q[:, :, :14], k[:, :, :14], v[:, :, :14], pos, cache)
    for t in range(14, 24):
        out = attention_ref(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.full((B, 1), t), cache)
        held = slot_pos.long()
        assert (held >= 0).sum(-1).max() <= cap  # never past the budget
        for b in range(B):
            for h in range(HKV):
                kept = held[b, h][held[b, h] >= 0]
                assert len(set(kept.tolist())) == len(kept)  # no token twice
                assert set(range(n_sink)) <= set(kept.tolist())  # sinks kept
                assert set(range(t - window + 1, t + 1)) <= set(kept.tolist())  # recent window kept
                # Every held slot carries its own token's key (true position, no shift).
                for slot in (held[b, h] >= 0).nonzero().flatten().tolist():
                    assert torch.equal(k_cache[b, h, slot], k[b, h, held[b, h, slot]])
        # The output equals attention over exactly the kept tokens.
        ref = torch.empty_like(out)
        for b in range(B):
            for hq in range(HQ):
                h = hq // (HQ // HKV)
                idx = held[b, h][held[b, h] >= 0]
                w = torch.softmax((k[b, h, idx] @ q[b, hq, t]) / D**0.5, dim=0)
                ref[b, hq, 0] = w @ v[b, h, idx]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_op_is_registered_with_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cache = _empty(8, policy="h2o", n_sink=1, window=2)
    q, k, v = _stream(1, 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.slimfx.attention(q, k, v, torch.zeros(B, 1, dtype=torch.long), cache.buffers(), 0.3, cache.layout)
    assert out.shape == q.shape


@pytest.mark.parametrize("T", [1, 5])
def test_opcheck_fake_matches_real_with_strided_query(T):
    """torch.library.opcheck: schema, declared mutations and the fake's strides agree with
    the real op, also for a query that is a transposed view (as in HF models)."""
    cache = _empty(8, policy="h2o", n_sink=1, window=2)
    q = torch.randn(B, T, HQ, D).transpose(1, 2)  # [B, HQ, T, D], non-contiguous
    k, v = torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
    pos = torch.arange(T).expand(B, T).contiguous() if T > 1 else torch.full((B, 1), 3)
    torch.library.opcheck(torch.ops.slimfx.attention.default, (q, k, v, pos, cache.buffers(), 0.35, cache.layout),
                          test_utils=("test_schema", "test_faketensor"))
