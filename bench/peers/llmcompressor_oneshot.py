"""llm-compressor side of bench/vs_llmcompressor.py. Runs INSIDE llm-compressor's own virtual
environment (its pins conflict with kiln's), one method per invocation:

    /work/venv-llmc/bin/python bench/peers/llmcompressor_oneshot.py --model HF_DIR \
        --calib-ids calib.npy --method gptq_w4a16 --group-size 64 --out DIR

`--calib-ids` is an int64 array (samples × seq_len): the exact calibration token ids kiln used, so
both tools see the same tokens. The model folder is the safetensors checkpoint kiln cached from the
GGUF (fp32, no quantization_config). The compressed model is saved with `save_compressed=True`
(compressed-tensors) into DIR; one JSON line with the phase timings goes to stdout. Nothing is
downloaded (HF_HUB_OFFLINE=1); torch is pinned to `--threads` threads.

Methods (G = --group-size):
  gptq_w4a16    GPTQModifier: int4 weights, symmetric, groups of G, actorder static, block 128, damp 0.01
  awq_w4a16     AWQModifier (default mappings, duo scaling) + QuantizationModifier: int4 asymmetric groups of G
  sq_gptq_w8a8  SmoothQuantModifier(smoothing_strength=0.5) + GPTQModifier: int8 per-channel symmetric
                weights (actorder static), dynamic per-token int8 activations
  sparsegpt_50  SparseGPTModifier(sparsity=0.5)            (unstructured)
  sparsegpt_24  SparseGPTModifier(sparsity=0.5, mask_structure="2:4")
lm_head is ignored everywhere (kiln only touches linears inside decoder layers).

CPU-only workaround (see cpu_workarounds): AWQ's activation cache calls Tensor.pin_memory(), which
raises without an accelerator; pinning is turned into a no-op.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

METHODS = ("gptq_w4a16", "awq_w4a16", "sq_gptq_w8a8", "sparsegpt_50", "sparsegpt_24")
SMOOTHING_STRENGTH = 0.5


def build_recipe(method: str, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    ignore = ["lm_head"]

    def w4(symmetric: bool) -> dict:
        # the W4A16 / W4A16_ASYM presets with our group size instead of their 128
        return {"group_0": QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group",
                                     group_size=group_size))}

    if method == "gptq_w4a16":
        return [GPTQModifier(config_groups=w4(True), ignore=ignore, actorder="static", block_size=128,
                             dampening_frac=0.01)]
    if method == "awq_w4a16":
        # 0.14 splits AWQ into a transform (smoothing-scale search) plus a quantizing modifier
        return [AWQModifier(), QuantizationModifier(config_groups=w4(False), ignore=ignore)]
    if method == "sq_gptq_w8a8":
        w8a8 = {"group_0": QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                                               dynamic=True))}
        return [SmoothQuantModifier(smoothing_strength=SMOOTHING_STRENGTH),
                GPTQModifier(config_groups=w8a8, ignore=ignore, actorder="static", block_size=128,
                             dampening_frac=0.01)]
    if method == "sparsegpt_50":
        return [SparseGPTModifier(sparsity=0.5, ignore=ignore, block_size=128, dampening_frac=0.01)]
    if method == "sparsegpt_24":
        return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=ignore, block_size=128,
                                  dampening_frac=0.01)]
    raise SystemExit(f"unknown method {method!r}; one of {', '.join(METHODS)}")


def cpu_workarounds() -> list[str]:
    """llm-compressor 0.14 on a machine without an accelerator: AWQModifier pins its cached
    activations (IntermediatesCache.pin_memory, only a host→device transfer optimization), and
    Tensor.pin_memory() raises "Cannot access accelerator device when none is available". Pinning is
    skipped when there is no accelerator; nothing else changes."""
    import torch

    from llmcompressor.pipelines.cache import IntermediatesCache

    applied = []
    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
        applied.append("IntermediatesCache.pin_memory disabled (no accelerator)")
    return applied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint folder (fp32 safetensors)")
    ap.add_argument("--calib-ids", required=True, help=".npy int64 array, samples × seq_len")
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the dtype the model is loaded in, and so the one llm-compressor calibrates in "
                         "(its Hessians are float32 either way)")
    args = ap.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t_start = time.perf_counter()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot

    workarounds = cpu_workarounds()
    timings = {"import_s": time.perf_counter() - t_start}
    ids = np.load(args.calib_ids)
    if ids.ndim != 2 or ids.dtype != np.int64:
        raise SystemExit(f"{args.calib_ids}: expected an int64 samples × seq_len array, got {ids.dtype} {ids.shape}")
    n, seq_len = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=build_recipe(args.method, args.group_size),
        dataset=dataset,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        batch_size=1,
        shuffle_calibration_samples=False,  # every sample is used either way; keep the order fixed
    )
    timings["oneshot_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    import llmcompressor

    print(json.dumps({"method": args.method, "group_size": args.group_size, "samples": int(n), "seq_len": int(seq_len),
                      "llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "workarounds": workarounds, "timings": {k: round(v, 3) for k, v in timings.items()}}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
