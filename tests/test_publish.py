"""publish: round trips through real registries started on loopback — the CNCF distribution
registry (Debian package docker-registry) and `mlflow server` (sqlite backend) — plus every refusal:
registry down, wrong credential, tampered file, rejected artifact, a tag holding something else."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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
