"""MiniCache-style merged KV for a pair of layers (lossy): one store holds both layers' tokens.

MiniCache (Liu et al., 2024) merges the caches of two layers token by token: each key (and
value) is split into a magnitude and a unit direction, the pair keeps one direction, the
SLERP midpoint of the two (for unit vectors the normalised sum), and each layer's own
magnitude; a layer reads back magnitude x shared direction. Tokens whose two vectors are
too far apart to share a direction (normalised angular distance arccos(cos)/pi above a
threshold, on the key or the value) are kept apart, both layers' vectors whole.

Store, per pair (lower layer a, upper layer b), the lower layer's site holds:

    main  k, v [B, H, C, D]         the shared unit directions (model dtype)
          ka, va, kb, vb [B, H, C]  each layer's key and value magnitude (f32)
          slot_pos [B, H, C]        -1 for a token kept apart (it lives in `keep`)
    keep  ka, va, kb, vb [B, H, R, D], slot_pos [B, H, R]
                                    tokens kept apart, both layers' vectors, R slots per
                                    head (the first R such tokens; later ones are merged)

so a pair of full-precision layers (4 C D values per head) becomes 2 C D + 4 C magnitudes
+ 4 R D, about half. The upper layer's site reads the lower one's tiers and holds no memory.

How a step runs (the two layers of a pair run in order within every forward):
- layer a (layout minicache/0) writes its raw k, v at slot pos % C with magnitudes 1, and
  attends over main (magnitudes ka, va) + keep (ka, va); a prefill chunk attends over its
  own raw keys as plain attention does;
- layer b (layout minicache/1/<threshold>) merges: it reads a's raw vectors at the step's
  slots, writes the shared directions and both magnitudes, and moves tokens over the
  threshold to free `keep` slots. A prefill chunk first attends over the older tokens and
  its own raw keys (prefill is exact, as in MiniCache, which merges after prefill); a decode
  token attends after the merge, over the merged vectors.
"""

from __future__ import annotations

import math

import torch

from slimfx.runtime.attention_op import Tiers, TierRead, decode_read, prefill_read, register_variant
from slimfx.runtime.kv_store import Tier

_MAIN = ("k", "v", "ka", "va", "kb", "vb", "slot_pos")
_KEEP = ("ka", "va", "kb", "vb", "slot_pos")


def merged_tiers(batch: int, n_heads: int, capacity: int, head_dim: int, keep_slots: int, *, dtype, device) -> dict[str, Tier]:
    """Empty tiers of a merged pair (module doc)."""
    vec = lambda c: torch.zeros(batch, n_heads, c, head_dim, dtype=dtype, device=device)  # noqa: E731
    mag = lambda: torch.ones(batch, n_heads, capacity, dtype=torch.float32, device=device)  # noqa: E731
    pos = lambda c: torch.full((batch, n_heads, c), -1, dtype=torch.int32, device=device)  # noqa: E731
    main = Tier({"k": vec(capacity), "v": vec(capacity), "ka": mag(), "va": mag(), "kb": mag(), "vb": mag(),
                 "slot_pos": pos(capacity)})
    keep = Tier({"ka": vec(keep_slots), "va": vec(keep_slots), "kb": vec(keep_slots), "vb": vec(keep_slots),
                 "slot_pos": pos(keep_slots)})
    return {"main": main, "keep": keep}


def layouts(threshold: float) -> tuple[str, str]:
    """(lower layer's layout, upper layer's layout) of a merged pair."""
    return "minicache/0", f"minicache/1/{threshold!r}"


def _slots(positions: torch.Tensor, capacity: int, n_heads: int) -> torch.Tensor:
    """[B, H, T] slot of each token (pos % C), as the plain ring writes."""
    return positions.remainder(capacity)[:, None, :].expand(-1, n_heads, -1)


