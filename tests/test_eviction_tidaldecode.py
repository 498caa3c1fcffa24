"""TidalDecode (passes/kv_eviction/tidal_op.py): the whole cache is kept; at each decode step
the selection layers attend fully and choose, per query head, the `budget - 1` earlier
tokens of highest q.k; the layers after them read those and the current token only.

The reference below is written from that rule, one sequence and one query head at a time
with Python lists."""

import math
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.compiler.config import ConfigError
from slimfx.passes.kv_eviction.tidal_op import chosen_tier, paper_layers, tidal_layout
from slimfx.runtime import generate
from slimfx.runtime.attention_op import attention_ref
from slimfx.runtime.kv_store import SiteCache, plain_tier
from tests.interpreted import run_interpreted



def _config(**options):
    return {"pipelines": {"evict": ["kv_eviction"]}, "compile": {"pipeline": "evict"},
            "passes": {"kv_eviction": {"policy": "tidaldecode", **options}}}


def _sites(B, hkv, hq, C, D, budget):
    """A selection site and a following site sharing its chosen tier, outside any store."""
    chosen = chosen_tier(B, hq, budget, C, "cpu")
    make = lambda role: SiteCache(0, D, {"main": plain_tier(B, hkv, C, D, dtype=torch.float32, device="cpu"), "chosen": chosen},
                                  layout=tidal_layout(role, budget))
    return make("select"), make("follow")


def _reference_step(q_sel, q_fol, k_sel, v_sel, k_fol, v_fol, positions, q_pos, budget, scale):
    """One sequence: q_* [Hq, D] (the two layers' queries); k_*, v_* [Hkv, N, D] with
    positions [N] (the held tokens, the current one last). Returns both layers' outputs
    [Hq, D]: the selection layer over every token, the following one over each head's
    chosen tokens plus the current one."""
    Hq, D = q_sel.shape
    group = Hq // k_sel.shape[0]
    held = positions.tolist()
    outs = (torch.empty(Hq, D, dtype=torch.float64), torch.empty(Hq, D, dtype=torch.float64))
    for h in range(Hq):
        kv = h // group
        earlier = [i for i, p in enumerate(held) if p < q_pos]
        ranked = sorted(earlier, key=lambda i: -float(q_sel[h].double() @ k_sel[kv, i].double()))
        chosen = ranked[:budget - 1] + [held.index(q_pos)]
        for out, q, k, v, read in ((outs[0], q_sel, k_sel, v_sel, list(range(len(held)))), (outs[1], q_fol, k_fol, v_fol, chosen)):
            weights = torch.softmax(k[kv, read].double() @ q[h].double() * scale, dim=0)
            out[h] = weights @ v[kv, read].double()
    return outs


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       budget=st.integers(2, 24), pad=st.integers(0, 3))
def test_follower_reads_what_the_selection_layer_chose(seed, n, hkv, group, budget, pad):
    """A prompt of n tokens (the second sequence left padded) prefilled through both sites,
    then one decode step: the selection layer's output is full attention, the follower's
    is attention over exactly the reference's chosen tokens."""
    gen = torch.Generator().manual_seed(seed)
    B, D, C = 2, 8, 48
    hq, pad = hkv * group, min(pad, n)  # the decoded token itself is real
    sel, fol = _sites(B, hkv, hq, C, D, budget)
    q, k, v = (torch.randn(2, B, h, n + 1, D, generator=gen) for h in (hq, hkv, hkv))
    positions = torch.stack([torch.arange(n + 1), torch.arange(n + 1) - pad])
    scale = 1 / math.sqrt(D)
    outs = []
    for layer, site in enumerate((sel, fol)):
        attention_ref(q[layer, :, :, :n], k[layer, :, :, :n], v[layer, :, :, :n], positions[:, :n], site, scale)
    for layer, site in enumerate((sel, fol)):
        outs.append(attention_ref(q[layer, :, :, n:], k[layer, :, :, n:], v[layer, :, :, n:], positions[:, n:], site, scale))
    for b in range(B):
        real = positions[b] >= 0
        want = _reference_step(q[0, b, :, n], q[1, b, :, n], k[0, b][:, real], v[0, b][:, real], k[1, b][:, real],
                               v[1, b][:, real], positions[b][real], int(positions[b, n]), budget, scale)
        for got, ref in zip(outs, want):
            torch.testing.assert_close(got[b, :, 0].double(), ref, rtol=1e-5, atol=1e-5)


