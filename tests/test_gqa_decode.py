"""codegen/gqa_decode.py: the decode SDPA over transformers' repeat_kv is found in a real HF
graph, replaced by slimfx::gqa_decode_attention, and the replacement computes the same
attention (reference path exactly; the split-KV kernel under the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimfx.codegen.gqa_decode import gqa_decode_attention, rewrite_gqa_decode


def _decode_graph(num_kv_heads: int):
    """The dynamo graph of one StaticCache decode step of a tiny HF Llama, and its inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=num_kv_heads,
                      head_dim=16, intermediate_size=96, vocab_size=128)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    cache = StaticCache(config=cfg, max_cache_len=24)
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 10)), past_key_values=cache, cache_position=torch.arange(10), use_cache=True)
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    def step(tok, pos):
        return model(tok, past_key_values=cache, cache_position=pos, position_ids=pos[None], use_cache=True).logits

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(step, backend=backend, fullgraph=True)(torch.tensor([[5]]), torch.tensor([10]))
    return captured[0]


def _sdpa_count(gm) -> int:
    return sum(n.op == "call_function" and "scaled_dot_product" in str(n.target) for n in gm.graph.nodes)


def test_rewrite_replaces_every_layer_of_a_gqa_decode_step_and_keeps_the_result():
    gm, inputs = _decode_graph(num_kv_heads=2)
    assert _sdpa_count(gm) == 2
    # The step writes the cache in place: snapshot the mutable inputs so both runs start equal.
    snapshot = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    with torch.no_grad():
        expected = gm(*inputs)
    assert rewrite_gqa_decode(gm) == 2
    assert _sdpa_count(gm) == 0
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.slimfx.gqa_decode_attention.default]
    assert len(ops) == 2
    five_d = [n for n in gm.graph.nodes if getattr(n.meta.get("example_value"), "ndim", 0) == 5]
    assert not five_d  # the repeat chains (cache[:, :, None].expand(...)) are gone
    with torch.no_grad():
        for t, s in zip(inputs, snapshot):
            if isinstance(t, torch.Tensor):
                t.copy_(s)
        got = gm(*inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # CPU: the reference path is the same SDPA


def test_multi_token_queries_are_left_alone():
    q = torch.randn(1, 4, 3, 16)

    def fn(q, cache):
        key = cache[:, :, None, :, :].expand(1, 2, 2, 24, 16).reshape(1, 4, 24, 16)
        return F.scaled_dot_product_attention(q, key, key)

    gm = torch.fx.symbolic_trace(fn)
    # symbolic_trace has no example values: the shape checks cannot pass, so nothing changes.
    assert rewrite_gqa_decode(gm) == 0
    gm_graph, _ = _decode_graph(num_kv_heads=4)  # MHA: transformers skips repeat_kv, nothing to do
    assert rewrite_gqa_decode(gm_graph) == 0


@pytest.mark.parametrize("mask_batch", [None, 1, 2])
def test_kernel_path_matches_reference_under_interpreter(monkeypatch, mask_batch):
    from slimfx.codegen.triton_gen import interpreter_on

    if not interpreter_on():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, L, D = 2, 6, 2, 40, 16
    q = torch.randn(B, Hq, 1, D, generator=gen)
    k, v = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    mask = None if mask_batch is None else torch.rand(mask_batch, 1, 1, L, generator=gen) < 0.7
    if mask is not None:
        mask[..., 0] = True  # every query sees a key (SDPA gives NaN otherwise)
    monkeypatch.setenv("SLIMFX_ATTENTION", "ref")
    ref = gqa_decode_attention(q, k, v, mask, 0.3)
    monkeypatch.setenv("SLIMFX_ATTENTION", "triton")
    out = gqa_decode_attention(q, k, v, mask, 0.3)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
