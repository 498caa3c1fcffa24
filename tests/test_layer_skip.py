"""The layer_skip pass and `slimfx calibrate skip` on tiny random-weight models.

The rewritten graph loses exactly the chosen blocks' linears and attention; its logits
equal the eager model with those blocks deleted (or their MLPs zeroed); through the
runtime the removed sites' KV store is never allocated while kv_eviction's per-layer
overrides keep meaning the original blocks; unified choices are evenly spread and
never first or last; calibration scores match eager references, plans round-trip and
are refused for another model; bad options fail with one line.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from slimfx.compiler.anatomy import param_path, record_parameter_paths, weight_source
from slimfx.compiler.backend import slimfx_backend
from slimfx.compiler.config import ConfigError, load_config
from slimfx.compiler.passmanager import PassContext
from slimfx.compiler.report import last_report
from slimfx.passes import layer_skip
from slimfx.runtime.models import tiny_model

BLOCKS = 5
LINEARS_PER_BLOCK = 7  # q k v o gate up down


def lively(layers: int = BLOCKS, seed: int = 0):
    """A tiny GQA Llama whose weights are large enough that every block matters."""
    model = tiny_model("llama_gqa", layers=layers, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.fixture(scope="module")
def model():
    return lively()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))


def _config(options: dict, artifacts: dict | None = None, others: dict | None = None) -> dict:
    """layer_skip with `options`, plus the passes in `others` ({name: options}) listed before it."""
    cfg = {"pipelines": {"s": [*(others or {}), "layer_skip"]}, "compile": {"pipeline": "s"},
           "passes": {**(others or {}), "layer_skip": options}}
    if artifacts:
        cfg["artifacts"] = artifacts
    return cfg


def compile_skip(model, options: dict, ids, artifacts=None, others=None):
    """(logits, the first PassResult (layer_skip's), the rewritten graph) of one compiled forward."""
    graphs = []

    def grab(gm, example_inputs, **_):
        forward = slimfx_backend(gm, example_inputs, options={"config": _config(options, artifacts, others)})
        graphs.append(gm)
        return forward

    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend=grab, fullgraph=True)(ids, use_cache=False).logits
    return logits, last_report().passes[0], graphs[-1]


def capture(model, ids):
    """(dynamo graph, example inputs) of one forward, no pass run."""
    found = {}

    def grab(gm, example_inputs, **_):
        record_parameter_paths(gm, example_inputs, model)
        found["graph"] = (gm, list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab, fullgraph=True)(ids, use_cache=False)
    return found["graph"]


@pytest.fixture(scope="module")
def captured(model, ids):
    return capture(model, ids)


def pass_error(captured, options: dict, artifacts=None) -> str:
    """The one-line ConfigError the pass raises for `options` (before touching the graph)."""
    gm, inputs = captured
    config = load_config(_config(options, artifacts))
    with pytest.raises(ConfigError) as err:
        layer_skip.run(gm, config.pass_config("layer_skip"), PassContext(config, inputs))
    assert "\n" not in str(err.value)
    return str(err.value)


class _ZeroMLP(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def without(model, blocks, mlp_only: bool = False):
    """The eager reference: a copy of `model` with `blocks` deleted (or their MLPs zeroed)."""
    ref = copy.deepcopy(model)
    for b in sorted(blocks, reverse=True):
        if mlp_only:
            ref.model.layers[b].mlp = _ZeroMLP()
        else:
            del ref.model.layers[b]
    return ref


def eager_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def graph_structure(gm) -> tuple[list[str], int]:
    """(weight paths of the graph's F.linear nodes, number of SDPA nodes)."""
    weights = [param_path(weight_source(n.args[1])) for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
    sdpa = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention)
    return weights, sdpa


def _block_of(path: str) -> int | None:
    parts = path.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


# ----------------------------------------------------------------------------- the rewrite


@pytest.mark.parametrize("blocks, mlp_only", [([1, 2], False), ([1, 3], True)])
def test_exactly_the_chosen_blocks_go_and_logits_match_the_model_without_them(model, ids, blocks, mlp_only):
    logits, result, gm = compile_skip(model, {"blocks": blocks, "mlp_only": mlp_only}, ids)
    weights, sdpa = graph_structure(gm)
    gone = {n for n, p in model.named_parameters() if p.dim() == 2 and _block_of(n) in blocks and (".mlp." in n or not mlp_only)}
    if mlp_only:
        assert sdpa == BLOCKS and len(weights) == BLOCKS * LINEARS_PER_BLOCK + 1 - 3 * len(blocks)
        assert not any(_block_of(w) in blocks and ".mlp." in w for w in weights)
        assert result.details["removed_mlps"] == blocks and result.details["kv_bytes_per_token_saved"] == 0
    else:
        assert sdpa == BLOCKS - len(blocks) and len(weights) == (BLOCKS - len(blocks)) * LINEARS_PER_BLOCK + 1
        assert {_block_of(w) for w in weights} == {0, 3, 4, None}
        assert result.details["removed_blocks"] == blocks
        assert result.details["kv_bytes_per_token_saved"] == len(blocks) * 2 * 2 * 16 * 4  # K and V, 2 kv heads x 16, fp32
    assert sorted(result.details["removed_linears"]) == sorted(gone)
    assert result.bytes_saved == sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in gone)
    kv_left = (BLOCKS - (0 if mlp_only else len(blocks))) * 2 * 2 * 16 * 4
    assert result.details["footprint"] == ({"weight_bytes_saved": result.bytes_saved} if mlp_only else
                                           {"weight_bytes_saved": result.bytes_saved, "kv_bytes_per_token": kv_left})
    assert result.notes[0].startswith("lossy: removed")
    torch.testing.assert_close(logits, eager_logits(without(model, blocks, mlp_only), ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, eager_logits(model, ids), atol=1e-3)  # the removal changed something


def test_skipping_nothing_leaves_the_graph_and_logits_unchanged(model, ids):
    logits, result, gm = compile_skip(model, {"blocks": []}, ids)
    assert not result.applied
    weights, sdpa = graph_structure(gm)
    assert (len(weights), sdpa) == (BLOCKS * LINEARS_PER_BLOCK + 1, BLOCKS)
    assert torch.equal(logits, eager_logits(model, ids))


def test_runtime_never_allocates_removed_sites_and_overrides_keep_block_numbers():
    """Block 1 of 4 removed; kv_eviction budgets for blocks 2 and 3 must land on blocks 2
    and 3: the tokens equal the model with block 1 deleted and the same budgets on its
    blocks 1 and 2. kv_eviction is listed first: the pass manager orders layer_skip before
    kv_runtime (and kv_runtime before kv_eviction)."""
    from slimfx.runtime.generate import generate, get_generator

    model = lively(layers=4)
    prompt = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    budgets = {"2": {"budget": 16, "window": 4, "n_sink": 2}, "3": {"budget": 24, "window": 4, "n_sink": 2}}
    cfg = {"pipelines": {"s": ["kv_eviction", "layer_skip"]}, "compile": {"pipeline": "s"},
           "passes": {"layer_skip": {"blocks": [1]}, "kv_eviction": {"budget": 100000, "layers": budgets}}}
    ref_cfg = {"pipelines": {"s": ["kv_eviction"]}, "compile": {"pipeline": "s"},
               "passes": {"kv_eviction": {"budget": 100000, "layers": {"1": budgets["2"], "2": budgets["3"]}}}}
    tokens, stats = generate(model, prompt, max_new_tokens=8, capacity=64, config=cfg)
    ref_tokens, ref_stats = generate(without(model, [1]), prompt, max_new_tokens=8, capacity=64, config=ref_cfg)
    assert torch.equal(tokens, ref_tokens)
    store = get_generator(model, 2, 64, config=cfg).store
    assert {i: c.capacity for i, c in store.sites.items()} == {0: 64, 2: 16, 3: 24}
    plain = 2 * 2 * (2 * 16 * 4 + 4)  # batch x kv heads x (K and V fp32 + slot position)
    evicting = plain + 2 * 2 * 4  # + a policy score
    assert stats["kv_bytes"] == ref_stats["kv_bytes"] == plain * 64 + evicting * (16 + 24)  # no bytes for block 1


def test_quantize_runs_after_it_and_accepts_a_plan_naming_removed_linears(model, ids, tmp_path):
    """A bit-allocation plan names every linear, the removed block's too; quantize, listed
    first, runs after layer_skip, quantizes what is left and does not call the rest missing."""
    formats = {n: "int8" for n, p in model.named_parameters() if p.dim() == 2 and _block_of(n) is not None}
    (tmp_path / "bits.json").write_text(json.dumps({"kind": "slimfx.bit_allocation", "version": 1, "formats": formats}))
    logits, result, _ = compile_skip(model, {"blocks": [2]}, ids, {"bits": str(tmp_path / "bits.json")},
                                     others={"quantize": {"plan": "bits"}})
    assert [r.name for r in last_report().passes] == ["layer_skip", "quantize"]
    quantized = set(last_report().passes[1].details["linears"])
    assert quantized == {w for w in formats if _block_of(w) != 2} and result.details["removed_linears"] == sorted(set(formats) - quantized)
    error = lambda ref: ((logits - ref).norm() / ref.norm()).item()  # noqa: E731
    assert error(eager_logits(without(model, [2]), ids)) < min(0.1, error(eager_logits(model, ids)) / 3)  # int8 error only


# ----------------------------------------------------------------------------- unified skipping


def test_spread_is_even_and_never_first_or_last():
    for n in range(3, 41):
        inner = n - 2
        for count in range(0, inner + 1):
            chosen = layer_skip.spread(count, n)
            assert len(set(chosen)) == count and chosen == sorted(chosen)
            assert all(1 <= b <= n - 2 for b in chosen)
            gaps = {b - a for a, b in zip(chosen, chosen[1:])}
            assert gaps <= {inner // count, -(-inner // count)} if count else not chosen


def test_unified_count_is_the_fewest_blocks_reaching_the_target():
    n, block, total = 30, 10.0, 30 * 10.0 + 60.0  # 30 blocks and a head of 6 blocks' weight
    for target in (1.0, 1.1, 1.25, 1.5, 2.0, 3.0):
        count = layer_skip.unified_count(n, block, total, target)
        assert total / (total - count * block) >= target - 1e-9
        assert count == 0 or total / (total - (count - 1) * block) < target
    with pytest.raises(ConfigError, match=r"target_speedup: got 8.0; allowed: at most 4.500"):
        layer_skip.unified_count(n, block, total, 8.0)


def test_target_speedup_removes_the_unified_choice(captured):
    model = lively(layers=8)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    logits, result, gm = compile_skip(model, {"target_speedup": 1.5}, ids)
    block = sum(p.numel() for n, p in model.named_parameters() if _block_of(n) == 0 and p.dim() == 2)
    total = 8 * block + 128 * 64  # the blocks' linears and the (tied) head
    expected = layer_skip.spread(layer_skip.unified_count(8, block, total, 1.5), 8)
    assert result.details["removed_blocks"] == expected and 0 not in expected and 7 not in expected
    assert "predicted" in result.details["chosen_by"]
    torch.testing.assert_close(logits, eager_logits(without(model, expected), ids), rtol=1e-5, atol=1e-5)
    assert "target_speedup: got 20.0; allowed: at most" in pass_error(captured, {"target_speedup": 20.0})


# ----------------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def sleb_plan(model, ids):
    from slimfx.calibrate.layer_skip import calibrate_skip

    return calibrate_skip(model, ids, method="sleb", target="block", count=2, progress=False)


def _nll(logits, ids) -> float:
    return float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))


def test_calibration_scores_match_eager_references(model, ids, sleb_plan):
    with torch.no_grad():
        states = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    # HF's last hidden state is after the final norm: compare the blocks before the last.
    for b in range(BLOCKS - 1):
        bi = float((1 - F.cosine_similarity(states[b], states[b + 1], dim=-1)).mean())
        assert sleb_plan["scores"]["block_influence"][b] == pytest.approx(bi, rel=1e-4)
    alone = sleb_plan["scores"]["sleb_nll"]
    assert alone[0] is None and alone[-1] is None
    for b in range(1, BLOCKS - 1):
        assert alone[b] == pytest.approx(_nll(eager_logits(without(model, [b]), ids), ids), rel=1e-5)
    first = min(range(1, BLOCKS - 1), key=lambda b: alone[b])
    assert sleb_plan["order"][0] == first and sleb_plan["skip"] == sorted(sleb_plan["order"])
    assert set(sleb_plan["skip"]) <= set(range(1, BLOCKS - 1))
    skipped = _nll(eager_logits(without(model, sleb_plan["skip"]), ids), ids)
    assert sleb_plan["calibration"]["nll_skipped"] == pytest.approx(skipped, rel=1e-5)


def test_plan_round_trip_applies_and_is_refused_for_another_model(model, ids, captured, sleb_plan, tmp_path):
    path = layer_skip.write_plan(sleb_plan, tmp_path / "skip.json")
    assert layer_skip.read_plan(path) == json.loads(json.dumps(sleb_plan))
    logits, result, _ = compile_skip(model, {"plan": "skip"}, ids, {"skip": str(path)})
    assert result.details["removed_blocks"] == sleb_plan["skip"]
    torch.testing.assert_close(logits, eager_logits(without(model, sleb_plan["skip"]), ids), rtol=1e-5, atol=1e-5)
    artifacts = {"skip": str(path)}
    other = lively(seed=1)  # the same architecture: only the weights' fingerprint tells them apart
    message = pass_error(capture(other, ids), {"plan": "skip"}, artifacts)
    assert message.startswith("artifacts.skip: the plan was made for another model (5 blocks, hidden 64, vocab 128, weights ")
    assert "mlp_only: got true but plan 'skip' removes whole blocks" in pass_error(captured, {"plan": "skip", "mlp_only": True}, artifacts)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(kind="slimfx.bit_allocation"), "not a slimfx.layer_skip_plan v1 file"),
    (lambda p: p.update(skip="1"), "field skip must be list"),
    (lambda p: p["model"].update(blocks="5"), "field model.blocks must be int"),
    (lambda p: p.update(skip=[1, 9]), "field skip must list distinct blocks in 0-4"),
    (lambda p: p["scores"].update(block_influence=[0.1]), "field scores.block_influence must list 5 numbers"),
])
def test_malformed_plans_are_refused(model, ids, sleb_plan, tmp_path, edit, message):
    plan = json.loads(json.dumps(sleb_plan))
    edit(plan)
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=message):
        layer_skip.read_plan(tmp_path / "bad.json")


