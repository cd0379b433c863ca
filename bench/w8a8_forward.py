"""The PyTorch W8A8 runtime's speed: a real model's forward with every decoder linear as
kiln.compress.w8a8.W8A8Linear (round-to-nearest int8 weights per channel, dynamic per-token int8
inputs), against the same model in float32, in one process, the two alternating.

    python bench/w8a8_forward.py [--recipe recipes/quickstart.yaml] [--batch 4] [--seq-len 512] [--repeats 5]

This runtime is what kiln evaluates W8A8 stages with and what the later linears of a layer calibrate
through, so its speed is part of every W8A8 run. Prints the median and best wall time of each, the
median of the per-round ratios, and a digest of the W8A8 logits (the same digest at two commits
means the same numbers). To compare commits, run this file against each one's src (e.g.
`PYTHONPATH=<old checkout>/src`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def paired(models: list, ids, repeats: int) -> tuple[list[list[float]], torch.Tensor]:
    """Each round runs every model once, in turn, so that a slow spell of a shared machine falls on
    all of them alike; returns each model's times and the last model's logits."""
    times = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            out = m(ids).logits  # warm-up
        for _ in range(repeats):
            for m, ts in zip(models, times):
                t = time.perf_counter()
                out = m(ids).logits
                ts.append(time.perf_counter() - t)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"), help="its model section is used")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from kiln.compress.quant import QuantScheme, rtn_quantize
    from kiln.compress.w8a8 import W8A8Linear
    from kiln.recipe import load_recipe
    from kiln.source import resolve_model

    path = resolve_model(load_recipe(args.recipe).model).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    w8a8 = copy.deepcopy(model)
    w8 = QuantScheme(bits=8, group_size=None, symmetric=True)
    swapped = 0
    for name, mod in list(w8a8.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            q = rtn_quantize(mod.weight.data, w8)
            w8a8.set_submodule(name, W8A8Linear.from_quantized(q.codes, q.scale, mod.bias))
            swapped += 1
    (fp32_times, w8_times), logits = paired([model, w8a8], ids, args.repeats)

    digest = hashlib.sha256(logits.numpy().tobytes()).hexdigest()[:16]
    f, w = statistics.median(fp32_times), statistics.median(w8_times)
    ratios = [b / a for a, b in zip(fp32_times, w8_times)]
    print(f"{path.name[:12]}…, {swapped} linears as W8A8Linear, {args.batch} × {args.seq_len} tokens, "
          f"{args.threads} threads, {args.repeats} repeats")
    print("| forward | median s | best s |")
    print("|---|---|---|")
    print(f"| float32 | {f:.3f} | {min(fp32_times):.3f} |")
    print(f"| W8A8 | {w:.3f} | {min(w8_times):.3f} |")
    print(f"W8A8 / float32: {statistics.median(ratios):.2f}× (median of {len(ratios)} paired rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); W8A8 logits sha256 {digest}")


if __name__ == "__main__":
    main()
