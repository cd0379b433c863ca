"""Compression stages. Each method is one file with its typed config; this union is the registry:
a `kind` that is not listed here is a validation error naming the valid kinds."""

from __future__ import annotations

from typing import Union

from kiln.compress.awq import AWQConfig
from kiln.compress.distill import DistillConfig
from kiln.compress.gptq import GPTQConfig
from kiln.compress.rtn import RTNConfig
from kiln.compress.smoothquant import SmoothQuantConfig
from kiln.compress.sparsegpt import SparseGPTConfig

CompressConfig = Union[RTNConfig, GPTQConfig, AWQConfig, SmoothQuantConfig, SparseGPTConfig, DistillConfig]

__all__ = ["AWQConfig", "CompressConfig", "DistillConfig", "GPTQConfig", "RTNConfig", "SmoothQuantConfig", "SparseGPTConfig"]
