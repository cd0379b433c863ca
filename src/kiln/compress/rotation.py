"""Online Hadamard rotation of a W8A8 linear's inputs.

A linear computes x Wᵀ = (x R)(W R)ᵀ for any orthogonal R. QuaRot (Ashkboos et al.,
arXiv:2404.00456) quantizes x R instead of x: the rotation spreads each token's heavy-tailed channels
over all channels of a block, so per-token int8 loses far less of the bulk to the few largest
entries. W R is what gets quantized and stored; x R is computed at inference, before the per-token
quantization ("online").

kiln's R is block-diagonal, I ⊗ H_k, with H_k the Walsh–Hadamard matrix of order k (Sylvester's
construction, scaled by 1/√k) and k the largest power of two dividing the input width: no seed, no
data, the same R in PyTorch, in ONNX and in compressed-tensors' `hadamard` transform with
`head_dim: k`. H_k is symmetric and its own inverse, so un-rotating is rotating again. It is applied
factorized, H_k = H_a ⊗ H_b with a·b = k: two small products per block, n·(a + b) multiply-adds per
token instead of n·k.
"""

from __future__ import annotations

import functools
import math

import torch

MIN_BLOCK = 16  # below this the rotation spreads outliers over too few channels to be worth its op


def hadamard_block(in_features: int) -> int:
    """k: the largest power of two dividing the input width (the rotation's block)."""
    return in_features & -in_features


def rotation_block(rotation: str | None, in_features: int) -> int | None:
    """The block of a layer's rotation, from its recorded kind ('hadamard', or 'none'/None for an
    unrotated layer) and its input width."""
    return hadamard_block(in_features) if rotation not in (None, "none") else None


def factors(k: int) -> tuple[int, int]:
    """(a, b), powers of two with a·b = k and a ≤ b as close as they go."""
    a = 2 ** (int(math.log2(k)) // 2)
    return a, k // a


@functools.lru_cache(maxsize=64)
def sylvester(k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H_k / √k: orthonormal, symmetric, involutory (k a power of two). Cached: every rotated
    linear's forward asks for the same few; callers must not modify it."""
    if k <= 0 or k & (k - 1):
        raise ValueError(f"a Walsh–Hadamard matrix needs a power-of-two order, got {k}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < k:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / math.sqrt(k)).to(dtype)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x R along the last dimension, R = I ⊗ H_block: each block of `block` consecutive channels,
    viewed as an a × b matrix X, becomes H_a X H_b (= the block times H_a ⊗ H_b)."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"rotate: width {n} is not a multiple of the block {block}")
    a, b = factors(block)
    Ha, Hb = sylvester(a, x.dtype).to(x.device), sylvester(b, x.dtype).to(x.device)
    X = x.reshape(*x.shape[:-1], n // block, a, b)
    return (Ha @ (X @ Hb)).reshape(x.shape)


def rotate_hessian(H: torch.Tensor, block: int) -> torch.Tensor:
    """Rᵀ H R: the Hessian of the rotated inputs x R, from that of x (H = Σ xᵀx, symmetric)."""
    return rotate(rotate(H, block).T.contiguous(), block)
