"""GPTQ: optimal-brain-quantization of one column at a time with lazy block updates.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323. Notation follows the paper: W (out × in), H = 2XXᵀ, Hinv its upper Cholesky factor.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from kiln.context import single_threaded
from kiln.compress.base import ActScheme, StageConfig, WeightResult
from kiln.compress.quant import QuantizedWeight, QuantScheme, grid_for_weight, grid_params


class GPTQConfig(StageConfig):
    kind: Literal["gptq"] = "gptq"
    scheme: QuantScheme = Field(default_factory=QuantScheme)
    block_size: int = Field(128, ge=1, le=4096, description="columns per lazy-update block")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="dampening, as a fraction of mean(diag(H))")
    act_order: bool = Field(
        True, description="quantize columns by decreasing H_ii; groups stay static (computed up front) "
        "so the stored grid is the ordinary one and no g_idx is needed at inference"
    )

    sequential: bool = Field(
        True, description="within a decoder layer, quantize groups of linears in forward order and take each "
        "group's Hessian from inputs that already went through the quantized groups before it"
    )
    activations: ActScheme | None = Field(None, description="also quantize inputs at inference (W8A8)")

    needs_calibration = True

    @property
    def quant_scheme(self) -> QuantScheme:
        return self.scheme

    @property
    def act_scheme(self) -> ActScheme | None:
        return self.activations

    def process_weight(self, W: torch.Tensor, H: torch.Tensor, name: str, keep: torch.Tensor | None = None) -> WeightResult:
        q, stats = gptq_quantize(W, H, self.scheme, self.block_size, self.damp, self.act_order, name=name, keep=keep)
        return WeightResult(q.dequantize(), q, {"loss": stats["loss"], "damp": stats["damp"]})

    def process_weights(self, Ws, H, names, keeps) -> list[WeightResult]:
        """GPTQ's rows are independent given H (each row's updates use only its own errors), so
        linears sharing H are quantized as one stacked matrix: one Cholesky factor and one column
        loop instead of one per linear."""
        if len(Ws) == 1:
            return [self.process_weight(Ws[0], H, names[0], keeps[0])]
        rows = [W.shape[0] for W in Ws]
        keep = None if all(k is None for k in keeps) else torch.cat([torch.ones_like(W, dtype=torch.bool) if k is None else k
                                                                     for W, k in zip(Ws, keeps)])
        q, stats = gptq_quantize(torch.cat(Ws), H, self.scheme, self.block_size, self.damp, self.act_order,
                                 name=" + ".join(names), keep=keep)
        out = []
        for codes, scale, zero, loss in zip(q.codes.split(rows), q.scale.split(rows), q.zero.split(rows), stats["row_loss"].split(rows)):
            qi = QuantizedWeight(codes, scale, zero, q.bits, q.group_size, q.symmetric)
            out.append(WeightResult(qi.dequantize(), qi, {"loss": float(loss.sum()), "damp": stats["damp"]}))
        return out


class HessianNotPositiveDefinite(RuntimeError):
    pass


def damped_cholesky_inverse(H: torch.Tensor, damp: float, name: str = "layer", max_damp: float = 1.0) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H⁻¹ after adding damp·mean(diag H)·I; damping grows ×10 per failure
    up to `max_damp`.

    Returns (Hinv_upper, damp_used). Raises HessianNotPositiveDefinite naming the layer if even the
    largest damping leaves H singular (e.g. NaN activations)."""
    if not torch.isfinite(H).all():
        raise HessianNotPositiveDefinite(f"{name}: the Hessian of its inputs has NaN/inf entries")
    mean_diag = max(float(torch.diag(H).mean()), 1e-8)
    lam = damp
    while lam <= max_damp * (1 + 1e-9):
        U = _upper_cholesky_of_inverse(H, lam * mean_diag)
        if U is not None:
            return U, lam
        lam *= 10
    raise HessianNotPositiveDefinite(
        f"{name}: Hessian is not positive definite even with damping {max_damp:g}·mean(diag)"
    )


