"""publish: round trips through real registries started on loopback — the CNCF distribution
registry (Debian package docker-registry) and `mlflow server` (sqlite backend) — plus every refusal:
registry down, wrong credential, tampered file, rejected artifact, a tag holding something else."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import gptq_recipe, run_cli, run_json, write_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.exceptions.RequestException:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def start_registry(root: Path, htpasswd: Path | None = None):
    exe = shutil.which("docker-registry") or shutil.which("registry")
    if exe is None:
        pytest.skip("the distribution registry is not installed (.ci/run installs the Debian package docker-registry)")
    port = free_port()
    auth = f"auth:\n  htpasswd:\n    realm: kiln-test\n    path: {htpasswd}\n" if htpasswd else ""
    cfg = root / "config.yml"
    cfg.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                   f"http:\n  addr: 127.0.0.1:{port}\n{auth}")
    proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_http(f"http://127.0.0.1:{port}/v2/", proc)
    return proc, port


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    proc, port = start_registry(tmp_path_factory.mktemp("registry"))
    yield port
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    bcrypt = pytest.importorskip("bcrypt")
    root = tmp_path_factory.mktemp("auth-registry")
    (root / "htpasswd").write_text("kiln:" + bcrypt.hashpw(b"right-password", bcrypt.gensalt()).decode() + "\n")
    proc, port = start_registry(root, root / "htpasswd")
    yield port
    proc.terminate()
    proc.wait()


def start_mlflow(root: Path, auth: bool = False):
    pytest.importorskip("mlflow")
    port = free_port()
    env = dict(os.environ)
    extra = []
    if auth:  # MLflow's basic-auth app, admin password from the environment
        env.update(MLFLOW_AUTH_ADMIN_PASSWORD="right-password-123", MLFLOW_FLASK_SERVER_SECRET_KEY="kiln-test")
        extra = ["--app-name", "basic-auth"]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *extra, "--backend-store-uri",
                             f"sqlite:///{root}/db.sqlite", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root, env=env)
    wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=180)
    return proc, port


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc, port = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield port
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory):
    proc, port = start_mlflow(tmp_path_factory.mktemp("mlflow-auth"), auth=True)
    yield port
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish-artifact")
    run_json("run", str(write_recipe(tmp / "r.yaml", gptq_recipe(tiny_models("llama")))), "--out", str(tmp / "run"), "-q")
    return tmp / "run" / "artifact"


def _tags(port: int, repo: str) -> list[str]:
    r = requests.get(f"http://127.0.0.1:{port}/v2/{repo}/tags/list", timeout=10)
    return [] if r.status_code == 404 else (r.json().get("tags") or [])


def test_oci_round_trip_is_idempotent(artifact, registry, tmp_path):
    uri = f"oci://127.0.0.1:{registry}/kiln/tiny:v1"
    first = run_json("publish", str(artifact), "--to", uri)
    assert first["created"] and first["layers"] == len(json.loads((artifact / "manifest.json").read_text())["files"]) + 1
    again = run_json("publish", str(artifact), "--to", uri)
    assert not again["created"] and again["manifest_sha256"] == first["manifest_sha256"]
    assert _tags(registry, "kiln/tiny") == ["v1"]
    # the registry's manifest carries the metrics
    r = requests.get(f"http://127.0.0.1:{registry}/v2/kiln/tiny/manifests/v1",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10)
    ann = r.json()["annotations"]
    assert ann["dev.kiln.status"] == "accepted" and "compressed.perplexity.wiki" in json.loads(ann["dev.kiln.metrics"])
    from kiln.publish.oci import pull_oci

    pulled = pull_oci(uri, tmp_path / "pulled")
    code, out, err = run_cli("verify", str(pulled))
    assert code == 0, err


def test_oci_refuses_a_tag_holding_another_artifact(artifact, registry, tmp_path):
    from kiln.artifact.manifest import write_manifest

    uri = f"oci://127.0.0.1:{registry}/kiln/other:v1"
    run_json("publish", str(artifact), "--to", uri)
    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    m = json.loads((other / "manifest.json").read_text())
    m["recipe_name"] = "something-else"
    write_manifest(other, m)  # resealed: a different artifact, not an edited one
    code, _, err = run_cli("publish", str(other), "--to", uri)
    assert code == 10 and "already holds a different artifact" in err


def test_oci_wrong_credential_and_registry_down(artifact, auth_registry, monkeypatch):
    uri = f"oci://127.0.0.1:{auth_registry}/kiln/tiny:v1"
    monkeypatch.setenv("KILN_OCI_USERNAME", "kiln")
    monkeypatch.setenv("KILN_OCI_PASSWORD", "wrong-password")
    code, _, err = run_cli("publish", str(artifact), "--to", uri)
    assert code == 10 and "refused the credentials" in err and "KILN_OCI_PASSWORD" in err
    monkeypatch.setenv("KILN_OCI_PASSWORD", "right-password")
    assert run_json("publish", str(artifact), "--to", uri)["created"]
    code, _, err = run_cli("publish", str(artifact), "--to", f"oci://127.0.0.1:{free_port()}/kiln/tiny:v1")
    assert code == 10 and "not reachable" in err


def test_tampered_or_rejected_artifacts_are_never_published(artifact, registry, tmp_path):
    from kiln.artifact.manifest import write_manifest

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / "config.json").write_text((bad / "config.json").read_text() + " ")
    code, _, err = run_cli("publish", str(bad), "--to", f"oci://127.0.0.1:{registry}/kiln/bad:v1")
    assert code == 7 and "sha256 mismatch: config.json" in err
    rejected = tmp_path / "rejected"
    shutil.copytree(artifact, rejected)
    m = json.loads((rejected / "manifest.json").read_text())
    m["status"] = "rejected"
    write_manifest(rejected, m)
    code, _, err = run_cli("publish", str(rejected), "--to", f"oci://127.0.0.1:{registry}/kiln/bad:v1")
    assert code == 10 and "only accepted artifacts are published" in err
    assert _tags(registry, "kiln/bad") == []


def test_mlflow_round_trip_is_idempotent(artifact, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    uri = f"mlflow://127.0.0.1:{mlflow_server}/kiln-tiny"
    first = run_json("publish", str(artifact), "--to", uri)
    assert first["created"] and first["version"] == "1"
    again = run_json("publish", str(artifact), "--to", uri)
    assert not again["created"] and again["version"] == "1"
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_server}")
    assert len(client.search_model_versions("name = 'kiln-tiny'")) == 1
    run = client.get_run(first["run_id"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert run.data.metrics["compressed.perplexity.wiki"] == pytest.approx(manifest["metrics"]["compressed"]["perplexity"]["wiki"])
    local = client.download_artifacts(first["run_id"], "artifact", str(tmp_path))
    code, _, err = run_cli("verify", local)
    assert code == 0, err


def test_mlflow_down_and_bad_destinations(artifact):
    code, _, err = run_cli("publish", str(artifact), "--to", f"mlflow://127.0.0.1:{free_port()}/m")
    assert code == 10 and "not reachable" in err
    for uri, needle in (("s3://bucket/x", "not a destination"), ("oci://127.0.0.1:5000/repo", "REPOSITORY:TAG"),
                        ("mlflow://host:port/m", "port is not a number")):
        code, _, err = run_cli("publish", str(artifact), "--to", uri)
        assert code == 10 and needle in err, err


def test_mlflow_wrong_credential_is_refused_and_the_right_one_publishes(artifact, mlflow_auth_server, monkeypatch):
    uri = f"mlflow://127.0.0.1:{mlflow_auth_server}/kiln-tiny"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    code, _, err = run_cli("publish", str(artifact), "--to", uri)
    assert code == 10 and "refused the credentials" in err and "MLFLOW_TRACKING_PASSWORD" in err, err
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "right-password-123")
    assert run_json("publish", str(artifact), "--to", uri)["created"]


# Registries that misbehave: a socket that never answers, and HTTP servers with canned answers.

@contextlib.contextmanager
def silent_server():
    """Connections complete (the kernel's backlog accepts them) but nothing ever answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@contextlib.contextmanager
def canned_server(answer, host: str = "127.0.0.1"):
    """Every request gets answer(method, path, port) → (status, headers, body), over plain HTTP."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def reply(self) -> None:
            status, headers, body = answer(self.command, self.path, self.server.server_port)
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = reply

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


NGINX = b"<html>\r\n<head><title>Welcome to nginx!</title></head>\r\n<body>\x00hello</body></html>"


def html(method, path, port):
    return 200, {"Content-Type": "text/html"}, NGINX


def test_oci_registry_that_never_answers_is_exit_10(artifact, monkeypatch):
    from kiln.publish import oci

    monkeypatch.setattr(oci, "READ_TIMEOUT", 1)
    with silent_server() as port:
        t0 = time.time()
        code, _, err = run_cli("publish", str(artifact), "--to", f"oci://127.0.0.1:{port}/kiln/tiny:v1")
    assert code == 10 and time.time() - t0 < 30, err
    assert "did not answer within 1 s while reading tag v1" in err, err
    assert f"GET http://127.0.0.1:{port}/v2/kiln/tiny/manifests/v1" in err, err


@pytest.mark.parametrize("answer, needles", [
    (html, ["reading tag v1", "answered HTTP 200 with '<html> <head><title>Welcome to nginx!",
            "not the JSON the OCI distribution API returns", "names an OCI registry"]),
    (lambda m, p, port: (401, {"WWW-Authenticate": f'Bearer realm="http://127.0.0.1:{port}/token",service="r"'}, b"")
     if p.startswith("/v2/") else html(m, p, port),
     ["requesting a token for reading tag v1", "/token?service=r answered HTTP 200", "not the JSON"]),
    (lambda m, p, port: (302, {"Location": p}, b""), ["reading tag v1", "TooManyRedirects", "names an OCI registry"]),
    (lambda m, p, port: (200, {"Content-Length": "100"}, b"hello"), ["reading tag v1", "ChunkedEncodingError"]),
], ids=["html", "token-html", "redirect-loop", "cut-off-body"])
def test_oci_server_that_is_not_a_registry_is_exit_10(artifact, answer, needles):
    with canned_server(answer) as port:
        code, _, err = run_cli("publish", str(artifact), "--to", f"oci://127.0.0.1:{port}/kiln/tiny:v1")
    assert code == 10, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_oci_plain_http_registry_spoken_to_over_tls_is_exit_10(artifact, monkeypatch):
    monkeypatch.delenv("KILN_OCI_INSECURE", raising=False)
    with canned_server(html, host="127.0.0.2") as port:  # not a loopback name kiln knows: HTTPS
        code, _, err = run_cli("publish", str(artifact), "--to", f"oci://127.0.0.2:{port}/kiln/tiny:v1")
    assert code == 10 and "the TLS handshake failed" in err and "KILN_OCI_INSECURE=1" in err, err


@pytest.mark.parametrize("env, needles", [
    ({}, ["requires authentication; none were given (HTTP 401 while reading tag v1)",
          "KILN_OCI_USERNAME and KILN_OCI_PASSWORD are not set"]),
    ({"KILN_OCI_USERNAME": "kiln"}, ["requires authentication; none were given", "(KILN_OCI_PASSWORD is not set)"]),
    ({"KILN_OCI_USERNAME": "kiln", "KILN_OCI_PASSWORD": "x"}, ["refused the credentials (HTTP 401 while reading tag v1)"]),
], ids=["none", "no-password", "refused"])
def test_oci_401_says_whether_credentials_were_given(artifact, monkeypatch, env, needles):
    for var in ("KILN_OCI_USERNAME", "KILN_OCI_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with canned_server(lambda m, p, port: (401, {"WWW-Authenticate": 'Basic realm="r"'}, b"{}")) as port:
        code, _, err = run_cli("publish", str(artifact), "--to", f"oci://127.0.0.1:{port}/kiln/tiny:v1")
    assert code == 10, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_mlflow_silent_garbage_or_locked_servers_are_exit_10(artifact, monkeypatch):
    pytest.importorskip("mlflow")
    from kiln.publish import mlflow as kiln_mlflow

    monkeypatch.setattr(kiln_mlflow, "HEALTH_TIMEOUT", 1)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with silent_server() as port:
        code, _, err = run_cli("publish", str(artifact), "--to", f"mlflow://127.0.0.1:{port}/m")
    assert code == 10 and "did not answer within 1 s" in err, err
    with canned_server(html) as port:
        code, _, err = run_cli("publish", str(artifact), "--to", f"mlflow://127.0.0.1:{port}/m")
    assert code == 10 and "MLflow tracking server" in err, err
    with canned_server(lambda m, p, port: (401, {}, b"")) as port:
        code, _, err = run_cli("publish", str(artifact), "--to", f"mlflow://127.0.0.1:{port}/m")
        assert code == 10 and "requires authentication; none were given" in err and "MLFLOW_TRACKING_PASSWORD" in err, err
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        code, _, err = run_cli("publish", str(artifact), "--to", f"mlflow://127.0.0.1:{port}/m")
        assert code == 10 and "refused the credentials" in err, err


def test_unprotected_or_gate_failing_manifests_are_never_published(artifact, tmp_path):
    from kiln.artifact.manifest import write_manifest

    uri = "oci://127.0.0.1:9/kiln/never:v1"  # refused before any request, so no registry is needed
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    m = json.loads((old / "manifest.json").read_text())
    assert m["status"] == "accepted"
    unprotected = {k: v for k, v in m.items() if k != "content_sha256"} | {"schema_version": 1}
    (old / "manifest.json").write_text(json.dumps(unprotected, indent=2))
    assert run_cli("verify", str(old))[0] == 0  # reading an old manifest is fine
    code, _, err = run_cli("publish", str(old), "--to", uri)
    err = " ".join(err.split())
    assert code == 10 and "has no content_sha256: an older kiln wrote it, or it was edited" in err, err
    assert "rerun `kiln run` with its recipe to rebuild the artifact: that writes a protected manifest" in err, err
    lying = tmp_path / "lying"
    shutil.copytree(artifact, lying)
    m["gates"] = [{"gate": "max_perplexity_ratio", "subject": "compressed/wiki", "value": 2.0, "limit": 1.1, "passed": False},
                  "not a gate record"]
    write_manifest(lying, m)  # resealed: status still 'accepted'
    code, _, err = run_cli("publish", str(lying), "--to", uri)
    err = " ".join(err.split())
    assert code == 10 and "says 'accepted' but records failed gates" in err, err
    assert "max_perplexity_ratio compressed/wiki" in err and "'not a gate record'" in err, err
