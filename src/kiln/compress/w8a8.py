"""W8A8 runtime for evaluating SmoothQuant models in PyTorch with real int8 activations.

SmoothQuant (Xiao et al., arXiv:2211.10438) targets W8A8: int8 weights, per output channel, and
int8 activations, here per token and dynamic (the paper's O3 "per-token dynamic" setting). The layer
computes Y = diag(Δ_X) (X̄ W̄ᵀ) diag(Δ_W) + b, with X̄, W̄ the int8 codes, the product accumulated in
int32 exactly as an int8 GEMM would, so what is evaluated is what an int8 kernel would produce.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from kiln.compress.rotation import rotate

QMAX = 127  # symmetric int8: codes in [-127, 127] for activations
W_ZERO = 128  # kiln's 8-bit symmetric weight grid: uint8 code − 128 is the signed value


def token_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token's codes as float32 integers in [-127, 127], the form the exact float32
    product below consumes (the int8 round trip would change no value)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.div(xf, scale).round_().clamp_(-QMAX, QMAX), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: x ≈ x_int8 · scale with scale = max_j |x_j| / 127 per row.

    x: (..., in). Returns (x_int8 (..., in), scale (..., 1) float32). All-zero rows get scale 1
    (their codes are 0), so no division by zero and no NaN."""
    codes, scale = token_codes(x)
    return codes.to(torch.int8), scale


def _int_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """cuBLAS int8 GEMM (aten _int_mm_out_cuda): rows > 16, inner and output dims multiples of 8.
    Not used on CPU: torch 2.13's CPU _int_mm is a plain loop, ~70× slower than the exact float32
    path below on a 2048×576·576×1536 product (AMD EPYC, AVX2, no VNNI kernel)."""
    if not hasattr(torch, "_int_mm") or x.device != w.device or x.device.type != "cuda":
        return False
    return x.shape[0] > 16 and x.shape[1] % 8 == 0 and w.shape[0] % 8 == 0


EXACT_FP32_CHUNK = 1024  # 1024 · 128 · 128 = 2²⁴: every partial sum of a chunk is an exact float32 integer


