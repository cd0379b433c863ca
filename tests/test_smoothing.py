"""Unit tier: the exact scale folds shared by SmoothQuant and AWQ on tiny real transformers models, and
the two methods' kernels on tiny problems, judged by relative error and quantization-error bounds."""

import math

import pytest
import torch
from pydantic import ValidationError

from conftest import tiny_config
from kiln.arch import in_out_features
from kiln.compress.awq import AWQConfig, awq_clip, awq_search_scales
from kiln.compress.quant import QuantScheme, rtn_quantize
from kiln.compress.smoothing import fold_kind, fold_scales
from kiln.compress.smoothquant import SEARCH_TOKENS, SmoothQuantConfig, smooth_scales
from kiln.compress.w8a8 import quantize_per_token


def rel_err(ref, approx):
    return float((ref.double() - approx.double()).norm() / ref.double().norm())


def lognormal_scales(n, g):
    """Positive scales, log-normal with ±1σ spanning 10×."""
    return torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * math.log(10) / 2).float()


# ---------------------------------------------------------------- folds on real decoder layers

NORM_NAMES = {
    "llama": "LlamaRMSNorm", "qwen2": "Qwen2RMSNorm", "mistral": "MistralRMSNorm",
    "gemma3_text": "Gemma3RMSNorm", "gpt2": "LayerNorm", "opt": "LayerNorm",
}


def fold_groups(arch, layer, mha):
    """(prev, linears) pairs whose fold is exact in this architecture's decoder layer."""
    if arch in ("llama", "qwen2", "mistral", "gemma3_text"):
        a, m = layer.self_attn, layer.mlp
        mlp_norm = layer.pre_feedforward_layernorm if arch == "gemma3_text" else layer.post_attention_layernorm
        groups = [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
                  (mlp_norm, [m.gate_proj, m.up_proj]),
                  (m.up_proj, [m.down_proj])]  # act(gate) * up is linear in up
        if mha:
            groups.append((a.v_proj, [a.o_proj]))
        return groups
    if arch == "gpt2":
        return [(layer.ln_1, [layer.attn.c_attn]), (layer.ln_2, [layer.mlp.c_fc])]
    if arch == "opt":
        a = layer.self_attn
        return [(layer.self_attn_layer_norm, [a.q_proj, a.k_proj, a.v_proj]),
                (layer.final_layer_norm, [layer.fc1]),
                (layer.fc1, [layer.fc2]),  # ReLU is positively homogeneous
                (a.v_proj, [a.out_proj])]
    raise ValueError(arch)


def build(arch, mha=False, seed=0):
    from transformers import AutoModelForCausalLM

    from kiln.arch import decoder_layout

    cfg = tiny_config(arch)
    if mha:
        cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for mod in model.modules():  # non-trivial affine parameters everywhere
        kind = None
        try:
            kind = fold_kind(mod)
        except ValueError:
            pass
        w = getattr(mod, "weight", None)
        if kind == "rmsnorm_plus_one":
            w.data = torch.randn(w.shape, generator=g) * 0.5
        elif kind in ("rmsnorm", "layernorm"):
            w.data = 1 + torch.randn(w.shape, generator=g) * 0.3
        if kind in ("layernorm", "linear") and getattr(mod, "bias", None) is not None:
            mod.bias.data = torch.randn(mod.bias.shape, generator=g) * 0.1
    layers = model.get_submodule(decoder_layout(model).layers_path)
    return model, layers


CASES = [(a, False) for a in ("llama", "qwen2", "mistral", "gemma3_text", "gpt2", "opt")] + [
    ("llama", True), ("gemma3_text", True)]


@pytest.mark.parametrize(("arch", "mha"), CASES, ids=lambda c: str(c))
def test_folds_leave_the_model_unchanged(arch, mha):
    model, layers = build(arch, mha)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    norm = fold_groups(arch, layers[0], mha)[0][0]
    norm_before = norm.weight.detach().clone()
    g = torch.Generator().manual_seed(7)
    kinds = set()
    for layer in layers:
        for prev, linears in fold_groups(arch, layer, mha):
            kind = fold_kind(prev)
            kinds.add(kind)
            fold_scales(prev, linears, lognormal_scales(in_out_features(linears[0])[0], g), kind)
    with torch.no_grad():
        after = model(ids).logits
    assert rel_err(before, after) < 1e-4
    assert type(norm).__name__ == NORM_NAMES[arch]
    expected = {"gemma3_text": "rmsnorm_plus_one", "gpt2": "layernorm", "opt": "layernorm"}.get(arch, "rmsnorm")
    assert expected in kinds
    assert not torch.allclose(norm.weight, norm_before)  # the folds did change the weights


