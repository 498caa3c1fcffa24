"""Decode and prefill attention kernels against their references.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 at small sizes;
with a GPU they run compiled (same tests). Triton reads TRITON_INTERPRET when a
kernel is decorated, so tests/conftest.py sets it before any kernel module is imported.
"""

from __future__ import annotations


import pytest
import torch

# TRITON_INTERPRET is set by conftest.py before any kernel module is imported.
HAS_CUDA = torch.cuda.is_available()

import slimfx.codegen.kernels.decode_attention as dec
import slimfx.codegen.kernels.prefill_attention as pre

DEVICE = "cuda" if HAS_CUDA else "cpu"
# (relative-error tolerance): fp32 on GPU goes through tf32 tensor-core dots.
TOL = {torch.float32: 2e-3 if HAS_CUDA else 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]
# (batch, q heads, kv heads, capacity, head_dim): MHA, GQA, MQA, odd sizes.
SHAPES = [(1, 4, 4, 37, 16), (2, 6, 2, 53, 24), (3, 5, 1, 29, 8), (2, 8, 2, 70, 64)]
if HAS_CUDA:
    SHAPES += [(1, 32, 8, 4099, 64), (2, 9, 3, 1500, 64), (1, 8, 8, 777, 128)]


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def scattered_slots(B, H, C, *, max_pos, empty_frac=0.3, gen=None) -> torch.Tensor:
    """Slot positions: distinct positions in random slots, ~empty_frac of slots empty (-1)."""
    pos = torch.stack([torch.randperm(max(C, max_pos), generator=gen)[:C] for _ in range(B * H)]).view(B, H, C)
    empty = torch.rand(B, H, C, generator=gen) < empty_frac
    return pos.masked_fill(empty, -1).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_attention_matches_reference(shape, dtype):
    B, Hq, Hkv, C, D = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    q = torch.randn(B, Hq, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, C, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, C, D, generator=gen).to(DEVICE, dtype)
    slot_pos = scattered_slots(B, Hkv, C, max_pos=C + 10, gen=gen).to(DEVICE)
    q_pos = torch.randint(C // 2, C + 10, (B,), generator=gen).to(DEVICE)
    scores = torch.rand(B, Hkv, C, generator=gen).to(DEVICE)
    scores_ref = scores.clone()
    out = dec.decode_attention(q, k, v, slot_pos, q_pos, scores=scores, decay=0.9)
    ref = dec.decode_attention_ref(q, k, v, slot_pos, q_pos, scores=scores_ref, decay=0.9)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(scores, scores_ref) < TOL[dtype]
    # Slots hidden from the query (empty or in its future) receive no new mass.
    hidden = (slot_pos < 0) | (slot_pos > q_pos.view(B, 1, 1))
    fresh = torch.rand(B, Hkv, C, generator=gen).to(DEVICE)
    before = fresh.clone()
    dec.decode_attention(q, k, v, slot_pos, q_pos, scores=fresh, decay=1.0)
    assert torch.equal(fresh[hidden], before[hidden])


def test_decode_attention_query_seeing_nothing_gives_zeros():
    B, Hq, Hkv, C, D = 2, 4, 2, 20, 16
    q = torch.randn(B, Hq, D, device=DEVICE)
    k = torch.randn(B, Hkv, C, D, device=DEVICE)
    v = torch.randn(B, Hkv, C, D, device=DEVICE)
    slot_pos = torch.full((B, Hkv, C), -1, dtype=torch.int32, device=DEVICE)
    slot_pos[0, :, 3] = 5  # sequence 0 sees one slot; sequence 1 sees none
    out = dec.decode_attention(q, k, v, slot_pos, torch.tensor([7, 7], device=DEVICE))
    assert torch.allclose(out[0].float(), v[0, :, 3].repeat_interleave(Hq // Hkv, 0).float(), atol=4e-3 if HAS_CUDA else 1e-5)  # tf32 dot on GPU
    assert torch.count_nonzero(out[1]) == 0


def test_decode_attention_reads_each_sequences_position_from_an_expanded_tensor():
    # A batch that shares one position is often passed as an expanded (stride-0) view;
    # the kernel indexes q_pos[b], so it must not read past the one stored element.
    B, Hq, Hkv, C, D = 3, 4, 1, 24, 16
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((B, Hq, D), (B, Hkv, C, D), (B, Hkv, C, D)))
    slot_pos = torch.arange(C, dtype=torch.int32, device=DEVICE).expand(B, Hkv, C).contiguous()
    # The elements after the shared one are 0: a kernel reading them would let the later
    # sequences see slot 0 only.
    storage = torch.tensor([C // 2, 0, 0, 0], device=DEVICE)
    shared = storage[:1].expand(B)
    out = dec.decode_attention(q, k, v, slot_pos, shared)
    ref = dec.decode_attention_ref(q, k, v, slot_pos, shared.contiguous())
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_attention_split_count_does_not_change_result(splits):
    B, Hq, Hkv, C, D = 1, 6, 3, 90, 32
    gen = torch.Generator().manual_seed(splits)
    q, k, v = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((B, Hq, D), (B, Hkv, C, D), (B, Hkv, C, D)))
    slot_pos = scattered_slots(B, Hkv, C, max_pos=C, gen=gen).to(DEVICE)
    q_pos = torch.tensor([C], device=DEVICE)
    out = dec.decode_attention(q, k, v, slot_pos, q_pos, splits=splits)
    ref = dec.decode_attention_ref(q, k, v, slot_pos, q_pos)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 4, 9, 30, 16), (2, 6, 2, 17, 41, 24), (3, 3, 1, 5, 12, 8)] + ([(1, 32, 8, 300, 2100, 64), (2, 9, 3, 129, 700, 64)] if HAS_CUDA else []), ids=lambda s: "x".join(map(str, s)))
