"""Architecture knowledge as data: where the decoder layers live per model family, plus inference
from the module graph for families not in the table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.errors import RecipeError

# model_type → dotted path of the decoder-layer ModuleList
DECODER_LAYERS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
}


# model_type → (preceding op, the linears it feeds), relative to a decoder layer, in forward order.
# AWQ and SmoothQuant fold per-channel scales into the preceding op, so it must be linear in each
# channel: a norm's weight, V through attention, or a linear feeding a positively homogeneous op
# (ReLU, or the `up` factor of act(gate) * up). GPT-2's fused c_attn and GELU MLP have no such link.
_LLAMA_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
SMOOTHING_GROUPS = {
    "llama": _LLAMA_GROUPS,
    "mistral": _LLAMA_GROUPS,
    "qwen2": _LLAMA_GROUPS,
    "qwen3": _LLAMA_GROUPS,
    "gemma3_text": (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    "gpt2": (("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    "opt": (
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("final_layer_norm", ("fc1",)),
        ("fc1", ("fc2",)),  # ReLU between them
    ),
}


@dataclass(frozen=True)
class SmoothingGroup:
    prev: str  # full module name of the op whose output channels absorb 1/s
    linears: tuple[str, ...]  # full names of the linears whose input columns absorb s


def smoothing_groups(model: nn.Module, layout: "DecoderLayout", index: int, trace=None) -> list[SmoothingGroup]:
    """The norm→linear (and linear→linear) groups of decoder layer `index`: from the family table,
    or, for a family not in it, inferred by `trace()` (one forward of the layer) matching which
    linears consume a norm's output tensor."""
    prefix = layout.layer_name(index)
    table = SMOOTHING_GROUPS.get(model.config.model_type)
    layer = model.get_submodule(prefix)
    if table is None:
        return infer_norm_groups(layer, prefix, model.config.model_type, trace)
    groups = []
    for prev, linears in table:
        p = layer.get_submodule(prev)
        outs = {in_out_features(layer.get_submodule(l))[0] for l in linears}
        width = in_out_features(p)[1] if is_linear(p) else p.weight.shape[0]
        if outs != {width}:
            continue  # e.g. V → O under grouped-query attention: V has fewer channels than O's input
        groups.append(SmoothingGroup(f"{prefix}.{prev}", tuple(f"{prefix}.{l}" for l in linears)))
    return groups


def infer_norm_groups(layer: nn.Module, prefix: str, model_type: str, trace) -> list[SmoothingGroup]:
    """Run the layer once (`trace`) and match each linear's input tensor with a norm module's output
    tensor. Raises naming the linears when no norm feeds any of them."""
    norms = {n: m for n, m in layer.named_modules() if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None}
    linears = {n: m for n, m in layer.named_modules() if is_linear(m)}
    produced: dict[int, str] = {}
    consumers: dict[str, list[str]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: produced.__setitem__(id(out), n)) for n, m in norms.items()]
    hooks += [m.register_forward_pre_hook(lambda mod, a, n=n: consumers.setdefault(produced.get(id(a[0]), ""), []).append(n))
              for n, m in linears.items()]
    try:
        if trace is None:
            raise RecipeError(f"model type {model_type!r}: no norm→linear table and no calibration forward to infer one",
                              hint="add the family to kiln.arch.SMOOTHING_GROUPS")
        trace()
    finally:
        for h in hooks:
            h.remove()
    groups = [SmoothingGroup(f"{prefix}.{norm}", tuple(f"{prefix}.{l}" for l in ls)) for norm, ls in consumers.items() if norm]
    if not groups:
        raise RecipeError(f"model type {model_type!r}: could not infer which norm feeds which linear in {prefix} "
                          f"(linears: {', '.join(linears)})", hint="add the family to kiln.arch.SMOOTHING_GROUPS")
    return groups


def module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """The dotted name of `module` inside `model` (None for None or a module it does not hold)."""
    return None if module is None else next((n for n, m in model.named_modules() if m is module), None)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), whose weight is stored transposed (in, out)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def in_out_features(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the module stores."""
    return module.weight.data.T if is_transposed(module) else module.weight.data


def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    W = W.to(module.weight.dtype)
    module.weight.data = (W.T if is_transposed(module) else W).contiguous()


@dataclass(frozen=True)
class DecoderLayout:
    layers_path: str  # e.g. "model.layers"
    num_layers: int

    def layer_name(self, i: int) -> str:
        return f"{self.layers_path}.{i}"


def _num_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def decoder_layout(model: nn.Module) -> DecoderLayout:
    config = model.config
    n = _num_layers(config)
    path = DECODER_LAYERS.get(config.model_type)
    if path is None:
        # Infer: the ModuleList holding num_hidden_layers blocks of one class.
        candidates = [
            name for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) == n and len({type(c) for c in m}) == 1
        ]
        if len(candidates) != 1:
            raise RecipeError(
                f"model type {config.model_type!r}: could not infer its decoder layers "
                f"(looked for one ModuleList of {n} identical blocks, found {candidates or 'none'})",
                hint=f"add {config.model_type!r} to kiln.arch.DECODER_LAYERS",
            )
        path = candidates[0]
    layers = model.get_submodule(path)
    return DecoderLayout(path, len(layers))