def test_gqa_value_fold_is_refused():
    _, layers = build("llama")  # 4 query heads, 2 kv heads: v_proj out 32, o_proj in 64
    a = layers[0].self_attn
    with pytest.raises(ValueError, match="GQA"):
        fold_scales(a.v_proj, [a.o_proj], torch.ones(a.v_proj.out_features), "linear")


def test_fold_scales_validates():
    norm, lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match="positive"):
        fold_scales(norm, [lin], -torch.ones(8), "layernorm")
    with pytest.raises(ValueError, match="prev_kind"):
        fold_scales(norm, [lin], torch.ones(8), "batchnorm")
    with pytest.raises(ValueError, match="without an affine weight"):
        fold_scales(torch.nn.LayerNorm(8, elementwise_affine=False), [lin], torch.ones(8), "layernorm")


RMSNORM_CLASSES = [("llama", "LlamaRMSNorm", False), ("mistral", "MistralRMSNorm", False),
                   ("qwen2", "Qwen2RMSNorm", False), ("qwen3", "Qwen3RMSNorm", False),
                   ("phi3", "Phi3RMSNorm", False), ("gemma", "GemmaRMSNorm", True),
                   ("gemma2", "Gemma2RMSNorm", True), ("gemma3", "Gemma3RMSNorm", True)]


@pytest.mark.parametrize(("family", "cls", "plus_one"), RMSNORM_CLASSES, ids=lambda c: str(c))
def test_fold_kind_matches_the_installed_norms_forward(family, cls, plus_one):
    import importlib

    Norm = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls)
    norm = Norm(16, eps=1e-6)
    assert fold_kind(norm) == ("rmsnorm_plus_one" if plus_one else "rmsnorm")
    w = torch.randn(16) * 0.5
    norm.weight.data = w.clone()
    x = torch.randn(5, 16)
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    with torch.no_grad():
        assert torch.allclose(norm(x), xhat * ((1 + w) if plus_one else w), atol=1e-5)


def test_fold_kind_of_linears_and_unknowns():
    from transformers.pytorch_utils import Conv1D

    assert fold_kind(torch.nn.Linear(4, 4)) == "linear"
    assert fold_kind(Conv1D(4, 4)) == "linear"
    assert fold_kind(torch.nn.LayerNorm(4)) == "layernorm"
    with pytest.raises(ValueError, match="GELU"):
        fold_kind(torch.nn.GELU())


# ---------------------------------------------------------------- activation statistics

def test_group_inputs_gathers_absmax_and_thinned_rows_in_one_pass():
    """The engine's statistics of what enters a linear: max |x| per channel over every token, and
    the rows at linspace(0, n − 1, max_tokens) of all n, the same rows as thinning the whole
    concatenation, picked batch by batch."""
    from torch import nn

    from kiln.compress.engine import LayerInputs, _group_inputs

    g = torch.Generator().manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    hidden = [torch.randn(3, 25, 16, generator=g) * torch.linspace(0.1, 5, 16) for _ in range(4)]
    inputs = LayerInputs(hidden, [[((), {})] * len(hidden)])
    with torch.no_grad():
        X = torch.cat([layer[0](h).reshape(-1, 16) for h in hidden])  # what reaches layer[1]: 300 rows
    absmax, rows = _group_inputs(layer, layer[1], inputs, 0, max_tokens=50)
    assert absmax.dtype == torch.float32 and torch.equal(absmax, X.abs().amax(0))
    assert torch.equal(rows, X[torch.linspace(0, 299, 50).long()])
    absmax_only, none = _group_inputs(layer, layer[1], inputs, 0, max_tokens=None)
    assert none is None and torch.equal(absmax_only, absmax)
    _, every = _group_inputs(layer, layer[1], inputs, 0, max_tokens=1000)  # fewer rows than asked: all of them
    assert torch.equal(every, X)


