"""What every compression stage config shares: module selection, capability flags, and the shapes of
the results the layer-wise engine collects from a stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from kiln.compress.quant import QuantizedWeight, QuantScheme


class ActScheme(BaseModel):
    """Activation quantization applied at inference: dynamic, symmetric, one scale per token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[8] = 8
    rotation: Literal["none", "hadamard"] = Field(
        "none", description="'hadamard': rotate each token's inputs by a block Walsh–Hadamard matrix before "
        "quantizing them, and the weights by the same matrix (QuaRot's online rotation; kiln.compress.rotation)")

    @property
    def rotated(self) -> bool:
        return self.rotation != "none"


class StageConfig(BaseModel):
    """Base of every `compress:` entry. `targets`/`ignore` are shell-style globs over module names
    (e.g. `model.layers.*.mlp.*`), matched against the linear layers inside decoder layers and
    resolved to concrete names once, at plan time.

    `role` tells the engine how to drive the stage:
    - "weights": rewrites each target linear from its weight and (if calibrated) its Hessian;
    - "smoothing": rescales norm→linear groups by per-channel factors folded into the preceding op;
    - "training": updates the whole model at once (distillation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(default_factory=lambda: ["*"])
    ignore: list[str] = Field(default_factory=list)

    needs_calibration: ClassVar[bool] = False
    role: ClassVar[str] = "weights"

    @property
    def quant_scheme(self) -> "QuantScheme | None":
        """The weight grid this stage leaves its targets on (None: weights stay dense)."""
        return None

    @property
    def act_scheme(self) -> ActScheme | None:
        return None

    @property
    def quantizes(self) -> bool:
        return self.quant_scheme is not None

    @property
    def sparsifies(self) -> bool:
        return False

    def process_weights(self, Ws: "list[torch.Tensor]", H: "torch.Tensor", names: list[str],
                        keeps: "list[torch.Tensor | None]") -> "list[WeightResult]":
        """Linears that read the very same input (q/k/v, gate/up), hence share H. One by one here;
        a method whose rows are independent given H may do them in one go."""
        return [self.process_weight(W, H, n, k) for W, n, k in zip(Ws, names, keeps)]


@dataclass
class WeightResult:
    """What a "weights" stage returns for one linear: the dense weight the model now computes with
    (out, in), its integer form when quantized, and statistics for the manifest."""

    weight: "torch.Tensor"
    quantized: "QuantizedWeight | None" = None
    stats: dict = field(default_factory=dict)
