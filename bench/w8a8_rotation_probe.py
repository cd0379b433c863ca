"""Where a W8A8 model loses its perplexity, and how much an online rotation of down_proj's inputs
would win back: a probe for the next W8A8 step, not a kiln feature.

    python bench/w8a8_rotation_probe.py [--recipe recipes/gemma3-270m.yaml] [--windows 16] [--seq-len 256]
        [--variants fp32,plain,down_a16,down_rot_random,down_rot_hadamard]

Every linear of the decoder layers (not the head) is replaced by round-to-nearest W8A8: int8 weights
per output channel, dynamic per-token int8 inputs (kiln.compress.w8a8.quantize_per_token), no
smoothing and no GPTQ, so that only the variants differ:

  plain              every linear W8A8
  down_a16           down_proj keeps float inputs (its weights still int8)
  down_rot_random    down_proj computes (x R)(W R)ᵀ = x Wᵀ with R a seeded random orthogonal matrix:
                     the rotation spreads the outlier channels of x over all channels before the
                     per-token quantization (QuaRot/SpinQuant's online R4 on down_proj)
  down_rot_hadamard  the same with R = Q ⊗ H (H a Walsh–Hadamard block of the largest power of two
                     dividing the width, Q a random orthogonal matrix for the rest): cheap to apply

Perplexity is kiln.evaluate.perplexity on the recipe's first evaluation set.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent


def per_channel_int8(W: torch.Tensor) -> torch.Tensor:
    scale = (W.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    return (W / scale).round().clamp(-127, 127) * scale


class ProbeLinear(nn.Module):
    def __init__(self, lin: nn.Linear, quantize_inputs: bool, R: torch.Tensor | None):
        from kiln.compress.w8a8 import quantize_per_token

        super().__init__()
        self.quantize_per_token = quantize_per_token
        W = lin.weight.data.float()
        self.R = R
        self.W = per_channel_int8(W if R is None else W @ R)
        self.bias = lin.bias
        self.quantize_inputs = quantize_inputs

    def forward(self, x):
        if self.R is not None:
            x = x @ self.R
        if self.quantize_inputs:
            q, s = self.quantize_per_token(x)
            x = q.float() * s
        y = x @ self.W.T
        return y if self.bias is None else y + self.bias


def walsh_hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))


def rotation(n: int, kind: str) -> torch.Tensor:
    if kind == "random":
        return random_orthogonal(n)
    k = n & -n  # largest power of two dividing n
    return torch.kron(random_orthogonal(n // k), walsh_hadamard(k))


def evaluate(model_path: Path, variant: str, ids, prefix_len: int) -> float:
    from transformers import AutoModelForCausalLM

    from kiln.context import RunContext
    from kiln.evaluate.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    if variant != "fp32":
        head = model.get_output_embeddings()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child is not head:
                    down = name == "down_proj"
                    R = rotation(child.in_features, variant.rsplit("_", 1)[-1]) if down and "rot" in variant else None
                    setattr(parent, name, ProbeLinear(child, not (down and variant == "down_a16"), R))
    return perplexity(model, ids, prefix_len, RunContext(show_progress=False), label=variant)["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "gemma3-270m.yaml")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--variants", default="fp32,plain,down_a16,down_rot_random,down_rot_hadamard")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from kiln.data import evaluation_windows, load_documents
    from kiln.recipe import load_recipe
    from kiln.source import resolve_model

    recipe = load_recipe(args.recipe)
    model = resolve_model(recipe.model)
    ev = recipe.data.evaluation[0]
    win = evaluation_windows(load_documents(ev.source, ev.field), AutoTokenizer.from_pretrained(model.path),
                             args.windows, args.seq_len, set())
    print(f"model {model.origin}; {ev.name}: {args.windows} x {args.seq_len} tokens, ids sha256 {win.digest[:16]}")
    base = None
    for v in args.variants.split(","):
        t0 = time.perf_counter()
        ppl = evaluate(model.path, v, win.ids, win.prefix_len)
        base = ppl if v == "fp32" else base
        rel = f" ({(ppl / base - 1) * 100:+.2f}% vs fp32)" if base and v != "fp32" else ""
        print(f"{v:20s} {ppl:8.3f}{rel}  {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