def test_mlp_plan_from_block_influence(model, ids, tmp_path):
    from slimfx.calibrate.layer_skip import calibrate_skip

    plan = calibrate_skip(model, ids, method="block_influence", target="mlp", fraction=0.4, progress=False)
    bi = plan["scores"]["block_influence"]
    assert plan["skip"] == sorted(sorted(range(1, BLOCKS - 1), key=lambda b: bi[b])[:2])
    path = layer_skip.write_plan(plan, tmp_path / "mlp.json")
    logits, result, _ = compile_skip(model, {"plan": "p"}, ids, {"p": str(path)})
    assert result.details["removed_mlps"] == plan["skip"]
    torch.testing.assert_close(logits, eager_logits(without(model, plan["skip"], mlp_only=True), ids), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("options, message", [
    ({"blocks": [1], "target_speedup": 1.2}, r"passes.layer_skip: got blocks and target_speedup; allowed: one of blocks, plan, target_speedup"),
    ({"blocks": [1, 9]}, r"passes.layer_skip.blocks\[1\]: got 9; allowed: blocks 0-4 \(the model has 5 blocks\)"),
    ({"blocks": [2, 2]}, r"passes.layer_skip.blocks: got \[2, 2\]; allowed: each block once"),
    ({"blocks": [0, 1, 2, 3, 4]}, r"allowed: at most 4 \(one block must remain\)"),
    ({"target_speedup": 0.5}, r"passes.layer_skip.target_speedup: got 0.5; allowed: 0 \(off\) or a number >= 1"),
    ({"plan": "missing"}, r"artifacts.missing: missing"),
])
def test_bad_options_fail_with_one_line(captured, options, message):
    import re

    assert re.search(message, pass_error(captured, options))


@pytest.mark.parametrize("options, message", [
    ({"blocks": [-1]}, r"passes.layer_skip.blocks\[0\]: got -1; allowed: an integer >= 0"),
    ({"mlp_only": "yes"}, r"passes.layer_skip.mlp_only: got 'yes'; allowed: a boolean"),
    ({"blocks": 3}, r"passes.layer_skip.blocks: got 3; allowed: a list of an integer"),
])
def test_option_types_are_checked_with_the_config(options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(options))
