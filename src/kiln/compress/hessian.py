"""The one place that accumulates H = 2/n Σ x xᵀ from a linear layer's inputs (GPTQ, SparseGPT)."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running mean of 2·x xᵀ over every token row seen, in float64 for a stable sum over long runs."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, in)
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x

    def result(self) -> torch.Tensor:
        return self.H.float()
