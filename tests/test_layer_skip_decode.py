"""layer_skip's runtime modes: lossless self-speculative decoding and the SkipDecode schedule.

Speculative: greedy tokens equal the unmodified model's (tiny model with left padding,
the default model's real weights), also when the store holds exactly the positions a
verification writes; sampling follows the full model's distribution (the accept/resample
rule checked against its definition, and the sampled path equal to greedy when top_k = 1);
stores that cannot roll back exactly are refused by name. Schedule: tokens equal an eager
reference (pruned copies of the model over one HF cache), and generation never recompiles.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

from slimfx.compiler.config import ConfigError
from slimfx.runtime.generate import generate
from slimfx.runtime.kv_store import KVStoreError
from slimfx.runtime.models import tiny_model
from slimfx.runtime.skip_schedule import level_of
from slimfx.runtime.speculative import accept_greedy, accept_sampled, best_draft_length

LAYERS = 6


@pytest.fixture(scope="module")
def model():
    """A tiny GQA Llama whose blocks all matter, but not so much that a draft never agrees."""
    m = tiny_model("llama_gqa", layers=LAYERS, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m


@pytest.fixture(scope="module")
def prompts():
    """Two prompts, the second left-padded by 3 tokens."""
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def skip_config(others: dict | None = None, **options) -> dict:
    return {"pipelines": {"s": [*(others or {}), "layer_skip"]}, "compile": {"pipeline": "s"},
            "passes": {**(others or {}), "layer_skip": options}}


SPECULATIVE = dict(blocks=[3], mlp_only=True, mode="speculative", draft_length=4)


# ----------------------------------------------------------------------------- speculative


NEW = 20
AT_CAPACITY = 10 + NEW + SPECULATIVE["draft_length"]  # prompt + new tokens + K: the last verification writes the last slot


@pytest.fixture(scope="module")
def reference(model, prompts):
    ids, mask = prompts
    return generate(model, ids, attention_mask=mask, max_new_tokens=NEW, capacity=AT_CAPACITY)[0]


def speculate(model, prompts, **options):
    ids, mask = prompts
    return generate(model, ids, attention_mask=mask, max_new_tokens=NEW, capacity=AT_CAPACITY,
                    config=skip_config(**{**SPECULATIVE, **options}))


def test_greedy_tokens_equal_the_unmodified_model_at_the_capacity_boundary(model, prompts, reference):
    tokens, stats = speculate(model, prompts)
    assert torch.equal(tokens, reference)
    assert 0 < stats["accepted"] < stats["drafted"]  # drafts were kept and rejected (rolled back)
    assert stats["rounds"] < NEW - 1 and stats["mode"] == "speculative"
    tokens, stats = speculate(model, prompts, blocks=[1, 2, 4], mlp_only=False)
    assert torch.equal(tokens, reference) and stats["accepted"] < stats["drafted"]


def test_one_slot_less_than_a_verification_needs_is_refused(model, prompts):
    with pytest.raises(ConfigError, match=rf"^capacity {AT_CAPACITY - 1}: self-speculative decoding writes {AT_CAPACITY} KV "
                                          rf"slots .*; allowed: at least {AT_CAPACITY} "):
        generate(model, *prompts[:1], attention_mask=prompts[1], max_new_tokens=NEW, capacity=AT_CAPACITY - 1,
                 config=skip_config(**SPECULATIVE))


def test_sampled_path_with_top_k_1_is_greedy(model, prompts, reference):
    """top_k = 1 makes every distribution one-hot: the sampling rule (draft distributions,
    acceptance draws, residual) must then reproduce the greedy tokens exactly."""
    ids, mask = prompts
    tokens, stats = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, capacity=AT_CAPACITY, temperature=0.7,
                             top_k=1, seed=0, config=skip_config(**SPECULATIVE))
    assert torch.equal(tokens, reference) and stats["drafted"] > 0


@pytest.mark.parametrize("others, tier", [
    ({"kv_eviction": {"budget": 16, "window": 4, "n_sink": 2}}, "'main' tier (evict/h2o"),
    ({"kv_quantize": {"format": "int8"}}, "'main' tier (kvq"),
])
def test_stores_that_cannot_roll_back_exactly_are_refused(model, prompts, others, tier):
    ids, mask = prompts
    with pytest.raises(KVStoreError) as err:
        generate(model, ids, attention_mask=mask, max_new_tokens=8, config=skip_config(others, **SPECULATIVE))
    message = str(err.value)
    assert "\n" not in message and message.startswith("layer_skip mode 'speculative': site ") and tier in message
    assert "cannot forget tokens exactly" in message


def _tv(tokens: torch.Tensor, p: torch.Tensor) -> float:
    freq = torch.bincount(tokens, minlength=p.numel()).double() / tokens.numel()
    return 0.5 * float((freq - p.double()).abs().sum())


def test_speculative_sampling_rule_keeps_the_target_distribution():
    """Rows share p (target) and q (draft), drafts drawn from q: the first emitted token must
    follow p_0, and, when the first draft was kept, the second p_1. Drawing from q instead
    would be far off (TV(p, q) > 0.3), so the test can fail."""
    torch.manual_seed(0)
    V, B, K = 6, 200_000, 2
    p = torch.softmax(torch.randn(K + 1, V) * 2, dim=-1)
    q = torch.softmax(torch.randn(K, V) * 2, dim=-1)
    assert 0.5 * float((p[0] - q[0]).abs().sum()) > 0.3
    drafted = torch.stack([torch.multinomial(q[j], B, replacement=True) for j in range(K)], dim=1)
    a, tokens = accept_sampled(p.expand(B, -1, -1), q.expand(B, -1, -1), drafted, torch.tensor([K]))
    assert _tv(tokens[:, 0], p[0]) < 0.01
    assert _tv(tokens[a >= 1, 1], p[1]) < 0.01
    assert 0 < float((a == 0).float().mean()) < 1
    a1, _ = accept_sampled(p.expand(B, -1, -1), q.expand(B, -1, -1), drafted, torch.tensor([1]))
    assert int(a1.max()) == 1  # only the first k drafts count


def test_greedy_rule_keeps_the_agreeing_prefix():
    logits = torch.zeros(3, 4, 10)
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 2, 3, 4]])
    logits.scatter_(2, target[..., None], 1.0)
    drafted = torch.tensor([[1, 2, 3], [1, 9, 3], [1, 2, 3]])
    a, tokens = accept_greedy(logits, drafted, torch.tensor([3]))
    assert a.tolist() == [3, 1, 0] and torch.equal(tokens, target)
    assert accept_greedy(logits, drafted, torch.tensor([2]))[0].tolist() == [2, 1, 0]


def test_draft_length_follows_the_acceptance_rate():
    assert best_draft_length(0.95, 0.3, 8) == 8
    assert best_draft_length(0.05, 0.7, 8) == 1
    lengths = [best_draft_length(r / 10, 0.3, 8) for r in range(10)]
    assert lengths == sorted(lengths) and len(set(lengths)) > 2


def test_default_model_greedy_tokens_are_identical_and_drafts_are_accepted(default_model):
    """The real SmolLM2-135M weights: 2 prompts x 32 tokens, drafting with 20% of the MLPs
    removed (evenly spread)."""
    model, tok = default_model
    texts = ["The capital of France is", "def fibonacci(n):\n    "]
    batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    from slimfx.runtime.skip_variants import full_config

    cfg = skip_config(blocks=[1 + round(i * 27 / 5) for i in range(6)], mlp_only=True, mode="speculative", draft_length=4)
    # The reference runs the same pipeline without layer_skip (no passes): one generator, compiled once.
    ref, _ = generate(model, ids, attention_mask=mask, max_new_tokens=32, config=full_config(cfg))
    tokens, stats = generate(model, ids, attention_mask=mask, max_new_tokens=32, config=cfg)
    assert torch.equal(tokens, ref)
    # Drafts agree far more often than chance (0.46 and 0.55 measured on this prompt set).
    assert stats["acceptance_rate"] > 0.3 and stats["tokens_per_round"] > 1.3


# ----------------------------------------------------------------------------- schedule


def _pruned(model, blocks):
    """A copy without `blocks`; its attention layers keep their layer_idx, so it reads and
    writes the original blocks' entries of a shared HF cache."""
    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(m.model.layers) if i not in blocks])
    return m


