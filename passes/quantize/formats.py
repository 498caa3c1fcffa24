"""Weight formats for linears: quantize, dequantize, pack (all lossy).

Every format turns a weight W [N, K] (N = out_features, K = in_features) into a
`QuantizedWeight` whose tensors are what the quantized linear ops read:

    int8        per-output-channel symmetric:  W ~ q * scale[:, None]
                qweight int8 [N, K]; scale float32 [N]
    int4 (g)    asymmetric group-wise along K (group g in 32, 64, 128):
                W[n, k] ~ q[n, k] * scale[n, k // g] + offset[n, k // g],  q in 0..15
                qweight uint8 [N, K // 2]: byte j of row n holds k = 2j in the low
                nibble and k = 2j + 1 in the high nibble (K-contiguous, so a GEMV
                reads each row with wide coalesced loads; the kernel splits x into
                even/odd halves instead of interleaving nibbles).
                scale, offset float16 [N, K // g]  (4 bytes a group: 4.25 bits/weight at g=128)
                offset = -zero * scale is stored instead of the zero point so that the
                kernel computes y = sum_g scale * (q . x)_g + offset * sum(x_g): one fma a
                weight, the group terms once per group.
    fp8         float8 e4m3fn per-output-channel:  W ~ q.float() * scale[:, None]
                qweight float8_e4m3fn [N, K]; scale float32 [N]

int4 rounding is round-to-nearest with min/max ranges, optionally refined by HQQ
(Badri & Shaji 2023): a half-quadratic solver that moves the zero point to minimise
an l_p (p < 1) norm of the weight error, robust to outliers; it needs no data.

A spec string names a format everywhere (configs, plans, reports):
"none", "int8", "int4_g32", "int4_g64", "int4_g128", "fp8".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The int4 kernels read the packed layout, so its unpacking lives beside them.
from slimfx.codegen.kernels.gemv_int4 import dequantize_int4

GROUP_SIZES = (32, 64, 128)
FORMATS = ("none", "int8", "int4", "fp8")
SPECS = ("none", "int8") + tuple(f"int4_g{g}" for g in GROUP_SIZES) + ("fp8",)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class FormatSpec:
    """A weight format: kind in FORMATS, group_size for int4 (else None)."""

    kind: str
    group_size: int | None = None

    @property
    def name(self) -> str:
        return f"int4_g{self.group_size}" if self.kind == "int4" else self.kind

    def bytes_for(self, out_features: int, in_features: int, orig_elem_bytes: int = 2) -> int:
        """Bytes the weight (and its scales) occupies in this format."""
        n, k = out_features, in_features
        if self.kind == "none":
            return n * k * orig_elem_bytes
        if self.kind in ("int8", "fp8"):
            return n * k + 4 * n
        return n * k // 2 + 4 * n * (k // self.group_size)

    def unsupported_reason(self, out_features: int, in_features: int) -> str | None:
        """Why a [out, in] weight cannot take this format (None when it can)."""
        if self.kind == "int4" and in_features % self.group_size:
            return f"in_features {in_features} is not a multiple of the group size {self.group_size}"
        return None


def parse_spec(text: str, where: str = "format") -> FormatSpec:
    """'int4_g128' -> FormatSpec('int4', 128). Raises ValueError naming the allowed specs."""
    if text in ("none", "int8", "fp8"):
        return FormatSpec(text)
    if text.startswith("int4_g"):
        try:
            g = int(text[len("int4_g"):])
        except ValueError:
            g = None
        if g in GROUP_SIZES:
            return FormatSpec("int4", g)
    raise ValueError(f"{where}: got {text!r}; allowed: {', '.join(SPECS)}")


@dataclass
class QuantizedWeight:
    """A weight in a quantized format; `tensors` are what the op reads (see module doc)."""

    spec: FormatSpec
    shape: tuple[int, int]  # (N, K) of the original weight
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


# ----------------------------------------------------------------------------- int8


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    """W [N, K] -> int8 per-channel symmetric (scale = absmax / 127 per row)."""
    wf = _check_weight(w).float()
    scale = wf.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(FormatSpec("int8"), tuple(w.shape), {"qweight": q, "scale": scale})


# ----------------------------------------------------------------------------- fp8


def fp8_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether fp8 e4m3 weights can be used on `device`; the reason when not.

    CPU: yes (the reference upcasts). CUDA: compute capability 8.9+ (Ada, Hopper), where
    the hardware converts e4m3 natively."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False, f"torch {torch.__version__} has no float8_e4m3fn"
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return False, f"GPU compute capability {major}.{minor} < 8.9 has no fp8"
    return True, ""


def quantize_fp8(w: torch.Tensor) -> QuantizedWeight:
    """W [N, K] -> float8 e4m3fn per-channel (scale = absmax / 448 per row)."""
    ok, why = fp8_supported()
    if not ok:
        raise ValueError(f"fp8: {why}")
    wf = _check_weight(w).float()
    scale = wf.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    q = (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(FormatSpec("fp8"), tuple(w.shape), {"qweight": q, "scale": scale})


# ----------------------------------------------------------------------------- int4


def _int4_minmax(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters for groups wg [N, G_count, g]: scale, zero (float) [N, G_count, 1]."""
    lo = wg.amin(dim=-1, keepdim=True)
    hi = wg.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp_min(1e-8)
    zero = -lo / scale  # float zero point (HQQ keeps it unrounded too)
    return scale, zero


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of the l_p norm (HQQ eq. 6)."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * (x.abs() + 1e-8).pow(p - 1))


