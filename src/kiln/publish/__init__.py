"""publish: a verified, accepted artifact → a model registry. `mlflow://HOST:PORT/MODEL` registers a
model version; `oci://HOST:PORT/REPO:TAG` pushes an ORAS artifact. Both are idempotent on the digest
of manifest.json (which holds every file's digest): publishing the same artifact again creates
nothing. Credentials come from the environment only."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from kiln.errors import PublishError


@dataclass(frozen=True)
class Destination:
    scheme: str  # mlflow | oci
    host: str
    port: int | None
    name: str  # MLflow model name, or OCI repository
    tag: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.port else self.host


def parse_destination(uri: str) -> Destination:
    u = urlparse(uri)
    hint = "use mlflow://HOST:PORT/MODEL_NAME or oci://HOST:PORT/REPOSITORY:TAG"
    if u.scheme not in ("mlflow", "oci") or not u.hostname or not u.path.strip("/"):
        raise PublishError(f"--to {uri!r}: not a destination kiln can publish to", hint=hint)
    try:
        port = u.port
    except ValueError:
        raise PublishError(f"--to {uri!r}: the port is not a number", hint=hint) from None
    path = u.path.strip("/")
    if u.scheme == "oci":
        repo, _, tag = path.rpartition(":") if ":" in path else (path, "", "")
        if not tag or not repo or "/" in tag:
            raise PublishError(f"--to {uri!r}: an OCI destination needs REPOSITORY:TAG", hint=hint)
        return Destination("oci", u.hostname, port, repo, tag)
    return Destination("mlflow", u.hostname, port, path)


def manifest_digest(root: Path) -> str:
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


def publishable(root: Path) -> dict:
    """The manifest of an artifact that may be published: every digest verified, status accepted."""
    from kiln.artifact.manifest import verify

    manifest = verify(root)  # ArtifactError (exit 7) for a tampered, incomplete or foreign folder
    if manifest.get("status") != "accepted":
        failed = [f"{g['gate']} {g['subject']}" for g in manifest.get("gates", []) if not g["passed"]]
        raise PublishError(f"{root}: the artifact is {manifest.get('status')!r}; only accepted artifacts are published"
                           + (f" (failed gates: {', '.join(failed)})" if failed else ""),
                           hint="fix the recipe or its gates and rerun kiln run")
    return manifest


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Numeric leaves of the metrics as dotted names (variant.perplexity.set, variant.tasks.task.acc, …)."""
    out: dict[str, float] = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k != "details":
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix.replace(":", "_")] = float(v)

    walk("", metrics)
    return out


def publish(root: Path, uri: str) -> dict:
    dest = parse_destination(uri)
    manifest = publishable(root)
    if dest.scheme == "oci":
        from kiln.publish.oci import publish_oci

        return publish_oci(Path(root), manifest, dest)
    from kiln.publish.mlflow import publish_mlflow

    return publish_mlflow(Path(root), manifest, dest)
