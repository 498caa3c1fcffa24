"""Decode attention over a chosen subset of a ring's slots, loading only those rows: the
read of TidalDecode's following layers (passes/kv_eviction/tidal_op.py).

Triplet (DESIGN.md decision 5):

    _gather_split_kernel (@triton.jit), then decode_attention's _decode_combine_kernel
    gather_decode_attention(...)        host wrapper: checks, allocates, launches
    gather_decode_attention_ref(...)    plain PyTorch, the definition

Shapes (one query token per sequence):

    q          [B, Hq, 1, D]     float16/bfloat16/float32
    k_cache    [B, Hkv, C, D]    a ring: position p sits in slot p % C; Hq % Hkv == 0
    v_cache    [B, Hkv, C, D]
    slot_pos   [B, Hkv, C] int   the position each slot holds, -1 = empty
    chosen     [B, Hq, K] int    per query head, the positions it reads (-1 = none)
    q_pos      [B] int           the query's position (its token already written)

Definition: query head h of sequence b (kv head h // (Hq / Hkv)) attends over the entries
p of chosen[b, h] and the current position q_pos[b], an entry being read iff p >= 0 and
its slot p % C holds p (a choice whose slot was overwritten since is not read), and a
chosen entry equal to q_pos is skipped (the current token is read once, as its own entry).
Logits and the softmax are float32 (elementwise products summed in float32: one query row
needs no tensor-core dot); a head reading nothing gets zeros. Returns [B, Hq, 1, D] in q's
dtype. A position chosen twice by one head is read twice: callers pass distinct positions
(TidalDecode's `choose` takes a top-k over a ring's distinct positions). With distinct
positions this is a masked read of the whole ring where a head sees a slot iff the slot
holds the current position or one the head chose: a slot holds one position, and in a
ring written in position order, of two chosen positions sharing a slot only the newer
can still be there (tests/test_kernels_gather_decode.py checks both against each other).

Why: the full decode kernel loads every slot of every kv head (C * D per kv head); this
one loads, per query head, only the index block, the slot_pos entry and the K/V rows of
its K + 1 entries (about K * D). The query heads of one GQA group choose different sets,
so nothing is shared between them: bytes drop by C * Hkv / ((K + 1) * Hq).
Each program walks one split of one query head's entries with an online softmax (log2
domain); at batch 1 there are only Hq heads, so each head's entries are cut into short
splits (_launch_config) and decode_attention's combine kernel merges the partials.
Llama-3.2-1B at 16K with a 2048 budget (32 query heads, 8 kv heads): 2048 * 32 rows
against 16K * 8, half the K/V bytes of a full read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimfx.codegen.kernels.decode_attention import LOG2E, _decode_combine_kernel


@triton.jit
def _gather_split_kernel(
    Q, K, V, SLOT_POS, CHOSEN, QPOS, O_PART, M_PART, L_PART,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_pb, stride_ph,
    stride_cb, stride_ch,
    C, N_CHOSEN, HQ, SPLITS, PER_SPLIT,
    GROUP: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kv = h // GROUP
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # The softmax scale and log2(e) folded into q once: the loop then uses exp2.
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale
    qpos = tl.load(QPOS + b)
    k_base = K + b * stride_kb + kv * stride_kh
    v_base = V + b * stride_vb + kv * stride_vh
    p_base = SLOT_POS + b * stride_pb + kv * stride_ph
    c_base = CHOSEN + b * stride_cb + h * stride_ch
    # Finite "minus infinity" for the running max: exp2(-inf - -inf) is NaN, and a split
    # reading nothing must produce weight 0 (l = 0), not NaN.
    m_i = -1.0e30
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    start = split * PER_SPLIT
    end = tl.minimum(start + PER_SPLIT, N_CHOSEN + 1)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + offs_k  # entry N_CHOSEN is the current token
        inside = j < end
        current = j == N_CHOSEN
        pos = tl.load(c_base + j, mask=inside & (j < N_CHOSEN), other=-1).to(tl.int64)
        pos = tl.where(current, qpos, pos)
        read = inside & (pos >= 0) & (current | (pos != qpos))
        slot = tl.where(read, pos % C, 0)
        held = tl.load(p_base + slot, mask=read, other=-1).to(tl.int64)
        read = read & (held == pos)
        rows = read[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot[:, None] * stride_kc + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(read, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_base + slot[:, None] * stride_vc + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    row = bh * SPLITS + split
    tl.store(M_PART + row, m_i)
    tl.store(L_PART + row, l_i)
    tl.store(O_PART + row * D + offs_d, acc, mask=d_ok)


# ----------------------------------------------------------------------------- host side

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INTS = (torch.int32, torch.int64)


def _check(q, k_cache, v_cache, slot_pos, chosen, q_pos) -> tuple[int, int, int, int, int, int]:
    """Validates every argument; returns (B, Hq, Hkv, C, D, K)."""
    name = "gather_decode_attention"
    if q.dim() != 4 or q.shape[2] != 1 or q.dtype not in _FLOATS:
        raise ValueError(f"{name}: q must be float16/bfloat16/float32 [B, Hq, 1, D], got {q.dtype} {tuple(q.shape)}")
    B, Hq, _, D = q.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"{name}: k_cache/v_cache must both be [B, Hkv, C, D] = [{B}, Hkv, C, {D}] (q {tuple(q.shape)}), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype not in _FLOATS or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{name}: k_cache/v_cache dtype {k_cache.dtype}/{v_cache.dtype}; allowed: both float16, bfloat16 or float32")
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{name}: q has Hq={Hq} heads, k_cache Hkv={Hkv}; allowed: Hq a multiple of Hkv (MHA/GQA/MQA)")
    if tuple(slot_pos.shape) != (B, Hkv, C) or slot_pos.dtype not in _INTS:
        raise ValueError(f"{name}: slot_pos must be int32/int64 [B, Hkv, C] = {(B, Hkv, C)}, got {slot_pos.dtype} {tuple(slot_pos.shape)}")
    if chosen.dim() != 3 or tuple(chosen.shape[:2]) != (B, Hq) or chosen.dtype not in _INTS:
        raise ValueError(f"{name}: chosen must be int32/int64 [B, Hq, K] = [{B}, {Hq}, K], got {chosen.dtype} {tuple(chosen.shape)}")
    if tuple(q_pos.shape) != (B,) or q_pos.dtype not in _INTS:
        raise ValueError(f"{name}: q_pos must be int32/int64 [B] = [{B}], got {q_pos.dtype} {tuple(q_pos.shape)}")
    return B, Hq, Hkv, C, D, chosen.shape[2]


def _launch_config(q: torch.Tensor, B: int, Hq: int, entries: int) -> tuple[int, int]:
    """(BLOCK_K, splits wanted) for B * Hq heads of `entries` entries each."""
    if q.is_cuda:
        # Each block is a chain of three dependent loads (indices, then slot positions, then
        # rows): many short programs in flight hide that latency better than long loops, so
        # splits of two blocks, up to about 8 programs per SM (a guess, not yet measured).
        block_k = 64
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        return block_k, max(1, min(triton.cdiv(entries, 2 * block_k), (8 * sms) // (B * Hq), 32))
    # Interpreter (CPU): small blocks, a few splits so the combine path is exercised.
    block_k = 8
    return block_k, max(1, min(3, triton.cdiv(entries, block_k)))


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gather_decode_attention(q, k_cache, v_cache, slot_pos, chosen, q_pos, scale: float, *, splits: int | None = None,
                            block_k: int | None = None):
    """Attention of one query token per sequence over each query head's chosen positions
    and the current one (module doc) -> [B, Hq, 1, D] in q's dtype."""
    B, Hq, Hkv, C, D, K = _check(q, k_cache, v_cache, slot_pos, chosen, q_pos)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("gather_decode_attention: the last (head_dim) dimension of k_cache and v_cache must be contiguous")
    q1 = _last_contiguous(q[:, :, 0])
    slot_pos, chosen = _last_contiguous(slot_pos), _last_contiguous(chosen)
    q_pos = q_pos.to(torch.int64).contiguous()  # the kernel reads q_pos[b]: an expanded (stride-0) tensor would read past it
    cfg_block, cfg_splits = _launch_config(q, B, Hq, K + 1)
    BLOCK_K = block_k or cfg_block
    per_split = max(1, triton.cdiv(triton.cdiv(K + 1, splits or cfg_splits), BLOCK_K)) * BLOCK_K
    n_splits = triton.cdiv(K + 1, per_split)
    group = Hq // Hkv
    BLOCK_D = triton.next_power_of_2(D)
    dev = q.device
    o_part = torch.empty(B * Hq * n_splits * D, device=dev, dtype=torch.float32)
    m_part = torch.empty(B * Hq * n_splits, device=dev, dtype=torch.float32)
    l_part = torch.empty(B * Hq * n_splits, device=dev, dtype=torch.float32)
    out = torch.empty((B, Hq, 1, D), device=dev, dtype=q.dtype)
    _gather_split_kernel[(B * Hq, n_splits)](
        q1, k_cache, v_cache, slot_pos, chosen, q_pos, o_part, m_part, l_part,
        float(scale) * LOG2E,
        q1.stride(0), q1.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        slot_pos.stride(0), slot_pos.stride(1),
        chosen.stride(0), chosen.stride(1),
        C, K, Hq, n_splits, per_split,
        GROUP=group, BLOCK_K=BLOCK_K, D=D, BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    # The partials sit at row (b * Hq + h) * splits + split, decode_attention's layout.
    unused = torch.empty(1, device=dev, dtype=torch.float32)
    _decode_combine_kernel[(B * Hkv,)](
        o_part, m_part, l_part, unused, unused, out,
        out.stride(0), out.stride(1),
        Hkv, n_splits,
        GROUP=group, BLOCK_G=max(2, triton.next_power_of_2(group)), BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
        D=D, BLOCK_D=BLOCK_D, TRACK=False, num_warps=4,
    )
    return out


def gather_decode_attention_ref(q, k_cache, v_cache, slot_pos, chosen, q_pos, scale: float):
    """The definition (module doc), in float32 PyTorch; it too gathers only the entries' rows."""
    B, Hq, Hkv, C, D, K = _check(q, k_cache, v_cache, slot_pos, chosen, q_pos)
    qp = q_pos.to(torch.int64).view(B, 1, 1)
    pos = torch.cat([chosen.to(torch.int64), qp.expand(B, Hq, 1)], dim=2)  # [B, Hq, K + 1], the current token last
    current = torch.zeros_like(pos, dtype=torch.bool)
    current[..., -1] = True
    slot = pos.clamp(min=0) % C
    rows = (torch.arange(B, device=q.device).view(B, 1, 1), (torch.arange(Hq, device=q.device) // (Hq // Hkv)).view(1, Hq, 1), slot)
    read = (pos >= 0) & (slot_pos[rows].to(torch.int64) == pos) & (current | (pos != qp))
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k_cache[rows].float()) * scale
    probs = torch.softmax(logits.masked_fill(~read, float("-inf")), dim=-1).nan_to_num(0.0)  # reading nothing gives 0
    values = v_cache[rows].float().masked_fill(~read[..., None], 0.0)  # an unread row is never used, whatever it holds
    return torch.einsum("bhn,bhnd->bhd", probs, values).unsqueeze(2).to(q.dtype)
