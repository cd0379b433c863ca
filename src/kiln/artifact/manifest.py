"""manifest.json: what an artifact is, where it came from, and the sha256 of every file in it."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from kiln import __version__
from kiln.errors import ArtifactError
from kiln.paths import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARIES = ("torch", "transformers", "safetensors", "compressed-tensors", "gguf", "datasets", "pydantic")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def file_digests(root: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(root)): {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}; not a kiln artifact (or an interrupted one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None


def verify(root: Path) -> dict:
    """Recompute every digest; raise ArtifactError naming each file that is missing, extra or changed."""
    root = Path(root)
    manifest = read_manifest(root)
    expected = manifest.get("files", {})
    actual = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems = [f"missing: {f}" for f in sorted(set(expected) - actual)]
    problems += [f"not in manifest: {f}" for f in sorted(actual - set(expected))]
    for f in sorted(set(expected) & actual):
        if sha256_file(root / f) != expected[f]["sha256"]:
            problems.append(f"sha256 mismatch: {f}")
    if problems:
        raise ArtifactError(f"{root}: artifact failed verification: " + "; ".join(problems),
                            hint="the artifact was modified after it was written; rebuild it with `kiln run`")
    return manifest


def base_manifest() -> dict:
    return {"schema_version": SCHEMA_VERSION, "kiln_version": __version__, "libraries": library_versions()}
