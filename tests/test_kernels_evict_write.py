"""The fused decode-time slot choice + write kernel against its reference and against
the policies' own victim rule (passes/kv_eviction/policies.py), under TRITON_INTERPRET=1."""

import textwrap

import pytest
import torch

from slimfx.codegen.kernels.evict_write import evict_write_ref
from slimfx.passes.kv_eviction.policies import make_policy
from tests.interpreted import run_interpreted


def _state(B, H, C, D, seen, seed):
    g = torch.Generator().manual_seed(seed)
    slot_pos = torch.full((B, H, C), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            n = int(torch.randint(C // 2, C + 1, (1,), generator=g))
            slot_pos[b, h, torch.randperm(C, generator=g)[:n]] = torch.randperm(seen, generator=g)[:n].int()
    scores = torch.rand(B, H, C, generator=g).round(decimals=1)  # ties on purpose
    return (torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), torch.full((B,), seen),
            torch.randn(B, H, C, D, generator=g), torch.randn(B, H, C, D, generator=g), slot_pos, scores)


@pytest.mark.parametrize("policy, options", [("h2o", {}), ("h2o", {"mean": True}), ("a2sf", {}), ("streaming", {}), ("duo", {})])
def test_reference_follows_the_policy_victim_rule(policy, options):
    for seed in range(5):
        k, v, pos, kc, vc, sp, sc = _state(2, 3, 37, 8, 90, seed)
        pol = make_policy(policy, 37, n_sink=3, window=5, **options)
        victim = pol.victim_slots(sc, sp, pos, 1)[..., 0]
        evict_write_ref(k, v, pos, kc, vc, sp, sc, 3, 5, pol.fused_priority)
        chosen = torch.gather(sp, -1, victim[..., None])[..., 0]
        assert (chosen == 90).all()  # the new token sits in the slot the policy picked
        assert torch.equal(torch.gather(kc, 2, victim[..., None, None].expand(2, 3, 1, 8)), k)


_SCRIPT = textwrap.dedent("""
    import torch
    from slimfx.codegen.kernels.evict_write import evict_write, evict_write_ref
    from tests.test_kernels_evict_write import _state
    for C, D, priority in ((37, 8, "score"), (37, 8, "position"), (37, 8, "mean"), (1500, 16, "score"), (1500, 16, "mean"), (64, 24, "position")):
        for seed in range(3):
            a = _state(2, 3, C, D, 3 * C, seed)
            b = tuple(t.clone() for t in a)
            evict_write(*a, 4, 7, priority)
            evict_write_ref(*b, 4, 7, priority)
            for x, y in zip(a, b):
                assert torch.equal(x, y), (C, D, priority, seed)
    # One position shared by the batch as an expanded (stride-0) view; the element after
    # it is 0, which a kernel reading pos[1] from memory would see.
    a = _state(2, 3, 37, 8, 111, 0)
    shared = torch.tensor([111, 0])[:1].expand(2)
    a, b = (a[0], a[1], shared) + a[3:], tuple(t.clone() for t in a[:2]) + (shared,) + tuple(t.clone() for t in a[3:])
    evict_write(*a, 4, 7, "position")
    evict_write_ref(*b, 4, 7, "position")
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "expanded pos"
    # ring_write (the non-evicting decode write) against attention_op.write_tokens: slot
    # pos % C, a pad (negative position) empties its slot, v strided like a transposed
    # projection output, the cache in another dtype than k, v.
    from slimfx.codegen.kernels.evict_write import ring_write
    from slimfx.runtime.attention_op import write_tokens
    for pos in ([5, 40], [-2, 36], [0, 73]):
        a = _state(2, 3, 37, 8, 90, 1)
        k, v = a[0], torch.randn(2, 1, 3, 8).transpose(1, 2)
        caches = (a[3].half(), a[4].half(), a[5])  # a plain site: no scores to zero
        mine, ref = tuple(t.clone() for t in caches), tuple(t.clone() for t in caches)
        ring_write(k, v, torch.tensor(pos), *mine)
        write_tokens(k, v, torch.tensor(pos)[:, None], *ref)
        assert all(torch.equal(x, y) for x, y in zip(mine, ref)), ("ring_write", pos)
    # A prefill chunk: T tokens with left padding (distinct negative virtual positions), and
    # a chunk longer than the store (only its last C tokens land).
    for T, start in ((9, 30), (45, 3)):
        a = _state(2, 3, 37, 8, 90, 2)
        k, v = torch.randn(2, 3, T, 8), torch.randn(2, T, 3, 8).transpose(1, 2)
        pos = torch.arange(start, start + T).repeat(2, 1)
        pos[1, :4] = torch.arange(-4, 0)
        caches = (a[3].half(), a[4].half(), a[5])
        mine, ref = tuple(t.clone() for t in caches), tuple(t.clone() for t in caches)
        ring_write(k, v, pos, *mine)
        write_tokens(k, v, pos, *ref)
        assert all(torch.equal(x, y) for x, y in zip(mine, ref)), ("ring_write chunk", T)
    print("ok")
""")


def test_kernel_matches_reference_under_interpreter():
    assert run_interpreted(_SCRIPT).strip().endswith("ok")
