"""Deferred batched verification of the VQ head (runtime/vq_verify.py) and the KV rollback
it relies on (KVStore.rollback).

Rollback: over random lengths and rollback points, a store that received wrong tokens,
was rolled back and then re-fed the right ones equals the store that never saw the wrong
tokens (slots, positions, scores, k/v of every filled slot, and the next decode output).
Loop: on tiny random models the verified tokens equal plain greedy decoding with the
full head, whatever the round length, with padding and EOS; the route counts add up to
the tokens emitted and the model calls made. The `model`-marked test checks token
identity on the default model.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.calibrate.vq_head import build_artifact
from slimfx.compiler.config import ConfigError
from slimfx.runtime import vq_head as rt
from slimfx.runtime.attention_op import attention_ref, write_tokens
from slimfx.runtime.generate import generate
from slimfx.passes.kv_eviction.eviction_op import evict_layout
from slimfx.runtime.kv_store import KVStore, KVStoreError, plain_site, plain_tier
from slimfx.runtime.models import tiny_model
from slimfx.runtime.vq_verify import generate_verified
from tests.test_runtime_generate import lively_tiny

HKV, D = 2, 4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the loop tests run the Triton head kernels on a GPU


# ----------------------------------------------------------------------------- rollback


def _feed(store: KVStore, kv: torch.Tensor, start: torch.Tensor, count: int) -> None:
    """Decode-style writes of `count` tokens per sequence at positions start[b] + i;
    kv [B, L, 2, Hkv, D] holds each sequence's k/v by position."""
    cache = store.sites[0]
    for i in range(count):
        pos = (start + i)[:, None]
        rows = kv[torch.arange(store.batch), pos[:, 0]]  # [B, 2, Hkv, D]
        write_tokens(rows[:, 0, :, None], rows[:, 1, :, None], pos, cache.k, cache.v, cache.slot_pos)
        store.seen.copy_(pos[:, 0] + 1)


def _store(batch: int, capacity: int) -> KVStore:
    store = KVStore(batch, capacity)
    store.site(0, HKV, D)
    return store


def _copy(cache):
    """A plain site holding copies of `cache`'s buffers (the probe's write must not touch the store)."""
    copy = plain_site(cache.k.shape[0], cache.n_kv_heads, cache.capacity, cache.head_dim)
    for mine, theirs in zip(copy.buffers(), cache.buffers()):
        mine.copy_(theirs)
    return copy


def _same_store(a: KVStore, b: KVStore) -> None:
    ca, cb = a.sites[0], b.sites[0]
    assert torch.equal(a.seen, b.seen)
    assert torch.equal(ca.slot_pos, cb.slot_pos)
    filled = (ca.slot_pos >= 0)[..., None].expand_as(ca.k)
    assert torch.equal(ca.k[filled], cb.k[filled]) and torch.equal(ca.v[filled], cb.v[filled])
    q = torch.randn(a.batch, 2 * HKV, D)  # the next decode step reads the same history
    torch.testing.assert_close(
        attention_ref(q[:, :, None], *_probe_kv(a), a.seen[:, None], _copy(ca)),
        attention_ref(q[:, :, None], *_probe_kv(a), b.seen[:, None], _copy(cb)))


def _probe_kv(store):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(store.batch, HKV, 1, D, generator=gen), torch.randn(store.batch, HKV, 1, D, generator=gen)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_rollback_then_refeed_equals_never_rolled_back(data):
    batch = data.draw(st.integers(1, 3), label="batch")
    keep = torch.tensor(data.draw(st.lists(st.integers(0, 12), min_size=batch, max_size=batch), label="keep"))
    wrong = torch.tensor(data.draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch), label="wrong"))
    final = keep + torch.tensor(data.draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch), label="more"))
    capacity = int((keep + wrong).max().clamp(min=final.max())) + data.draw(st.integers(1, 4), label="spare")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    right = torch.randn(batch, capacity, 2, HKV, D, generator=gen)
    bad = torch.randn(batch, capacity, 2, HKV, D, generator=gen)

    clean = _store(batch, capacity)
    for b in range(batch):  # sequences of different lengths: feed each on its own row of the batch
        _feed_one(clean, right, b, 0, int(final[b]))
    rolled = _store(batch, capacity)
    for b in range(batch):
        _feed_one(rolled, right, b, 0, int(keep[b]))
        _feed_one(rolled, bad, b, int(keep[b]), int(wrong[b]))
    rolled.rollback(keep.clone(), check=True)
    assert torch.equal(rolled.seen, torch.minimum(keep, keep + wrong))
    for b in range(batch):
        _feed_one(rolled, right, b, int(keep[b]), int(final[b] - keep[b]))
    _same_store(clean, rolled)


