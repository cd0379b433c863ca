"""Where a W8A8 model loses its perplexity, and how much an online rotation of down_proj's inputs
would win back: a probe for the next W8A8 step, not a kiln feature.

    python bench/w8a8_rotation_probe.py [--recipe recipes/gemma3-270m.yaml] [--windows 16] [--seq-len 256]
        [--variants fp32,plain,down_a16,down_rot_random,down_rot_hadamard]

Every linear of the decoder layers (not the head) is replaced by round-to-nearest W8A8: int8 weights
per output channel, dynamic per-token int8 inputs (kiln.compress.w8a8.quantize_per_token), no
smoothing and no GPTQ, so that only the variants differ:

  plain              every linear W8A8
  down_a16           down_proj keeps float inputs (its weights still int8)
  down_a16@L         only layer L's down_proj keeps float inputs (where the loss sits, layer by layer)
  down_sqA[_rot_R]   SmoothQuant on down_proj alone, s = max|x|^A / max|W|^(1−A) per input channel from
                     the calibration text (then, with _rot_R, rotation R): smoothing before rotation
  first_a16          the first position of each window (BOS, the attention sink) keeps float inputs
                     in every linear; down_first_a16 in down_proj only (PrefixQuant's outlier token)
  down_rot_random    down_proj computes (x R)(W R)ᵀ = x Wᵀ with R a seeded random orthogonal matrix:
                     the rotation spreads the outlier channels of x over all channels before the
                     per-token quantization (QuaRot/SpinQuant's online R4 on down_proj)
  down_rot_hadamard  the same with R = Q ⊗ H (H a Walsh–Hadamard block of the largest power of two
                     dividing the width, Q a random orthogonal matrix for the rest): cheap to apply
  all_rot_R          every linear's inputs rotated (R as above, per input width), not only down_proj's
  down_rot_blockhadamard  R = I ⊗ H, no random part (block-diagonal Walsh–Hadamard)
  down_rot_rhadamard the same with seeded random sign flips before it (QuaRot's randomized Hadamard)
                     (a number after a rotation's name is its seed: down_rot_random3; default 0)
  down_keepK         down_proj's K input channels of largest max |x| on calibration text (the recipe's
                     calibration source, --calib-samples × --seq-len tokens) stay float and leave the
                     per-token scale; the rest is int8 (QUIK/LLM.int8()'s outlier split, with the
                     channels fixed at calibration); all weights stay int8
  down_clipC         down_proj's per-token scale is C·max|x|/127 (C < 1), the values past it clamped:
                     finer steps for the bulk of each token at the price of its largest entries
  down_ls, all_ls    before rounding, down_proj's (or every linear's) weights W become the W' that
                     best reproduces the float product from int8 inputs on calibration text:
                     min ‖X Wᵀ − X̃ W'ᵀ‖² + λ‖W' − W‖², X̃ = X after per-token int8, so
                     W'ᵀ = (X̃ᵀX̃ + λI)⁻¹ (X̃ᵀX Wᵀ + λWᵀ), λ = --ls-damp · mean diag(X̃ᵀX̃)

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
    def __init__(self, lin: nn.Linear, quantize_inputs: bool, R: torch.Tensor | None, keep: torch.Tensor | None = None,
                 clip: float = 1.0, float_first: bool = False, smooth: torch.Tensor | None = None):
        from kiln.compress.w8a8 import quantize_per_token

        super().__init__()
        self.quantize_per_token = quantize_per_token
        W = lin.weight.data.float()
        self.smooth = smooth  # SmoothQuant's s: x / s, W · s (folded into up_proj in a real model)
        if smooth is not None:
            W = W * smooth
        self.R = R
        self.W = per_channel_int8(W if R is None else W @ R)
        self.bias = lin.bias
        self.quantize_inputs = quantize_inputs
        self.keep = keep  # input channels left in float
        self.clip = clip
        self.float_first = float_first  # the first position of each sequence keeps float inputs

    def forward(self, x):
        if self.smooth is not None:
            x = x / self.smooth
        if self.R is not None:
            x = x @ self.R
        if self.quantize_inputs:
            first = x[:, :1] if self.float_first else None
            outliers = None
            if self.keep is not None:
                outliers = x[..., self.keep]
                x = x.index_fill(-1, self.keep, 0.0)
            if self.clip < 1.0:
                s = (x.abs().amax(-1, keepdim=True) * self.clip / 127).clamp_min(1e-12)
                x = (x / s).round().clamp(-127, 127) * s
            else:
                q, s = self.quantize_per_token(x)
                x = q.float() * s
            if outliers is not None:
                x = x.index_copy(-1, self.keep, outliers)
            if first is not None:
                x = torch.cat([first, x[:, 1:]], dim=1)
        y = x @ self.W.T
        return y if self.bias is None else y + self.bias


def walsh_hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def rotation(n: int, kind: str) -> torch.Tensor:
    """`kind` random, hadamard or rhadamard, with an optional seed after it (random3: seed 3)."""
    name = kind.rstrip("0123456789")
    seed = int(kind[len(name):] or 0)
    k = n & -n  # largest power of two dividing n
    if name == "random":
        return random_orthogonal(n, seed)
    if name == "blockhadamard":  # I ⊗ H: Walsh–Hadamard blocks of the largest power of two dividing n
        return torch.kron(torch.eye(n // k), walsh_hadamard(k))
    R = torch.kron(random_orthogonal(n // k, seed), walsh_hadamard(k))
    if name == "rhadamard":  # QuaRot's randomized Hadamard: seeded sign flips, then the Hadamard block
        signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1
        R = signs[:, None] * R
    return R


def calibration_inputs(model_path: Path, calib, wanted, record) -> None:
    """The float model's calibration forward, calling record(name, x) with the input rows x
    (tokens, in) of every linear `wanted(name, module)` accepts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    head = model.get_output_embeddings()

    def hook(name):
        return lambda m, a: record(name, a[0].detach().reshape(-1, a[0].shape[-1]))

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head and wanted(n, m)]
    with torch.no_grad():
        for b in range(0, len(calib), 4):
            model(input_ids=calib[b : b + 4], use_cache=False)
    for h in handles:
        h.remove()


