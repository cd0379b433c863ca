"""kiln's compiled int4 graph against onnxruntime-genai's own builder, in one invocation on the same
machine, measured by one harness in child processes (one at a time, same thread count):

    python bench/vs_genai.py [--recipe recipes/quickstart.yaml] [--kiln-out runs/quickstart]
        [--prompt-len 512] [--decode-tokens 64] [--batch 8] [--batch-prompt 128] [--windows 16]
        [--threads 2] [--workdir /tmp/kiln-vs-genai] [--rounds 6] [--no-genai-pruned]

  kiln   `kiln run RECIPE --out KILN_OUT` (resumes: an already finished run costs nothing) and takes
         the artifact's onnx/<target> folder (GPTQ codes in MatMulNBits).
  genai  `python -m onnxruntime_genai.models.builder -i HF_FP32 -o OUT -p int4 -e cpu` on the same
         fp32 weights kiln started from (its RTN int4, default options), HF folder written from kiln's
         model cache as ../shared/PEERS.md describes. The ratios are against this graph.
  genai prune_lm_head
         the same with `--extra_options prune_lm_head=true` (unless --no-genai-pruned): its output
         projection runs on the last position only, as kiln's graph does by default. It cannot score
         perplexity (its logits are the last position's), so it has no ppl.

Each graph is then run by two runtimes: kiln's (kiln.compile.runtime: ONNX Runtime, the KV cache
written in place by GroupQueryAttention, as `kiln run` evaluates and serves it) and onnxruntime-genai's
own (og.Generator with the graph's genai_config.json, the same intra-op thread count). The headline
compares each tool's graph in its own runtime; two more lines compare the graphs in one runtime each,
so a difference of graph and one of runtime are told apart. Figures: perplexity on kiln's evaluation
windows (kiln's runtime, full windows, no cache), prefill latency of a PROMPT_LEN-token prompt (median
of 3, asking for the last position's logits where the graph lets it choose), decode ms/token at batch 1
(p50, p95 over DECODE_TOKENS steps), tokens/s at batch BATCH, file size. Each graph/runtime pair is
first measured alone in a child: speeds (kept in results.json as "alone") and the peak RSS they
reached (VmHWM, read before anything else runs), then with kiln's runtime perplexity, file and step
bytes. Speeds drift on a shared machine by ±20% from one process to the next, so the table's speeds
come from one more child that loads every pair and measures them in turn ROUNDS times, each first in
turn: drift then falls on all of them alike.
The table gives the median of each speed over rounds, and the ratio lines the per-round ratios.
The memory-bandwidth bound of one decode step is the bytes of weights a step reads (every
initializer except tables read by Gather and the rotary tables) over a measured read bandwidth
(numpy sum over 1 GiB, best of 5); the table prints each graph's measured step time as a fraction
of that bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from vs_llmcompressor import _child_env, _stdout_json, code_version, run_timed  # noqa: E402


# --- child: measure one graph ----------------------------------------------------------------------


def read_bandwidth_gbs(nbytes: int = 2**30, repeats: int = 5) -> float:
    a = np.ones(nbytes // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def step_weight_bytes(path: Path) -> dict:
    """Bytes of initializers one decode step reads: all but Gather tables and the rotary caches."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    size = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    gathered, other = set(), set()
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            if name in size:
                (gathered if n.op_type.startswith("Gather") and i == 0 else other).add(name)
            if n.op_type == "GroupQueryAttention" and i in (7, 8) and name in size:
                gathered.add(name)
    only_gathered = gathered - other
    return {"step_bytes": sum(v for k, v in size.items() if k not in only_gathered),
            "table_bytes": sum(size[k] for k in only_gathered), "total_bytes": sum(size.values())}


