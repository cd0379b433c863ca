"""Integer weight grids: the scheme, and the pure functions that map weights to codes and back.

Convention (shared by every method and every exporter): codes are unsigned integers in
[0, 2^bits - 1]; `w ≈ (code - zero) * scale`, with one (scale, zero) pair per output row and group of
`group_size` consecutive input columns. Symmetric grids fix zero = 2^(bits-1); their scale depends
on `symmetric_range`:
- "balanced" (default): scale = max|w| / (2^(b-1) - 1), codes ±(2^(b-1) - 1) cover ±max|w| exactly
  (15 levels at 4 bits; code 0 stays free as headroom below).
- "full": scale = max|w| / (2^(b-1) - 1/2), codes -2^(b-1) … 2^(b-1) - 1 (16 levels), compressed-
  tensors' (llm-compressor's) grid. ±max|w| falls half a step outside the last code on either side.
Neither wins everywhere. GPTQ W4A16 perplexity, balanced → full: Gemma-3-270M g128 at 8 × 256
calibration tokens 28.57 → 27.26; SmolLM2 g64 at 64 × 512 28.84 → 28.94, at 16 × 256 31.88 → 34.58
(RTN there 36.26 → 33.77). Every code is an integer in the signed range the exporters write.
A last group shorter than `group_size` is allowed here; whether a format can store it is decided by
the format at plan time.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Observer(str, enum.Enum):
    minmax = "minmax"  # the grid spans each group's min and max
    mse = "mse"  # the grid shrinks towards zero while that lowers the group's squared error


class QuantScheme(BaseModel):
    """Weight quantization grid. `group_size: null` means one group per output channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(128, ge=8)
    symmetric: bool = True
    symmetric_range: Literal["balanced", "full"] = Field(
        "balanced", description="symmetric grids only: 'balanced' = max|w| / (2^(b-1) - 1), 'full' = "
        "max|w| / (2^(b-1) - 1/2) with codes down to -2^(b-1) (compressed-tensors' grid)")
    observer: Observer = Observer.minmax

    @model_validator(mode="after")
    def _range_needs_symmetric(self) -> "QuantScheme":
        if not self.symmetric and self.symmetric_range == "full":
            raise ValueError("symmetric_range: full applies to symmetric grids only; drop it or set symmetric: true")
        return self

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def label(self) -> str:
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        obs = "" if self.observer is Observer.minmax else f"-{self.observer.value}"
        sym = ("symfull" if self.symmetric_range == "full" else "sym") if self.symmetric else "asym"
        return f"w{self.bits}-{g}-{sym}{obs}"


@dataclass
class QuantizedWeight:
    """Codes of one (out, in) weight plus its grid. `codes` are uint8 in [0, 2^bits-1]."""

    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, G) float32
    zero: torch.Tensor  # (out, G) uint8
    bits: int
    group_size: int | None
    symmetric: bool = True

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group_size)


def group_index(in_features: int, group_size: int | None) -> torch.Tensor:
    """g_idx: the group of each input column (monotone: our act-order uses static groups)."""
    if group_size is None:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


def _minmax(wmin: torch.Tensor, wmax: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    if scheme.symmetric:
        half = 2 ** (scheme.bits - 1)
        top = half - 0.5 if scheme.symmetric_range == "full" else half - 1
        scale = (torch.maximum(-wmin, wmax) / top).clamp(min=1e-8)
        return scale, torch.full_like(scale, float(half))
    scale = ((wmax - wmin) / scheme.maxq).clamp(min=1e-8)
    return scale, torch.round(-wmin / scale).clamp(0, scheme.maxq)


MSE_SHRINK = torch.linspace(1.0, 0.5, 26)  # candidate range factors for the mse observer


def grid_params(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid for the columns in `w` (out, k): returns scale (out,), zero (out,) as float.

    The zero point is kept integral so that the grid contains exact integers the formats can store.
    With the mse observer each row keeps the shrink factor p of its range that minimises
    Σ (w - q(w))², the clipping search of GPTQ's reference code.
    """
    wmin = w.amin(dim=1).clamp(max=0.0)  # (out,)
    wmax = w.amax(dim=1).clamp(min=0.0)
    scale, zero = _minmax(wmin, wmax, scheme)
    if scheme.observer is Observer.minmax:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for p in MSE_SHRINK:
        s, z = _minmax(p * wmin, p * wmax, scheme)
        q = (quantize_column(w, s[:, None], z[:, None], scheme.maxq) - z[:, None]) * s[:, None]
        err = (w - q).pow(2).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes for one column or block: round(w / s) + z, clamped to the grid."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(code - zero) * scale, each column using its group's pair. Returns float32 (out, in)."""
    g = group_index(codes.shape[1], group_size)
    return (codes.float() - zero.float()[:, g]) * scale.float()[:, g]


def grid_for_weight(W: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) for a whole weight (out, in): (out, G) each."""
    width = scheme.group_width(W.shape[1])
    pairs = [grid_params(W[:, i : i + width], scheme) for i in range(0, W.shape[1], width)]
    scale = torch.stack([p[0] for p in pairs], dim=1)
    zero = torch.stack([p[1] for p in pairs], dim=1)
    return scale, zero


def rtn_quantize(W: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest on the min/max grid of each group: the baseline every method must beat."""
    W = W.float()
    scale, zero = grid_for_weight(W, scheme)
    g = group_index(W.shape[1], scheme.group_size)
    codes = quantize_column(W, scale[:, g], zero[:, g], scheme.maxq)
    return QuantizedWeight(codes.to(torch.uint8), scale, zero.to(torch.uint8), scheme.bits, scheme.group_size, scheme.symmetric)


def reconstruction_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the layer-output error GPTQ minimises, for H = X X^T."""
    D = (W.float() - Wq.float()).double()
    return float(torch.einsum("oi,ij,oj->", D, H.double(), D))


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (ref.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise.clamp(min=1e-30)))
