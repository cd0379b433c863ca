"""The layer-wise engine shared by every method.

1. Capture what enters each decoder layer: the hidden states of layer 0 and, per layer, the extra
   arguments the model passes it (rotary tables, masks: they differ between sliding and global
   layers in Gemma 3). Only the modules before the layers are in memory for this.
2. For one decoder layer at a time: load its weights, run the calibration activations through it
   while hooks collect what the method needs (H = 2XXᵀ for each target linear), let the method
   rewrite the weights, run the activations through the rewritten layer (they become the next
   layer's inputs), write the layer's new tensors to the stage folder, free the layer.

Peak memory is one layer's weights plus the calibration activations, whatever the model size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln.arch import decoder_layout, in_out_features, is_transposed, weight_matrix, set_weight_matrix
from kiln.compress.gptq import HessianNotPositiveDefinite
from kiln.compress.hessian import HessianHooks
from kiln.context import RunContext
from kiln.errors import CompressionError
from kiln.model import WeightStore, build_skeleton, materialize, release, save_overlay, tied_aliases


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one (B, L, d) tensor per calibration batch
    extras: list[list[tuple[tuple, dict]]]  # [layer][batch] → (args after hidden, kwargs)


@dataclass
class StageOutput:
    files: list[Path] = field(default_factory=list)
    modules: dict[str, dict] = field(default_factory=dict)  # concrete module name → stats


def check_finite(module: nn.Module, prefix: str) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise CompressionError(f"weight {prefix}.{name} has {bad} NaN/inf values",
                                   hint="the source checkpoint is corrupt; re-export it or pick another source")


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, batch_size: int) -> LayerInputs:
    """Run the model's own forward with every decoder layer replaced by a recorder; the last one stops it."""
    n = len(layers)
    hidden: list[torch.Tensor] = []
    extras: list[list] = [[] for _ in range(n)]

    def recorder(i: int):
        def forward(*args, **kwargs):
            if i == 0:
                hidden.append(args[0].detach())
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            extras[i].append((tuple(args[1:]), kwargs))
            if i == n - 1:
                raise _Stop
            return args[0]
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            for b in range(0, calib.shape[0], batch_size):
                try:
                    model(input_ids=calib[b : b + batch_size], use_cache=False)
                except _Stop:
                    pass
    finally:
        for layer in layers:
            del layer.forward
    return LayerInputs(hidden, extras)


def _run_layer(layer: nn.Module, inputs: LayerInputs, i: int, before_batch=None) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for h, (args, kwargs) in zip(inputs.hidden, inputs.extras[i]):
            if before_batch is not None:
                before_batch()
            y = layer(h, *args, **kwargs)
            out.append(y[0] if isinstance(y, tuple) else y)
    return out


def run_layerwise(model_dir: Path, store: WeightStore, stage, targets: list[str], calib: torch.Tensor | None,
                  out_dir: Path, ctx: RunContext, batch_size: int = 8, trust_remote_code: bool = False) -> StageOutput:
    """Apply a weight-rewriting `stage` (quantize_weight(W, H, name)) to the `targets` linears."""
    model = build_skeleton(model_dir, trust_remote_code)
    aliases = tied_aliases(model)
    layout = decoder_layout(model)
    layers = model.get_submodule(layout.layers_path)
    out = StageOutput()

    inputs = None
    if stage.needs_calibration:
        # Materialize everything except the decoder layers and the LM head (not reached).
        head = model.get_output_embeddings()
        for name, child in model.named_modules():
            if name != layout.layers_path and not name.startswith(layout.layers_path + ".") and child is not head:
                materialize(model, name, store, aliases, recurse=False)
        check_finite(model.get_input_embeddings(), "embeddings")
        inputs = capture_layer_inputs(model, layers, calib, batch_size)

    by_layer: dict[int, list[str]] = {}
    for t in targets:
        idx = int(t[len(layout.layers_path) + 1 :].split(".")[0])
        by_layer.setdefault(idx, []).append(t)

    with ctx.progress(f"{stage.kind}: layers", layout.num_layers) as advance:
        for i in range(layout.num_layers):
            names = by_layer.get(i, [])
            if not names and inputs is None:
                advance()
                continue
            lname = layout.layer_name(i)
            materialize(model, lname, store, aliases)
            layer = layers[i]
            check_finite(layer, lname)
            hooks = None
            if inputs is not None and names:
                mods = {n_: model.get_submodule(n_) for n_ in names}
                hooks = HessianHooks(mods, {n_: in_out_features(m)[0] for n_, m in mods.items()})
                try:
                    _run_layer(layer, inputs, i, before_batch=hooks.next_batch)
                finally:
                    hooks.remove()
            quantized = {}
            for n_ in names:
                mod = model.get_submodule(n_)
                t0 = time.perf_counter()
                H = hooks.hessian(n_) if hooks is not None else None
                try:
                    qw, stats = stage.quantize_weight(weight_matrix(mod).float(), H, n_)
                except HessianNotPositiveDefinite as exc:
                    raise CompressionError(str(exc), hint="add calibration samples, raise `damp`, or ignore this layer") from None
                set_weight_matrix(mod, qw.dequantize())
                quantized[n_ + ".weight"] = (qw, is_transposed(mod))
                out.modules[n_] = {"seconds": round(time.perf_counter() - t0, 4), **(stats or {})}
            if inputs is not None:
                inputs.hidden = _run_layer(layer, inputs, i)
                if not all(torch.isfinite(h).all() for h in inputs.hidden):
                    raise CompressionError(f"{lname}: its outputs became NaN/inf after {stage.kind}",
                                           hint="check the source weights; try more damping or fewer bits")
            if quantized:
                f = out_dir / f"layer-{i:03d}.safetensors"
                save_overlay(f, {}, quantized)
                out.files.append(f)
            release(model, lname)
            advance()
    return out
