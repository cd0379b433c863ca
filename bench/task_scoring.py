"""Task scoring with and without the shared-context path, on one artifact, in one invocation:

    python bench/task_scoring.py [--artifact runs/quickstart/artifact] [--target cpu] [--docs 30]
        [--tasks hellaswag,arc_easy]

For each task, the first DOCS documents of the seeded 500-document sample (seed 1234, as
recipes/quickstart-tasks.yaml) are scored twice by PyTorch (the artifact's checkpoint, dequantized)
and twice by the artifact's onnx/<target> graph: as right-padded full rows (one row per choice) and
with the context run once and the choices read through its KV cache. Prints wall seconds, the
speedup, and the largest log-likelihood difference between the two paths.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=Path("runs/quickstart/artifact"))
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--docs", type=int, default=30)
    ap.add_argument("--tasks", default="hellaswag,arc_easy")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from kiln.artifact import load_model
    from kiln.compile.runtime import OnnxDecoder
    from kiln.evaluate.tasks import OnnxScorer, Scorer, TorchScorer, _rows, evaluate_task, select

    class FullRows(Scorer):
        def __init__(self, inner: Scorer):
            self.inner = inner

        def full(self, ids):
            return self.inner.full(ids)

    tok = AutoTokenizer.from_pretrained(a.artifact)
    scorers = {"pytorch": TorchScorer(load_model(a.artifact).float().eval()),
               f"onnx:{a.target}": OnnxScorer(OnnxDecoder(a.artifact / "onnx" / a.target / "model.onnx"))}
    print("| task | scorer | full rows s | shared context s | speedup | max abs Δ loglik | acc (both) |")
    print("|---|---|---|---|---|---|---|")
    for task in a.tasks.split(","):
        idx = select(len(_rows(task)), 500, 1234)[: a.docs]
        for name, sc in scorers.items():
            runs = {}
            for mode, s in (("full", FullRows(sc)), ("shared", sc)):
                t = time.perf_counter()
                r = evaluate_task(task, s, tok, indices=idx)
                runs[mode] = (time.perf_counter() - t, r)
            (tf, rf), (ts, rs) = runs["full"], runs["shared"]
            diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                       for x, y in zip(rf["loglikelihoods"], rs["loglikelihoods"]))
            print(f"| {task} | {name} | {tf:.1f} | {ts:.1f} | {tf / ts:.2f}× | {diff:.1e} | {rf['acc']:.3f} / {rs['acc']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
