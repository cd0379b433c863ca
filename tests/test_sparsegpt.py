"""Unit tier: SparseGPT on tiny tensors, judged against magnitude pruning by the layer-output error."""

import pytest
import torch
from pydantic import ValidationError

from kiln.compress.quant import QuantScheme, reconstruction_error, rtn_quantize
from kiln.compress.sparsegpt import SparseGPTConfig, magnitude_prune, nm_mask_ok, sparsegpt_prune
from test_quant import correlated_problem


def test_unstructured_half_beats_magnitude():
    W, H = correlated_problem()
    # several blocks, so later masks are chosen after the OBS updates (the paper's adaptive selection);
    # one block spanning all 96 inputs picks the whole mask up front and is only ~5% better than magnitude
    Wp, mask, qw, stats = sparsegpt_prune(W, H, sparsity=0.5, block_size=32)
    assert qw is None and mask.dtype == torch.bool and Wp.shape == W.shape
    zeros = float((Wp == 0).float().mean())
    assert abs(zeros - 0.5) < 0.01 and abs(stats["sparsity"] - 0.5) < 0.01
    assert torch.equal(Wp != 0, mask)
    err = reconstruction_error(W, Wp, H)
    err_mag = reconstruction_error(W, magnitude_prune(W, 0.5)[0], H)
    assert err < 0.7 * err_mag, (err, err_mag)
    assert stats["damp"] == pytest.approx(0.01)
    # the OBS updates are exact, so the kernel's own loss is the output error (up to damping)
    assert 0.8 < 2 * stats["loss"] / err < 1.25


def test_two_four_structure_and_error():
    W, H = correlated_problem()
    Wp, mask, _, stats = sparsegpt_prune(W, H, nm=(2, 4), block_size=32)
    assert nm_mask_ok(mask, 2, 4) and nm_mask_ok(Wp != 0, 2, 4)
    assert stats["sparsity"] == 0.5 and float((Wp == 0).float().mean()) == 0.5
    Wm, mask_m = magnitude_prune(W, nm=(2, 4))
    assert nm_mask_ok(mask_m, 2, 4)
    assert reconstruction_error(W, Wp, H) < reconstruction_error(W, Wm, H)


def test_nm_mask_ok_rejects_dense_windows():
    mask = torch.tensor([[True, False, True, False, True, True, True, False]])
    assert nm_mask_ok(mask, 2, 4) is False
    assert nm_mask_ok(mask, 1, 4) is True
    assert nm_mask_ok(mask, 1, 3) is False  # 8 inputs do not split into windows of 3


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_joint_quantization_keeps_pruned_weights_at_zero(symmetric):
    W, H = correlated_problem()
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    Wp, mask, qw, stats = sparsegpt_prune(W, H, sparsity=0.5, block_size=64, scheme=scheme)
    deq = qw.dequantize()
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= scheme.maxq
    assert qw.scale.shape == (W.shape[0], scheme.groups(W.shape[1]))
    assert bool((deq[~mask] == 0.0).all())  # structural: code == zero on an integral zero point
    assert torch.allclose(deq, Wp)
    assert abs(stats["sparsity"] - 0.5) < 0.01
    Wm, _ = magnitude_prune(W, 0.5)
    err_base = reconstruction_error(W, rtn_quantize(Wm, scheme).dequantize(), H)
    assert reconstruction_error(W, deq, H) < err_base


def test_joint_quantization_with_two_four():
    W, H = correlated_problem()
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    _, mask, qw, _ = sparsegpt_prune(W, H, nm=(2, 4), scheme=scheme)
    assert nm_mask_ok(qw.dequantize() != 0, 2, 4) and nm_mask_ok(mask, 2, 4)


def test_config_parses_patterns():
    assert SparseGPTConfig().nm is None and not SparseGPTConfig().quantizes
    cfg = SparseGPTConfig(pattern="2:4", scheme={"bits": 4, "group_size": 32})
    assert cfg.nm == (2, 4) and cfg.quantizes and cfg.needs_calibration
    W, H = correlated_problem(out=8, inp=32, tokens=128)
    res = cfg.process_weight(W, H, "l")
    assert nm_mask_ok(res.weight != 0, 2, 4) and res.quantized is not None and res.weight.shape == W.shape


