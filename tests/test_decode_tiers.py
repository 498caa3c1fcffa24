"""The split-KV decode kernel over its tiers against decode_attention_ref: one plain tier,
int8/fp8 codes with per-slot scales (the dequantising load), a second tier with and
without a visibility window, tracked scores, empty tiers and argument checks.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py before any
kernel module is imported) at tiny sizes; with a GPU they run compiled.
"""

from __future__ import annotations

import pytest
import torch

import slimfx.codegen.kernels.decode_attention as dec
from slimfx.codegen.kernels.decode_attention_kvq import decode_attention_kvq, decode_attention_kvq_ref

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = 5e-3 if HAS_CUDA else 1e-5  # relative error; fp32 dots go through tf32 on the GPU
HAS_FP8 = hasattr(torch, "float8_e4m3fn")
CODES = ["int8", "fp8"] if HAS_FP8 else ["int8"]
B, HQ, HKV, C, C1, D = 2, 4, 2, 40, 24, 16  # GQA group of 2


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def codes(shape, kind: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-slot float32 scales [shape[:-1]]) of an int8 or fp8 tier."""
    if kind == "int8":
        q = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        return q, torch.rand(shape[:-1], generator=gen) * 0.02 + 0.001
    q = (torch.randn(shape, generator=gen) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, torch.rand(shape[:-1], generator=gen) * 0.05 + 0.001


def positions(n_slots: tuple[int, ...], *, span: int, gen, empty: float = 0.2) -> list[torch.Tensor]:
    """Per (sequence, head), distinct positions drawn from 0..span-1 and dealt to the tiers
    (n_slots[i] slots each, disjoint), ~`empty` of the slots emptied (-1)."""
    total = sum(n_slots)
    perm = torch.stack([torch.randperm(max(span, total), generator=gen)[:total] for _ in range(B * HKV)]).view(B, HKV, total)
    perm = perm.masked_fill(torch.rand(B, HKV, total, generator=gen) < empty, -1).to(torch.int32)
    return list(perm.split(list(n_slots), dim=2))


def to_dev(*ts):
    return tuple(t.to(DEVICE) for t in ts)


def both(*args, scores=None, **kw):
    """(kernel out, ref out, kernel scores, ref scores) for the same arguments."""
    s_ref = None if scores is None else scores.clone()
    out = dec.decode_attention(*args, scores=scores, **kw)
    kw.pop("splits", None)  # a launch parameter: the reference has none
    ref = dec.decode_attention_ref(*args, scores=s_ref, **kw)
    return out, ref, scores, s_ref


@pytest.mark.parametrize("track", [False, True], ids=["plain", "scores"])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_one_plain_tier(track, splits):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((B, HQ, D), (B, HKV, C, D), (B, HKV, C, D)))
    (pos,) = positions((C,), span=C + 8, gen=gen)
    q_pos = torch.tensor([C // 2, C + 3])
    scores = torch.rand(B, HKV, C, generator=gen) if track else None
    out, ref, s, s_ref = both(*to_dev(q, k, v, pos, q_pos), scores=None if scores is None else scores.to(DEVICE), decay=0.9, splits=splits)
    assert out.shape == (B, HQ, D) and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL
    if track:
        assert rel_err(s, s_ref) < TOL


@pytest.mark.parametrize("code", CODES)
def test_codes_in_tier0_plain_tier1_with_window(code):
    """The quantized KV store: codes for n_sink <= pos < limit, the rest (sinks, recent ring)
    in the full-precision tier 1."""
    gen = torch.Generator().manual_seed(2)
    (k, ks), (v, vs) = codes((B, HKV, C, D), code, gen), codes((B, HKV, C, D), code, gen)
    k1, v1 = torch.randn(B, HKV, C1, D, generator=gen), torch.randn(B, HKV, C1, D, generator=gen)
    pos = positions((C,), span=C + 10, gen=gen)[0]
    pos1 = torch.randint(-1, C + 10, (B, HKV, C1), generator=gen, dtype=torch.int32)
    q = torch.randn(B, HQ, D, generator=gen)
    q_pos = torch.tensor([C - 3, C + 8])
    limit = q_pos - torch.tensor([4, 0])
    q, k, v, ks, vs, pos, k1, v1, pos1, q_pos, limit = to_dev(q, k, v, ks, vs, pos, k1, v1, pos1, q_pos, limit)
    kw = dict(k_scale=ks, v_scale=vs, second=(k1, v1, pos1), window=(3, limit))
    out, ref, _, _ = both(q, k, v, pos, q_pos, **kw)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL
    # The kvq wrappers are this call.
    args = (q, k, v, ks, vs, pos, k1, v1, pos1, q_pos, limit)
    assert torch.equal(decode_attention_kvq(*args, n_sink=3), out)
    assert torch.equal(decode_attention_kvq_ref(*args, n_sink=3), ref)
    # The definition: one plain tier holding both, dequantised, with the slots each tier
    # does not serve emptied.
    lim = limit.view(B, 1, 1)
    kept0 = torch.where((pos >= 3) & (pos < lim), pos, -1)
    kept1 = torch.where((pos1 < 3) | (pos1 >= lim), pos1, -1)
    flat = dec.decode_attention_ref(q, torch.cat([k.float() * ks[..., None], k1], 2), torch.cat([v.float() * vs[..., None], v1], 2), torch.cat([kept0, kept1], 2), q_pos)
    assert rel_err(ref, flat) < 1e-6


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("c1", [C1, 70], ids=["c1_one_split", "c1_splits"])
def test_plain_tier0_scores_codes_in_tier1_no_window(code, c1):
    """MiKV: kept tokens in full precision with tracked scores, evicted ones as codes; the
    tiers hold disjoint positions and the scores are true probabilities over both."""
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(B, HKV, C, D, generator=gen), torch.randn(B, HKV, C, D, generator=gen)
    (k1, ks1), (v1, vs1) = codes((B, HKV, c1, D), code, gen), codes((B, HKV, c1, D), code, gen)
    pos, pos1 = positions((C, c1), span=C + c1 + 6, gen=gen)
    q = torch.randn(B, HQ, D, generator=gen) * 3
    q_pos = torch.tensor([C + c1 - 10, C + c1 + 2])
    scores = torch.rand(B, HKV, C, generator=gen)
    q, k, v, pos, k1, v1, pos1, ks1, vs1, q_pos, scores = to_dev(q, k, v, pos, k1, v1, pos1, ks1, vs1, q_pos, scores)
    out, ref, s, s_ref = both(q, k, v, pos, q_pos, scores=scores, decay=0.5, second=(k1, v1, pos1, ks1, vs1))
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL
    assert rel_err(s, s_ref) < TOL
    # Tier 1 takes part of the mass: tier 0's new mass per head is below the group size.
    fresh = torch.zeros_like(s)
    dec.decode_attention(q, k, v, pos, q_pos, scores=fresh, second=(k1, v1, pos1, ks1, vs1))
    assert (fresh.sum(-1) < HQ // HKV - 1e-3).all()


def test_coded_tier1_with_window_and_scores():
    """Both tiers coded, a window, tracked scores, a tier 0 split count: every flag at once."""
    gen = torch.Generator().manual_seed(4)
    (k, ks), (v, vs) = codes((B, HKV, C, D), "int8", gen), codes((B, HKV, C, D), "int8", gen)
    (k1, ks1), (v1, vs1) = codes((B, HKV, C1, D), "int8", gen), codes((B, HKV, C1, D), "int8", gen)
    pos, pos1 = positions((C, C1), span=C + C1, gen=gen)
    q, q_pos, hi = torch.randn(B, HQ, D, generator=gen), torch.tensor([C + C1, 30]), torch.tensor([45, 20])
    scores = torch.zeros(B, HKV, C)
    dev = to_dev(q, k, v, pos, q_pos, ks, vs, k1, v1, pos1, ks1, vs1, hi, scores)
    q, k, v, pos, q_pos, ks, vs, k1, v1, pos1, ks1, vs1, hi, scores = dev
    out, ref, s, s_ref = both(q, k, v, pos, q_pos, scores=scores, k_scale=ks, v_scale=vs, second=(k1, v1, pos1, ks1, vs1), window=(5, hi), splits=2)
    assert rel_err(out, ref) < TOL and rel_err(s, s_ref) < TOL


def test_empty_tiers_and_a_query_seeing_nothing_give_zeros():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, HQ, D, generator=gen).to(DEVICE)
    k1, v1 = (torch.randn(B, HKV, C1, D, generator=gen).to(DEVICE) for _ in range(2))
    pos1 = positions((C1,), span=C1, gen=gen, empty=0.0)[0].to(DEVICE)
    q_pos = torch.tensor([C1, -1], device=DEVICE)  # sequence 1 sees nothing
    # An empty tier 0 (with its empty scores): tier 1 alone.
    none = torch.empty(B, HKV, 0, D, device=DEVICE)
    none_pos = torch.empty(B, HKV, 0, dtype=torch.int32, device=DEVICE)
    out, ref, _, _ = both(q, none, none, none_pos, q_pos, scores=torch.empty(B, HKV, 0, device=DEVICE), second=(k1, v1, pos1))
    assert rel_err(out, ref) < TOL
    assert torch.count_nonzero(out[1]) == 0
    alone = dec.decode_attention(q, k1, v1, pos1, q_pos)
    assert rel_err(out, alone) < TOL
    # An empty tier 1 changes nothing.
    assert torch.equal(dec.decode_attention(q, k1, v1, pos1, q_pos, second=(none, none, none_pos)), alone)
    # Every slot of both tiers hidden (empty or outside the window): zeros, scores unchanged.
    scores = torch.rand(B, HKV, C1, device=DEVICE)
    before = scores.clone()
    hidden = dec.decode_attention(q, k1, v1, torch.full_like(pos1, -1), q_pos, scores=scores, second=(k1, v1, pos1), window=(0, torch.full((B,), 10**6, device=DEVICE)))
    assert torch.count_nonzero(hidden) == 0
    assert torch.equal(scores, before)


def _bad(case: str):
    """decode_attention arguments with one thing wrong, and the name the message must carry."""
    q = torch.randn(1, 4, 16)
    k = torch.randn(1, 2, 8, 16)
    k8 = torch.zeros(1, 2, 8, 16, dtype=torch.int8)
    pos = torch.zeros(1, 2, 8, dtype=torch.int32)
    qp = torch.zeros(1, dtype=torch.int64)
    sc = torch.ones(1, 2, 8)
    k1, pos1 = torch.randn(1, 2, 5, 16), torch.zeros(1, 2, 5, dtype=torch.int32)
    hi = torch.ones(1, dtype=torch.int64)
    cases = {
        "k_scale shape": ((q, k8, k8, pos, qp), dict(k_scale=sc[..., :7], v_scale=sc), "k_scale must be float32"),
        "v_scale dtype": ((q, k8, k8, pos, qp), dict(k_scale=sc, v_scale=sc.half()), "v_scale must be float32"),
        "one scale": ((q, k8, k8, pos, qp), dict(k_scale=sc), "k_scale and v_scale go together"),
        "codes without scales": ((q, k8, k8, pos, qp), {}, "k_cache/v_cache dtype"),
        "second length": ((q, k, k, pos, qp), dict(second=(k1, k1)), "second must be"),
        "second head_dim": ((q, k, k, pos, qp), dict(second=(k1[..., :8], k1[..., :8], pos1)), "second k1/v1 must both be"),
        "second pos1": ((q, k, k, pos, qp), dict(second=(k1, k1, pos1[..., :4])), "second pos1 must be"),
        "second scale": ((q, k, k, pos, qp), dict(second=(k1.to(torch.int8), k1.to(torch.int8), pos1, sc, sc)), "second k1_scale must be float32"),
        "second dtype": ((q, k, k, pos, qp), dict(second=(k1.half(), k1.half(), pos1)), "second k1/v1 dtype"),
        "window hi": ((q, k, k, pos, qp), dict(window=(0, hi.float())), "window hi"),
        "window form": ((q, k, k, pos, qp), dict(window=5), "window must be"),
        "scores": ((q, k, k, pos, qp), dict(scores=sc[..., :3]), "scores must be"),
    }
    return cases[case]


@pytest.mark.parametrize("case", ["k_scale shape", "v_scale dtype", "one scale", "codes without scales", "second length", "second head_dim", "second pos1", "second scale", "second dtype", "window hi", "window form", "scores"])
def test_bad_arguments_give_one_line_value_error_naming_them(case):
    args, kw, message = _bad(case)
    for fn in (dec.decode_attention, dec.decode_attention_ref):
        with pytest.raises(ValueError, match=message) as err:
            fn(*args, **kw)
        assert "\n" not in str(err.value) and str(err.value).startswith("decode_attention: ")
