"""Anatomy from the graph alone, for every supported architecture."""

import pytest
import torch

from slimfx.compiler.anatomy import analyze, capture_graph
from slimfx.runtime.models import tiny_model

EXPECTED = {
    # arch: (q heads, kv heads, fused qkv, tied head, mlp roles, q/k/v bias)
    "llama_mha": (4, 4, False, True, {"gate", "up", "down"}, False),
    "llama_gqa": (4, 2, False, True, {"gate", "up", "down"}, False),
    "llama_untied": (4, 2, False, False, {"gate", "up", "down"}, False),
    "qwen2": (4, 2, False, False, {"gate", "up", "down"}, True),
    "mistral": (4, 2, False, False, {"gate", "up", "down"}, False),
    "phi3": (4, 2, True, False, {"gate_up", "down"}, False),
}


def _anatomy(arch, layers=3, attn="sdpa"):
    model = tiny_model(arch, layers=layers, attn_implementation=attn)
    return analyze(capture_graph(model, torch.randint(0, 128, (1, 6))))


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_hf_architectures(arch):
    q_heads, kv_heads, fused, tied, mlp_roles, qkv_bias = EXPECTED[arch]
    a = _anatomy(arch, layers=3)
    assert a.unrecognised == []
    assert (a.vocab_size, a.hidden_size) == (128, 64)
    assert len(a.attention_sites) == 3 and len(a.blocks) == 3
    for i, site in enumerate(a.attention_sites):
        assert site.kind == "sdpa"
        assert (site.n_q_heads, site.n_kv_heads, site.head_dim) == (q_heads, kv_heads, 16)
        assert site.fused_qkv is fused
        assert site.rotary == "rotate_half"
        assert site.cache.kind == "concat"  # HF DynamicCache: torch.cat onto the past
        proj = a.linear(site.q_proj)
        assert proj.block == i and proj.weight == f"model.layers.{i}.self_attn.{'qkv_proj' if fused else 'q_proj'}.weight"
        assert proj.bias is qkv_bias
        assert a.linear(site.o_proj).weight == f"model.layers.{i}.self_attn.o_proj.weight"
        if not fused:
            assert a.linear(site.k_proj).out_features == kv_heads * 16
            assert a.linear(site.v_proj).role == "v"
    for block in a.blocks:
        assert set(block.mlp.linears) == mlp_roles and block.mlp.activation == "silu"
        assert block.input_norm == "rms_norm" and len(block.residual_adds) == 2
    assert a.final_norm == "rms_norm"
    assert a.lm_head.out_features == 128 and a.tied_head is tied
    assert a.lm_head.weight == ("model.embed_tokens.weight" if tied else "lm_head.weight")
    per_block = 4 - (2 if fused else 0) + len(mlp_roles)
    assert len(a.linears) == 3 * per_block + 1
    assert a.kv_bytes_per_token(2) == 3 * 2 * kv_heads * 16 * 2


@pytest.mark.parametrize("arch", ["llama_gqa", "phi3"])
def test_handwritten_attention_matmul_softmax(arch):
    """HF 'eager' attention is matmul -> softmax -> matmul: found the same way as SDPA."""
    a = _anatomy(arch, layers=2, attn="eager")
    assert a.unrecognised == []
    assert [s.kind for s in a.attention_sites] == ["matmul_softmax"] * 2
    assert all(s.n_kv_heads == 2 and s.o_proj for s in a.attention_sites)


def test_decode_step_graph_sees_cache_inputs():
    """Second step: past keys/values are graph inputs concatenated with the new ones."""
    from transformers import DynamicCache

    model = tiny_model("llama_gqa")
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 5)), past_key_values=cache, use_cache=True)
    gm = capture_graph(model, torch.randint(0, 128, (1, 1)), past_key_values=cache, use_cache=True)
    a = analyze(gm)
    for site in a.attention_sites:
        assert site.cache.kind == "concat"
        assert len(site.cache.key_inputs) == 1 and len(site.cache.value_inputs) == 1
        assert site.cache.update_nodes


def _gptfast():
    from slimfx.runtime.models import load_example_module

    return load_example_module("gptfast_model")


def test_handwritten_gptfast_model():
    mod = _gptfast()
    model = mod.tiny_gptfast(n_layer=3)
    a = analyze(capture_graph(model, torch.randint(0, 256, (1, 5)), torch.arange(5)))
    assert a.unrecognised == []
    assert len(a.attention_sites) == 3
    for i, s in enumerate(a.attention_sites):
        assert (s.n_q_heads, s.n_kv_heads, s.head_dim, s.fused_qkv) == (4, 2, 16, True)
        assert s.rotary == "interleaved"
        assert s.cache.kind == "inplace"  # k_cache[:, :, pos] = k
        assert s.cache.key_inputs == [f"layers.{i}.attention.kv_cache.k_cache"]
        assert a.linear(s.q_proj).weight == f"layers.{i}.attention.wqkv.weight"
    assert all(set(b.mlp.linears) == {"gate", "up", "down"} for b in a.blocks)
    assert a.lm_head.weight == "output.weight" and a.tied_head is False