def _feed_one(store: KVStore, kv: torch.Tensor, b: int, start: int, count: int) -> None:
    """Write `count` tokens of sequence b only (positions start..start+count-1)."""
    cache = store.sites[0]
    for p in range(start, start + count):
        row = kv[b, p]
        write_tokens(row[0][None, :, None], row[1][None, :, None], torch.tensor([[p]]),
                     cache.k[b:b + 1], cache.v[b:b + 1], cache.slot_pos[b:b + 1])
        store.seen[b] = p + 1


def test_rollback_is_a_no_op_at_or_past_seen_and_empties_shared_owner_once():
    store = KVStore(2, 8)
    store.site(0, HKV, D)
    store.share(1, 0)
    store.site(1, HKV, D)
    _feed(store, torch.randn(2, 8, 2, HKV, D), torch.zeros(2, dtype=torch.int64), 5)
    before = store.sites[0].slot_pos.clone()
    store.rollback(torch.tensor([5, 9]))
    assert torch.equal(store.sites[0].slot_pos, before) and store.seen.tolist() == [5, 5]
    store.rollback(torch.tensor([2, 5]))
    assert store.seen.tolist() == [2, 5]
    assert store.sites[1].slot_pos is store.sites[0].slot_pos  # the reader still sees the owner's cache
    held = sorted(p for p in store.sites[0].slot_pos[0, 0].tolist() if p >= 0)
    assert held == [0, 1]


def test_rollback_rejects_bad_positions_scores_and_lost_tokens():
    store = _store(2, 4)
    with pytest.raises(KVStoreError, match=r"rollback positions: got \(3,\).*int64 tensor \[2\]"):
        store.rollback(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(KVStoreError, match="int64 tensor"):
        store.rollback(torch.zeros(2, dtype=torch.int32))
    # An eviction policy's accumulated scores cannot be un-accumulated.
    evicting = _store(2, 4)
    site = evicting.sites[0]
    evicting.relayout(0, evict_layout("h2o", 1, 1, 0.0), {"main": plain_tier(2, HKV, 4, D, dtype=torch.float32, device="cpu", scores=True)})
    with pytest.raises(KVStoreError, match=r"site 0's 'main' tier \(evict/h2o.*cannot forget tokens exactly"):
        evicting.rollback(torch.zeros(2, dtype=torch.int64))
    assert site is evicting.sites[0]
    _feed(store, torch.randn(2, 8, 2, HKV, D), torch.zeros(2, dtype=torch.int64), 6)  # capacity 4: slots wrapped
    with pytest.raises(KVStoreError, match="no longer holds every token"):
        store.rollback(torch.tensor([5, 5]), check=True)


# ----------------------------------------------------------------------------- the verification loop


def _config(path, **opts):
    vq = {"mode": "exact", "probes": 2, "verify": "deferred", "verify_every": 4, **opts}
    return {"compile": {"pipeline": "vq"}, "pipelines": {"vq": ["vq_logits"]},
            "passes": {"vq_logits": vq}, "artifacts": {"vq_head": str(path)}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = lively_tiny()
    path = tmp_path_factory.mktemp("vq") / "head.safetensors"
    rt.save_artifact(build_artifact(model.get_output_embeddings().weight.cpu(), 8, seed=0), path)
    return model, path


def _padded(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, max(lengths) - n:] = 1
    return ids, mask


@pytest.mark.parametrize("every", [1, 3, 8])
def test_verified_tokens_equal_full_head_greedy(tiny, every):
    model, path = tiny
    ids, mask = _padded([9, 5])
    new = 24
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=new).tokens
    rt.reset_counts()
    out = generate_verified(model, ids, attention_mask=mask, config=_config(path, verify_every=every), max_new_tokens=new)
    assert torch.equal(out.tokens, ref)
    (counts,) = [c for c in rt.route_counts().values() if c.get("rounds")]
    # Every token after the prefill one came from exactly one route of the loop ...
    assert counts["bound"] + counts["accepted"] + counts["corrected"] == 2 * (new - 1)
    # ... and every head row the loop computed was either emitted or discarded.
    loop_rows = counts["bound"] + counts["accepted"] + counts["corrected"] + counts["discarded"]
    assert loop_rows == 2 * out.stats["decode_steps"] and counts["fallback"] <= 2
    assert counts["rounds"] == out.stats["rounds"]
    if every == 1:
        assert counts["discarded"] == 0  # nothing is speculated past a one-step round
    assert counts["corrected"] > 0  # 8 codes, 2 probes on a random head: rollbacks did happen


def test_verified_stops_at_eos_like_plain_greedy(tiny):
    model, path = tiny
    ids, mask = _padded([6, 6], seed=3)
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=16).tokens
    eos = int(plain[0, 5])  # a token the first sequence emits mid-way
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0).tokens
    out = generate_verified(model, ids, attention_mask=mask, config=_config(path), max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(out.tokens, ref)


def test_deferred_head_outside_the_loop_is_the_bound_route(tiny):
    """Plain generate with a deferred config: the op is not armed, so unproved rows take
    the full head in the same step (exact) and are counted as fallback."""
    model, path = tiny
    ids, mask = _padded([7])
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=8).tokens
    rt.reset_counts()
    out = generate(model, ids, attention_mask=mask, max_new_tokens=8, config=_config(path, verify_every=5)).tokens
    assert torch.equal(out, ref)
    counts = [c for c in rt.route_counts().values() if c["bound"] + c["fallback"]]
    assert len(counts) == 1 and counts[0]["bound"] + counts[0]["fallback"] == 8 and counts[0]["accepted"] == 0