@pytest.mark.parametrize("bad", [{"pattern": "4:2"}, {"pattern": "2-4"}, {"pattern": "0:4"}, {"sparsity": 1.0},
                                 {"pattern": "4:4"}, {"sparsity": 0.0}, {"pattern": "2:128"}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError) as exc:
        SparseGPTConfig(**bad)
    if "pattern" in bad:
        assert "pattern must be 'unstructured' or 'N:M'" in str(exc.value)


def test_nm_needs_divisible_in_features():
    W, H = correlated_problem(out=8, inp=90, tokens=256)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*90"):
        sparsegpt_prune(W, H, nm=(2, 4), name="model.layers.0.mlp.up_proj")


def test_dead_columns_stay_zero():
    W, H = correlated_problem()
    H[5, :] = 0
    H[:, 5] = 0
    Wp, _, qw, _ = sparsegpt_prune(W, H, sparsity=0.5, scheme=QuantScheme(bits=4, group_size=32))
    assert float(Wp[:, 5].abs().max()) == 0.0 and float(qw.dequantize()[:, 5].abs().max()) == 0.0


def _textbook_prune(W, U, sparsity, nm, block, scheme):
    """SparseGPT's column loop with no lazy updates, float64: masks chosen per block (unstructured) or
    per window of M (N:M) from the current weights, each column's error spread over every later column
    at once. U is the upper Cholesky factor of H⁻¹."""
    from kiln.compress.quant import grid_params, quantize_column

    W, U = W.double().clone(), U.double()
    keep = torch.ones(W.shape, dtype=torch.bool)
    codes = torch.zeros_like(W)
    d = U.diagonal()
    loss = 0.0
    for j in range(W.shape[1]):
        if nm is None and j % block == 0:
            sal = W[:, j : j + block] ** 2 / d[j : j + block] ** 2
            k = round(sal.numel() * sparsity)
            blk = torch.ones_like(sal, dtype=torch.bool)
            blk.view(-1)[sal.flatten().topk(k, largest=False).indices] = False
            keep[:, j : j + block] = blk
        if nm is not None and j % nm[1] == 0:
            sal = W[:, j : j + nm[1]] ** 2 / d[j : j + nm[1]] ** 2
            keep[:, j : j + nm[1]].scatter_(1, sal.topk(nm[0], dim=1, largest=False).indices, False)
        w = W[:, j]
        if scheme is not None:
            width = scheme.group_width(W.shape[1])
            if j % width == 0:
                s, z = (t.double() for t in grid_params(W[:, j : j + width].float(), scheme))
            codes[:, j] = torch.where(keep[:, j], quantize_column(w, s, z, scheme.maxq), z)
            q = (codes[:, j] - z) * s
        else:
            q = torch.where(keep[:, j], w, torch.zeros_like(w))
        err = (w - q) / d[j]
        loss += float(err.pow(2).sum()) / 2
        W[:, j:] -= torch.outer(err, U[j, j:])
        W[:, j] = q
    return W, keep, codes, loss


@pytest.mark.parametrize("nm", [None, (2, 4), (3, 6)], ids=["unstructured", "2:4", "3:6"])  # 3:6: windows across sub-blocks
@pytest.mark.parametrize("scheme", [None, QuantScheme(bits=4, group_size=12, symmetric=False)], ids=["float", "g12"])
def test_blocked_loop_is_the_textbook_loop(nm, scheme):
    """Lazy updates per block and sub-block, numpy for the per-column ops: the same masks, codes,
    weights and loss as the unblocked float64 loop (group 12 starts split the 16-column sub-blocks)."""
    from kiln.compress.gptq import damped_cholesky_inverse

    W, H = correlated_problem(out=40, inp=96)
    U, _ = damped_cholesky_inverse(H, 0.01)
    ref_W, ref_keep, ref_codes, ref_loss = _textbook_prune(W, U, 0.5, nm, 48, scheme)
    Wp, mask, qw, stats = sparsegpt_prune(W, H, sparsity=0.5, nm=nm, block_size=48, scheme=scheme)
    assert (mask == ref_keep).float().mean() >= 0.995
    assert (Wp.double() - ref_W).abs().gt(1e-3).float().mean() < 0.005
    if scheme is not None:
        assert (qw.codes.double() == ref_codes).float().mean() >= 0.995
    assert stats["loss"] == pytest.approx(ref_loss, rel=1e-3)