def test_prefill_attention_matches_reference(shape, dtype):
    B, Hq, Hkv, T, N, D = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    q = torch.randn(B, Hq, T, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(DEVICE, dtype)
    k_pos = scattered_slots(B, Hkv, N, max_pos=N + 5, gen=gen).long().to(DEVICE)
    q_pos = torch.randint(-2, N + 5, (B, T), generator=gen).to(DEVICE)  # some padding queries (< 0)
    out = pre.prefill_attention(q, q_pos, k, v, k_pos)
    ref = pre.prefill_attention_ref(q, q_pos, k, v, k_pos)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    pad = q_pos < 0
    assert torch.count_nonzero(out.transpose(1, 2)[pad]) == 0


def test_prefill_attention_skips_invisible_key_blocks_exactly():
    # The runtime's layout in a chunked prefill: a store whose first p0 slots are filled,
    # the rest empty (-1), then the chunk's own keys. Most key blocks are empty or lie
    # after a query block's last position; the kernel skips those blocks, which must not
    # change the result.
    B, Hq, Hkv, C, p0, T, D = 1, 4, 2, 96, 21, 40, 16
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, T, D, generator=gen).to(DEVICE)
    k = torch.randn(B, Hkv, C + T, D, generator=gen).to(DEVICE)
    v = torch.randn(B, Hkv, C + T, D, generator=gen).to(DEVICE)
    slots = torch.full((B, Hkv, C), -1, dtype=torch.long)
    slots[..., :p0] = torch.arange(p0)
    chunk = torch.arange(p0, p0 + T)
    k_pos = torch.cat([slots, chunk.expand(B, Hkv, T)], dim=2).to(DEVICE)
    q_pos = chunk[None, :].to(DEVICE)
    out = pre.prefill_attention(q, q_pos, k, v, k_pos)
    ref = pre.prefill_attention_ref(q, q_pos, k, v, k_pos)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_extra_keys_equal_appended_keys(dtype):
    # The runtime passes the chunk's own keys as `extra` (read where they are) instead of
    # a copy of the store with the chunk appended: same result, padding queries and keys
    # (negative positions) included, a strided v like a transposed projection output.
    B, Hq, Hkv, C, p0, T, D = 2, 6, 2, 80, 23, 37, 16
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, Hq, T, D, generator=gen).to(DEVICE, dtype)
    kc = torch.randn(B, Hkv, C, D, generator=gen).to(DEVICE, dtype)
    vc = torch.randn(B, Hkv, C, D, generator=gen).to(DEVICE, dtype)
    slots = torch.full((B, Hkv, C), -1, dtype=torch.long)
    slots[..., :p0] = torch.arange(p0)
    k2 = torch.randn(B, Hkv, T, D, generator=gen).to(DEVICE, dtype)
    v2 = torch.randn(B, T, Hkv, D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    pos = torch.arange(p0, p0 + T).repeat(B, 1)
    pos[1, :5] = torch.arange(-5, 0)  # left padding in the second sequence
    pos, slots = pos.to(DEVICE), slots.to(DEVICE)
    out = pre.prefill_attention(q, pos, kc, vc, slots, extra=(k2, v2, pos))
    appended = (torch.cat([kc, k2], 2), torch.cat([vc, v2], 2), torch.cat([slots, pos[:, None].expand(B, Hkv, T)], 2))
    ref = pre.prefill_attention_ref(q, pos, *appended)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(pre.prefill_attention_ref(q, pos, kc, vc, slots, extra=(k2, v2, pos)), ref) < 1e-6
    with pytest.raises(ValueError, match="extra key positions"):
        pre.prefill_attention(q, pos, kc, vc, slots, extra=(k2, v2, pos[:, 1:]))


def test_prefill_sliding_window_kernel_matches_reference_and_the_sliding_mask():
    """window W: a query sees its W most recent positions (HF's sliding-window mask), in the
    store's keys and in the chunk's own."""
    B, Hq, Hkv, C, p0, T, D, W = 2, 4, 2, 8, 8, 21, 16, 6
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, T, D, generator=gen).to(DEVICE)
    kc, vc = (torch.randn(B, Hkv, C, D, generator=gen).to(DEVICE) for _ in range(2))
    slots = torch.arange(p0)[None, None].expand(B, Hkv, C).contiguous().to(DEVICE)
    k2, v2 = (torch.randn(B, Hkv, T, D, generator=gen).to(DEVICE) for _ in range(2))
    pos = torch.arange(p0, p0 + T).repeat(B, 1).to(DEVICE)
    out = pre.prefill_attention(q, pos, kc, vc, slots, extra=(k2, v2, pos), window=W)
    ref = pre.prefill_attention_ref(q, pos, kc, vc, slots, extra=(k2, v2, pos), window=W)
    assert rel_err(out, ref) < TOL[torch.float32]
    keys, vals = torch.cat([kc, k2], 2), torch.cat([vc, v2], 2)
    kpos = torch.arange(p0 + T, device=DEVICE)
    mask = (kpos[None, :] <= pos[0][:, None]) & (kpos[None, :] > pos[0][:, None] - W)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, keys.repeat_interleave(2, 1), vals.repeat_interleave(2, 1), attn_mask=mask)
    assert rel_err(ref, sdpa) < 1e-5
    with pytest.raises(ValueError, match="window 0; allowed: None or an integer >= 1"):
        pre.prefill_attention_ref(q, pos, kc, vc, slots, window=0)


def test_prefill_reference_equals_causal_sdpa_on_plain_sequence():
    """With positions 0..T-1 in order, the position rule is the causal mask."""
    B, Hq, Hkv, T, D = 2, 4, 2, 11, 16
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    pos = torch.arange(T).expand(B, T)
    ref = pre.prefill_attention_ref(q, pos, k, v, pos[:, None, :].expand(B, Hkv, T))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert rel_err(ref, sdpa) < 1e-5


@pytest.mark.parametrize("bad", ["q_dim", "heads", "slot_pos"])
def test_decode_attention_rejects_bad_input_with_clear_message(bad):
    q = torch.randn(1, 4, 16)
    k = torch.randn(1, 2, 8, 16)
    sp = torch.zeros(1, 2, 8, dtype=torch.int32)
    qp = torch.zeros(1, dtype=torch.int64)
    if bad == "q_dim":
        q = q[None]
    elif bad == "heads":
        q = torch.randn(1, 3, 16)
    else:
        sp = sp.float()
    with pytest.raises(ValueError, match="decode_attention"):
        dec.decode_attention(q, k, k, sp, qp)
