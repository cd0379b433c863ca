"""Push an artifact to an OCI registry as an ORAS artifact: one layer per file (its path in the
artifact as the layer title, `org.opencontainers.image.title`), the empty config, an `artifactType`,
and manifest annotations carrying the manifest digest, the status and the headline metrics — what
`oras pull` reads. Blobs go first and the manifest (which creates the tag) last, so a push that fails
halfway leaves no tag. Credentials: KILN_OCI_USERNAME / KILN_OCI_PASSWORD (HTTP basic, or exchanged
for a bearer token where the registry asks for one). Loopback registries are spoken to over plain
HTTP, others over HTTPS unless KILN_OCI_INSECURE=1.

The distribution API calls are made here with requests rather than through oras-py: oras-py 0.2
treats a basic-auth challenge's realm as a token URL and retries it for minutes before failing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from kiln.errors import PublishError

ARTIFACT_TYPE = "application/vnd.kiln.artifact.v1+json"
FILE_MEDIA_TYPE = "application/vnd.kiln.file"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG = ("application/vnd.oci.empty.v1+json", b"{}")
DIGEST_KEY = "dev.kiln.manifest.sha256"
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
TIMEOUT = 60


class OciClient:
    """The few OCI distribution API calls a push and a pull need."""

    def __init__(self, dest):
        import requests

        self.dest = dest
        insecure = dest.host in LOOPBACK or os.environ.get("KILN_OCI_INSECURE") == "1"
        self.base = f"{'http' if insecure else 'https'}://{dest.address}/v2/{dest.name}"
        self.session = requests.Session()
        user, password = os.environ.get("KILN_OCI_USERNAME"), os.environ.get("KILN_OCI_PASSWORD")
        self.basic = (user, password) if user and password else None
        self.session.auth = self.basic

    def request(self, method: str, url: str, **kw):
        import requests

        try:
            r = self.session.request(method, url, timeout=TIMEOUT, **kw)
            if r.status_code == 401 and "bearer" in r.headers.get("WWW-Authenticate", "").lower():
                self._bearer(r.headers["WWW-Authenticate"])
                r = self.session.request(method, url, timeout=TIMEOUT, **kw)
        except requests.exceptions.ConnectionError:
            raise PublishError(f"OCI registry {self.dest.address} is not reachable",
                               hint="check the host and port, and that the registry is running") from None
        if r.status_code in (401, 403):
            raise PublishError(f"OCI registry {self.dest.address} refused the credentials (HTTP {r.status_code})",
                               hint="set KILN_OCI_USERNAME and KILN_OCI_PASSWORD to an account that may push to "
                                    f"{self.dest.name}")
        return r

    def _bearer(self, challenge: str) -> None:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        r = self.session.get(params.pop("realm"), params=params, auth=self.basic, timeout=TIMEOUT)
        if r.status_code != 200:
            raise PublishError(f"OCI registry {self.dest.address} refused the credentials (token: HTTP {r.status_code})",
                               hint="set KILN_OCI_USERNAME and KILN_OCI_PASSWORD")
        body = r.json()
        self.session.auth = None
        self.session.headers["Authorization"] = f"Bearer {body.get('token') or body.get('access_token')}"

    def manifest(self, ref: str) -> dict | None:
        r = self.request("GET", f"{self.base}/manifests/{ref}", headers={"Accept": MANIFEST_TYPE})
        if r.status_code == 404:
            return None
        self._ok(r, f"reading {ref}")
        return r.json()

    def has_blob(self, digest: str) -> bool:
        return self.request("HEAD", f"{self.base}/blobs/{digest}").status_code == 200

    def put_blob(self, path_or_bytes, digest: str, size: int) -> None:
        if self.has_blob(digest):
            return  # content-addressed: already there (a retry, or the same file in another artifact)
        r = self.request("POST", f"{self.base}/blobs/uploads/")
        self._ok(r, "starting an upload")
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.base.split("/v2/")[0] + loc
        sep = "&" if "?" in loc else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(path_or_bytes, bytes):
            r = self.request("PUT", f"{loc}{sep}digest={digest}", data=path_or_bytes, headers=headers)
        else:
            with open(path_or_bytes, "rb") as f:
                r = self.request("PUT", f"{loc}{sep}digest={digest}", data=f, headers=headers)
        self._ok(r, f"uploading {digest[:19]}")

    def get_blob(self, digest: str, out: Path) -> None:
        r = self.request("GET", f"{self.base}/blobs/{digest}", stream=True)
        self._ok(r, f"downloading {digest[:19]}")
        h = hashlib.sha256()
        with open(out, "wb") as f:
            for chunk in r.iter_content(1 << 20):
                h.update(chunk)
                f.write(chunk)
        if f"sha256:{h.hexdigest()}" != digest:
            raise PublishError(f"OCI registry {self.dest.address}: blob {digest} arrived with another digest")

    def put_manifest(self, tag: str, body: bytes) -> None:
        r = self.request("PUT", f"{self.base}/manifests/{tag}", data=body, headers={"Content-Type": MANIFEST_TYPE})
        self._ok(r, "writing the manifest")

    def _ok(self, r, action: str) -> None:
        if r.status_code >= 300:
            raise PublishError(f"OCI registry {self.dest.address}: {action} failed: HTTP {r.status_code} {r.text[:200]}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def annotations(manifest: dict, digest: str) -> dict[str, str]:
    from kiln.publish import flat_metrics

    headline = {k: round(v, 6) for k, v in flat_metrics(manifest.get("metrics", {})).items()
                if ".perplexity." in f".{k}" or k.endswith(".acc") or k.endswith("tokens_per_s_b1")}
    return {DIGEST_KEY: digest, "dev.kiln.status": str(manifest.get("status")),
            "dev.kiln.recipe": str(manifest.get("recipe_name")),
            "dev.kiln.source.sha256": str((manifest.get("source") or {}).get("sha256")),
            "dev.kiln.metrics": json.dumps(headline, sort_keys=True, separators=(",", ":")),
            "org.opencontainers.image.title": str(manifest.get("recipe_name"))}


def publish_oci(root: Path, manifest: dict, dest) -> dict:
    from kiln.publish import manifest_digest

    digest = manifest_digest(root)
    target = f"oci://{dest.address}/{dest.name}:{dest.tag}"
    client = OciClient(dest)
    current = client.manifest(dest.tag)
    if current is not None:
        if (current.get("annotations") or {}).get(DIGEST_KEY) == digest:
            return {"destination": target, "created": False, "manifest_sha256": digest,
                    "message": "already published: the tag holds this artifact"}
        raise PublishError(f"{target} already holds a different artifact",
                           hint="publish under a new tag; kiln never overwrites a tag")
    layers = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        d, size = _sha256_file(f), f.stat().st_size
        client.put_blob(f, d, size)
        layers.append({"mediaType": FILE_MEDIA_TYPE, "digest": d, "size": size,
                       "annotations": {"org.opencontainers.image.title": str(f.relative_to(root))}})
    cfg_type, cfg = EMPTY_CONFIG
    cfg_digest = "sha256:" + hashlib.sha256(cfg).hexdigest()
    client.put_blob(cfg, cfg_digest, len(cfg))
    body = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": ARTIFACT_TYPE,
                       "config": {"mediaType": cfg_type, "digest": cfg_digest, "size": len(cfg)},
                       "layers": layers, "annotations": annotations(manifest, digest)}).encode()
    client.put_manifest(dest.tag, body)  # last: the tag appears only once every blob is there
    return {"destination": target, "created": True, "manifest_sha256": digest, "layers": len(layers),
            "oci_manifest_digest": "sha256:" + hashlib.sha256(body).hexdigest()}


def pull_oci(uri: str, out: Path) -> Path:
    """Fetch an artifact pushed by publish_oci into `out` (each layer to its title path)."""
    from kiln.publish import parse_destination

    dest = parse_destination(uri)
    client = OciClient(dest)
    manifest = client.manifest(dest.tag)
    if manifest is None:
        raise PublishError(f"{uri} does not exist")
    out = Path(out)
    for layer in manifest["layers"]:
        rel = Path(layer["annotations"]["org.opencontainers.image.title"])
        if rel.is_absolute() or ".." in rel.parts:
            raise PublishError(f"{uri}: layer title {rel} escapes the folder")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        client.get_blob(layer["digest"], out / rel)
    return out
