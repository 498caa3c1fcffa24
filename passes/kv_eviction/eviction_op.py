"""`torch.ops.slimfx.attention_evict`: the attention op of a site whose store holds a
fixed budget of tokens chosen by an eviction policy (policies.py).

    out = torch.ops.slimfx.attention_evict(q, k, v, positions, k_cache, v_cache, slot_pos, scores,
                                           scale, policy, n_sink, window, param)

Same tensors as `slimfx::attention` (runtime/attention_op.py); the capacity C of the
site's buffers *is* the budget. `policy` names a policy of policies.py,
`param` its one parameter (A2SF's alpha, Keyformer's tau, SnapKV's observation window).
`prefill_slots` > 0 splits the store (SCOPE): the prompt keeps that many slots, chosen at
prefill and then frozen, and generated tokens take turns in the remaining C - prefill_slots.

- decode (T == 1): the policy picks the slot the new token overwrites (an empty slot
  while there is one, else its lowest-priority unprotected slot), the token is
  written there, and the query attends over the store; the attention kernel adds each
  slot's attention mass to `scores` (scaled by the policy's decay) in the same pass.
- prefill (T > 1): the chunk attends over the store + itself; then store and chunk
  are merged, the policy's keep rule picks C tokens (sinks, recent window, then by
  priority from the mass the chunk's queries gave every key, or SnapKV's pooled
  observation-window scores), and the kept tokens are written back in place.

With C at least the total length nothing is evicted and the result equals the full
cache. RoPE is applied before the op with each token's true position, and the
visibility rule compares positions, never slots, so eviction never shifts a position.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from slimfx.codegen.kernels.decode_attention import decode_attention_ref
from slimfx.codegen.kernels.prefill_attention import prefill_attention_ref
from slimfx.passes.kv_eviction.policies import EvictionPolicy, make_policy


@lru_cache(maxsize=None)
def _policy(name: str, capacity: int, n_sink: int, window: int, param: float) -> EvictionPolicy:
    extra = {"a2sf": {"alpha": param}, "keyformer": {"tau": param}, "snapkv": {"obs_window": int(param)}}.get(name, {})
    return make_policy(name, capacity, n_sink=n_sink, window=window, **extra)


def _scatter_heads(buf: torch.Tensor, slots: torch.Tensor, value: torch.Tensor) -> None:
    """buf[b, h, slots[b, h, t]] = value[b, h, t] (per-head slots), in place."""
    if buf.dim() == 4:
        idx = slots[..., None].expand(*slots.shape, buf.shape[-1])
        buf.scatter_(2, idx, value.to(buf.dtype))
    else:
        buf.scatter_(2, slots, value.to(buf.dtype))


# Policies whose decode-time priority is the slot's own score or position: their slot
# choice and write run as one Triton kernel on CUDA (codegen/kernels/evict_write.py).
_FUSED_VICTIM = {"h2o": False, "a2sf": False, "snapkv": False, "streaming": True, "duo": True}


def _write_victim(k, v, pos, k_cache, v_cache, slot_pos, scores, policy: EvictionPolicy) -> None:
    B, Hkv = k.shape[:2]
    if k.is_cuda and policy.name in _FUSED_VICTIM:
        from slimfx.codegen.kernels.evict_write import evict_write

        evict_write(k.contiguous(), v.contiguous(), pos, k_cache, v_cache, slot_pos, scores,
                    policy.n_sink, policy.window, _FUSED_VICTIM[policy.name])
        return
    victims = policy.victim_slots(scores, slot_pos, pos, 1)  # [B, Hkv, 1]
    _scatter_heads(k_cache, victims, k)
    _scatter_heads(v_cache, victims, v)
    _scatter_heads(slot_pos, victims, pos.view(B, 1, 1).expand(B, Hkv, 1).to(slot_pos.dtype))
    _scatter_heads(scores, victims, torch.zeros(B, Hkv, 1, dtype=scores.dtype, device=scores.device))


def _write_decode_region(k, v, pos, k_cache, v_cache, slot_pos, scores, policy: EvictionPolicy, prefill_slots: int) -> None:
    """SCOPE: slots [prefill_slots, C) hold generated tokens; the victim is chosen among them
    only, so the prompt's selection stays as the prefill left it (views write in place)."""
    region = [t[:, :, prefill_slots:] for t in (k_cache, v_cache, slot_pos, scores)]
    victims = policy.victim_slots(region[3], region[2], pos, 1)
    B, Hkv = k.shape[:2]
    _scatter_heads(region[0], victims, k)
    _scatter_heads(region[1], victims, v)
    _scatter_heads(region[2], victims, pos.view(B, 1, 1).expand(B, Hkv, 1).to(slot_pos.dtype))
    _scatter_heads(region[3], victims, torch.zeros(B, Hkv, 1, dtype=scores.dtype, device=scores.device))


