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


def _failed_gates(manifest: dict) -> list[str]:
    """The recorded gate checks that did not pass; a record kiln could not have written counts as failed."""
    gates = manifest.get("gates") or []
    if not isinstance(gates, list):
        return [f"'gates' is a JSON {type(gates).__name__}, not a list"]
    return [f"{g.get('gate')} {g.get('subject')}" if isinstance(g, dict) else repr(g)
            for g in gates if not (isinstance(g, dict) and g.get("passed") is True)]


def publishable(root: Path) -> dict:
    """The manifest of an artifact that may be published: every digest verified, the manifest's own
    included (one without it is refused: its status could have been edited), status accepted and
    every recorded gate passed."""
    from kiln.artifact.manifest import CONTENT_DIGEST, MANIFEST, protected, verify

    manifest = verify(root)  # ArtifactError (exit 7) for a tampered, incomplete or foreign folder
    rebuild = "rerun `kiln run` with its recipe to rebuild the artifact"
    if not protected(manifest):
        raise PublishError(f"{Path(root) / MANIFEST} has no {CONTENT_DIGEST}: an older kiln wrote it, or it was edited, "
                           "so its status and metrics cannot be trusted; only an artifact whose manifest carries its "
                           "own digest is published", hint=f"{rebuild}: that writes a protected manifest")
    failed = _failed_gates(manifest)
    if manifest.get("status") != "accepted":
        raise PublishError(f"{root}: the artifact is {manifest.get('status')!r}; only accepted artifacts are published"
                           + (f" (failed gates: {', '.join(failed)})" if failed else ""),
                           hint="fix the recipe or its gates and rerun kiln run")
    if failed:
        raise PublishError(f"{root}: the manifest says 'accepted' but records failed gates ({', '.join(failed)}); "
                           "an artifact is published only when every gate passed", hint=rebuild)
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
