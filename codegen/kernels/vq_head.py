"""Kernels of the VQ logits head (passes/vq_logits.py, runtime/vq_head.py).

Triplets (DESIGN.md decision 5):

    _vq_code_scores_kernel  vq_code_scores(h, codebook, slack=None)   vq_code_scores_ref(...)
        h [N, H], codebook [K, H], slack [K] f32 (optional)
        -> scores [N, K] f32 = h @ codebook.T
           (and upper bounds [N, K] f32 = scores + |h| * slack when slack is given)

    _vq_probe_kernel        vq_probe_argmax(h, weight, members, probes)   vq_probe_argmax_ref(...)
        h [N, H], weight [V, H] (the full head), members [K, M] int32 (-1 = padding),
        probes [N, P] int64 (codes to open per row)
        -> logits [N, P, M] f32 exact logits of the probed members (-inf at padding),
           best [N] f32, token [N] int64: the argmax over all probed members.
        Gather + dot + argmax fused: each program reads BLOCK_M member rows of one
        probed cluster once and writes its partial (max, token); a [N, P * splits]
        reduction finishes the argmax.

    _vq_fallback_kernel     vq_fallback_logits(h, weight, proved, out)   vq_fallback_logits_ref(...)
        out [N, V] <- -inf for rows whose argmax was proved by the bound, the full
        head's logits (f32 accumulation) for the others. The proof flag is read on the
        device, so the exact head never synchronises with the host and its decode step
        stays CUDA-graph capturable; a proved row costs only the -inf fill.

Why Triton for the tiny code scoring: batch-1 decode has one row; a split over the
codebook (BLOCK_K codes per program) spreads the K x H read over many SMs and fuses
the |h| * slack bound, which cuBLAS would leave to two more launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG_INF = float("-inf")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_2d(name: str, t: torch.Tensor, cols: int | None = None) -> None:
    if t.dim() != 2 or (cols is not None and t.shape[1] != cols):
        want = f"[*, {cols}]" if cols is not None else "2-D"
        raise ValueError(f"{name}: got shape {tuple(t.shape)}; expected {want}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must be contiguous (stride 1), got strides {t.stride()}")


@triton.jit
def _rows_dot_h(h_row, row_ptrs, row_ok, HID, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Each of BLOCK_ROWS matrix rows (row_ptrs [BLOCK_ROWS, 1]; a row with row_ok False reads
    as 0) dotted with the hidden state h_row [HID]: [BLOCK_ROWS] f32. Also returns h_row's
    squares summed per lane, [BLOCK_H] f32, for the code scores' |h| bound (the other
    kernels drop it; unused, it compiles away)."""
    acc = tl.zeros([BLOCK_ROWS], tl.float32)
    hsq = tl.zeros([BLOCK_H], tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HID
        x = tl.load(h_row + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        w = tl.load(row_ptrs + offs_h[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        hsq += x * x
    return acc, hsq


# ----------------------------------------------------------------------------- code scores


@triton.jit
def _vq_code_scores_kernel(
    H, C, SLACK, S_OUT, UB_OUT,
    K, HID, stride_hn, stride_ck, stride_on,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, WITH_BOUND: tl.constexpr,
):
    n = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    acc, hsq = _rows_dot_h(H + n * stride_hn, C + offs_k[:, None] * stride_ck, k_ok, HID, BLOCK_K, BLOCK_H)
    tl.store(S_OUT + n * stride_on + offs_k, acc, mask=k_ok)
    if WITH_BOUND:
        hnorm = tl.sqrt(tl.sum(hsq, axis=0))
        slack = tl.load(SLACK + offs_k, mask=k_ok, other=0.0)
        tl.store(UB_OUT + n * stride_on + offs_k, acc + hnorm * slack, mask=k_ok)


def vq_code_scores_ref(h: torch.Tensor, codebook: torch.Tensor, slack: torch.Tensor | None = None):
    """scores [N, K] f32 (and bounds [N, K] f32 when slack is given); the definition."""
    scores = h.float() @ codebook.float().T
    if slack is None:
        return scores
    return scores, scores + h.float().norm(dim=1, keepdim=True) * slack.float()[None, :]


def vq_code_scores(h: torch.Tensor, codebook: torch.Tensor, slack: torch.Tensor | None = None):
    """Triton version of vq_code_scores_ref (same signature and results up to f32 rounding)."""
    _check_2d("h", h)
    _check_2d("codebook", codebook, h.shape[1])
    if slack is not None and (slack.shape != (codebook.shape[0],) or slack.dtype != torch.float32):
        raise ValueError(f"slack: got {tuple(slack.shape)} {slack.dtype}; expected [{codebook.shape[0]}] float32")
    n, hid = h.shape
    k = codebook.shape[0]
    scores = torch.empty(n, k, device=h.device, dtype=torch.float32)
    bounds = torch.empty_like(scores) if slack is not None else scores
    block_k = 16 if _interpreting() else 32
    block_h = min(128, triton.next_power_of_2(hid))
    grid = (n, triton.cdiv(k, block_k))
    _vq_code_scores_kernel[grid](
        h, codebook, slack if slack is not None else scores, scores, bounds,
        k, hid, h.stride(0), codebook.stride(0), scores.stride(0),
        BLOCK_K=block_k, BLOCK_H=block_h, WITH_BOUND=slack is not None,
    )
    return scores if slack is None else (scores, bounds)


# ----------------------------------------------------------------------------- probe: gather + exact logits + argmax


@triton.jit
def _vq_probe_kernel(
    H, W, MEMBERS, PROBES, LOGITS, PMAX, PTOK,
    P, M, HID, SPLITS,
    stride_hn, stride_wv, stride_mk, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)  # n * P + p
    split = tl.program_id(1)
    n = row // P
    p = row % P
    code = tl.load(PROBES + n * stride_pn + p).to(tl.int64)
    offs_m = split * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ids = tl.load(MEMBERS + code * stride_mk + offs_m, mask=m_ok, other=-1)
    valid = ids >= 0
    rows = tl.where(valid, ids, 0).to(tl.int64)
    acc, _ = _rows_dot_h(H + n * stride_hn, W + rows[:, None] * stride_wv, valid, HID, BLOCK_M, BLOCK_H)
    logits = tl.where(valid, acc, float("-inf"))
    tl.store(LOGITS + row * M + offs_m, logits, mask=m_ok)
    best = tl.max(logits, axis=0)
    arg = tl.argmax(logits, axis=0)
    tok = tl.sum(tl.where(tl.arange(0, BLOCK_M) == arg, ids, 0), axis=0)
    slot = n * (P * SPLITS) + p * SPLITS + split
    tl.store(PMAX + slot, best)
    tl.store(PTOK + slot, tok.to(tl.int64))


def vq_probe_argmax_ref(h: torch.Tensor, weight: torch.Tensor, members: torch.Tensor, probes: torch.Tensor):
    """(logits [N, P, M] f32, best [N] f32, token [N] int64); the definition.

    Ties go to the first probed position in (probe, member) order."""
    ids = members[probes.long()].long()  # [N, P, M]
    valid = ids >= 0
    rows = weight[ids.clamp_min(0)].float()  # [N, P, M, H]
    logits = torch.einsum("npmh,nh->npm", rows, h.float()).masked_fill(~valid, _NEG_INF)
    flat = logits.flatten(1)
    best, arg = flat.max(dim=1)
    token = ids.flatten(1).gather(1, arg[:, None]).squeeze(1)
    return logits, best, token


def vq_probe_argmax(h: torch.Tensor, weight: torch.Tensor, members: torch.Tensor, probes: torch.Tensor):
    """Triton version of vq_probe_argmax_ref (same results up to f32 summation order)."""
    _check_2d("h", h)
    _check_2d("weight", weight, h.shape[1])
    _check_2d("members", members)
    _check_2d("probes", probes)
    if members.dtype != torch.int32 or probes.shape[0] != h.shape[0]:
        raise ValueError(f"members must be int32 (got {members.dtype}); probes [N, P] with N = {h.shape[0]} (got {tuple(probes.shape)})")
    n, hid = h.shape
    p, m = probes.shape[1], members.shape[1]
    block_m = min(triton.next_power_of_2(m), 16 if _interpreting() else 32)
    block_h = min(128 if not _interpreting() else 32, triton.next_power_of_2(hid))
    splits = triton.cdiv(m, block_m)
    logits = torch.empty(n, p, m, device=h.device, dtype=torch.float32)
    pmax = torch.empty(n, p * splits, device=h.device, dtype=torch.float32)
    ptok = torch.empty(n, p * splits, device=h.device, dtype=torch.int64)
    _vq_probe_kernel[(n * p, splits)](
        h, weight, members, probes, logits, pmax, ptok,
        p, m, hid, splits,
        h.stride(0), weight.stride(0), members.stride(0), probes.stride(0),
        BLOCK_M=block_m, BLOCK_H=block_h,
    )
    best, arg = pmax.max(dim=1)
    return logits, best, ptok.gather(1, arg[:, None]).squeeze(1)


# ----------------------------------------------------------------------------- fallback: full head where not proved


@triton.jit
def _vq_fallback_kernel(
    H, W, PROVED, OUT,
    V, HID, stride_hn, stride_wv, stride_on,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    proved = tl.load(PROVED + n)
    if proved != 0:
        tl.store(OUT + n * stride_on + offs_v, tl.full([BLOCK_V], float("-inf"), tl.float32), mask=v_ok)
    else:
        rows = W + offs_v[:, None].to(tl.int64) * stride_wv
        acc, _ = _rows_dot_h(H + n * stride_hn, rows, v_ok, HID, BLOCK_V, BLOCK_H)
        tl.store(OUT + n * stride_on + offs_v, acc, mask=v_ok)


def vq_fallback_logits_ref(h: torch.Tensor, weight: torch.Tensor, proved: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fill out [N, V]: -inf on proved rows, the full logits h @ weight.T elsewhere; returns out."""
    full = torch.nn.functional.linear(h, weight)
    out.copy_(torch.where(proved.bool()[:, None], torch.full_like(full, _NEG_INF), full))
    return out


def vq_fallback_logits(h: torch.Tensor, weight: torch.Tensor, proved: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Triton version of vq_fallback_logits_ref (f32 accumulation, stored in out's dtype)."""
    _check_2d("h", h)
    _check_2d("weight", weight, h.shape[1])
    _check_2d("out", out, weight.shape[0])
    if proved.shape != (h.shape[0],) or out.shape[0] != h.shape[0]:
        raise ValueError(f"proved: got {tuple(proved.shape)}, out {tuple(out.shape)}; expected [{h.shape[0]}] and [{h.shape[0]}, V]")
    n, hid = h.shape
    v = weight.shape[0]
    block_v = 16 if _interpreting() else 64
    block_h = min(32 if _interpreting() else 128, triton.next_power_of_2(hid))
    _vq_fallback_kernel[(n, triton.cdiv(v, block_v))](
        h, weight, proved, out, v, hid, h.stride(0), weight.stride(0), out.stride(0),
        BLOCK_V=block_v, BLOCK_H=block_h,
    )
    return out