# ---------------------------------------------------------------- SmoothQuant

def outlier_problem(tokens=1024, inp=64, outs=(32, 48), outliers=(3, 17, 40), factor=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, inp, generator=g)
    X[:, list(outliers)] *= factor
    Ws = [torch.randn(o, inp, generator=g) * 0.05 for o in outs]
    return X, Ws


def w8a8_error(X, W):
    xq, xs = quantize_per_token(X)
    Wq = rtn_quantize(W, QuantScheme(bits=8, group_size=None, symmetric=True)).dequantize()
    return float(((xq.float() * xs) @ Wq.T - X @ W.T).pow(2).mean())


def test_smooth_scales_migrates_outliers_into_the_weights():
    X, Ws = outlier_problem()
    s = smooth_scales(X.abs().amax(0), Ws, alpha=0.5)
    assert s.shape == (64,) and s.dtype == torch.float32 and bool((s > 0).all())
    Xs = X / s
    for W in Ws:
        assert rel_err(X @ W.T, Xs @ (W * s).T) < 1e-5  # the float function is unchanged
    spread = lambda a: float(a.max() / a.median())  # noqa: E731
    assert spread(Xs.abs().amax(0)) < spread(X.abs().amax(0)) / 4
    for W in Ws:
        assert w8a8_error(Xs, W * s) < 0.5 * w8a8_error(X, W)
        # weight-only W8 on the smoothed product is no worse than on the original one
        w8 = QuantScheme(bits=8, group_size=None, symmetric=True)
        err = lambda x, w: float((x @ (rtn_quantize(w, w8).dequantize() - w).T).pow(2).mean())  # noqa: E731
        assert err(Xs, W * s) <= 1.05 * err(X, W)


def test_smooth_scales_formula_ends_and_safety():
    X, Ws = outlier_problem()
    a = X.abs().amax(0)
    w = torch.stack([W.abs().amax(0) for W in Ws]).amax(0)
    assert torch.allclose(smooth_scales(a, Ws, 1.0), a, rtol=1e-6)
    assert torch.allclose(smooth_scales(a, Ws, 0.0), 1 / w, rtol=1e-6)
    assert torch.allclose(smooth_scales(a, Ws, 0.3), a.pow(0.3) / w.pow(0.7), rtol=1e-5)
    a_bad = a.clone()
    a_bad[0], a_bad[1], a_bad[2] = 0.0, float("nan"), float("inf")
    Ws_bad = [W.clone() for W in Ws]
    for W in Ws_bad:
        W[:, 5] = 0.0
    s = smooth_scales(a_bad, Ws_bad, 0.5)
    assert torch.isfinite(s).all() and bool((s >= 1e-5).all() and (s <= 1e5).all())
    assert s[[0, 1, 2, 5]].tolist() == [1.0, 1.0, 1.0, 1.0]
    big = smooth_scales(torch.full((64,), 1e30), Ws, 1.0)
    assert float(big.max()) == pytest.approx(1e5)


def test_smoothquant_config():
    assert SmoothQuantConfig(kind="smoothquant").alpha == 0.5
    assert SmoothQuantConfig.needs_calibration
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValidationError, match=r"\[0, 1\]"):
            SmoothQuantConfig(kind="smoothquant", alpha=bad)
    assert SmoothQuantConfig(kind="smoothquant").max_tokens is None  # a fixed α needs max |x| only
    assert SmoothQuantConfig(kind="smoothquant", alpha="auto").max_tokens == SEARCH_TOKENS
    with pytest.raises(ValidationError, match="auto"):
        SmoothQuantConfig(kind="smoothquant", alpha="best")