def _upper_cholesky_of_inverse(H: torch.Tensor, shift: float) -> torch.Tensor | None:
    """Upper-triangular U (float32) with (H + shift·I)⁻¹ = UᵀU, or None if H + shift·I is not
    positive definite. One float64 Cholesky factorization and one triangular inverse.

    With J the order-reversing permutation, J(H + shift·I)J = MMᵀ (M lower) gives
    (H + shift·I)⁻¹ = (JM⁻ᵀJ)(JM⁻¹J), and U = JM⁻¹J is upper triangular: half the work of inverting
    and factoring again, and at most two n×n float64 matrices alive (5632² of them: 254 MB each)."""
    A = H.flip(0, 1).double()
    A.diagonal().add_(shift)
    M, info = torch.linalg.cholesky_ex(A)
    del A
    if int(info) != 0:
        return None
    U = lower_triangular_inverse_(M).float()  # M⁻¹, in M's storage
    del M
    U = U.flip(0, 1)
    return U if bool(torch.isfinite(U).all()) else None


def lower_triangular_inverse_(M: torch.Tensor, block: int = 256) -> torch.Tensor:
    """M⁻¹ in place of a lower-triangular M (zeros above the diagonal), a block of columns at a
    time. Column block [j, j + b) of M⁻¹ is zero above row j, so it solves M[j:, j:] X = I[j:, j:j+b]
    alone: about n³/3 multiply-adds in all, against n³ for one solve against the whole identity.
    Later blocks read only M's columns from j + b on, so X overwrites columns [j, j + b): besides M,
    the largest thing alive is the solver's copy of M[j:, j:], smaller than a second n × n."""
    n = M.shape[0]
    for j in range(0, n, block):
        e = min(j + block, n)
        rhs = torch.zeros(n - j, e - j, dtype=M.dtype)
        rhs[: e - j].fill_diagonal_(1.0)
        M[j:, j:e] = torch.linalg.solve_triangular(M[j:, j:], rhs, upper=False)
    return M


def _effective_block(block_size: int, group_size: int | None) -> int:
    """Blocks aligned with groups, so a group's grid is always taken from fully updated columns."""
    if group_size is None:
        return block_size
    if group_size <= block_size:
        return group_size * (block_size // group_size)
    return math.gcd(group_size, block_size)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    name: str = "layer",
    keep: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, dict]:
    """Quantize W (out, in) given H (in, in). Returns codes on `scheme`'s grid and stats
    (`loss`: Σ (w - q)² / [H⁻¹]_ii / 2, the paper's objective, `row_loss` its sum per row; `damp`:
    damping used).

    `keep` (bool, out × in) marks the weights an earlier pruning stage kept: the others are fixed to
    the code that dequantizes to exactly 0 (the zero point is integral), and the drift the updates gave
    them is compensated like any other rounding error."""
    W = W.detach().float().clone()
    if keep is not None:
        W[~keep] = 0.0
    H = H.detach().float()
    rows, cols = W.shape

    diag = torch.diag(H).clone()
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0

    static = act_order and scheme.group_size is not None
    if static or scheme.group_size is None:
        scale_g, zero_g = grid_for_weight(W, scheme)  # (rows, G), computed before any update
    else:
        G = scheme.groups(cols)
        scale_g = torch.zeros(rows, G)
        zero_g = torch.zeros(rows, G)

    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(cols)
    W = W[:, perm]
    H = H[perm[:, None], perm]  # one permuted copy; the caller's H is left as it was
    H[dead[perm], dead[perm]] = 1.0
    pruned = None if keep is None else ~keep[:, perm]
    Hinv, damp_used = damped_cholesky_inverse(H, damp, name)  # LAPACK: all threads

    bs = _effective_block(block_size, scheme.group_size) if not act_order else block_size
    codes, losses = _quantize_columns(W, Hinv, scale_g, zero_g, perm.tolist(), scheme, static, bs, pruned)
    inv = torch.argsort(perm)
    codes = codes[:, inv]
    qw = QuantizedWeight(codes.to(torch.uint8), scale_g, zero_g.to(torch.uint8), scheme.bits, scheme.group_size, scheme.symmetric)
    return qw, {"loss": float(losses.sum()), "damp": damp_used, "row_loss": losses}


