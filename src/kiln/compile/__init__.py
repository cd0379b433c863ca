"""compile: the compressed model → one ONNX decoder graph per target, checked against PyTorch.

For each target: build the graph from the weight store (our codes become MatMulNBits, W8A8 layers
int8 MatMulInteger), save it with external weights, check it structurally (onnx checker, shape
inference), and where the target's runtime exists here, compare it with kiln's PyTorch model of the
same weights on evaluation windows and generate through the KV cache. A failed comparison is an error.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from kiln.compile.targets import CompileConfig, cpu_features, runtime_problem
from kiln.errors import CompileError


GENAI_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "generation_config.json", "chat_template.jinja")


def build_target(target, model_dir: Path, store, out: Path, trust_remote_code: bool = False) -> dict:
    """Write target `out/` (model.onnx, its weights, genai_config.json, tokenizer); returns its facts."""
    import onnx

    from kiln.compile.decoder import BuildOptions, build_decoder
    from kiln.compile.genai import write_genai_config
    from kiln.compile.graph import op_histogram, save

    out.mkdir(parents=True, exist_ok=True)
    opts = BuildOptions(dtype=target.dtype, accuracy_level=target.accuracy_level, max_length=target.max_length,
                        lm_head_bits=target.lm_head_bits, max_block=target.max_block)
    model, spec, kinds = build_decoder(model_dir, store, opts, trust_remote_code, qdq=target.target == "tensorrt")
    histogram = op_histogram(model)
    keeps_last = any(i.name == "logits_to_keep" for i in model.graph.input)
    save(model, out / "model.onnx")
    del model
    try:
        onnx.checker.check_model(str(out / "model.onnx"))
        onnx.shape_inference.infer_shapes_path(str(out / "model.onnx"), str(out / ".shapes.onnx"))
    except Exception as exc:  # the checker's own exception types vary by version
        raise CompileError(f"compile[{target.folder}]: the ONNX graph is invalid: {exc}") from None
    finally:
        (out / ".shapes.onnx").unlink(missing_ok=True)
    length = min(target.max_length or spec.max_positions, spec.max_positions)
    extra = {}
    if target.target == "tensorrt":
        from kiln.compile.qdq import trtexec_command

        cmd = trtexec_command(spec, target.dtype, length)
        (out / "build_engine.sh").write_text("#!/bin/sh\n# build the TensorRT engine on the serving GPU\n" + cmd + "\n")
        extra["engine_build"] = cmd
    else:
        write_genai_config(out, spec, model_dir, "model.onnx", length, None if target.target == "cpu" else target.provider)
    for f in GENAI_FILES:
        if (Path(model_dir) / f).is_file():
            shutil.copy2(Path(model_dir) / f, out / f)
    counts: dict[str, int] = {}
    for k in kinds.values():
        counts[k] = counts.get(k, 0) + 1
    return {"target": target.target, "dtype": target.dtype, "accuracy_level": target.accuracy_level,
            "lm_head": _head_note(target, store, spec),
            "logits": "last position unless the input logits_to_keep says otherwise (k: the last k; 0: every position)"
                      if keeps_last else "every position",
            "provider": target.provider, "family": spec.family, "context_length": length,
            "op_histogram": histogram, "linears": counts, "linear_kinds": kinds, **extra}


def _head_note(target, store, spec) -> str:
    info = store.quant_info(spec.lm_head + ".weight") if spec.lm_head else None
    if info is not None:
        return f"int{info['bits']} codes from compress (group {info['group_size']}, {'symmetric' if info['symmetric'] else 'asymmetric'})"
    if getattr(target, "lm_head_bits", None):
        return f"RTN int{target.lm_head_bits}, symmetric groups of 32, quantized at export"
    return "float, as stored"


def optimized_histogram(path: Path, provider: str) -> dict[str, int]:
    """The op histogram of the graph ONNX Runtime actually runs after its own graph optimizations."""
    import tempfile

    import onnxruntime as ort

    from kiln.compile.graph import op_histogram
    from kiln.compile.runtime import providers

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3  # the note that an ORT_ENABLE_ALL graph is tied to this CPU: we only count its ops
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), so, providers=providers(provider))
        return op_histogram(Path(tmp) / "opt.onnx")


def window_nll(logits: np.ndarray, ids: np.ndarray, first: int) -> tuple[float, int]:
    pred = logits[:, first - 1 : -1].astype(np.float64)
    target = ids[:, first:]
    m = pred.max(-1, keepdims=True)
    lse = np.log(np.exp(pred - m).sum(-1)) + m[..., 0]
    picked = np.take_along_axis(pred, target[..., None], -1)[..., 0]
    return float((lse - picked).sum()), int(target.size)


NOISE = 1e-6  # relative perturbation of the input embeddings for the PyTorch noise floor
# A float32 graph may be this many times PyTorch float32's own distance from float64 logits: both are
# the worst position's rounding noise, whose ratio was 1.9 for Gemma-3 on an AVX-512 Xeon; an export
# bug is orders of magnitude beyond either.
FLOAT64_FLOOR = 4.0


class Float64Logits:
    """The PyTorch model's logits in float64, one window at a time, from a float64 copy of the model
    made on first use (only a window where a float32 graph went past its limit needs it). Float32
    rounding alone puts both PyTorch and the graph some way from these; on a model with large
    activations (Gemma-3's residual stream) at some positions by more than 1e-3."""

    def __init__(self, torch_model):
        self.model, self.model64, self.window, self.logits = torch_model, None, None, None

    def __call__(self, w: int, x) -> np.ndarray:
        if self.window != w:
            import copy

            if self.model64 is None:
                self.model64 = copy.deepcopy(self.model).double()
            self.logits = self.model64(input_ids=x, use_cache=False).logits.numpy()
            self.window = w
        return self.logits


def check_parity(torch_model, decoders: dict, ids, prefix_len: int, limits: dict, float_exact: dict[str, bool], ctx,
                 noisy: set[str] = frozenset()) -> dict:
    """Compare every runnable target with the PyTorch model window by window (logits of one window at a
    time: nothing vocabulary-sized is kept). Returns per target its figures and pass/fail.

    Targets in `noisy` hold per-token dynamic int8 activations (W8A8): rounding to int8 turns float
    differences of one ulp into whole quantization steps, so even PyTorch disagrees with itself. For
    those the PyTorch model is also run on its input embeddings perturbed by 1e-6 (relative), and the
    graph is held to that noise floor (top-1 limit = min(limit, floor − 0.02); perplexity limit =
    max(limit, 2 × the floor's perplexity change)), all of it recorded.

    Float32 targets of unquantized models are also held to `max_abs_logit`; where one exceeds it on a
    window and `float64_floor` is on, that window is run in float64 (Float64Logits) and the graph
    passes that check if it is within FLOAT64_FLOOR × PyTorch float32's own distance from them."""
    import torch

    first = max(1, prefix_len)
    exact = Float64Logits(torch_model)
    f64: dict[str, dict] = {}  # float-exact targets that went past max_abs_logit: distances from float64
    acc = {n: {"max_abs_logit": 0.0, "agree": 0, "positions": 0, "nll": 0.0, "nll_torch": 0.0, "tokens": 0} for n in decoders}
    floor = {"agree": 0, "positions": 0, "nll": 0.0}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), ctx.progress("parity", len(ids)) as advance:
        for w in range(len(ids)):
            x = ids[w : w + 1]
            ref = torch_model(input_ids=x, use_cache=False).logits.float().numpy()
            x_np = x.numpy()
            ref_nll, n_tok = window_nll(ref, x_np, first)
            if noisy:
                emb = torch_model.get_input_embeddings()(x)
                emb = emb * (1 + NOISE * torch.randn(emb.shape, generator=gen))
                alt = torch_model(inputs_embeds=emb, use_cache=False).logits.float().numpy()
                floor["agree"] += int((alt.argmax(-1) == ref.argmax(-1)).sum())
                floor["positions"] += int(ref.shape[1])
                floor["nll"] += window_nll(alt, x_np, first)[0]
            for name, dec in decoders.items():
                out = dec.logits(x_np)
                a = acc[name]
                diff = float(np.abs(out - ref).max())
                a["max_abs_logit"] = max(a["max_abs_logit"], diff)
                if float_exact[name] and limits[name].float64_floor and diff > limits[name].max_abs_logit:
                    e = exact(w, x)
                    d = f64.setdefault(name, {"windows": [], "graph_max_abs": 0.0, "torch_float32_max_abs": 0.0})
                    d["windows"].append(w)
                    d["graph_max_abs"] = max(d["graph_max_abs"], float(np.abs(out.astype(np.float64) - e).max()))
                    d["torch_float32_max_abs"] = max(d["torch_float32_max_abs"], float(np.abs(ref.astype(np.float64) - e).max()))
                a["agree"] += int((out.argmax(-1) == ref.argmax(-1)).sum())
                a["positions"] += int(ref.shape[1])
                nll, _ = window_nll(out, x_np, first)
                a["nll"] += nll
                a["nll_torch"] += ref_nll
                a["tokens"] += n_tok
            advance(1)
    del exact
    result = {}
    for name, a in acc.items():
        cfg = limits[name]
        ppl, ppl_t = math.exp(a["nll"] / a["tokens"]), math.exp(a["nll_torch"] / a["tokens"])
        r = {"windows": len(ids), "positions": a["positions"], "max_abs_logit": a["max_abs_logit"],
             "top1_agreement": a["agree"] / a["positions"], "perplexity_onnx": ppl, "perplexity_torch": ppl_t,
             "perplexity_rel": ppl / ppl_t - 1}
        min_top1, max_rel = cfg.min_top1, cfg.max_ppl_rel
        if name in noisy:
            f_top1 = floor["agree"] / floor["positions"]
            f_rel = abs(math.exp(floor["nll"] / a["tokens"]) / ppl_t - 1)
            min_top1, max_rel = min(min_top1, f_top1 - 0.02), max(max_rel, 2 * f_rel)
            r["noise_floor"] = {"relative_input_noise": NOISE, "torch_top1_agreement": f_top1, "torch_perplexity_rel": f_rel,
                                "why": "per-token dynamic int8 activations: PyTorch's own agreement with itself "
                                       "under 1e-6 input noise"}
        failures = []
        if r["top1_agreement"] < min_top1:
            failures.append(f"top-1 agreement {r['top1_agreement']:.4f} < {min_top1:.4f}")
        if abs(r["perplexity_rel"]) > max_rel:
            failures.append(f"perplexity {ppl:.4f} vs PyTorch {ppl_t:.4f} ({100 * r['perplexity_rel']:+.3f}%, "
                            f"limit ±{100 * max_rel:.2f}%)")
        if float_exact[name]:
            r["max_abs_logit_limit"] = cfg.max_abs_logit
            if name in f64:
                d = f64[name]
                d |= {"limit": FLOAT64_FLOOR * d["torch_float32_max_abs"],
                      "why": f"max |Δ logit| over {cfg.max_abs_logit:g}: both float32 results measured against a "
                             "float64 run of the PyTorch model"}
                r["float64"] = d
                if d["graph_max_abs"] > d["limit"]:
                    failures.append(f"max |Δ logit| {r['max_abs_logit']:.2e} > {cfg.max_abs_logit:g}, and {d['graph_max_abs']:.2e} "
                                    f"from float64, over {FLOAT64_FLOOR:g} × PyTorch float32's {d['torch_float32_max_abs']:.2e}")
            elif r["max_abs_logit"] > cfg.max_abs_logit:
                failures.append(f"max |Δ logit| {r['max_abs_logit']:.2e} > {cfg.max_abs_logit:g}")
        r["limits"] = {"min_top1": min_top1, "max_ppl_rel": max_rel}
        r["passed"] = not failures
        r["failures"] = failures
        result[name] = r
    return result


