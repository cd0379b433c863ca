"""SmoothQuant: migrate the quantization difficulty from activations to weights.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", arXiv:2211.10438. LLM activations have a few input channels with outliers ~100× the rest,
so per-token int8 activations waste almost all their levels on those channels; weights are flat and
easy to quantize. With a per-input-channel s > 0, Y = X Wᵀ = (X diag(s)⁻¹)(W diag(s))ᵀ: dividing
channel j of X by s_j and multiplying column j of W by s_j leaves the product unchanged (eq. 3).
Choosing s_j = max|X_j|^α / max|W_:j|^(1−α) (eq. 4) balances the two: α = 1 moves all of a channel's
range into the weights, α = 0 none of it (the weights' ranges are moved into the activations
instead); 0.5 is the paper's default, larger α for models with stronger outliers. diag(s)⁻¹ is folded
into the preceding norm/linear and diag(s) into the weights (kiln.compress.smoothing.fold_scales),
so the smoothed model is the same float function, ready for W8A8.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn
from pydantic import Field, field_validator

from kiln.compress.base import StageConfig

S_MIN, S_MAX = 1e-5, 1e5


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max_k max_i |W_k[i, j]|^(1−α) (arXiv:2211.10438, eq. 4), clamped to
    [1e-5, 1e5]. act_absmax: (in,); weights: the (out_k, in) matrices of every linear reading X.

    Channels that carry no information (activation or weight column all zero, or non-finite) get
    s_j = 1: there is nothing to balance. Returns float32 (in,) on act_absmax's device."""
    if not weights:
        raise ValueError("smooth_scales: no weights")
    a = act_absmax.detach().double().reshape(-1)
    w = torch.stack([W.detach().abs().amax(dim=0).double().to(a.device) for W in weights]).amax(dim=0)
    if w.shape != a.shape:
        raise ValueError(f"smooth_scales: activations have {a.numel()} channels, weights {w.numel()} input columns")
    valid = torch.isfinite(a) & torch.isfinite(w) & (a > 0) & (w > 0)
    a = torch.where(valid, a, torch.ones_like(a))
    w = torch.where(valid, w, torch.ones_like(w))
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(valid & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(S_MIN, S_MAX).float()


class SmoothQuantConfig(StageConfig):
    kind: Literal["smoothquant"] = "smoothquant"
    alpha: float = 0.5
    groups: Literal["norm", "all"] = Field(
        "all", description="'norm': smooth the inputs of norm-fed groups only (q/k/v, gate/up: the paper's "
        "choice); 'all': also those of linear-fed ones (down_proj through up_proj, o_proj through v_proj where "
        "heads map one-to-one), whose outliers per-token int8 activations otherwise take unsmoothed")

    needs_calibration = True
    role = "smoothing"
    max_tokens: ClassVar[int | None] = None  # smooth() gets only max |x| per channel, over every calibration token

    def smooth(self, prev: nn.Module, prev_name: str, linears: dict[str, nn.Module], X: torch.Tensor, names: set[str]) -> dict | None:
        """Migrate activation outliers of a group's input into its weights; the producer (a norm, or
        with groups='all' also a linear: up_proj for down_proj, v_proj for o_proj) absorbs 1/s.
        X is (1, in): max |x| per input channel over the calibration set (max_tokens = None)."""
        from kiln.arch import weight_matrix
        from kiln.compress.smoothing import fold_kind, fold_scales

        kind = fold_kind(prev)
        if kind == "linear" and self.groups == "norm":
            return None
        mods = list(linears.values())
        absmax = X.abs().amax(dim=0)
        s = smooth_scales(absmax, [weight_matrix(m).float() for m in mods], self.alpha)
        fold_scales(prev, mods, s, kind)
        return {"act_absmax_before": float(absmax.max()), "act_absmax_after": float((absmax / s).max())}

    @field_validator("alpha")
    @classmethod
    def _alpha_in_unit_interval(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha is the migration strength and must lie in [0, 1], got {v}")
        return v
