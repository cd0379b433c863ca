"""Output formats: what each can store (checked at plan time) and how our codes become its tensors.

`compressed-tensors`: the pack-quantized layout vLLM and transformers load. nn.Linear only, and the
group size must divide in_features (compressed-tensors reshapes weights into whole groups).
`kiln`: the same packed tensors, but for any linear module (GPT-2's Conv1D is stored in (out, in)
orientation with a flag) and with a shorter last group allowed, as ONNX Runtime's MatMulNBits pads
K to the block size. Read back by `kiln.artifact.load_model`.
"""

from __future__ import annotations

import torch

from kiln.artifact.pack import pack_int32
from kiln.compress.quant import QuantizedWeight
from kiln.recipe import OutputFormat


def divisor_group_sizes(in_features: int) -> list[int]:
    return [g for g in (16, 32, 64, 96, 128, 192, 256, 384, 512) if in_features % g == 0]


def format_problems(fmt: OutputFormat, module: str, in_features: int, group_size: int | None, transposed: bool) -> list[str]:
    """Why `fmt` cannot store this module's grid (empty list: it can)."""
    problems = []
    if fmt is OutputFormat.compressed_tensors:
        if transposed:
            problems.append(
                f"{module} is a transformers Conv1D (weights stored (in, out)); compressed-tensors quantizes "
                "nn.Linear only — use output.format: kiln"
            )
        if group_size is not None and in_features % group_size:
            ok = ", ".join(map(str, divisor_group_sizes(in_features))) or "per-channel (group_size: null)"
            problems.append(
                f"group_size {group_size} does not divide in_features={in_features} of {module}; "
                f"compressed-tensors needs whole groups: use one of {ok}, or output.format: kiln (allows a shorter last group)"
            )
    return problems


def packed_tensors(prefix: str, q: QuantizedWeight, symmetric: bool, dtype: torch.dtype, int8: bool = False) -> dict[str, torch.Tensor]:
    """Our codes (unsigned, zero = 2^(b-1) when symmetric) → compressed-tensors' names and packing.
    CT stores signed codes offset by 2^(b-1) before packing, which is exactly our unsigned code.
    `int8` (W8A8, CT's int-quantized format): the signed int8 codes themselves, unpacked."""
    if int8:
        return {f"{prefix}.weight": (q.codes.to(torch.int16) - 128).to(torch.int8),
                f"{prefix}.weight_scale": q.scale.to(dtype).contiguous()}
    out = {
        f"{prefix}.weight_packed": pack_int32(q.codes, q.bits, dim=1),
        f"{prefix}.weight_scale": q.scale.to(dtype).contiguous(),
        f"{prefix}.weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64),
    }
    if not symmetric:
        out[f"{prefix}.weight_zero_point"] = pack_int32(q.zero, q.bits, dim=0)
    return out
