"""The fast generation loop and HF generate on slimfx-compiled models.

Tiny random-weight models check exactness, padding, chunking, recompilation, sampling
and streaming quickly; the `model`-marked test checks token identity on the real
default model (SmolLM2-135M, 128 greedy tokens, several prompt lengths, a padded batch).
"""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import slimfx.runtime as runtime
from slimfx.compiler.config import ConfigError
from slimfx.runtime.generate import GenerateError, argmax_last, generate, get_generator, sample_next
from slimfx.runtime.models import tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def lively_tiny(arch="llama_gqa", layers=2, seed=0):
    """A tiny model whose greedy output is not one repeated token (default init is too flat)."""
    model = tiny_model(arch, layers=layers, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(DEVICE)


def padded_batch(lengths, vocab=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=gen)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        ids[b, : T - n] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


@torch.no_grad()
def hf_greedy(model, ids, mask, new):
    """The unmodified model's greedy continuation of each prompt, run alone (no padding,
    HF DynamicCache), for exactly `new` tokens: a plain loop, so neither EOS handling nor
    min-length logit processing of HF generate changes the reference."""
    outs = []
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()][None]
        out = model(real, use_cache=True)
        past, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1)]
        for _ in range(new - 1):
            out = model(tokens[-1][:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(out.logits[:, -1].argmax(-1))
        outs.append(torch.cat(tokens).cpu())
    return torch.stack(outs)


@pytest.fixture(scope="module")
def tiny():
    return lively_tiny()


def test_runtime_exports_the_generate_function():
    assert runtime.generate is generate


@pytest.mark.parametrize("arch", ["llama_gqa", "llama_mha", "qwen2"])
def test_fast_loop_matches_unmodified_model_with_left_padding(arch):
    model = lively_tiny(arch)
    ids, mask = padded_batch([9, 3, 6])
    tokens, stats = generate(model, ids, attention_mask=mask, max_new_tokens=24)
    assert tokens.shape == (3, 24)
    assert torch.equal(tokens, hf_greedy(model, ids, mask, 24))
    assert stats["kv_bytes"] > 0 and stats["cuda_graph"] == (DEVICE == "cuda")


def test_chunked_prefill_is_exact_when_capacity_covers_the_sequence(tiny):
    ids, mask = padded_batch([40, 21], seed=1)
    tokens, _ = generate(tiny, ids, attention_mask=mask, max_new_tokens=12, prefill_chunk=16, capacity=80)
    assert torch.equal(tokens, hf_greedy(tiny, ids, mask, 12))


def test_capacity_below_the_request_is_refused_and_the_boundary_is_exact(tiny):
    ids, mask = padded_batch([50, 31], seed=2)
    # 50 real prompt tokens + 3 decoded and written (the 4th is sampled, never written) = 53:
    # the bucket's padding (to 64) is never stored.
    with pytest.raises(ConfigError, match=r"^capacity 52: the request writes 53 KV slots per attention site .*"
                                          r"allowed: at least 53, or sliding_window=True"):
        generate(tiny, ids, attention_mask=mask, max_new_tokens=4, prefill_chunk=16, capacity=52)
    tokens, stats = generate(tiny, ids, attention_mask=mask, max_new_tokens=4, prefill_chunk=16, capacity=53)
    assert torch.equal(tokens, hf_greedy(tiny, ids, mask, 4)) and stats["sliding_window"] is None


def test_a_per_site_capacity_below_the_request_is_refused(tiny):
    ids, mask = padded_batch([20], seed=2)
    with pytest.raises(ConfigError, match=r"^capacities\[1\] 16: the request writes 23 KV slots"):
        generate(tiny, ids, attention_mask=mask, max_new_tokens=4, capacity=64, capacities={1: 16})


def test_sliding_window_opt_in_keeps_the_most_recent_tokens_and_says_so(tiny):
    ids, mask = padded_batch([50], seed=2)
    _, stats = generate(tiny, ids, attention_mask=mask, max_new_tokens=4, prefill_chunk=16, capacity=24, sliding_window=True)
    assert stats["sliding_window"] == 24
    store = get_generator(tiny, 1, 24).store
    assert len(store.sites) == 2
    for cache in store.sites.values():
        held = cache.slot_pos[0, 0].sort().values
        assert torch.equal(held.cpu(), torch.arange(53 - 24, 53, dtype=held.dtype))
    assert torch.equal(store.seen.cpu(), torch.tensor([53]))


def test_a_sliding_window_model_needs_only_its_window():
    """Every layer of a Mistral with window 8 reads its last 8 tokens: a capacity of 8 drops
    nothing the model reads, so it needs no opt-in and gives the large store's tokens."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MistralForCausalLM(tf.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                                   sliding_window=8)).eval().to(DEVICE)
    ids, mask = padded_batch([20], seed=5)
    small, stats = generate(model, ids, attention_mask=mask, max_new_tokens=6, capacity=8)
    assert stats["sliding_window"] is None
    assert torch.equal(small, generate(model, ids, attention_mask=mask, max_new_tokens=6, capacity=64)[0])
    with pytest.raises(ConfigError, match=r"^capacity 7: sliding-window layer 0 attends to its last 8 tokens"):
        generate(model, ids, attention_mask=mask, max_new_tokens=6, capacity=7)


def test_no_recompilation_across_200_decode_steps(tiny, fresh_dynamo):
    ids, mask = padded_batch([7, 5], seed=3)
    generate(tiny, ids, attention_mask=mask, max_new_tokens=4, capacity=256)  # warm-up: compiles
    graphs_before = counters["stats"]["unique_graphs"]
    tokens, stats = generate(tiny, ids, attention_mask=mask, max_new_tokens=203, capacity=256)
    assert counters["stats"]["unique_graphs"] == graphs_before, "decode steps recompiled"
    assert stats["decode_steps"] == 200
    assert stats["cuda_graph"] == (DEVICE == "cuda")


def test_streaming_callback_gets_every_token_in_order(tiny):
    ids, mask = padded_batch([5, 8], seed=4)
    chunks = []
    tokens, _ = generate(tiny, ids, attention_mask=mask, max_new_tokens=21, stream_interval=4, callback=lambda t, i: chunks.append((i, t)))
    assert [i for i, _ in chunks] == sorted(i for i, _ in chunks) and chunks[0][0] == 0
    assert torch.equal(torch.cat([t for _, t in chunks], dim=1), tokens)


def test_eos_stops_sequences_and_pads_after(tiny):
    ids, mask = padded_batch([6], seed=5)
    free, _ = generate(tiny, ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[0, 3])
    first = int((free[0] == eos).nonzero()[0])
    tokens, _ = generate(tiny, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=127)
    assert torch.equal(tokens[0, : first + 1], free[0, : first + 1])
    assert (tokens[0, first + 1:] == 127).all()


def test_sampling_is_reproducible_and_in_vocab(tiny):
    ids, mask = padded_batch([6, 4], seed=6)
    a, _ = generate(tiny, ids, attention_mask=mask, max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    b, _ = generate(tiny, ids, attention_mask=mask, max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    greedy, _ = generate(tiny, ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(a, b)
    assert ((a >= 0) & (a < 128)).all()
    assert not torch.equal(a, greedy)


def test_sample_next_restrictions():
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, 0.0), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), greedy)
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        pick = sample_next(logits, 2.0, top_k=5)
        assert (top5 == pick[:, None]).any(dim=1).all()


def test_sample_next_follows_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    freq = torch.bincount(sample_next(logits, 1.0), minlength=4).float() / 20000
    assert torch.allclose(freq, probs, atol=0.02)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature: got nan; allowed: a finite number"),
    (dict(temperature=float("inf")), "temperature: got inf"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(prefill_chunk=100), "prefill_chunk"),
    (dict(capacity=0), "capacity"),
])
def test_generate_rejects_bad_arguments(tiny, kwargs, match):
    ids, _ = padded_batch([4])
    with pytest.raises(GenerateError, match=match):
        generate(tiny, ids, **kwargs)


def test_generate_rejects_right_padding(tiny):
    ids, mask = padded_batch([4, 2])
    with pytest.raises(GenerateError, match="left"):
        generate(tiny, ids, attention_mask=mask.flip(1))


def test_hf_generate_works_on_a_slimfx_compiled_model(tiny):
    """`model.generate` on a model whose forward is compiled with slimfx (routed to the
    runtime) gives HF's own greedy tokens with passes off."""
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    ref = tiny.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    tiny.forward = torch.compile(tiny.forward, backend="slimfx")
    try:
        out = tiny.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        torch.manual_seed(0)
        sampled = tiny.generate(ids, max_new_tokens=10, do_sample=True, top_k=10, pad_token_id=0)
    finally:
        del tiny.forward
        torch._dynamo.reset()
    assert torch.equal(out, ref)
    assert sampled.shape == (2, 17) and ((sampled >= 0) & (sampled < 128)).all()


# ----------------------------------------------------------------------------- the real default model

PROMPTS = [
    "Hi",
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea, the wind and a lighthouse keeper who has not seen another person in years.",
]


@pytest.mark.model
def test_default_model_token_identity_128_tokens(default_model):
    """Capacity >= total length: the fast loop equals the unmodified model, for single prompts
    of several lengths and for the three prompts batched with left padding."""
    from slimfx.runtime.models import chat_input_ids

    model, tok = default_model
    model = model.to(DEVICE)
    start = time.perf_counter()
    chats = [chat_input_ids(tok, p)[0] for p in PROMPTS]
    T = max(len(c) for c in chats)
    ids = torch.full((3, T), tok.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(3, T, dtype=torch.int64)
    for b, c in enumerate(chats):
        ids[b, T - len(c):] = c
        mask[b, T - len(c):] = 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    ref = hf_greedy(model, ids, mask, 128)
    batched, _ = generate(model, ids, attention_mask=mask, max_new_tokens=128)
    assert len({len(c) for c in chats}) == 3
    for b in range(3):
        assert torch.equal(batched[b], ref[b]), f"prompt {b} (batched) differs from the unmodified model"
    single, _ = generate(model, chats[2][None].to(DEVICE), max_new_tokens=128)  # alone, unpadded
    assert torch.equal(single[0], ref[2]), "prompt 2 (alone) differs from the unmodified model"
    print(f"default-model identity test: {time.perf_counter() - start:.1f} s")


def test_codegen_auto_follows_the_config_then_the_device():
    from slimfx.runtime.generate import _resolve_codegen

    slimfx_cfg = {"compile": {"codegen": "slimfx"}}
    assert _resolve_codegen("auto", slimfx_cfg, is_cuda=False) == "slimfx"
    assert _resolve_codegen("eager", slimfx_cfg, is_cuda=True) == "eager"  # an explicit argument wins
    assert _resolve_codegen("auto", {"compile": {"codegen": "auto"}}, is_cuda=True) == "inductor"
    assert _resolve_codegen("auto", None, is_cuda=False) == "eager"


def test_prefill_graphs_are_told_apart_from_the_decode_step():
    from slimfx.runtime.lowering import is_prefill_graph, with_prefill_cudagraph

    weight = torch.nn.Parameter(torch.zeros(4, 4))
    prefill = [weight, torch.zeros(1, 16, dtype=torch.int64), torch.zeros(1, 16, dtype=torch.int64)]
    decode = [weight, torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64)]
    assert is_prefill_graph(prefill) and not is_prefill_graph(decode)

    def run(*args):
        return args[0]

    assert with_prefill_cudagraph(run, prefill) is run  # CPU tensors: nothing to capture


@settings(max_examples=60, deadline=None)
@given(v=st.sampled_from([7, 255, 256, 512, 1000, 4099, 49152, 128256]), rows=st.integers(1, 3),
       levels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_two_stage_argmax_is_argmax_ties_included(v, rows, levels, seed):
    """Few distinct values (levels) make ties common: the first maximal index must win, as
    in torch.argmax, whether the row is split into groups or not."""
    x = torch.randint(0, levels, (rows, v), generator=torch.Generator().manual_seed(seed)).float()
    assert torch.equal(argmax_last(x), x.argmax(dim=-1))
    assert torch.equal(argmax_last(x.bfloat16()), x.bfloat16().argmax(dim=-1))
