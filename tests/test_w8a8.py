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


def _w8a8(out, inp, seed, rotation=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g)
    return W8A8Linear(w, torch.rand(out, generator=g) * 0.01, torch.randn(out, generator=g), rotation)


@pytest.mark.parametrize("inp,rotation", [(96, None), (1536, None), (640, 128)])
def test_w8a8_forward_is_the_int32_product_scaled(inp, rotation):
    """The forward skips the int8 and int32 round trips on CPU; its values stay those of
    int8_matmul's exact int32 sum times both scales (1536 inputs: two chunks)."""
    from kiln.compress.rotation import rotate

    layer = _w8a8(24, inp, inp, rotation)
    x = torch.randn(3, 11, inp) * torch.linspace(0.1, 4.0, inp)
    xr = rotate(x.reshape(-1, inp), rotation) if rotation else x.reshape(-1, inp)
    xq, xs = quantize_per_token(xr)
    ref = int8_matmul(xq, layer.weight).float() * xs * layer.w_scale + layer.bias
    assert torch.equal(layer(x), ref.reshape(3, 11, 24))


def test_linears_reading_one_tensor_quantize_it_once(monkeypatch):
    """q/k/v (or gate/up) get the very same tensor: its codes are computed once. A write to it in
    between, or a new tensor, is quantized afresh, and every output equals a layer's own result."""
    calls = []
    real = w8a8.token_codes
    monkeypatch.setattr(w8a8, "token_codes", lambda x: calls.append(1) or real(x))
    q, k, r = _w8a8(16, 64, 1), _w8a8(8, 64, 2), _w8a8(8, 64, 3, rotation=32)
    x = torch.randn(2, 5, 64)
    alone = [m(x.clone()) for m in (q, k, r)]
    calls.clear()
    shared = [m(x) for m in (q, k, r)]  # r rotates: a different key
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(alone, shared))
    x.mul_(2)  # same object, new version
    assert torch.equal(k(x), k(x.clone())) and len(calls) == 4
    y = torch.randn(2, 5, 64)
    assert torch.equal(q(y), q(y.clone()))

# --- online Hadamard rotation -------------------------------------------------------------------


@pytest.mark.parametrize("width,block", [(640, 128), (576, 64), (2048, 2048), (1536, 512), (96, 32)])
def test_rotate_is_the_block_hadamard_matrix(width, block):
    """The factorized rotation equals x (I ⊗ H_block) with H the scaled Sylvester matrix, keeps norms
    (orthogonal), and undoes itself (H symmetric and orthogonal: R R = I)."""
    from kiln.compress.rotation import hadamard_block, rotate, rotate_hessian, sylvester

    assert hadamard_block(width) == block
    H = sylvester(block, torch.float64)
    assert torch.allclose(H @ H, torch.eye(block, dtype=torch.float64), atol=1e-12)
    R = torch.kron(torch.eye(width // block, dtype=torch.float64), H)
    x = torch.randn(3, 5, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    assert torch.allclose(rotate(x, block), x @ R, atol=1e-10)
    assert torch.allclose(rotate(rotate(x, block), block), x, atol=1e-10)
    assert torch.allclose(rotate(x, block).norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    X = x.reshape(-1, width)
    assert torch.allclose(rotate_hessian(X.T @ X, block), (X @ R).T @ (X @ R), atol=1e-9)


def test_rotate_matches_compressed_tensors_hadamard_transform():
    """The artifact's transform_config says `hadamard` with head_dim k: compressed-tensors' own
    transform must compute the same x R as kiln."""
    from compressed_tensors.transform import HadamardFactory, TransformArgs, TransformScheme

    from kiln.compress.rotation import rotate

    scheme = TransformScheme(type="hadamard", head_dim=128, apply=[TransformArgs(targets=["Linear"], location="input")])
    transform = HadamardFactory("h", scheme).create_transform(torch.nn.Linear(640, 8), scheme.apply[0])
    x = torch.randn(4, 640, generator=torch.Generator().manual_seed(1))
    assert rel_err(rotate(x, 128), transform(x)) < 1e-5


def test_rotated_w8a8_linear_computes_x_w_and_beats_unrotated_on_outlier_tokens():
    """With codes of W R and inputs rotated before the per-token int8, the layer still computes x Wᵀ;
    on tokens whose energy sits in a few channels (what per-token int8 handles worst) the rotation
    must cut the error, not just keep it."""
    from kiln.compress.rotation import rotate

    lin, q = quantized_linear(out=48, inp=128, bias=True, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 16, 128, generator=g) * 0.1
    x[..., [5, 77]] *= 400.0  # two outlier channels, ~100× the rest as in LLM activations
    plain = W8A8Linear.from_quantized(q.codes, q.scale, lin.bias.data)
    qr = rtn_quantize(rotate(lin.weight.data, 128), W8)
    rotated = W8A8Linear.from_quantized(qr.codes, qr.scale, lin.bias.data, rotation=128)
    assert "rotation=hadamard128" in repr(rotated)
    with torch.no_grad():
        ref = lin(x)
    err_plain, err_rot = rel_err(ref, plain(x)), rel_err(ref, rotated(x))
    assert err_rot < 0.5 * err_plain, (err_plain, err_rot)
    assert sqnr_db(ref, rotated(x)) > 30


def test_rotation_block_too_small_is_a_plan_problem():
    from kiln.compress.gptq import GPTQConfig
    from kiln.pipeline import _shape_problems

    stage = GPTQConfig(scheme=W8, activations={"bits": 8, "rotation": "hadamard"})
    problems = _shape_problems(stage, ["a.proj", "b.proj"], {"a.proj": {"in_features": 72}, "b.proj": {"in_features": 96}})
    assert len(problems) == 1 and problems[0].startswith("a.proj:") and "8 for its 72" in problems[0]


def test_artifact_refuses_transforms_kiln_does_not_write():
    """kiln reads back its own plain-hadamard input rotations; a randomized or weight-side transform,
    or one naming a layer no quantization group has, is an ArtifactError, not a silent misread."""
    from kiln.artifact import _ct_modules
    from kiln.errors import ArtifactError

    group = {"weights": {"num_bits": 8, "symmetric": True, "strategy": "channel"}, "targets": ["m.down_proj"],
             "input_activations": {"num_bits": 8}}

    def cfg(scheme):
        return {"quantization_config": {"config_groups": {"g": group}, "transform_config": {"config_groups": {"t": scheme}}}}

    ok = {"type": "hadamard", "head_dim": 128, "apply": [{"targets": ["m.down_proj"], "location": "input"}]}
    assert _ct_modules(cfg(ok))["m.down_proj"]["rotation"] == "hadamard"
    for bad, needle in [({**ok, "type": "random-hadamard"}, "random-hadamard transform"),
                        ({**ok, "randomize": True}, "not one kiln writes"),
                        ({**ok, "apply": [{"targets": ["m.down_proj"], "location": "weight_input"}]}, "at weight_input"),
                        ({**ok, "apply": [{"targets": ["m.up_proj"], "location": "input"}]}, "m.up_proj")]:
        with pytest.raises(ArtifactError, match=needle):
            _ct_modules(cfg(bad))
