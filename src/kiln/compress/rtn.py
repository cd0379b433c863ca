"""RTN: round-to-nearest weight quantization, no calibration data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln.compress.base import ActScheme, StageConfig, WeightResult
from kiln.compress.quant import QuantScheme, rtn_quantize


class RTNConfig(StageConfig):
    kind: Literal["rtn"] = "rtn"
    scheme: QuantScheme = Field(default_factory=QuantScheme)

    activations: ActScheme | None = None

    @property
    def quant_scheme(self) -> QuantScheme:
        return self.scheme

    @property
    def act_scheme(self) -> ActScheme | None:
        return self.activations

    def process_weight(self, W, H, name, keep=None) -> WeightResult:  # noqa: ARG002 - calibrated methods' signature
        # round(0 / s) + zero = zero: pruned weights stay exactly zero without a mask
        q = rtn_quantize(W, self.scheme)
        return WeightResult(q.dequantize(), q)
