"""Model sources → one local safetensors folder (config, weights, tokenizer) plus a content digest.

GGUF sources (a file, a file inside a package, or parts split across packages) are dequantized to
fp32 by transformers once and cached as safetensors under the cache dir, keyed by the GGUF's sha256,
so the second run loads in seconds. Hub ids are fetched by transformers (network needed, never in
tests) and cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import InputError
from kiln.paths import cache_dir, cached_sha256, resolve_path
from kiln.recipe import ModelConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # folder with config.json, *.safetensors, tokenizer files
    digest: str  # sha256 of the source content
    origin: str  # what the recipe said
    kind: str  # "hf-folder" | "gguf" | "hub"


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(folder)).encode())
        h.update(cached_sha256(f).encode())
    return h.hexdigest()


def _convert_to_safetensors(load_dir: str, gguf_file: str | None, target: Path, trust_remote_code: bool,
                            revision: str | None = None, online: bool = False) -> None:
    """Load with transformers (dequantizing GGUF), save as safetensors into `target` atomically.
    Only `online` loads (a hub id not yet in the Hugging Face cache) may touch the network."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(trust_remote_code=trust_remote_code, revision=revision, local_files_only=not online)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(load_dir, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(load_dir, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"could not load model {load_dir}{'/' + gguf_file if gguf_file else ''}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        # torch.load's own message talks of weights_only, which is no help for a damaged file
        raise InputError(f"could not load model {load_dir}{'/' + gguf_file if gguf_file else ''}: a weight file is "
                         f"corrupt, truncated or not a PyTorch checkpoint ({type(exc).__name__})",
                         hint="re-download or re-save the checkpoint (as safetensors if you can)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        from safetensors.torch import save_model

        # save_pretrained refuses GGUF-loaded models; the weights are plain fp32 by now.
        # save_model drops the tied duplicates (lm_head = embed_tokens) the way save_pretrained does.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the GGUF grid is gone once dequantized
        cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_from_parts(parts: list[Path], digest: str) -> Path:
    out = cache_dir() / "gguf" / f"{digest}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, out)
    return out


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Find or build the safetensors folder for a recipe's model section."""
    if isinstance(cfg.source, list):
        parts = [resolve_path(p, "model part") for p in cfg.source]
        h = hashlib.sha256()
        for p in parts:
            h.update(cached_sha256(p).encode())
        digest = h.hexdigest()
        target = cache_dir() / "models" / digest
        if not (target / "config.json").exists():
            gguf = _gguf_from_parts(parts, digest)
            _convert_to_safetensors(str(gguf.parent), gguf.name, target, cfg.trust_remote_code)
            gguf.unlink(missing_ok=True)
        return _checked(ResolvedModel(target, digest, str(cfg.source), "gguf"))

    spec = cfg.source
    if looks_like_path(spec):
        path = resolve_path(spec, "model")
        gguf_file = cfg.gguf_file
        if path.is_file():
            if path.suffix != ".gguf":
                raise InputError(f"model {spec}: a single file must be a .gguf; for a HF checkpoint give its folder")
            path, gguf_file = path.parent, path.name
        if gguf_file:
            gpath = path / gguf_file
            if not gpath.is_file():
                raise InputError(f"model {spec}: GGUF file {gguf_file!r} not found in {path}")
            digest = cached_sha256(gpath)
            target = cache_dir() / "models" / digest
            if not (target / "config.json").exists():
                _convert_to_safetensors(str(path), gguf_file, target, cfg.trust_remote_code)
            return _checked(ResolvedModel(target, digest, spec, "gguf"))
        if not (path / "config.json").is_file():
            raise InputError(f"model {spec}: no config.json in {path}",
                             hint="give a Hugging Face checkpoint folder, a .gguf file, or set model.gguf_file")
        if not any(path.glob("*.safetensors")):
            if not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
                raise InputError(f"model {spec}: no weight files (*.safetensors, *.bin) in {path}")
            digest = _folder_digest(path)
            target = cache_dir() / "models" / digest
            if not (target / "config.json").exists():
                _convert_to_safetensors(str(path), None, target, cfg.trust_remote_code)
            return _checked(ResolvedModel(target, digest, spec, "hf-folder"))
        return _checked(ResolvedModel(path, _folder_digest(path), spec, "hf-folder"))

    digest = hashlib.sha256(f"hub:{spec}@{cfg.revision or 'main'}".encode()).hexdigest()
    target = cache_dir() / "models" / digest
    if not (target / "config.json").exists():
        online = not _in_hf_cache(spec, cfg.gguf_file or "config.json", cfg.revision)
        if online:
            _check_hub_reachable(spec)
        _convert_to_safetensors(spec, cfg.gguf_file, target, cfg.trust_remote_code, cfg.revision, online)
    return _checked(ResolvedModel(target, _folder_digest(target), spec, "hub"))


def looks_like_path(spec: str) -> bool:
    """A source is a path unless it reads as a Hugging Face id (`name` or `org/name`) and nothing
    on disk says otherwise: `./x`, `/x`, `~/x`, `pkg:x`, a model file suffix, two or more slashes,
    or a first component that is a local folder (`models/lama` next to `models/llama`) all mean a
    path, so a typo there fails at once as a missing path instead of as a hub lookup."""
    if spec.startswith(("pkg:", "/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    path = Path(spec)
    return path.exists() or path.suffix in (".gguf", ".json", *WEIGHT_SUFFIXES) or any(Path(p).is_dir() for p in path.parts[:1])


def _checked(model: ResolvedModel) -> ResolvedModel:
    """Every weight file's header read and its length checked before any work starts."""
    from kiln.model import safetensors_keys

    for f in sorted(model.path.glob("*.safetensors")):
        safetensors_keys(f)
    return model


def _in_hf_cache(repo_id: str, filename: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)


def _check_hub_reachable(repo_id: str) -> None:
    """One request, no retries: a hub id that is neither on disk nor cached fails in seconds with
    the reason, not after the hub client's minute of retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    what = f"model {repo_id!r} is not a local path and not in the Hugging Face cache"
    hint = "check the spelling; a local folder needs a path that exists (e.g. ./models/name)"
    if constants.is_offline_mode():
        raise InputError(f"{what}, and HF_HUB_OFFLINE is set", hint=hint)
    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    try:
        status = get_session().head(url, headers=build_hf_headers(), timeout=10, follow_redirects=True).status_code
    except Exception as exc:  # any transport failure (DNS, refused, TLS, proxy) is the same answer here
        raise InputError(f"{what}, and the hub could not be reached: {type(exc).__name__}: {exc}", hint=hint) from None
    if status >= 400:
        raise InputError(f"{what}, and the hub answered HTTP {status} for it (no such model, or it is private or gated)",
                         hint=hint)
