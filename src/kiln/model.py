"""The lazy model: a skeleton whose parameters live on the meta device, filled one module at a time
from a `WeightStore`. This is what keeps peak memory at one decoder layer, not the whole model.

A WeightStore reads the source safetensors (memory-mapped) and, on top of it, the outputs of earlier
stages (latest wins). Quantized weights are kept as codes + grid and dequantized on read.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kiln.compress.quant import QuantizedWeight, dequantize
from kiln.errors import InputError

QSUFFIXES = (".qcodes", ".qscale", ".qzero")
STORAGE = "vectors-float32"  # names stored_dtype's rule in the keys of what depends on it (evaluations, artifacts)


def stored_dtype(shape, dtype: torch.dtype) -> torch.dtype:
    """The dtype a dense float tensor of this shape is written in when the artifact is in `dtype`:
    vectors (norm weights, biases: a few KiB) stay float32, as GGUF keeps them. Smoothing folds 1/s
    into a norm's weight, and a Gemma norm scales by 1 + w: where s is large, w ≈ −1, which float16
    holds to 2⁻¹¹, several percent of 1 + w."""
    return torch.float32 if len(shape) <= 1 else dtype


# bits per element, from the safetensors format's dtype list
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
              "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "C64": 64, "F8_E4M3": 8, "F8_E5M2": 8,
              "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape in a safetensors file, read from its header alone, after checking that the
    file is as long as the header says and that each tensor's byte range holds exactly its shape in
    its dtype: a truncated download or a corrupt header fails here, naming the file (and tensor),
    rather than at the first read of a tensor near its end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (its header cannot be read)",
                         hint="re-download or re-save the checkpoint")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        ranges = {k: (int(v["data_offsets"][0]), int(v["data_offsets"][1])) for k, v in tensors.items()}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
        dtypes = {k: str(v["dtype"]) for k, v in tensors.items()}
    except (TypeError, KeyError, IndexError, ValueError):
        raise InputError(f"{path}: not a safetensors file (its header has no byte ranges, shapes and dtypes)",
                         hint="re-download or re-save the checkpoint") from None
    expected = 8 + n + max((end for _, end in ranges.values()), default=0)
    if expected != size:
        raise InputError(f"{path}: truncated or corrupt: its header says {expected} bytes, the file has {size}",
                         hint="re-download or re-save the checkpoint")
    for name, (begin, end) in ranges.items():
        _check_tensor_range(path, name, shapes[name], dtypes[name], end - begin)
    return shapes


def _check_tensor_range(path: Path, name: str, shape: tuple[int, ...], dtype: str, nbytes: int) -> None:
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise InputError(f"{path}: tensor {name} has dtype {dtype!r}, which is not a safetensors dtype",
                         hint="re-download or re-save the checkpoint")
    count = 1
    for d in shape:
        count *= d
    if min(shape, default=0) < 0 or count * bits != nbytes * 8:
        raise InputError(f"{path}: corrupt header: tensor {name} is {dtype} of shape {list(shape)} "
                         f"({count * bits / 8:g} bytes) but its byte range holds {nbytes} bytes",
                         hint="re-download or re-save the checkpoint")


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file, with the checks of safetensors_shapes."""
    return list(safetensors_shapes(path))


