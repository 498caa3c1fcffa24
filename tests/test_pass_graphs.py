"""Before/after graph structure for every registered pass (compiler/registry.py PASS_MODULES).

For each pass, on a tiny random-weight model: count what the pass matches in the captured
graph before it runs and what replaced it after, and check that the PassResult's
sites_matched / nodes_rewritten agree with those counts. Helpers come from the tests
that cover each pass in depth (imported, not copied)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimfx.runtime.attention_op  # noqa: F401  registers torch.ops.slimfx.attention
from slimfx.compiler.anatomy import capture_graph, is_linear, is_sdpa
from slimfx.compiler.config import load_config
from slimfx.compiler.passmanager import PassContext, PassManager
from slimfx.compiler.registry import PASS_MODULES, registered_passes
from slimfx.passes import fold_noop_casts
from slimfx.runtime.kv_store import KVStore
from slimfx.runtime.models import tiny_model

# tests/ is on sys.path (pytest's default prepend import mode, no tests/__init__.py).
from test_eviction_pass import _config as eviction_config
from test_kv_quant import _config as kv_quant_config
from test_layer_skip import LINEARS_PER_BLOCK, _block_of, compile_skip, graph_structure, lively
from test_quant_pass import QOPS
from test_quant_pass import _ops as quant_ops
from test_quant_pass import _run as run_quantize
from test_runtime_kv_store import _runtime_config
from test_vq_pass import _artifact as vq_artifact
from test_vq_pass import _compile as vq_compile
from test_vq_pass import _ops as vq_ops

B, T, CAPACITY = 2, 5, 32


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _linears(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear)


def _sdpa(gm) -> int:
    return sum(1 for n in gm.graph.nodes if is_sdpa(n))


def _runtime_graph(layers: int = 2):
    """A use_cache=False graph of a tiny GQA Llama, as the runtime captures it."""
    model = tiny_model("llama_gqa", layers=layers)
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
    return capture_graph(model, input_ids=ids, position_ids=torch.arange(T).expand(B, T), use_cache=False)


def _run_pipeline(gm, raw_config: dict):
    config = load_config(raw_config) if isinstance(raw_config, dict) else raw_config
    ctx = PassContext(config=config, example_inputs=[])
    ctx.refresh_anatomy(gm)
    return {r.name: r for r in PassManager(ctx.config).run(gm, ctx)}


def _with_runtime(raw: dict, store_id: str) -> dict:
    """`raw` (one KV pass) with kv_runtime bound to `store_id` added to its pipeline."""
    [(name, steps)] = raw["pipelines"].items()
    raw["pipelines"][name] = ["kv_runtime", *steps]
    raw["passes"]["kv_runtime"] = {"store": store_id}
    return raw


def test_every_registered_pass_has_a_graph_test_here():
    names = {m.rsplit(".", 1)[1] for m in PASS_MODULES}
    assert set(registered_passes()) == names
    covered = {"fold_noop_casts", "kv_runtime", "kv_eviction", "kv_quantize", "quantize", "vq_logits", "layer_skip", "kv_share"}
    assert names == covered, f"a new pass needs a before/after graph test: {sorted(names - covered)}"


# ----------------------------------------------------------------------------- fold_noop_casts


def test_fold_noop_casts_removes_exactly_the_noop_casts():
    gm = _runtime_graph()
    casts_before = [n.name for n in gm.graph.nodes if fold_noop_casts._is_noop_cast(n)]
    methods_before = sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target in fold_noop_casts._CAST_METHODS)
    nodes_before = len(gm.graph.nodes)
    linears, sdpa = _linears(gm), _sdpa(gm)
    assert casts_before  # fp32 RMSNorm's .to(float32)/.to(input_dtype) are identities
    results = _run_pipeline(gm, {"pipelines": {"f": ["fold_noop_casts"]}, "compile": {"pipeline": "f"}})
    result = results["fold_noop_casts"]
    names_after = {n.name for n in gm.graph.nodes}
    assert not any(fold_noop_casts._is_noop_cast(n) for n in gm.graph.nodes)
    assert not names_after & set(casts_before)
    methods_after = sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target in fold_noop_casts._CAST_METHODS)
    assert methods_before - methods_after == len(casts_before)  # only the no-op ones went
    assert len(gm.graph.nodes) == nodes_before - len(casts_before)
    assert (_linears(gm), _sdpa(gm)) == (linears, sdpa)  # nothing else touched
    assert result.applied and result.sites_matched == result.nodes_rewritten == len(casts_before)


# ----------------------------------------------------------------------------- kv_runtime


def test_kv_runtime_turns_each_sdpa_into_one_attention_op():
    gm = _runtime_graph(layers=2)
    sdpa_before, linears_before = _sdpa(gm), _linears(gm)
    assert sdpa_before == 2 and _count(gm, torch.ops.slimfx.attention.default) == 0
    store = KVStore(B, CAPACITY)
    result = _run_pipeline(gm, _runtime_config(store.id))["kv_runtime"]
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.slimfx.attention.default]
    assert len(ops) == sdpa_before and _sdpa(gm) == 0
    assert sorted(n.meta["slimfx_site"] for n in ops) == [0, 1]
    assert _linears(gm) == linears_before
    assert result.applied and result.sites_matched == result.nodes_rewritten == sdpa_before
    assert sorted(store.sites) == [0, 1]


# ----------------------------------------------------------------------------- kv_eviction


def _layouts(gm) -> list[str]:
    return [n.args[-1] for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.slimfx.attention.default]


def test_kv_eviction_gives_each_attention_op_the_evict_layout():
    gm = _runtime_graph(layers=2)
    sdpa_before = _sdpa(gm)
    store = KVStore(B, CAPACITY)
    raw = _with_runtime(eviction_config(policy="h2o", budget=16, n_sink=2, window=4), store.id)
    results = _run_pipeline(gm, raw)
    assert list(results) == ["kv_runtime", "kv_eviction"]
    runtime, evict = results["kv_runtime"], results["kv_eviction"]
    assert _layouts(gm) == ["evict/h2o/2/4/0.0/0"] * 2 and _sdpa(gm) == 0
    n_evict = len(_layouts(gm))
    # Each op reads the relaid-out site: k, v, slot_pos and the policy's scores, at the budget.
    op = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.slimfx.attention.default)
    assert [b.target for b in op.args[4]] == [f"_slimfx_kv{op.meta['slimfx_site']}_main_{f}" for f in ("k", "v", "slot_pos", "scores")]
    assert runtime.nodes_rewritten == evict.sites_matched == 2  # eviction matched what kv_runtime made
    assert evict.applied and evict.nodes_rewritten == n_evict and evict.bytes_saved > 0
    assert {i: c.capacity for i, c in store.sites.items()} == {0: 16, 1: 16}


def test_kv_eviction_budget_beyond_the_store_rewrites_nothing():
    gm = _runtime_graph(layers=2)
    store = KVStore(B, CAPACITY)
    results = _run_pipeline(gm, _with_runtime(eviction_config(policy="h2o", budget=CAPACITY, decode_budget=8, n_sink=2, window=4), store.id))
    evict = results["kv_eviction"]
    assert not evict.applied and evict.sites_matched == 2 and evict.nodes_rewritten == 0
    assert _layouts(gm) == ["plain", "plain"]


def test_kv_eviction_tidaldecode_wires_the_selection_buffer_into_the_following_ops():
    """The graph stays static: the following site's op takes the selection site's buffer of
    chosen positions as one of its inputs (the same tensor, bound, never copied)."""
    gm = _runtime_graph(layers=3)
    store = KVStore(B, CAPACITY)
    results = _run_pipeline(gm, _with_runtime(eviction_config(policy="tidaldecode", budget=8, select_layers=[1]), store.id))
    assert results["kv_eviction"].nodes_rewritten == 2
    assert _layouts(gm) == ["plain", "tidal/select/8", "tidal/follow/8"]
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.slimfx.attention.default]
    buffers = [[getattr(gm, b.target) for b in n.args[4]] for n in ops]
    chosen = store.sites[1].tiers["chosen"]["slot_pos"]
    assert len(buffers[0]) == 3 and buffers[1][-1] is chosen and buffers[2][-1] is chosen
    assert buffers[2][0] is store.sites[2].k and buffers[2][0] is not buffers[1][0]  # each layer reads its own keys


# ----------------------------------------------------------------------------- kv_quantize


def test_kv_quantize_gives_each_attention_op_the_kvq_layout():
    gm = _runtime_graph(layers=2)
    sdpa_before = _sdpa(gm)
    store = KVStore(B, CAPACITY)
    results = _run_pipeline(gm, _with_runtime(kv_quant_config(format="int8", residual=0, n_sink=4), store.id))
    assert list(results) == ["kv_runtime", "kv_quantize"]
    kvq = results["kv_quantize"]
    assert _layouts(gm) == ["kvq/int8/1/0/4"] * sdpa_before
    assert kvq.applied and kvq.sites_matched == kvq.nodes_rewritten == sdpa_before
    assert kvq.details["formats"] == {0: "int8", 1: "int8"}
    assert all(getattr(gm, f"_slimfx_kv{i}_main_k").dtype == torch.int8 for i in (0, 1))
    assert all(getattr(gm, f"_slimfx_kv{i}_full_k").dtype == torch.float32 for i in (0, 1))


# ----------------------------------------------------------------------------- kv_share


def test_kv_share_binds_the_reader_to_its_owner_and_drops_its_kv_projections():
    gm = _runtime_graph(layers=2)
    linears_before = _linears(gm)
    store = KVStore(B, CAPACITY)
    raw = {"pipelines": {"s": ["kv_share", "kv_runtime"]}, "compile": {"pipeline": "s"},
           "passes": {"kv_share": {"map": "1:0"}, "kv_runtime": {"store": store.id}}}
    results = _run_pipeline(gm, raw)
    assert list(results) == ["kv_share", "kv_runtime"]
    assert results["kv_share"].nodes_rewritten == 1 and results["kv_runtime"].nodes_rewritten == 2
    layouts = {n.meta["slimfx_site"]: n.args[-1] for n in gm.graph.nodes
               if n.op == "call_function" and n.target == torch.ops.slimfx.attention.default}
    assert layouts == {0: "plain", 1: "read/plain"} and _sdpa(gm) == 0
    assert _linears(gm) == linears_before - 2  # the reader's k and v projections are dead code
    assert store.sites[1].owner == 0 and store.sites[1].nbytes() == 0


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("fmt, op", [("int8", torch.ops.slimfx.qlinear_int8.default), ("fp8", torch.ops.slimfx.qlinear_fp8.default)])
def test_quantize_turns_block_linears_into_qlinear_ops(fmt, op):
    model = tiny_model("llama_untied", layers=1)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    before = capture_graph(model, ids, use_cache=False)
    linears_before = _linears(before)
    assert linears_before == LINEARS_PER_BLOCK + 1 and not any(n.target in QOPS for n in before.graph.nodes)
    _, result, gm = run_quantize(model, {"format": fmt}, ids)
    kinds, plain = quant_ops(gm)
    assert _count(gm, op) == len(kinds) == LINEARS_PER_BLOCK  # the head is kept by default
    assert len(plain) == 1 and len(kinds) + len(plain) == linears_before
    assert result.applied and result.nodes_rewritten == len(kinds) == len(result.details["linears"])
    assert result.sites_matched == linears_before  # every linear of the anatomy, the head included


# ----------------------------------------------------------------------------- vq_logits


def test_vq_logits_replaces_the_head_linear_with_one_vq_op(tmp_path):
    # The codebook comes from the tiny model's own head (build_artifact): no real model needed.
    model = tiny_model("llama_untied", layers=1)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    before = capture_graph(lambda x: model(input_ids=x, use_cache=False).logits, ids)
    vocab = lambda gm: [n for n in gm.graph.nodes if is_linear(n) and n.meta["example_value"].shape[-1] == 128]  # noqa: E731
    linears_before, heads_before = _linears(before), len(vocab(before))
    assert heads_before == 1 and not vq_ops(before, "vq_head")
    fn, graphs = vq_compile(model, vq_artifact(model, 8, tmp_path), mode="approx")
    from slimfx.compiler.report import last_report

    with torch.no_grad():
        fn(ids)
    gm = graphs[0]
    result = next(r for r in last_report().passes if r.name == "vq_logits")
    assert len(vq_ops(gm, "vq_head_approx")) == heads_before and not vq_ops(gm, "vq_head_exact")
    assert not vocab(gm) and _linears(gm) == linears_before - 1  # only the head went
    assert result.applied and result.sites_matched == result.nodes_rewritten == 1


# ----------------------------------------------------------------------------- layer_skip


def test_layer_skip_removes_the_blocks_linears_and_attention():
    model = lively(layers=3)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    weights_before, sdpa_before = graph_structure(capture_graph(model, ids, use_cache=False))
    assert sdpa_before == 3 and len(weights_before) == 3 * LINEARS_PER_BLOCK + 1
    assert sum(_block_of(w) == 1 for w in weights_before) == LINEARS_PER_BLOCK
    _, result, gm = compile_skip(model, {"blocks": [1]}, ids)
    weights, sdpa = graph_structure(gm)
    assert sdpa == sdpa_before - 1
    assert sorted(weights) == sorted(w for w in weights_before if _block_of(w) != 1)
    assert {_block_of(w) for w in weights} == {0, 2, None}
    assert sorted(result.details["removed_linears"]) == sorted(w for w in weights_before if _block_of(w) == 1)
    assert result.applied and result.sites_matched == result.nodes_rewritten == 1  # one block chosen, one removed
    assert result.details["removed_blocks"] == [1]
