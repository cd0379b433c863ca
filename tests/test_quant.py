"""Unit tier: the quantization math on tiny tensors, judged by loss bounds and SQNR, never exact floats."""

import pytest
import torch

from kiln.compress.gptq import HessianNotPositiveDefinite, damped_cholesky_inverse, gptq_quantize
from kiln.compress.hessian import HessianAccumulator, HessianHooks
from kiln.compress.quant import QuantScheme, dequantize, reconstruction_error, rtn_quantize, sqnr_db


def correlated_problem(out=48, inp=96, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) * 0.3 + torch.eye(inp)
    X = torch.randn(tokens, inp, generator=g) @ mix  # correlated inputs, as in real layers
    return W, 2 * X.T @ X / tokens


SCHEMES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=3, group_size=None, symmetric=False),
    QuantScheme(bits=8, group_size=None, symmetric=True),
    QuantScheme(bits=2, group_size=16, symmetric=False),
    QuantScheme(bits=4, group_size=40, symmetric=True),  # 96 = 2×40 + 16: a shorter last group
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_rtn_codes_lie_on_the_grid(scheme):
    W, _ = correlated_problem()
    q = rtn_quantize(W, scheme)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= scheme.maxq
    assert q.scale.shape == (W.shape[0], scheme.groups(W.shape[1]))
    if scheme.symmetric:
        assert bool((q.zero == 2 ** (scheme.bits - 1)).all())
    # each extra bit buys ~6 dB; 2-bit still keeps the sign of most weights
    assert sqnr_db(W, q.dequantize()) > 6.0 * scheme.bits - 8


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_ranges(bits):
    """balanced: scale = max|w| / (2^(b-1) - 1), ±max|w| on codes 1 and 2^b - 1 exactly.
    full: scale = max|w| / (2^(b-1) - 1/2), ±max|w| half a step outside the last codes, so the
    extreme rounds to code 0 (−2^(b−1)) or the top code."""
    half = 2 ** (bits - 1)
    W = torch.tensor([[-3.0, 1.0, 0.5, -0.25], [3.0, -1.0, 0.5, -0.25]])
    bal = rtn_quantize(W, QuantScheme(bits=bits, group_size=None, symmetric=True))
    assert torch.allclose(bal.scale[:, 0], torch.full((2,), 3.0 / (half - 1)))
    assert int(bal.codes[0, 0]) == 1 and int(bal.codes[1, 0]) == 2 * half - 1
    assert torch.allclose(bal.dequantize()[:, 0], torch.tensor([-3.0, 3.0]))

    full = rtn_quantize(W, QuantScheme(bits=bits, group_size=None, symmetric=True, symmetric_range="full"))
    s = 3.0 / (half - 0.5)
    assert torch.allclose(full.scale[:, 0], torch.full((2,), s))
    assert int(full.codes[0, 0]) == 0 and int(full.codes[1, 0]) == 2 * half - 1
    assert torch.allclose(full.dequantize()[:, 0], torch.tensor([-half * s, (half - 1) * s]))
    # 2^b levels beat 2^b − 1 for round-to-nearest of Gaussian weights
    G = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    err = lambda r: sqnr_db(G, rtn_quantize(G, QuantScheme(bits=4, group_size=64, symmetric_range=r)).dequantize())
    assert err("full") > err("balanced") + 0.2


def test_symmetric_range_on_an_asymmetric_grid_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="symmetric_range: full applies to symmetric grids only"):
        QuantScheme(bits=4, group_size=64, symmetric=False, symmetric_range="full")
    assert QuantScheme(symmetric=False, symmetric_range="balanced").symmetric_range == "balanced"  # a no-op, as dumped


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_gptq_reconstruction_loss_below_rtn(scheme, act_order):
    W, H = correlated_problem()
    rtn = rtn_quantize(W, scheme).dequantize()
    q, stats = gptq_quantize(W, H, scheme, block_size=32, act_order=act_order)
    err_rtn = reconstruction_error(W, rtn, H)
    err_gptq = reconstruction_error(W, q.dequantize(), H)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    assert stats["loss"] > 0 and stats["damp"] == pytest.approx(0.01)


def test_gptq_on_a_linear_layer_reduces_output_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 12, bias=False)
    X = torch.randn(256, 32) @ (torch.randn(32, 32) * 0.5 + torch.eye(32))
    acc = HessianAccumulator(32)
    acc.add(X[:100])
    acc.add(X[100:])
    H = acc.result()
    assert torch.allclose(H, 2 * X.T @ X / 256, rtol=1e-4, atol=1e-4)
    scheme = QuantScheme(bits=3, group_size=16)
    q, _ = gptq_quantize(lin.weight.data, H, scheme)
    y = X @ lin.weight.data.T
    err_gptq = (X @ q.dequantize().T - y).pow(2).mean()
    err_rtn = (X @ rtn_quantize(lin.weight.data, scheme).dequantize().T - y).pow(2).mean()
    assert err_gptq < err_rtn


