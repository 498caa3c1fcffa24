"""The chosen-rows decode read (codegen/kernels/gather_decode_attention.py): its reference
against an independent definition written over every slot with a mask (which slots each
query head may see, then a masked softmax over the whole ring), and the Triton kernel
against the reference under TRITON_INTERPRET=1."""

import textwrap

import pytest
import torch

from slimfx.codegen.kernels.gather_decode_attention import gather_decode_attention, gather_decode_attention_ref
from tests.interpreted import run_interpreted


def masked_definition(q, k_cache, v_cache, slot_pos, chosen, q_pos, scale):
    """Every slot of the ring, masked: query head h sees slot s iff s holds the newest of
    the positions h chose that map to s, or s holds the current position. float32 [B, Hq, 1, D]."""
    B, Hkv, C = slot_pos.shape
    Hq, D = q.shape[1], q.shape[3]
    chosen = chosen.to(torch.int64).view(B, Hkv, Hq // Hkv, -1)
    held = slot_pos.to(torch.int64)[:, :, None, :]
    wanted = torch.full((B, Hkv, Hq // Hkv, C), -1, dtype=torch.int64)
    wanted = wanted.scatter_reduce(3, chosen.clamp(min=0).remainder(C), chosen, reduce="amax")
    mask = ((held == wanted) & (wanted >= 0)) | (held == q_pos.view(-1, 1, 1, 1))
    logits = torch.einsum("bhgd,bhcd->bhgc", q[:, :, 0].float().view(B, Hkv, Hq // Hkv, D), k_cache.float()) * scale
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgc,bhcd->bhgd", probs, v_cache.float()).reshape(B, Hq, 1, D)


def state(B, Hq, Hkv, C, D, K, seed, dtype=torch.float32):
    """A ring written in position order up to each sequence's q_pos (some not yet full,
    some wrapped, so earlier positions were overwritten), a few slots emptied; each query
    head's K distinct earlier positions, any of them possibly overwritten since (a stale
    choice), some -1, some the current position."""
    g = torch.Generator().manual_seed(seed)
    q_pos = torch.randint(C // 2, 3 * C, (B,), generator=g)
    slot_pos = torch.full((B, Hkv, C), -1, dtype=torch.int32)
    for b in range(B):
        for p in range(max(0, int(q_pos[b]) - C + 1), int(q_pos[b]) + 1):
            slot_pos[b, :, p % C] = p
    slot_pos[torch.rand(B, Hkv, C, generator=g) < 0.1] = -1
    for b in range(B):  # the current token is written
        slot_pos[b, :, int(q_pos[b]) % C] = int(q_pos[b])
    chosen = torch.full((B, Hq, K), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hq):
            n = min(K, int(q_pos[b]))
            chosen[b, h, :n] = torch.randperm(int(q_pos[b]), generator=g)[:n].int()
            chosen[b, h] = chosen[b, h, torch.randperm(K, generator=g)]
            if torch.rand(1, generator=g) < 0.5:
                chosen[b, h, int(torch.randint(K, (1,), generator=g))] = int(q_pos[b])
    chosen[torch.rand(B, Hq, K, generator=g) < 0.2] = -1
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    return q, k, v, slot_pos, chosen, q_pos


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_the_masked_definition(dtype):
    for seed in range(20):
        args = state(2, 4, 2, 13, 8, 5 + seed % 7, seed, dtype)
        got = gather_decode_attention_ref(*args, 0.3)
        assert got.dtype == dtype and got.shape == (2, 4, 1, 8)
        torch.testing.assert_close(got.float(), masked_definition(*args, 0.3), rtol=TOL[dtype], atol=TOL[dtype])


def poisoned(seed):
    """A state whose slots no head reads hold NaN: a read over the whole ring, masked
    afterwards, turns the output NaN (0 * NaN); one that uses only the read rows does not."""
    q, k, v, slot_pos, chosen, q_pos = state(2, 4, 2, 13, 8, 5, seed)
    mask = torch.zeros(2, 2, 13, dtype=torch.bool)
    for b in range(2):
        for h in range(4):
            for p in chosen[b, h].tolist() + [int(q_pos[b])]:
                if p >= 0 and slot_pos[b, h // 2, p % 13] == p:
                    mask[b, h // 2, p % 13] = True
    k[~mask], v[~mask] = float("nan"), float("nan")
    return q, k, v, slot_pos, chosen, q_pos


def test_reference_reads_no_other_slot():
    args = poisoned(0)
    assert torch.isfinite(gather_decode_attention_ref(*args, 0.3)).all()
    assert torch.isnan(masked_definition(*args, 0.3)).any()


def test_a_head_reading_nothing_gets_zeros_and_bad_shapes_are_named():
    q, k, v, slot_pos, chosen, q_pos = state(1, 2, 1, 8, 4, 3, 1)
    out = gather_decode_attention_ref(q, k, v, torch.full_like(slot_pos, -1), chosen, q_pos, 0.5)
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match=r"chosen must be int32/int64 \[B, Hq, K\] = \[1, 2, K\], got torch.int32 \(1, 3, 3\)"):
        gather_decode_attention_ref(q, k, v, slot_pos, torch.zeros(1, 3, 3, dtype=torch.int32), q_pos, 0.5)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        gather_decode_attention_ref(q, k.expand(1, 3, 8, 4), v.expand(1, 3, 8, 4), slot_pos.expand(1, 3, 8), chosen, q_pos, 0.5)


_SCRIPT = textwrap.dedent("""
    import torch
    from slimfx.codegen.kernels.gather_decode_attention import gather_decode_attention, gather_decode_attention_ref
    from tests.test_kernels_gather_decode import TOL, masked_definition, poisoned, state
    cases = [  # (B, Hq, Hkv, C, D, K, dtype, splits)
        (2, 4, 2, 13, 8, 5, torch.float32, None), (2, 4, 2, 37, 16, 19, torch.float32, None),
        (1, 3, 3, 29, 12, 11, torch.bfloat16, None), (2, 4, 1, 40, 8, 21, torch.float16, 1),
        (1, 4, 2, 64, 24, 33, torch.float32, 5),
    ]
    for B, Hq, Hkv, C, D, K, dtype, splits in cases:
        for seed in range(2):
            args = state(B, Hq, Hkv, C, D, K, seed, dtype)
            got = gather_decode_attention(*args, 0.3, splits=splits)
            want = gather_decode_attention_ref(*args, 0.3)
            assert got.dtype == dtype and got.shape == (B, Hq, 1, D), (got.dtype, got.shape)
            torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
            torch.testing.assert_close(got.float(), masked_definition(*args, 0.3), rtol=TOL[dtype], atol=TOL[dtype])
    # q strided like a projection's transposed output, q_pos an expanded view, a query
    # head whose ring is empty (zeros).
    q, k, v, slot_pos, chosen, q_pos = state(2, 4, 2, 13, 8, 5, 3)
    q = torch.randn(2, 1, 4, 8).transpose(1, 2)
    slot_pos[1] = -1
    q_pos = q_pos[:1].expand(2)
    got = gather_decode_attention(q, k, v, slot_pos, chosen, q_pos, 0.3)
    torch.testing.assert_close(got, gather_decode_attention_ref(q, k, v, slot_pos, chosen, q_pos, 0.3), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    for seed in range(2):
        args = poisoned(seed)
        got = gather_decode_attention(*args, 0.3)
        assert torch.isfinite(got).all(), "a slot no head reads was used"
        torch.testing.assert_close(got, gather_decode_attention_ref(*args, 0.3), rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_kernel_matches_reference_under_interpreter():
    assert run_interpreted(_SCRIPT).strip().endswith("ok")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernel_matches_reference_at_model_size(dtype):
    """Llama-3.2-1B's heads (32 query, 8 kv, head_dim 64), a 16K ring, 2047 chosen each:
    the launch configuration the GPU uses (64-entry blocks, several splits)."""
    args = [t.cuda() for t in state(1, 32, 8, 16384, 64, 2047, 0, dtype)]
    got = gather_decode_attention(*args, 0.125)
    torch.testing.assert_close(got.float(), gather_decode_attention_ref(*args, 0.125).float(), rtol=TOL[dtype], atol=TOL[dtype])
