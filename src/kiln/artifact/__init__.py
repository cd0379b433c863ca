"""The artifact: a folder a serving engine reads, plus manifest.json. Written into a temporary
sibling folder and renamed into place, so an interrupted run never leaves half an artifact. A folder
is only ever replaced if it is a kiln artifact holding nothing but the files its manifest lists."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kiln.artifact.formats import packed_tensors
from kiln.artifact.manifest import CONTENT_DIGEST, MANIFEST, file_digests, protected, read_manifest, verify, write_manifest
from kiln.artifact.pack import unpack_int32
from kiln.errors import ArtifactError, KilnError
from kiln.model import stored_dtype
from kiln.recipe import OutputFormat

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
KILN_QUANT = "kiln_quantization.json"
SHARD_BYTES = 2 * 2**30


def _ct_format(act_bits) -> str:
    return "int-quantized" if act_bits else "pack-quantized"


def _ct_config(groups: dict[tuple, list[str]], ignore: list[str]) -> dict:
    """compressed-tensors' quantization_config: one scheme per distinct grid; W8A8 layers use the
    int-quantized format (int8 weights, dynamic per-token int8 inputs), weight-only ones pack-quantized."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config_groups = {}
    formats = {_ct_format(act) for (_, _, _, act) in groups}
    for k, ((bits, group_size, symmetric, act), names) in enumerate(sorted(groups.items(), key=str)):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="channel" if group_size is None else "group", group_size=group_size)
        acts = QuantizationArgs(num_bits=act, type="int", symmetric=True, strategy="token", dynamic=True) if act else None
        config_groups[f"group_{k}"] = QuantizationScheme(targets=sorted(names), weights=args, input_activations=acts,
                                                         format=_ct_format(act) if len(formats) > 1 else None)
    cfg = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                             quantization_status="compressed", ignore=ignore)
    return cfg.model_dump(mode="json", exclude_none=True)