def test_smoothquant_auto_alpha_takes_the_least_w8a8_error():
    from kiln.compress.smoothquant import ALPHA_GRID, search_alpha
    from kiln.compress.smoothquant import w8a8_error as group_error

    X, Ws = outlier_problem()
    absmax = X.abs().amax(0)
    alpha, stats = search_alpha(X, absmax, Ws)
    refs = [X @ W.T for W in Ws]
    err = {a: group_error(X, Ws, refs, smooth_scales(absmax, Ws, a)) for a in ALPHA_GRID}
    assert stats["w8a8_error"] == pytest.approx(group_error(X, Ws, refs, smooth_scales(absmax, Ws, alpha)))
    assert stats["w8a8_error"] <= min(err.values())  # the refinement only ever improves on the grid's best
    assert abs(alpha - min(err, key=err.get)) <= 0.05 + 1e-9
    assert stats["w8a8_error"] < 0.5 * stats["w8a8_error_unsmoothed"], stats
    # the group error is the per-linear error test_smooth_scales_migrates_outliers_into_the_weights measures, summed
    s = smooth_scales(absmax, Ws, 0.5)
    per = [w8a8_error(X / s, W * s) * Y.numel() for W, Y in zip(Ws, refs)]
    assert err[0.5] == pytest.approx(sum(per) / sum(float(Y.pow(2).sum()) for Y in refs), rel=1e-3)


# ---------------------------------------------------------------- AWQ

def awq_output_error(X, W, s, scheme):
    return float((X @ W.T - (X / s) @ rtn_quantize(W * s, scheme).dequantize().T).pow(2).mean())


def test_awq_scales_beat_plain_rtn_on_outlier_channels():
    X, Ws = outlier_problem(tokens=512, factor=10.0)
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    s, stats = awq_search_scales(X, Ws, scheme, grid=10)
    assert s.shape == (64,) and bool((s > 0).all())
    assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0, rel=1e-4)
    assert stats["alpha"] > 0 and stats["loss"] <= stats["loss_unscaled"]
    assert stats["loss"] < 0.8 * stats["loss_unscaled"], stats
    for W in Ws:  # the returned s realises the improvement on each linear
        assert awq_output_error(X, W, s, scheme) < awq_output_error(X, W, torch.ones(64), scheme)


def test_awq_scales_subsample_deterministically():
    X, Ws = outlier_problem(tokens=5000, inp=32, outs=(16,), outliers=(2,), factor=8.0)
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    s1, st1 = awq_search_scales(X, Ws, scheme, grid=5)
    s2, st2 = awq_search_scales(X, Ws, scheme, grid=5)
    assert torch.equal(s1, s2) and st1 == st2


@pytest.mark.parametrize("scheme", [QuantScheme(bits=3, group_size=32, symmetric=False),
                                    QuantScheme(bits=4, group_size=16, symmetric=True),
                                    QuantScheme(bits=3, group_size=None, symmetric=False)], ids=lambda s: s.label())
def test_awq_clip_lowers_output_error(scheme):
    torch.manual_seed(0)  # torch.distributions draws from the global generator
    W = torch.distributions.StudentT(3.0).sample((40, 96)) * 0.02  # heavy tails: clipping pays off
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 96, generator=g) * torch.linspace(0.5, 2.0, 96)
    Wc = awq_clip(W, X, scheme, grid=10)
    assert Wc.shape == W.shape and Wc.dtype == W.dtype
    assert bool((Wc.abs() <= W.abs() + 1e-7).all())
    err = lambda w: float((X @ (W - rtn_quantize(w, scheme).dequantize()).T).pow(2).mean())  # noqa: E731
    assert err(Wc) < 0.97 * err(W), (err(Wc), err(W))  # ≈0.94 (w4 g16) to ≈0.77 (w3 per-channel)


def test_awq_clip_without_shrink_is_identity():
    W = torch.randn(8, 32)
    assert torch.equal(awq_clip(W, torch.randn(50, 32), QuantScheme(bits=4, group_size=16), grid=3, max_shrink=0.0), W)


def test_awq_config():
    c = AWQConfig(kind="awq")
    assert c.scheme.bits == 4 and c.scheme.group_size == 128 and c.scheme.symmetric is False
    assert c.grid == 20 and c.clip is True and AWQConfig.needs_calibration
    with pytest.raises(ValidationError):
        AWQConfig(kind="awq", grid=1)
    with pytest.raises(ValidationError):
        AWQConfig(kind="awq", grid=101)
