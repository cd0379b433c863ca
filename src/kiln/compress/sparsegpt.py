"""SparseGPT: one-shot pruning by optimal-brain-surgeon updates, one column at a time with lazy blocks.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774. The machinery is GPTQ's (kiln.compress.gptq) and so is the notation: W (out × in),
H = 2XXᵀ, Hinv the upper Cholesky factor of H⁻¹. For each block of columns the mask M1 is chosen by
the OBS saliency w² / [Hinv]_ii² (adaptive mask selection), each column is then set to its target q
(0 where pruned; the kept weight, or its grid value under joint quantization) and the error is
spread over the columns not yet processed, exactly as in GPTQ's column loop.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from pydantic import Field, field_validator

from kiln.context import single_threaded
from kiln.compress.base import StageConfig, WeightResult
from kiln.compress.gptq import _effective_block, damped_cholesky_inverse
from kiln.compress.quant import QuantizedWeight, QuantScheme, grid_params, quantize_column


def _parse_nm(pattern: str) -> tuple[int, int] | None:
    """(N, M) from 'N:M' when 0 < N < M <= 64, else None. N counts the zeros, as in the paper's 2:4."""
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    return (n, m) if 0 < n < m <= 64 else None


class SparseGPTConfig(StageConfig):
    kind: Literal["sparsegpt"] = "sparsegpt"
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="unstructured fraction of zeros; ignored for N:M")
    pattern: str = Field("unstructured", description="'unstructured', or 'N:M': N zeros in every M consecutive inputs")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block (and per mask selection)")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="dampening, as a fraction of mean(diag(H))")
    scheme: QuantScheme | None = Field(None, description="quantize the kept weights jointly (paper, section 3.5)")

    sequential: bool = Field(True, description="prune linears in forward order, each from inputs through the pruned ones before it")

    needs_calibration = True

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        if v != "unstructured" and _parse_nm(v) is None:
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4' (got {v!r})")
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern == "unstructured" else _parse_nm(self.pattern)

    @property
    def quant_scheme(self) -> QuantScheme | None:
        return self.scheme

    @property
    def sparsifies(self) -> bool:
        return True

    def process_weight(self, W: torch.Tensor, H: torch.Tensor, name: str, keep: torch.Tensor | None = None) -> WeightResult:  # noqa: ARG002
        W_pruned, mask, qw, stats = sparsegpt_prune(W, H, self.sparsity, self.nm, self.block_size, self.damp, self.scheme, name)
        return WeightResult(W_pruned, qw, stats)


def _aligned_block(block_size: int, group_size: int | None, m: int | None) -> int:
    """Blocks aligned with quantization groups (see gptq._effective_block) and holding whole N:M windows."""
    bs = _effective_block(block_size, group_size)
    if m is None or bs % m == 0:
        return bs
    bs = math.lcm(bs, m)
    if group_size is None or bs % group_size == 0 or group_size % bs == 0:
        return bs
    return math.lcm(group_size, m)


@single_threaded
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    scheme: QuantScheme | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None, dict]:
    """Prune W (out, in) given H (in, in): `sparsity` of each block's weights (unstructured), or N of
    every M consecutive inputs of each row when `nm` = (N, M). With `scheme` the kept weights are
    quantized in the same pass and pruned ones get code == zero, so they dequantize to exactly 0.

    Returns (W_pruned float32 with exact zeros — the dequantized weight under `scheme` —, mask with
    True = kept, QuantizedWeight or None, stats): `loss` is Σ (w - q)² / d² / 2 as in GPTQ, `damp`
    the damping used, `sparsity` the fraction of weights pruned (kept weights that happen to round
    to 0 on the grid are not counted)."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    rows, cols = W.shape
    if nm is not None and cols % nm[1] != 0:
        n, m = nm
        raise ValueError(f"{name}: {n}:{m} sparsity needs in_features divisible by {m} (in_features={cols})")
    if nm is None and not 0.0 < sparsity < 1.0:
        raise ValueError(f"{name}: sparsity must lie in (0, 1) (got {sparsity})")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv, damp_used = damped_cholesky_inverse(H, damp, name)

    group_size = scheme.group_size if scheme is not None else None
    bs = _aligned_block(block_size, group_size, nm[1] if nm is not None else None)
    if scheme is not None:
        width = scheme.group_width(cols)
        scale_g = torch.zeros(rows, scheme.groups(cols))
        zero_g = torch.zeros(rows, scheme.groups(cols))
        codes = torch.zeros_like(W)

    mask = torch.ones(rows, cols, dtype=torch.bool)
    losses = torch.zeros(rows)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2]  # a view: in-block updates are visible to the grid of a group starting inside it
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        M1 = torch.ones(W1.shape, dtype=torch.bool)  # True = kept
        if nm is None:  # the `sparsity` fraction of lowest saliencies over the whole block
            tmp = W1**2 / torch.diag(Hinv1).unsqueeze(0) ** 2
            k = round(tmp.numel() * sparsity)
            M1.view(-1)[tmp.flatten().topk(k, largest=False).indices] = False

        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:  # N lowest saliencies of the next M columns, per row
                n, m = nm
                tmp = W1[:, i : i + m] ** 2 / torch.diag(Hinv1)[i : i + m].unsqueeze(0) ** 2
                M1[:, i : i + m].scatter_(1, tmp.topk(n, dim=1, largest=False).indices, False)

            q = torch.where(M1[:, i], w, torch.zeros_like(w))
            if scheme is not None:
                g = col // width
                if col % width == 0:  # the group's grid, from its columns as updated so far
                    scale_g[:, g], zero_g[:, g] = grid_params(W[:, col : col + width], scheme)
                s, z = scale_g[:, g], zero_g[:, g]
                codes[:, col] = torch.where(M1[:, i], quantize_column(w, s, z, scheme.maxq), z)
                q = (codes[:, col] - z) * s

            Q1[:, i] = q
            err = (w - q) / d  # (rows,)
            losses += (w - q) ** 2 / d**2 / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        W1[:] = Q1
        mask[:, i1:i2] = M1

    qw = None
    if scheme is not None:
        qw = QuantizedWeight(codes.to(torch.uint8), scale_g, zero_g.to(torch.uint8),
                             scheme.bits, scheme.group_size, scheme.symmetric)
    stats = {"loss": float(losses.sum()), "damp": damp_used, "sparsity": 1.0 - float(mask.float().mean())}
    return W, mask, qw, stats


def magnitude_prune(
    W: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline: zero the smallest |w| — `sparsity` of the whole matrix, or N of every M consecutive
    inputs of each row. Returns (W_pruned float32, mask with True = kept)."""
    W = W.detach().float()
    rows, cols = W.shape
    if nm is None:
        mask = torch.ones(rows, cols, dtype=torch.bool)
        mask.view(-1)[W.abs().flatten().topk(round(W.numel() * sparsity), largest=False).indices] = False
    else:
        n, m = nm
        if cols % m != 0:
            raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m} (in_features={cols})")
        windows = W.abs().reshape(rows, cols // m, m)
        mask = torch.ones_like(windows, dtype=torch.bool)
        mask.scatter_(2, windows.topk(n, dim=2, largest=False).indices, False)
        mask = mask.reshape(rows, cols)
    return torch.where(mask, W, torch.zeros_like(W)), mask


def nm_mask_ok(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every aligned window of M consecutive inputs in every row holds at least N zeros
    (`mask` True = kept): the structure an N:M sparse kernel needs."""
    rows, cols = mask.shape
    if cols % m != 0:
        return False
    zeros = (~mask.bool()).reshape(rows, cols // m, m).sum(dim=2)
    return bool((zeros >= n).all())

