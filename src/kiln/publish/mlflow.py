"""Register an artifact as a new model version in an MLflow model registry: one run in experiment
`kiln` with the metrics (flattened), the recipe name and source digest as parameters and every file
as run artifacts, then a model version of MODEL_NAME whose source is those files, tagged with the
manifest digest. Credentials: MLflow's own variables (MLFLOW_TRACKING_USERNAME/PASSWORD or
MLFLOW_TRACKING_TOKEN). A failure after the run started deletes the run: no version, no half-upload."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.errors import PublishError

DIGEST_TAG = "kiln.manifest_sha256"
EXPERIMENT = "kiln"
HEALTH_TIMEOUT = 10  # seconds, to connect and to answer /health
CREDENTIALS_HINT = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
DOWN_HINT = "check the host and port, and that `mlflow server` is running"
NOT_MLFLOW = "check that HOST:PORT is a healthy MLflow tracking server (`mlflow server`), not another service"


def _tracking_uri(dest) -> str:
    scheme = "https" if os.environ.get("KILN_MLFLOW_HTTPS") == "1" else "http"
    return f"{scheme}://{dest.address}"


def _reachable(uri: str, dest) -> None:
    import requests
    import requests.exceptions as rx

    server = f"MLflow server {dest.address}"
    try:
        r = requests.get(f"{uri}/health", timeout=HEALTH_TIMEOUT)
    except rx.ConnectionError:  # a connect timeout included
        raise PublishError(f"{server} is not reachable", hint=DOWN_HINT) from None
    except rx.Timeout:
        raise PublishError(f"{server} accepted the connection but did not answer within {HEALTH_TIMEOUT} s "
                           f"(GET {uri}/health)", hint=NOT_MLFLOW) from None
    except rx.RequestException as exc:
        raise PublishError(f"{server}: GET {uri}/health failed: {type(exc).__name__}", hint=NOT_MLFLOW) from None
    if r.status_code in (401, 403):
        raise _denied(dest)


def _denied(dest) -> PublishError:
    """No credentials at all, or credentials the server refused: the two call for different fixes."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    if not (creds.username and creds.password) and not os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return PublishError(f"MLflow server {dest.address} requires authentication; none were given",
                            hint=f"{CREDENTIALS_HINT} in the environment")
    return PublishError(f"MLflow server {dest.address} refused the credentials", hint=CREDENTIALS_HINT)


def _explain(exc: Exception, dest) -> PublishError:
    text = str(exc)
    if "401" in text or "403" in text or "PERMISSION_DENIED" in text or "UNAUTHENTICATED" in text:
        return _denied(dest)
    return PublishError(f"MLflow server {dest.address}: {text.splitlines()[0][:300] if text else type(exc).__name__}",
                        hint=NOT_MLFLOW)


def find_version(client, name: str, digest: str):
    """The model version of `name` already holding this artifact, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc):
            return None
        raise
    return next((v for v in versions if (v.tags or {}).get(DIGEST_TAG) == digest), None)


def publish_mlflow(root: Path, manifest: dict, dest) -> dict:
    """MLflow prints run links on stdout; `--json` promises stdout holds one JSON object."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        return _publish_mlflow(root, manifest, dest)


def _publish_mlflow(root: Path, manifest: dict, dest) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from kiln.publish import flat_metrics, manifest_digest

    uri = _tracking_uri(dest)
    _reachable(uri, dest)
    digest = manifest_digest(root)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        existing = find_version(client, dest.name, digest)
    except Exception as exc:  # noqa: BLE001 - MLflow's REST errors arrive as several types
        raise _explain(exc, dest) from None
    if existing is not None:
        return {"destination": f"mlflow://{dest.address}/{dest.name}", "created": False, "version": existing.version,
                "run_id": existing.run_id, "manifest_sha256": digest, "message": "already published: this version holds it"}
    run_id = None
    try:
        exp = client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
        run = client.create_run(exp_id, run_name=str(manifest.get("recipe_name")),
                                tags={DIGEST_TAG: digest, "kiln.status": str(manifest.get("status"))})
        run_id = run.info.run_id
        for k, v in sorted(flat_metrics(manifest.get("metrics", {})).items()):
            client.log_metric(run_id, k[:250], v)
        client.log_param(run_id, "recipe", str(manifest.get("recipe_name")))
        client.log_param(run_id, "source_sha256", str((manifest.get("source") or {}).get("sha256")))
        client.log_artifacts(run_id, str(root), artifact_path="artifact")
        client.set_terminated(run_id, "FINISHED")
        try:
            client.create_registered_model(dest.name)
        except mlflow.exceptions.MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        version = client.create_model_version(dest.name, source=f"{run.info.artifact_uri}/artifact", run_id=run_id,
                                              tags={DIGEST_TAG: digest, "kiln.status": str(manifest.get("status"))})
    except Exception as exc:  # noqa: BLE001
        if run_id is not None:
            try:
                client.delete_run(run_id)
            except Exception:  # noqa: BLE001 - the server may be gone; the run holds no version either way
                pass
        raise _explain(exc, dest) from None
    return {"destination": f"mlflow://{dest.address}/{dest.name}", "created": True, "version": version.version,
            "run_id": run_id, "manifest_sha256": digest}
