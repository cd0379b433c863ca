"""The one place that accumulates H = 2/n Σ x xᵀ from linear layers' inputs (GPTQ, SparseGPT)."""

from __future__ import annotations

import torch
from torch import nn


class HessianAccumulator:
    """Running mean of 2·x xᵀ over every token row seen (fp32, rescaled as n grows so the sum
    never holds a large un-normalised total).

    H is symmetric: only its block upper triangle is accumulated (rows of `block` inputs against the
    inputs from the block's own start on), which takes (1 + block/in)/2 of the full product's
    arithmetic; `result` mirrors it."""

    def __init__(self, in_features: int, block: int = 128):
        self.H = torch.zeros(in_features, in_features)
        self.n = 0
        self.block = block

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        t = x.shape[0]
        beta, alpha = self.n / (self.n + t), 2.0 / (self.n + t)  # H ← n/(n+t)·H + 2/(n+t)·xᵀx
        self.n += t
        for i in range(0, x.shape[1], self.block):
            self.H[i : i + self.block, i:].addmm_(x[:, i : i + self.block].T, x[:, i:], beta=beta, alpha=alpha)

    def result(self) -> torch.Tensor:
        lower = torch.ones_like(self.H, dtype=torch.bool).tril_(-1)
        return torch.where(lower, self.H.T, self.H)


class HessianHooks:
    """Forward pre-hooks that fill one accumulator per distinct input: linears fed the very same tensor
    (q/k/v after one norm, gate/up) share it, so it is computed once. Pre-hooks, so that a pass may
    stop before the linear itself runs (its output is not needed to know its input)."""

    def __init__(self, modules: dict[str, nn.Module], in_features: dict[str, int]):
        self.acc: dict[str, HessianAccumulator] = {}
        self.owner: dict[str, str] = {}  # module → module whose accumulator holds its H
        self._seen: dict[tuple, str] = {}
        self._held: list[torch.Tensor] = []  # this batch's inputs: a freed one's address must not be taken for it
        self._handles = [m.register_forward_pre_hook(self._hook(n, in_features[n])) for n, m in modules.items()]

    def share(self, name: str, owner: str) -> None:
        """Declare that `name` reads the very tensor `owner` reads (known from a probe), so a pass
        that stops at `owner` still gives `name` its H."""
        self.owner[name] = owner

    def _hook(self, name: str, in_features: int):
        def fn(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if name in self.owner:
                owner = self.owner[name]
                if owner != name:
                    return  # its owner accumulates this very tensor
            elif key in self._seen:
                self.owner[name] = self._seen[key]
                return
            else:
                self.owner[name] = name
            self._seen[key] = name
            self._held.append(x)
            self.acc.setdefault(name, HessianAccumulator(in_features)).add(x.detach())
        return fn

    def next_batch(self) -> None:
        self._seen.clear()
        self._held.clear()

    def hessian(self, name: str) -> torch.Tensor:
        return self.acc[self.owner[name]].result()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