def _ct_transforms(rotated: dict[str, int]) -> dict:
    """compressed-tensors' transform_config for W8A8 layers stored rotated: their weights are W R
    already, their inputs take R online, R = I ⊗ H_k (the `hadamard` transform with head_dim k)."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    from kiln.compress.rotation import hadamard_block

    by_block: dict[int, list[str]] = {}
    for m, width in rotated.items():
        by_block.setdefault(hadamard_block(width), []).append(m)
    schemes = {f"hadamard_{k}": TransformScheme(type="hadamard", head_dim=k,
                                                apply=[TransformArgs(targets=sorted(ms), location="input")])
               for k, ms in sorted(by_block.items())}
    return TransformConfig(config_groups=schemes).model_dump(mode="json", exclude_none=True)


def _ct_sparsity(sparse: dict[str, str], store) -> dict:
    """Pruned layers are stored dense (zeros written out); the config records where and how."""
    from compressed_tensors.config import SparsityCompressionConfig

    zeros = total = 0
    for m in sparse:
        w = store.get(m + ".weight")
        zeros += int((w == 0).sum())
        total += w.numel()
    structures = set(sparse.values())
    cfg = SparsityCompressionConfig.load_from_registry("dense", targets=sorted(sparse), ignore=[],
                                                       global_sparsity=zeros / max(total, 1),
                                                       sparsity_structure=structures.pop() if len(structures) == 1 else "unstructured")
    return cfg.model_dump(mode="json")


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class _ShardWriter:
    """Writes safetensors files one tensor at a time, so peak memory is one tensor, not the model:
    each shard's tensor bytes go to a side file as they are produced, and the shard is assembled
    (8-byte header length, JSON header, bytes) when it is full."""

    def __init__(self, root: Path, shard_bytes: int = SHARD_BYTES):
        self.root, self.shard_bytes = root, shard_bytes
        self.shards: list[tuple[Path, dict]] = []
        self.written: set[str] = set()
        self._open()

    def _open(self) -> None:
        self.data = self.root / f".shard-{len(self.shards)}.bin"
        self.fh = open(self.data, "wb")
        self.header: dict = {}
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.add_rows(name, list(t.shape), t.dtype, [t])

    def add_rows(self, name: str, shape: list[int], dtype: torch.dtype, blocks) -> None:
        """One tensor from consecutive row blocks (each converted to `dtype` as it comes)."""
        if name in self.written:  # a tied tensor reached under both of its names
            return
        self.written.add(name)
        nbytes = math.prod(shape) * dtype.itemsize
        if self.header and self.offset + nbytes > self.shard_bytes:
            self._close()
            self._open()
        written = 0
        for t in blocks:
            t = t.detach().to(dtype).contiguous().cpu()
            written += t.numel() * t.element_size()
            if t.numel():
                self.fh.write(t.reshape(-1).view(torch.uint8).numpy())
        if written != nbytes:
            raise ValueError(f"{name}: {written} bytes written for shape {shape} {dtype}")
        self.header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes

    def _close(self) -> None:
        self.fh.close()
        self.shards.append((self.data, self.header))

    def finish(self) -> None:
        self._close()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map, total = {}, 0
        for (data, header), name in zip(self.shards, names):
            head = json.dumps({"__metadata__": {"format": "pt"}, **dict(sorted(header.items()))}, separators=(",", ":")).encode()
            head += b" " * (-len(head) % 8)  # the format aligns the byte buffer to 8
            with open(self.root / name, "wb") as out, open(data, "rb") as src:
                out.write(len(head).to_bytes(8, "little"))
                out.write(head)
                shutil.copyfileobj(src, out, 16 * 2**20)
            data.unlink()
            weight_map.update({k: name for k in header})
            total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_checkpoint(root: Path, model_dir: Path, store, quantized: dict[str, dict], fmt: OutputFormat,
                     dtype: torch.dtype, tied: dict[str, str], sparse: dict[str, str] | None = None,
                     head: str | None = "lm_head", untied_head: bool = False) -> None:
    """Write config, tokenizer and weights. `quantized`: module name → {symmetric, transposed};
    `tied`: tied names → the canonical name the tensor is written under (the input embedding);
    `untied_head`: a stage rewrote the output projection `head`, so it is stored apart from the
    embedding and the config says so."""
    writer = _ShardWriter(root)
    groups: dict[tuple, list[str]] = {}
    rotated: dict[str, int] = {}  # W8A8 modules stored as W R → their input width
    for name in store.keys():
        if name.endswith((".qcodes", ".qscale", ".qzero")):
            continue
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and mod in quantized:
            q = store.quantized(name)
            info = quantized[mod]
            act = info.get("activation_bits")
            for k, t in packed_tensors(mod, q, info["symmetric"], dtype, int8=bool(act)).items():
                writer.add(k, t)
            groups.setdefault((q.bits, q.group_size, info["symmetric"], act), []).append(mod)
            if info.get("rotation", "none") != "none":
                rotated[mod] = q.codes.shape[1]
            continue
        rows = store.dense_rows(name)
        if rows is None:
            t = store.get(name)
            writer.add(tied.get(name, name), t.to(stored_dtype(t.shape, dtype)) if t.is_floating_point() else t)
        else:
            shape, src, blocks = rows
            writer.add_rows(tied.get(name, name), shape, stored_dtype(shape, dtype) if src.is_floating_point else src, blocks)
    writer.finish()

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    if untied_head:
        cfg["tie_word_embeddings"] = False
    if fmt is OutputFormat.compressed_tensors and groups:
        cfg["quantization_config"] = _ct_config(groups, ignore=[head] if head and head not in quantized else [])
        if rotated:
            cfg["quantization_config"]["transform_config"] = _ct_transforms(rotated)
    if fmt is OutputFormat.compressed_tensors and sparse:
        cfg.setdefault("quantization_config", {"quant_method": "compressed-tensors"})["sparsity_config"] = _ct_sparsity(sparse, store)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    if fmt is OutputFormat.kiln and groups:
        (root / KILN_QUANT).write_text(json.dumps({"modules": {m: quantized[m] for g in groups.values() for m in g}}, indent=2))
    for f in TOKENIZER_FILES:
        if (model_dir / f).is_file():
            shutil.copy2(model_dir / f, root / f)


MOVE_HINT = "move it elsewhere, or choose another --out"


def _foreign(target: Path) -> tuple[str, str] | None:
    """Why `target` is not a folder kiln may replace, and what to do; None when it may be replaced:
    absent, empty, or a kiln artifact with no file its manifest does not list (its listed files may
    be changed or missing)."""
    if not target.exists() and not target.is_symlink():
        return None
    if target.is_symlink() or not target.is_dir():
        return "is not a folder", MOVE_HINT
    present = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_symlink() or not p.is_dir()}
    if not present:
        return None
    if not (target / MANIFEST).is_file():
        return f"holds files but no kiln {MANIFEST}", MOVE_HINT
    try:
        listed = set(read_manifest(target)["files"])
    except KilnError as exc:  # whose folder it is cannot be told, so it is not deleted
        why = exc.message.removeprefix(f"{target / MANIFEST}: ")
        return (f"holds a {MANIFEST} kiln cannot read ({why})",
                "if it is kiln's artifact from an earlier run, delete the folder: it is rebuilt from the cached "
                f"stages; otherwise {MOVE_HINT}")
    extra = sorted(present - listed - {MANIFEST})
    return (f"holds files kiln did not write: {', '.join(extra[:5])}", MOVE_HINT) if extra else None


def _remove_stale(target: Path) -> None:
    """kiln's own hidden folders beside `target` left by a killed run: a staging folder, or the
    previous artifact moved aside by `commit` between its two renames."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def prepare(target: Path) -> None:
    """Before a run does any work: clear kiln's stale temporary folders beside `target`, and refuse
    a `target` that kiln did not write (it would be replaced, and kiln deletes only what it wrote)."""
    if (refusal := _foreign(target)) is not None:
        why, hint = refusal
        raise ArtifactError(f"{target} {why}; kiln replaces this folder with the artifact and will not delete it", hint=hint)
    if target.parent.is_dir():
        _remove_stale(target)


