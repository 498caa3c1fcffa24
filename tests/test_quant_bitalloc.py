"""Bit allocation: the multiple-choice knapsack against brute force (hypothesis), the
budget always held, plans validated on load, and calibration end to end on a tiny model."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.calibrate import bits as B
from slimfx.passes.quantize.plan import format_plan, read_plan


def brute_force(costs, sizes, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        size = sum(sizes[i][j] for i, j in enumerate(pick))
        cost = sum(costs[i][j] for i, j in enumerate(pick))
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


def _costs_and_sizes(items):
    """[[(cost, size) per choice] per item] -> (costs, sizes), each [[per choice] per item]."""
    return [[c for c, _ in it] for it in items], [[s for _, s in it] for it in items]


instances = st.integers(1, 5).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 60)), min_size=1, max_size=3), min_size=n, max_size=n),
    st.integers(0, 250),
))


@settings(max_examples=300, deadline=None)
@given(instances)
def test_knapsack_matches_brute_force(instance):
    items, budget = instance
    costs, sizes = _costs_and_sizes(items)
    expected = brute_force(costs, sizes, budget)
    if expected is None:
        with pytest.raises(ValueError, match="below the smallest possible total"):
            B.solve_mckp(costs, sizes, budget)
        return
    sol = B.solve_mckp(costs, sizes, budget)
    assert sol.exact and sol.size <= budget
    assert sol.cost == pytest.approx(expected, abs=1e-9)
    assert sol.size == sum(sizes[i][j] for i, j in enumerate(sol.choice))


@settings(max_examples=100, deadline=None)
@given(instances)
def test_coarse_units_still_hold_the_budget(instance):
    items, budget = instance
    costs, sizes = _costs_and_sizes(items)
    if brute_force(costs, sizes, budget) is None:
        return
    sol = B.solve_mckp(costs, sizes, budget, max_cells=3)
    assert sol.size <= budget


def test_read_plan_rejects_what_is_not_a_plan(tmp_path):
    p = tmp_path / "p.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_plan(p)
    p.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError, match="not a slimfx.bit_allocation v1 file"):
        read_plan(p)
    with pytest.raises(ValueError, match="not found"):
        read_plan(tmp_path / "missing.json")


def test_parse_bytes():
    assert B.parse_bytes("64MiB") == 64 * 2**20 and B.parse_bytes("1.5GB") == 1_500_000_000 and B.parse_bytes("12") == 12
    with pytest.raises(Exception, match="allowed: a size like"):
        B.parse_bytes("lots")


class _Tok:
    """Enough of a tokenizer for calibration on given text: bytes -> ids < vocab."""

    def __call__(self, text, return_tensors="pt"):
        class Out:
            input_ids = torch.tensor([[b % 128 for b in text.encode()]])
        return Out()


def test_calibrate_plan_holds_budget_and_prefers_int8_where_it_hurts_less(tmp_path):
    from slimfx.runtime.models import tiny_model

    model = tiny_model("llama_untied")
    text = "The quick brown fox jumps over the lazy dog. " * 4
    out = tmp_path / "plan.json"
    plan = B.calibrate_bit_allocation(model, _Tok(), out_path=out, bits=6.0, candidates=("none", "int8", "int4_g32"),
                                      text=text, tokens=96, kv_context=0)
    assert read_plan(out)["formats"] == plan["formats"]
    assert plan["totals"]["linear_bytes"] <= plan["budget"]["linear_bytes"]
    assert len(plan["formats"]) == 14  # every linear but the head
    for entry in plan["linears"].values():  # measured errors order as the formats' precision
        opts = entry["options"]
        assert opts["none"]["cost"] == 0.0 < opts["int8"]["cost"] < opts["int4_g32"]["cost"]
    assert "int4_g32" in plan["formats"].values()  # 6 bits a weight cannot all be int8 (8.5)
    assert "output error" in format_plan(plan)


def test_kl_metric_measures_each_linear_alone_and_restores_the_model(tmp_path):
    from slimfx.runtime.models import tiny_model

    model = tiny_model("llama_untied")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    text = "The quick brown fox jumps over the lazy dog. " * 4
    plan = B.calibrate_bit_allocation(model, _Tok(), out_path=tmp_path / "plan.json", bits=6.0, metric="kl",
                                      candidates=("none", "int8", "int4_g32"), text=text, tokens=96)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # every swap undone
    assert plan["calibration"]["metric"] == B.METRICS["kl"]
    assert plan["totals"]["linear_bytes"] <= plan["budget"]["linear_bytes"]
    costs = [entry["options"] for entry in plan["linears"].values()]
    assert len(costs) == 14 and all(o["none"]["cost"] == 0.0 for o in costs)
    # KL of the whole model's prediction: int4 moves it more than int8, summed over linears.
    assert sum(o["int8"]["cost"] for o in costs) < sum(o["int4_g32"]["cost"] for o in costs)
    assert all(o["int8"]["cost"] >= 0.0 for o in costs)
    with pytest.raises(B.UsageError, match="--metric"):
        B.calibrate_bit_allocation(model, _Tok(), out_path=tmp_path / "x.json", bits=6.0, metric="fisher", text=text, tokens=96)


def test_calibrated_plan_is_applied_through_the_runtime(tmp_path):
    """The plan `calibrate` writes names linears the way the runtime's graphs do: every
    plan entry decides its linear when generating with the plan."""
    from slimfx.compiler.report import reports
    from slimfx.runtime import generate
    from slimfx.runtime.models import tiny_model

    model = tiny_model("llama_untied")
    out = tmp_path / "plan.json"
    plan = B.calibrate_bit_allocation(model, _Tok(), out_path=out, bits=6.0, candidates=("none", "int8", "int4_g32"),
                                      text="The quick brown fox jumps over the lazy dog. " * 4, tokens=96, kv_context=0)
    config = {"pipelines": {"q": ["quantize"]}, "compile": {"pipeline": "q"},
              "passes": {"quantize": {"plan": "bits"}}, "artifacts": {"bits": str(out)}}
    seen = len(reports())
    generate(model, torch.randint(0, 128, (1, 7)), max_new_tokens=3, config=config)
    results = [p for r in reports()[seen:] for p in r.passes if p.name == "quantize"]
    assert results, "the quantize pass did not run"
    expected = {k: v for k, v in plan["formats"].items() if v != "none"}
    for result in results:
        assert result.applied
        assert {k: v["format"] for k, v in result.details["linears"].items()} == expected
