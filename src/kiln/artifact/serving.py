"""Serving configs written into the artifact under serving/, each checked before it ships:

- `triton/config.pbtxt`: a Triton model for the onnxruntime backend over the CPU (or CUDA) graph,
  its inputs and outputs taken from the graph, parsed back with Triton's own protobuf schema
  (tritonclient's model_config_pb2);
- `kserve.yaml`: a KServe InferenceService serving the compressed-tensors checkpoint with the
  Hugging Face runtime's vLLM backend;
- `vllm.sh`: the vLLM command line for the checkpoint.

The onnxruntime-genai config sits next to each graph (onnx/<target>/genai_config.json) and is
exercised by compile (it generates here)."""

from __future__ import annotations

import re
from pathlib import Path

TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32"}


def _k8s_name(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "kiln-model"


def triton_config(model_name: str, graph: Path, device: str) -> str:
    """config.pbtxt text for the graph's inputs/outputs (dynamic dims as -1; batch is an explicit dim)."""
    import onnx

    m = onnx.load(str(graph), load_external_data=False)

    def io(v, kind: str) -> str:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        dtype = TRITON_TYPES[onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name]
        return f'{kind} {{\n  name: "{v.name}"\n  data_type: {dtype}\n  dims: [ {", ".join(map(str, dims))} ]\n}}'

    inits = {i.name for i in m.graph.initializer}
    parts = [f'name: "{model_name}"', 'backend: "onnxruntime"', "max_batch_size: 0",
             *[io(v, "input") for v in m.graph.input if v.name not in inits], *[io(v, "output") for v in m.graph.output],
             f"instance_group [ {{ count: 1\n  kind: {'KIND_GPU' if device == 'cuda' else 'KIND_CPU'} }} ]"]
    return "\n".join(parts) + "\n"


def parse_triton(text: str):
    """Parse with Triton's schema; raises on any field Triton would not accept."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def kserve_manifest(name: str, storage_uri: str) -> str:
    return f"""apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {_k8s_name(name)}
spec:
  predictor:
    model:
      modelFormat:
        name: huggingface
      args:
        - --backend=vllm
        - --model_name={_k8s_name(name)}
      storageUri: {storage_uri}
      resources:
        limits:
          nvidia.com/gpu: "1"
"""


def vllm_command(fmt: str, dtype: str, max_len: int | None) -> str:
    q = " --quantization compressed-tensors" if fmt == "compressed-tensors" else ""
    return f"vllm serve ARTIFACT_DIR{q} --dtype {dtype}" + (f" --max-model-len {max_len}" if max_len else "")


def write_serving(root: Path, manifest: dict, max_len: int | None) -> dict:
    """Write serving/ and return what was written and how each file was checked."""
    import yaml

    out: dict = {}
    serving = root / "serving"
    serving.mkdir(exist_ok=True)
    name = str(manifest.get("recipe_name"))
    targets = (manifest.get("compile") or {}).get("targets") or {}
    onnx_target = next((n for n, t in targets.items() if t["target"] in ("cpu", "cuda")), None)
    if onnx_target is not None:
        t = targets[onnx_target]
        text = triton_config(_k8s_name(name).replace("-", "_"), root / "onnx" / onnx_target / "model.onnx", t["target"])
        (serving / "triton").mkdir(exist_ok=True)
        (serving / "triton" / "config.pbtxt").write_text(text)
        try:
            parse_triton(text)
            check = "parsed with Triton's model_config.proto (tritonclient)"
        except ImportError:
            check = "not parsed: tritonclient is not installed (pip install 'tritonclient[grpc]')"
        out["triton"] = {"file": "serving/triton/config.pbtxt", "graph": f"onnx/{onnx_target}", "check": check,
                         "deploy": f"model repository: <repo>/{_k8s_name(name).replace('-', '_')}/config.pbtxt and "
                                   f"<repo>/{_k8s_name(name).replace('-', '_')}/1/ holding onnx/{onnx_target}/model.onnx*"}
    if manifest.get("format") == "compressed-tensors":
        kserve = kserve_manifest(name, "REPLACE_WITH_STORAGE_URI (oci://…, s3://…, pvc://…)")
        parsed = yaml.safe_load(kserve)
        if parsed.get("kind") != "InferenceService" or not parsed["spec"]["predictor"]["model"].get("storageUri"):
            from kiln.errors import ArtifactError

            raise ArtifactError("serving/kserve.yaml: the generated InferenceService is malformed (a kiln bug)")
        (serving / "kserve.yaml").write_text(kserve)
        out["kserve"] = {"file": "serving/kserve.yaml", "check": "YAML parsed; InferenceService v1beta1 fields present"}
        cmd = vllm_command(manifest["format"], manifest.get("dtype", "float16"), max_len)
        (serving / "vllm.sh").write_text("#!/bin/sh\n# serve the compressed-tensors checkpoint in this artifact\n"
                                         + cmd.replace("ARTIFACT_DIR", '"$(dirname "$0")/.."') + "\n")
        try:
            import vllm  # noqa: F401

            vcheck = "vllm installed: not started here (needs a GPU)"
        except ImportError:
            vcheck = "vllm not installed here; the checkpoint's quantization_config is loaded by transformers in kiln's tests"
        out["vllm"] = {"file": "serving/vllm.sh", "command": cmd, "check": vcheck}
    return out
