"""Compression stages. Each method is one file with its typed config; this union is the registry:
a `kind` that is not listed here is a validation error naming the valid kinds."""

from __future__ import annotations

from typing import Union

from kiln.compress.gptq import GPTQConfig
from kiln.compress.rtn import RTNConfig

CompressConfig = Union[RTNConfig, GPTQConfig]

__all__ = ["CompressConfig", "GPTQConfig", "RTNConfig"]