class WeightStore:
    """Name → tensor over a base checkpoint folder and stage overlay files (latest first)."""

    def __init__(self, base: Path, overlays: list[Path] | None = None, round_to: torch.dtype | None = None):
        self.base = Path(base)
        self.round_to = round_to  # read tensors as they will be stored (scales and dense weights in this dtype)
        self.overlays = list(overlays or [])
        self._files: dict[str, Path] = {}
        self._quant_meta: dict[str, dict] = {}
        for f in sorted(self.base.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    self._files[k] = f
        if not self._files:
            raise InputError(f"no *.safetensors weights in {self.base}")
        for ov in self.overlays:
            self._add_overlay(ov)

    def _add_overlay(self, path: Path) -> None:
        with safe_open(path, "pt") as h:
            meta = json.loads((h.metadata() or {}).get("kiln_quant", "{}"))
            for k in h.keys():
                self._files[k] = path
        for weight_name, m in meta.items():
            self._quant_meta[weight_name] = m
            self._files.pop(weight_name, None)  # the dense original is superseded by its codes

    def with_overlays(self, paths: list[Path]) -> "WeightStore":
        return WeightStore(self.base, self.overlays + [Path(p) for p in paths], self.round_to)

    def rounded(self, dtype: torch.dtype | None) -> "WeightStore":
        return WeightStore(self.base, self.overlays, dtype)

    def _round(self, t: torch.Tensor, dense_shape=None) -> torch.Tensor:
        """t as the artifact will hold it (see stored_dtype for a dense tensor of `dense_shape`)."""
        if self.round_to is None or not t.is_floating_point():
            return t
        to = self.round_to if dense_shape is None else stored_dtype(dense_shape, self.round_to)
        return t.to(to).to(t.dtype)

    def keys(self) -> list[str]:
        return sorted(set(self._files) | set(self._quant_meta))

    def __contains__(self, name: str) -> bool:
        return name in self._files or name in self._quant_meta

    def _raw(self, name: str) -> torch.Tensor:
        with safe_open(self._files[name], "pt") as h:
            return h.get_tensor(name)

    def quantized(self, weight_name: str) -> QuantizedWeight | None:
        m = self._quant_meta.get(weight_name)
        if m is None:
            return None
        # scales as they will be stored (the same rounding get() applies before dequantizing)
        return QuantizedWeight(self._raw(weight_name + ".qcodes"), self._round(self._raw(weight_name + ".qscale")),
                               self._raw(weight_name + ".qzero"), m["bits"], m["group_size"], m["symmetric"])

    def quant_info(self, weight_name: str) -> dict | None:
        return self._quant_meta.get(weight_name)

    def dense_rows(self, name: str, max_bytes: int = 16 * 2**20):
        """A dense tensor's shape and dtype, and its rows (dim 0) in consecutive blocks of about
        `max_bytes`, read by slices: a large embedding is never in memory whole. None for a
        quantized weight or a 0-d tensor."""
        if name in self._quant_meta or name not in self._files:
            return None
        with safe_open(self._files[name], "pt") as h:
            sl = h.get_slice(name)
            shape = list(sl.get_shape())
            if not shape:
                return None
            first = sl[0:1]
        step = max(1, max_bytes // max(1, first.numel() * first.element_size()))

        def blocks():
            with safe_open(self._files[name], "pt") as h:
                sl = h.get_slice(name)
                for a in range(0, shape[0], step):
                    yield self._round(sl[a : a + step], shape)
        return shape, first.dtype, blocks()

    def get(self, name: str) -> torch.Tensor:
        m = self._quant_meta.get(name)
        if m is not None:
            scale = self._round(self._raw(name + ".qscale"))
            W = dequantize(self._raw(name + ".qcodes"), scale, self._raw(name + ".qzero"), m["group_size"])
            return W.T.contiguous() if m.get("transposed") else W
        if name not in self._files:
            raise KeyError(name)
        t = self._raw(name)
        return self._round(t, t.shape)


def save_overlay(path: Path, tensors: dict[str, torch.Tensor], quantized: dict[str, tuple]) -> None:
    """Write one stage's changed tensors. `quantized` maps weight name → (codes+grid, transposed[,
    activation scheme or None])."""
    from safetensors.torch import save_file

    out = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {}
    for name, (q, transposed, *act) in quantized.items():
        out[name + ".qcodes"] = q.codes.contiguous()
        out[name + ".qscale"] = q.scale.float().contiguous()
        out[name + ".qzero"] = q.zero.contiguous()
        a = act[0] if act else None
        meta[name] = {"bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric, "transposed": transposed,
                      "activation_bits": a.bits if a is not None else None}
        if a is not None and a.rotated:
            meta[name]["rotation"] = a.rotation
    save_file(out, str(path), metadata={"kiln_quant": json.dumps(meta)})


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def config_json(model_dir: Path) -> dict:
    """A checkpoint's config.json as a dict; InputError naming the file when it is not one."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                         hint="fix or replace the checkpoint's config.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path} holds a JSON {type(cfg).__name__}, not an object of config fields")
    return cfg


def load_config(model_dir: Path, trust_remote_code: bool = False):
    """The model's transformers config; InputError naming the folder when config.json is not JSON
    or names a model_type this transformers does not know."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from kiln.arch import DECODER_LAYERS

    model_type = config_json(model_dir).get("model_type")
    if model_type is not None and model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise InputError(f"model {model_dir}: config.json has model_type {model_type!r}, which transformers "
                         f"{transformers.__version__} does not know",
                         hint=f"kiln handles the families transformers knows; its tables cover {', '.join(DECODER_LAYERS)}")
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"model {model_dir}: transformers cannot read its config.json: {exc}") from None


def build_skeleton(model_dir: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on meta and its non-persistent buffers (rotary tables,
    embedding scales) computed for real on CPU, the way transformers' loader does it."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_dir, trust_remote_code)
    with _quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    owners = {}
    for name, buf in model.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(mod_name) if mod_name else model
        if leaf in owner._non_persistent_buffers_set:
            owner._buffers[leaf] = torch.empty_like(buf, device="cpu")
            owners[mod_name] = owner
    for owner in owners.values():
        model._init_weights(owner)
    model.tie_weights()
    model.eval()
    return model


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """For each tied parameter name, every name of the same tensor (checkpoints keep only one of
    them, and which one depends on the writer)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: names for names in groups.values() if len(names) > 1 for n in names}


def stored_apart(store: WeightStore, aliases: dict[str, list[str]]) -> bool:
    """Whether the store holds a tied tensor under two of its names (a stage rewrote one of them, as
    quantizing the output projection of a model whose head is its input embedding does)."""
    return any(sum(n in store for n in names) > 1 for names in aliases.values())


def materialize(model: nn.Module, prefix: str, store: WeightStore, aliases: dict[str, list[str]] | None = None,
                recurse: bool = True) -> None:
    """Load every parameter and persistent buffer under `prefix` from the store (in place)."""
    module = model.get_submodule(prefix) if prefix else model
    aliases = aliases if aliases is not None else tied_aliases(model)
    subs = module.named_modules() if recurse else [("", module)]
    for sub_name, sub in subs:
        full_mod = f"{prefix}.{sub_name}".strip(".") if sub_name else prefix
        for leaf, p in list(sub._parameters.items()):
            if p is None or not p.is_meta:
                continue
            name = f"{full_mod}.{leaf}" if full_mod else leaf
            key = next((k for k in [name, *aliases.get(name, [])] if k in store), None)
            if key is None:
                raise InputError(f"weight {name} is missing from the checkpoint {store.base}")
            sub._parameters[leaf] = nn.Parameter(store.get(key).to(p.dtype), requires_grad=False)
        for leaf, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                name = f"{full_mod}.{leaf}" if full_mod else leaf
                sub._buffers[leaf] = store.get(name).to(b.dtype)


def check_checkpoint(model: nn.Module, model_dir: Path) -> None:
    """Every parameter and persistent buffer of the skeleton is in the checkpoint under its module
    name (a tied tensor under any of its names), in the shape the skeleton built from config.json
    gives it: checked at plan time, from the headers alone, because `materialize` would only find a
    missing one when it reaches that module, and a wrong shape only when a layer multiplies by it."""
    shapes = {k: v for f in sorted(Path(model_dir).glob("*.safetensors")) for k, v in safetensors_shapes(f).items()}
    aliases = tied_aliases(model)
    tensors = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    tensors += [(n, b) for n, b in model.named_buffers() if b.is_meta]
    found = {n: next((k for k in [n, *aliases.get(n, [])] if k in shapes), None) for n, _ in tensors}
    missing = [n for n, k in found.items() if k is None]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise InputError(f"model {model_dir} ({model.config.model_type}): the checkpoint has no tensor named {shown}",
                         hint="kiln reads each tensor under its module's name as stored in the file; a family whose "
                              "tensors transformers renames while loading (gpt_neox: embed_out → lm_head) or an "
                              "incomplete checkpoint cannot be compressed (README: Architectures)")
    wrong = [(found[n], tuple(t.shape), shapes[found[n]]) for n, t in tensors if tuple(t.shape) != shapes[found[n]]]
    if wrong:
        shown = "; ".join(f"{k}: config.json gives {list(want)}, the weights hold {list(got)}"
                          for k, want, got in wrong[:4]) + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise InputError(f"model {model_dir}: config.json and the weights disagree on tensor shapes: {shown}",
                         hint="use the config.json that was saved with these weights (or re-save the checkpoint)")


def release(model: nn.Module, prefix: str) -> None:
    """Return the parameters under `prefix` to the meta device, freeing their memory."""
    module = model.get_submodule(prefix)
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def load_full(model_dir: Path, store: WeightStore, trust_remote_code: bool = False) -> nn.Module:
    """Skeleton + every weight: the whole model in memory (evaluation). Linears whose inputs are
    quantized at inference (W8A8) become int8 modules that quantize their inputs per token."""
    model = build_skeleton(model_dir, trust_remote_code)
    aliases = tied_aliases(model)
    materialize(model, "", store, aliases)
    if stored_apart(store, aliases):
        model.config.tie_word_embeddings = False  # a stage rewrote the head: keep it apart from the embedding
    else:
        model.tie_weights()
    for name in store.keys():
        info = store.quant_info(name)
        if info and info.get("activation_bits"):
            swap_w8a8(model, name.removesuffix(".weight"), store.quantized(name), info.get("rotation", "none"))
    return model


def swap_w8a8(model: nn.Module, module_name: str, q: QuantizedWeight, rotation: str = "none") -> nn.Module:
    """Replace a linear by its W8A8 form (int8 per-channel weights, dynamic per-token int8 inputs,
    rotated first when `rotation` is 'hadamard': then q holds W R's codes); returns the module it replaced."""
    from kiln.compress.rotation import rotation_block
    from kiln.compress.w8a8 import W8A8Linear

    old = model.get_submodule(module_name)
    bias = getattr(old, "bias", None)
    model.set_submodule(module_name, W8A8Linear.from_quantized(q.codes, q.scale, None if bias is None else bias.detach(),
                                                               rotation=rotation_block(rotation, q.codes.shape[1])))
    return old