def measure(folder: Path, windows_npy: Path, prompt_len: int, decode_tokens: int, batch: int, batch_prompt: int,
            threads: int, score: bool = True, runtime: str = "kiln") -> dict:
    """One graph's figures, in this (child) process: speeds and the peak RSS they reached, then with
    kiln's runtime the perplexity and the graph's bytes."""
    import math

    from kiln.compile import window_nll

    from kiln.compile.latency import _vm_hwm

    ids = np.load(windows_npy)
    t0 = time.perf_counter()
    runner = runner_for(runtime, folder, threads)
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, **speeds(runner, ids, prompt_len, decode_tokens, batch, batch_prompt, prefills=3),
           "serving_peak_rss_bytes": _vm_hwm()}  # before scoring: full-window logits are not serving memory
    if runtime != "kiln":
        return out
    nll, count = 0.0, 0
    for w in range(ids.shape[0] if score else 0):
        w_nll, n = window_nll(runner.dec.logits(ids[w : w + 1]), ids[w : w + 1], 1)
        nll += w_nll
        count += n
    sizes = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
    return {**out, "perplexity": math.exp(nll / count) if count else None, "tokens_scored": count,
            "file_bytes": sizes, **step_weight_bytes(folder / "model.onnx")}


class KilnRunner:
    """kiln.compile.runtime: ONNX Runtime sessions, the KV cache written in place where the graph's
    attention allows it (GroupQueryAttention: both graphs here); a step's time is its forward pass."""

    def __init__(self, folder: Path, threads: int, shared_cache: bool | None = None):
        from kiln.compile.runtime import OnnxDecoder

        self.dec = OnnxDecoder(folder / "model.onnx", threads=threads, shared_cache=shared_cache)

    def prefill(self, prompt: np.ndarray, length: int) -> float:
        t = time.perf_counter()
        self.dec.forward(prompt, np.ones_like(prompt), self.dec.new_cache(prompt.shape[0], length), last_only=True)
        return time.perf_counter() - t

    def generate(self, prompt: np.ndarray, new_tokens: int):
        from kiln.compile.runtime import generate

        return generate(self.dec, prompt, new_tokens)


