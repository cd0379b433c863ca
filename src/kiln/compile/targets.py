"""Typed target profiles for the recipe's `compile` section, and what this machine can run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Target(_Frozen):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="folder under onnx/; default the target kind")
    max_length: int | None = Field(None, ge=16, description="longest sequence the graph serves (rotary table rows); "
                                   "default the model's positions")

    @property
    def folder(self) -> str:
        return self.name or self.target

    @property
    def provider(self) -> str:
        return PROVIDERS[self.target]


class _Quantizable(_Target):
    max_block: Literal[16, 32, 64, 128, 256] = Field(256, description="widest MatMulNBits block: each kiln group is "
                                                     "written as blocks of at most this many columns repeating its scale "
                                                     "(same values); ORT's int8 CPU kernels are fastest at 32")
    parity: "ParityConfig | None" = Field(None, description="this target's own parity limits (default: compile.parity)")
    lm_head_bits: Literal[4, 8] | None = Field(None, description="quantize the output projection at export, round to "
                                                "nearest in symmetric groups of 32: a decode step reads all of it, so on "
                                                "a small model it is most of the bytes per token; parity is still checked "
                                                "against the unquantized head")


class CpuTarget(_Quantizable):
    """ONNX Runtime's CPU execution provider: float32 activations, MatMulNBits for int4/int8 weights."""

    target: Literal["cpu"] = "cpu"
    dtype: Literal["float32", "float16"] = "float32"
    accuracy_level: int = Field(0, ge=0, le=4, description="MatMulNBits compute: 0 = activations in float (exact "
                                "to our dequantized weights), 4 = activations quantized to int8 per block (faster on "
                                "CPUs with int8 dot products, slightly less exact)")


class CudaTarget(_Quantizable):
    """ONNX Runtime's CUDA execution provider, float16 activations and KV cache."""

    target: Literal["cuda"]
    dtype: Literal["float16", "float32"] = "float16"
    accuracy_level: int = Field(0, ge=0, le=4)


class TensorRTTarget(_Target):
    """TensorRT: standard ONNX ops with QDQ weights (symmetric INT4 blocks or INT8 per channel), float16
    by default, plus the `trtexec` command that builds the engine on the serving machine."""

    target: Literal["tensorrt"]
    dtype: Literal["float16", "float32"] = "float16"
    parity: "ParityConfig | None" = Field(None, description="this target's own parity limits (default: compile.parity)")

    accuracy_level: int = Field(0, ge=0, le=0, description="not used by TensorRT")
    lm_head_bits: None = None
    max_block: int = 256


Target = Annotated[CpuTarget | CudaTarget | TensorRTTarget, Field(discriminator="target")]
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
INSTALL_HINT = {"cpu": "pip install onnxruntime", "cuda": "pip install onnxruntime-gpu (and a CUDA driver)",
                "tensorrt": "pip install onnxruntime-gpu tensorrt (and a CUDA driver), or build the engine with the "
                            "trtexec command in build_engine.sh"}


class ParityConfig(_Frozen):
    """How the compiled graph is checked against kiln's PyTorch model of the same weights, on the first
    evaluation text set. A failed check is an error: no artifact is written."""

    windows: int = Field(4, ge=1, description="evaluation windows compared")
    min_top1: float = Field(0.995, ge=0, le=1, description="argmax agreement with PyTorch over every position")
    max_ppl_rel: float = Field(0.005, ge=0, description="|ppl_onnx / ppl_torch − 1|")
    max_abs_logit: float = Field(1e-3, gt=0, description="max |Δ logit|, checked for float32 graphs of unquantized models")
    float64_floor: bool = Field(
        True, description="where a float32 graph exceeds max_abs_logit, run those windows through a float64 copy "
        "of the PyTorch model and accept the graph if it is within 4× PyTorch's own float32 distance from it"
    )
    generate_tokens: int = Field(8, ge=1, description="greedy tokens generated through the KV cache as a smoke check")


_Quantizable.model_rebuild()
CpuTarget.model_rebuild()
CudaTarget.model_rebuild()
TensorRTTarget.model_rebuild()


class CompileConfig(_Frozen):
    targets: list[Target] = Field(min_length=1)
    parity: ParityConfig = Field(default_factory=ParityConfig)

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list) -> list:
        names = [t.folder for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two targets would write the same folder {dup}; give them distinct `name`s")
        return v


def runtime_problem(target) -> str | None:
    """Why `target` cannot run here (None when it can)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return f"onnxruntime is not installed ({INSTALL_HINT['cpu']})"
    if target.provider not in ort.get_available_providers():
        return (f"ONNX Runtime here has no {target.provider} (available: {', '.join(ort.get_available_providers())}); "
                f"{INSTALL_HINT[target.target]}")
    return None


def cpu_features() -> dict:
    """The instruction sets ORT's CPU kernels dispatch on, from /proc/cpuinfo (Linux x86)."""
    info = Path("/proc/cpuinfo")
    flags: set[str] = set()
    model = None
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
    import os

    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "fma": "fma" in flags,
            "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "amx_int8": "amx_int8" in flags, "f16c": "f16c" in flags}
