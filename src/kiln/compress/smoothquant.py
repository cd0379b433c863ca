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

The paper picks one α per model (0.5 for OPT and BLOOM, larger, e.g. 0.75, for models with stronger
outliers such as GLM-130B). `alpha: auto` makes that choice per group instead: the α whose
scales give the smallest W8A8 output error Σₖ‖Q(X/s) Q(Wₖs)ᵀ − X Wₖᵀ‖² on the group's calibration
inputs, with X per token and W per output channel in int8 (the O3 setting this stage prepares for).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from pydantic import Field, field_validator

from kiln.compress.base import StageConfig

S_MIN, S_MAX = 1e-5, 1e5
ALPHA_GRID = tuple(k / 10 for k in range(11))  # `auto`: 0, 0.1, …, 1, then the best one's ±0.05
SEARCH_TOKENS = 2048  # token rows `auto` measures the error on


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


def w8a8_error(X: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor) -> float:
    """Relative output error of the group in W8A8 after smoothing by s: Σₖ‖Q(X/s) Q(Wₖs)ᵀ − Yₖ‖² / Σₖ‖Yₖ‖²,
    Yₖ = X Wₖᵀ (refs), Q per token (int8, dynamic) for activations, per output channel for weights."""
    from kiln.compress.quant import QuantScheme, rtn_quantize
    from kiln.compress.w8a8 import quantize_per_token

    xq, xs = quantize_per_token(X / s)
    Xq = xq.float() * xs
    w8 = QuantScheme(bits=8, group_size=None, symmetric=True)
    err = sum(float((Xq @ rtn_quantize(W * s, w8).dequantize().T - Y).double().pow(2).sum()) for W, Y in zip(weights, refs))
    return err / max(sum(float(Y.double().pow(2).sum()) for Y in refs), 1e-30)


def search_alpha(X: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor]) -> tuple[float | None, dict]:
    """The α of ALPHA_GRID (refined to ±0.05 around the best) whose smooth_scales give the least
    w8a8_error on the token rows X (tokens, in); act_absmax is max |x| over all calibration tokens.
    None when no α beats leaving the group as it is (s = 1). Returns (α, {"w8a8_error": the error
    it gives, "w8a8_error_unsmoothed": the error with s = 1})."""
    X = X.reshape(-1, X.shape[-1]).float()
    Ws = [W.detach().float() for W in weights]
    refs = [X @ W.T for W in Ws]
    tried: dict[float, float] = {}

    def error(alpha: float) -> float:
        if alpha not in tried:
            tried[alpha] = w8a8_error(X, Ws, refs, smooth_scales(act_absmax, Ws, alpha))
        return tried[alpha]

    best = min(ALPHA_GRID, key=error)
    best = min([best] + [round(best + d, 2) for d in (-0.05, 0.05) if 0.0 <= best + d <= 1.0], key=error)
    unsmoothed = w8a8_error(X, Ws, refs, torch.ones_like(act_absmax))
    if unsmoothed <= tried[best]:
        return None, {"w8a8_error": unsmoothed, "w8a8_error_unsmoothed": unsmoothed}
    return best, {"w8a8_error": tried[best], "w8a8_error_unsmoothed": unsmoothed}


class SmoothQuantConfig(StageConfig):
    kind: Literal["smoothquant"] = "smoothquant"
    alpha: float | Literal["auto"] = Field(
        0.5, description="migration strength in [0, 1], or 'auto': per group, the α with the least W8A8 output "
        "error on the calibration inputs (searched over 0, 0.1, …, 1, then ±0.05), or no smoothing where none helps")
    groups: Literal["norm", "all"] = Field(
        "all", description="'norm': smooth the inputs of norm-fed groups only (q/k/v, gate/up: the paper's "
        "choice); 'all': also those of linear-fed ones (down_proj through up_proj, o_proj through v_proj where "
        "heads map one-to-one), whose outliers per-token int8 activations otherwise take unsmoothed")

    needs_calibration = True
    role = "smoothing"

    @property
    def max_tokens(self) -> int | None:
        """Token rows smooth() gets: none for a fixed α (max |x| per channel is all it needs)."""
        return SEARCH_TOKENS if self.alpha == "auto" else None

    def smooth(self, prev: nn.Module, prev_name: str, linears: dict[str, nn.Module], X: torch.Tensor | None,
               names: set[str], absmax: torch.Tensor) -> dict | None:
        """Migrate activation outliers of a group's input into its weights; the producer (a norm, or
        with groups='all' also a linear: up_proj for down_proj, v_proj for o_proj) absorbs 1/s.
        absmax is (in,): max |x| per input channel over the calibration set; X the token rows (tokens, in)
        for `auto`, None otherwise."""
        from kiln.arch import weight_matrix
        from kiln.compress.smoothing import fold_kind, fold_scales

        kind = fold_kind(prev)
        if kind == "linear" and self.groups == "norm":
            return None
        mods = list(linears.values())
        Ws = [weight_matrix(m).float() for m in mods]
        alpha, stats = self.alpha, {}
        if alpha == "auto":
            alpha, found = search_alpha(X, absmax, Ws)
            stats = {"alpha": alpha, **found}
            if alpha is None:  # smoothing would only add error: the group stays as it is
                return {**stats, "smoothed_by": None}
        s = smooth_scales(absmax, Ws, alpha)
        fold_scales(prev, mods, s, kind)
        return {**stats, "act_absmax_before": float(absmax.max()), "act_absmax_after": float((absmax / s).max())}

    @field_validator("alpha")
    @classmethod
    def _alpha_in_unit_interval(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= v <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha is the migration strength and must lie in [0, 1], got {v}")
        return v
