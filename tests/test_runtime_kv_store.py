"""KV store, the slimfx::attention op and the kv_runtime pass (structure and numerics)."""

from __future__ import annotations

import pytest
import torch

import slimfx.runtime.attention_op  # noqa: F401  registers torch.ops.slimfx.attention
from slimfx.compiler.anatomy import capture_graph, is_sdpa
from slimfx.compiler.config import load_config
from slimfx.compiler.passmanager import PassContext, PassManager
from slimfx.runtime.attention_op import attention_ref, write_tokens
from slimfx.runtime.kv_store import KVStore, KVStoreError, Tier, get_store, plain_site, plain_tier
from slimfx.runtime.models import tiny_model


def test_store_allocates_sites_on_demand_with_per_site_capacity():
    store = KVStore(2, 16, capacities={1: 8})
    a = store.site(0, n_kv_heads=2, head_dim=4)
    b = store.site(1, n_kv_heads=2, head_dim=4)
    assert a.k.shape == (2, 2, 16, 4) and b.k.shape == (2, 2, 8, 4)
    assert (a.slot_pos == -1).all() and a.slot_pos.dtype == torch.int32
    assert store.site(0, 2, 4) is a
    assert store.nbytes() == a.nbytes() + b.nbytes() > 0
    assert get_store(store.id) is store


def test_store_reset_keeps_addresses_of_every_tier():
    store = KVStore(1, 8)
    cache = store.site(0, 1, 4)
    extra = plain_tier(1, 1, 5, 4, dtype=torch.float32, device="cpu", scores=True)
    store.relayout(0, "plain", {"main": cache.main, "extra": extra})
    cache.slot_pos.fill_(3)
    extra["slot_pos"].fill_(2)
    extra["scores"].fill_(1.0)
    store.seen.fill_(5)
    ptrs = (cache.slot_pos.data_ptr(), extra["scores"].data_ptr(), store.seen.data_ptr())
    store.reset()
    assert (cache.slot_pos == -1).all() and (extra["slot_pos"] == -1).all() and (extra["scores"] == 0).all() and (store.seen == 0).all()
    assert ptrs == (cache.slot_pos.data_ptr(), extra["scores"].data_ptr(), store.seen.data_ptr())
    assert cache.nbytes() == cache.main.nbytes() + extra.nbytes() and cache.capacity == 8


def test_rollback_refuses_a_tier_that_cannot_forget_exactly():
    store = KVStore(1, 8)
    cache = store.site(0, 1, 4)
    store.relayout(0, "plain", {"main": cache.main, "low": Tier({"slot_pos": torch.full((1, 1, 4), -1, dtype=torch.int32)}, exact_rollback=False)})
    with pytest.raises(KVStoreError, match="site 0's 'low' tier"):
        store.rollback(torch.zeros(1, dtype=torch.int64))


def test_shared_site_reads_owner_buffers_and_holds_no_memory():
    store = KVStore(1, 8)
    store.share(reader=2, owner=0)
    owner = store.site(0, 2, 4)
    reader = store.site(2, 2, 4)
    assert reader.k is owner.k and reader.owner == 0 and reader.nbytes() == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0, capacity=4), "batch"),
    (dict(batch=1, capacity=0), "capacity"),
    (dict(batch=1, capacity=4, capacities={0: -1}), r"capacities\[0\]"),
])
def test_store_rejects_bad_sizes(kwargs, match):
    with pytest.raises(KVStoreError, match=match):
        KVStore(**kwargs)


def test_store_rejects_head_mismatch_and_bad_sharing():
    store = KVStore(1, 4)
    store.site(0, 2, 4)
    with pytest.raises(KVStoreError, match="site 0"):
        store.site(0, 3, 4)
    with pytest.raises(KVStoreError, match="after owner"):
        store.share(reader=0, owner=1)


def test_write_tokens_places_tokens_by_position_and_pads_mark_empty():
    B, H, T, D, C = 2, 2, 5, 3, 8
    k = torch.randn(B, H, T, D)
    kc, vc = torch.zeros(B, H, C, D), torch.zeros(B, H, C, D)
    sp = torch.full((B, H, C), -1, dtype=torch.int32)
    positions = torch.tensor([[0, 1, 2, 3, 4], [-2, -1, 0, 1, 2]])  # sequence 1 has two pads
    write_tokens(k, k, positions, kc, vc, sp)
    assert torch.equal(kc[0, :, :5], k[0])
    assert sp[0, 0].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert sp[1, 0].tolist() == [0, 1, 2, -1, -1, -1, -1, -1]  # pads went to slots 6, 7 as empty
    assert torch.equal(kc[1, :, :3], k[1, :, 2:])