def int8_matmul(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """x_int8 (T, in) · w_int8 (out, in)ᵀ accumulated in int32 → (T, out) int32, bit-exact.

    On CUDA, torch._int_mm where it accepts the shapes. Elsewhere the product runs as float32 GEMMs
    over chunks of ≤ 1024 input channels: each term is at most 128·128 = 2¹⁴ in magnitude, so every
    partial sum inside a chunk is an integer of magnitude ≤ 2²⁴, which float32 holds exactly (the
    order MKL sums in does not matter); the chunks' int32 results are then added exactly. The int32
    result cannot overflow while in ≤ 2³¹/2¹⁴ = 131072."""
    if x_int8.dtype != torch.int8 or w_int8.dtype != torch.int8:
        raise TypeError(f"int8_matmul expects int8 operands, got {x_int8.dtype} and {w_int8.dtype}")
    if x_int8.dim() != 2 or w_int8.dim() != 2 or x_int8.shape[1] != w_int8.shape[1]:
        raise ValueError(f"int8_matmul: shapes {tuple(x_int8.shape)} and {tuple(w_int8.shape)} "
                         "do not match as (T, in), (out, in)")
    if _int_mm_supported(x_int8, w_int8):
        try:
            return torch._int_mm(x_int8.contiguous(), w_int8.t())
        except (RuntimeError, NotImplementedError):
            pass  # a build without the kernel for this shape: the exact float32 path below
    return exact_product(x_int8.float(), w_int8).to(torch.int32)


def exact_product(codes: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """codes (T, in), float32 integers in [-128, 127], times w_int8 (out, in)ᵀ: the int32 sum as
    float32, the value `int8_matmul(...).float()` gives. A single chunk's float32 product is that
    integer already (no int32 round trip); more chunks are added in int32."""
    with torch.autocast("cpu", enabled=False):  # a bfloat16 calibration forward must not round these sums
        if codes.shape[1] <= EXACT_FP32_CHUNK:
            return codes @ w_int8.float().t()
        out = None
        for k in range(0, codes.shape[1], EXACT_FP32_CHUNK):
            part = (codes[:, k : k + EXACT_FP32_CHUNK] @ w_int8[:, k : k + EXACT_FP32_CHUNK].float().t()).to(torch.int32)
            out = part if out is None else out.add_(part)
        return out.float()


class _SharedCodes(threading.local):
    """The last input's per-token codes (rotated first where the layer rotates), so that linears
    reading one tensor (q/k/v, gate/up) quantize it once. A hit needs the very tensor object, not
    written to since (its version counter), and the same rotation; the entry goes with the tensor."""

    def __init__(self):
        self.ref, self.key, self.value = None, None, None

    def get(self, x: torch.Tensor, rotation: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_inference():  # no version counter: nothing proves it unchanged
            return _codes(x, rotation)
        key = (x._version, rotation)
        if self.ref is not None and self.ref() is x and self.key == key:
            return self.value
        self.value = _codes(x, rotation)
        self.ref, self.key = weakref.ref(x, self._drop), key
        return self.value

    def _drop(self, ref) -> None:
        if ref is self.ref:
            self.ref, self.key, self.value = None, None, None


def _codes(x: torch.Tensor, rotation: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.reshape(-1, x.shape[-1])
    if rotation:
        with torch.autocast("cpu", enabled=False):  # x R in float32, as the exported graph computes it
            x = rotate(x.float(), rotation)
    return token_codes(x)


_shared = _SharedCodes()


class W8A8Linear(nn.Module):
    """A linear with int8 per-channel weights and dynamic per-token int8 activations."""

    def __init__(self, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, rotation: int | None = None):
        super().__init__()
        self.out_features, self.in_features = w_int8.shape
        self.rotation = rotation  # Hadamard block: the codes are W R's, inputs become x R before quantizing
        self.register_buffer("weight", w_int8.to(torch.int8).contiguous())  # (out, in)
        self.register_buffer("w_scale", w_scale.reshape(-1).float().contiguous())  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1).float().clone())

    @classmethod
    def from_quantized(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        transposed: bool = False,
        zero: torch.Tensor | None = None,
        rotation: int | None = None,
    ) -> W8A8Linear:
        """From kiln's 8-bit symmetric per-channel codes: uint8 in [0, 255] with zero 128, so
        w = (code − 128) · scale. `codes` are (out, in), or the module's stored layout (in, out) when
        `transposed` (GPT-2's Conv1D; kiln's QuantizedWeight codes are already (out, in), so pass
        False for those); `scale` is (out, 1) (or (out,)); `bias` (out,) or None. `zero`, if given
        (QuantizedWeight.zero), is checked to be 128 everywhere: an asymmetric grid is refused."""
        if codes.dtype != torch.uint8:
            raise TypeError(f"W8A8Linear.from_quantized expects uint8 codes, got {codes.dtype}")
        if zero is not None and not bool((zero.to(torch.int16) == W_ZERO).all()):
            raise ValueError("W8A8Linear needs the symmetric 8-bit grid (zero point 128 everywhere)")
        if transposed:
            codes = codes.t()
        out = codes.shape[0]
        if scale.numel() != out:
            raise ValueError(f"W8A8Linear needs one scale per output channel ({out}), got shape {tuple(scale.shape)}")
        if bias is not None and bias.numel() != out:
            raise ValueError(f"W8A8Linear: bias has {bias.numel()} entries for {out} output channels")
        w_int8 = (codes.to(torch.int16) - W_ZERO).to(torch.int8)
        return cls(w_int8, scale, bias, rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        codes, xs = _shared.get(x, self.rotation)
        if _int_mm_supported(codes, self.weight):
            y = int8_matmul(codes.to(torch.int8), self.weight).float()
        else:
            y = exact_product(codes, self.weight)
        y = y.mul_(xs).mul_(self.w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(dtype)

    def extra_repr(self) -> str:
        rot = f", rotation=hadamard{self.rotation}" if self.rotation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{rot}"
