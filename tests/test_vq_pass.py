"""The vq_logits pass on tiny random models and the exact head's guarantee.

Structure: the LM head linear is replaced by one slimfx::vq_head_* op (tied and
untied heads). Numerics: approx logits are the code logits scattered to the vocab;
exact-mode argmax equals the full head's on random hidden states, both when the
bound proves (clustered heads) and when it falls back. The default-model test checks
token identity of greedy generation (marked `model`)."""

from __future__ import annotations

import pytest
import torch

from slimfx.calibrate.vq_head import build_artifact
from slimfx.compiler.anatomy import is_linear
from slimfx.runtime import vq_head as rt
from slimfx.runtime.models import tiny_model


def _artifact(model, k, tmp_path, name="head.safetensors"):
    w = model.get_output_embeddings().weight
    return rt.save_artifact(build_artifact(w, k, seed=0), tmp_path / name)


def _compile(model, path, **opts):
    cfg = {"compile": {"pipeline": "vq"}, "pipelines": {"vq": ["vq_logits"]},
           "passes": {"vq_logits": opts}, "artifacts": {"vq_head": str(path)}}
    graphs = []

    def backend(gm, example_inputs, **kw):
        from slimfx.compiler.backend import slimfx_backend

        fn = slimfx_backend(gm, example_inputs, options={"config": cfg})
        graphs.append(gm)
        return fn

    return torch.compile(lambda ids: model(input_ids=ids, use_cache=False).logits, backend=backend), graphs


