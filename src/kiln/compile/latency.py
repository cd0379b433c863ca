"""Serving figures of one compiled target, measured in a child process so its peak RSS is the
graph's own: time to first token, inter-token latency percentiles, tokens/s at batch 1 and at a
larger batch, and cost per million tokens at a stated machine price.

    python -m kiln.compile.latency FOLDER PROMPT.npy --provider CPUExecutionProvider --new-tokens 64 --batch 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(folder: Path, prompt: np.ndarray, provider: str, new_tokens: int, batch: int, threads: int | None = None,
            io_binding: bool | None = None) -> dict:
    from kiln.compile.runtime import OnnxDecoder, generate

    t0 = time.perf_counter()
    dec = OnnxDecoder(folder / "model.onnx", provider, threads, io_binding=io_binding)
    load_s = time.perf_counter() - t0
    generate(dec, prompt[:, :16], 2)  # warm-up: first-run allocations are not serving latency
    ttft = []
    for _ in range(3):
        g = generate(dec, prompt, 1)
        ttft.append(g.prefill_s)
    g1 = generate(dec, prompt, new_tokens)
    itl = g1.step_s
    gb = generate(dec, np.repeat(prompt, batch, axis=0), new_tokens)
    return {"provider": provider, "io_binding": dec.io_binding, "prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens, "batch": batch,
            "load_s": load_s, "ttft_ms": 1000 * float(np.median(ttft)),
            "itl_ms_p50": 1000 * _percentile(itl, 50), "itl_ms_p95": 1000 * _percentile(itl, 95),
            "itl_ms_p99": 1000 * _percentile(itl, 99), "tokens_per_s_b1": len(itl) / sum(itl),
            f"tokens_per_s_b{batch}": batch * len(gb.step_s) / sum(gb.step_s),
            "tokens_per_s_batch": batch * len(gb.step_s) / sum(gb.step_s), "peak_rss_bytes": _vm_hwm()}


def measure_in_child(folder: Path, prompt: np.ndarray, provider: str, new_tokens: int, batch: int,
                     usd_per_hour: float | None = None, timeout: float = 1800) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "prompt.npy", prompt)
        cmd = [sys.executable, "-m", "kiln.compile.latency", str(folder), str(Path(tmp) / "prompt.npy"),
               "--provider", provider, "--new-tokens", str(new_tokens), "--batch", str(batch)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        from kiln.errors import EvaluationError

        raise EvaluationError(f"latency measurement of {folder} failed: {res.stderr.strip().splitlines()[-1:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["size_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    if usd_per_hour:
        out["usd_per_hour"] = usd_per_hour
        out["usd_per_1m_tokens_b1"] = usd_per_hour / (out["tokens_per_s_b1"] * 3600) * 1e6
        out["usd_per_1m_tokens_batch"] = usd_per_hour / (out["tokens_per_s_batch"] * 3600) * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("prompt", type=Path)
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    print(json.dumps(measure(args.folder, np.load(args.prompt), args.provider, args.new_tokens, args.batch)))


if __name__ == "__main__":
    main()