SUB_BLOCK = 16  # columns whose updates reach each other one by one (see _quantize_columns)


def sub_blocks(n: int, starts: set[int]) -> list[tuple[int, int]]:
    """The sub-blocks [j1, j2) of a block of n columns: one every SUB_BLOCK columns, and one from each
    of `starts` (a column where a grid or mask is chosen, which must see fully updated columns)."""
    bounds = sorted(set(range(0, n, SUB_BLOCK)) | starts) + [n]
    return list(zip(bounds, bounds[1:]))


def codes_np(w: np.ndarray, s: np.ndarray, z: np.ndarray, maxq: float) -> np.ndarray:
    """quant.quantize_column for numpy rows: round(w / s) + z (half to even, as torch), clamped."""
    c = np.rint(w / s)
    c += z
    return np.clip(c, 0.0, maxq, out=c)


def spread_sub_block(W1: np.ndarray, H1: np.ndarray, E1: np.ndarray, j1: int, j2: int) -> None:
    """The errors of sub-block [j1, j2) applied to the block's later columns as one product (torch
    here: one thread, where numpy's BLAS keeps its own pool)."""
    if j2 < len(W1):
        torch.from_numpy(W1[j2:]).sub_(torch.from_numpy(H1[j1:j2, j2:]).t() @ torch.from_numpy(E1[j1:j2]))


@single_threaded
def _quantize_columns(W, Hinv, scale_g, zero_g, order: list[int], scheme: QuantScheme, static: bool, bs: int,
                      pruned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop, on Wᵀ so that each column of W is one contiguous row. It is thousands of
    tiny vector ops: they run in numpy, whose per-call cost is a fraction of torch's, on one thread.
    The lazy updates of the paper are nested once more: a column's error reaches the rest of its
    sub-block at once, the rest of its block as one product per sub-block, the later blocks as one
    product per block. A dynamic group's first column starts a sub-block, so its grid is taken from
    fully updated columns. Fills scale_g/zero_g in place for dynamic groups."""
    cols, rows = W.shape[1], W.shape[0]
    width = scheme.group_width(cols)
    dynamic = not static and scheme.group_size is not None
    Wt = W.t().contiguous()  # (in, out)
    codes = torch.zeros_like(Wt)
    Err = torch.zeros_like(Wt)  # (w - q) / [H⁻¹]_ii per column
    wt, cd, err_all, hinv = Wt.numpy(), codes.numpy(), Err.numpy(), Hinv.numpy()
    S, Z = scale_g.t().contiguous().numpy(), zero_g.t().contiguous().numpy()  # (G, out): a group's pair is one row
    prunedt = None if pruned is None else pruned.t().contiguous().numpy()
    maxq = float(scheme.maxq)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, E1, H1 = wt[i1:i2], err_all[i1:i2], hinv[i1:i2, i1:i2]
        d = H1.diagonal().copy()
        group_starts = {c - i1 for c in range(i1, i2) if order[c] % width == 0} if dynamic else set()
        for j1, j2 in sub_blocks(i2 - i1, group_starts):
            for i in range(j1, j2):
                col = i1 + i
                g = order[col] // width
                if i in group_starts:
                    S[g], Z[g] = (t.numpy() for t in grid_params(Wt[col : col + width].t(), scheme))
                s, z, w = S[g], Z[g], W1[i]
                q = codes_np(w, s, z, maxq)
                if prunedt is not None:
                    q = np.where(prunedt[col], z, q)
                cd[col] = q
                q -= z
                q *= s
                e = np.subtract(w, q, out=E1[i])
                e /= d[i]
                W1[i + 1 : j2] -= np.multiply.outer(H1[i, i + 1 : j2], e)
            spread_sub_block(W1, H1, E1, j1, j2)
        if i2 < cols:
            Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err[i1:i2]
    if dynamic:
        scale_g.copy_(torch.from_numpy(S).t())
        zero_g.copy_(torch.from_numpy(Z).t())
    losses = Err.pow(2).sum(0) / 2  # Σ (w - q)² / [H⁻¹]_ii² / 2 per row
    return codes.t(), losses
