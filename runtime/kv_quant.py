"""KV-cache formats: quantize and dequantize keys/values in plain PyTorch (all lossy).

The store (passes/kv_quantize/op.py) keeps k/v of an attention site in one of these
formats; the attention op quantizes each token on write. Layouts (x has head_dim D
last; "token" means one (sequence, kv head, slot) row):

    int8   per token, symmetric:   x ~ q * scale            q int8 [.., D], scale f32 [..]
    fp8    per token, e4m3:        x ~ float(q) * scale     q float8_e4m3fn [.., D], scale f32 [..]
    int4   KIVI, asymmetric, packed 2 per byte along D:     q uint8 [.., D // 2]
    int2   KIVI, asymmetric, packed 4 per byte along D:     q uint8 [.., D // 4]
           values per token:  x ~ q * scale + mn            scale, mn f16 [..]
           keys per channel over a group of G consecutive tokens (KIVI: key outliers
           live in fixed channels, so a channel's range is much tighter than a token's):
                              x[t, d] ~ q[t, d] * scale[d] + mn[d]   scale, mn f16 [.., D] per group

Packing: byte j holds channels j*P .. j*P+P-1 (P = 8 // bits), channel j*P+i in bits
[i*bits, (i+1)*bits); channel-contiguous, so a kernel reads a token's row in one load.

Error bounds (element-wise, tested in tests/test_kv_quant.py), with amax the row's
largest |x| and s, mn the *stored* scale and minimum:
    int8         |x - x^| <= amax / 254 (* (1 + 1e-6) for float32 rounding of the scale)
    fp8          |x - x^| <= max(|x| / 16, s * 2**-10)   (3 mantissa bits; subnormals below 2**-6 * s)
    int4 / int2  |x - x^| <= s / 2 + 2**-11 * |mn| + 2**-24   (mn rounded to float16; 2**-24 is
                 float16's spacing near 0, where mn may be subnormal)
KIVI's float16 scales are rounded *up* so that no in-range value is ever clamped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


def has_fp8() -> bool:
    """Whether this torch build has the float8 e4m3 dtype the fp8 format stores."""
    return hasattr(torch, "float8_e4m3fn")


@dataclass(frozen=True)
class KVFormat:
    """One KV-cache format (see the module doc). key_axis: 'token' or 'channel' (KIVI)."""

    name: str
    bits: int
    key_axis: str
    symmetric: bool

    @property
    def per_byte(self) -> int:
        """Values packed into one byte of storage (1 for int8/fp8)."""
        return 8 // self.bits if self.bits < 8 else 1

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def storage_dtype(self) -> torch.dtype:
        if self.name == "fp8":
            return torch.float8_e4m3fn
        return torch.int8 if self.name == "int8" else torch.uint8

    @property
    def scale_dtype(self) -> torch.dtype:
        # float32 for the per-token 8-bit formats (4 bytes on a 64+ byte row); KIVI's
        # per-group scales come in pairs per channel, so float16 halves their cost.
        return torch.float32 if self.bits == 8 else torch.float16

    def packed_dim(self, head_dim: int) -> int:
        return head_dim // self.per_byte

    def unsupported_reason(self, head_dim: int) -> str | None:
        if self.name == "fp8" and not has_fp8():
            return "this torch build has no float8_e4m3fn"
        if head_dim % self.per_byte:
            return f"head_dim {head_dim} is not a multiple of {self.per_byte} ({self.name} packs {self.per_byte} values a byte)"
        return None


FORMATS = {
    "int8": KVFormat("int8", 8, "token", True),
    "fp8": KVFormat("fp8", 8, "token", True),
    "int4": KVFormat("int4", 4, "channel", False),
    "int2": KVFormat("int2", 2, "channel", False),
}


def get_format(name: str) -> KVFormat:
    if name not in FORMATS:
        raise ValueError(f"KV format: got {name!r}; allowed: one of {', '.join(FORMATS)}")
    return FORMATS[name]


# ----------------------------------------------------------------------------- packing


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q [.., D] (ints in 0 .. 2**bits - 1) -> uint8 [.., D * bits // 8] (layout in module doc)."""
    per = 8 // bits
    q = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return (q << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [.., Dp] -> codes int32 [.., Dp * 8 // bits]; the inverse of `pack`."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


# ----------------------------------------------------------------------------- per token


def quantize_tokens(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize every row x[.., :] on its own. Returns (q, scale [..], mn [..] or None)."""
    xf = x.float()
    if fmt.symmetric:
        top = INT8_MAX if fmt.name == "int8" else FP8_MAX
        scale = xf.abs().amax(dim=-1) / top
        safe = torch.where(scale > 0, scale, 1.0)[..., None]
        if fmt.name == "int8":
            q = torch.round(xf / safe).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        else:
            q = (xf / safe).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q, scale, None
    mn, mx = xf.amin(dim=-1), xf.amax(dim=-1)
    scale, mn16 = _asym_params(mn, mx, fmt.levels)
    codes = _asym_codes(xf, scale[..., None].float(), mn16[..., None].float(), fmt.levels)
    return pack(codes, fmt.bits), scale, mn16


def dequantize_tokens(q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, fmt: KVFormat) -> torch.Tensor:
    """Inverse of quantize_tokens: float32 [.., D]."""
    if fmt.symmetric:
        return q.float() * scale.float()[..., None]
    return unpack(q, fmt.bits).float() * scale.float()[..., None] + mn.float()[..., None]


# ----------------------------------------------------------------------------- per channel (KIVI keys)


def quantize_channels(x: torch.Tensor, present: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI keys: x [.., G, D] is one group of G tokens; each channel d gets its own range
    over the tokens with present [.., G] True (missing tokens do not widen the range;
    their codes are meaningless). Returns (q uint8 [.., G, D // per_byte], scale [.., D], mn [.., D])."""
    xf = x.float()
    have = present[..., None]
    mn = torch.where(have, xf, float("inf")).amin(dim=-2)
    mx = torch.where(have, xf, float("-inf")).amax(dim=-2)
    empty = ~present.any(dim=-1, keepdim=True)  # a group with no token: any finite range
    mn = torch.where(empty, 0.0, mn)
    mx = torch.where(empty, 0.0, mx)
    scale, mn16 = _asym_params(mn, mx, fmt.levels)
    codes = _asym_codes(xf, scale[..., None, :].float(), mn16[..., None, :].float(), fmt.levels)
    return pack(codes, fmt.bits), scale, mn16


def dequantize_channels(q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Inverse of quantize_channels: q [.., G, Dp], scale/mn [.., D] -> float32 [.., G, D]."""
    return unpack(q, fmt.bits).float() * scale.float()[..., None, :] + mn.float()[..., None, :]


# ----------------------------------------------------------------------------- asymmetric helpers


def _asym_params(mn: torch.Tensor, mx: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (scale, mn) of the range [mn, mx]. The scale is rounded up (x (1 + 2**-10)
    before the float16 cast, whose relative error is <= 2**-11), so the codes of in-range
    values never need clamping and the error bound stays s / 2 (+ mn's own rounding)."""
    scale = ((mx - mn) / levels * (1.0 + 2.0**-10)).to(torch.float16)
    return scale, mn.to(torch.float16)


def _asym_codes(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, levels: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, 1.0)
    return torch.round((x - mn) / safe).clamp(0, levels).to(torch.int32)


# ----------------------------------------------------------------------------- bounds


def token_error_bound(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, fmt: KVFormat) -> torch.Tensor:
    """The documented element-wise bound on |x - dequantize(quantize(x))| for per-token rows
    (broadcast to x's shape); scale/mn are the stored ones quantize_tokens returned."""
    s = scale.float()[..., None]
    if fmt.name == "int8":
        return (x.float().abs().amax(dim=-1, keepdim=True) / 254.0 * (1 + 1e-6)).expand_as(x)
    if fmt.name == "fp8":
        return torch.maximum(x.float().abs() / 16.0, s * 2.0**-10)
    return (s / 2 + 2.0**-11 * mn.float().abs()[..., None] + 2.0**-24).expand_as(x)


def channel_error_bound(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """The bound for KIVI per-channel groups: x [.., G, D], scale/mn [.., D]."""
    return (scale.float() / 2 + 2.0**-11 * mn.float().abs() + 2.0**-24)[..., None, :].expand_as(x)
