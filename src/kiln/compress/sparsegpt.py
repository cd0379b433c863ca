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

import numpy as np
import torch
from pydantic import Field, field_validator

from kiln.context import single_threaded
from kiln.compress.base import StageConfig, WeightResult
from kiln.compress.gptq import _effective_block, codes_np, damped_cholesky_inverse, spread_sub_block, sub_blocks
from kiln.compress.quant import QuantizedWeight, QuantScheme, grid_params


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
    # GPTQ's loop (kiln.compress.gptq._quantize_columns): on Wᵀ, per-column ops in numpy, lazy
    # updates per sub-block and per block. Sub-blocks also start where a mask window or a group
    # starts, so masks and grids are chosen from fully updated columns.
    Wt = W.t().contiguous()  # (in, out): column j of W is row j
    wt, hinv = Wt.numpy(), Hinv.numpy()
    keep = np.ones((cols, rows), dtype=bool)
    Err = np.zeros((cols, rows), dtype=np.float32)  # (w - q) / [H⁻¹]_jj per column
    if scheme is not None:
        width, maxq = scheme.group_width(cols), float(scheme.maxq)
        S = np.zeros((scheme.groups(cols), rows), np.float32)  # (G, out): a group's scales are one row
        Z = np.zeros_like(S)
        codes = np.zeros((cols, rows), dtype=np.float32)

    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, E1, H1, M1 = wt[i1:i2], Err[i1:i2], hinv[i1:i2, i1:i2], keep[i1:i2]
        d = H1.diagonal().copy()
        if nm is None:  # the `sparsity` fraction of lowest saliencies w² / d² over the whole block
            sal = torch.from_numpy(W1**2 / (d**2)[:, None])
            k = round(sal.numel() * sparsity)
            M1.reshape(-1)[sal.flatten().topk(k, largest=False).indices.numpy()] = False
        starts = set(range(0, i2 - i1, nm[1])) if nm is not None else set()
        if scheme is not None:
            starts |= {c - i1 for c in range(i1, i2) if c % width == 0}
        for j1, j2 in sub_blocks(i2 - i1, starts):
            for i in range(j1, j2):
                col = i1 + i
                if nm is not None and i % nm[1] == 0:  # N lowest saliencies of the next M columns, per row
                    n, m = nm
                    sal = W1[i : i + m] ** 2 / (d[i : i + m] ** 2)[:, None]
                    np.put_along_axis(M1[i : i + m], np.argpartition(sal, n - 1, axis=0)[:n], False, axis=0)
                w = W1[i]
                if scheme is not None:
                    g = col // width
                    if col % width == 0:  # the group's grid, from its columns as updated so far
                        S[g], Z[g] = (t.numpy() for t in grid_params(Wt[col : col + width].t(), scheme))
                    s, z = S[g], Z[g]
                    codes[col] = np.where(M1[i], codes_np(w, s, z, maxq), z)
                    q = (codes[col] - z) * s
                else:
                    q = np.where(M1[i], w, np.float32(0.0))
                e = np.subtract(w, q, out=E1[i])
                e /= d[i]
                W1[i] = q  # its final value: no later column reads it
                W1[i + 1 : j2] -= np.multiply.outer(H1[i, i + 1 : j2], e)
            spread_sub_block(W1, H1, E1, j1, j2)
        if i2 < cols:
            Wt[i2:] -= Hinv[i1:i2, i2:].t() @ torch.from_numpy(E1)

    qw = None
    if scheme is not None:
        qw = QuantizedWeight(torch.from_numpy(codes).t().to(torch.uint8), torch.from_numpy(S).t().contiguous(),
                             torch.from_numpy(Z).t().to(torch.uint8),
                             scheme.bits, scheme.group_size, scheme.symmetric)
    mask = torch.from_numpy(keep).t().contiguous()
    loss = float(torch.from_numpy(Err).pow(2).sum() / 2)  # Σ (w - q)² / d² / 2
    stats = {"loss": loss, "damp": damp_used, "sparsity": 1.0 - float(mask.float().mean())}
    return Wt.t().contiguous(), mask, qw, stats


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

