"""A compiled GPU target on a GPU machine: the artifact's onnx/<target> graph run by ONNX Runtime's
CUDA execution provider, checked against kiln's PyTorch model of the same weights, and timed.

kiln's parity check needs the target's runtime in the process that compiles; on a CPU machine the
cuda graph's numerics are checked on the CPU provider instead (a stand-in, recorded in the
manifest). This script closes the gap in two steps:

    # here, on the CPU machine that ran the recipe
    python bench/cuda_check.py reference --recipe recipes/quickstart-gpu.yaml --kiln-out runs/quickstart-gpu \
        --out /tmp/cuda-ref
    # on the GPU machine, with onnxruntime-gpu installed
    python bench/cuda_check.py check runs/quickstart-gpu/artifact/onnx/cuda /tmp/cuda-ref

`reference` runs kiln's PyTorch model (the artifact's checkpoint, dequantized, float32) on the
recipe's evaluation windows and saves, per position, its argmax and the window's negative
log-likelihood, plus the full logits of the first POSITIONS positions of each window.

`check` runs the graph on the CUDA provider over the same windows: top-1 agreement, perplexity
against the reference, max |Δ logit| on the saved positions; the same figures for the CPU provider
as a control when --cpu-control is given; then greedy tokens, time to first token of a PROMPT_LEN
prompt, inter-token latency p50/p95/p99 at batch 1 and tokens/s at batch BATCH, through kiln's decode
loop twice: with IO binding (the KV cache stays on the GPU; its default off the CPU) and with numpy
feeds (the cache crosses the bus every step). It prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def reference(recipe_path: Path, kiln_out: Path, out: Path, windows: int, positions: int) -> None:
    import torch
    from transformers import AutoTokenizer

    from kiln.artifact import load_model
    from kiln.compile import window_nll
    from kiln.data import evaluation_windows, load_documents
    from kiln.recipe import load_recipe
    from kiln.source import resolve_model

    recipe = load_recipe(recipe_path)
    ev_cfg = recipe.data.evaluation[0]
    tok = AutoTokenizer.from_pretrained(resolve_model(recipe.model).path)
    ids = evaluation_windows(load_documents(ev_cfg.source, ev_cfg.field), tok, windows, ev_cfg.seq_len, set()).ids
    model = load_model(kiln_out / "artifact").float().eval()
    argmax, nll, head = [], [], []
    with torch.no_grad():
        for w in range(ids.shape[0]):
            lg = model(input_ids=ids[w : w + 1], use_cache=False).logits.float().numpy()
            argmax.append(lg.argmax(-1)[0].astype(np.int32))
            nll.append(window_nll(lg, ids[w : w + 1].numpy(), 1))
            head.append(lg[0, :positions])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "reference.npz", ids=ids.numpy(), argmax=np.stack(argmax), nll=np.array([n for n, _ in nll]),
             tokens=np.array([t for _, t in nll]), head_logits=np.stack(head))
    print(json.dumps({"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                      "perplexity": math.exp(sum(n for n, _ in nll) / sum(t for _, t in nll))}))


def parity(dec, ref) -> dict:
    from kiln.compile import window_nll

    ids, agree, nll, worst = ref["ids"], 0, 0.0, 0.0
    positions = ref["head_logits"].shape[1]
    for w in range(ids.shape[0]):
        lg = dec.logits(ids[w : w + 1])
        agree += int((lg.argmax(-1)[0] == ref["argmax"][w]).sum())
        nll += window_nll(lg, ids[w : w + 1], 1)[0]
        worst = max(worst, float(np.abs(lg[0, :positions] - ref["head_logits"][w]).max()))
    ppl, ppl_t = math.exp(nll / ref["tokens"].sum()), math.exp(ref["nll"].sum() / ref["tokens"].sum())
    return {"top1_agreement": agree / ids.size, "perplexity_onnx": ppl, "perplexity_torch": ppl_t,
            "perplexity_rel": ppl / ppl_t - 1, "max_abs_logit_first_positions": worst, "positions_compared": positions}


def profile(folder: Path, provider: str, prompt: np.ndarray, steps: int) -> dict:
    """ONNX Runtime's own profiler over `steps` cached decode steps: time per op type and the
    provider each ran on, largest first."""
    import collections

    import onnxruntime as ort

    from kiln.compile.runtime import OnnxDecoder, generate, providers

    dec = OnnxDecoder(folder / "model.onnx", provider)
    generate(dec, prompt, 2)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/kiln-ort-profile"
    dec.sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=providers(provider))
    t = time.perf_counter()
    g = generate(dec, prompt, steps + 1)
    wall = time.perf_counter() - t
    trace = json.loads(Path(dec.sess.end_profiling()).read_text())
    per_op: dict = collections.defaultdict(float)
    run_us = 0.0
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            a = e.get("args", {})
            per_op[f"{a.get('op_name')}@{a.get('provider', '?').replace('ExecutionProvider', '')}"] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            run_us += e["dur"]
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return {"steps": len(g.step_s), "wall_s": wall, "model_run_ms_total": run_us / 1000,
            "step_ms_mean": 1000 * float(np.mean(g.step_s)),
            "kernel_ms_per_run": {k: v / 1000 / (len(g.step_s) + 1) for k, v in top}}  # prefill + steps


def check(folder: Path, ref_dir: Path, provider: str, prompt_len: int, new_tokens: int, batch: int, cpu_control: bool,
          profile_steps: int = 0) -> None:
    import onnxruntime as ort

    from kiln.compile.latency import measure
    from kiln.compile.runtime import OnnxDecoder, generate

    if provider != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels beside it, where those are how CUDA came
    ref = dict(np.load(ref_dir / "reference.npz"))
    out = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "graph": str(folder)}
    t = time.perf_counter()
    dec = OnnxDecoder(folder / "model.onnx", provider)
    out["session_s"] = time.perf_counter() - t
    out["session_providers"] = dec.sess.get_providers()
    out["parity"] = parity(dec, ref)
    prompt = np.concatenate(list(ref["ids"]))[:prompt_len][None]
    out["greedy_tokens"] = generate(dec, prompt[:, :32], 16).tokens[0].tolist()
    if cpu_control:
        cpu = OnnxDecoder(folder / "model.onnx", "CPUExecutionProvider")
        out["cpu_control"] = {"parity": parity(cpu, ref), "greedy_tokens": generate(cpu, prompt[:, :32], 16).tokens[0].tolist()}
        del cpu
    del dec
    out["latency"] = measure(folder, prompt, provider, new_tokens, batch)
    out["latency_numpy_feeds"] = measure(folder, prompt, provider, new_tokens, batch, io_binding=False)
    if profile_steps:
        out["profile"] = profile(folder, provider, prompt, profile_steps)
    print(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--recipe", type=Path, default=Path("recipes/quickstart-gpu.yaml"))
    r.add_argument("--kiln-out", type=Path, default=Path("runs/quickstart-gpu"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--windows", type=int, default=4)
    r.add_argument("--positions", type=int, default=8)
    c = sub.add_parser("check")
    c.add_argument("folder", type=Path)
    c.add_argument("reference", type=Path)
    c.add_argument("--provider", default="CUDAExecutionProvider")
    c.add_argument("--prompt-len", type=int, default=512)
    c.add_argument("--new-tokens", type=int, default=64)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--cpu-control", action="store_true")
    c.add_argument("--profile", type=int, default=0, help="decode steps to run under ONNX Runtime's profiler")
    a = ap.parse_args()
    if a.cmd == "reference":
        reference(a.recipe, a.kiln_out, a.out, a.windows, a.positions)
    else:
        check(a.folder, a.reference, a.provider, a.prompt_len, a.new_tokens, a.batch, a.cpu_control, a.profile)


if __name__ == "__main__":
    sys.exit(main())
