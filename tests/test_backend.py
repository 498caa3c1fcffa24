"""The backend: entry point registration, passes-off equality with eager, reports, errors."""

import subprocess
import sys

import pytest
import torch

import slimfx
from slimfx.compiler.config import ConfigError
from slimfx.compiler.passmanager import PassContext, PassFailure, PassManager, PassResult
from slimfx.runtime.models import tiny_model


def test_backend_registered_by_entry_point_without_import():
    code = (
        "import torch, torch._dynamo\n"
        "assert 'slimfx' in torch._dynamo.list_backends(exclude_tags=())\n"
        "f = torch.compile(lambda x: (x * 2).to(torch.float32) + 1, backend='slimfx')\n"
        "x = torch.randn(4)\n"
        "assert torch.equal(f(x), x * 2 + 1)\n"
        "import sys; assert 'slimfx' in sys.modules  # loaded lazily through the entry point\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["llama_gqa", "phi3"])
def test_passes_off_matches_eager_on_tiny_models(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        slimfx.clear_reports()
        compiled = torch.compile(model, backend="slimfx")
        out = compiled(ids).logits
    assert torch.equal(out, ref)
    report = slimfx.last_report()
    assert report is not None and "2 attention sites" in report.anatomy_summary
    assert [r.name for r in report.passes] == ["fold_noop_casts"]
    assert report.passes[0].applied and report.passes[0].nodes_rewritten > 0


def test_inductor_codegen_option():
    model = tiny_model("llama_gqa")
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="slimfx", options={"config": {"compile": {"codegen": "inductor"}}})(ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert slimfx.last_report().codegen == "inductor"


def test_bad_options_are_config_errors():
    """The caller of the compiled function gets the ConfigError itself, one line, not
    dynamo's BackendCompilerFailed around it."""
    f = torch.compile(lambda x: x + 1, backend="slimfx", options={"confg": {}})
    with pytest.raises(ConfigError) as err:
        f(torch.randn(2))
    assert str(err.value) == "options.confg: unknown key; allowed: config (did you mean 'config'?)"
    assert not isinstance(err.value, torch._dynamo.exc.BackendCompilerFailed)


def test_slimfx_compile_validates_config_before_tracing():
    with pytest.raises(ConfigError, match=r"^compile\.codegen: got 'fast'"):
        slimfx.compile(torch.nn.Linear(2, 2), config={"compile": {"codegen": "fast"}})
    layer = torch.nn.Linear(2, 2)
    x = torch.randn(3, 2)
    assert torch.equal(slimfx.compile(layer)(x), layer(x))


def test_pass_manager_names_failing_pass_and_previous(monkeypatch, tmp_path):
    import slimfx.compiler.registry as P
    from slimfx.compiler.config import load_config

    class Boom:
        NAME, DESCRIPTION, LOSSY, OPTIONS = "boom", "raises", False, {}

        @staticmethod
        def run(gm, cfg, ctx):
            raise RuntimeError("kaput")

    passes = dict(P.registered_passes())
    passes["boom"] = Boom
    monkeypatch.setattr(P, "registered_passes", lambda: passes)
    monkeypatch.setenv("SLIMFX_DEBUG_DIR", str(tmp_path))
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    config = load_config({"pipelines": {"p": ["fold_noop_casts", "boom"]}, "compile": {"pipeline": "p"}})
    with pytest.raises(PassFailure, match=r"pass 'boom' failed \(passes that ran before it: fold_noop_casts\): RuntimeError: kaput"):
        PassManager(config).run(gm, PassContext(config, []))
    dumped = sorted(p.name for p in (tmp_path / "graph_000").iterdir())
    assert dumped == ["00_input.graph.txt", "00_input.py", "01_fold_noop_casts.graph.txt", "01_fold_noop_casts.py"]


def test_pass_that_finds_nothing_leaves_graph_unchanged():
    from slimfx.passes import fold_noop_casts

    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    before = gm.code
    result = fold_noop_casts.run(gm, None, None)
    assert isinstance(result, PassResult) and not result.applied and result.notes
    assert gm.code == before


@pytest.mark.model
def test_default_model_passes_off_token_identical(default_model):
    """Issue 2's check: fp32, greedy, 64 tokens identical to eager; first logits within 1e-4."""
    from slimfx.runtime.models import chat_input_ids

    model, tok = default_model
    ids = chat_input_ids(tok, "Write a short poem about the sea.")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        eager_logits = model(ids).logits[:, -1]
        eager = model.generate(ids, **kw)
        compiled_forward = torch.compile(model.forward, backend="slimfx")
        original = model.forward
        model.forward = compiled_forward
        try:
            logits = model(ids).logits[:, -1]
            out = model.generate(ids, **kw)
        finally:
            model.forward = original
    assert (logits - eager_logits).abs().max().item() <= 1e-4
    assert out.shape[1] == ids.shape[1] + 64 or out[0, -1].item() == tok.eos_token_id
    assert torch.equal(out, eager)
