"""HF `generate` on models compiled with the slimfx backend runs through slimfx's runtime.

The three ways in (torch.compile(model), a compiled `forward`, slimfx.compile) give the
tokens of slimfx.runtime.generate with the same configuration, with every pass applied;
HF's arguments keep HF's meaning; what slimfx cannot honour is refused; models compiled
with another backend keep HF's own generate. Tiny random-weight models, plus one check
on the real default model (`model` mark).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import slimfx
from slimfx.compiler import generate_hook
from slimfx.compiler.errors import UsageError
from tests.test_runtime_generate import lively_tiny, padded_batch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EOS = 2  # the tiny models' eos_token_id; HF then pads with it too


def tiny():
    """One layer: compiles in less than half the time of two, and what is tested here is
    the way into the runtime, not the model."""
    return lively_tiny(layers=1)


def _pipeline(*passes, **options):
    return {"compile": {"pipeline": "p"}, "pipelines": {"p": ["fold_noop_casts", *passes]},
            "passes": {name: options[name] for name in passes}}


# The pass each configuration must report as applied (passes off: the runtime's KV store).
CONFIGS = {
    "off": (None, "kv_runtime"),
    "h2o": (_pipeline("kv_eviction", kv_eviction={"policy": "h2o", "budget": 16, "n_sink": 2, "window": 4}), "kv_eviction"),
    "scope": (_pipeline("kv_eviction", kv_eviction={"policy": "h2o", "budget": 12, "decode_budget": 8, "n_sink": 2,
                                                    "window": 4}), "kv_eviction"),
    "mikv": (_pipeline("kv_eviction", kv_eviction={"policy": "snapkv", "budget": 16, "n_sink": 2, "window": 4,
                                                   "obs_window": 4, "evicted": "int4"}), "kv_eviction"),
    "kv_int8": (_pipeline("kv_quantize", kv_quantize={"format": "int8", "residual": 4, "n_sink": 2}), "kv_quantize"),
    "w_int8": (_pipeline("quantize", quantize={"format": "int8"}), "quantize"),
}


def through_torch_compile(model, config):
    return torch.compile(model, backend="slimfx", options={"config": config})


def through_compiled_forward(model, config):
    model.forward = torch.compile(model.forward, backend="slimfx", options={"config": config})
    return model


def through_slimfx_compile(model, config):
    return slimfx.compile(model, config=config)


def runtime_sequences(model, ids, mask, new, config=None):
    """slimfx.runtime.generate's tokens as HF returns them: prompt + new tokens, up to
    where every sequence has produced EOS (padded with EOS after its own)."""
    tokens, stats = slimfx.runtime.generate(model, ids, attention_mask=mask, max_new_tokens=new, config=config,
                                            eos_token_id=EOS, pad_token_id=EOS)
    done = tokens == EOS
    steps = int(done.int().argmax(dim=1).max()) + 1 if bool(done.any(dim=1).all()) else new
    return torch.cat([ids, tokens[:, :steps]], dim=1), stats


def pass_results(pass_name):
    return [r for rep in slimfx.reports() for r in rep.passes if r.name == pass_name]


class Recorder:
    """HF's streamer protocol: put(prompt), put(tokens of one step) ..., end()."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_three_paths_give_the_runtime_tokens_with_the_passes_applied(name):
    config, pass_name = CONFIGS[name]
    ids, mask = padded_batch([11, 7], seed=1)
    new = 24  # 11 + 24 tokens: more than the h2o budget of 16
    model, twin = tiny(), tiny()  # same weights; the twin's forward gets compiled (path 2)
    paths = [(through_torch_compile, model), (through_compiled_forward, twin), (through_slimfx_compile, model)]
    outs, kv_bytes = [], []
    for path, target in paths:
        slimfx.clear_reports()
        out = path(target, config).generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        results = pass_results(pass_name)
        if path is not through_slimfx_compile:  # path 3 reuses path 1's generator: nothing compiles
            assert any(r.applied for r in results), f"{path.__name__}: {pass_name} not applied"
            assert name == "off" or any(r.bytes_saved > 0 for r in results), f"{path.__name__}: {pass_name} saved nothing"
        else:
            assert not slimfx.reports(), "path 3 compiled again instead of reusing path 1's graphs"
        outs.append(out)
        kv_bytes.append(slimfx.last_generate_stats()["kv_bytes"])
    ref, stats = runtime_sequences(model, ids, mask, new, config)
    for (path, _), out, nbytes in zip(paths, outs, kv_bytes):
        assert torch.equal(out, ref), f"{path.__name__} differs from slimfx.runtime.generate"
        assert nbytes == stats["kv_bytes"]