def _decode(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, policy: EvictionPolicy, prefill_slots: int = 0):
    pos = positions[:, 0]
    if prefill_slots > 0:
        _write_decode_region(k, v, pos, k_cache, v_cache, slot_pos, scores, policy, prefill_slots)
    else:
        _write_victim(k, v, pos, k_cache, v_cache, slot_pos, scores, policy)
    q1 = q[:, :, 0].contiguous()
    tracked = scores if policy.needs_scores else None
    decay = policy.decay if policy.decay is not None else 1.0
    if q.is_cuda:
        from slimfx.codegen.kernels.decode_attention import decode_attention

        out = decode_attention(q1, k_cache, v_cache, slot_pos, pos, scale=scale, scores=tracked, decay=decay)
    else:
        out = decode_attention_ref(q1, k_cache, v_cache, slot_pos, pos, scale=scale, scores=tracked, decay=decay)
    return out.unsqueeze(2)


def _prefill(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, policy: EvictionPolicy, prefill_slots: int = 0):
    B, Hkv, T, _ = k.shape
    keys = torch.cat([k_cache, k.to(k_cache.dtype)], dim=2)
    vals = torch.cat([v_cache, v.to(v_cache.dtype)], dim=2)
    new_pos = torch.where(positions < 0, -1, positions)[:, None, :].expand(B, Hkv, T)
    kpos = torch.cat([slot_pos.to(torch.int64), new_pos], dim=2)
    qc = q.contiguous()
    if q.is_cuda:
        from slimfx.codegen.kernels.prefill_attention import prefill_attention

        out = prefill_attention(qc, positions, keys, vals, kpos, scale=scale)
    else:
        out = prefill_attention_ref(qc, positions, keys, vals, kpos, scale=scale)
    merged_scores = policy.prefill_scores(q, positions, keys, kpos, scores, scale)
    seen = positions.amax(dim=1) + 1
    # SCOPE: the prompt keeps `prefill_slots` slots; the rest stay empty for decoding.
    budget = prefill_slots if prefill_slots > 0 else k_cache.shape[2]
    kk, vv, ss, pp = policy.compact(keys, vals, merged_scores.to(scores.dtype), kpos, seen, budget=budget)
    kept = kk.shape[2]
    k_cache[:, :, :kept].copy_(kk)
    v_cache[:, :, :kept].copy_(vv)
    scores[:, :, :kept].copy_(ss)
    slot_pos[:, :, :kept].copy_(pp.to(slot_pos.dtype))
    slot_pos[:, :, kept:].fill_(-1)
    return out.contiguous()


@torch.library.custom_op("slimfx::attention_evict", mutates_args=("k_cache", "v_cache", "slot_pos", "scores"))
def attention_evict(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor, scores: torch.Tensor,
    scale: float, policy: str, n_sink: int, window: int, param: float, prefill_slots: int = 0,
) -> torch.Tensor:
    pol = _policy(policy, k_cache.shape[2], n_sink, window, param)
    run = _decode if q.shape[2] == 1 else _prefill
    return run(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, pol, prefill_slots).contiguous()


@attention_evict.register_fake
def _attention_evict_fake(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, policy, n_sink, window, param, prefill_slots=0):
    return q.new_empty(q.shape)  # contiguous, like the real op (empty_like would copy q's strides)


def attention_evict_ref(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale=None, policy="h2o", n_sink=4, window=64, param=0.0, prefill_slots=0):
    """The op's definition (the same code the CPU path runs), callable without torch.ops."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pol = _policy(policy, k_cache.shape[2], n_sink, window, param)
    run = _decode if q.shape[2] == 1 else _prefill
    return run(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, pol, prefill_slots)
