"""The layer-wise engine shared by every method.

1. Capture what enters each decoder layer: the hidden states of layer 0 and, per layer, the extra
   arguments the model passes it (rotary tables, masks: they differ between sliding and global
   layers in Gemma 3). Only the modules before the layers are in memory for this.
2. For one decoder layer at a time: load its weights, run the calibration activations through it
   while hooks collect what the method needs (H = 2XXᵀ for each target linear), let the method
   rewrite the weights, run the activations through the rewritten layer (they become the next
   layer's inputs), write the layer's new tensors to the stage folder, free the layer.

Peak memory is one layer's weights plus the calibration activations (and, while a layer runs, the
inputs its replayed submodules saved: see _Tail), whatever the model size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln.arch import decoder_layout, in_out_features, is_transposed, module_name, set_weight_matrix, weight_matrix
from kiln.compress.gptq import HessianNotPositiveDefinite
from kiln.compress.hessian import HessianHooks
from kiln.compress.rotation import rotate, rotate_hessian, rotation_block
from kiln.compress.spill import Spill
from kiln.context import RunContext
from kiln.errors import CompressionError
from kiln.model import WeightStore, build_skeleton, materialize, release, save_overlay, tied_aliases


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one (B, L, d) tensor per calibration batch
    extras: list[list[tuple[tuple, dict]]]  # [layer][batch] → (args after hidden, kwargs)
    spill: Spill | None = None  # where `hidden` (and the saved inputs) live when not in memory
    compute_dtype: str = "float32"  # bfloat16: the layers' forward runs under CPU autocast (see compute_autocast)

    def first_batch(self, i: int) -> LayerInputs:
        """Layer i's inputs for the first calibration batch alone (for probing the layer)."""
        extras: list[list] = [[] for _ in self.extras]
        extras[i] = self.extras[i][:1]
        return dataclasses.replace(self, hidden=self.hidden[:1], extras=extras)

    def page_out(self) -> None:
        """Done with a batch: with a spill, its pages leave the process (see kiln.compress.spill)."""
        if self.spill is not None:
            self.spill.page_out()


def _slab(shapes: list[tuple[int, ...]], alloc=torch.empty) -> list[torch.Tensor]:
    """Zeroless float32 tensors of these shapes, views into one allocation. What the engine keeps
    across passes (activations, saved inputs) lives in slabs: malloc maps a large block on its own
    and gives it back whole, where per-batch blocks kept between each pass's freed temporaries
    fragment the heap (on SmolLM2 that held hundreds of MiB)."""
    return _views(alloc(sum(math.prod(s) for s in shapes)), shapes)


def _views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Consecutive views of `flat`'s first elements, one per shape."""
    sizes = [math.prod(s) for s in shapes]
    return [v.view(s) for v, s in zip(flat[: sum(sizes)].split(sizes), shapes)]


class SlabPool:
    """Flat float32 buffers lent out as slabs and taken back, kept from one layer to the next: every
    layer saves the same shapes, and memory the process already touched copies in several times
    faster than fresh pages. A request takes the smallest free buffer that holds it, so slabs whose
    lives do not overlap (attention's saved inputs, folded away before the MLP's are saved) share one
    buffer; when none holds it, the free ones are dropped and one of the new size is made. A pool
    that does not `retain` frees what it gets back: the least memory, fresh pages every layer."""

    def __init__(self, retain: bool = True, alloc=torch.empty):
        self.free: list[torch.Tensor] = []
        self.retain = retain
        self.alloc = alloc

    def take(self, shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        need = sum(math.prod(s) for s in shapes)
        fits = [b for b in self.free if b.numel() >= need]
        if fits:
            flat = min(fits, key=torch.Tensor.numel)
            self.free = [b for b in self.free if b is not flat]  # by identity: == on tensors is elementwise
        else:
            self.free.clear()
            flat = self.alloc(need)
        return flat, _views(flat, shapes)

    def give_back(self, flat: torch.Tensor) -> None:
        if self.retain:
            self.free.append(flat)

    def clear(self) -> None:
        self.free.clear()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Give the allocator's free pages back to the OS (glibc's malloc_trim, which also releases
    free pages inside the heap): the passes' per-batch temporaries are freed between live blocks, so
    without it a layer's freed memory stays counted in RSS. A no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in t. A sum reaches NaN/inf whenever an element is one, and costs a fraction of
    an elementwise test; only a sum that overflowed on finite elements needs the full test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _batches_finite(inputs: LayerInputs) -> bool:
    for h in inputs.hidden:
        ok = _all_finite(h)
        inputs.page_out()
        if not ok:
            return False
    return True