def test_act_order_keeps_static_groups():
    """With act-order the grid of each group is fixed up front from the original columns, so the
    stored (scale, zero) are those of RTN and no g_idx is needed at inference."""
    W, H = correlated_problem()
    scheme = QuantScheme(bits=4, group_size=32)
    q, _ = gptq_quantize(W, H, scheme, act_order=True)
    r = rtn_quantize(W, scheme)
    assert torch.allclose(q.scale, r.scale) and torch.equal(q.zero, r.zero)


def test_dead_columns_are_zeroed():
    W, H = correlated_problem()
    H[5, :] = 0
    H[:, 5] = 0
    q, _ = gptq_quantize(W, H, QuantScheme(bits=4, group_size=32))
    assert float(q.dequantize()[:, 5].abs().max()) == 0.0


def test_singular_hessian_is_rescued_by_damping():
    W, _ = correlated_problem(tokens=16)  # 16 tokens, 96 columns: H has rank 16
    X = torch.randn(16, 96)
    H = 2 * X.T @ X / 16
    U, damp = damped_cholesky_inverse(H, 1e-12, "l")
    assert torch.isfinite(U).all() and damp >= 1e-12


def test_damped_factor_is_the_upper_cholesky_factor_of_the_inverse():
    X = torch.randn(256, 48, dtype=torch.float64) * torch.linspace(0.1, 3.0, 48, dtype=torch.float64)
    H = (2 * X.T @ X / 256).float()
    U, damp = damped_cholesky_inverse(H, 0.01, "l")
    Hd = H.double() + damp * float(torch.diag(H).mean()) * torch.eye(48, dtype=torch.float64)
    assert torch.equal(U, U.triu())
    assert torch.allclose(U.double().T @ U.double(), torch.linalg.inv(Hd), rtol=1e-4, atol=1e-6)
    assert torch.allclose(U.double(), torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n,block", [(300, 128), (256, 64), (40, 256)])
def test_triangular_inverse_by_column_blocks_is_the_inverse(n, block):
    from kiln.compress.gptq import lower_triangular_inverse_

    X = torch.randn(2 * n, n, dtype=torch.float64)
    M = torch.linalg.cholesky(X.T @ X / n + 0.1 * torch.eye(n, dtype=torch.float64))
    Minv = lower_triangular_inverse_(M.clone(), block)
    assert torch.equal(Minv, Minv.tril())
    assert torch.allclose(Minv, torch.linalg.solve_triangular(M, torch.eye(n, dtype=torch.float64), upper=False), rtol=1e-10, atol=1e-12)


def test_non_finite_hessian_names_the_layer():
    H = torch.eye(8)
    H[0, 0] = float("nan")
    with pytest.raises(HessianNotPositiveDefinite, match="model.layers.3.mlp.down_proj"):
        damped_cholesky_inverse(H, 0.01, "model.layers.3.mlp.down_proj")


def test_dequantize_uses_each_columns_group():
    codes = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.uint8)
    scale = torch.tensor([[1.0, 10.0, 100.0]])
    zero = torch.tensor([[1, 1, 1]], dtype=torch.uint8)
    out = dequantize(codes, scale, zero, group_size=2)
    assert out.tolist() == [[-1.0, 0.0, 10.0, 20.0, 300.0]]


def test_shared_inputs_share_one_hessian():
    torch.manual_seed(0)
    q, k, down = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4), torch.nn.Linear(4, 8)
    hooks = HessianHooks({"q": q, "k": k, "down": down}, {"q": 8, "k": 8, "down": 4})
    xs = []
    for _ in range(3):
        hooks.next_batch()
        xs.append(torch.randn(5, 8))
        q(xs[-1]), k(xs[-1]), down(torch.randn(5, 4))
    hooks.remove()
    assert hooks.owner["k"] == "q" and hooks.acc.keys() == {"q", "down"}
    X = torch.cat(xs).double()
    assert torch.allclose(hooks.hessian("k").double(), 2 * X.T @ X / 15, rtol=1e-5, atol=1e-6)
    assert torch.equal(hooks.hessian("k"), hooks.hessian("q"))
    assert hooks.hessian("down").shape == (4, 4)