def test_attention_op_decode_matches_sdpa_over_history():
    """Prefill 6 tokens then decode 1, through the op: equals causal SDPA over all 7."""
    B, Hq, Hkv, D, C = 1, 4, 2, 8, 16
    q, k, v = torch.randn(B, Hq, 7, D), torch.randn(B, Hkv, 7, D), torch.randn(B, Hkv, 7, D)
    bufs = plain_site(B, Hkv, C, D).buffers()
    pos = torch.arange(7)[None]
    scale = D ** -0.5
    first = torch.ops.slimfx.attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], pos[:, :6], bufs, scale, "plain")
    last = torch.ops.slimfx.attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], pos[:, 6:], bufs, scale, "plain")
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(torch.cat([first, last], 2), full, atol=1e-5)


def test_attention_op_registration_passes_opcheck():
    B, Hq, Hkv, D, C = 1, 4, 2, 8, 12
    bufs = [torch.randn(B, Hkv, C, D), torch.randn(B, Hkv, C, D), torch.randint(-1, 3, (B, Hkv, C), dtype=torch.int32)]
    args = (torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D), torch.tensor([[3]]), bufs, D ** -0.5, "plain")
    torch.library.opcheck(torch.ops.slimfx.attention.default, args, test_utils=("test_schema", "test_faketensor"))


def test_attention_op_names_an_unknown_layout_and_a_wrong_buffer_count():
    B, Hq, Hkv, D, C = 1, 2, 1, 4, 6
    inputs = (torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D), torch.tensor([[0]]))
    bufs = plain_site(B, Hkv, C, D).buffers()
    with pytest.raises(ValueError, match="no variant 'nosuch' is registered; registered: .*plain"):
        torch.ops.slimfx.attention(*inputs, bufs, 0.5, "nosuch/1")
    with pytest.raises(ValueError, match="got 2 buffers; allowed: 3 .main.k, main.v, main.slot_pos."):
        torch.ops.slimfx.attention(*inputs, bufs[:2], 0.5, "plain")


def test_attention_ref_is_the_op_on_cpu():
    B, Hq, Hkv, D, C = 2, 2, 1, 4, 6
    inputs = (torch.randn(B, Hq, 3, D), torch.randn(B, Hkv, 3, D), torch.randn(B, Hkv, 3, D), torch.tensor([[0, 1, 2], [-1, 0, 1]]))
    site_a, site_b = plain_site(B, Hkv, C, D), plain_site(B, Hkv, C, D)
    out_a = torch.ops.slimfx.attention(*inputs, site_a.buffers(), D ** -0.5, "plain")
    out_b = attention_ref(*inputs, site_b)
    assert torch.equal(out_a, out_b) and all(torch.equal(x, y) for x, y in zip(site_a.buffers(), site_b.buffers()))


def _runtime_config(store_id):
    return load_config({"pipelines": {"rt": ["kv_runtime"]}, "compile": {"pipeline": "rt"}, "passes": {"kv_runtime": {"store": store_id}}})


def test_pass_replaces_every_sdpa_with_one_op_bound_to_the_store():
    model = tiny_model("llama_gqa", layers=3)
    ids = torch.randint(0, 128, (2, 5))
    gm = capture_graph(model, input_ids=ids, position_ids=torch.arange(5).expand(2, 5), use_cache=False)
    store = KVStore(2, 32)
    ctx = PassContext(config=_runtime_config(store.id), example_inputs=[])
    ctx.refresh_anatomy(gm)
    [result] = PassManager(ctx.config).run(gm, ctx)
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.slimfx.attention.default]
    assert result.applied and result.sites_matched == 3 and result.nodes_rewritten == 3
    assert len(ops) == 3 and not any(is_sdpa(n) for n in gm.graph.nodes)
    assert sorted(store.sites) == [0, 1, 2] and store.sites[0].k.shape == (2, 2, 32, 16)
    # k/v enter the op at kv-head width (HF's repeat_kv bypassed).
    assert all(op.args[1].meta["example_value"].shape[1] == 2 for op in ops)
    assert ctx.state["kv_stores"][store.id] is store


def test_pass_refuses_a_graph_with_its_own_cache_and_skips_without_store():
    """Under the runtime a graph never carries a cache of the model's own: one that does
    (the model called with use_cache=True, or a graph the anatomy misread) is refused,
    never run beside the store."""
    from slimfx.compiler.errors import UsageError

    model = tiny_model("llama_gqa")
    ids = torch.randint(0, 128, (1, 4))
    gm = capture_graph(model, input_ids=ids, use_cache=True)
    store = KVStore(1, 16)
    ctx = PassContext(config=_runtime_config(store.id), example_inputs=[])
    ctx.refresh_anatomy(gm)
    with pytest.raises(UsageError, match=r"bound 0 of 2 attention sites \(sites 0,1: the graph keeps a concat KV cache of its own"):
        PassManager(ctx.config).run(gm, ctx)
    assert not store.sites
    ctx = PassContext(config=_runtime_config("no-such-store"), example_inputs=[])
    ctx.refresh_anatomy(gm)
    [result] = PassManager(ctx.config).run(gm, ctx)
    assert not result.applied and "no KV store" in result.notes[0]