@dataclass
class StageOutput:
    files: list[Path] = field(default_factory=list)
    modules: dict[str, dict] = field(default_factory=dict)  # concrete module name → stats
    extra: dict = field(default_factory=dict)  # stage-wide figures (e.g. a training loss curve)


def check_finite(module: nn.Module, prefix: str) -> None:
    for name, p in module.named_parameters():
        if not _all_finite(p.detach()):
            bad = int((~torch.isfinite(p)).sum())
            raise CompressionError(f"weight {prefix}.{name} has {bad} NaN/inf values",
                                   hint="the source checkpoint is corrupt; re-export it or pick another source")


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, batch_size: int,
                         spill: Spill | None = None) -> LayerInputs:
    """Run the model's own forward with every decoder layer replaced by a recorder; the last one stops it.
    Layer 0's inputs go straight into one slab (in `spill`'s files, if given), made when the first
    batch shows their width."""
    n = len(layers)
    counts = [len(calib[b : b + batch_size]) for b in range(0, calib.shape[0], batch_size)]
    hidden: list[torch.Tensor] = []
    extras: list[list] = [[] for _ in range(n)]

    def recorder(i: int):
        def forward(*args, **kwargs):
            if i == 0:
                x = args[0].detach()
                if not hidden:
                    hidden.extend(_slab([(c, *x.shape[1:]) for c in counts], torch.empty if spill is None else spill.empty))
                hidden[len(extras[0])].copy_(x)
                if spill is not None:
                    spill.page_out()
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
    return LayerInputs(hidden, extras, spill)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16), where oneDNN's
    bfloat16 GEMMs run several times faster than float32 ones; elsewhere they are emulated, slower."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def compute_autocast(dtype: str):
    """The calibration forward's precision (`data.calibration.compute_dtype`): "float32", or CPU
    autocast to that dtype, where linears, matmuls and attention run in bfloat16 (AMX/AVX512-BF16
    GEMMs, several times float32's rate on such CPUs) while norms, softmax statistics and the residual
    stream stay float32. Hessians, the methods' own arithmetic and the int8 products of W8A8 linears
    run outside it, in float32."""
    lower = dtype != "float32"
    return torch.autocast("cpu", dtype=getattr(torch, dtype) if lower else torch.bfloat16, enabled=lower)


def _run_layer(layer: nn.Module, inputs: LayerInputs, i: int, before_batch=None, stop_at: nn.Module | None = None,
               in_place: bool = False) -> list[torch.Tensor]:
    """The layer's outputs for every calibration batch; with `stop_at`, each batch's forward ends
    when that module is about to run (pre-hooks registered earlier have seen its input) and nothing
    is returned. `before_batch(b)` runs before batch b; `in_place` puts each output in place of its
    input as soon as it is computed (one set of activations alive instead of two)."""
    out = []
    handle = None
    if stop_at is not None:
        def stop(module, args):
            raise _Stop
        handle = stop_at.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for b, (h, (args, kwargs)) in enumerate(zip(inputs.hidden, inputs.extras[i])):
                if before_batch is not None:
                    before_batch(b)
                try:
                    with compute_autocast(inputs.compute_dtype):
                        y = layer(h, *args, **kwargs)
                except _Stop:
                    inputs.page_out()
                    continue
                y = y[0] if isinstance(y, tuple) else y
                if in_place and h.shape == y.shape:
                    y = h.copy_(y)  # batch b's inputs are not read again
                elif in_place:
                    inputs.hidden[b] = y
                inputs.page_out()
                out.append(y)
    finally:
        if handle is not None:
            handle.remove()
    return out


