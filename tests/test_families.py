"""The architecture families users load, as tiny random-weight HF configs, through the
runtime with passes off: token-identical to the unmodified model (greedy, left-padded
batch, prompts longer than the sliding windows) with teacher-forced logits within
tolerance, and identical under an eviction budget that covers every token; or refused
with one line naming the sites and why."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from slimfx.compiler.errors import UsageError
from slimfx.measure.footprint import kv_bytes_at, model_footprint
from slimfx.runtime.generate import generate, get_generator
from tests.test_runtime_generate import DEVICE, hf_greedy, padded_batch

WINDOW = 8
NEW = 8
CAPACITY = 64  # >= the padded prompt (32) + NEW: the store holds every token
LENGTHS = [14, 19]  # both prompts longer than the sliding windows
# One layer where every layer attends alike (dynamo's trace, most of each case's time, grows
# with depth); two where sliding and global layers alternate.
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=128, max_position_embeddings=256)
_ALTERNATING = dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
_MHA = dict(num_hidden_layers=1, num_attention_heads=4, vocab_size=128)

# family -> (model maker, attention implementation the family runs with)
EXACT = {
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON)), "sdpa"),
    "llama_bias": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True)), "sdpa"),
    "qwen2_sliding_global": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**_COMMON, **_ALTERNATING}, use_sliding_window=True,
                                                                          sliding_window=WINDOW)), "sdpa"),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, head_dim=16)), "sdpa"),
    "mistral_sliding": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, sliding_window=WINDOW)), "sdpa"),
    "phi3_sliding": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_COMMON, pad_token_id=0, sliding_window=WINDOW)), "sdpa"),
    # Gemma-2 needs eager attention (HF: SDPA has no softcap). A cap of 5 bites at these
    # weights (the greedy tokens change without it); an untied head keeps greedy output lively.
    "gemma2_softcap_sliding_global": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **{**_COMMON, **_ALTERNATING}, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0, tie_word_embeddings=False)),
        "eager"),
    "gemma3_sliding_global": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{**_COMMON, **_ALTERNATING}, head_dim=16, sliding_window=WINDOW,
                                                                                  tie_word_embeddings=False)), "sdpa"),
    # Conv1D projections (addmm): the kv heads are read off the key's shape
    "gpt2_conv1d": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=256)), "sdpa"),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, intermediate_size=96, **_MHA,
                                                                max_position_embeddings=256)), "sdpa"),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=96, **_MHA, max_position_embeddings=256,
                                                   word_embed_proj_dim=64)), "sdpa"),
    # matmul projections (FalconLinear), fused grouped QKV
    "falcon": (lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=64, **_MHA, new_decoder_architecture=True,
                                                            num_kv_heads=2)), "sdpa"),
    "stablelm": (lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**_COMMON)), "sdpa"),
    # q/k norms over the whole projection, before the head split
    "olmo2": (lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**_COMMON)), "sdpa"),
}

# family -> (maker, attention, what the refusal names)
REFUSED = {
    "falcon_alibi": (lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=64, **_MHA, alibi=True)), "sdpa",
                     "that is not only a mask (ALiBi"),
    # BLOOM's scores start from baddbmm(alibi, q, k): no attention the anatomy recognises
    "bloom_alibi": (lambda: tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=1, n_head=4, vocab_size=128)), "eager",
                    "found no attention"),
}

# Eviction relays a site out to a variant without logit softcapping: refused at the op.
EVICTION_REFUSED = {"gemma2_softcap_sliding_global": "logit softcapping is read by the plain variant only"}
_EVICT = {"pipelines": {"e": ["kv_eviction"]}, "compile": {"pipeline": "e"},
          "passes": {"kv_eviction": {"policy": "h2o", "budget": CAPACITY, "n_sink": 2, "window": 4}}}


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
    return model.to(DEVICE)


@torch.inference_mode()  # the store's tensors were made under inference mode
def _forced_logits(model, ids, mask, forced) -> tuple[torch.Tensor, torch.Tensor]:
    """(runtime, unmodified) logits [B, NEW, V] of the last prompt token and of each of
    `forced`'s tokens but the last, fed one per decode step (the generator generate() built)."""
    gen = get_generator(model, ids.shape[0], CAPACITY)
    gen.store.reset()
    lengths = mask.sum(1)
    rows = [gen.prefill(ids, lengths, 16)]
    for t in range(forced.shape[1] - 1):
        positions = gen.store.step_positions(1)
        positions.copy_(gen.store.seen[:, None])
        rows.append(gen.step_fn(model, forced[:, t:t + 1].to(ids.device), positions))
        gen.store.seen.add_(1)
    want = []
    for b in range(ids.shape[0]):
        full = torch.cat([ids[b][mask[b].bool()], forced[b, :-1].to(ids.device)])[None]
        want.append(model(full, use_cache=False).logits[0, int(lengths[b]) - 1:])
    return torch.stack(rows, dim=1).float(), torch.stack(want).float()


@pytest.mark.parametrize("family", sorted(EXACT))
def test_family_runs_exactly_past_its_window(family):
    model = _lively(*EXACT[family])
    ids, mask = padded_batch(LENGTHS)
    want = hf_greedy(model, ids, mask, NEW)
    assert len(set(want[0].tolist())) > 2  # a lively model: the check can tell attentions apart
    got = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, prefill_chunk=16, capacity=CAPACITY)
    assert torch.equal(got.tokens, want)
    runtime, unmodified = _forced_logits(model, ids, mask, want)
    torch.testing.assert_close(runtime, unmodified, atol=1e-3, rtol=1e-4)
    if family in EVICTION_REFUSED:
        with pytest.raises(UsageError, match=EVICTION_REFUSED[family]):
            generate(model, ids, attention_mask=mask, max_new_tokens=NEW, prefill_chunk=16, capacity=CAPACITY, config=_EVICT)
        return
    evicted = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, prefill_chunk=16, capacity=CAPACITY, config=_EVICT)
    assert torch.equal(evicted.tokens, want)  # a budget covering every token evicts nothing


def test_sliding_layers_hold_only_their_window():
    """Store bytes at a long prompt = (window x sliding sites + length x global sites) x bytes
    per slot, and the footprint report counts the same tokens."""
    model = _lively(*EXACT["qwen2_sliding_global"])
    ids = torch.randint(1, 128, (1, 32), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    length = 40  # the prompt and 8 new tokens: the store's capacity is the whole length
    _, stats = generate(model, ids, max_new_tokens=length - 32, prefill_chunk=16, capacity=length)
    kv_heads, head_dim = 2, 16
    per_slot = kv_heads * (2 * head_dim * 4 + 4)  # K and V fp32 + an int32 position per kv head
    assert stats["kv_bytes"] == (WINDOW * 1 + length * 1) * per_slot
    fp = model_footprint(model)
    assert fp["kv_site_windows"] == {0: WINDOW}
    assert kv_bytes_at(fp, length) == (WINDOW * 1 + length * 1) * 2 * kv_heads * head_dim * 4
    assert kv_bytes_at(fp, 4) == 4 * fp["kv_bytes_per_token"]  # within the window a sliding site holds every token


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_the_runtime_cannot_run_exactly_is_refused_in_one_line(family):
    make, attn, why = REFUSED[family]
    model = _lively(make, attn)
    ids, mask = padded_batch([9, 12])
    with pytest.raises(UsageError) as err:
        generate(model, ids, attention_mask=mask, max_new_tokens=4)
    assert "cannot run this model exactly" in str(err.value) and why in str(err.value) and "\n" not in str(err.value)