def test_the_follower_output_depends_on_the_choice():
    """The test above can fail: a follower reading fewer tokens than held differs from a full read."""
    gen = torch.Generator().manual_seed(0)
    B, H, N, D = 1, 2, 30, 8
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    pos = torch.arange(N)[None]
    outs = []
    for budget in (64, 4):
        sel, fol = _sites(B, H, H, 64, D, budget)
        for site in (sel, fol):
            attention_ref(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], pos[:, :-1], site)
        attention_ref(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], pos[:, -1:], sel)
        outs.append(attention_ref(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], pos[:, -1:], fol))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_paper_layers_scale_with_depth():
    assert paper_layers(32) == [2, 13]  # the authors' Llama-3-8B placement
    assert paper_layers(30) == [2, 12]
    assert paper_layers(2) == [1]


@pytest.fixture(scope="module")
def reference(sharp_model, prompt):
    return generate(sharp_model, prompt, max_new_tokens=16, capacity=128)


def _applied():
    return next(r for rep in slimfx.reports() for r in rep.passes if r.name == "kv_eviction" and r.applied)


def test_budget_covering_the_sequence_is_token_identical(sharp_model, prompt, reference):
    """40 prompt + 16 generated tokens, every one read: the unmodified model's tokens,
    through the tidal variant (layer 0 selects, layer 1 follows)."""
    slimfx.clear_reports()
    tokens, _ = generate(sharp_model, prompt, max_new_tokens=16, capacity=128, config=_config(budget=64, select_layers=[0]))
    assert _applied().nodes_rewritten == 2
    assert torch.equal(tokens, reference[0])


def test_small_budget_is_lossy_and_keeps_every_kv_byte(sharp_model, prompt, reference):
    slimfx.clear_reports()
    tokens, stats = generate(sharp_model, prompt, max_new_tokens=16, capacity=128, config=_config(budget=4, select_layers=[0]))
    assert not torch.equal(tokens, reference[0])  # layer 1 reads 4 of 40-56 tokens
    # The whole cache is held, plus the chosen positions: [2 sequences, 4 query heads, 3] int32.
    assert stats["kv_bytes"] == reference[1]["kv_bytes"] + 2 * 4 * 3 * 4
    result = _applied()
    assert result.bytes_saved == -2 * 4 * 3 * 4  # the chosen positions, counted once though both sites hold them
    assert result.details["read_budgets"] == {0: 4, 1: 4} and not result.details["budgets"]


def test_layers_before_the_first_selection_layer_are_exact(sharp_model, prompt, reference):
    """Layer 1 selects and nothing follows it: every layer reads the whole cache."""
    slimfx.clear_reports()
    tokens, _ = generate(sharp_model, prompt, max_new_tokens=16, capacity=128, config=_config(budget=4, select_layers=[1]))
    result = _applied()
    assert result.nodes_rewritten == 1 and any("site 0: before the first selection layer" in n for n in result.notes)
    assert torch.equal(tokens, reference[0])