@dataclass
class _Tail:
    """A submodule of the layer (attention, MLP) whose output is the output of its last linear, alone
    (`arity` None) or first in a tuple of Nones: once that linear is final, later passes replay the
    submodule as that linear applied to the inputs it saw, instead of running everything in it again.
    `feeder` is the module (a norm) whose output is the submodule's input and nothing else's: while
    the submodule is replayed or silenced, it hands its input on uncomputed (see _find_feeders)."""
    path: str  # the submodule, relative to the layer
    arity: int | None
    feeder: str | None = None


def _probe(layer: nn.Module, prefix: str, mods: dict[str, nn.Module], inputs: LayerInputs, i: int) -> tuple[list[list[str]], dict[str, _Tail]]:
    """One run on the first calibration batch. Groups `mods` into steps: linears fed the very same
    tensor form one step, steps in the order the forward reaches them (q/k/v, o, gate/up, down).
    Finds, for a step of one linear, the outermost submodule that returns exactly that linear's output
    tensor (the attention for o_proj, the MLP for down_proj) and holds no linear of a later step."""
    order: list[str] = []
    feeds: dict[str, torch.Tensor] = {}  # held, so that no later tensor can take a freed one's address
    outputs: dict[str, object] = {}
    entered: dict[str, object] = {}  # submodule → the tensor it was called on
    calls: dict[str, int] = {}

    def pre(name):
        def fn(module, args):
            if name not in feeds:
                order.append(name)
                feeds[name] = args[0]
        return fn

    def post(path):
        def fn(module, args, output):
            calls[path] = calls.get(path, 0) + 1
            outputs[path] = output
        return fn

    def enter(path):
        def fn(module, args, kwargs):
            entered[path] = args[0] if args else kwargs.get("hidden_states")
        return fn

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in mods.items()]
    handles += [m.register_forward_hook(post(p)) for p, m in layer.named_modules() if p]
    handles += [m.register_forward_pre_hook(enter(p), with_kwargs=True) for p, m in layer.named_modules() if p]
    try:
        _run_layer(layer, inputs.first_batch(i), i)
    finally:
        for h in handles:
            h.remove()
    steps: list[list[str]] = []
    for n in order:
        a, b = feeds[steps[-1][0]] if steps else None, feeds[n]
        if a is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape:
            steps[-1].append(n)
        else:
            steps.append([n])
    step_of = {n: k for k, step in enumerate(steps) for n in step}

    tails: dict[str, _Tail] = {}
    for k, step in enumerate(steps):
        rel = step[0][len(prefix) + 1 :]
        if len(step) != 1 or calls.get(rel) != 1:
            continue
        parts = rel.split(".")
        for d in range(1, len(parts)):
            path = ".".join(parts[:d])
            out, y = outputs.get(path), outputs[rel]
            arity = None if out is y else (len(out) if isinstance(out, tuple) and out and out[0] is y
                                           and all(o is None for o in out[1:]) else -1)
            inside = [n for n in mods if n.startswith(f"{prefix}.{path}.")]
            if calls.get(path) == 1 and arity != -1 and all(step_of.get(n, len(steps)) <= k for n in inside):
                x = entered.get(path)
                feeder = None if x is None else next(
                    (p for p, o in outputs.items() if o is x and calls[p] == 1 and p != path and not p.startswith(path + ".")
                     and not any(n.startswith(f"{prefix}.{p}.") for n in mods)), None)
                tails[step[0]] = _Tail(path, arity, feeder)  # a candidate feeder: _find_feeders checks it
                break
    return steps + [[n] for n in mods if n not in feeds], tails  # never reached (should not happen): last


def _find_fold(layer: nn.Module, model: nn.Module, tails: dict[str, _Tail], inputs: LayerInputs, i: int) -> tuple[str, str] | None:
    """(attention's last linear, the MLP's) when the layer adds what its first tail returns (after
    any norm of its own) to its input and the rest of the layer works on that sum alone: then
    layer(h) is layer′(layer″(h)), where the MLP adds nothing in layer″ and attention nothing in
    layer′ — exactly, checked on the first calibration batch. True of pre-norm decoders; not of
    parallel attention/MLP blocks or post-norm ones, which keep attention's saved inputs instead."""
    if len(tails) < 2:
        return None
    (first, t1), (last, t2) = list(tails.items())[0], list(tails.items())[-1]
    one = inputs.first_batch(i)
    zeros = _Replays(layer, model, one.hidden)
    try:
        y = _run_layer(layer, one, i)
        zeros.zero(t2)
        h1 = _run_layer(layer, one, i)
        zeros.unpatch(t2)
        zeros.zero(t1)
        y2 = _run_layer(layer, dataclasses.replace(one, hidden=h1), i)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError):
        return None  # the layer does not take zeros there
    finally:
        zeros.close()
    return (first, last) if y[0].shape == y2[0].shape and torch.equal(y[0], y2[0]) else None


