"""RTN: round-to-nearest weight quantization, no calibration data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln.compress.base import StageConfig
from kiln.compress.quant import QuantScheme, rtn_quantize


class RTNConfig(StageConfig):
    kind: Literal["rtn"] = "rtn"
    scheme: QuantScheme = Field(default_factory=QuantScheme)

    quantizes = True

    def quantize_weight(self, W, H, name):  # noqa: ARG002 - same signature as calibrated methods
        return rtn_quantize(W, self.scheme), None
