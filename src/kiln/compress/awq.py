"""AWQ: activation-aware weight quantization, as pure kernels (scale search and clipping search).

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
arXiv:2306.00978. Weights multiplying large activations matter most; scaling their input column up
by s_j before quantization (and the activation down by s_j, folded into the preceding op, see
kiln.compress.smoothing.fold_scales) shrinks their relative rounding error (§3.2). The per-channel
scale is s = s_X^α with s_X = mean|X_j| (the average activation magnitude), and α ∈ [0, 1) is found
by grid search on the quantized output error of the group of linears that read X (eq. 5):
    α* = argmin_α Σ_k ‖ X W_kᵀ − (X diag(s)⁻¹) Q(W_k diag(s))ᵀ ‖².
A second search (AutoAWQ's auto_clip) then shrinks each (row, group) range to the clipping ratio
that minimises that group's output error; the clipped weights are quantized later by RTN or GPTQ.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from kiln.compress.base import StageConfig
from kiln.compress.quant import QuantScheme, grid_params, quantize_column, rtn_quantize

SCALE_TOKENS = 4096  # token rows kept for the scale search
CLIP_TOKENS = 512  # token rows kept for the clipping search (AutoAWQ auto_clip: 512)
CLIP_SKIP = ("q_proj", "k_proj", "c_attn")  # see AWQConfig.smooth
CLIP_CHUNK_ELEMS = 1 << 22  # rows per chunk in awq_clip: tokens × rows ≤ this


def _subsample(X: torch.Tensor, n_max: int) -> torch.Tensor:
    """At most n_max rows, evenly spaced: deterministic and spread over every calibration sample."""
    X = X.reshape(-1, X.shape[-1])
    if X.shape[0] <= n_max:
        return X
    idx = torch.linspace(0, X.shape[0] - 1, n_max, device=X.device).round().long()
    return X[idx]


def _fake_quant(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return rtn_quantize(W, scheme).dequantize().to(W.device)


def awq_search_scales(
    X: torch.Tensor,
    weights: list[torch.Tensor],
    scheme: QuantScheme,
    grid: int = 20,
) -> tuple[torch.Tensor, dict]:
    """Grid search of AWQ's per-input-channel scale for the linears `weights` (each (out_k, in)) that
    all read the calibration inputs X (n, in) (arXiv:2306.00978, §3.2, eq. 5).

    For α ∈ {0, 1/grid, …, (grid−1)/grid}: s = mean|X|^α / √(max s · min s), and
    loss(α) = Σ_k ‖X W_kᵀ − (X/s) Q(W_k·s)ᵀ‖² / Σ_k numel(X W_kᵀ), Q = RTN on `scheme`.
    Returns (s (in,) float32 — fold 1/s into the preceding op and s into the weights — and
    stats {"alpha", "loss", "loss_unscaled" (α = 0, i.e. plain RTN)}). α = 0 is a candidate, so
    loss ≤ loss_unscaled always."""
    if grid < 1:
        raise ValueError("awq_search_scales: grid must be ≥ 1")
    if not weights:
        raise ValueError("awq_search_scales: no weights")
    X = _subsample(X.detach(), SCALE_TOKENS).float()
    in_features = X.shape[1]
    Ws = [W.detach().float().to(X.device) for W in weights]
    for W in Ws:
        if W.shape[1] != in_features:
            raise ValueError(f"awq_search_scales: X has {in_features} channels, "
                             f"a weight has {W.shape[1]} input columns")
    x_mean = torch.nan_to_num(X.abs().mean(dim=0), nan=0.0, posinf=0.0)
    refs = [X @ W.T for W in Ws]
    numel = sum(r.numel() for r in refs)

    best_alpha, best_loss, best_s = 0.0, math.inf, torch.ones(in_features, device=X.device)
    loss_unscaled = math.inf
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        Xs = X / s
        err = 0.0
        for W, ref in zip(Ws, refs):
            err += float((ref - Xs @ _fake_quant(W * s, scheme).T).double().pow(2).sum())
        loss = err / numel
        if i == 0:
            loss_unscaled = loss
        if loss < best_loss:
            best_alpha, best_loss, best_s = alpha, loss, s
    return best_s.float(), {"alpha": best_alpha, "loss": best_loss, "loss_unscaled": loss_unscaled}


def _fake_quant_rows(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Quantize-dequantize a (rows, width) block, one grid per row (one group of the scheme)."""
    scale, zero = grid_params(w, scheme)
    return (quantize_column(w, scale[:, None], zero[:, None], scheme.maxq) - zero[:, None]) * scale[:, None]