def test_unrecognisable_graph_says_so():
    """A plain MLP has no attention: the anatomy reports it instead of guessing."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    a = analyze(capture_graph(model, torch.randn(2, 8)))
    assert a.attention_sites == [] and a.blocks == []
    assert any("no attention sites" in u for u in a.unrecognised)
    assert a.lm_head is None


@pytest.mark.model
def test_default_model_anatomy(default_model):
    model, tok = default_model
    a = analyze(capture_graph(model, torch.tensor([[1, 2, 3, 4]])))
    assert a.unrecognised == []
    assert len(a.attention_sites) == 30 and len(a.blocks) == 30
    assert {(s.n_q_heads, s.n_kv_heads, s.head_dim) for s in a.attention_sites} == {(9, 3, 64)}
    assert (a.vocab_size, a.hidden_size) == (49152, 576)
    assert a.tied_head is True and a.lm_head.in_features == 576
    assert len(a.linears) == 30 * 7 + 1
    assert {l.role for l in a.linears} == {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def test_static_cache_graphs_are_inplace_updates():
    """HF StaticCache: buffers written with index_copy_ (allocated in the first graph,
    graph inputs afterwards) are recognised as in-place KV updates."""
    from transformers import StaticCache

    model = tiny_model("llama_gqa")
    cache = StaticCache(config=model.config, max_cache_len=32)
    first = analyze(capture_graph(model, torch.randint(0, 128, (1, 5)), past_key_values=cache, use_cache=True, cache_position=torch.arange(5)))
    step = analyze(capture_graph(model, torch.randint(0, 128, (1, 1)), past_key_values=cache, use_cache=True, cache_position=torch.tensor([5])))
    for a in (first, step):
        assert a.unrecognised == []
        for site in a.attention_sites:
            assert site.cache.kind == "inplace" and len(site.cache.update_nodes) == 2
            assert site.n_kv_heads == 2 and a.linear(site.k_proj).role == "k"


def _weights_seen_by_backend(compile_target, call):
    """Linear weight paths the slimfx anatomy reports for the graph dynamo hands a backend."""
    seen = []

    def backend(gm, example_inputs, **_):
        seen.append(sorted(l.weight for l in analyze(gm).linears))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        call(torch.compile(compile_target, backend=backend))
    torch._dynamo.reset()
    return seen[0]


def test_parameter_paths_do_not_depend_on_how_the_model_is_compiled():
    """The same parameter gets the same name whether dynamo sees the model as `self`,
    `args[0]`, a function argument or a bound `forward`: the name comes from the
    tensor's source, not from dynamo's placeholder spelling."""
    model = tiny_model("llama_gqa", layers=2)
    ids = torch.randint(0, 128, (1, 5))
    expected = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and n != "model.embed_tokens.weight")
    expected.append("model.embed_tokens.weight")  # the tied head reads the embedding
    as_module = _weights_seen_by_backend(model, lambda m: m(ids))
    as_forward = _weights_seen_by_backend(model.forward, lambda f: f(ids))
    as_argument = _weights_seen_by_backend(lambda m, x: m(x), lambda f: f(model, ids))
    assert as_module == as_forward == as_argument == sorted(expected)


def test_parameter_paths_survive_renamed_placeholders():
    """Renaming every placeholder (another torch release's spelling) changes nothing."""
    model = tiny_model("llama_untied", layers=2)
    gm = capture_graph(model, torch.randint(0, 128, (1, 5)))
    before = [(l.weight, l.role, l.block) for l in analyze(gm).linears]
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        node.name = node.target = f"arg{i}"
    after = [(l.weight, l.role, l.block) for l in analyze(gm).linears]
    assert after == before and ("lm_head.weight", "lm_head", None) in after


def _family_anatomy(family: str, tokens: int = 12):
    """The anatomy of a tiny family of the runtime matrix as the runtime sees it (no model cache)."""
    from tests.test_families import EXACT, REFUSED, _lively

    make, attn = EXACT[family] if family in EXACT else REFUSED[family][:2]
    return analyze(capture_graph(_lively(make, attn), torch.randint(1, 128, (1, tokens)), use_cache=False))


VARIANTS = {
    # family: [(sites, variant text)] as `slimfx inspect` groups them (prompt 12 > window 8)
    "qwen2_sliding_global": [("site 0", "causal, sliding window 8, position rotary (rotate_half), projection bias q/k/v"),
                             ("site 1", "causal, position rotary (rotate_half), projection bias q/k/v")],
    "gemma2_softcap_sliding_global": [("site 0", "causal, sliding window 8, softcap 5, position rotary (rotate_half)"),
                                      ("site 1", "causal, softcap 5, position rotary (rotate_half)")],
    "qwen3": [("site 0", "causal, q/k rms_norm, position rotary (rotate_half)")],
    "opt": [("site 0", "causal, position learned absolute, projection bias q/k/v/o")],
}


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_attention_variant_of_each_site(family):
    a = _family_anatomy(family)
    assert a.variant_groups() == VARIANTS[family]
    assert "attention variants (sites alike grouped):" in a.table() and VARIANTS[family][0][1] in a.table()


def test_alike_sites_are_grouped():
    assert _anatomy("llama_gqa", layers=3).variant_groups() == [("sites 0-2", "causal, position rotary (rotate_half)")]


def test_hand_written_attention_scale_and_softcap_read_off_the_scores():
    site = _family_anatomy("gemma2_softcap_sliding_global").attention_sites[0]
    assert site.kind == "matmul_softmax" and site.variant.scale == 0.0625 and site.variant.softcap == 5.0


def test_what_changes_attention_but_is_not_understood_is_named():
    """ALiBi reaches Falcon's SDPA as a float mask carrying slopes x distance: named, not read as a mask."""
    a = _family_anatomy("falcon_alibi")
    assert all("not only a mask (ALiBi" in s.variant.not_understood[0] for s in a.attention_sites)
    assert any("NOT UNDERSTOOD" in text for _, text in a.variant_groups())
    assert any("not only a mask" in u for u in a.unrecognised)

