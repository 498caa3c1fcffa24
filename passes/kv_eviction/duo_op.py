"""`torch.ops.slimfx.attention_duo`: one attention site whose kv heads are split in two
groups with stores of different sizes (DuoAttention; per-head budgets with real memory).

    out = torch.ops.slimfx.attention_duo(q, k, v, positions, retrieval_heads, streaming_heads,
                                         k_full, v_full, pos_full, scores_full,
                                         k_stream, v_stream, pos_stream, scores_stream,
                                         scale, n_sink, window)

- retrieval heads (`retrieval_heads`, int64 kv-head indices) keep every token in a
  full-capacity store and attend like `slimfx::attention` (runtime/attention_op.py);
- streaming heads (`streaming_heads`) keep only the first `n_sink` tokens and a recent
  window in a store whose capacity is the site's budget, with the StreamingLLM rule of
  `slimfx::attention_evict` (eviction_op.py).
Each group's query heads are its kv heads' GQA groups; the two outputs are written back
in head order, so the op is a drop-in for the site's attention. The two stores are
separate tensors of their own capacity: a streaming head holds `budget` slots, not a
masked full-length buffer.
"""

from __future__ import annotations

import torch

import slimfx.passes.kv_eviction.eviction_op as eviction_op
from slimfx.codegen.kernels import use_attention_kernels
from slimfx.runtime import attention_op


def query_heads(kv_heads: torch.Tensor, group: int) -> torch.Tensor:
    """Query-head indices served by `kv_heads` (GQA: kv head h serves h*group .. h*group+group-1)."""
    return (kv_heads[:, None] * group + torch.arange(group, device=kv_heads.device)).reshape(-1)


def _retrieval_part(q, k, v, positions, caches, scale):
    k_cache, v_cache, slot_pos, scores = caches
    use_triton = use_attention_kernels(q)
    return attention_op._run(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, 1.0, False, True, use_triton)


def _streaming_part(q, k, v, positions, caches, scale, n_sink, window):
    k_cache, v_cache, slot_pos, scores = caches
    policy = eviction_op._policy("duo", k_cache.shape[2], n_sink, window, 0.0)
    run = eviction_op._decode if q.shape[2] == 1 else eviction_op._prefill
    return run(q, k, v, positions, k_cache, v_cache, slot_pos, scores, scale, policy)


@torch.library.custom_op(
    "slimfx::attention_duo",
    mutates_args=("k_full", "v_full", "pos_full", "scores_full", "k_stream", "v_stream", "pos_stream", "scores_stream"),
)
def attention_duo(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    retrieval_heads: torch.Tensor, streaming_heads: torch.Tensor,
    k_full: torch.Tensor, v_full: torch.Tensor, pos_full: torch.Tensor, scores_full: torch.Tensor,
    k_stream: torch.Tensor, v_stream: torch.Tensor, pos_stream: torch.Tensor, scores_stream: torch.Tensor,
    scale: float, n_sink: int, window: int,
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    q_full = query_heads(retrieval_heads, group)
    q_stream = query_heads(streaming_heads, group)
    out = q.new_empty(q.shape)
    full = _retrieval_part(q.index_select(1, q_full), k.index_select(1, retrieval_heads), v.index_select(1, retrieval_heads),
                           positions, (k_full, v_full, pos_full, scores_full), scale)
    stream = _streaming_part(q.index_select(1, q_stream), k.index_select(1, streaming_heads), v.index_select(1, streaming_heads),
                             positions, (k_stream, v_stream, pos_stream, scores_stream), scale, n_sink, window)
    out.index_copy_(1, q_full, full.to(out.dtype))
    out.index_copy_(1, q_stream, stream.to(out.dtype))
    return out


@attention_duo.register_fake
def _attention_duo_fake(q, k, v, positions, retrieval_heads, streaming_heads, k_full, v_full, pos_full, scores_full,
                        k_stream, v_stream, pos_stream, scores_stream, scale, n_sink, window):
    return q.new_empty(q.shape)
