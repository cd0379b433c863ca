"""Unit tier: the W8A8 runtime (int8 weights per channel, int8 activations per token, int32 GEMM),
judged by SQNR and relative error against float references."""

import pytest
import torch

from kiln.compress import w8a8
from kiln.compress.quant import QuantScheme, rtn_quantize, sqnr_db
from kiln.compress.w8a8 import W8A8Linear, int8_matmul, quantize_per_token

W8 = QuantScheme(bits=8, group_size=None, symmetric=True)


def rel_err(ref, approx):
    return float((ref.double() - approx.double()).norm() / ref.double().norm())


def quantized_linear(out=48, inp=96, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inp, out, bias=bias)
    lin.weight.data = torch.randn(out, inp, generator=g) * 0.05
    if bias:
        lin.bias.data = torch.randn(out, generator=g) * 0.1
    q = rtn_quantize(lin.weight.data, W8)
    return lin, q


def test_quantize_per_token_round_trip_and_zero_rows():
    x = torch.randn(3, 5, 64)
    x[1, 2] = 0.0
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (3, 5, 1) and int(q.abs().max()) <= 127
    assert torch.isfinite(s).all() and bool((q[1, 2] == 0).all())
    # every row's max |x| maps to ±127; error at most half a step per element
    assert bool((q.abs().amax(dim=-1)[s.squeeze(-1) != 1] == 127).all())
    assert float(((q.float() * s - x).abs() - s / 2).max()) <= 1e-6
    assert sqnr_db(x, q.float() * s) > 35


@pytest.mark.parametrize("shape", [(1, 7, 3), (5, 33, 9), (17, 64, 24), (40, 2048, 16), (3, 1025, 5), (9, 3000, 7)])
def test_int8_matmul_is_exact(shape):
    T, k, n = shape
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-127, 128, (T, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    out = int8_matmul(x, w)
    ref = x.long() @ w.long().T
    assert out.dtype == torch.int32 and out.shape == (T, n)
    assert torch.equal(out.long(), ref)


def test_int8_matmul_is_exact_at_the_extremes():
    x = torch.full((3, 4096), 127, dtype=torch.int8)  # |sum| = 4096·127·128 ≫ 2^24: one float32 GEMM would round
    w = torch.full((2, 4096), -128, dtype=torch.int8)
    w[1, ::2] = 127
    out = int8_matmul(x, w)
    assert torch.equal(out.long(), x.long() @ w.long().T)


def test_int8_matmul_stays_exact_under_a_bfloat16_calibration_forward():
    """The engine's `compute_dtype: bfloat16` runs layers under CPU autocast, which would turn the
    exact float32 chunk products into bfloat16 ones; int8_matmul opts out of it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-127, 128, (33, 1500), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (24, 1500), dtype=torch.int8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x[:, :64].float() @ w[:, :64].float().T).dtype == torch.bfloat16  # what autocast would do
        out = int8_matmul(x, w)
    assert torch.equal(out.long(), x.long() @ w.long().T)


def test_int8_matmul_rejects_other_dtypes():
    with pytest.raises(TypeError):
        int8_matmul(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.int8))


@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_linear_matches_float_and_fake_quant(bias):
    lin, q = quantized_linear(bias=bias)
    layer = W8A8Linear.from_quantized(q.codes, q.scale, lin.bias.data if bias else None, transposed=False)
    x = torch.randn(4, 10, 96) * torch.linspace(0.2, 3.0, 96)  # uneven channels, like real activations
    y = layer(x)
    assert y.shape == (4, 10, 48) and y.dtype == x.dtype
    with torch.no_grad():
        ref = lin(x)
    assert sqnr_db(ref, y) > 30

    # fake-quant reference: quantize-dequantize both operands, multiply in float64
    xq, xs = quantize_per_token(x)
    wdq = q.dequantize().double()
    fake = (xq.double() * xs.double()) @ wdq.T
    if bias:
        fake = fake + lin.bias.data.double()
    assert rel_err(fake, y) < 1e-4


def test_w8a8_linear_from_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # weight stored (in, out)
    conv.bias.data = torch.randn(24) * 0.1
    q = rtn_quantize(conv.weight.data.T, W8)
    layer = W8A8Linear.from_quantized(q.codes.T.contiguous(), q.scale, conv.bias.data, transposed=True)
    x = torch.randn(2, 9, 40)
    with torch.no_grad():
        assert sqnr_db(conv(x), layer(x)) > 30


def test_w8a8_linear_keeps_low_precision_dtype_and_zero_input():
    lin, q = quantized_linear(bias=True)
    layer = W8A8Linear.from_quantized(q.codes, q.scale, lin.bias.data, transposed=False)
    x = torch.randn(6, 96).bfloat16()
    x[2] = 0
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert torch.allclose(y[2].float(), lin.bias.data, atol=1e-2)  # zero row → bias only


def test_from_quantized_validates():
    lin, q = quantized_linear()
    with pytest.raises(TypeError):
        W8A8Linear.from_quantized(q.codes.int(), q.scale, None)
    with pytest.raises(ValueError, match="one scale per output channel"):
        W8A8Linear.from_quantized(q.codes, q.scale[:-1], None)
    with pytest.raises(ValueError, match="zero point 128"):
        W8A8Linear.from_quantized(q.codes, q.scale, None, zero=q.zero - 1)
    W8A8Linear.from_quantized(q.codes, q.scale, None, zero=q.zero)  # the symmetric grid passes


def test_int_mm_shape_rules():
    x = torch.zeros(4, 12, dtype=torch.int8)
    w = torch.zeros(8, 12, dtype=torch.int8)
    assert w8a8._int_mm_supported(x, w) is False  # CPU: the exact float32 path is far faster
