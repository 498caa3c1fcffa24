"""TokenSelect (passes/kv_eviction/select_op.py): the whole cache is kept, each decode step
reads `budget` tokens per kv head chosen by the query's head soft vote.

The reference below is written from the paper's rule, one sequence and one kv head at a
time with Python lists: per voting query head, softmax of raw q.k over the candidates
(neither sink nor recent), summed over the voters; sort; keep the sinks, the recent window
and the top rest; softmax attention over the kept tokens only."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.compiler.config import ConfigError
from slimfx.passes.kv_eviction.select_op import select_site
from slimfx.runtime import generate
from slimfx.runtime.attention_op import attention_ref


def _config(**options):
    return {"pipelines": {"evict": ["kv_eviction"]}, "compile": {"pipeline": "evict"},
            "passes": {"kv_eviction": {"policy": "tokenselect", **options}}}


def _reference_decode(q, keys, vals, positions, q_pos, budget, n_sink, window, vote, scale):
    """One sequence: q [Hq, D]; keys, vals [Hkv, N, D] with positions [N] (the slots held,
    every one <= q_pos). Returns [Hq, D]."""
    Hq, D = q.shape
    Hkv = keys.shape[0]
    group = Hq // Hkv
    held = list(positions.tolist())
    protected = [p for p in held if p < n_sink or p > q_pos - window]
    candidates = [i for i, p in enumerate(held) if p not in protected]
    votes = {}
    for h in range(Hq):
        logits = [float(q[h].double() @ keys[h // group, i].double()) for i in candidates]
        top = max(logits, default=0.0)
        expd = [math.exp(x - top) for x in logits]
        for i, e in zip(candidates, expd):
            voter = 0 if vote == "layer" else h // group
            votes[(voter, i)] = votes.get((voter, i), 0.0) + e / sum(expd)
    out = torch.empty(Hq, D, dtype=torch.float64)
    for h in range(Hq):
        voter = 0 if vote == "layer" else h // group
        ranked = sorted(candidates, key=lambda i: (-votes[(voter, i)], i))
        read = [i for i, p in enumerate(held) if p in protected] + ranked[:max(0, budget - len(protected))]
        kh = keys[h // group, read].double()
        weights = torch.softmax(kh @ q[h].double() * scale, dim=0)
        out[h] = weights @ vals[h // group, read].double()
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       budget=st.integers(3, 24), n_sink=st.integers(0, 2), window=st.integers(0, 3), vote=st.sampled_from(["layer", "kv_head"]),
       pad=st.integers(0, 3))
def test_decode_matches_a_per_head_reference(seed, n, hkv, group, budget, n_sink, window, vote, pad):
    """A prompt of n tokens (the second sequence left padded) prefilled, then one decode
    step: the op's output equals the reference's over the slots it selects."""
    budget = max(budget, n_sink + window + 1)
    gen = torch.Generator().manual_seed(seed)
    B, D, C = 2, 8, 48
    hq = hkv * group
    site = select_site(B, hkv, C, D, n_sink=n_sink, window=window, budget=budget, vote=vote)
    k, v = torch.randn(B, hkv, n + 1, D, generator=gen), torch.randn(B, hkv, n + 1, D, generator=gen)
    q = torch.randn(B, hq, n + 1, D, generator=gen)
    positions = torch.stack([torch.arange(n + 1), torch.arange(n + 1) - pad])
    scale = 1 / math.sqrt(D)
    attention_ref(q[:, :, :n], k[:, :, :n], v[:, :, :n], positions[:, :n], site, scale)
    out = attention_ref(q[:, :, n:], k[:, :, n:], v[:, :, n:], positions[:, n:], site, scale)
    for b in range(B):
        real = positions[b] >= 0
        want = _reference_decode(q[b, :, n], k[b][:, real], v[b][:, real], positions[b][real], int(positions[b, n]),
                                 budget, n_sink, window, vote, scale)
        torch.testing.assert_close(out[b, :, 0].double(), want, rtol=1e-5, atol=1e-5)


def test_selection_changes_the_output_when_the_budget_is_short():
    """The test above can fail: reading fewer tokens than held changes the attention."""
    gen = torch.Generator().manual_seed(0)
    B, H, N, D = 1, 2, 30, 8
    k, v, q = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, D, generator=gen)
    pos = torch.arange(N)[None]
    outs = []
    for budget in (64, 6):
        site = select_site(B, H, 64, D, n_sink=1, window=2, budget=budget)
        attention_ref(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], pos[:, :-1], site)
        outs.append(attention_ref(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], pos[:, -1:], site))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def reference(sharp_model, prompt):
    return generate(sharp_model, prompt, max_new_tokens=16, capacity=128)


def test_budget_covering_the_sequence_is_token_identical(sharp_model, prompt, reference):
    """40 prompt + 16 generated tokens, every one read: the unmodified model's tokens,
    through the select variant (capacity 128 > budget 64, so the site is relaid out)."""
    slimfx.clear_reports()
    tokens, _ = generate(sharp_model, prompt, max_new_tokens=16, capacity=128, config=_config(budget=64, n_sink=2, window=8))
    results = [r for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction"]
    assert results and all(r.applied and r.nodes_rewritten == 2 for r in results)
    assert torch.equal(tokens, reference[0])


def test_small_budget_is_lossy_and_keeps_every_kv_byte(sharp_model, prompt, reference):
    slimfx.clear_reports()
    tokens, stats = generate(sharp_model, prompt, max_new_tokens=16, capacity=128, config=_config(budget=12, n_sink=2, window=4))
    assert not torch.equal(tokens, reference[0])  # 12 of 40-56 tokens read per step
    assert stats["kv_bytes"] == reference[1]["kv_bytes"]  # the whole cache is held: no memory saved
    result = next(r for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" and r.applied)
    assert result.bytes_saved == 0
    assert result.details["read_budgets"] == {0: 12, 1: 12} and not result.details["budgets"]


@pytest.mark.parametrize("options, message", [
    (dict(budget=8, n_sink=4, window=8),
     "passes.kv_eviction.budget (layer 0): got 8; allowed: >= 13 for policy 'tokenselect' (n_sink 4 + window 8 + 1 slot to choose)"),
    (dict(budget=32, decode_budget=40),
     "passes.kv_eviction.decode_budget (layer 0): got 40 with policy 'tokenselect'; allowed: 0 (tokenselect keeps every token and evicts nothing)"),
    (dict(budget=32, evicted="int8"),
     "passes.kv_eviction.evicted (layer 0): got 'int8' with policy 'tokenselect'; allowed: 'drop' (tokenselect keeps every token and evicts nothing)"),
])
def test_bad_options_are_one_line_config_errors(sharp_model, prompt, options, message):
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(**options))
    assert str(err.value) == message


def test_bad_vote_is_a_config_error(sharp_model, prompt):
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(budget=32, vote="head"))
    assert "passes.kv_eviction.vote" in str(err.value) and "layer" in str(err.value) and "\n" not in str(err.value)


def test_paper_defaults_scale_with_the_budget():
    from slimfx.passes.kv_eviction import OPTIONS, resolved

    opts = {name: o.default for name, o in OPTIONS.items()}
    got = resolved({**opts, "policy": "tokenselect", "budget": 2688})
    assert (got["n_sink"], got["window"]) == (128, 512)  # the paper's n_init / n_local at its 2688 tokens read


def _prefill_then_decode(device, steps=6, budget=12, vote="layer"):
    """A 40-token prompt (second sequence left padded by 3) then `steps` decode steps
    through a select site and the op itself (Triton reads on CUDA, the references on the
    CPU): the decode outputs, [steps, B, Hq, D] on the CPU."""
    gen = torch.Generator().manual_seed(0)
    B, hkv, hq, D, N = 2, 2, 8, 64, 40 + steps
    k, v, q = (torch.randn(B, h, N, D, generator=gen).to(device) for h in (hkv, hkv, hq))
    positions = torch.stack([torch.arange(N), torch.arange(N) - 3]).to(device)
    site = select_site(B, hkv, 64, D, n_sink=2, window=4, budget=budget, vote=vote, device=device)
    op = lambda a, b: torch.ops.slimfx.attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], positions[:, a:b], site.buffers(),
                                                 D ** -0.5, site.layout)
    op(0, 40)
    outs = [op(t, t + 1) for t in range(40, N)]
    return torch.stack(outs).cpu(), site, q[:, :, -1:], positions[:, -1:]


def test_a_reader_site_reads_what_the_owner_selects():
    """Cross-layer sharing: a site reading this cache (read/<layout>, no write) selects as
    the owner's decode step does, over the same tiers."""
    from slimfx.runtime.attention_op import unpack, variant_of

    outs, site, q, pos = _prefill_then_decode("cpu")
    reader = variant_of("read/" + site.layout)
    got = reader.run(q, None, None, pos, unpack(reader, site.buffers(), site.layout), 1 / 8, False)
    torch.testing.assert_close(got, outs[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("vote", ["layer", "kv_head"])
def test_cuda_matches_cpu(vote):
    """The Triton decode read with masked slot positions gives the CPU read's result."""
    gpu, cpu = _prefill_then_decode("cuda", vote=vote)[0], _prefill_then_decode("cpu", vote=vote)[0]
    err = ((gpu - cpu).norm() / cpu.norm()).item()
    assert err <= 2e-3, f"rel err {err:.2e}"  # fp32 dots may run as tf32 on the GPU


def test_budget_fraction_resolves_per_prompt(sharp_model, prompt):
    """A quarter of the 40-token prompt, rounded up to 16: each kv head reads 16 tokens."""
    slimfx.clear_reports()
    generate(sharp_model, prompt, max_new_tokens=2, capacity=128, config=_config(budget_fraction=0.25))
    result = next(r for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" and r.applied)
    assert result.details["read_budgets"] == {0: 16, 1: 16}
