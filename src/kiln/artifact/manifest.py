"""manifest.json: what an artifact is, where it came from, and the sha256 of every file in it, plus
the sha256 of its own content (`content_sha256`), so an edited status or metric fails verification
like an edited file. That guards against accidental edits, not forgery: anyone can recompute it."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from kiln import __version__
from kiln.errors import ArtifactError, InputError
from kiln.paths import sha256_file

SCHEMA_VERSION = 2  # 2: content_sha256 (schema 1 manifests have none and verify as unprotected)
MANIFEST = "manifest.json"
CONTENT_DIGEST = "content_sha256"
REQUIRED = ("schema_version", "kiln_version", "status", "files")
UNPROTECTED = (f"note: this manifest has no {CONTENT_DIGEST} (a kiln before schema 2 wrote it, or it was removed), so an edit "
               "to it goes undetected and `kiln publish` refuses it; rerun `kiln run` to rebuild the artifact with one")
LIBRARIES = ("torch", "transformers", "safetensors", "compressed-tensors", "gguf", "datasets", "pydantic")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def content_files(root: Path) -> list[Path]:
    """Every file of the artifact but its own top-level manifest.json (a manifest.json deeper down is
    content like any other file)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root) != Path(MANIFEST))


def file_digests(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "size_bytes": p.stat().st_size} for p in content_files(root)}


def content_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without its own digest."""
    body = {k: v for k, v in manifest.items() if k != CONTENT_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(root: Path, manifest: dict) -> None:
    manifest[CONTENT_DIGEST] = content_digest(manifest)
    (Path(root) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))


def protected(manifest: dict) -> bool:
    """Whether the manifest carries its own digest (schema 2 on); schema 1 manifests do not."""
    return CONTENT_DIGEST in manifest


def _shape_problems(data) -> list[str]:
    if not isinstance(data, dict):
        return [f"the top level is a JSON {type(data).__name__}, not an object"]
    out = [f"no {k!r} key" for k in REQUIRED if k not in data]
    if not isinstance(data.get("schema_version", 1), int):
        out.append(f"schema_version is {data['schema_version']!r}, not an integer")
    files = data.get("files", {})
    if not isinstance(files, dict):
        return out + [f"'files' is a JSON {type(files).__name__}, not an object of path → {{sha256, size_bytes}}"]
    bad = [f for f, v in files.items() if not (isinstance(v, dict) and isinstance(v.get("sha256"), str))]
    if bad:
        out.append(f"files {bad[:3]} have no sha256 string")
    return out


def read_manifest(root: Path) -> dict:
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such folder", hint="give an artifact folder: the artifact/ under a `kiln run --out` folder")
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a folder; an artifact is a folder holding {MANIFEST}")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}; not a kiln artifact (or an interrupted one)")
    hint = f"restore the {MANIFEST} kiln wrote, or delete {root} and rerun `kiln run` to rebuild it"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})", hint=hint) from None
    if problems := _shape_problems(data):
        raise ArtifactError(f"{path}: not a kiln manifest: " + "; ".join(problems), hint=hint)
    return data


def verify(root: Path) -> dict:
    """Check the manifest's own digest, then recompute every file's; raise ArtifactError naming each
    file that is missing, extra or changed."""
    root = Path(root)
    manifest = read_manifest(root)
    if (manifest["schema_version"] >= 2 or protected(manifest)) and manifest.get(CONTENT_DIGEST) != content_digest(manifest):
        raise ArtifactError(f"{root / MANIFEST}: its content does not match its {CONTENT_DIGEST}: the manifest was "
                            "edited after kiln wrote it (status, metrics and file digests cannot be trusted)",
                            hint="restore the original manifest.json, or rerun `kiln run` with its recipe to rebuild the artifact")
    expected = manifest["files"]
    actual = {str(p.relative_to(root)) for p in content_files(root)}
    problems = [f"missing: {f}" for f in sorted(set(expected) - actual)]
    problems += [f"not in manifest: {f}" for f in sorted(actual - set(expected))]
    for f in sorted(set(expected) & actual):
        if sha256_file(root / f) != expected[f]["sha256"]:
            problems.append(f"sha256 mismatch: {f}")
    if problems:
        raise ArtifactError(f"{root}: artifact failed verification: " + "; ".join(problems),
                            hint="the artifact was modified after it was written; rerun `kiln run` with its recipe to rebuild it")
    return manifest


def base_manifest() -> dict:
    return {"schema_version": SCHEMA_VERSION, "kiln_version": __version__, "libraries": library_versions()}