@pytest.mark.parametrize("width", [8, 130, 300])
def test_hessian_from_its_upper_blocks_is_the_full_product(width):
    """Only H's block upper triangle is accumulated (blocks of 128 inputs); the result must be the
    whole symmetric 2/n Σ x xᵀ for widths below, at and past a block."""
    from kiln.compress.hessian import HessianAccumulator

    torch.manual_seed(0)
    acc, xs = HessianAccumulator(width), [torch.randn(37, width) * torch.rand(width) * 4 for _ in range(3)]
    for x in xs:
        acc.add(x)
    X = torch.cat(xs).double()
    H = acc.result()
    assert torch.equal(H, H.T)
    assert torch.allclose(H.double(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_lowers_rounding_error(symmetric):
    """Heavy-tailed weights: shrinking the range trades clipped outliers for finer steps."""
    torch.manual_seed(0)
    W = torch.distributions.StudentT(3.0).sample((64, 256))
    base = QuantScheme(bits=3, group_size=64, symmetric=symmetric)
    mse = QuantScheme(bits=3, group_size=64, symmetric=symmetric, observer="mse")
    err = lambda s: float((W - rtn_quantize(W, s).dequantize()).pow(2).sum())
    assert err(mse) < 0.9 * err(base)
    assert mse.label().endswith("-mse") and not base.label().endswith("-mse")


@pytest.mark.parametrize("act_order,group_size", [(True, 16), (False, 16), (True, None)])
def test_gptq_on_linears_sharing_h_is_gptq_on_each(act_order, group_size):
    """q/k/v (and gate/up) share H, so GPTQ runs them as one stacked matrix; each linear's codes,
    grid and loss must be those it gets on its own."""
    from kiln.compress.gptq import GPTQConfig

    torch.manual_seed(0)
    X = torch.randn(256, 64) * torch.rand(64) * 3
    H = 2 * X.T @ X / 256
    Ws = [torch.randn(rows, 64) for rows in (32, 16, 16)]
    cfg = GPTQConfig(scheme={"bits": 4, "group_size": group_size}, act_order=act_order, block_size=32)
    joint = cfg.process_weights(Ws, H, ["q", "k", "v"], [None, None, None])
    for W, name, j in zip(Ws, ["q", "k", "v"], joint):
        alone = cfg.process_weight(W, H, name)
        agree = (j.quantized.codes == alone.quantized.codes).float().mean()
        assert agree >= 0.999, name
        assert torch.allclose(j.quantized.scale, alone.quantized.scale)
        assert j.stats["loss"] == pytest.approx(alone.stats["loss"], rel=1e-3)
        assert set(j.stats) == {"loss", "damp"}


def _textbook_columns(W, U, scheme, keep=None):
    """The paper's column loop with no lazy batches, float64: each column's error updates every later
    column at once. U is the upper Cholesky factor of H⁻¹ in W's column order."""
    from kiln.compress.quant import grid_params, quantize_column

    W, U = W.double().clone(), U.double()
    width = scheme.group_width(W.shape[1])
    codes = torch.zeros_like(W)
    loss = 0.0
    for j in range(W.shape[1]):
        if j % width == 0:
            s, z = (t.double() for t in grid_params(W[:, j : j + width].float(), scheme))
        q = quantize_column(W[:, j], s, z, scheme.maxq)
        if keep is not None:
            q = torch.where(keep[:, j], q, z)
        codes[:, j] = q
        err = (W[:, j] - (q - z) * s) / U[j, j]
        loss += float(err.pow(2).sum()) / 2
        W[:, j:] -= torch.outer(err, U[j, j:])
    return codes, loss


@pytest.mark.parametrize("group_size", [16, 12, None])  # 12: group starts that split the 16-column sub-blocks
@pytest.mark.parametrize("pruned", [False, True])
def test_gptq_blocked_column_loop_is_the_textbook_loop(group_size, pruned):
    """Lazy updates per block and per sub-block, numpy for the per-column ops: the same codes and
    loss as the unblocked float64 loop."""
    W, H = correlated_problem(out=40, inp=96)
    scheme = QuantScheme(bits=4, group_size=group_size, symmetric=False)
    keep = (torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5) if pruned else None
    U, _ = damped_cholesky_inverse(H, 0.01)
    ref_codes, ref_loss = _textbook_columns(W if keep is None else W * keep, U, scheme, keep)
    q, stats = gptq_quantize(W, H, scheme, block_size=32, damp=0.01, act_order=False, keep=keep)
    assert (q.codes.double() == ref_codes).float().mean() >= 0.995
    assert stats["loss"] == pytest.approx(ref_loss, rel=1e-3)
