"""The architecture families users load, as tiny random-weight HF configs, through the
runtime with passes off: token-identical to the unmodified model (greedy, left-padded
batch, prompts longer than the sliding windows), and identical under an eviction budget
that covers every token; or refused with one line naming the sites and why."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from slimfx.compiler.errors import UsageError
from slimfx.runtime.generate import generate
from tests.test_runtime_generate import hf_greedy, padded_batch

WINDOW = 8
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=128, max_position_embeddings=256)
_ALTERNATING = ["sliding_attention", "full_attention"]

EXACT = {
    "llama_bias": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True)),
    "qwen2_sliding_global": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                                                         layer_types=_ALTERNATING)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, head_dim=16)),
    "mistral_sliding": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, sliding_window=WINDOW)),
    "phi3_sliding": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_COMMON, pad_token_id=0, sliding_window=WINDOW)),
    "gemma3_sliding_global": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=WINDOW,
                                                                                 layer_types=_ALTERNATING)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                               num_attention_heads=4, vocab_size=128, max_position_embeddings=256)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                                  vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=64)),
    "stablelm": lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**_COMMON)),
}

# An eviction budget covering every token is identical too; checked on one family of each
# attention layout (plain GQA, fused projections, sliding/global alternation) to keep CI short.
EVICTED = {"qwen3", "gpt_neox", "gemma3_sliding_global"}

REFUSED = {
    # logit softcapping in eager matmul-softmax attention: not a site the store binds
    "gemma2_softcap": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_COMMON, head_dim=16, sliding_window=WINDOW)), "eager",
                       "not an SDPA call"),
    # GPT-2's Conv1D projections (addmm): head counts not read from them
    "gpt2_conv1d": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256)),
                    "sdpa", "head counts unknown"),
    "falcon": (lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                                            new_decoder_architecture=True, num_kv_heads=2)), "sdpa", "head counts unknown"),
    # q/k norms over the whole projection (before the head split): k never appears at kv-head width
    "olmo2": (lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**_COMMON)), "sdpa", "q/k/v operands not found"),
}


def _lively(make, attn: str = "sdpa"):
    """The family's model with weights large enough that greedy decoding is not one repeated token."""
    torch.manual_seed(0)
    model = make().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.config._attn_implementation = attn
    return model


@pytest.mark.parametrize("family", sorted(EXACT))
def test_family_runs_token_identical_past_its_window(family):
    model = _lively(EXACT[family])
    ids, mask = padded_batch([14, 19])  # both prompts longer than the sliding windows
    want = hf_greedy(model, ids, mask, 10)
    got = generate(model, ids, attention_mask=mask, max_new_tokens=10, prefill_chunk=16)
    assert torch.equal(got.tokens, want)
    if family in EVICTED:
        evict = {"pipelines": {"e": ["kv_eviction"]}, "compile": {"pipeline": "e"},
                 "passes": {"kv_eviction": {"policy": "h2o", "budget": 64, "n_sink": 2, "window": 4}}}
        assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=10, prefill_chunk=16, capacity=64, config=evict).tokens, want)


def test_sliding_layers_hold_only_their_window():
    """Store bytes = (window x sliding sites + capacity x global sites) x bytes per slot."""
    model = _lively(EXACT["qwen2_sliding_global"])
    ids, mask = padded_batch([14, 19])
    _, stats = generate(model, ids, attention_mask=mask, max_new_tokens=10, prefill_chunk=16, capacity=64)
    per_slot = 2 * 2 * (2 * 16 * 4 + 4)  # batch x kv heads x (K and V fp32 + int32 position)
    assert stats["kv_bytes"] == (WINDOW + 64) * per_slot


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_the_store_cannot_bind_is_refused_in_one_line(family):
    make, attn, why = REFUSED[family]
    model = _lively(make, attn)
    ids, mask = padded_batch([9, 12])
    with pytest.raises(UsageError) as err:
        generate(model, ids, attention_mask=mask, max_new_tokens=4)
    assert "cannot run this model exactly" in str(err.value) and why in str(err.value) and "\n" not in str(err.value)