def test_left_padded_batch_of_three_and_hf_lengths():
    model = tiny()
    compiled = through_torch_compile(model, None)
    ids, mask = padded_batch([9, 3, 6], seed=2)
    out = compiled.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(out, runtime_sequences(model, ids, mask, 12)[0])
    assert compiled.generate(ids, attention_mask=mask).shape[1] <= ids.shape[1] + 20  # HF's default: 20 new tokens
    assert compiled.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 5).shape[1] <= ids.shape[1] + 5
    result = compiled.generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(result.sequences, out)


def test_eos_and_min_new_tokens_match_hf_generate():
    """Passes off, one prompt: the routed output is HF's own generate's, EOS stop and
    min_new_tokens included (eos is a token the free run produces early)."""
    model = tiny()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    free = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
    eos = int(free[0, 6 + 3])
    compiled = through_torch_compile(model, None)
    for kw in (dict(eos_token_id=eos), dict(eos_token_id=[127, eos], pad_token_id=0), dict(eos_token_id=eos, min_new_tokens=8)):
        hf = model.generate(ids, max_new_tokens=16, do_sample=False, **kw)
        assert torch.equal(compiled.generate(ids, max_new_tokens=16, do_sample=False, **kw), hf), kw


def test_sampling_follows_hf_settings_and_is_reproducible():
    model = tiny()
    compiled = through_slimfx_compile(model, None)
    ids, mask = padded_batch([6, 4], seed=6)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(11)
    a = compiled.generate(ids, **kw)
    torch.manual_seed(11)
    b = compiled.generate(ids, **kw)
    greedy = compiled.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, temperature=0.8)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    assert torch.equal(greedy, runtime_sequences(model, ids, mask, 16)[0])  # do_sample=False: greedy whatever temperature says
    model.generation_config.do_sample = True  # the model's defaults count, as in HF
    torch.manual_seed(11)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9), a)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_beams=2), "num_beams"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(repetition_penalty=1.3), "repetition_penalty"),
    (dict(logits_processor=[lambda ids, scores: scores]), "logits_processor"),
    (dict(prefix_allowed_tokens_fn=lambda b, ids: [1]), "prefix_allowed_tokens_fn"),
    (dict(position_ids=torch.arange(5)[None]), "position_ids"),
])
def test_what_slimfx_cannot_honour_is_refused(kwargs, name):
    compiled = through_torch_compile(tiny(), None)
    with pytest.raises(UsageError, match=rf"^generate: {name}=") as info:
        compiled.generate(torch.ones(1, 5, dtype=torch.int64), max_new_tokens=4, **kwargs)
    assert "\n" not in str(info.value)


def test_streamer_receives_prompt_then_each_token():
    model = tiny()
    compiled = through_compiled_forward(model, None)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(8))
    streamer = Recorder()
    out = compiled.generate(ids, max_new_tokens=10, do_sample=False, streamer=streamer)
    assert torch.equal(streamer.puts[0], ids) and streamer.ended == 1
    assert all(p.shape == (1,) for p in streamer.puts[1:])
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), out[:, 7:])


def test_models_compiled_with_another_backend_keep_hf_generate():
    model = tiny()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    reference = model.generate(ids, max_new_tokens=6, do_sample=False)
    compiled = torch.compile(model, backend="eager")
    assert compiled.generate.__self__ is model and compiled.generate.__func__ is type(model).generate
    assert compiled.config is model.config
    model.forward = torch.compile(model.forward, backend="eager")
    assert generate_hook.route_of_forward(model) is None
    slimfx.clear_reports()
    assert torch.equal(compiled.generate(ids, max_new_tokens=6, do_sample=False), reference)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), reference)
    assert not slimfx.reports()  # slimfx's runtime never ran


def test_install_is_idempotent():
    from torch._dynamo.eval_frame import OptimizedModule
    from transformers.generation.utils import GenerationMixin

    from slimfx.compiler.backend import check_settings, slimfx_backend

    generate_hook.install(slimfx_backend, check_settings)
    hooks = (OptimizedModule.__getattr__, GenerationMixin.generate)
    generate_hook.install(slimfx_backend, check_settings)
    assert (OptimizedModule.__getattr__, GenerationMixin.generate) == hooks


