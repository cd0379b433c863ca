"""What AWQ and SmoothQuant share: the exact fold of a per-channel scale s into the op that produces
a linear's input and the linears that consume it.

Both methods rewrite Y = X Wᵀ as Y = (X diag(s)⁻¹)(W diag(s))ᵀ (SmoothQuant, arXiv:2211.10438, eq. 3;
AWQ, arXiv:2306.00978, §3.2). X diag(s)⁻¹ is never computed at run time: it is folded into the
preceding op, whose output channels are divided by s, and W diag(s) into the input columns of every
linear that reads that output. The float function is unchanged; only what quantization sees moves.

Which preceding ops can absorb 1/s exactly (s > 0):
  - a norm with a per-channel affine weight (RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm with bias);
  - a linear feeding the next one through something that commutes with a positive diagonal scale:
    attention's V path (softmax(QKᵀ) V diag(s)⁻¹ = (softmax(QKᵀ) V) diag(s)⁻¹, v_proj → o_proj, only
    when v_proj's outputs map one-to-one onto o_proj's inputs, i.e. not under GQA/MQA), a positively
    homogeneous elementwise op (ReLU: relu(z/s) = relu(z)/s, OPT's fc1 → fc2), or the `up` factor of
    act(gate) * up (up_proj → down_proj). GELU/SiLU on their own are not homogeneous (GPT-2's c_fc → c_proj
    cannot be folded).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.arch import in_out_features, is_linear, set_weight_matrix, weight_matrix

PREV_KINDS = ("rmsnorm", "rmsnorm_plus_one", "layernorm", "linear")

# Read from the installed transformers' modeling files: forward returns `self.weight * x̂`.
PLAIN_RMSNORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})
# forward returns `x̂ * (1.0 + self.weight.float())`, weight initialised to zeros.
PLUS_ONE_RMSNORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})


def fold_kind(module: nn.Module) -> str:
    """The `prev_kind` for `fold_scales` of the op producing a linear's input, from its class name.

    Raises ValueError naming the class when the module is not one we know how to fold into (an
    unknown RMSNorm variant may normalise after scaling, or use 1 + w: guessing would be silent
    corruption)."""
    name = type(module).__name__
    if name in PLAIN_RMSNORMS:
        return "rmsnorm"
    if name in PLUS_ONE_RMSNORMS:
        return "rmsnorm_plus_one"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if is_linear(module):
        return "linear"
    raise ValueError(
        f"cannot fold scales into a {name}: known kinds are RMSNorm y = w·x̂ ({', '.join(sorted(PLAIN_RMSNORMS))}), "
        f"RMSNorm y = (1 + w)·x̂ ({', '.join(sorted(PLUS_ONE_RMSNORMS))}), nn.LayerNorm, nn.Linear / Conv1D"
    )


def _out_features(prev: nn.Module, prev_kind: str) -> int:
    if prev_kind == "linear":
        return in_out_features(prev)[1]
    return prev.weight.shape[0]


def fold_scales(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor, prev_kind: str) -> None:
    """Divide the output channels of `prev` by s and multiply the input columns of each of `linears`
    by s, in place, leaving the float function unchanged (up to rounding to the weights' dtype).

    prev_kind: "rmsnorm" (w ← w/s), "rmsnorm_plus_one" (Gemma, y = (1 + w)·x̂: w ← (1 + w)/s − 1),
    "layernorm" (w ← w/s, b ← b/s), "linear" (rows of W and b ← /s; see the module docstring for when
    that is exact). Arithmetic is done in float64 and cast back to each parameter's dtype.

    Caveat for "rmsnorm_plus_one" in low precision: the stored w_new ≈ −1 when (1 + w)/s ≪ 1, and
    1 + w_new then keeps only eps/|1 + w_new| relative precision (bf16: 2⁻⁸ absolute near −1).
    """
    if prev_kind not in PREV_KINDS:
        raise ValueError(f"prev_kind must be one of {PREV_KINDS}, got {prev_kind!r}")
    if not linears:
        raise ValueError("fold_scales: no linears to fold into")
    s = s.detach().reshape(-1)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError("fold_scales: scales must be finite and positive")
    c = s.numel()
    if getattr(prev, "weight", None) is None:
        raise ValueError(f"cannot fold scales into a {type(prev).__name__} without an affine weight")
    if _out_features(prev, prev_kind) != c:
        raise ValueError(f"{type(prev).__name__} has {_out_features(prev, prev_kind)} output channels, scales have {c}")
    for lin in linears:
        if not is_linear(lin):
            raise ValueError(f"can only fold scales into linear layers, got {type(lin).__name__}")
        if in_out_features(lin)[0] != c:
            raise ValueError(
                f"{type(lin).__name__} has {in_out_features(lin)[0]} input features, scales have {c} "
                f"(v_proj → o_proj under GQA/MQA does not map channels one-to-one)"
            )

    s64 = s.to(device=prev.weight.device, dtype=torch.float64)
    w = prev.weight.data
    if prev_kind == "rmsnorm":
        prev.weight.data = (w.double() / s64).to(w.dtype)
    elif prev_kind == "rmsnorm_plus_one":
        prev.weight.data = ((1.0 + w.double()) / s64 - 1.0).to(w.dtype)
    elif prev_kind == "layernorm":
        prev.weight.data = (w.double() / s64).to(w.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = (prev.bias.data.double() / s64).to(prev.bias.dtype)
    else:  # linear: rows of the (out, in) matrix
        W = weight_matrix(prev)
        set_weight_matrix(prev, W.double() / s64[:, None])
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = (prev.bias.data.double() / s64).to(prev.bias.dtype)

    for lin in linears:
        W = weight_matrix(lin)
        set_weight_matrix(lin, W.double() * s64.to(W.device)[None, :])