def hqq_refine_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, iters: int = 20,
                    p: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """HQQ: refine the zero points (scale fixed) of groups wg [N, G_count, g].

    Alternates W_e = shrink(W - dequant(W)) and the closed-form zero for W - W_e.
    Keeps the best zero seen by mean |W - dequant(W)|, so the result is never worse
    than the input zero by that measure (the loop stops when it stops improving)."""
    def err_of(z):
        q = torch.round(wg / scale + z).clamp(0, 15)
        return q, ((q - z) * scale - wg).abs().mean()

    best_zero = zero
    _, best_err = err_of(zero)
    for _ in range(iters):
        q, _ = err_of(zero)
        w_r = (q - zero) * scale
        w_e = _shrink_lp(wg - w_r, beta, p)
        zero = (q - (wg - w_e) / scale).mean(dim=-1, keepdim=True)
        beta *= kappa
        _, err = err_of(zero)
        if err < best_err:
            best_err, best_zero = err, zero
        else:
            break
    return best_zero


def quantize_int4(w: torch.Tensor, group_size: int = 128, *, hqq: bool = True) -> QuantizedWeight:
    """W [N, K] -> int4 asymmetric group-wise along K, packed two per byte (module doc)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size: got {group_size}; allowed: {', '.join(map(str, GROUP_SIZES))}")
    wf = _check_weight(w).float()
    n, k = wf.shape
    why = FormatSpec("int4", group_size).unsupported_reason(n, k)
    if why:
        raise ValueError(f"int4: {why}")
    wg = wf.view(n, k // group_size, group_size)
    scale, zero = _int4_minmax(wg)
    if hqq:
        zero = hqq_refine_zero(wg, scale, zero)
    q = torch.round(wg / scale + zero).clamp_(0, 15).to(torch.uint8).view(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    offset = -zero * scale
    tensors = {
        "qweight": packed.contiguous(),
        "scale": scale.view(n, -1).to(torch.float16),
        "offset": offset.view(n, -1).to(torch.float16),
    }
    return QuantizedWeight(FormatSpec("int4", group_size), (n, k), tensors)


# ----------------------------------------------------------------------------- dispatch


def quantize(w: torch.Tensor, spec: FormatSpec | str, *, hqq: bool = True) -> QuantizedWeight:
    """W [N, K] -> QuantizedWeight in `spec` ('none' keeps W as it is)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "int8":
        return quantize_int8(w)
    if spec.kind == "int4":
        return quantize_int4(w, spec.group_size, hqq=hqq)
    if spec.kind == "fp8":
        return quantize_fp8(w)
    return QuantizedWeight(spec, tuple(w.shape), {"weight": _check_weight(w)})


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QuantizedWeight -> W_hat [N, K] in `dtype`."""
    t = qw.tensors
    if qw.spec.kind == "none":
        return t["weight"].to(dtype)
    if qw.spec.kind == "int4":
        return dequantize_int4(t["qweight"], t["scale"], t["offset"], qw.spec.group_size, dtype)
    return (t["qweight"].float() * t["scale"].float()[:, None]).to(dtype)


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"quantize: weight must be a 2-D tensor [out_features, in_features], got {getattr(w, 'shape', type(w))}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"quantize: weight must be floating point, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("quantize: weight holds NaN or inf; allowed: finite values")
    return w.detach()
