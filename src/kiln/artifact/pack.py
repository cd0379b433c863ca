"""Dense bit packing of integer codes into int32 words, the layout of compressed-tensors'
`pack-quantized` format: along a row, element e occupies bits [e·b, e·b + b) of the row's
little-endian bit stream, 32 elements fill exactly b words, and an element may straddle two words."""

from __future__ import annotations

import math

import torch


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) of a 2-D tensor along `dim` → int32 words."""
    v = codes.to(torch.int64)
    if dim == 0:
        v = v.T
    rows, cols = v.shape
    padded = math.ceil(cols / 32) * 32
    v = torch.nn.functional.pad(v, (0, padded - cols)).reshape(rows, padded // 32, 32)
    pos = torch.arange(32, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    shifted = v << off  # (rows, G, 32), up to 39 bits
    out = torch.zeros(rows, padded // 32, bits + 1, dtype=torch.int64)
    out.scatter_add_(2, word.expand_as(shifted), shifted & 0xFFFFFFFF)
    out.scatter_add_(2, (word + 1).expand_as(shifted), shifted >> 32)
    out = out[:, :, :bits].reshape(rows, -1)[:, : math.ceil(cols * bits / 32)]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return (out.T if dim == 0 else out).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: `length` unsigned codes per row (int64)."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        p = p.T
    pos = torch.arange(length, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    p = torch.nn.functional.pad(p, (0, 1))
    val = (p[:, word] >> off) | (p[:, word + 1] << (32 - off))
    val = val & (2**bits - 1)
    return val.T.contiguous() if dim == 0 else val
