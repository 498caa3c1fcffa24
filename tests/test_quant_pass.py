"""The quantize pass on tiny HF models: numerics against the unmodified model, the
structure of the rewritten graph (which linears became which op), the bytes it reports
saving, per-layer overrides, plans, and skips with reasons. Plus the ops' fake impls."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import slimfx
import slimfx.passes.quantize.op  # noqa: F401  registers the ops
from slimfx.compiler.report import last_report
from slimfx.passes.quantize import formats as qf
from slimfx.runtime.models import tiny_model

QOPS = {torch.ops.slimfx.qlinear_int8.default: "int8", torch.ops.slimfx.qlinear_int4.default: "int4",
        torch.ops.slimfx.qlinear_fp8.default: "fp8"}


def _run(model, options, ids, artifacts=None):
    """Compile with only the quantize pass; return (logits, pass result, rewritten graph)."""
    graphs = []
    import slimfx.passes.quantize as qp
    from slimfx.compiler.registry import registered_passes

    real_run = qp.run

    def spy(gm, cfg, ctx):
        result = real_run(gm, cfg, ctx)
        graphs.append(gm)
        return result

    cfg = {"pipelines": {"q": ["quantize"]}, "compile": {"pipeline": "q"}, "passes": {"quantize": options}}
    if artifacts:
        cfg["artifacts"] = artifacts
    qp_registry = registered_passes()["quantize"]
    qp_registry.run = spy
    try:
        with torch.no_grad():
            out = slimfx.compile(model, cfg)(ids).logits
    finally:
        qp_registry.run = real_run
    return out, last_report().passes[0], graphs[-1]


def _ops(gm):
    kinds = [QOPS[n.target] for n in gm.graph.nodes if n.target in QOPS]
    plain = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
    return kinds, plain


@pytest.fixture(scope="module")
def untied():
    return tiny_model("llama_untied"), torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(0))


def test_int8_rewrites_every_linear_but_the_head(untied):
    model, ids = untied
    with torch.no_grad():
        ref = model(ids).logits
    out, result, gm = _run(model, {"format": "int8"}, ids)
    kinds, plain = _ops(gm)
    assert kinds == ["int8"] * 14 and len(plain) == 1  # 2 blocks x 7 linears; the head kept
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    per_linear = [e["orig_bytes"] - e["bytes"] for e in result.details["linears"].values()]
    assert result.bytes_saved == sum(per_linear) > 0
    assert result.details["footprint"]["weight_bytes_saved"] == result.bytes_saved
    assert result.notes[0].startswith("lossy: 14 x int8")


def test_per_layer_override_and_head(untied):
    model, ids = untied
    opts = {"format": "int4", "group_size": 32, "include_head": True, "layers": {"1": {"format": "none"}}}
    out, result, gm = _run(model, opts, ids)
    blocks = {e["block"]: e["format"] for e in result.details["linears"].values()}
    assert blocks == {0: "int4_g32", None: "int4_g32"}  # block 0 and the head; block 1 kept
    kinds, plain = _ops(gm)
    assert kinds.count("int4") == 8 and len(plain) == 7
    assert result.details["footprint"]["head_bytes_saved"] > 0


def test_shapes_a_format_cannot_take_are_skipped_with_reasons(untied):
    model, ids = untied
    out, result, gm = _run(model, {"format": "int4", "group_size": 128}, ids)  # hidden 64 < 128
    assert not result.applied and result.bytes_saved == 0
    assert any("not a multiple of the group size 128" in n for n in result.notes)
    kinds, plain = _ops(gm)
    assert kinds == [] and len(plain) == 15


def test_plan_decides_each_linear(untied, tmp_path):
    model, ids = untied
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    formats = {name: ("int8", "int4_g32", "none", "fp8")[i % 4] for i, name in enumerate(names)}
    plan = {"kind": "slimfx.bit_allocation", "version": 1, "formats": formats}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    out, result, gm = _run(model, {"plan": "bits"}, ids, artifacts={"bits": str(path)})
    got = {k: v["format"] for k, v in result.details["linears"].items()}
    assert got == {k: v for k, v in formats.items() if v != "none"}
    kinds, _ = _ops(gm)
    assert sorted(kinds) == sorted(qf.parse_spec(v).kind for v in got.values())


def test_bad_plan_is_a_config_error(untied, tmp_path):
    model, ids = untied
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"kind": "slimfx.bit_allocation", "version": 1, "formats": {"a.weight": "int5"}}))
    with pytest.raises(Exception, match=r"allowed: none, int8, int4_g32"):
        _run(model, {"plan": "bits"}, ids, artifacts={"bits": str(path)})


def test_ops_pass_opcheck():
    x = torch.randn(3, 64)
    q8 = qf.quantize_int8(torch.randn(5, 64)).tensors
    q4 = qf.quantize_int4(torch.randn(5, 64), 32).tensors
    b = torch.randn(5)
    torch.library.opcheck(torch.ops.slimfx.qlinear_int8.default, (x, q8["qweight"], q8["scale"], b))
    torch.library.opcheck(torch.ops.slimfx.qlinear_int4.default, (x, q4["qweight"], q4["scale"], q4["offset"], 32, None))


def test_plan_for_another_model_is_an_error(untied, tmp_path):
    model, ids = untied
    path = tmp_path / "plan.json"
    formats = {"model.layers.0.self_attn.q_proj.weight": "int8", "transformer.h.0.attn.c_attn.weight": "int8"}
    path.write_text(json.dumps({"kind": "slimfx.bit_allocation", "version": 1, "formats": formats}))
    with pytest.raises(Exception, match=r"artifacts.bits: 1 of 2 plan entries name no linear of this model \(first: 'transformer.h.0.attn.c_attn.weight'\)"):
        _run(model, {"plan": "bits"}, ids, artifacts={"bits": str(path)})


def test_override_of_a_layer_the_model_lacks_is_an_error(untied):
    model, ids = untied
    with pytest.raises(Exception, match=r"passes.quantize.layers.'5': layer 5 does not exist; allowed: layers 0-1"):
        _run(model, {"format": "int8", "layers": {"5": {"format": "none"}}}, ids)
