"""The `duo` variant of `slimfx::attention` (runtime/attention_op.py): a site whose kv
heads are split in two groups with tiers of different sizes (DuoAttention; per-head
budgets with real memory).

    layout  duo/<n_sink>/<window>
    tiers   main:      the streaming heads: k, v [B, Hs, budget, D], slot_pos, scores,
                       heads [Hs] int64 (their kv-head indices)
            retrieval: the retrieval heads: k, v [B, Hr, C, D], slot_pos, heads [Hr] int64

- retrieval heads keep every token in a full-capacity tier and attend like the plain
  variant;
- streaming heads keep only the first `n_sink` tokens and a recent window in a tier
  whose capacity is the site's budget, with the StreamingLLM rule of the evict variant
  (eviction_op.py).
Each group's query heads are its kv heads' GQA groups; the two outputs are written back
in head order, so the op is a drop-in for the site's attention.
"""

from __future__ import annotations

import torch

import slimfx.passes.kv_eviction.eviction_op as eviction_op
from slimfx.runtime.attention_op import Plain, Tiers, layout_string, register_variant
from slimfx.runtime.kv_store import SiteCache, Tier, plain_tier

FIELDS = ("main.k", "main.v", "main.slot_pos", "main.scores", "main.heads",
          "retrieval.k", "retrieval.v", "retrieval.slot_pos", "retrieval.heads")


def duo_layout(n_sink: int, window: int) -> str:
    return layout_string("duo", n_sink, window)


def duo_tiers(batch: int, retrieval: list[int], streaming: list[int], capacity: int, budget: int, head_dim: int, *,
              dtype=torch.float32, device="cpu") -> dict[str, Tier]:
    """Empty tiers: the streaming heads' `budget` slots (main) and the retrieval heads' `capacity`."""
    tiers = {"main": plain_tier(batch, len(streaming), budget, head_dim, dtype=dtype, device=device, scores=True, heads=tuple(streaming)),
             "retrieval": plain_tier(batch, len(retrieval), capacity, head_dim, dtype=dtype, device=device, heads=tuple(retrieval))}
    for tier in tiers.values():
        tier.buffers["heads"] = torch.tensor(tier.heads, device=device, dtype=torch.int64)
        tier.fixed = ("heads",)
    return tiers


def duo_site(batch: int, retrieval: list[int], streaming: list[int], capacity: int, budget: int, head_dim: int, *,
             n_sink: int = 4, window: int = 64, dtype=torch.float32, device="cpu", index: int = 0) -> SiteCache:
    """A standalone site of this layout (empty), outside any store."""
    tiers = duo_tiers(batch, retrieval, streaming, capacity, budget, head_dim, dtype=dtype, device=device)
    return SiteCache(index, head_dim, tiers, layout=duo_layout(n_sink, window))


def query_heads(kv_heads: torch.Tensor, group: int) -> torch.Tensor:
    """Query-head indices served by `kv_heads` (GQA: kv head h serves h*group .. h*group+group-1)."""
    return (kv_heads[:, None] * group + torch.arange(group, device=kv_heads.device)).reshape(-1)


_PLAIN = Plain()


class Duo:
    fields = FIELDS

    def __init__(self, n_sink: str, window: str):
        self.n_sink, self.window = int(n_sink), int(window)

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        stream, full = tiers["main"], tiers["retrieval"]
        group = q.shape[1] // k.shape[1]
        out = q.new_empty(q.shape)
        for tier, part in ((full, self._retrieval), (stream, self._streaming)):
            heads = tier["heads"]
            qh = query_heads(heads, group)
            res = part(q.index_select(1, qh), k.index_select(1, heads), v.index_select(1, heads), positions, tier, scale, triton)
            out.index_copy_(1, qh, res.to(out.dtype))
        return out

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        """Each head group over its own tier, as it is."""
        groups = (tiers["retrieval"], tiers["main"])
        group = q.shape[1] // sum(t["heads"].numel() for t in groups)
        out = q.new_empty(q.shape)
        for tier in groups:
            qh = query_heads(tier["heads"], group)
            res = _PLAIN.read(q.index_select(1, qh), positions, {"main": tier}, scale, triton)
            out.index_copy_(1, qh, res.to(out.dtype))
        return out

    @staticmethod
    def _retrieval(q, k, v, positions, tier, scale, triton):
        return _PLAIN.run(q, k, v, positions, {"main": tier}, scale, triton)

    def _streaming(self, q, k, v, positions, tier, scale, triton):
        policy = eviction_op.policy_for("duo", tier["k"].shape[2], self.n_sink, self.window, 0.0)
        step = eviction_op.decode if q.shape[2] == 1 else eviction_op.prefill
        return step(q, k, v, positions, tier, scale, policy, triton)


register_variant("duo", Duo)