def _find_feeders(layer: nn.Module, model: nn.Module, tails: dict[str, _Tail], inputs: LayerInputs, i: int) -> dict[str, _Tail]:
    """`tails` with each candidate feeder kept only where the layer's output on the first calibration
    batch, the tail silenced, is exactly the same whether the feeder runs or hands its input on: then
    its output goes nowhere but into the tail, and passes that replay the tail need not compute it
    (the norm before attention in every pass after attention's last linear, and so on)."""
    one = inputs.first_batch(i)
    checked = {}
    for name, tail in tails.items():
        keep = None
        if tail.feeder is not None:
            replays = _Replays(layer, model, one.hidden)
            try:
                replays.zero(dataclasses.replace(tail, feeder=None))
                y = _run_layer(layer, one, i)
                replays.zero(tail)
                y2 = _run_layer(layer, one, i)
                keep = tail.feeder if y[0].shape == y2[0].shape and torch.equal(y[0], y2[0]) else None
            except (RuntimeError, TypeError, ValueError, IndexError, AttributeError):
                keep = None
            finally:
                replays.close()
        checked[name] = dataclasses.replace(tail, feeder=keep)
    return checked


class _Replays:
    """The submodules of one layer being replayed (see _Tail) or folded away, and which calibration
    batch runs."""

    def __init__(self, layer: nn.Module, model: nn.Module, hidden: list[torch.Tensor],
                 pool: SlabPool | None = None):
        self.layer, self.model, self.hidden, self.batch = layer, model, hidden, 0
        self.saved: dict[str, list[torch.Tensor]] = {}  # linear → its input per batch (output once memoized)
        self.pool = SlabPool() if pool is None else pool
        self.buffers: dict[str, torch.Tensor] = {}  # linear → the pool buffer its slab lives in
        self.done: dict[str, set[int]] = {}
        self.patched: set[nn.Module] = set()

    def record(self, linear: str, module: nn.Module):
        """A pre-hook keeping what enters `linear` in every batch of the pass that stops before it
        (in a slab, when it has the activations' leading shape, as it has in every family we know)."""
        saved = self.saved[linear] = []
        self.done[linear] = set()

        def keep(module, args):
            x, b = args[0].detach(), self.batch
            if not saved and x.shape[:-1] == self.hidden[b].shape[:-1]:
                self.buffers[linear], slab = self.pool.take([(*h.shape[:-1], x.shape[-1]) for h in self.hidden])
                saved.extend(slab)
            elif not saved:
                saved.extend([None] * len(self.hidden))
            if saved[b] is not None and saved[b].shape == x.shape:
                saved[b].copy_(x)
            else:
                saved[b] = x
        return module.register_forward_pre_hook(keep)

    def replay(self, linear: str, tail: _Tail) -> None:
        """From now on, `tail` returns `linear` (as it is now, W8A8 form included) of the saved inputs:
        computed once per batch and kept in place of them where the shapes agree (o_proj), computed
        per call otherwise (down_proj, whose output only the last pass needs)."""
        saved, done = self.saved[linear], self.done[linear]

        def forward(*args, **kwargs):
            b = self.batch
            if b in done:
                y = saved[b].clone()  # the layer may update what it gets in place
            else:
                y = self.model.get_submodule(linear)(saved[b])
                if y.shape == saved[b].shape:
                    saved[b].copy_(y)
                    done.add(b)
            return y if tail.arity is None else (y,) + (None,) * (tail.arity - 1)

        self._patch(tail, forward)

    def zero(self, tail: _Tail) -> None:
        """From now on, `tail` adds nothing: it returns zeros shaped like the layer's input."""
        def forward(*args, **kwargs):
            y = torch.zeros_like(self.hidden[self.batch])
            return y if tail.arity is None else (y,) + (None,) * (tail.arity - 1)

        self._patch(tail, forward)

    def unpatch(self, tail: _Tail) -> None:
        for path in (tail.path, tail.feeder):
            sub = self.layer.get_submodule(path) if path is not None else None
            if sub in self.patched:
                del sub.forward
                self.patched.discard(sub)

    def _patch(self, tail: _Tail, forward) -> None:
        sub = self.layer.get_submodule(tail.path)
        sub.forward = forward
        self.patched.add(sub)
        if tail.feeder is not None:
            feeder = self.layer.get_submodule(tail.feeder)
            feeder.forward = _hand_on
            self.patched.add(feeder)

    def fold(self, linear: str, tail: _Tail, later: _Tail, run_in_place) -> None:
        """Add the replayed `tail`'s contribution into the activations themselves, once: one pass
        with `later` (the MLP) adding nothing turns each layer input h into h + attention(h), the
        input that the rest of the layer works on (_find_fold checked that the layer is built so).
        Later passes get h + attention(h) with `tail` adding nothing, and the saved inputs go back
        to the pool before the MLP's are saved."""
        self.zero(later)
        try:
            run_in_place()
        finally:
            self.unpatch(later)
        self.zero(tail)
        self.release(linear)

    def release(self, linear: str) -> None:
        self.saved.pop(linear, None)
        self.done.pop(linear, None)
        if linear in self.buffers:
            self.pool.give_back(self.buffers.pop(linear))

    def close(self) -> None:
        for sub in self.patched:
            del sub.forward
        self.patched.clear()
        for linear in list(self.saved):
            self.release(linear)


