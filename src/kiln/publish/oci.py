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

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from kiln.errors import PublishError

ARTIFACT_TYPE = "application/vnd.kiln.artifact.v1+json"
FILE_MEDIA_TYPE = "application/vnd.kiln.file"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG = ("application/vnd.oci.empty.v1+json", b"{}")
DIGEST_KEY = "dev.kiln.manifest.sha256"
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
CONNECT_TIMEOUT = 10  # seconds to open the connection
READ_TIMEOUT = 60  # seconds the registry may stay silent while answering
CREDENTIAL_VARS = ("KILN_OCI_USERNAME", "KILN_OCI_PASSWORD")
NOT_A_REGISTRY = "check that --to names an OCI registry (one serving the distribution API under /v2/), " \
                 "not a web server or another service on that port"


def _snippet(text: str, limit: int = 80) -> str:
    """The start of a body on one printable line, for an error message."""
    flat = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in flat)[:limit]


class OciClient:
    """The few OCI distribution API calls a push and a pull need."""

    def __init__(self, dest):
        import requests

        self.dest = dest
        insecure = dest.host in LOOPBACK or os.environ.get("KILN_OCI_INSECURE") == "1"
        self.base = f"{'http' if insecure else 'https'}://{dest.address}/v2/{dest.name}"
        self.session = requests.Session()
        user, password = (os.environ.get(v) for v in CREDENTIAL_VARS)
        self.basic = (user, password) if user and password else None
        self.session.auth = self.basic

    def request(self, method: str, url: str, action: str, **kw):
        r = self._send(method, url, action, **kw)
        challenge = r.headers.get("WWW-Authenticate", "")
        if r.status_code == 401 and "bearer" in challenge.lower():
            self._bearer(challenge, action)
            r = self._send(method, url, action, **kw)
        if r.status_code in (401, 403):
            raise self._denied(f"HTTP {r.status_code} while {action}")
        return r

    def _send(self, method: str, url: str, action: str, **kw):
        with self._transport(action, method, url):
            return self.session.request(method, url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), **kw)

    @contextlib.contextmanager
    def _transport(self, action: str, method: str, url: str) -> Iterator[None]:
        """Every failure of requests itself (no answer, TLS, a redirect loop, a cut-off body…) as a PublishError."""
        import requests.exceptions as rx

        registry, where = f"OCI registry {self.dest.address}", f"{action} ({method} {url.split('?')[0]})"
        try:
            yield
        except rx.ConnectTimeout:
            raise PublishError(f"{registry} is not reachable: no connection within {CONNECT_TIMEOUT} s while {where}",
                               hint="check the host and port, and that the registry is running") from None
        except rx.Timeout:
            raise PublishError(f"{registry} accepted the connection but did not answer within {READ_TIMEOUT} s "
                               f"while {where}",
                               hint="check that the registry is healthy, and that HOST:PORT is the registry's") from None
        except rx.SSLError as exc:
            reason = re.search(r"\[SSL[^\]]*\]\s*(.*?)\s*\(_ssl", str(exc))  # OpenSSL's words, not the pool's
            why = f" ({reason[1]})" if reason else ""
            raise PublishError(f"{registry}: the TLS handshake failed{why} while {where}",
                               hint="for a registry that speaks plain HTTP set KILN_OCI_INSECURE=1; for a private CA "
                                    "point REQUESTS_CA_BUNDLE at its certificate") from None
        except rx.ConnectionError:
            raise PublishError(f"{registry} is not reachable while {where}",
                               hint="check the host and port, and that the registry is running") from None
        except rx.RequestException as exc:
            raise PublishError(f"{registry}: {where} failed: {type(exc).__name__}: {_snippet(str(exc), 200)}",
                               hint=NOT_A_REGISTRY) from None

    def _denied(self, what: str) -> PublishError:
        registry = f"OCI registry {self.dest.address}"
        if self.basic is None:
            unset = [v for v in CREDENTIAL_VARS if not os.environ.get(v)]
            return PublishError(f"{registry} requires authentication; none were given ({what})",
                                hint=f"set {' and '.join(CREDENTIAL_VARS)} in the environment to an account that may "
                                     f"push to {self.dest.name} ({' and '.join(unset)} "
                                     f"{'is' if len(unset) == 1 else 'are'} not set)")
        return PublishError(f"{registry} refused the credentials ({what})",
                            hint=f"set {' and '.join(CREDENTIAL_VARS)} to an account that may push to {self.dest.name}")

    def _bearer(self, challenge: str, action: str) -> None:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm:
            raise PublishError(f"OCI registry {self.dest.address} asked for a bearer token without a realm to get it "
                               f"from (WWW-Authenticate: {_snippet(challenge)!r}) while {action}", hint=NOT_A_REGISTRY)
        what = f"requesting a token for {action}"
        with self._transport(what, "GET", realm):
            r = self.session.get(realm, params=params, auth=self.basic, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        if r.status_code in (401, 403):
            raise self._denied(f"token: HTTP {r.status_code}")
        self._ok(r, what)
        body = self._json(r, what)
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str):
            raise PublishError(f"OCI registry {self.dest.address}: {what}: {realm} answered without a token",
                               hint=NOT_A_REGISTRY)
        self.session.auth = None
        self.session.headers["Authorization"] = f"Bearer {token}"

    def manifest(self, ref: str) -> dict | None:
        action = f"reading tag {ref}"
        r = self.request("GET", f"{self.base}/manifests/{ref}", action, headers={"Accept": MANIFEST_TYPE})
        if r.status_code == 404:
            return None
        self._ok(r, action)
        return self._json(r, action)

    def has_blob(self, digest: str) -> bool:
        return self.request("HEAD", f"{self.base}/blobs/{digest}", f"looking for blob {digest[:19]}").status_code == 200

    def put_blob(self, path_or_bytes, digest: str, size: int) -> None:
        if self.has_blob(digest):
            return  # content-addressed: already there (a retry, or the same file in another artifact)
        action = "starting an upload"
        r = self.request("POST", f"{self.base}/blobs/uploads/", action)
        self._ok(r, action)
        loc = r.headers.get("Location")
        if not loc:
            raise PublishError(f"OCI registry {self.dest.address}: {action}: {r.url} answered HTTP {r.status_code} "
                               "without the Location header the OCI distribution API sends", hint=NOT_A_REGISTRY)
        if loc.startswith("/"):
            loc = self.base.split("/v2/")[0] + loc
        sep = "&" if "?" in loc else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        action = f"uploading {digest[:19]}"
        if isinstance(path_or_bytes, bytes):
            r = self.request("PUT", f"{loc}{sep}digest={digest}", action, data=path_or_bytes, headers=headers)
        else:
            with open(path_or_bytes, "rb") as f:
                r = self.request("PUT", f"{loc}{sep}digest={digest}", action, data=f, headers=headers)
        self._ok(r, action)

    def get_blob(self, digest: str, out: Path) -> None:
        action, url = f"downloading {digest[:19]}", f"{self.base}/blobs/{digest}"
        r = self.request("GET", url, action, stream=True)
        self._ok(r, action)
        h = hashlib.sha256()
        with open(out, "wb") as f, self._transport(action, "GET", url):
            for chunk in r.iter_content(1 << 20):
                h.update(chunk)
                f.write(chunk)
        if f"sha256:{h.hexdigest()}" != digest:
            raise PublishError(f"OCI registry {self.dest.address}: blob {digest} arrived with another digest")

    def put_manifest(self, tag: str, body: bytes) -> None:
        action = "writing the manifest"
        r = self.request("PUT", f"{self.base}/manifests/{tag}", action, data=body, headers={"Content-Type": MANIFEST_TYPE})
        self._ok(r, action)

    def _ok(self, r, action: str) -> None:
        if r.status_code >= 300:
            raise PublishError(f"OCI registry {self.dest.address}: {action} failed: HTTP {r.status_code} "
                               f"{_snippet(r.text, 200)}")

    def _json(self, r, action: str) -> dict:
        """The body as the JSON object every distribution API answer is; a web page or other service is refused."""
        try:
            body = r.json()
        except ValueError:  # requests' JSONDecodeError included
            body = None
        if not isinstance(body, dict):
            raise PublishError(f"OCI registry {self.dest.address}: {action}: {r.url} answered HTTP {r.status_code} "
                               f"with {_snippet(r.text)!r}, not the JSON the OCI distribution API returns",
                               hint=NOT_A_REGISTRY)
        return body


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
