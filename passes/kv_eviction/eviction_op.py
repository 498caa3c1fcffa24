"""The `evict` variant of `slimfx::attention` (runtime/attention_op.py): a site whose main
tier holds a fixed budget of tokens chosen by an eviction policy (policies.py).

    layout  evict/<policy>/<n_sink>/<window>/<param>/<prefill_slots>
    tiers   main: k, v [B, Hkv, C, D], slot_pos [B, Hkv, C], scores [B, Hkv, C] f32
            (+ D2O: merge_tau [B, Hkv, 1] f32, its moving merge threshold)

The capacity C of the main tier *is* the budget. `param` is the policy's one parameter
(A2SF's alpha, Keyformer's tau, SnapKV's observation window, D2O's threshold EMA weight). `prefill_slots` > 0 splits
the tier (SCOPE): the prompt keeps that many slots, chosen at prefill and then frozen,
and generated tokens take turns in the remaining C - prefill_slots.

- decode (T == 1): the policy picks the slot the new token overwrites (an empty slot
  while there is one, else its lowest-priority unprotected slot), the token is written
  there, and the query attends over the tier; the decode kernel adds each slot's
  attention mass to `scores` (scaled by the policy's decay) in the same pass.
- prefill (T > 1): the chunk attends over the tier + itself (attention_op.prefill_read);
  then tier and chunk are merged, the policy's keep rule picks C tokens (sinks, recent
  window, then by priority from the mass the chunk's queries gave every key, or SnapKV's
  pooled observation-window scores), and the kept tokens are written back in place.

D2O (`policy.merges`): what the keep rule evicts, at prefill and at each decode step, is
merged into a kept token instead of being dropped when similar enough (`merge_evicted`).

With C at least the total length nothing is evicted and the result equals the full
cache. RoPE is applied before the op with each token's true position, and the
visibility rule compares positions, never slots, so eviction never shifts a position.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from slimfx.passes.kv_eviction.policies import POLICIES, EvictionPolicy, make_policy
from slimfx.runtime.attention_op import TierRead, Tiers, decode_read, layout_string, prefill_read, read_tiers, register_variant
from slimfx.runtime.kv_store import SiteCache, plain_tier

FIELDS = ("main.k", "main.v", "main.slot_pos", "main.scores")
MERGE_FIELD = "merge_tau"  # D2O's moving merge threshold per (sequence, kv head); NaN: none yet


@lru_cache(maxsize=None)
def policy_for(name: str, capacity: int, n_sink: int, window: int, param: float) -> EvictionPolicy:
    extra = {"a2sf": {"alpha": param}, "keyformer": {"tau": param}, "snapkv": {"obs_window": int(param)},
             "d2o": {"ema": param}, "h2o": {"mean": param == 1.0}}.get(name, {})
    return make_policy(name, capacity, n_sink=n_sink, window=window, **extra)


def evict_layout(policy: str, n_sink: int, window: int, param: float, prefill_slots: int = 0) -> str:
    return layout_string("evict", policy, n_sink, window, float(param), prefill_slots)


def evict_site(batch: int, n_heads: int, capacity: int, head_dim: int, *, policy: str = "h2o", n_sink: int = 4, window: int = 64,
               param: float = 0.0, prefill_slots: int = 0, dtype=torch.float32, device="cpu", index: int = 0) -> SiteCache:
    """A standalone site of this layout (empty), outside any store."""
    main = evict_tier(policy, batch, n_heads, capacity, head_dim, dtype=dtype, device=device)
    return SiteCache(index, head_dim, {"main": main}, layout=evict_layout(policy, n_sink, window, param, prefill_slots))


def evict_tier(policy: str, batch: int, n_heads: int, capacity: int, head_dim: int, *, dtype, device):
    """An empty main tier for `policy` (with D2O's threshold buffer when it merges)."""
    main = plain_tier(batch, n_heads, capacity, head_dim, dtype=dtype, device=device, scores=True)
    if POLICIES[policy].merges:
        main.buffers[MERGE_FIELD] = torch.full((batch, n_heads, 1), float("nan"), device=device)
    return main


def scatter_heads(buf: torch.Tensor, slots: torch.Tensor, value: torch.Tensor) -> None:
    """buf[b, h, slots[b, h, t]] = value[b, h, t] (per-head slots), in place."""
    if buf.dim() == 4:
        idx = slots[..., None].expand(*slots.shape, buf.shape[-1])
        buf.scatter_(2, idx, value.to(buf.dtype))
    else:
        buf.scatter_(2, slots, value.to(buf.dtype))


def write_to_slots(main: dict, victims, k, v, pos) -> None:
    """The token of each (sequence, kv head) into slot victims[b, h, 0], with a zero score."""
    B, Hkv = k.shape[:2]
    scatter_heads(main["k"], victims, k)
    scatter_heads(main["v"], victims, v)
    scatter_heads(main["slot_pos"], victims, pos.view(B, 1, 1).expand(B, Hkv, 1))
    scatter_heads(main["scores"], victims, torch.zeros(B, Hkv, 1, device=k.device))


def _write_victim(k, v, pos, main: dict, policy: EvictionPolicy, prefill_slots: int, triton: bool) -> None:
    # Policies whose victim rule the write kernel knows (policy.fused_priority) choose and
    # write in one Triton kernel; the others (SnapKV ranks generated tokens by age below
    # the prompt's scores) and SCOPE's decode region take the torch path.
    if triton and prefill_slots == 0 and policy.fused_priority is not None:
        from slimfx.codegen.kernels.evict_write import evict_write

        evict_write(k.contiguous(), v.contiguous(), pos, main["k"], main["v"], main["slot_pos"], main["scores"],
                    policy.n_sink, policy.window, policy.fused_priority)
        return
    # SCOPE: slots [prefill_slots, C) hold generated tokens; the victim is chosen among them
    # only, so the prompt's selection stays as the prefill left it (views write in place).
    region = {name: main[name][:, :, prefill_slots:] for name in ("k", "v", "slot_pos", "scores")}
    victims = policy.victim_slots(region["scores"], region["slot_pos"], pos, 1)  # [B, Hkv, 1]
    write_to_slots(region, victims, k, v, pos)


# ----------------------------------------------------------------------------- D2O merging

SELF_WEIGHT = math.e  # a kept token's own weight in a merge: exp of its similarity to itself


def merge_targets(ek, evicted, kk, kept, tau, ema: float):
    """D2O's compensation rule for evicted keys ek [B, Hkv, N, D] (rows where `evicted`
    [B, Hkv, N]) against kept keys kk [B, Hkv, C, D] (slots where `kept` [B, Hkv, C]).
    Each evicted token's nearest kept key by cosine similarity u; the threshold tau
    [B, Hkv, 1] (NaN: none yet) moves to ema * tau + (1 - ema) * mean(u over this
    eviction's tokens), or starts at that mean; a token with u >= the new threshold is
    merged. Returns (target slot [B, Hkv, N], merge weight exp(u) [B, Hkv, N], 0 where not
    merged); tau is updated in place."""
    sim = F.normalize(ek.float(), dim=-1) @ F.normalize(kk.float(), dim=-1).transpose(-1, -2)
    u, target = sim.masked_fill(~kept[:, :, None, :], float("-inf")).max(dim=-1)
    evicted = evicted & torch.isfinite(u)
    count = evicted.sum(-1, keepdim=True)
    mean = torch.where(evicted, u, 0.0).sum(-1, keepdim=True) / count.clamp_min(1)
    moved = torch.where(torch.isnan(tau), mean, ema * tau + (1.0 - ema) * mean)
    tau.copy_(torch.where(count > 0, moved, tau))
    merged = evicted & (u >= tau)
    return target, torch.where(merged, u.exp(), 0.0)


def merge_into(kk, vv, ek, ev, target, weight):
    """Kept keys and values with the evicted ones merged in: a kept token c receiving the
    set I_c becomes (e * x_c + sum_i exp(u_i) x_i) / (e + sum_i exp(u_i)) (D2O's weighted
    merge: a softmax over the similarities, the kept token's own being 1). Slots receiving
    nothing are returned unchanged (bit for bit). Out of place; float32 math."""
    idx = target[..., None].expand_as(ek)
    total = torch.zeros(kk.shape[:3], device=kk.device).scatter_add_(-1, target, weight)
    received = (total > 0)[..., None]
    denom = (SELF_WEIGHT + total)[..., None]
    out = []
    for kept, evicted in ((kk, ek), (vv, ev)):
        summed = torch.zeros(kept.shape, device=kept.device).scatter_add_(2, idx, weight[..., None] * evicted.float())
        out.append(torch.where(received, (SELF_WEIGHT * kept.float() + summed) / denom, kept.float()).to(kept.dtype))
    return out[0], out[1]


def _restart_threshold(main: dict) -> None:
    """A sequence whose store is empty starts a new moving threshold (reset() clears slots only)."""
    fresh = (main["slot_pos"] < 0).all(dim=-1, keepdim=True)
    main[MERGE_FIELD].masked_fill_(fresh, float("nan"))


def _write_and_merge(k, v, pos, main: dict, policy: EvictionPolicy) -> None:
    """Decode with D2O: the victim slot is chosen and overwritten as H2O does; the token it
    held is merged into its nearest kept token (the new one included) when similar enough.
    Only the target slot is rewritten, in place."""
    _restart_threshold(main)
    victims = policy.victim_slots(main["scores"], main["slot_pos"], pos, 1)  # [B, Hkv, 1]
    gather4 = lambda t: torch.gather(t, 2, victims[..., None].expand(*victims.shape, t.shape[-1]))
    old_k, old_v = gather4(main["k"]), gather4(main["v"])
    old_filled = torch.gather(main["slot_pos"], 2, victims) >= 0
    write_to_slots(main, victims, k, v, pos)
    target, weight = merge_targets(old_k, old_filled, main["k"], main["slot_pos"] >= 0, main[MERGE_FIELD], policy.ema)
    slot = target[..., None].expand_as(old_k)
    kept_k, kept_v = torch.gather(main["k"], 2, slot), torch.gather(main["v"], 2, slot)
    new_k, new_v = merge_into(kept_k, kept_v, old_k, old_v, torch.zeros_like(target), weight)
    main["k"].scatter_(2, slot, new_k)
    main["v"].scatter_(2, slot, new_v)


def decode(q, k, v, positions, main: dict, scale: float, policy: EvictionPolicy, triton: bool, prefill_slots: int = 0):
    pos = positions[:, 0]
    if policy.merges:
        _write_and_merge(k, v, pos, main, policy)
    else:
        _write_victim(k, v, pos, main, policy, prefill_slots, triton)
    tracked = main["scores"] if policy.needs_scores else None
    decay = policy.decay if policy.decay is not None else 1.0
    store = TierRead(main["k"], main["v"], main["slot_pos"])
    return decode_read(q, pos, [store], scale, triton, scores=tracked, decay=decay)


def prefill(q, k, v, positions, main: dict, scale: float, policy: EvictionPolicy, triton: bool, prefill_slots: int = 0):
    k_cache, v_cache, slot_pos, scores = (main[f] for f in ("k", "v", "slot_pos", "scores"))
    out = prefill_read(q, positions, [TierRead(k_cache, v_cache, slot_pos)], scale, triton, chunk=(k, v, positions))
    # The keep rule ranks store and chunk together: merge them once, for scoring and compaction.
    B, Hkv, T, _ = k.shape
    keys = torch.cat([k_cache, k.to(k_cache.dtype)], dim=2)
    vals = torch.cat([v_cache, v.to(v_cache.dtype)], dim=2)
    new_pos = torch.where(positions < 0, -1, positions)[:, None, :].expand(B, Hkv, T)
    kpos = torch.cat([slot_pos.to(torch.int64), new_pos], dim=2)
    merged_scores = policy.prefill_scores(q, positions, keys, kpos, scores, scale)
    seen = positions.amax(dim=1) + 1
    # SCOPE: the prompt keeps `prefill_slots` slots; the rest stay empty for decoding.
    budget = prefill_slots if prefill_slots > 0 else k_cache.shape[2]
    merged_scores = merged_scores.to(scores.dtype)
    keep = policy.keep_mask(merged_scores, kpos, seen, budget)
    kk, vv, ss, pp = policy.compact(keys, vals, merged_scores, kpos, seen, budget=budget, keep=keep)
    if policy.merges:
        _restart_threshold(main)
        target, weight = merge_targets(keys, (kpos >= 0) & ~keep, kk, pp >= 0, main[MERGE_FIELD], policy.ema)
        kk, vv = merge_into(kk, vv, keys, vals, target, weight)
    kept = kk.shape[2]
    k_cache[:, :, :kept].copy_(kk)
    v_cache[:, :, :kept].copy_(vv)
    scores[:, :, :kept].copy_(ss)
    slot_pos[:, :, :kept].copy_(pp.to(slot_pos.dtype))
    slot_pos[:, :, kept:].fill_(-1)
    return out


class Evict:
    def __init__(self, policy: str, n_sink: str, window: str, param: str, prefill_slots: str):
        self.policy, self.n_sink, self.window = policy, int(n_sink), int(window)
        self.param, self.prefill_slots = float(param), int(prefill_slots)
        self.fields = FIELDS + ((f"main.{MERGE_FIELD}",) if POLICIES[policy].merges else ())

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        main = tiers["main"]
        policy = policy_for(self.policy, main["k"].shape[2], self.n_sink, self.window, self.param)
        step = decode if q.shape[2] == 1 else prefill
        return step(q, k, v, positions, main, scale, policy, triton, self.prefill_slots)

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        """The kept tokens as they are; the owner's policy alone ranks them (no score update)."""
        main = tiers["main"]
        return read_tiers(q, positions, [TierRead(main["k"], main["v"], main["slot_pos"])], scale, triton)


register_variant("evict", Evict)