def _ops(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


@pytest.mark.parametrize("arch", ["llama_gqa", "llama_untied"])
@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_head_is_replaced(arch, mode, tmp_path):
    model = tiny_model(arch)
    fn, graphs = _compile(model, _artifact(model, 8, tmp_path), mode=mode)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        ref, out = model(input_ids=ids, use_cache=False).logits, fn(ids)
    gm = graphs[0]
    assert len(_ops(gm, f"vq_head_{mode}")) == 1
    vocab_linears = [n for n in gm.graph.nodes if is_linear(n) and n.meta["example_value"].shape[-1] == 128]
    assert not vocab_linears  # the full-vocab linear is gone
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if mode == "exact":
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_approx_logits_are_code_logits(tmp_path):
    model = tiny_model("llama_untied")
    path = _artifact(model, 8, tmp_path)
    art = rt.load_artifact(path)
    fn, _ = _compile(model, path, mode="approx")
    captured = {}

    def keep_input(module, inputs, output):  # returns None: the output is left alone
        captured["h"] = inputs[0]

    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        out = fn(ids)
        handle = model.lm_head.register_forward_hook(keep_input)
        model(input_ids=ids, use_cache=False)
        handle.remove()
    expect = (captured["h"] @ art.codebook.T)[..., art.token_to_code.long()]
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_last_position_only_broadcasts_last_logits(tmp_path, fresh_dynamo):
    model = tiny_model("llama_gqa")
    fn, graphs = _compile(model, _artifact(model, 8, tmp_path), mode="exact", last_position_only=True)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        ref, out = model(input_ids=ids, use_cache=False).logits, fn(ids)
    assert out.shape == ref.shape
    assert torch.equal(out[:, -1].argmax(-1), ref[:, -1].argmax(-1))
    assert torch.equal(out[:, 0], out[:, -1])  # a view of the last position
    assert _ops(graphs[0], "vq_head_exact")[0].args[0].target.__name__ == "getitem"


def test_missing_or_foreign_artifact_is_a_config_error(tmp_path):
    model = tiny_model("llama_untied")
    fn, _ = _compile(model, tmp_path / "missing.safetensors", mode="exact")
    with pytest.raises(Exception, match=r"artifacts\.vq_head .*no such file"):
        fn(torch.randint(0, 128, (1, 4)))
    torch._dynamo.reset()
    other = tiny_model("llama_untied", seed=7)  # same shapes, other weights
    fn, _ = _compile(model, _artifact(other, 8, tmp_path, "other.safetensors"), mode="approx")
    with pytest.raises(Exception, match="does not match this model's LM head"):
        fn(torch.randint(0, 128, (1, 4)))


def _clustered_head(v=400, h=32, k=20, spread=0.05, seed=0):
    """Head rows around k directions (a head with real cluster structure)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(k, h, generator=gen), dim=1) * 3
    codes = torch.arange(v) % k
    return centers[codes] + spread * torch.randn(v, h, generator=gen)


@pytest.mark.parametrize("spread,probes", [(0.05, 1), (0.05, 3), (1.0, 2), (1.0, 19)])
def test_exact_head_argmax_equals_full_head(spread, probes):
    w = _clustered_head(spread=spread)
    art = build_artifact(w, 20, seed=0)
    members = art.members
    slack = rt.exact_slack(w, art.codebook, members)
    gen = torch.Generator().manual_seed(1)
    # Hidden states near head rows (a confident next token) and plain random ones.
    h = torch.cat([4 * w[torch.randint(0, 400, (24,), generator=gen)], torch.randn(24, 32, generator=gen)])
    h = h + 0.1 * torch.randn(h.shape, generator=gen)
    out, proved, token = rt.exact_head(h, w, art.codebook, slack, members, probes)
    full = h @ w.T
    assert torch.equal(out.argmax(1), full.argmax(1))
    assert torch.equal(token[proved], full.argmax(1)[proved])
    assert torch.equal(out[~proved], full[~proved])  # the fallback is the full head
    finite = torch.isfinite(out[proved])
    torch.testing.assert_close(out[proved][finite], full[proved][finite])  # opened members are exact
    if spread == 0.05:
        assert proved[:24].all()  # tight clusters + confident rows: the bound proves
    # The bound is a bound: no unopened token's logit exceeds its code's upper bound.
    scores, bounds = (h @ art.codebook.T), (h @ art.codebook.T) + h.norm(dim=1, keepdim=True) * slack
    assert (full <= bounds[:, art.token_to_code.long()] + 1e-4).all()


def test_exact_op_counts_routes(tmp_path):
    w = _clustered_head()
    art = build_artifact(w, 20)
    counters = rt.new_counters("test_counts", "cpu")
    h = torch.cat([4 * w[:3], torch.randn(2, 32)])
    slack = rt.exact_slack(w, art.codebook, art.members)
    out = torch.ops.slimfx.vq_head_exact(h[None], w, art.codebook, slack, art.members, counters, 1)
    assert out.shape == (1, 5, 400)
    _, proved, _ = rt.exact_head(h, w, art.codebook, slack, art.members, 1)
    counts = rt.route_counts("test_counts")["test_counts"]
    assert counts["bound"] == int(proved.sum()) and counts["bound"] + counts["fallback"] == 5


@pytest.mark.model
def test_exact_mode_greedy_tokens_identical_on_default_model(default_model, tmp_path):
    """64 greedy tokens for several prompts: the exact VQ head gives the unmodified model's tokens."""
    from slimfx.compiler.cmd_calibrate import head_weight
    from slimfx.runtime import generate
    from slimfx.runtime.models import chat_input_ids

    model, tok = default_model
    # K=256 with 3 k-means iterations keeps the test short; exactness must not depend on K.
    path = rt.save_artifact(build_artifact(head_weight(model), 256, seed=0, iters=3), tmp_path / "smol.safetensors")
    cfg = {"compile": {"pipeline": "vq"}, "pipelines": {"vq": ["vq_logits"]},
           "passes": {"vq_logits": {"mode": "exact", "probes": 8}}, "artifacts": {"vq_head": str(path)}}
    rt.reset_counts()
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    rows = [chat_input_ids(tok, p)[0] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    # The runtime's fast loop with passes off is token-identical to the unmodified model
    # (tests/test_runtime_generate.py); its static shapes compile once for all steps.
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=64).tokens
    out = generate(model, ids, attention_mask=mask, max_new_tokens=64, config=cfg).tokens
    assert torch.equal(out, ref)
    routed = sum(c["bound"] + c["fallback"] for c in rt.route_counts().values())
    assert routed >= 3 * 63  # the VQ head ran for every decode step of every prompt