def _gather(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return buf.gather(2, slots[..., None].expand(*slots.shape, buf.shape[-1]))


def _scatter(buf: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    if buf.dim() == 4:
        buf.scatter_(2, slots[..., None].expand(*slots.shape, buf.shape[-1]), values.to(buf.dtype))
    else:
        buf.scatter_(2, slots, values.to(buf.dtype))


def write_raw(k, v, positions, main: dict) -> None:
    """Layer a: the step's raw k, v [B, H, T, D] into their slots, magnitudes 1 (pads: slot empty)."""
    C = main["k"].shape[2]
    if k.shape[2] > C:
        k, v, positions = k[:, :, -C:], v[:, :, -C:], positions[:, -C:]
    slots = _slots(positions, C, k.shape[1])
    _scatter(main["k"], slots, k)
    _scatter(main["v"], slots, v)
    for name in ("ka", "va"):
        main[name].scatter_(2, slots, 1.0)
    true_pos = torch.where(positions < 0, -1, positions).to(torch.int32)
    main["slot_pos"].scatter_(2, slots, true_pos[:, None, :].expand_as(slots))


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(magnitude [.., T], unit direction [.., T, D]) in float32; a zero vector keeps direction 0."""
    norm = x.float().norm(dim=-1)
    return norm, x.float() / norm.clamp_min(1e-12)[..., None]


def angle(ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """Normalised angular distance arccos(ea . eb) / pi in [0, 1] of unit vectors [.., D]."""
    return torch.arccos((ea * eb).sum(-1).clamp(-1.0, 1.0)) / math.pi


def merge(xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shared direction, |xa|, |xb|, angular distance) of two vectors [.., D] (module doc)."""
    na, ea = _split(xa)
    nb, eb = _split(xb)
    shared = ea + eb
    shared = shared / shared.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return shared, na, nb, angle(ea, eb)


def merge_write(k, v, positions, main: dict, keep: dict, threshold: float) -> None:
    """Layer b: merge the step's tokens with layer a's raw vectors at the same slots, and move
    those over `threshold` into free `keep` slots (per sequence and head, in token order,
    while slots are free). In place, no host sync."""
    C = main["k"].shape[2]
    if k.shape[2] > C:
        k, v, positions = k[:, :, -C:], v[:, :, -C:], positions[:, -C:]
    slots = _slots(positions, C, k.shape[1])
    ka, va = _gather(main["k"], slots), _gather(main["v"], slots)  # layer a's raw vectors (magnitude 1)
    dk, nka, nkb, ak = merge(ka, k)
    dv, nva, nvb, av = merge(va, v)
    _scatter(main["k"], slots, dk)
    _scatter(main["v"], slots, dv)
    for name, value in (("ka", nka), ("kb", nkb), ("va", nva), ("vb", nvb)):
        main[name].scatter_(2, slots, value)
    real = (positions >= 0)[:, None, :].expand_as(slots)
    apart = (torch.maximum(ak, av) > threshold) & real
    free = keep["slot_pos"] < 0  # [B, H, R]
    R = free.shape[2]
    if R == 0:
        return
    # The j-th token kept apart goes to the j-th free slot; beyond the free slots, merged.
    rank = apart.long().cumsum(-1) - 1
    order = torch.argsort((~free).to(torch.int8), dim=-1, stable=True)  # free slots first
    placed = apart & (rank < free.sum(-1, keepdim=True))
    target = order.gather(2, rank.clamp(0, R - 1))
    # Tokens not placed write to a scratch index R (dropped) so one scatter serves all.
    target = torch.where(placed, target, R)
    pos = torch.where(positions < 0, -1, positions).to(torch.int32)[:, None, :].expand_as(slots)
    for name, x in (("ka", ka), ("va", va), ("kb", k), ("vb", v)):
        padded = torch.cat([keep[name], keep[name][:, :, :1]], dim=2)
        _scatter(padded, target, x)
        keep[name].copy_(padded[:, :, :R])
    padded = torch.cat([keep["slot_pos"], keep["slot_pos"][:, :, :1]], dim=2)
    padded.scatter_(2, target, pos)
    keep["slot_pos"].copy_(padded[:, :, :R])
    main["slot_pos"].scatter_(2, slots, torch.where(placed, -1, pos))


class MiniCache:
    """The variant of both layers of a merged pair (layout minicache/<side>[/<threshold>])."""

    fields = tuple(f"main.{f}" for f in _MAIN) + tuple(f"keep.{f}" for f in _KEEP)

    def __init__(self, side: str, threshold: str = "1.0"):
        if side not in ("0", "1"):
            raise ValueError(f"side {side!r}; allowed: 0 (the lower layer) or 1 (the upper layer)")
        self.side, self.threshold = int(side), float(threshold)

    def _reads(self, tiers: Tiers, hide_from=None) -> list[TierRead]:
        main, keep = tiers["main"], tiers["keep"]
        own = "ab"[self.side]
        pos = main["slot_pos"]
        if hide_from is not None:  # slots of the chunk being prefilled: read from the chunk itself
            pos = torch.where(pos.to(torch.int64) >= hide_from[:, None, None], -1, pos)
        return [TierRead(main["k"], main["v"], pos, main[f"k{own}"], main[f"v{own}"]),
                TierRead(keep[f"k{own}"], keep[f"v{own}"], keep["slot_pos"])]

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        main, keep = tiers["main"], tiers["keep"]
        if q.shape[2] == 1:
            self._write(k, v, positions, main, keep)
            return decode_read(q, positions[:, 0], self._reads(tiers), scale, triton)
        # Prefill: older tokens from the tiers, the chunk's own raw keys where they are
        # (layer a's raw writes of this chunk are hidden from layer b's read).
        first = positions[:, 0].clamp_min(0)
        out = prefill_read(q, positions, self._reads(tiers, first if self.side else None), scale, triton,
                           chunk=(k, v, positions))
        self._write(k, v, positions, main, keep)
        return out

    def _write(self, k, v, positions, main, keep) -> None:
        if self.side == 0:
            write_raw(k, v, positions, main)
        else:
            merge_write(k, v, positions, main, keep, self.threshold)

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        raise ValueError("slimfx::attention layout 'minicache': a merged pair's layers both write; "
                         "allowed: layouts minicache/0 and minicache/1/<threshold>, never read/minicache")


register_variant("minicache", MiniCache)
