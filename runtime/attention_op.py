"""`torch.ops.slimfx.attention`: one op per attention site = cache update + attention
(+ the eviction policies' score bookkeeping). DESIGN.md decisions 3 and 4.

    out = torch.ops.slimfx.attention(q, k, v, positions, k_cache, v_cache, slot_pos, scores,
                                     scale, score_decay, track_scores, write_kv)

    q          [B, Hq, T, D]   queries of this step's T tokens (RoPE applied with true positions)
    k, v       [B, Hkv, T, D]  this step's keys/values (not repeated for GQA)
    positions  [B, T] int64    true positions of the step's tokens; negative = padding
    k_cache, v_cache, slot_pos, scores:  the site's SiteCache buffers (runtime/kv_store.py),
               mutated in place (declared through `mutates_args`)
    returns    [B, Hq, T, D]   like SDPA's output

Semantics (the reference, `attention_ref`, is the definition):
- decode (T == 1): the token is written to slot `pos % C`, then the query attends over
  every slot with 0 <= slot_pos <= pos. With `track_scores`, scores = score_decay *
  scores + the attention mass each slot received (summed over the GQA group).
- prefill (T > 1): the chunk's queries attend over the slots filled before the chunk
  plus the chunk itself (same position rule, so causality and left padding need no
  mask tensor); then the chunk is written (only its last C tokens when T > C).
  Prefill does not track scores (prefill scoring, SnapKV-style, belongs to issue 6).
- Slots wrap around (`pos % C`): with capacity >= total length nothing is ever
  overwritten and the result is exact; with less it is a sliding window until an
  eviction policy chooses slots instead.
- write_kv=False: the site only reads (cross-layer KV sharing: another site owns and
  writes this cache).

Padding tokens carry negative "virtual" positions (t - n_pad) so that, within a
chunk, every token maps to a distinct slot; they write slot_pos = -1 (empty). Pads
precede a sequence's real tokens, so they never clobber a real one.

On CUDA tensors the op runs the Triton kernels (codegen/kernels/); elsewhere the
reference. SLIMFX_ATTENTION=ref|triton|auto overrides (triton on CPU needs
TRITON_INTERPRET=1 set before the kernels are imported).
"""

from __future__ import annotations

import math

import torch

from slimfx.codegen.kernels import use_attention_kernels
from slimfx.codegen.kernels.decode_attention import decode_attention_ref
from slimfx.codegen.kernels.prefill_attention import prefill_attention_ref


def write_tokens(k, v, positions, k_cache, v_cache, slot_pos, scores) -> None:
    """Write a step's tokens into their slots (pos % C), in place; pads mark their slot empty.
    k, v [B, Hkv, T, D]; positions [B, T]. Only the last C tokens are written when T > C
    (earlier ones would be overwritten within the same chunk)."""
    B, Hkv, T, D = k.shape
    C = k_cache.shape[2]
    if T > C:
        k, v, positions, T = k[:, :, -C:], v[:, :, -C:], positions[:, -C:], C
    slots = positions.remainder(C)[:, None, :].expand(B, Hkv, T)
    idx = slots[..., None].expand(B, Hkv, T, D)
    k_cache.scatter_(2, idx, k.to(k_cache.dtype))
    v_cache.scatter_(2, idx, v.to(v_cache.dtype))
    true_pos = torch.where(positions < 0, -1, positions).to(slot_pos.dtype)
    slot_pos.scatter_(2, slots, true_pos[:, None, :].expand(B, Hkv, T))
    scores.scatter_(2, slots, 0.0)  # a new token starts with no accumulated mass


def _write(k, v, positions, k_cache, v_cache, slot_pos, scores, triton_path: bool) -> None:
    """write_tokens, as one kernel (evict_write.ring_write) on the Triton path."""
    if triton_path and k.stride(-1) == 1 and v.stride(-1) == 1:
        from slimfx.codegen.kernels.evict_write import ring_write

        ring_write(k, v, positions, k_cache, v_cache, slot_pos, scores)
    else:
        write_tokens(k, v, positions, k_cache, v_cache, slot_pos, scores)


def _run(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, score_decay, track_scores, write_kv, triton_path: bool):
    T = q.shape[2]
    if T == 1:
        if write_kv:
            _write(k, v, positions, k_cache, v_cache, slot_pos, scores, triton_path)
        q1 = q[:, :, 0]
        q1 = q1 if q1.stride(-1) == 1 else q1.contiguous()
        tracked = scores if track_scores else None
        if triton_path:
            from slimfx.codegen.kernels.decode_attention import decode_attention

            out = decode_attention(q1, k_cache, v_cache, slot_pos, positions[:, 0], scale=scale, scores=tracked, decay=score_decay)
        else:
            out = decode_attention_ref(q1, k_cache, v_cache, slot_pos, positions[:, 0], scale=scale, scores=tracked, decay=score_decay)
        return out.unsqueeze(2)
    # The chunk attends to the slots filled before it, then to itself (its own keys are
    # read where they are; a reading-only site has them in the store already).
    qc = q if q.stride(-1) == 1 else q.contiguous()
    chunk = None
    if write_kv:
        chunk = (k if k.stride(-1) == 1 else k.contiguous(), v if v.stride(-1) == 1 else v.contiguous(), positions)
    if triton_path:
        from slimfx.codegen.kernels.prefill_attention import prefill_attention

        out = prefill_attention(qc, positions, k_cache, v_cache, slot_pos, extra=chunk, scale=scale)
    else:
        out = prefill_attention_ref(qc, positions, k_cache, v_cache, slot_pos, extra=chunk, scale=scale)
    if write_kv:
        _write(k, v, positions, k_cache, v_cache, slot_pos, scores, triton_path)
    return out.contiguous()


@torch.library.custom_op("slimfx::attention", mutates_args=("k_cache", "v_cache", "slot_pos", "scores"))
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor, scores: torch.Tensor,
    scale: float, score_decay: float, track_scores: bool, write_kv: bool,
) -> torch.Tensor:
    """Cache update + attention of one site (module doc). Triton on CUDA, reference elsewhere."""
    return _run(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, score_decay, track_scores, write_kv, use_attention_kernels(q))


@attention.register_fake
def _attention_fake(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, score_decay, track_scores, write_kv):
    return q.new_empty(q.shape)


def attention_ref(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale=None, score_decay=1.0, track_scores=False, write_kv=True):
    """The op's definition in plain PyTorch (mutates the cache buffers like the op)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _run(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, score_decay, track_scores, write_kv, False)