def _readable(root: Path) -> None:
    """mkdtemp makes the folder 0700; the artifact is read by other users (a serving account), so
    every folder and file gets the read (and folder search) bits the umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *(p for p in root.rglob("*") if not p.is_symlink())]:
        p.chmod(p.stat().st_mode | ((0o555 if p.is_dir() else 0o444) & ~mask))


def commit(tmp: Path, target: Path, manifest: dict) -> None:
    """Finish `tmp` (digests + manifest) and swap it into `target` with renames."""
    manifest["files"] = file_digests(tmp)
    manifest["size_bytes"] = sum(f["size_bytes"] for f in manifest["files"].values())
    write_manifest(tmp, manifest)
    _readable(tmp)
    if (refusal := _foreign(target)) is not None:  # appeared during the run
        why, hint = refusal
        raise ArtifactError(f"{target} {why}; the artifact was not written, so as not to delete it",
                            hint=f"{hint} (then rerun: the stages are cached)")
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / "a")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))


def reusable(target: Path, run_key: str, log) -> dict | None:
    """The verified manifest of the artifact at `target` if this run's key wrote it; None when it
    must be built, which includes an artifact that fails verification or whose manifest has no
    digest of its own (it is derived from the cached stages, so rebuilding it is the cheap repair)."""
    if not (target / MANIFEST).is_file() or read_manifest(target).get("run_key") != run_key:
        return None
    try:
        manifest = verify(target)
    except ArtifactError as exc:
        log(f"{exc.message}; rebuilding it from the cached stages")
        return None
    if not protected(manifest):
        log(f"{target / MANIFEST} has no {CONTENT_DIGEST} (an older kiln wrote it); rebuilding the artifact")
        return None
    return manifest


def _ct_modules(cfg: dict) -> dict[str, dict]:
    """Each quantized module's grid from compressed-tensors' quantization_config (kiln writes exact
    module names as targets), in the form kiln_quantization.json uses."""
    out = {}
    qcfg = cfg.get("quantization_config") or {}
    for group in qcfg.get("config_groups", {}).values():
        w = group["weights"]
        for t in group["targets"]:
            out[t] = {"bits": w["num_bits"], "group_size": w.get("group_size") if w.get("strategy") == "group" else None,
                      "symmetric": w["symmetric"], "transposed": False,
                      "activation_bits": (group.get("input_activations") or {}).get("num_bits")}
    for name, scheme in (qcfg.get("transform_config") or {}).get("config_groups", {}).items():
        for args in scheme["apply"]:
            if scheme["type"] != "hadamard" or args["location"] != "input" or scheme.get("randomize"):
                raise ArtifactError(f"transform_config.{name}: a {scheme['type']} transform at {args['location']} "
                                    "is not one kiln writes (kiln rotates W8A8 inputs by the plain hadamard only)",
                                    hint="load other checkpoints with transformers / compressed-tensors")
            for t in args["targets"]:
                if t not in out:
                    raise ArtifactError(f"transform_config.{name} rotates the inputs of {t}, which no quantization "
                                        "group names", hint="the config.json was edited or not written by kiln")
                out[t]["rotation"] = "hadamard"
    return out


def load_model(root: Path, verify_digests: bool = True):
    """Load an artifact as a float PyTorch model (weights dequantized). Digests are checked first.

    Both formats are unpacked here, each module with its own grid: transformers' compressed-tensors
    loader (dequantize) decompresses every dense module with one config group's scheme, which is
    wrong for a mixed-precision artifact (e.g. layers at 4 bits symmetric, the head asymmetric)."""
    from safetensors import safe_open

    from kiln.compress.quant import dequantize
    from kiln.compress.rotation import rotate, rotation_block
    from kiln.model import build_skeleton, tied_aliases

    root = Path(root)
    manifest = verify(root) if verify_digests else read_manifest(root)
    if manifest.get("format") == OutputFormat.compressed_tensors.value:
        info = _ct_modules(json.loads((root / "config.json").read_text()))
    else:
        info = json.loads((root / KILN_QUANT).read_text())["modules"] if (root / KILN_QUANT).exists() else {}
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            raw.update({k: h.get_tensor(k) for k in h.keys()})
    state = {k: v.float() if v.is_floating_point() else v for k, v in raw.items() if not any(
        k.startswith(m + ".weight_") for m in info)}
    for m, meta in info.items():
        scale = raw[f"{m}.weight_scale"].float()
        if meta.get("activation_bits"):
            W = raw[f"{m}.weight"].float() * scale
            if block := rotation_block(meta.get("rotation"), W.shape[1]):  # stored as W R; R R = I
                W = rotate(W, block)
            state[f"{m}.weight"] = W.T.contiguous() if meta["transposed"] else W
            continue
        out_f, in_f = raw[f"{m}.weight_shape"].tolist()
        codes = unpack_int32(raw[f"{m}.weight_packed"], meta["bits"], in_f)
        zero = (unpack_int32(raw[f"{m}.weight_zero_point"], meta["bits"], out_f, dim=0) if not meta["symmetric"]
                else torch.full_like(scale, 2 ** (meta["bits"] - 1)))
        W = dequantize(codes, scale, zero, meta["group_size"])
        state[f"{m}.weight"] = W.T.contiguous() if meta["transposed"] else W
    model = build_skeleton(root)
    modules = dict(model.named_modules())
    if unknown := [m for m in info if m not in modules]:
        raise ArtifactError(f"{root}: quantization targets {unknown[:3]} are not module names of this model; "
                            "kiln reads the artifacts it wrote", hint="load other checkpoints with transformers")
    aliases = tied_aliases(model)
    missing = [n for n in dict(model.named_parameters()) if n not in state
               and not any(a in state for a in aliases.get(n, []))]
    if missing:
        raise ArtifactError(f"{root}: weights missing from the checkpoint: {missing[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()