class GenaiRunner:
    """onnxruntime-genai's own runtime (og.Generator, greedy, max_length = prompt + new tokens) with the
    folder's genai_config.json, its session given `threads` intra-op threads as kiln's is (left to
    itself, onnxruntime-genai 0.18 ran one thread on this 2-core machine). Prefill is append_tokens; a
    step is generate_next_token, which picks the next token (an argmax, ~0.02 ms here) and runs the
    forward pass."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        cfg = og.Config(str(folder))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og, self.model = og, og.Model(cfg)

    def _generator(self, prompt: np.ndarray, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length, batch_size=prompt.shape[0])
        return self.og.Generator(self.model, params)

    def prefill(self, prompt: np.ndarray, length: int) -> float:
        gen = self._generator(prompt, length)
        t = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32))
        return time.perf_counter() - t

    def generate(self, prompt: np.ndarray, new_tokens: int):
        from kiln.compile.runtime import Generation

        gen = self._generator(prompt, prompt.shape[1] + new_tokens)
        t = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32))
        out = Generation(np.zeros((prompt.shape[0], 0), np.int64), time.perf_counter() - t)
        for step in range(new_tokens):
            t = time.perf_counter()
            gen.generate_next_token()
            if step:  # the first call only picks from the prefill's logits
                out.step_s.append(time.perf_counter() - t)
            out.tokens = np.concatenate([out.tokens, gen.get_next_tokens().astype(np.int64)[:, None]], axis=1)
        return out


def runner_for(runtime: str, folder: Path, threads: int):
    if runtime == "kiln-growing":  # kiln's runtime as it was: present = past + new, a new cache each step
        return KilnRunner(folder, threads, shared_cache=False)
    return {"kiln": KilnRunner, "genai": GenaiRunner}[runtime](folder, threads)


def speeds(runner, ids: np.ndarray, prompt_len: int, decode_tokens: int, batch: int, batch_prompt: int,
           prefills: int = 1) -> dict:
    """Prefill of a prompt_len-token prompt (median of `prefills`; the forward pass as the decode loop
    runs it), decode ms/token at batch 1 over decode_tokens steps (p50, p95), tokens/s at `batch`."""
    prompt = np.concatenate([ids[0], ids[1]])[:prompt_len][None]
    prefill = [runner.prefill(prompt, prompt_len + decode_tokens + 1) for _ in range(prefills)]
    g1 = runner.generate(prompt, decode_tokens + 1)
    steps = sorted(g1.step_s)
    bprompt = ids[:batch, :batch_prompt] if ids.shape[0] >= batch else np.repeat(ids[:1, :batch_prompt], batch, 0)
    gb = runner.generate(bprompt, 33)
    return {"prefill_ms": 1000 * statistics.median(prefill), "decode_ms_p50": 1000 * statistics.median(steps),
            "decode_ms_p95": 1000 * steps[min(len(steps) - 1, int(round(0.95 * (len(steps) - 1))))],
            "decode_tok_s_b1": len(steps) / sum(steps), "decode_tok_s_batch": batch * len(gb.step_s) / sum(gb.step_s),
            "greedy_tokens": g1.tokens[0, :16].tolist()}


def measure_paired(engines: list[str], windows_npy: Path, reps: int, prompt_len: int, decode_tokens: int, batch: int,
                   batch_prompt: int, threads: int) -> list[list[dict]]:
    """Every engine (RUNTIME:FOLDER) loaded in this one process, warmed up, and measured in turn `reps`
    times, each first in turn: drift on a shared machine then falls on all of them alike. Per engine,
    one dict per rep."""
    ids = np.load(windows_npy)
    runners = [runner_for(e.split(":", 1)[0], Path(e.split(":", 1)[1]), threads) for e in engines]
    for r in runners:  # first-run allocations are not serving latency
        speeds(r, ids, prompt_len, 4, batch, batch_prompt)
    out: list[list[dict]] = [[] for _ in engines]
    order = list(range(len(engines)))
    for k in range(reps):
        for i in order[k % len(order):] + order[: k % len(order)]:
            out[i].append(speeds(runners[i], ids, prompt_len, decode_tokens, batch, batch_prompt, prefills=3))
    return out


# --- parent ---------------------------------------------------------------------------------------


def hf_folder(model_path: Path, dst: Path) -> Path:
    """The fp32 checkpoint kiln starts from, as a plain HF folder the builder reads."""
    if (dst / "config.json").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_path, tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if not cfg.get("architectures"):  # GGUF conversions leave it out; the builder dispatches on it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        cfg["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg["model_type"]]]
    rp = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, dst)
    return dst


def graph_facts(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nb[0].attribute} if nb else {}
    return {"matmulnbits": len(nb), "block_size": attrs.get("block_size"), "bits": attrs.get("bits"),
            "accuracy_level": attrs.get("accuracy_level", 0), "nodes": len(m.graph.node),
            "quantized_lm_head": any("lm_head" in n.name for n in nb)}


KILN, GENAI, PRUNED = "kiln", "onnxruntime-genai", "onnxruntime-genai prune_lm_head"
GENAI_IN_KILN, KILN_IN_GENAI = "genai graph, kiln runtime", "kiln graph, genai runtime"
KILN_GROWING = "kiln, growing cache"
SPEED_KEYS = ("prefill_ms", "decode_ms_p50", "decode_ms_p95", "decode_tok_s_b1", "decode_tok_s_batch")


def _ratios(rounds: dict[str, list[dict]], key: str, inverse: bool = False, other: str = GENAI, ours: str = KILN) -> str:
    pairs = zip(rounds[ours], rounds[other])
    vals = [(g[key] / k[key]) if inverse else (k[key] / g[key]) for k, g in pairs]
    return "[" + ", ".join(f"{v:.2f}" for v in vals) + "]"


def _ratio_line(res: dict, rounds: dict, ours: str, other: str, batch: int) -> str:
    a, b = res[ours], res[other]
    return (f"prefill speed {b['prefill_ms'] / a['prefill_ms']:.2f}× {_ratios(rounds, 'prefill_ms', True, other, ours)}, "
            f"decode tok/s b1 {a['decode_tok_s_b1'] / b['decode_tok_s_b1']:.2f}× {_ratios(rounds, 'decode_tok_s_b1', False, other, ours)}, "
            f"tok/s b{batch} {a['decode_tok_s_batch'] / b['decode_tok_s_batch']:.2f}× "
            f"{_ratios(rounds, 'decode_tok_s_batch', False, other, ours)}")


def fmt_row(name: str, r: dict) -> str:
    bound_ms = 1000 * r["step_bytes"] / (r["bandwidth_gbs"] * 1e9)
    ppl = "—" if r.get("perplexity") is None else f"{r['perplexity']:.3f}"
    return (f"| {name} | {ppl} | {r['prefill_ms']:.1f} | {r['decode_ms_p50']:.2f} | {r['decode_ms_p95']:.2f} "
            f"| {r['decode_tok_s_b1']:.1f} | {r['decode_tok_s_batch']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} "
            f"| {r['file_bytes'] / 2**20:.1f} | {r['step_bytes'] / 2**20:.1f} | {bound_ms:.2f} | {bound_ms / r['decode_ms_p50']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    ap.add_argument("--kiln-out", type=Path, default=REPO / "runs" / "quickstart")
    ap.add_argument("--target", default="cpu-fast", help="which onnx/<target> of the kiln artifact")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-prompt", type=int, default=128)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-vs-genai"))
    ap.add_argument("--rounds", type=int, default=6, help="speed measurements per graph in the paired process, each "
                    "graph first in turn; speeds are medians over rounds")
    ap.add_argument("--no-genai-pruned", action="store_true", help="skip the genai graph built with prune_lm_head=true")
    ap.add_argument("--no-score", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--paired", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--windows-npy", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--runtime", choices=("kiln", "kiln-growing", "genai"), default="kiln", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.windows_npy, args.prompt_len, args.decode_tokens, args.batch,
                                 args.batch_prompt, args.threads, not args.no_score, args.runtime)))
        return
    if args.paired:
        print(json.dumps(measure_paired([str(e) for e in args.paired], args.windows_npy, args.rounds, args.prompt_len, args.decode_tokens,
                                        args.batch, args.batch_prompt, args.threads)))
        return

    from kiln.recipe import load_recipe

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = _child_env(args.threads)
    recipe = load_recipe(args.recipe)
    if recipe.compile is None:
        sys.exit(f"{args.recipe} has no compile section")
    res = {}
    print(f"[kiln] kiln run {args.recipe} --out {args.kiln_out}", file=sys.stderr)
    k = run_timed([sys.executable, "-m", "kiln.cli", "run", str(args.recipe), "--out", str(args.kiln_out), "--json", "-q"],
                  env, work / "logs" / "kiln-run", None)
    if k["rc"] != 0:
        sys.exit(f"kiln run failed: {k['stderr'][-2000:]}")
    manifest = json.loads((args.kiln_out / "artifact" / "manifest.json").read_text())
    kiln_dir = args.kiln_out / "artifact" / "onnx" / args.target
    timings = manifest["timings"]
    compile_s = timings.get(f"compile[{args.target}]", {}).get("wall_s")

    from transformers import AutoTokenizer

    from kiln.data import evaluation_windows, load_documents
    from kiln.source import resolve_model

    model = resolve_model(recipe.model)
    ev_cfg = recipe.data.evaluation[0]
    tok = AutoTokenizer.from_pretrained(model.path)
    ev = evaluation_windows(load_documents(ev_cfg.source, ev_cfg.field), tok, args.windows, ev_cfg.seq_len, set())
    np.save(work / "windows.npy", ev.ids.numpy())
    hf = hf_folder(model.path, work / "hf-fp32")
    builds = {"onnxruntime-genai": (work / "genai-int4", [])}
    if not args.no_genai_pruned:
        builds[PRUNED] = (work / "genai-int4-pruned", ["--extra_options", "prune_lm_head=true"])
    # engine: (graph folder, runtime, scored); the runtime's own alone child gives its speeds and peak RSS
    engines = {KILN: (kiln_dir, "kiln", True)}
    for name, (folder, extra) in builds.items():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"[{name}] onnxruntime_genai.models.builder -p int4 -e cpu {' '.join(extra)}", file=sys.stderr)
        g = run_timed([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(folder),
                       "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache"), *extra], env,
                      work / "logs" / f"build-{folder.name}", None)
        if g["rc"] != 0:
            sys.exit(f"onnxruntime-genai builder failed: {g['stderr'][-2000:]}")
        res[name] = {"build_s": g["wall_s"]}
    engines[GENAI] = (builds[GENAI][0], "genai", False)
    engines[GENAI_IN_KILN] = (builds[GENAI][0], "kiln", True)
    engines[KILN_IN_GENAI] = (kiln_dir, "genai", False)
    engines[KILN_GROWING] = (kiln_dir, "kiln-growing", False)
    if PRUNED in builds:  # its logits are the last position's only: no perplexity
        engines[PRUNED] = (builds[PRUNED][0], "kiln", False)
    res[KILN] = {"build_s": compile_s}
    res[GENAI_IN_KILN] = dict(res[GENAI])
    res[KILN_IN_GENAI] = dict(res[KILN])
    res[KILN_GROWING] = dict(res[KILN])

    shape = ["--windows-npy", str(work / "windows.npy"), "--prompt-len", str(args.prompt_len), "--decode-tokens",
             str(args.decode_tokens), "--batch", str(args.batch), "--batch-prompt", str(args.batch_prompt),
             "--threads", str(args.threads)]
    bandwidth = read_bandwidth_gbs()  # here, not in a child: its 1 GiB buffer is no graph's memory
    for name, (folder, runtime, scored) in engines.items():  # alone in a child: peak RSS, perplexity, bytes
        print(f"[{name}] measuring {folder} alone ({runtime} runtime)", file=sys.stderr)
        r = run_timed([sys.executable, __file__, "--measure", str(folder), "--runtime", runtime, *shape]
                      + ([] if scored else ["--no-score"]), env, work / "logs" / f"measure-{folder.name}-{runtime}", None)
        if r["rc"] != 0:
            sys.exit(f"measuring {name} failed: {r['stderr'][-2000:]}")
        alone = _stdout_json(r["stdout"])
        res[name] = {**alone, "alone": {k: alone[k] for k in SPEED_KEYS}, "peak_rss_bytes": alone["serving_peak_rss_bytes"],
                     "child_peak_rss_bytes": r["peak_rss_bytes"], "bandwidth_gbs": bandwidth, "runtime": runtime,
                     **graph_facts(folder / "model.onnx"), **res[name]}
    for name, (folder, runtime, _) in engines.items():
        if runtime != "kiln":  # a graph's bytes are read in its kiln-runtime child
            twin = next(n for n, (f, rt, _) in engines.items() if f == folder and rt == "kiln")
            res[name].update({k: res[twin][k] for k in ("file_bytes", "step_bytes", "table_bytes", "total_bytes")})
    print(f"[paired] {len(engines)} engines in one process, {args.rounds} rounds", file=sys.stderr)
    r = run_timed([sys.executable, __file__, "--paired", *(f"{rt}:{f}" for f, rt, _ in engines.values()),
                   "--rounds", str(args.rounds), *shape], env, work / "logs" / "paired", None)
    if r["rc"] != 0:
        sys.exit(f"paired measurement failed: {r['stderr'][-2000:]}")
    rounds = dict(zip(engines, _stdout_json(r["stdout"])))
    for name in engines:
        res[name].update({key: statistics.median(x[key] for x in rounds[name]) for key in SPEED_KEYS}, rounds=rounds[name])

    a, b, c = res[KILN], res[GENAI], res[GENAI_IN_KILN]
    rows = {KILN: "kiln: its graph, its runtime", GENAI: "onnxruntime-genai: its graph, its runtime",
            KILN_IN_GENAI: "kiln's graph in onnxruntime-genai's runtime", GENAI_IN_KILN: "onnxruntime-genai's graph in kiln's runtime",
            PRUNED: "onnxruntime-genai prune_lm_head graph in kiln's runtime",
            KILN_GROWING: "kiln, a new cache each step (kiln's runtime before 4408586)"}
    lines = [f"kiln vs onnxruntime-genai builder — {model.origin}, {args.threads} threads, "
             f"{args.windows}×{ev_cfg.seq_len} evaluation tokens, kiln commit {code_version()}",
             "",
             "| graph, runtime | ppl | prefill ms | decode ms p50 | p95 | tok/s b1 | tok/s b%d | peak RSS MiB | file MiB | "
             "MiB read/step | bound ms | of bound |" % args.batch,
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             *(fmt_row(label, res[n]) for n, label in rows.items() if n in res),
             "",
             f"kiln / onnxruntime-genai, each its own graph and runtime: {_ratio_line(res, rounds, KILN, GENAI, args.batch)}; "
             f"ppl {a['perplexity'] / c['perplexity']:.3f}, peak RSS {a['peak_rss_bytes'] / b['peak_rss_bytes']:.2f}, "
             f"file {a['file_bytes'] / b['file_bytes']:.2f} (medians of {args.rounds} rounds in one process, then per round)",
             f"graph for graph in kiln's runtime: {_ratio_line(res, rounds, KILN, GENAI_IN_KILN, args.batch)}",
             f"graph for graph in onnxruntime-genai's runtime: {_ratio_line(res, rounds, KILN_IN_GENAI, GENAI, args.batch)}",
             f"kiln's in-place cache / a new cache each step, same graph: {_ratio_line(res, rounds, KILN, KILN_GROWING, args.batch)}",
             *([f"kiln / {PRUNED} graph, both in kiln's runtime: {_ratio_line(res, rounds, KILN, PRUNED, args.batch)}"]
               if PRUNED in res else []),
             "measured alone (one child per engine, one pass each; ±20% between processes): " + "; ".join(
                 f"{n} prefill {res[n]['alone']['prefill_ms']:.0f} ms, decode p50 {res[n]['alone']['decode_ms_p50']:.2f} ms, "
                 f"b{args.batch} {res[n]['alone']['decode_tok_s_batch']:.0f} tok/s" for n in engines),
             "greedy tokens agree across runtimes: " + ", ".join(
                 f"{g} graph {res[x]['greedy_tokens'] == res[y]['greedy_tokens']}"
                 for g, x, y in (("kiln", KILN, KILN_IN_GENAI), ("onnxruntime-genai", GENAI_IN_KILN, GENAI))),
             f"read bandwidth {a['bandwidth_gbs']:.1f} GB/s (numpy sum over 1 GiB, best of 5)",
             f"kiln graph: {a['matmulnbits']} MatMulNBits, {a['bits']}-bit blocks of {a['block_size']}, accuracy_level "
             f"{a['accuracy_level']}, lm_head quantized: {a['quantized_lm_head']}; compile {a['build_s'] or float('nan'):.1f} s "
             "(export + checks; the compress stages are timed in the run's manifest)",
             f"genai graph: {b['matmulnbits']} MatMulNBits, {b['bits']}-bit blocks of {b['block_size']}, accuracy_level "
             f"{b['accuracy_level']}, lm_head quantized: {b['quantized_lm_head']}; builder {b['build_s']:.1f} s (RTN)"]
    text = "\n".join(lines)
    print(text)
    (work / "results.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
