"""Cross-layer KV sharing (passes/kv_share): the map, the graph rewrite, the bytes, and the
tokens against an independent eager forward in which a reader attends over its owner's
keys and values."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import slimfx
from slimfx.compiler.anatomy import capture_graph, param_path
from slimfx.compiler.config import ConfigError, load_config
from slimfx.compiler.passmanager import PassContext, PassManager
from slimfx.passes.kv_share import parse_map, pattern_map, resolve_chains
from slimfx.runtime.generate import generate, get_generator
from slimfx.runtime.kv_store import KVStore
from tests.test_runtime_generate import lively_tiny

LAYERS = 4


def _config(*passes, **share):
    return {"pipelines": {"s": ["kv_share", *passes]}, "compile": {"pipeline": "s"}, "passes": {"kv_share": share}}


def shared_forward(model, ids: torch.Tensor, pairs: dict[int, int]) -> torch.Tensor:
    """Logits of a llama model in which layer r attends over layer pairs[r]'s (rotated)
    keys and values: written from the HF modules' weights, not through slimfx."""
    m = model.model
    B, T = ids.shape
    x = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(x, torch.arange(T)[None].expand(B, T))
    kv = {}
    for i, layer in enumerate(m.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        D = attn.head_dim
        q = attn.q_proj(h).view(B, T, -1, D).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kv[i] = kv[pairs[i]] if i in pairs else (k, attn.v_proj(h).view(B, T, -1, D).transpose(1, 2))
        keys, vals = kv[i]
        group = q.shape[1] // keys.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1), is_causal=True, scale=attn.scaling)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(m.norm(x))


def greedy(model, ids, steps: int, pairs: dict[int, int]) -> torch.Tensor:
    out = ids
    with torch.no_grad():
        for _ in range(steps):
            out = torch.cat([out, shared_forward(model, out, pairs)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def model():
    return lively_tiny(layers=LAYERS, seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(4))


def test_map_forms():
    assert parse_map("3:2, 5:4") == {3: 2, 5: 4}
    assert resolve_chains({5: 4, 4: 3}) == {5: 3, 4: 3}
    assert pattern_map("adjacent", 0.2, 2, 30) == {4: 3, 8: 7, 12: 11, 18: 17, 22: 21, 26: 25}  # spread evenly
    adjacent = pattern_map("adjacent", 0.3, 2, 30)
    assert len(adjacent) == 9 and all(owner == reader - 1 for reader, owner in adjacent.items())
    assert not set(adjacent) & set(adjacent.values())  # no owner is also a reader
    bottom = pattern_map("bottom", 0.3, 4, 30)
    assert len(bottom) == 9 and all(0 < reader - owner < 4 for reader, owner in bottom.items())
    assert 0 not in bottom and 29 not in bottom
    assert pattern_map("upper", 0.1, 2, 30) == {29: 28, 27: 26, 25: 24}  # MiniCache: adjacent pairs from the top down


@pytest.mark.parametrize("share, message", [
    (dict(map="3-2"), "passes.kv_share.map: got '3-2'; allowed: pairs 'reader:owner'"),
    (dict(map="2:3"), "passes.kv_share.map: layer 2 reads layer 3; allowed: an owner below its reader"),
    (dict(map="9:1"), "passes.kv_share.map: layer 9 does not exist; allowed: layers 0-3 of this model"),
    (dict(pattern="adjacent", fraction=0.9), "passes.kv_share.fraction: got 0.9"),
])
def test_bad_maps_are_one_line_config_errors(model, ids, share, message):
    with pytest.raises(ConfigError) as err:
        generate(model, ids, max_new_tokens=2, config=_config(**share))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_owner_removed_by_layer_skip_is_refused(model, ids):
    cfg = _config("layer_skip", map="2:1")
    cfg["passes"]["layer_skip"] = {"blocks": [1]}
    with pytest.raises(ConfigError, match="owner layer 1 .of reader 2. is removed by layer_skip"):
        generate(model, ids, max_new_tokens=2, config=cfg)


@pytest.mark.parametrize("merge", ["none", "minicache"])
def test_a_reader_removed_by_layer_skip_drops_out_of_the_map(model, ids, merge):
    """Skipping a reader is fine (its owner keeps its KV as it is); skipping an owner is refused (above)."""
    cfg = _config("layer_skip", map="3:2", merge=merge)
    cfg["passes"]["layer_skip"] = {"blocks": [3]}
    generate(model, ids, max_new_tokens=2, capacity=64, config=cfg)
    store = get_generator(model, 2, 64, config=cfg).store
    assert sorted(store.sites) == [0, 1, 2] and store.sites[2].layout == "plain" and store.sites[2].owner is None


def test_graph_loses_the_readers_kv_projections_and_binds_no_store_for_them(model, ids):
    gm = capture_graph(model, input_ids=ids, position_ids=torch.arange(10).expand(2, 10), use_cache=False)
    store = KVStore(2, 32)
    raw = _config(map="2:1,3:1")
    raw["pipelines"]["s"].append("kv_runtime")
    raw["passes"]["kv_runtime"] = {"store": store.id}
    ctx = PassContext(config=load_config(raw), example_inputs=[])
    ctx.refresh_anatomy(gm)
    results = {r.name: r for r in PassManager(ctx.config).run(gm, ctx)}
    # The weights the graph still reads (a weight read by no node is no longer a graph input's use).
    read = {param_path(n) for n in gm.graph.nodes if n.op in ("get_attr", "placeholder") and n.users}
    for layer in (2, 3):
        assert f"model.layers.{layer}.self_attn.k_proj.weight" not in read and f"model.layers.{layer}.self_attn.v_proj.weight" not in read
        assert f"model.layers.{layer}.self_attn.q_proj.weight" in read
    assert "model.layers.1.self_attn.k_proj.weight" in read
    assert results["kv_share"].nodes_rewritten == 2 and results["kv_runtime"].nodes_rewritten == LAYERS
    assert store.sites[2].owner == 1 and store.sites[3].owner == 1 and store.sites[2].nbytes() == 0
    layouts = [n.args[-1] for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.slimfx.attention.default]
    assert sorted(layouts) == ["plain", "plain", "read/plain", "read/plain"]
    _, H, _, D = store.sites[0].k.shape
    assert results["kv_share"].details["footprint"] == {"kv_bytes_per_token": 2 * (2 * H * D * 4)}  # two float32 owners


def test_tokens_match_an_eager_forward_reading_the_owners_kv_and_bytes_fall_by_the_share(model, ids):
    pairs = {2: 1, 3: 1}
    tokens, stats = generate(model, ids, max_new_tokens=8, capacity=64, config=_config(map="2:1,3:1"))
    _, full = generate(model, ids, max_new_tokens=8, capacity=64)
    assert torch.equal(tokens, greedy(model, ids, 8, pairs))
    assert not torch.equal(tokens, generate(model, ids, max_new_tokens=8, capacity=64)[0])  # sharing changed something
    assert stats["kv_bytes"] == full["kv_bytes"] * (LAYERS - len(pairs)) // LAYERS


def test_an_empty_map_is_the_unmodified_model(model, ids):
    tokens, stats = generate(model, ids, max_new_tokens=8, capacity=64, config=_config(map="none"))
    ref, ref_stats = generate(model, ids, max_new_tokens=8, capacity=64)
    assert torch.equal(tokens, ref) and stats["kv_bytes"] == ref_stats["kv_bytes"]


def test_owner_evicted_once_and_readers_follow_it(model, ids):
    slimfx.clear_reports()
    cfg = _config("kv_eviction", map="2:1,3:1")
    cfg["passes"]["kv_eviction"] = {"policy": "h2o", "budget": 12, "n_sink": 2, "window": 4}
    tokens, stats = generate(model, ids, max_new_tokens=8, capacity=64, config=cfg)
    store = get_generator(model, 2, 64, config=cfg).store
    assert [store.sites[i].layout for i in range(LAYERS)] == ["evict/h2o/2/4/0.0/0"] * 2 + ["read/evict/h2o/2/4/0.0/0"] * 2
    assert store.sites[2].tiers is store.sites[1].tiers and stats["kv_bytes"] == sum(store.sites[i].nbytes() for i in (0, 1))
    notes = [n for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" for n in r.notes]
    assert any("reads site 1's cache: evicted there" in n for n in notes)


def test_owner_quantized_once_and_readers_read_its_codes(model, ids):
    cfg = _config("kv_quantize", map="3:2")
    cfg["passes"]["kv_quantize"] = {"format": "int8", "residual": 4, "n_sink": 2}
    tokens, _ = generate(model, ids, max_new_tokens=8, capacity=64, config=cfg)
    store = get_generator(model, 2, 64, config=cfg).store
    assert store.sites[3].layout == "read/" + store.sites[2].layout and store.sites[2].layout.startswith("kvq/int8")
    # int8 KV is close to full precision: the tokens equal the shared model's at full precision here.
    assert torch.equal(tokens, greedy(model, ids, 8, {3: 2}))


def test_plan_is_validated_and_refused_for_another_model(model, ids, tmp_path):
    from slimfx.passes.kv_share.plan import PLAN_KIND, write_plan

    plan = {"kind": PLAN_KIND, "version": 1, "method": "kvsharer", "map": {"3": 1}, "calibration": {},
            "model": {"blocks": LAYERS, "hidden": 64, "vocab": 128, "fingerprint": "000000000000"}}
    path = write_plan(plan, tmp_path / "share.json")
    cfg = _config(plan="share")
    cfg["artifacts"] = {"share": str(path)}
    with pytest.raises(ConfigError, match="the plan was made for another model"):
        generate(model, ids, max_new_tokens=2, config=cfg)
    (tmp_path / "bad.json").write_text(json.dumps(dict(plan, map={"1": 3})))
    cfg["artifacts"] = {"share": str(tmp_path / "bad.json")}
    with pytest.raises(Exception, match="field map must pair layers"):
        generate(model, ids, max_new_tokens=2, config=cfg)


def test_kvsharer_calibration_writes_a_plan_the_pass_applies(model, ids, tmp_path):
    from slimfx.calibrate.kv_share import calibrate_share, ranked_pairs
    from slimfx.passes.kv_share.plan import read_plan, write_plan

    calibration = torch.randint(1, 128, (1, 48), generator=torch.Generator().manual_seed(5))
    plan = calibrate_share(model, calibration, count=2, threshold=0.0, progress=False)
    pairs = {int(r): o for r, o in plan["map"].items()}
    # Threshold 0 accepts the first admissible pairs in order of dissimilarity.
    tried = plan["calibration"]["tried"]
    assert [t["distance"] for t in tried] == sorted((t["distance"] for t in tried), reverse=True)
    assert len(pairs) == 2 and not set(pairs) & set(pairs.values()) and all(o < r for r, o in pairs.items())
    strict = calibrate_share(model, calibration, count=2, threshold=1.0, progress=False)
    assert strict["map"] == {} and all(t["similarity"] < 1.0 for t in strict["calibration"]["tried"])
    path = write_plan(plan, tmp_path / "share.json")
    assert read_plan(path)["map"] == plan["map"]
    cfg = _config(plan="share")
    cfg["artifacts"] = {"share": str(path)}
    tokens, _ = generate(model, ids, max_new_tokens=6, capacity=64, config=cfg)
    assert torch.equal(tokens, greedy(model, ids, 6, pairs))
    # `slimfx inspect --plan` shows it, for this model only.
    from slimfx.compiler.anatomy import analyze
    from slimfx.compiler.cmd_inspect import _format_plan, _read_plan

    anatomy = analyze(capture_graph(model, input_ids=ids[:1], use_cache=False))
    shown = _format_plan(str(path), _read_plan(str(path)), model, anatomy)
    assert shown.startswith(f"KV-sharing plan (kvsharer): 2 of {LAYERS} layers read another's KV: ")
    other = lively_tiny(layers=LAYERS, seed=9)
    with pytest.raises(ConfigError, match="the plan was made for another model"):
        _format_plan(str(path), _read_plan(str(path)), other, analyze(capture_graph(other, input_ids=ids[:1], use_cache=False)))
    # The map a configuration gives this model, as `slimfx inspect --config` prints it.
    from slimfx.passes.kv_share import describe_config

    assert describe_config(load_config(cfg), model, anatomy).startswith("KV sharing (plan): 2 of 4 layers read the KV of")
    merged = describe_config(load_config(_config(pattern="upper", fraction=0.5, merge="minicache")), model, anatomy)
    assert merged == "KV sharing (pattern): 2 of 4 layers merge their KV with (MiniCache) an earlier layer: 1 -> 0, 3 -> 2 (reader -> owner)"
    means = {(layer, which): torch.full((2,), float(layer)) for layer in range(3) for which in (0, 1)}
    assert [(r, o) for r, o, _ in ranked_pairs(means, [0, 1, 2])] == [(2, 0), (1, 0), (2, 1)]


def test_minicache_calibration_picks_the_most_similar_disjoint_adjacent_pairs(model, ids, tmp_path):
    from slimfx.calibrate.kv_share import adjacent_similarity, best_disjoint_pairs, calibrate_minicache
    from slimfx.passes.kv_share.plan import format_plan, read_plan, write_plan

    calibration = torch.randint(1, 128, (1, 48), generator=torch.Generator().manual_seed(5))
    plan = calibrate_minicache(model, calibration, count=2)
    scored = {(p["reader"], p["owner"]): p["similarity"] for p in plan["calibration"]["pairs"]}
    assert set(scored) == {(1, 0), (2, 1), (3, 2)}
    # Two disjoint pairs out of 4 layers can only be (1, 0) and (3, 2).
    assert plan["map"] == {"1": 0, "3": 2} and plan["method"] == "minicache"
    one = calibrate_minicache(model, calibration, count=1)
    best = max(scored, key=scored.get)
    assert one["map"] == {str(best[0]): best[1]}
    path = write_plan(plan, tmp_path / "merge.json")
    assert read_plan(path)["map"] == plan["map"] and "KV cosine similarity of the chosen pairs" in format_plan(plan)
    cfg = _config(plan="merge", merge="minicache")
    cfg["artifacts"] = {"merge": str(path)}
    tokens, stats = generate(model, ids, max_new_tokens=4, capacity=64, config=cfg)
    assert tokens.shape == (2, 4)
    # The score is the mean cosine similarity of keys and of values at the same token.
    k0, k1 = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    outputs = {(0, 0): k0, (0, 1): k0, (1, 0): k1, (1, 1): -k1}
    assert adjacent_similarity(outputs, [0, 1])[0][2] == pytest.approx(0.0, abs=1e-6)
    # The best total, not the best pair first: (2, 1) alone would block both neighbours.
    scored_by_hand = [(1, 0, 0.5), (2, 1, 0.9), (3, 2, 0.5), (4, 3, 0.05)]
    assert best_disjoint_pairs(scored_by_hand, 2) == {1: 0, 3: 2}
    assert best_disjoint_pairs(scored_by_hand, 1) == {2: 1}


# ----------------------------------------------------------------------------- MiniCache merging


def _merge_ref(ka, va, kb, vb, threshold, kept, slots):
    """Both layers' vectors of a pair after merging, token by token [B, H, n, D]: magnitude x
    normalised sum of the unit vectors, or both whole when their angle exceeds `threshold`
    and the (sequence, head) still has one of its `slots` free. `kept` [B, H] counts them."""
    out_a, out_b = [ka.clone(), va.clone()], [kb.clone(), vb.clone()]
    for t in range(ka.shape[2]):
        unit = [x[:, :, t] / x[:, :, t].norm(dim=-1, keepdim=True) for x in (ka, va, kb, vb)]
        cos = [torch.nn.functional.cosine_similarity(unit[i], unit[i + 2], dim=-1) for i in (0, 1)]
        far = torch.maximum(*(torch.arccos(c.clamp(-1, 1)) / torch.pi for c in cos)) > threshold
        apart = far & (kept < slots)
        kept += apart.long()
        for i, (xa, xb) in enumerate(((ka, kb), (va, vb))):
            d = unit[i] + unit[i + 2]
            d = d / d.norm(dim=-1, keepdim=True)
            merged_a = xa[:, :, t].norm(dim=-1, keepdim=True) * d
            merged_b = xb[:, :, t].norm(dim=-1, keepdim=True) * d
            out_a[i][:, :, t] = torch.where(apart[..., None], xa[:, :, t], merged_a)
            out_b[i][:, :, t] = torch.where(apart[..., None], xb[:, :, t], merged_b)
    return out_a, out_b


@torch.no_grad()
def minicache_greedy(model, ids, steps: int, pairs: dict[int, int], threshold: float, slots: int) -> torch.Tensor:
    """Greedy tokens of a llama model whose pairs (reader: owner) merge their KV as MiniCache
    does: the prompt attends exactly and is merged afterwards; a decode token is merged
    before the upper layer attends (the lower layer sees its own raw token). Written from
    the HF modules' weights, with per-layer lists of reconstructed keys, not through slimfx."""
    m = model.model
    B = ids.shape[0]
    lower = {o: r for r, o in pairs.items()}
    cache: dict[int, list] = {}
    kept = {r: 0 for r in pairs}

    def step(tokens, start):
        n = tokens.shape[1]
        x = m.embed_tokens(tokens)
        pos = torch.arange(start, start + n)
        cos, sin = m.rotary_emb(x, pos[None].expand(B, n))
        raw = {}
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            D = attn.head_dim
            q = attn.q_proj(h).view(B, n, -1, D).transpose(1, 2)
            k = attn.k_proj(h).view(B, n, -1, D).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            v = attn.v_proj(h).view(B, n, -1, D).transpose(1, 2)
            old = cache.get(i)
            if i in pairs and n == 1:  # decode, upper layer: merge first, attend over merged
                if isinstance(kept[i], int):
                    kept[i] = torch.zeros(k.shape[:2], dtype=torch.long)
                (a_k, a_v), (b_k, b_v) = _merge_ref(*raw[pairs[i]], k, v, threshold, kept[i], slots)
                cache[pairs[i]] = [torch.cat([c, x_], 2) for c, x_ in zip(cache[pairs[i]], (a_k, a_v))]
                cache[i] = [torch.cat([c, x_], 2) for c, x_ in zip(cache[i], (b_k, b_v))]
                keys, vals = cache[i]
            else:
                keys, vals = (k, v) if old is None else (torch.cat([old[0], k], 2), torch.cat([old[1], v], 2))
                if i in lower:
                    raw[i] = (k, v)
                elif i in pairs:  # prefill, upper layer: merge the chunk after attending
                    if isinstance(kept[i], int):
                        kept[i] = torch.zeros(k.shape[:2], dtype=torch.long)
                    (a_k, a_v), (b_k, b_v) = _merge_ref(*raw[pairs[i]], k, v, threshold, kept[i], slots)
                    prev = cache.get(pairs[i])
                    cache[pairs[i]] = [a if prev is None else torch.cat([c, a], 2) for c, a in zip(prev or (None, None), (a_k, a_v))]
                    cache[i] = [b if old is None else torch.cat([c, b], 2) for c, b in zip(old or (None, None), (b_k, b_v))]
                else:
                    cache[i] = [keys, vals]
            group = q.shape[1] // keys.shape[1]
            mask = torch.arange(keys.shape[2])[None, :] <= pos[:, None]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1), attn_mask=mask, scale=attn.scaling)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(m.norm(x))[:, -1].argmax(-1, keepdim=True)

    out = [step(ids, 0)]
    for s in range(steps - 1):
        out.append(step(out[-1], ids.shape[1] + s))
    return torch.cat(out, dim=1)


def test_merged_pair_matches_a_minicache_reference_and_holds_about_half_the_pair(model, ids):
    """Threshold 0.45 keeps apart about half of the tiny model's tokens (random weights:
    angles near 0.5); 4 keep slots fill up during the prompt, so both paths run."""
    cfg = _config(map="3:2", merge="minicache", merge_threshold=0.45, keep_fraction=4 / 64)
    tokens, stats = generate(model, ids, max_new_tokens=8, capacity=64, config=cfg)
    assert torch.equal(tokens, minicache_greedy(model, ids, 8, {3: 2}, 0.45, 4))
    assert not torch.equal(tokens, minicache_greedy(model, ids, 8, {3: 2}, 1.0, 0))  # kept tokens mattered
    store = get_generator(model, 2, 64, config=cfg).store
    pair, plain = store.sites[2], store.sites[0]
    assert (pair.layout, store.sites[3].layout, store.sites[3].nbytes()) == ("minicache/0", "minicache/1/0.45", 0)
    keep = pair.tiers["keep"]
    assert keep.capacity == 4 and int((keep.slot_pos >= 0).sum()) == keep.slot_pos.numel()  # every keep slot used
    B, H, C, D = pair.k.shape
    e = pair.k.element_size()
    expected = B * H * (C * (2 * D * e + 4 * 4 + 4) + 4 * (4 * D * e + 4))  # directions, 4 magnitudes, positions; keep tier
    assert pair.nbytes() == expected and stats["kv_bytes"] == 2 * plain.nbytes() + expected
    assert pair.nbytes() < plain.nbytes() * 2 * 0.8


def test_merged_pair_keeps_both_layers_kv_projections(model, ids):
    gm = capture_graph(model, input_ids=ids, position_ids=torch.arange(10).expand(2, 10), use_cache=False)
    store = KVStore(2, 32)
    raw = _config("kv_runtime", map="3:2", merge="minicache")
    raw["passes"]["kv_runtime"] = {"store": store.id}
    ctx = PassContext(config=load_config(raw), example_inputs=[])
    ctx.refresh_anatomy(gm)
    results = {r.name: r for r in PassManager(ctx.config).run(gm, ctx)}
    read = {param_path(n) for n in gm.graph.nodes if n.op in ("get_attr", "placeholder") and n.users}
    assert {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (2, 3) for p in "kv"} <= read
    layouts = sorted(n.args[-1] for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.slimfx.attention.default)
    assert layouts == ["minicache/0", "minicache/1/0.6", "plain", "plain"]
    assert results["kv_share"].bytes_saved == 2 * store.sites[0].nbytes() - store.sites[2].nbytes() > 0
    _, H, C, D = store.sites[2].k.shape
    keep = store.sites[2].tiers["keep"].capacity  # ceil(0.05 x 32) = 2
    pair = (H * C * (2 * D * 4 + 4 * 4) + H * keep * 4 * D * 4) / C
    assert results["kv_share"].details["footprint"] == {"kv_bytes_per_token": round(2 * (2 * H * D * 4) + pair)}


@pytest.mark.parametrize("extra, share, message", [
    ((), dict(map="3:1,2:1", merge="minicache"), "passes.kv_share.map: layer 1 is merged with 2 readers"),
    (("kv_eviction",), dict(map="3:2", merge="minicache"), "passes.kv_share.merge: 'minicache' with kv_eviction in the pipeline"),
    (("kv_quantize",), dict(map="3:2", merge="minicache"), "passes.kv_share.merge: 'minicache' with kv_quantize in the pipeline"),
])
def test_merge_refusals_are_one_line_config_errors(model, ids, extra, share, message):
    with pytest.raises(ConfigError) as err:
        generate(model, ids, max_new_tokens=2, config=_config(*extra, **share))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
