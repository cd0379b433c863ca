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