def compile_all(cfg: CompileConfig, model_dir: Path, store, root: Path, parity_ids, prefix_len: int,
                sparse: dict[str, str], ctx, trust_remote_code: bool = False) -> dict:
    """Build every target under root/onnx/<folder>, then check the runnable ones. Returns the
    manifest's `compile` section; raises CompileError when a runnable target fails parity."""
    from kiln.compile.runtime import EXACT_QDQ, OnnxDecoder, generate
    from kiln.model import load_full

    section: dict = {"cpu": cpu_features(), "targets": {}}
    decoders, float_exact = {}, {}
    for t in cfg.targets:
        with ctx.meter(f"compile[{t.folder}]") as m:
            out = root / "onnx" / t.folder
            info = build_target(t, model_dir, store, out, trust_remote_code)
            info["files"] = sorted(str(p.relative_to(root)) for p in out.iterdir())
            if sparse:
                info["sparse_modules"] = "exported dense: no target runtime here has sparse kernels"
            problem = runtime_problem(t)
            if problem:
                # the graph's numerics are still checked, on the CPU provider (what the target's own
                # kernels do is not: that needs its runtime)
                info["runtime_checks"] = f"skipped: {problem}"
                info["parity_provider"] = "CPUExecutionProvider (stand-in: numerics of this graph, not the target's kernels)"
                decoders[t.folder] = OnnxDecoder(out / "model.onnx", "CPUExecutionProvider", config=EXACT_QDQ)
            else:
                info["op_histogram_optimized"] = optimized_histogram(out / "model.onnx", t.provider)
                decoders[t.folder] = OnnxDecoder(out / "model.onnx", t.provider, config=EXACT_QDQ)
                info["runtime_checks"] = "ran"
                info["parity_provider"] = t.provider
            float_exact[t.folder] = t.dtype == "float32" and set(info["linears"]) <= {"float"}
        info["build_s"] = round(m.wall_s, 3)
        section["targets"][t.folder] = info
        ctx.log(f"compile[{t.folder}]: {sum(info['op_histogram'].values())} nodes, {info['linears']} linears, "
                f"runtime checks {info['runtime_checks']}")
    if not decoders:
        return section
    with ctx.meter("compile-parity"):
        torch_model = load_full(model_dir, store, trust_remote_code)
        ids = parity_ids[: cfg.parity.windows]
        limits = {t.folder: t.parity or cfg.parity for t in cfg.targets}
        noisy = {n for n, t in section["targets"].items() if n in decoders and "int8" in t["linears"]}
        parity = check_parity(torch_model, decoders, ids, prefix_len, limits, float_exact, ctx, noisy)
        del torch_model
    bad = []
    cpu_targets = {t.folder for t in cfg.targets if t.target == "cpu"}
    for name, r in parity.items():
        section["targets"][name]["parity"] = r
        dec = decoders[name]
        prompt = ids[:1, : min(32, ids.shape[1])].numpy()
        gen = generate(dec, prompt, cfg.parity.generate_tokens)
        section["targets"][name]["generation"] = {"prompt_tokens": int(prompt.shape[1]), "tokens": gen.tokens[0].tolist(),
                                                  "prefill_s": round(gen.prefill_s, 4),
                                                  "decode_ms_per_token": round(1000 * float(np.mean(gen.step_s)), 3) if gen.step_s else None}
        genai = _genai_check(root / "onnx" / name, prompt[0].tolist(), gen.tokens[0].tolist()) if name in cpu_targets else None
        if genai is not None:
            section["targets"][name]["onnxruntime_genai"] = genai
            if genai.get("tokens_match") is False:
                bad.append(f"{name}: onnxruntime-genai generated {genai['tokens']} from genai_config.json, "
                           f"kiln's decode loop {gen.tokens[0].tolist()}")
        if not r["passed"]:
            bad.append(f"{name}: " + "; ".join(r["failures"]))
    if bad:
        raise CompileError("the compiled graph disagrees with kiln's PyTorch model:\n  " + "\n  ".join(bad),
                           hint="no artifact was written; report the model and recipe (this is a kiln bug, "
                                "or loosen compile.parity only if the difference is understood)")
    return section


def _genai_check(folder: Path, prompt: list[int], ours: list[int]) -> dict | None:
    """Greedy tokens from onnxruntime-genai reading the artifact's genai_config.json, when it is installed."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return {"skipped": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
    from kiln.compile.genai import genai_generate

    tokens = genai_generate(folder, prompt, len(ours))
    return {"tokens": tokens, "tokens_match": tokens == ours}
