"""The `kvq` variant of `slimfx::attention` (runtime/attention_op.py): attention over a
quantized KV store, quantizing on write.

    layout  kvq/<fmt>/<group>/<residual>/<n_sink>
    tiers   main  k, v [B, Hkv, C, Dp] the quantized tokens (int8 / float8_e4m3fn / packed
                  uint8), slot = pos % C; formats in runtime/kv_quant.py
                  slot_pos [B, Hkv, C] int32, position held by each slot (-1 empty)
                  k_scale, k_zero: int8/fp8: [B, Hkv, C] f32 and an empty tensor (symmetric);
                  int4/int2 (KIVI keys per channel): [B, Hkv, C // group, D] f16 each
                  v_scale, v_zero: int8/fp8: [B, Hkv, C] f32 and empty; int4/int2: [B, Hkv, C] f16 each
            full  k, v [B, Hkv, n_sink + W, D] full-precision copies (model dtype):
                  slot p for a sink position p < n_sink, else n_sink + (p - n_sink) % W,
                  a ring holding the last W tokens; slot_pos [B, Hkv, n_sink + W] int32

Tiers. Every token is written to both tiers on arrival; the attention reads each
position from exactly one of them. With qlimit = floor((p_q + 1 - residual) / group) * group
(group = 1 for int8/fp8), positions in [n_sink, qlimit) come from the quantized tier and
the rest (sinks, the last `residual`..`residual + group - 1` tokens) from the full-precision
buffer. W = max(residual + group - 1, group) is the smallest ring that holds all of those
and, for KIVI, the whole group being filled.

KIVI keys are quantized per channel over a group of `group` consecutive positions,
whose range is known only when the group is complete. Without a host sync the op
cannot ask "is it complete?", so every write requantizes the group(s) it touches from
the full-precision copies (the ring and the step's own tokens): G x D work per step,
and by the time a group falls below qlimit its last requantization saw all its tokens.
Sinks never enter a group's range (their outlier keys would widen it for everyone).

Prefill (T > 1) attends over the tiers as they were before the chunk plus the chunk
itself in full precision (like KIVI: a prompt is attended exactly; later chunks and
decode steps see earlier chunks quantized), then writes the chunk. Decode (T == 1)
writes first, then attends. Shapes are static and nothing syncs with the host, so a
decode step stays capturable in a CUDA graph.

When the store wraps (capacity below the sequence length), a KIVI group that starts
overwrites a whole slot group, so up to group - 1 of the oldest tokens go a little
earlier than with per-token formats.

Reads go through attention_op.decode_read / prefill_read with the window
[n_sink, qlimit) between the tiers: int8/fp8 codes are dequantized inside the decode
kernel (per-slot scales), int4/int2 tiers are dequantized first (per-channel key scales;
correct, not fast: no KIVI kernel yet). An int8 decode write on the Triton path is one
fused kernel (codegen/kernels/decode_attention_kvq.kvq_write_token); fp8 writes, prefill
writes and every KIVI write run the torch code below.
"""

from __future__ import annotations

import torch

from slimfx.runtime.attention_op import TierRead, Tiers, decode_read, layout_string, prefill_read, read_tiers, register_variant
from slimfx.runtime.kv_quant import KVFormat, dequantize_channels, dequantize_tokens, get_format, quantize_channels, quantize_tokens
from slimfx.runtime.kv_store import SiteCache, Tier

MAIN_FIELDS = ("k", "v", "slot_pos", "k_scale", "k_zero", "v_scale", "v_zero")
FIELDS = tuple(f"main.{f}" for f in MAIN_FIELDS) + ("full.k", "full.v", "full.slot_pos")


# ----------------------------------------------------------------------------- the store


def ring_size(fmt: KVFormat, group: int, residual: int) -> int:
    """W: slots of the full-precision ring (module doc)."""
    g = group if fmt.key_axis == "channel" else 1
    return max(residual + g - 1, g)


def settings(fmt_name: str, group: int, residual: int, n_sink: int) -> tuple:
    """(fmt, group, residual, n_sink) as the layout holds them: group 1 for per-token formats."""
    return (fmt_name, group if get_format(fmt_name).key_axis == "channel" else 1, residual, n_sink)


def kvq_layout(fmt_name: str, group: int, residual: int, n_sink: int) -> str:
    return layout_string("kvq", *settings(fmt_name, group, residual, n_sink))