def test_armed_op_emits_the_best_opened_member():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(60, 16, generator=gen)
    art = build_artifact(w, 6, seed=0)
    slack = rt.exact_slack(w, art.codebook, art.members)
    h = torch.randn(5, 16, generator=gen)
    out, proved, token = rt.exact_head(h, w, art.codebook, slack, art.members, 2, open_by="score",
                                       skip_full=torch.ones(5, dtype=torch.bool))
    assert torch.equal(out.argmax(1), token)
    top = (h @ art.codebook.T).topk(2, dim=1).indices  # opened by score: the best member of the two best codes
    for i in range(5):
        ids = art.members[top[i]].flatten()
        ids = ids[ids >= 0].long()
        assert int(token[i]) == int(ids[(h[i] @ w[ids].T).argmax()])
    assert torch.equal(token[proved], (h @ w.T).argmax(1)[proved])


def test_config_errors_name_the_key(tiny):
    model, path = tiny
    ids = torch.randint(1, 128, (1, 4))
    with pytest.raises(ConfigError, match=r"passes\.vq_logits\.verify: got mode='exact', verify='bound'"):
        generate_verified(model, ids, config=_config(path, verify="bound"))
    with pytest.raises(ConfigError, match="verify_every"):
        generate_verified(model, ids, config=_config(path, verify_every=0))
    cfg = _config(path)
    cfg["pipelines"]["vq"] = ["vq_logits", "kv_eviction"]
    with pytest.raises(ConfigError, match="kv_eviction"):
        generate_verified(model, ids, config=cfg)
    with pytest.raises(ConfigError, match="config is required"):
        generate_verified(model, ids, config=None)


@pytest.mark.model
def test_verified_tokens_identical_on_default_model(default_model, tmp_path):
    """48 greedy tokens of SmolLM2-135M: deferred verification gives the unmodified model's tokens."""
    from slimfx.compiler.cmd_calibrate import head_weight
    from slimfx.runtime.models import chat_input_ids

    model, tok = default_model
    path = rt.save_artifact(build_artifact(head_weight(model), 256, seed=0, iters=3), tmp_path / "smol.safetensors")
    ids = chat_input_ids(tok, "Explain how a bicycle works in two sentences.")
    ref = generate(model, ids, max_new_tokens=48).tokens
    rt.reset_counts()
    out = generate_verified(model, ids, config=_config(path, probes=8, verify_every=4), max_new_tokens=48)
    assert torch.equal(out.tokens, ref)
    (counts,) = [c for c in rt.route_counts().values() if c.get("rounds")]
    assert counts["bound"] + counts["accepted"] + counts["corrected"] == 47
