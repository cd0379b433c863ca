"""Our quantized weights as ONNX Runtime kernels consume them, bit for bit: no re-quantization.

MatMulNBits (com.microsoft) holds B as (N, n_blocks, block_size·bits/8) bytes, consecutive codes
packed low bits first, one float scale per (row, block) and, for an asymmetric grid, packed uint8
zero points; without zero points it uses 2^(bits-1), exactly kiln's symmetric grid. Its block must be
a power of two ≥ 16, so a kiln group (or a whole row) is written as several blocks that repeat the
group's scale and zero: same dequantized values, a few more scale bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kiln.errors import RecipeError

MIN_BLOCK, MAX_BLOCK = 16, 256


def block_size_for(group_size: int | None, in_features: int, max_block: int = MAX_BLOCK) -> int | None:
    """The MatMulNBits block that tiles kiln's groups exactly (largest power of two ≤ max_block
    dividing the group), or None when no block ≥ 16 does. Per-channel grids take min(128, max_block)."""
    if group_size is None:
        return min(128, max_block)
    b = group_size & -group_size  # largest power of two dividing it
    b = min(b, max_block)
    return b if b >= MIN_BLOCK else None


def nbits_problem(module: str, group_size: int | None, in_features: int) -> str | None:
    if block_size_for(group_size, in_features) is None:
        return (f"{module}: group_size {group_size} cannot be written as MatMulNBits blocks (a power of two ≥ 16 "
                f"must divide the group); use a group size divisible by 16")
    return None


@dataclass
class NBitsWeight:
    """The initializers and attributes of one MatMulNBits node."""

    B: np.ndarray  # (N, n_blocks, blob) uint8
    scales: np.ndarray  # (N * n_blocks,) float
    zero_points: np.ndarray | None  # (N * ceil(n_blocks·bits/8),) uint8, or None for the symmetric default
    K: int
    N: int
    bits: int
    block_size: int


def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 codes (< 2^bits) low bits first: 8/bits codes per byte."""
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out


def to_matmul_nbits(codes, scale, zero, bits: int, group_size: int | None, symmetric: bool,
                    scale_dtype=np.float32, module: str = "?", max_block: int = MAX_BLOCK) -> NBitsWeight:
    """kiln codes (N, K) uint8, scale and zero (N, G) → MatMulNBits tensors.

    w[n, k] = (codes[n, k] − zero[n, g(k)]) · scale[n, g(k)], the same formula ORT evaluates per block."""
    if bits not in (2, 4, 8):
        raise RecipeError(f"{module}: MatMulNBits stores 2, 4 or 8 bits; this layer has {bits}",
                          hint="use bits 4 or 8 for layers you compile to ONNX")
    codes = np.asarray(codes, dtype=np.uint8)
    scale = np.asarray(scale, dtype=np.float32)
    zero = np.asarray(zero, dtype=np.uint8)
    N, K = codes.shape
    block = block_size_for(group_size, K, max_block)
    if block is None:
        raise RecipeError(nbits_problem(module, group_size, K))
    n_blocks = math.ceil(K / block)
    padded = n_blocks * block
    # the group of each block's first column: blocks never straddle a group
    width = K if group_size is None else group_size
    block_group = (np.arange(n_blocks) * block) // width
    block_group = np.minimum(block_group, scale.shape[1] - 1)
    zeros_per_block = zero[:, block_group]  # (N, n_blocks)
    pad = np.repeat(zeros_per_block[:, -1:], padded - K, axis=1)  # padding decodes to exactly 0
    full = np.concatenate([codes, pad], axis=1).reshape(N, n_blocks, block)
    B = _pack_bits(full, bits)
    scales = scale[:, block_group].astype(scale_dtype).reshape(-1)
    zp = None
    if not symmetric:
        if bits == 8:
            zp = zeros_per_block.reshape(-1)
        else:
            per = 8 // bits
            zb = np.concatenate([zeros_per_block, np.zeros((N, (-n_blocks) % per), np.uint8)], axis=1)
            zp = _pack_bits(zb, bits).reshape(-1)
    elif not bool((zero == 2 ** (bits - 1)).all()):
        raise RecipeError(f"{module}: symmetric grid with a zero point other than {2 ** (bits - 1)}")
    return NBitsWeight(B, scales, zp, K, N, bits, block)


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """The (N, K) float weight ORT reconstructs from the packed tensors (reference for tests)."""
    per = 8 // w.bits
    n_blocks = w.B.shape[1]
    codes = np.zeros((w.N, n_blocks, w.block_size), dtype=np.float32)
    flat = w.B.reshape(w.N, n_blocks, -1)
    for i in range(per):
        codes[..., i::per] = (flat >> (w.bits * i)) & (2**w.bits - 1)
    if w.zero_points is None:
        z = np.full((w.N, n_blocks), 2 ** (w.bits - 1), np.float32)
    elif w.bits == 8:
        z = w.zero_points.reshape(w.N, n_blocks).astype(np.float32)
    else:
        zb = w.zero_points.reshape(w.N, -1)
        z = np.zeros((w.N, zb.shape[1] * per), np.float32)
        for i in range(per):
            z[:, i::per] = (zb >> (w.bits * i)) & (2**w.bits - 1)
        z = z[:, :n_blocks]
    s = w.scales.reshape(w.N, n_blocks).astype(np.float32)
    W = (codes - z[..., None]) * s[..., None]
    return W.reshape(w.N, -1)[:, : w.K]


def concat_nbits(parts: list[NBitsWeight]) -> NBitsWeight:
    """Stack several weights with the same K, bits and block along N (Q, K, V → one QKV product)."""
    a = parts[0]
    if any(p.K != a.K or p.bits != a.bits or p.block_size != a.block_size or (p.zero_points is None) != (a.zero_points is None)
           for p in parts):
        raise ValueError("concat_nbits: parts differ in K, bits, block or zero points")
    zp = None if a.zero_points is None else np.concatenate([p.zero_points for p in parts])
    return NBitsWeight(np.concatenate([p.B for p in parts]), np.concatenate([p.scales for p in parts]), zp,
                       a.K, sum(p.N for p in parts), a.bits, a.block_size)