def test_unreadable_settings_fall_back_to_hf_generate_with_one_warning(monkeypatch):
    model = tiny()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(10))
    reference = model.generate(ids, max_new_tokens=5, do_sample=False)
    compiled = through_torch_compile(model, None)
    monkeypatch.setattr(generate_hook, "_slimfx_settings", lambda backend: generate_hook._UNREADABLE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, reference)
    messages = [str(w.message) for w in caught if "slimfx" in str(w.message)]
    assert len(messages) == 1 and "not applied" in messages[0]


def test_plain_forward_calls_still_go_through_the_backend():
    model = tiny()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(12))
    slimfx.clear_reports()
    logits = through_torch_compile(model, None)(ids).logits
    assert slimfx.reports(), "the backend did not compile the forward call"
    assert {r.codegen for r in slimfx.reports()} == {"eager"}  # codegen "auto" on CPU: the FX code
    assert torch.allclose(logits, model(ids).logits, atol=1e-5, rtol=0)


def test_auto_codegen_is_slimfx_codegen_on_cuda_and_fx_code_on_cpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from slimfx.compiler.backend import _auto_codegen

    with FakeTensorMode():  # CUDA tensors without a GPU
        on_cuda = [torch.empty(2, 3, device="cuda"), torch.empty(2, dtype=torch.int64, device="cuda")]
    assert _auto_codegen(on_cuda) == "slimfx"
    assert _auto_codegen([torch.zeros(2, 3), 4]) == "eager"


def test_no_recompilation_across_200_tokens_through_torch_compile(fresh_dynamo):
    model = tiny()
    compiled = through_torch_compile(model, None)
    ids, mask = padded_batch([7, 5], seed=3)
    compiled.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None)  # warm-up: compiles
    graphs_before = counters["stats"]["unique_graphs"]
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=200, eos_token_id=None)
    assert out.shape == (2, 7 + 200)
    assert counters["stats"]["unique_graphs"] == graphs_before, "the 200-token generation recompiled"


# On the default model, the eviction example and the int8 weight example through paths
# 1-3 (every other example's passes go through the three paths on tiny models above):
# each example compiles the 30-layer model and generates four times, 15-32 s apiece on
# the 2-core machine, and all eight took 183 s of the suite's 12 minutes.
DEFAULT_MODEL_EXAMPLES = ["kv_eviction.toml", "quantize.toml"]
# 64 new tokens for one example, 8 for the other.
LONG_EXAMPLE = "kv_eviction.toml"


def _configured_passes(config_path) -> list[str]:
    from slimfx.compiler.config import load_config

    cfg = load_config(config_path)
    return [p for p in cfg.pipelines[cfg.compile["pipeline"]] if p != "fold_noop_casts"]


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("example", DEFAULT_MODEL_EXAMPLES)
def test_default_model_three_paths_give_the_runtime_tokens_and_kv_bytes(default_model, example):
    from slimfx.runtime.models import chat_input_ids

    model, tok = default_model
    config = str(EXAMPLES / example)
    new = 64 if example == LONG_EXAMPLE else 8
    ids = chat_input_ids(tok, "Write a short poem about the sea.")
    mask = torch.ones_like(ids)
    slimfx.clear_reports()
    tokens, stats = slimfx.runtime.generate(model, ids, attention_mask=mask, max_new_tokens=new, config=config,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for name in _configured_passes(config):
        assert any(r.applied for r in pass_results(name)), f"{example}: {name} not applied"
    paths = [through_torch_compile, through_compiled_forward, through_slimfx_compile]
    for path in paths:
        try:
            out = path(model, config).generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        finally:
            model.__dict__.pop("forward", None)  # path 2's compiled forward
        n = out.shape[1] - ids.shape[1]
        assert n == new or out[0, -1] == tok.eos_token_id, f"{example} {path.__name__}: stopped early without EOS"
        assert torch.equal(out[0, ids.shape[1]:], tokens[0, :n]), f"{example} {path.__name__} differs from the runtime"
        assert slimfx.last_generate_stats()["kv_bytes"] == stats["kv_bytes"], f"{example} {path.__name__}"


@pytest.mark.model
def test_default_model_text_streamer_prints_what_generate_returns(default_model, capsys):
    from transformers import TextStreamer

    from slimfx.runtime.models import chat_input_ids

    model, tok = default_model
    ids = chat_input_ids(tok, "Write a short poem about the sea.")
    out = through_torch_compile(model, None).generate(ids, max_new_tokens=8, do_sample=False,
                                                      streamer=TextStreamer(tok, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() != ""