def _schedule_reference(model, ids, chosen, levels, tokens, n):
    """Greedy tokens with token i from level level_of(i) (passes/layer_skip.level_share),
    eagerly over one HF DynamicCache: a skipped block writes no cache entry for the token."""
    from transformers import DynamicCache

    models = [_pruned(model, chosen[:math.ceil(len(chosen) * j / (levels - 1))]) for j in range(levels)]
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = [int(model(ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())]
        for i in range(1, n):
            pos = ids.shape[1] + i - 1
            logits = models[level_of(i, levels, tokens)](torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True,
                                                         position_ids=torch.tensor([[pos]]), cache_position=torch.tensor([pos])).logits
            out.append(int(logits[0, -1].argmax()))
    return out


def test_schedule_levels_fall_monotonically_and_shared():
    seq = [level_of(i, 4, 10) for i in range(40)]
    assert seq == sorted(seq) and seq[0] == 0 and seq[-1] == 3 and set(seq) == {0, 1, 2, 3}


def test_schedule_matches_the_eager_reference_and_never_recompiles(model, fresh_dynamo):
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    chosen, levels, ramp, n = [3, 1, 4], 4, 6, 16
    cfg = skip_config(blocks=chosen, mode="schedule", schedule_levels=levels, schedule_tokens=ramp)
    before = counters["stats"]["unique_graphs"]
    tokens, stats = generate(model, ids, max_new_tokens=n, config=cfg)
    first = counters["stats"]["unique_graphs"] - before
    assert tokens[0].tolist() == _schedule_reference(model, ids, chosen, levels, ramp, n)
    assert stats["tokens_per_level"] == [1, 2, 2, 10]  # decode steps (token 0 is the prefill's)
    assert first == 1 + levels  # the prefill chunk, one decode graph per level
    again, _ = generate(model, ids, max_new_tokens=n, config=cfg)
    assert counters["stats"]["unique_graphs"] - before == first and torch.equal(again, tokens)


def test_eval_steps_a_schedule_as_generate_runs_it(model):
    """slimfx eval's stepper runs each position's level graph: its greedy tokens are the
    schedule's, not the whole model's."""
    from slimfx.measure.runner import Runner, greedy_generate

    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    cfg = skip_config(blocks=[3, 1, 4], mode="schedule", schedule_levels=4, schedule_tokens=6)
    tokens, _ = generate(model, ids, max_new_tokens=16, config=cfg)
    whole, _ = generate(model, ids, max_new_tokens=16)
    assert greedy_generate(Runner(model, cfg), ids, 16).tolist() == tokens[0].tolist()
    assert not torch.equal(tokens, whole)


def test_schedule_composes_with_eviction(model, prompts):
    """Every level's graph shares the evicting store: the budgets hold for the sites the
    levels run, and the early tokens (level 0, the whole model) equal plain eviction's."""
    from slimfx.runtime.generate import get_generator
    from slimfx.runtime.skip_variants import full_config

    ids, mask = prompts
    evict = {"kv_eviction": {"budget": 12, "window": 4, "n_sink": 2}}
    cfg = skip_config(evict, blocks=[2, 3], mode="schedule", schedule_levels=2, schedule_tokens=8)
    tokens, _ = generate(model, ids, attention_mask=mask, max_new_tokens=16, capacity=64, config=cfg)
    plain, _ = generate(model, ids, attention_mask=mask, max_new_tokens=16, capacity=64,
                        config={"pipelines": {"s": ["kv_eviction"]}, "compile": {"pipeline": "s"}, "passes": evict})
    assert torch.equal(tokens[:, :8], plain[:, :8]) and not torch.equal(tokens, plain)
    store = get_generator(model, 2, 64, config=full_config(cfg)).store
    assert {c.capacity for c in store.sites.values()} == {12}


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("options, message", [
    ({"blocks": [1], "schedule_level": 5}, r"passes.layer_skip.schedule_level: got 5; allowed: -1 or 0-3 \(schedule_levels = 4\)"),
    ({"blocks": [1], "mode": "fast"}, r"passes.layer_skip.mode: got 'fast'; allowed: one of 'remove', 'speculative', 'schedule'"),
    ({"blocks": [1], "mode": "speculative", "draft_length": 0}, r"passes.layer_skip.draft_length: got 0; allowed: "),
])
def test_mode_options_fail_with_one_line(model, prompts, options, message):
    ids, mask = prompts
    with pytest.raises(ConfigError, match=message) as err:
        generate(model, ids, attention_mask=mask, max_new_tokens=4, config=skip_config(**options))
    assert "\n" not in str(err.value)


def test_speculative_mode_keeps_every_block_in_a_plain_compile(model, prompts):
    from slimfx.compiler.report import last_report

    ids, _ = prompts
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="slimfx", options={"config": skip_config(**SPECULATIVE)})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    result = last_report().passes[0]
    assert not result.applied and "mode speculative: this graph keeps every block" in result.notes[0]
