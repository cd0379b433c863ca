"""Perplexity over fixed, non-overlapping windows.

Each window is `seq_len` tokens: the tokenizer's own prefix (BOS where it adds one) followed by a
contiguous stretch of the evaluation text. Every token after the first is predicted from the ones
before it inside its window (no context carried across windows); prefix tokens are not scored.
perplexity = exp(Σ NLL / scored tokens), the same token ids for every variant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.context import RunContext
from kiln.errors import EvaluationError

LOGIT_BUDGET_BYTES = 512 * 2**20  # batch so that one batch's fp32 logits stay under this


def perplexity(model, ids: torch.Tensor, prefix_len: int, ctx: RunContext, batch_size: int = 4, label: str = "") -> dict:
    windows, L = ids.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = max(1, min(batch_size, LOGIT_BUDGET_BYTES // (L * vocab * 4)))
    first = max(1, prefix_len)  # first scored target position
    nll, count = 0.0, 0
    with torch.no_grad(), ctx.progress(f"perplexity {label}", windows) as advance:
        for b in range(0, windows, batch_size):
            x = ids[b : b + batch_size]
            logits = model(input_ids=x, use_cache=False).logits.float()  # (B, L, V)
            pred = logits[:, first - 1 : -1]
            target = x[:, first:]
            nll += float(F.cross_entropy(pred.reshape(-1, vocab), target.reshape(-1), reduction="sum"))
            count += target.numel()
            advance(x.shape[0])
    mean = nll / count
    if not math.isfinite(mean):
        raise EvaluationError(f"perplexity {label}: the model produced non-finite losses",
                              hint="the compressed weights are broken; check the stage results")
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens_scored": count}