def _hand_on(x, *args, **kwargs):
    """A feeder's forward while its tail does not read it (see _Tail)."""
    return x


def _group_inputs(layer: nn.Module, module: nn.Module, inputs: LayerInputs, i: int,
                  max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What enters `module` over the calibration set, in one pass: max |x| per input channel over
    every token (in,), and with `max_tokens` the token rows (tokens, in), evenly thinned to that
    many (rows at linspace(0, n − 1, max_tokens) of all n, picked batch by batch: the others are
    never held)."""
    absmax: torch.Tensor | None = None
    rows: list[torch.Tensor] = []
    n = sum(math.prod(h.shape[:-1]) for h in inputs.hidden)
    keep = None if max_tokens is None or n <= max_tokens else torch.linspace(0, n - 1, max_tokens).long()
    seen = 0

    def hook(m, a):
        nonlocal absmax, seen
        x = a[0].detach().reshape(-1, a[0].shape[-1]).float()
        batch_max = torch.maximum(x.amax(dim=0), x.amin(dim=0).neg_())  # max |x| without an |x| temporary
        absmax = batch_max if absmax is None else torch.maximum(absmax, batch_max)
        if max_tokens is not None:
            rows.append(x if keep is None else x[keep[(keep >= seen) & (keep < seen + len(x))] - seen])
        seen += len(x)

    handle = module.register_forward_pre_hook(hook)
    try:
        _run_layer(layer, inputs, i, stop_at=module)
    finally:
        handle.remove()
    return absmax, (torch.cat(rows) if max_tokens is not None else None)


def run_layerwise(model_dir: Path, store: WeightStore, stage, targets: list[str], calib: torch.Tensor | None,
                  out_dir: Path, ctx: RunContext, batch_size: int = 4, trust_remote_code: bool = False,
                  sparse: frozenset[str] = frozenset(), low_memory: bool = False,
                  compute_dtype: str = "float32") -> StageOutput:
    """Apply `stage` to the `targets` linears, one decoder layer at a time.

    "weights" stages get (W, H, name, keep) per linear; "smoothing" stages get each norm→linear group
    with the inputs that group sees. `sparse` names linears an earlier stage pruned: their zeros are
    passed on as `keep` masks so that later stages do not fill them in. Every tensor of the layer the
    stage changed is written to `out_dir/layer-NNN.safetensors` (quantized weights as codes + grid)."""
    model = build_skeleton(model_dir, trust_remote_code)
    aliases = tied_aliases(model)
    layout = decoder_layout(model)
    layers = model.get_submodule(layout.layers_path)
    out = StageOutput()
    spill = Spill(out_dir) if low_memory and Spill.available() else None  # its files go with its buffers

    inputs = None
    if stage.needs_calibration:
        # Materialize everything except the decoder layers and the LM head (not reached).
        head = model.get_output_embeddings()
        for name, child in model.named_modules():
            if name != layout.layers_path and not name.startswith(layout.layers_path + ".") and child is not head:
                materialize(model, name, store, aliases, recurse=False)
        check_finite(model.get_input_embeddings(), "embeddings")
        inputs = capture_layer_inputs(model, layers, calib, batch_size, spill)
        inputs.compute_dtype = compute_dtype
        emb = model.get_input_embeddings()
        release(model, module_name(model, emb))  # not needed again: free it

    head = module_name(model, model.get_output_embeddings())
    by_layer: dict[int, list[str]] = {}
    for t in targets:
        if t == head:
            continue
        idx = int(t[len(layout.layers_path) + 1 :].split(".")[0])
        by_layer.setdefault(idx, []).append(t)

    probes: dict = {}
    # saved-input slabs, reused by every layer (see _Replays); low_memory keeps them in files, or frees them
    slabs = SlabPool(retain=spill is not None or not low_memory, alloc=torch.empty if spill is None else spill.empty)
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
            before = {k: v.clone() for k, v in layer.state_dict().items()}
            quantized: dict[str, tuple] = {}
            if names and stage.role == "weights":
                _weights_stage(model, layer, i, names, stage, inputs, sparse, quantized, out, propagate=True, probes=probes,
                               slabs=slabs, low_memory=low_memory)
            else:
                if names and stage.role == "smoothing":
                    _smoothing_stage(model, layout, layer, i, set(names), stage, inputs, out)
                if inputs is not None:
                    _run_layer(layer, inputs, i, in_place=True)
            if inputs is not None:
                if not _batches_finite(inputs):
                    raise CompressionError(f"{lname}: its outputs became NaN/inf after {stage.kind}",
                                           hint="check the source weights; try more damping or fewer bits")
            dense = {f"{lname}.{k}": v for k, v in layer.state_dict().items()
                     if f"{lname}.{k}" not in quantized and not torch.equal(v, before[k])}
            if quantized or dense:
                f = out_dir / f"layer-{i:03d}.safetensors"
                save_overlay(f, dense, quantized)
                out.files.append(f)
            release(model, lname)
            _trim_heap()
            advance()
    slabs.clear()
    if head in targets:
        _head_stage(model, layers, head, stage, inputs, store, aliases, sparse, out_dir, out)
    return out


def _run_tail(model: nn.Module, layers: nn.ModuleList, inputs: LayerInputs, stop_at: nn.Module, before_batch) -> None:
    """Run what follows the decoder layers (final norm, any projection) on the last layer's outputs,
    stopping before `stop_at` runs: the model's own forward, with zeros for input embeddings and every
    decoder layer replaced by one that hands on the recorded outputs."""
    current: dict[str, torch.Tensor] = {}
    last = len(layers) - 1

    def passthrough(i: int):
        def forward(*args, **kwargs):
            return current["h"] if i == last else args[0]
        return forward

    def stop(module, args):
        raise _Stop

    for i, layer in enumerate(layers):
        layer.forward = passthrough(i)
    handle = stop_at.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for h in inputs.hidden:
                current["h"] = h
                before_batch()
                try:
                    model(inputs_embeds=torch.zeros_like(h), use_cache=False)
                except _Stop:
                    pass
                inputs.page_out()
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward


def _head_stage(model, layers, head: str, stage, inputs, store, aliases, sparse, out_dir: Path, out: StageOutput) -> None:
    """The output projection, after the last layer: its H comes from the final norm's outputs on the
    (already compressed) last layer's outputs. A head tied to the input embedding is written under its
    own name; the embedding keeps the float weights (written too if the checkpoint kept only the
    head's name)."""
    materialize(model, head, store, aliases)
    mod = model.get_submodule(head)
    check_finite(mod, head)
    hooks = None
    if inputs is not None:
        hooks = HessianHooks({head: mod}, {head: in_out_features(mod)[0]})
        try:
            _run_tail(model, layers, inputs, mod, hooks.next_batch)
        finally:
            hooks.remove()
    emb_weight = module_name(model, model.get_input_embeddings()) + ".weight"
    keep_embedding = emb_weight in aliases.get(head + ".weight", []) and emb_weight not in store
    original = mod.weight.data.clone() if keep_embedding else None
    quantized: dict[str, tuple] = {}
    _rewrite_linears([mod], [head], hooks.hessian(head) if hooks is not None else None, stage, sparse, quantized, out)
    dense = {} if quantized else {head + ".weight": mod.weight.data}
    if keep_embedding:
        dense[emb_weight] = original
    f = out_dir / "head.safetensors"
    save_overlay(f, dense, quantized)
    out.files.append(f)
    release(model, head)


@contextmanager
def _int8_inputs(model: nn.Module, quantized: dict[str, tuple]):
    """While propagating, run W8A8 linears as they will run at inference (int8 inputs per token)."""
    from kiln.model import swap_w8a8

    swapped = {}
    for wname, (q, _transposed, act) in quantized.items():
        if act is not None:
            swapped[wname.removesuffix(".weight")] = swap_w8a8(model, wname.removesuffix(".weight"), q, act.rotation)
    try:
        yield
    finally:
        for name, old in swapped.items():
            model.set_submodule(name, old)


def _weights_stage(model, layer, i, names, stage, inputs, sparse, quantized, out, propagate: bool = False,
                   probes: dict | None = None, replay: bool = True, slabs: SlabPool | None = None,
                   low_memory: bool = False) -> None:
    """Rewrite the layer's `names` linears; with calibration inputs and `sequential`, in steps (see
    _probe), each step's H taken from inputs through the steps already rewritten. W8A8 linears run as
    int8 from the moment they are rewritten, as at inference. With `propagate`, the calibration
    activations become the rewritten layer's outputs.

    Each pass stops before the step it calibrates, and a submodule whose last linear is final is
    replayed from that linear's saved inputs (_Tail), so a layer costs about one plain forward over
    the calibration set plus the Hessians (`replay=False` runs every pass in full: the same numbers,
    slower). `probes` caches _probe's answer per layer structure. `low_memory` recomputes the MLP in
    the last pass instead of keeping its last linear's inputs, and gives freed memory back to the OS
    after every pass: the same numbers, less memory, more time."""
    mods = {n_: model.get_submodule(n_) for n_ in names}
    steps, tails, fold = [names], {}, None
    if inputs is not None and getattr(stage, "sequential", False):
        prefix = module_name(model, layer)
        key = (type(layer).__name__, tuple(n_[len(prefix):] for n_ in names))
        probes = {} if probes is None else probes
        if key not in probes:  # kept relative to the layer, so that the next layer can use them
            found_steps, found_tails = _probe(layer, prefix, mods, inputs, i)
            found_tails = _find_feeders(layer, model, found_tails, inputs, i)
            found_fold = _find_fold(layer, model, found_tails, inputs, i)
            probes[key] = ([[n_[len(prefix):] for n_ in st] for st in found_steps],
                           {n_[len(prefix):]: t for n_, t in found_tails.items()},
                           tuple(n_[len(prefix):] for n_ in found_fold) if found_fold else None)
        rel_steps, rel_tails, rel_fold = probes[key]
        steps = [[prefix + r for r in st] for st in rel_steps]
        tails = {prefix + r: t for r, t in rel_tails.items()}
        if rel_fold and propagate and replay:  # folding rewrites the activations: only when they propagate
            fold = (prefix + rel_fold[0], tails[prefix + rel_fold[1]])
        if not replay:
            tails = {}
        elif low_memory and inputs.spill is None:  # the MLP's inputs: recomputed by the last pass instead of kept
            tails.pop(steps[-1][0], None)
    replays = _Replays(layer, model, inputs.hidden if inputs is not None else [], slabs)

    def propagate_in_place():  # the activations become what the layer, as it now is, makes of them
        _run_layer(layer, inputs, i, before_batch=lambda b: setattr(replays, "batch", b), in_place=True)

    with ExitStack() as int8:
        try:
            for step in steps:
                hooks = None
                if inputs is not None:
                    if len(steps) > 1:
                        # a step's linears read one tensor (see _probe): hook the first, stop before it runs
                        hooks = HessianHooks({step[0]: mods[step[0]]}, {step[0]: in_out_features(mods[step[0]])[0]})
                        for n_ in step[1:]:
                            hooks.share(n_, step[0])
                        stop = mods[step[0]]
                    else:
                        hooks = HessianHooks({n_: mods[n_] for n_ in step}, {n_: in_out_features(mods[n_])[0] for n_ in step})
                        stop = None
                    record = replays.record(step[0], mods[step[0]]) if step[0] in tails else None

                    def before(b, hooks=hooks):
                        replays.batch = b
                        hooks.next_batch()
                    try:
                        _run_layer(layer, inputs, i, before_batch=before, stop_at=stop)
                    finally:
                        hooks.remove()
                        if record is not None:
                            record.remove()
                    if low_memory:
                        _trim_heap()  # the pass's temporaries, before the rewrite allocates its own
                rewritten = len(quantized)
                if hooks is not None and len(steps) > 1:  # the step's linears share one H
                    _rewrite_linears([mods[n_] for n_ in step], step, hooks.hessian(step[0]), stage, sparse, quantized, out)
                else:
                    for n_ in step:
                        _rewrite_linears([mods[n_]], [n_], hooks.hessian(n_) if hooks is not None else None, stage, sparse, quantized, out)
                if low_memory:
                    hooks = None  # the step's H
                    _trim_heap()  # and the rewrite's temporaries, before the next pass allocates its own
                int8.enter_context(_int8_inputs(model, dict(list(quantized.items())[rewritten:])))
                if step[0] in tails:
                    replays.replay(step[0], tails[step[0]])
                if fold is not None and step[0] == fold[0]:
                    replays.fold(fold[0], tails[fold[0]], fold[1], propagate_in_place)
            if propagate and inputs is not None:
                propagate_in_place()
        finally:
            replays.close()


def _rewrite_linears(mods: list[nn.Module], names: list[str], H, stage, sparse, quantized: dict, out: StageOutput) -> None:
    """Let a "weights" stage rewrite linears that share H (one, or a step's q/k/v) in place; their
    codes (if any) go to `quantized`, their statistics to `out`."""
    t0 = time.perf_counter()
    Ws = [weight_matrix(m).float() for m in mods]
    keeps = [(W != 0) if n in sparse else None for W, n in zip(Ws, names)]
    act = stage.act_scheme
    block = rotation_block(act.rotation if act else None, Ws[0].shape[1])
    if block:  # quantize W R against the Hessian of x R (the plan keeps pruned layers out of this)
        Ws = [rotate(W, block) for W in Ws]
        H = None if H is None else rotate_hessian(H, block)
    try:
        results = stage.process_weights(Ws, H, names, keeps)
    except HessianNotPositiveDefinite as exc:
        raise CompressionError(str(exc), hint="add calibration samples, raise `damp`, or ignore this layer") from None
    seconds = round((time.perf_counter() - t0) / len(mods), 4)  # a joint call's time, shared out
    for mod, name, res in zip(mods, names, results):
        set_weight_matrix(mod, rotate(res.weight, block) if block else res.weight)  # R R = I: back to x's basis
        if res.quantized is not None:
            quantized[name + ".weight"] = (res.quantized, is_transposed(mod), act)
        out.modules[name] = {"seconds": seconds, **res.stats}


def _smoothing_stage(model, layout, layer, i, names: set[str], stage, inputs, out) -> None:
    from kiln.arch import smoothing_groups

    groups = smoothing_groups(model, layout, i, trace=lambda: _run_layer(layer, inputs.first_batch(i), i))
    for g in groups:
        if not names.intersection(g.linears):
            continue
        t0 = time.perf_counter()
        linears = {n_: model.get_submodule(n_) for n_ in g.linears}
        first = linears[g.linears[0]]
        absmax, X = _group_inputs(layer, first, inputs, i, stage.max_tokens)
        stats = stage.smooth(model.get_submodule(g.prev), g.prev, linears, X, names, absmax)
        if stats is None:
            continue
        for n_ in g.linears:
            out.modules.setdefault(n_, {}).update({"smoothed_by": g.prev, "seconds": round(time.perf_counter() - t0, 4), **stats})