@pytest.mark.parametrize("options, message", [
    (dict(budget=32, n_sink=4),
     "passes.kv_eviction.n_sink (layer 0): got 4 with policy 'tidaldecode'; allowed: -1 (it keeps every token and reads its "
     "selection layer's choice plus the current token)"),
    (dict(budget=32, decode_budget=40),
     "passes.kv_eviction.decode_budget (layer 0): got 40 with policy 'tidaldecode'; allowed: 0 (it keeps every token and reads its "
     "selection layer's choice plus the current token)"),
    (dict(budget=32, select_layers=[1, 0]),
     "passes.kv_eviction.select_layers: got [1, 0]; allowed: distinct layer numbers in increasing order"),
    (dict(budget=32, select_layers=[5]),
     "passes.kv_eviction.select_layers: got [5]; layer 5 has no attention site here; allowed: layers of [0, 1]"),
    (dict(budget=32, layers={"1": {"policy": "h2o"}}),
     "passes.kv_eviction.policy (layer 1): got 'h2o' with 'tidaldecode' for the model; allowed: 'tidaldecode' for every layer or for none"),
])
def test_bad_options_are_one_line_config_errors(sharp_model, prompt, options, message):
    with pytest.raises(ConfigError) as err:
        generate(sharp_model, prompt, max_new_tokens=2, capacity=64, config=_config(**options))
    assert str(err.value) == message


def test_budget_fraction_resolves_per_prompt(sharp_model, prompt):
    """A quarter of the 40-token prompt, rounded up to 16: each query head reads 16 tokens."""
    slimfx.clear_reports()
    generate(sharp_model, prompt, max_new_tokens=2, capacity=128, config=_config(budget_fraction=0.25, select_layers=[0]))
    assert _applied().details["read_budgets"] == {0: 16, 1: 16}


def _decode_pair(device, steps=6, budget=8):
    """A 40-token prompt (second sequence left padded by 3) then `steps` decode steps through
    a selection site and a following site, by the op itself (Triton's full read at the
    selection layer on CUDA): the follower's decode outputs, [steps, B, Hq, D] on the CPU."""
    gen = torch.Generator().manual_seed(0)
    B, hkv, hq, D, N = 2, 2, 8, 64, 40 + steps
    q, k, v = (torch.randn(2, B, h, N, D, generator=gen).to(device) for h in (hq, hkv, hkv))
    positions = torch.stack([torch.arange(N), torch.arange(N) - 3]).to(device)
    chosen = chosen_tier(B, hq, budget, 64, device)
    sites = [SiteCache(0, D, {"main": plain_tier(B, hkv, 64, D, dtype=torch.float32, device=device), "chosen": chosen},
                       layout=tidal_layout(role, budget)) for role in ("select", "follow")]
    op = lambda layer, a, b: torch.ops.slimfx.attention(q[layer, :, :, a:b], k[layer, :, :, a:b], v[layer, :, :, a:b],
                                                        positions[:, a:b], sites[layer].buffers(), D ** -0.5, sites[layer].layout)
    op(0, 0, 40), op(1, 0, 40)
    outs = []
    for t in range(40, N):
        op(0, t, t + 1)
        outs.append(op(1, t, t + 1))
    return torch.stack(outs).cpu()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    """On CUDA the selection layer reads with the Triton kernel and chooses from the same keys:
    the follower's outputs match the CPU's."""
    gpu, cpu = _decode_pair("cuda"), _decode_pair("cpu")
    err = ((gpu - cpu).norm() / cpu.norm()).item()
    assert err <= 2e-3, f"rel err {err:.2e}"  # fp32 dots may run as tf32 on the GPU


def test_op_under_interpreted_kernels_matches_the_references():
    """The op with its Triton kernels (the selection layer's full read, the follower's
    chosen-rows read), run by the interpreter, against the op with the references."""
    script = ("import torch\nfrom tests.test_eviction_tidaldecode import _decode_pair\n"
              "torch.save(_decode_pair('cpu', steps=3), __import__('sys').argv[1])\n")
    outs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("triton", "ref"):
            path = os.path.join(tmp, mode)
            run_interpreted(script, path, SLIMFX_ATTENTION=mode)
            outs[mode] = torch.load(path)
    torch.testing.assert_close(outs["triton"], outs["ref"], rtol=1e-5, atol=1e-5)