def ls_statistics(model_path: Path, calib, only_down: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(X̃ᵀX̃, X̃ᵀX) in float64 per linear (down_proj only, or every decoder linear), over the float
    model's calibration forward, X̃ the per-token int8 rounding of the linear's input X."""
    from kiln.compress.w8a8 import quantize_per_token

    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name, x):
        q, s = quantize_per_token(x)
        x, xq = x.double(), q.double() * s.double()
        A, B = xq.T @ xq, xq.T @ x
        stats[name] = (A, B) if name not in stats else (stats[name][0] + A, stats[name][1] + B)

    calibration_inputs(model_path, calib, lambda n, m: not only_down or n.endswith("down_proj"), record)
    return stats


def ls_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, damp: float) -> torch.Tensor:
    lam = damp * A.diagonal().mean()
    Wt = W.double().T
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(A + lam * eye, B @ Wt + lam * Wt).T.float()


def down_input_absmax(model_path: Path, calib) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every down_proj, over the float model's calibration forward."""
    amax: dict[str, torch.Tensor] = {}

    def record(name, x):
        x = x.abs().amax(0)
        amax[name] = x if name not in amax else torch.maximum(amax[name], x)

    calibration_inputs(model_path, calib, lambda n, m: n.endswith("down_proj"), record)
    return amax


def a16_layer(variant: str, module: str) -> bool:
    """down_a16 applies to every layer; down_a16@L to the module path whose layer index is L."""
    if variant == "down_a16":
        return True
    return variant.startswith("down_a16@") and f".{variant.split('@')[1]}." in f"{module}."


def evaluate(model_path: Path, variant: str, ids, prefix_len: int, amax: dict | None = None,
             ls: dict | None = None, damp: float = 0.01) -> float:
    from transformers import AutoModelForCausalLM

    from kiln.context import RunContext
    from kiln.evaluate.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    if variant != "fp32":
        head = model.get_output_embeddings()
        k = int(variant.removeprefix("down_keep")) if variant.startswith("down_keep") else 0
        for pname, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child is not head:
                    down = name == "down_proj"
                    R = (rotation(child.in_features, variant.rsplit("_", 1)[-1])
                         if "_rot_" in variant and (down or variant.startswith("all_rot_")) else None)
                    keep = amax[f"{pname}.{name}"].topk(k).indices.sort().values if down and k else None
                    clip = float(variant.removeprefix("down_clip")) if down and variant.startswith("down_clip") else 1.0
                    key = f"{pname}.{name}"
                    smooth = None
                    if down and variant.startswith("down_sq"):
                        alpha = float(variant.split("_")[1].removeprefix("sq"))
                        wmax = child.weight.data.abs().amax(0).clamp_min(1e-5)
                        smooth = (amax[key].clamp_min(1e-5) ** alpha / wmax ** (1 - alpha)).clamp_min(1e-5)
                    if variant == "all_ls" or (variant == "down_ls" and down):
                        child.weight.data = ls_weight(child.weight.data, *ls[key], damp)
                    setattr(parent, name, ProbeLinear(child, not (down and a16_layer(variant, pname)), R, keep, clip,
                                                          variant == "first_a16" or (down and variant == "down_first_a16"), smooth))
    return perplexity(model, ids, prefix_len, RunContext(show_progress=False), label=variant)["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "gemma3-270m.yaml")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--variants", default="fp32,plain,down_a16,down_rot_random,down_rot_hadamard")
    ap.add_argument("--calib-samples", type=int, default=8,
                    help="calibration windows for down_keepK's channel choice and the _ls statistics")
    ap.add_argument("--ls-damp", type=float, default=0.01, help="λ of the _ls variants, as a fraction of mean diag(X̃ᵀX̃)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from kiln.data import calibration_windows, evaluation_windows, load_documents
    from kiln.recipe import load_recipe
    from kiln.source import resolve_model

    recipe = load_recipe(args.recipe)
    model = resolve_model(recipe.model)
    ev = recipe.data.evaluation[0]
    win = evaluation_windows(load_documents(ev.source, ev.field), AutoTokenizer.from_pretrained(model.path),
                             args.windows, args.seq_len, set())
    print(f"model {model.origin}; {ev.name}: {args.windows} x {args.seq_len} tokens, ids sha256 {win.digest[:16]}")
    amax = ls = None
    variants = args.variants.split(",")
    if any(v.startswith(("down_keep", "down_sq")) or v.endswith("_ls") for v in variants):
        cal = recipe.data.calibration
        docs = load_documents(cal.source, cal.field)
        if ev.source == cal.source:  # the probe does not exclude calibration documents from its windows
            raise SystemExit("down_keepK, _ls: the recipe's calibration and evaluation sources must differ")
        cw = calibration_windows(docs, AutoTokenizer.from_pretrained(model.path), args.calib_samples, args.seq_len, cal.seed)
        print(f"calibration {cal.source}: {args.calib_samples} x {args.seq_len} tokens, ids sha256 {cw.digest[:16]}")
        if any(v.startswith(("down_keep", "down_sq")) for v in variants):
            amax = down_input_absmax(model.path, cw.ids)
        if any(v.endswith("_ls") for v in variants):
            ls = ls_statistics(model.path, cw.ids, only_down="all_ls" not in variants)
    base = None
    for v in variants:
        t0 = time.perf_counter()
        ppl = evaluate(model.path, v, win.ids, win.prefix_len, amax, ls, args.ls_damp)
        base = ppl if v == "fp32" else base
        rel = f" ({(ppl / base - 1) * 100:+.2f}% vs fp32)" if base and v != "fp32" else ""
        print(f"{v:20s} {ppl:8.3f}{rel}  {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