def quantized_tiers(old: SiteCache, fmt_name: str, group: int, residual: int, n_sink: int) -> dict[str, Tier]:
    """Fresh (empty) tiers for `old`'s batch, heads and capacity (rounded up to a multiple of
    `group` for KIVI formats): main in the format, full-precision ring in old's dtype."""
    fmt = get_format(fmt_name)
    B, H, C, _ = old.k.shape
    D = old.head_dim
    dev, dtype = old.k.device, old.k.dtype
    kivi = fmt.key_axis == "channel"
    if kivi:
        C = -(-C // group) * group
    Dp = fmt.packed_dim(D)
    empty = torch.empty(0, device=dev, dtype=fmt.scale_dtype)
    F = n_sink + ring_size(fmt, group, residual)
    main = {
        "k": torch.zeros(B, H, C, Dp, device=dev, dtype=fmt.storage_dtype()),
        "v": torch.zeros(B, H, C, Dp, device=dev, dtype=fmt.storage_dtype()),
        "slot_pos": torch.full((B, H, C), -1, device=dev, dtype=torch.int32),
        "k_scale": torch.zeros((B, H, C // group, D) if kivi else (B, H, C), device=dev, dtype=fmt.scale_dtype),
        "k_zero": torch.zeros(B, H, C // group, D, device=dev, dtype=fmt.scale_dtype) if kivi else empty,
        "v_scale": torch.zeros(B, H, C, device=dev, dtype=fmt.scale_dtype),
        "v_zero": torch.zeros(B, H, C, device=dev, dtype=fmt.scale_dtype) if kivi else empty.clone(),
    }
    full = {
        "k": torch.zeros(B, H, F, D, device=dev, dtype=dtype),
        "v": torch.zeros(B, H, F, D, device=dev, dtype=dtype),
        "slot_pos": torch.full((B, H, F), -1, device=dev, dtype=torch.int32),
    }
    # A rollback would have to restore full-precision copies the ring already overwrote.
    return {"main": Tier(main, exact_rollback=False), "full": Tier(full, exact_rollback=False)}


def kvq_site(like: SiteCache, fmt_name: str, group: int = 32, residual: int = 128, n_sink: int = 4) -> SiteCache:
    """A standalone site of this layout (empty) with `like`'s batch, heads, capacity and dtype."""
    opts = settings(fmt_name, group, residual, n_sink)
    return SiteCache(like.index, like.head_dim, quantized_tiers(like, *opts), layout=kvq_layout(*opts))


def qlimit(q_pos: torch.Tensor, residual: int, group: int) -> torch.Tensor:
    """First position read from the full-precision ring (below it, from the quantized tier), [B]."""
    return torch.div(q_pos.to(torch.int64) + 1 - residual, group, rounding_mode="floor") * group


def dequantize_store(k_cache, v_cache, k_scale, k_zero, v_scale, v_zero, fmt: KVFormat, group: int):
    """The quantized tier as float32 [B, Hkv, C, D] keys and values."""
    if fmt.key_axis == "channel":
        B, H, C, Dp = k_cache.shape
        kd = dequantize_channels(k_cache.view(B, H, C // group, group, Dp), k_scale, k_zero, fmt).reshape(B, H, C, -1)
    else:
        kd = dequantize_tokens(k_cache, k_scale, None, fmt)
    vd = dequantize_tokens(v_cache, v_scale, v_zero if v_zero.numel() else None, fmt)
    return kd, vd


# ----------------------------------------------------------------------------- writes


def _raw(t: torch.Tensor) -> torch.Tensor:
    """Byte view of float8 buffers (scatter/where have no float8 kernels on every backend)."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t


def _scatter_rows(buf: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """buf[b, h, slots[b, h, t], ...] = rows[b, h, t, ...] in place (slots distinct per row)."""
    idx = slots.view(*slots.shape, *([1] * (buf.dim() - 3))).expand(*slots.shape, *buf.shape[3:])
    _raw(buf).scatter_(2, idx, _raw(rows.to(buf.dtype)))


def _write_token_rows(x, positions, cache, scale, zero, fmt: KVFormat) -> None:
    """Quantize each token of x [B, H, T, D] per token into slot pos % C (the last C tokens)."""
    B, H, T, _ = x.shape
    C = cache.shape[2]
    if T > C:
        x, positions = x[:, :, -C:], positions[:, -C:]
    slots = positions.remainder(C)[:, None, :].expand(B, H, x.shape[2])
    qx, s, z = quantize_tokens(x, fmt)
    _scatter_rows(cache, slots, qx)
    _scatter_rows(scale, slots, s)
    if z is not None:
        _scatter_rows(zero, slots, z)


def _write_slot_pos(positions, slot_pos) -> None:
    B, H, C = slot_pos.shape
    positions = positions[:, -C:]
    slots = positions.remainder(C)[:, None, :].expand(B, H, positions.shape[1])
    true_pos = torch.where(positions < 0, -1, positions).to(slot_pos.dtype)
    slot_pos.scatter_(2, slots, true_pos[:, None, :].expand_as(slots))


def _ring_slot(p: torch.Tensor, n_sink: int, W: int) -> torch.Tensor:
    return torch.where(p < n_sink, p, n_sink + (p - n_sink).remainder(W))


def _chunk_gather(x: torch.Tensor, p: torch.Tensor, first: torch.Tensor):
    """x[b, h, p - first[b]] for positions p [B, N] (valid where 0 <= p - first < T), and that mask."""
    B, H, T, D = x.shape
    t = p - first[:, None]
    ok = (t >= 0) & (t < T) & (p >= 0)
    idx = t.clamp(0, T - 1)[:, None, :, None].expand(B, H, p.shape[1], D)
    return x.gather(2, idx), ok


def _write_fp(k, v, positions, fp_k, fp_v, fp_pos, n_sink: int) -> None:
    """Write the step's tokens into the full-precision buffer. Gather-shaped (each slot picks
    the newest chunk token that maps to it), so no two writes race for a slot."""
    B, H, F = fp_pos.shape
    W = F - n_sink
    first, last = positions[:, 0], positions[:, -1]
    dev = positions.device
    sink_p = torch.arange(n_sink, device=dev).expand(B, n_sink)
    r = torch.arange(W, device=dev)
    # newest position <= last with (p - n_sink) % W == r, for every ring slot r
    ring_p = last[:, None] - (last[:, None] - n_sink - r).remainder(W)
    p = torch.cat([sink_p, ring_p], dim=1)  # [B, F]: the position each slot would take
    p = torch.where((p >= n_sink) | (torch.arange(F, device=dev) < n_sink), p, -1)
    for buf, x in ((fp_k, k), (fp_v, v)):
        rows, ok = _chunk_gather(x, p, first)
        buf.copy_(torch.where(ok[:, None, :, None], rows.to(buf.dtype), buf))
    fp_pos.copy_(torch.where(ok[:, None, :], p[:, None, :].to(fp_pos.dtype), fp_pos))


def _rebuild_key_groups(k, positions, k_cache, slot_pos, k_scale, k_zero, fp_k, fp_pos, fmt: KVFormat, group: int, n_sink: int) -> None:
    """KIVI keys: requantize every group the step's tokens fall in, from full-precision copies
    (the chunk itself, else the ring, read before this step's ring write)."""
    B, H, T, D = k.shape
    C = k_cache.shape[2]
    n_slot_groups = C // group
    W = fp_pos.shape[2] - n_sink
    first, last = positions[:, 0], positions[:, -1]
    dev = positions.device
    n_groups = min(-(-T // group) + 1, n_slot_groups)  # distinct mod n_slot_groups
    g = torch.div(last, group, rounding_mode="floor")[:, None] - torch.arange(n_groups, device=dev)  # [B, nG]
    touched = (g >= 0) & ((g + 1) * group - 1 >= first[:, None])
    p = (g[..., None] * group + torch.arange(group, device=dev)).reshape(B, -1)  # [B, nG*G]
    from_chunk, in_chunk = _chunk_gather(k, p, first)
    rslot = _ring_slot(p.clamp_min(0), n_sink, W)[:, None, :].expand(B, H, -1)
    from_ring = fp_k.gather(2, rslot[..., None].expand(B, H, -1, D))
    in_ring = fp_pos.gather(2, rslot) == p[:, None, :]
    present = (p >= n_sink)[:, None, :] & (in_chunk[:, None, :] | in_ring)  # [B, H, nG*G]
    x = torch.where(in_chunk[:, None, :, None], from_chunk, from_ring.to(from_chunk.dtype))
    qk, s, z = quantize_channels(x.view(B, H, n_groups, group, D), present.view(B, H, n_groups, group), fmt)
    # Write every listed group; untouched ones get their old contents back (no branch).
    sg = g.remainder(n_slot_groups)  # [B, nG]
    slots = (sg[..., None] * group + torch.arange(group, device=dev)).reshape(B, -1)[:, None, :].expand(B, H, -1)
    keep_new = touched[:, None, :].expand(B, H, n_groups)
    keep_new_t = keep_new.repeat_interleave(group, dim=2)
    old_q = k_cache.gather(2, slots[..., None].expand(B, H, -1, k_cache.shape[3]))
    _scatter_rows(k_cache, slots, torch.where(keep_new_t[..., None], qk.reshape(B, H, -1, qk.shape[-1]), old_q))
    new_pos = torch.where(present, p[:, None, :], -1).to(slot_pos.dtype)
    _scatter_rows(slot_pos, slots, torch.where(keep_new_t, new_pos, slot_pos.gather(2, slots)))
    gslots = sg[:, None, :].expand(B, H, n_groups)
    for buf, new in ((k_scale, s), (k_zero, z)):
        old = buf.gather(2, gslots[..., None].expand(B, H, n_groups, D))
        _scatter_rows(buf, gslots, torch.where(keep_new[..., None], new.to(buf.dtype), old))


def write_step(k, v, positions, k_cache, v_cache, slot_pos, k_scale, k_zero, v_scale, v_zero, fp_k, fp_v, fp_pos, fmt: KVFormat, group: int, n_sink: int) -> None:
    """Quantize-on-write of a step's tokens into both tiers (in place)."""
    if fmt.key_axis == "channel":
        _rebuild_key_groups(k, positions, k_cache, slot_pos, k_scale, k_zero, fp_k, fp_pos, fmt, group, n_sink)
    else:
        _write_token_rows(k, positions, k_cache, k_scale, k_zero, fmt)
        _write_slot_pos(positions, slot_pos)
    _write_token_rows(v, positions, v_cache, v_scale, v_zero, fmt)
    _write_fp(k, v, positions, fp_k, fp_v, fp_pos, n_sink)


# ----------------------------------------------------------------------------- attention


def _main_read(main: dict, fmt: KVFormat, group: int, dtype: torch.dtype) -> TierRead:
    """The quantized tier as a read sees it: int8/fp8 codes with their per-token scales
    (dequantized inside the decode kernel), KIVI tiers dequantized to `dtype` first."""
    if fmt.key_axis == "token":
        return TierRead(main["k"], main["v"], main["slot_pos"], main["k_scale"], main["v_scale"])
    kd, vd = dequantize_store(*(main[f] for f in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")), fmt, group)
    return TierRead(kd.to(dtype), vd.to(dtype), main["slot_pos"])


def _write(k, v, positions, main: dict, full: dict, fmt: KVFormat, group: int, n_sink: int, triton: bool) -> None:
    if triton and fmt.name == "int8" and k.shape[2] == 1:
        # One launch instead of ~25 small torch ops: a decode step is launch-bound.
        from slimfx.codegen.kernels.decode_attention_kvq import kvq_write_token

        kvq_write_token(k, v, positions, main["k"], main["v"], main["k_scale"], main["v_scale"], main["slot_pos"],
                        full["k"], full["v"], full["slot_pos"], n_sink=n_sink)
        return
    write_step(k, v, positions, *(main[f] for f in MAIN_FIELDS), full["k"], full["v"], full["slot_pos"], fmt, group, n_sink)


class KVQ:
    fields = FIELDS

    def __init__(self, fmt: str, group: str, residual: str, n_sink: str):
        self.fmt, self.group, self.residual, self.n_sink = get_format(fmt), int(group), int(residual), int(n_sink)

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        main, full = tiers["main"], tiers["full"]
        dtype = q.dtype if triton else torch.float32
        if q.shape[2] == 1:
            self._write(k, v, positions, main, full, triton)
            limit = qlimit(positions[:, 0], self.residual, self.group)
            reads = [_main_read(main, self.fmt, self.group, dtype), TierRead(full["k"], full["v"], full["slot_pos"])]
            return decode_read(q, positions[:, 0], reads, scale, triton, window=(self.n_sink, limit))
        # The chunk attends over the tiers as they were before it, and over itself in full precision.
        limit = qlimit(positions[:, 0] - 1, self.residual, self.group)
        reads = [_main_read(main, self.fmt, self.group, dtype), TierRead(full["k"], full["v"], full["slot_pos"])]
        out = prefill_read(q, positions, reads, scale, triton, chunk=(k, v, positions), window=(self.n_sink, limit))
        self._write(k, v, positions, main, full, triton)
        return out

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        """Both tiers as they are after the owner's write of this step: the window the owner's
        decode uses, at the chunk's last position for a prefill chunk (earlier queries of
        the chunk see those positions only through the causal rule)."""
        main, full = tiers["main"], tiers["full"]
        dtype = q.dtype if triton else torch.float32
        limit = qlimit(positions[:, -1], self.residual, self.group)
        reads = [_main_read(main, self.fmt, self.group, dtype), TierRead(full["k"], full["v"], full["slot_pos"])]
        return read_tiers(q, positions, reads, scale, triton, window=(self.n_sink, limit))

    def _write(self, k, v, positions, main, full, triton):
        _write(k, v, positions, main, full, self.fmt, self.group, self.n_sink, triton)


register_variant("kvq", KVQ)