def awq_clip(
    W: torch.Tensor,
    X: torch.Tensor,
    scheme: QuantScheme,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """AWQ's clipping search (AutoAWQ auto_clip; arXiv:2306.00978): for each (row, group) of W (out, in),
    the ratio r ∈ linspace(1, 1 − max_shrink, grid) of the group's max|w| that minimises the group's
    output error ‖X_g (w_g − Q(clamp(w_g, −r·max|w_g|, r·max|w_g|)))ᵀ‖² on the calibration inputs
    X (n, in). r = 1 (no clipping) is a candidate. Returns W clamped to the chosen ranges, in W's
    dtype; quantizing it is left to the next stage (RTN/GPTQ on the same scheme)."""
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"awq_clip: max_shrink must lie in [0, 1), got {max_shrink}")
    if grid < 1:
        raise ValueError("awq_clip: grid must be ≥ 1")
    rows, cols = W.shape
    X = _subsample(X.detach(), CLIP_TOKENS).float().to(W.device)
    if X.shape[1] != cols:
        raise ValueError(f"awq_clip: X has {X.shape[1]} channels, W has {cols} input columns")
    Wf = W.detach().float()
    ratios = torch.linspace(1.0, 1.0 - max_shrink, grid).tolist()
    width = scheme.group_width(cols)
    chunk = max(1, CLIP_CHUNK_ELEMS // max(1, X.shape[0]))
    bound = torch.empty_like(Wf)  # per-element clipping bound r·max|w_g|
    for c0 in range(0, cols, width):
        c1 = min(c0 + width, cols)
        Xg = X[:, c0:c1]
        for r0 in range(0, rows, chunk):
            r1 = min(r0 + chunk, rows)
            w = Wf[r0:r1, c0:c1]
            amax = w.abs().amax(dim=1, keepdim=True)  # (rows, 1)
            ref = Xg @ w.T  # (n, rows)
            best_err = torch.full((r1 - r0,), math.inf, device=W.device, dtype=torch.float64)
            best_b = amax.clone()
            for r in ratios:
                b = amax * r
                q = _fake_quant_rows(torch.maximum(torch.minimum(w, b), -b), scheme)
                err = (Xg @ q.T - ref).double().pow(2).sum(dim=0)  # (rows,)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_b = torch.where(better[:, None], b, best_b)
            bound[r0:r1, c0:c1] = best_b
    bound = bound.to(W.dtype)
    return torch.maximum(torch.minimum(W.detach(), bound), -bound)


class AWQConfig(StageConfig):
    kind: Literal["awq"] = "awq"
    scheme: QuantScheme = Field(
        default_factory=lambda: QuantScheme(bits=4, group_size=128, symmetric=False),
        description="the grid the scale and clip searches quantize to; AWQ's usual grid is asymmetric",
    )
    grid: int = Field(20, ge=2, le=100, description="candidates of each search (α for scales, r for clipping)")
    clip: bool = Field(True, description="also search per-(row, group) clipping ranges")

    needs_calibration = True
    role = "smoothing"
    max_tokens: ClassVar[int] = SCALE_TOKENS

    def smooth(self, prev: nn.Module, prev_name: str, linears: dict[str, nn.Module], X: torch.Tensor, names: set[str],
               absmax: torch.Tensor) -> dict:
        """Search s for this group, fold it (1/s into `prev`, s into the linears), then clip the
        targeted linears' ranges. Query/key projections are not clipped: softmax amplifies their
        error in a way the linear-output loss does not see (AutoAWQ skips them for the same reason)."""
        from kiln.arch import set_weight_matrix, weight_matrix
        from kiln.compress.smoothing import fold_kind, fold_scales

        mods = list(linears.values())
        s, stats = awq_search_scales(X, [weight_matrix(m).float() for m in mods], self.scheme, self.grid)
        fold_scales(prev, mods, s, fold_kind(prev))
        if self.clip:
            Xs = X / s
            for n, m in linears.items():
                if n in names and not n.endswith(CLIP_SKIP):
                    set_weight_matrix(m, awq_clip(weight_matrix(m).float(), Xs, self.scheme, self.grid))
        return {"alpha": round(stats["alpha"], 4), "loss": stats["loss"], "loss_unscaled": stats["loss_unscaled"]}
