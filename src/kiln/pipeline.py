"""recipe → plan → compress (layer-wise, cached per stage) → evaluate → artifact.

Every stage's result lives under the run folder, keyed by a digest of everything that determines
it; rerunning a finished recipe does no work, and a run killed halfway resumes at the first stage
whose result is missing. Stage results and the artifact are written to temporary folders and renamed
into place.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kiln import __version__
from kiln.context import RunContext
from kiln.errors import InputError, RecipeError
from kiln.recipe import ModelConfig, OutputFormat, Recipe
from kiln.source import ResolvedModel, resolve_model


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StagePlan:
    index: int
    config: object  # a CompressConfig
    targets: list[str]
    key: str = ""

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.config.kind}-{self.key[:12]}"


@dataclass
class Plan:
    recipe: Recipe
    model: ResolvedModel
    layers_path: str
    num_layers: int
    linears: dict[str, dict]  # every linear inside decoder layers, and the head → {in_features, out_features, transposed}
    stages: list[StagePlan] = field(default_factory=list)
    quantized: dict[str, dict] = field(default_factory=dict)  # module → {bits, group_size, symmetric, transposed, stage}
    max_positions: int | None = None
    tied: dict[str, str] = field(default_factory=dict)  # tied parameter name → its canonical (first) name
    sparse: dict[str, int] = field(default_factory=dict)  # pruned module → index of the stage that pruned it
    head: str | None = None  # the output projection's module name (a target only when a recipe names it)
    untied_head: bool = False  # a stage rewrites the head: it is stored apart from the input embedding


def _resolve_targets(stage, linears: list[str], where: str, head: str | None = None) -> list[str]:
    """Globs match the linears inside decoder layers; the output projection (`head`) only when a
    pattern is exactly its name, so `targets: ['*']` never quantizes it by accident."""
    chosen = []
    for pattern in stage.targets:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern) and (n != head or pattern == head)]
        if not hits:
            raise RecipeError(f"{where}.targets: pattern {pattern!r} matches no linear layer",
                              hint=f"names look like {linears[0]!r}; use shell-style globs such as '*.mlp.*'"
                              + (f"; the output projection is matched only by its exact name {head!r}" if head else ""))
        chosen += [h for h in hits if h not in chosen]
    for pattern in stage.ignore:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
            raise RecipeError(f"{where}.ignore: pattern {pattern!r} matches no linear layer, so it ignores nothing",
                              hint=f"names look like {linears[0]!r}; use shell-style globs such as 'model.layers.0.*'")
        chosen = [n for n in chosen if not fnmatch.fnmatchcase(n, pattern)]
    if not chosen:
        raise RecipeError(f"{where}: targets minus ignore leaves no layer to compress")
    return sorted(chosen, key=lambda n: (n.split(".")[:-2], n))


def _check_composition(where: str, module: str, stage, earlier: list[tuple[int, object]]) -> None:
    """A stage must not destroy what an earlier stage built on the same layer: a quantization grid
    (anything that rewrites or rescales the weights after it, except training that keeps the codes)
    or a sparsity mask (pruning again)."""
    for k, prev in earlier:
        if prev.quantizes and stage.role != "training":
            raise RecipeError(f"{where} ({stage.kind}) would move {module} off the grid compress[{k}] ({prev.kind}) "
                              "quantized it to", hint="quantize last (distill may follow), or use ignore: to split layers")
        if prev.sparsifies and stage.sparsifies:
            raise RecipeError(f"{where} ({stage.kind}): {module} was already pruned by compress[{k}]",
                              hint="prune each layer once")
        if prev.sparsifies and _rotates(stage):
            raise RecipeError(f"{where} ({stage.kind}): rotation: hadamard would quantize {module} as W·R, which "
                              f"has none of the zeros compress[{k}] ({prev.kind}) pruned into W",
                              hint="list the pruned layers under this stage's ignore:, or drop activations.rotation")
        if _rotates(prev) and stage.role == "training":
            raise RecipeError(f"{where} ({stage.kind}) cannot train {module}: compress[{k}] stored it rotated "
                              "(activations.rotation: hadamard), which distillation does not model",
                              hint="distill before the rotated W8A8 stage, or drop its rotation")
    smoothing = [(k, p) for k, p in earlier if p.role == "smoothing"]
    if smoothing and stage.quantizes:
        k, prev = smoothing[-1]
        searched = getattr(prev, "scheme", None)
        if searched is not None and searched != stage.quant_scheme:
            raise RecipeError(f"{where}: {module} is quantized with {stage.quant_scheme.label()} but compress[{k}] "
                              f"({prev.kind}) searched its scales for {searched.label()}",
                              hint="use the same scheme in both stages")


def _rotates(stage) -> bool:
    act = stage.act_scheme
    return act is not None and act.rotated


def _check_head(where: str, stage, head: str) -> None:
    """What a stage cannot do to the output projection."""
    if stage.role == "smoothing":
        raise RecipeError(f"{where} ({stage.kind}) cannot target {head}: smoothing folds scales into the op before "
                          "a linear, which kiln does inside decoder layers only",
                          hint=f"drop {head} from this stage's targets; quantize it in its own rtn or gptq stage")
    if stage.act_scheme is not None:
        raise RecipeError(f"{where} ({stage.kind}): int8 activations are not supported for the output projection {head}",
                          hint=f"quantize {head} weight-only in a stage of its own (targets: [{head}], no activations)")


def _shape_problems(stage, targets: list[str], linears: dict[str, dict]) -> list[str]:
    out = []
    nm = getattr(stage, "nm", None)
    if nm is not None:
        m = nm[1]
        out += [f"{t}: {stage.pattern} sparsity needs in_features divisible by {m} (it has {linears[t]['in_features']}); "
                f"ignore this layer or use unstructured sparsity" for t in targets if linears[t]["in_features"] % m]
    act = stage.act_scheme
    s = stage.quant_scheme
    if act is not None and (s.bits != 8 or s.group_size is not None or not s.symmetric):
        out.append(f"activations: int8 activations need int8 symmetric per-channel weights "
                   f"(scheme: {{bits: 8, group_size: null, symmetric: true}}), got {s.label()}")
    if _rotates(stage):
        from kiln.compress.rotation import MIN_BLOCK, hadamard_block

        out += [f"{t}: activations.rotation: hadamard rotates blocks of the largest power of two dividing "
                f"in_features, {hadamard_block(linears[t]['in_features'])} for its {linears[t]['in_features']} "
                f"(at least {MIN_BLOCK} needed); ignore this layer in the stage or drop the rotation"
                for t in targets if hadamard_block(linears[t]["in_features"]) < MIN_BLOCK]
    return out


def _plan_error(problems: list[str], context: str | None = None) -> RecipeError:
    """The first problem is the headline (it names the layer); `context` says which part of the recipe
    cannot have it."""
    rest = problems[1:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
    return RecipeError("\n  ".join([problems[0] + (f" ({context})" if context else ""), *rest]))


def _check_teacher(where: str, teacher: str, vocab_size: int | None, trust_remote_code: bool) -> None:
    """A teacher given as a local path is resolved as the model is (a GGUF converted, weight headers
    read, config.json parsed), before any stage runs; a hub id is only reachable when it downloads."""
    from kiln.model import config_json, load_config
    from kiln.source import looks_like_path

    if teacher == "original" or not looks_like_path(teacher):
        return
    what = f"{where}.teacher"
    try:
        path = resolve_model(ModelConfig(source=teacher, trust_remote_code=trust_remote_code)).path
        load_config(path, trust_remote_code)
    except InputError as exc:
        raise InputError(f"{what}: {exc.message}",
                         hint=exc.hint or "give `original`, a Hugging Face checkpoint folder or a .gguf file") from None
    theirs = config_json(path).get("vocab_size")
    if theirs and vocab_size and theirs != vocab_size:
        raise RecipeError(f"{what}: {teacher} has vocabulary {theirs}, the model {vocab_size}",
                          hint="distill from a teacher with the same tokenizer, e.g. `teacher: original`")


def _check_distill_sizes(where: str, stage, recipe: Recipe, max_positions: int | None) -> None:
    """Distill trains on calibration windows: a longer seq_len or a larger batch than they hold would
    be cut or repeated, so it is refused rather than clamped."""
    cal = recipe.data.calibration
    if stage.seq_len is not None and max_positions and stage.seq_len > max_positions:
        raise RecipeError(f"{where}.seq_len: {stage.seq_len} tokens exceeds the model's {max_positions} positions")
    if stage.seq_len is not None and stage.seq_len > cal.seq_len:
        raise RecipeError(f"{where}.seq_len: {stage.seq_len} is longer than the calibration windows it trains on "
                          f"(data.calibration.seq_len: {cal.seq_len})",
                          hint=f"lower {where}.seq_len, or raise data.calibration.seq_len")
    samples, field = (stage.samples, f"{where}.samples") if stage.samples else (cal.samples, "data.calibration.samples")
    if stage.batch_size > samples:
        raise RecipeError(f"{where}.batch_size: {stage.batch_size} is more than the {samples} training windows "
                          f"({field}); a batch would repeat windows", hint=f"lower {where}.batch_size, or raise {field}")


def _compile_lengths(recipe: Recipe) -> list[tuple[str, int]]:
    """Every sequence the compile checks run through a graph: the parity windows (the first
    evaluation set), the greedy generation after them, and the latency prompt plus new tokens."""
    first = recipe.data.evaluation[0].seq_len
    out = [("data.evaluation[0].seq_len (the parity windows)", first),
           ("compile.parity: a prompt of min(32, data.evaluation[0].seq_len) + generate_tokens",
            min(32, first) + recipe.compile.parity.generate_tokens)]
    lat = recipe.evaluate.latency if recipe.evaluate is not None else None
    if lat is not None:
        out.append(("evaluate.latency.prompt_tokens + new_tokens", lat.prompt_tokens + lat.new_tokens))
    return out


def _check_gate_targets(recipe: Recipe) -> None:
    """A speed gate on a target that cannot run here would only fail after the whole run."""
    from kiln.compile.targets import runtime_problem

    targets = {t.folder: t for t in recipe.compile.targets} if recipe.compile else {}
    for name in recipe.gates.min_decode_tokens_per_s if recipe.gates else {}:
        if (problem := runtime_problem(targets[name])) is not None:
            raise RecipeError(f"gates.min_decode_tokens_per_s.{name}: compile target {name!r} cannot run on this "
                              f"machine, so its decode speed cannot be measured: {problem}",
                              hint="run where that runtime is available, or drop this gate (the target is still "
                                   "built, and its graph checked on the CPU provider)")


def make_plan(recipe: Recipe, model: ResolvedModel) -> Plan:
    """Everything that can be checked without touching weights: targets resolved to module names,
    every grid checked against the output format, sequence lengths against the model."""
    from kiln.arch import decoder_layout, in_out_features, is_linear, is_transposed, module_name
    from kiln.data import check_source
    from kiln.model import build_skeleton, check_checkpoint, tied_aliases

    if recipe.data.calibration is not None:
        check_source(recipe.data.calibration.source, "data.calibration.source")
    for i, e in enumerate(recipe.data.evaluation):
        check_source(e.source, f"data.evaluation[{i}].source")
    _check_gate_targets(recipe)
    skeleton = build_skeleton(model.path, recipe.model.trust_remote_code)
    check_checkpoint(skeleton, model.path)
    layout = decoder_layout(skeleton)
    head = module_name(skeleton, skeleton.get_output_embeddings())
    linears = {}
    for name, mod in skeleton.named_modules():
        if (name.startswith(layout.layers_path + ".") or name == head) and is_linear(mod):
            i, o = in_out_features(mod)
            linears[name] = {"in_features": i, "out_features": o, "transposed": is_transposed(mod)}
    head = head if head in linears else None
    aliases = tied_aliases(skeleton)
    plan = Plan(recipe, model, layout.layers_path, layout.num_layers, linears,
                max_positions=getattr(skeleton.config, "max_position_embeddings", None) or getattr(skeleton.config, "n_positions", None),
                tied={n: names[0] for n, names in aliases.items() if n != names[0]}, head=head)
    skeleton_config = skeleton.config
    del skeleton

    from kiln.artifact.formats import format_problems

    problems: list[str] = []
    shapes: list[str] = []
    history: dict[str, list[tuple[int, object]]] = {}  # module → [(stage index, config)] in order
    for k, stage in enumerate(recipe.compress):
        where = f"compress[{k}]"
        targets = _resolve_targets(stage, list(linears), where, head)
        if head in targets:
            _check_head(where, stage, head)
            plan.untied_head = plan.untied_head or stage.role == "weights"
        plan.stages.append(StagePlan(k, stage, targets))
        for t in targets:
            _check_composition(where, t, stage, history.get(t, []))
            history.setdefault(t, []).append((k, stage))
        if stage.role == "training":
            _check_teacher(where, stage.teacher, getattr(skeleton_config, "vocab_size", None), recipe.model.trust_remote_code)
            _check_distill_sizes(where, stage, recipe, plan.max_positions)
        if stage.sparsifies:
            plan.sparse.update({t: k for t in targets})
        if stage.quantizes:
            s = stage.quant_scheme
            act = stage.act_scheme
            for t in targets:
                info = linears[t]
                plan.quantized[t] = {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric,
                                     "transposed": info["transposed"], "stage": k,
                                     "activation_bits": act.bits if act is not None else None}
                if _rotates(stage):
                    plan.quantized[t]["rotation"] = act.rotation
                problems += [f"{where}: {p}" for p in format_problems(recipe.output.format, t, info["in_features"],
                                                                        s.group_size, info["transposed"])]
        shapes += [f"{where}: {p}" for p in _shape_problems(stage, targets, linears)]
    for t, hist in history.items():
        k, last = hist[-1]
        if last.role == "smoothing":
            raise RecipeError(f"compress[{k}] ({last.kind}) is the last stage touching {t}: it only rescales",
                              hint="add an rtn or gptq stage after it for the same layers")
    if plan.untied_head:  # the head is written under its own name, the embedding stays as it was
        weight = head + ".weight"
        plan.tied = {n: c for n, c in plan.tied.items() if weight not in (n, c) and weight not in aliases.get(n, [])}
    if shapes:
        raise _plan_error(shapes)
    if problems:
        raise _plan_error(problems, f"output.format {recipe.output.format.value!r} cannot store this plan")

    if recipe.compile is not None:
        problems += _compile_problems(recipe, plan, skeleton_config)
    if problems:
        raise _plan_error(problems, "compile cannot export this plan")

    lengths = [("data.calibration.seq_len", recipe.data.calibration.seq_len)] if recipe.data.calibration else []
    lengths += [(f"data.evaluation[{i}].seq_len", e.seq_len) for i, e in enumerate(recipe.data.evaluation)]
    lat = recipe.evaluate.latency if recipe.evaluate is not None else None
    if lat is not None:
        lengths.append(("evaluate.latency.prompt_tokens + new_tokens", lat.prompt_tokens + lat.new_tokens))
    if recipe.compile is not None:
        need = _compile_lengths(recipe)
        for i, t in enumerate(recipe.compile.targets):
            for what, n in need:
                if t.max_length and n > t.max_length:
                    raise RecipeError(f"compile.targets[{i}].max_length: {t.max_length} is shorter than {what} = {n}, "
                                      f"which the checks of target {t.folder!r} run through its graph",
                                      hint=f"raise compile.targets[{i}].max_length to at least {n}")
    for where, n in lengths:
        if plan.max_positions and n > plan.max_positions:
            raise RecipeError(f"{where}: {n} tokens exceeds the model's {plan.max_positions} positions")
    return plan


def _compile_problems(recipe: Recipe, plan: Plan, config) -> list[str]:
    """What the ONNX export cannot represent, found before any weight is touched: the family, and
    every quantized layer's grid against MatMulNBits (2/4/8 bits, blocks of a power of two ≥ 16)."""
    from kiln.compile.decoder import spec_from_config
    from kiln.compile.weights import nbits_problem

    spec_from_config(config, has_lm_head=True)  # raises naming the model type when there is no layout
    out = []
    if any(t.target == "tensorrt" for t in recipe.compile.targets):
        from kiln.compile.qdq import qdq_problem

        out += [f"tensorrt: {p}" for m, q in plan.quantized.items()
                if (p := qdq_problem(m, q["bits"], q["group_size"], q["symmetric"], q.get("activation_bits")))]
    for m, q in plan.quantized.items():
        if q.get("activation_bits"):
            continue  # W8A8 → MatMulInteger: any per-channel int8 grid
        if q["bits"] not in (2, 4, 8):
            out.append(f"{m}: {q['bits']}-bit weights; MatMulNBits stores 2, 4 or 8 bits (use bits 4 or 8, or drop compile)")
        elif (p := nbits_problem(m, q["group_size"], plan.linears[m]["in_features"])) is not None:
            out.append(p)
    if plan.head in plan.quantized:
        k = plan.quantized[plan.head]["stage"]
        out += [f"{t.folder}: lm_head_bits would quantize {plan.head} again at export, but compress[{k}] already "
                f"quantized it; drop lm_head_bits (the graph carries compress[{k}]'s codes)"
                for t in recipe.compile.targets if getattr(t, "lm_head_bits", None)]
    return out


def plan_recipe(recipe: Recipe) -> Plan:
    return make_plan(recipe, resolve_model(recipe.model))


# --- running -------------------------------------------------------------------------------------


RUN_SUBFOLDERS = ("stages", "evals", "reference", "artifact")


def _check_out_dir(out_dir: Path) -> None:
    """The run folder must be a folder kiln can write, outside any artifact, known before any model
    loads. Checked by doing it: the folders made for the check are removed again, so a recipe error
    after it leaves nothing behind."""
    hint = "pass --out a folder path that you can write to (it is created if missing)"
    missing = []
    try:
        for p in (out_dir, *out_dir.parents):
            if p.exists():
                if not p.is_dir():
                    raise InputError(f"run folder {out_dir}: {p} is a file, not a folder", hint=hint)
                break
            missing.append(p)
        for p in (out_dir.resolve(), *out_dir.resolve().parents):
            if _is_artifact(p):
                raise InputError(f"run folder {out_dir}: it is inside the artifact {p}, which kiln would no longer verify",
                                 hint="choose a run folder outside every artifact")
        for sub in RUN_SUBFOLDERS:
            if (out_dir / sub).exists() and not (out_dir / sub).is_dir():
                raise InputError(f"run folder {out_dir}: {out_dir / sub} is a file; kiln keeps a folder of that name there",
                                 hint="move that file, or choose another --out")
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        raise InputError(f"run folder {out_dir}: cannot write there: {exc.strerror or exc}", hint=hint) from None
    finally:
        for p in missing:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()


def _is_artifact(folder: Path) -> bool:
    try:
        return "kiln_version" in json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _check_out_outside_model(out_dir: Path, model: ResolvedModel) -> None:
    """A run folder inside the model's own folder changes the folder's digest with every run (so
    nothing is ever reused) and mixes run files into the checkpoint."""
    if model.path.resolve() in (out_dir.resolve(), *out_dir.resolve().parents):
        raise InputError(f"run folder {out_dir}: it is inside the model folder {model.path}",
                         hint="choose a run folder outside the checkpoint")


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"model {model_dir}: transformers cannot load its tokenizer: {str(exc).splitlines()[0]}",
                         hint="the folder needs the tokenizer files saved with the model (tokenizer.json, "
                              "tokenizer_config.json, ...): save_pretrained the tokenizer there too") from None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


RESULT_KEYS = ("index", "kind", "config", "modules", "module_stats", "files", "digests", "wall_s", "peak_rss_bytes")


def _cached_result(result_file: Path, ctx: RunContext, label: str) -> dict | None:
    """A finished stage's result, if its folder is intact: result.json readable, and every file it
    lists there with the digest recorded when the stage finished. Anything else (a file truncated,
    changed or deleted since, a result.json edited or written by a kiln that recorded no digests)
    means the stage runs again, said in one line."""
    try:
        result = json.loads(result_file.read_text())
        missing = [k for k in RESULT_KEYS if k not in result]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        files, digests = result["files"], result["digests"]
        if not (isinstance(files, list) and isinstance(digests, dict) and set(files) == set(digests)):
            raise ValueError("its file list and digests do not match")
        damaged = [f for f, digest in digests.items()
                   if not (result_file.parent / f).is_file() or _file_sha256(result_file.parent / f) != digest]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        damaged = [f"{result_file.name}: {type(exc).__name__} {exc}"]
    if damaged:
        ctx.log(f"[yellow]{label}: cached stage {result_file.parent.name} is damaged ({', '.join(damaged)}); running it again[/yellow]")
        return None
    return result


def _atomic_dir(target: Path, build) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_stage(plan: Plan, sp: StagePlan, store, calib, run_dir: Path, ctx: RunContext, label: str = "compress") -> dict:
    from kiln.compress.engine import run_layerwise

    stage_dir = run_dir / "stages" / sp.dirname
    result_file = stage_dir / "result.json"
    if result_file.exists() and (result := _cached_result(result_file, ctx, f"{label}[{sp.index}]")) is not None:
        result["cached"] = True
        return result

    def build(tmp: Path) -> None:
        with ctx.meter(f"{label}[{sp.index}]") as m:
            sparse = frozenset(t for t, k in plan.sparse.items() if k < sp.index)
            cal = plan.recipe.data.calibration  # None: no stage needs calibration text
            if sp.config.role == "training":  # distill needs calibration text: the plan checked it
                from kiln.compress.distill import run_distill

                out = run_distill(plan, store, sp.config, sp.targets, calib, tmp, ctx, sparse, compute_dtype=cal.compute_dtype)
            else:
                passes = {} if cal is None else {"batch_size": cal.batch_size, "low_memory": cal.low_memory,
                                                  "compute_dtype": cal.compute_dtype}
                out = run_layerwise(plan.model.path, store, sp.config, sp.targets, calib, tmp, ctx,
                                    trust_remote_code=plan.recipe.model.trust_remote_code, sparse=sparse, **passes)
        result = {"index": sp.index, "kind": sp.config.kind, "key": sp.key,
                  "config": sp.config.model_dump(mode="json"), "modules": sp.targets,
                  "module_stats": out.modules, "extra": out.extra, "files": [f.name for f in out.files],
                  "digests": {f.name: _file_sha256(f) for f in out.files}, **m.as_dict()}
        (tmp / "result.json").write_text(json.dumps(result, indent=2))

    ctx.log(f"[bold]{label}[{sp.index}][/bold] {sp.config.kind}: {len(sp.targets)} layers")
    _atomic_dir(stage_dir, build)
    result = json.loads(result_file.read_text())
    result["cached"] = False
    return result


def _calibration_key(calib_info: dict) -> list:
    """What of the calibration changes a stage's result beyond its tokens: the batch size (the order of
    float sums) and a compute dtype other than float32 (left out for float32, so earlier keys stand)."""
    key = [calib_info["token_digest"], calib_info["batch_size"]]
    return key + [calib_info["compute_dtype"]] if calib_info["compute_dtype"] != "float32" else key


def _tasks_key(ev) -> dict:
    return {"tasks": list(ev.tasks), "limit": ev.limit, "seed": ev.seed} if ev.tasks else {}


def run_tasks(scorer, tokenizer, ev, label: str, ctx: RunContext, max_len: int | None) -> dict:
    """Every task of `evaluate.tasks` through one scorer (PyTorch or ONNX); requests longer than
    `max_len` (the model's positions) keep their last max_len tokens, as lm-eval does."""
    from kiln.evaluate.tasks import _rows, evaluate_task, select

    out = {}
    for task in ev.tasks:
        idx = select(len(_rows(task)), ev.limit, ev.seed)
        with ctx.progress(f"{task} {label}", len(idx)) as advance:
            r = evaluate_task(task, scorer, tokenizer, indices=idx, progress=advance, max_len=min(max_len or 2048, 2048))
        out[task] = {k: v for k, v in r.items() if k != "loglikelihoods"}
    return out


def _evaluate(name: str, key: str, plan: Plan, store, eval_sets: dict, run_dir: Path, ctx: RunContext,
              tasks: bool = True) -> dict:
    """Perplexity on every evaluation set and, with `tasks`, the recipe's zero-shot tasks (the
    baseline and the compressed model; the RTN and per-stage references are perplexity only)."""
    from kiln.evaluate.perplexity import perplexity
    from kiln.model import load_full

    ev = plan.recipe.evaluate
    if not tasks:
        ev = ev.model_copy(update={"tasks": []})
    key = _key(key, _tasks_key(ev))
    cache = run_dir / "evals" / f"{name}-{key[:16]}.json"
    if cache.exists():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError) as exc:
            ctx.log(f"[yellow]evaluate[{name}]: cached result {cache} is unreadable ({exc}); measuring again[/yellow]")
    with ctx.meter(f"evaluate[{name}]") as m:
        model = load_full(plan.model.path, store, plan.recipe.model.trust_remote_code)
        ppl = {}
        if ev.perplexity:
            for set_name, win in eval_sets.items():
                ppl[set_name] = perplexity(model, win.ids, win.prefix_len, ctx, ev.batch_size, label=f"{name}/{set_name}")
        tasks = {}
        if ev.tasks:
            from transformers import AutoTokenizer

            from kiln.evaluate.tasks import TorchScorer

            tasks = run_tasks(TorchScorer(model), AutoTokenizer.from_pretrained(plan.model.path), ev, name, ctx,
                              plan.max_positions)
        del model
    result = {"perplexity": {k: v["perplexity"] for k, v in ppl.items()},
              **({"tasks": tasks} if tasks else {}),
              "details": ppl, **{f"eval_{k}": v for k, v in m.as_dict().items()}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, cache)
    return result


def _dense_size_bytes(store, dtype_bytes: int) -> int:
    """Bytes of the checkpoint without quantization, at the artifact's dtype: the fair baseline size."""
    from safetensors import safe_open

    total = 0
    for f in sorted(store.base.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * dtype_bytes
    return total


def run(recipe: Recipe, out_dir: Path, ctx: RunContext) -> dict:
    import torch

    from kiln import artifact
    from kiln.artifact.manifest import base_manifest, read_manifest
    from kiln.compress.rtn import RTNConfig
    from kiln.data import calibration_windows, evaluation_windows, load_documents
    from kiln.model import STORAGE, WeightStore

    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    target = out_dir / "artifact"
    artifact.prepare(target)
    with ctx.meter("plan") as plan_meter:
        model = resolve_model(recipe.model)
        _check_out_outside_model(out_dir, model)
        plan = make_plan(recipe, model)
    ctx.log(f"model {model.origin} → {model.path} ({model.kind}, {plan.num_layers} layers)")
    tokenizer = _tokenizer(model.path)

    calib, calib_info, calib_docs = None, None, None
    if recipe.data.calibration is not None:
        c = recipe.data.calibration
        calib_docs = load_documents(c.source, c.field, "data.calibration.source")
        win = calibration_windows(calib_docs, tokenizer, c.samples, c.seq_len, c.seed)
        calib = win.ids
        calib_info = {"source": c.source, "field": c.field, "source_digest": calib_docs.digest,
                      "documents_used": win.documents_used, "samples": c.samples, "seq_len": c.seq_len,
                      "seed": c.seed, "batch_size": c.batch_size, "low_memory": c.low_memory, "compute_dtype": c.compute_dtype,
                      "tokens": win.tokens, "token_digest": win.digest}
        if c.compute_dtype == "bfloat16":
            from kiln.compress.engine import native_bf16

            calib_info["native_bf16"] = native_bf16()
            if not calib_info["native_bf16"]:
                ctx.log("[yellow]warning[/yellow]: data.calibration.compute_dtype: bfloat16 on a CPU without AMX or "
                        "AVX512-BF16: its bfloat16 GEMMs are emulated and slower than float32; set it to float32 here")
    train = {}  # stage index → its own training windows (a distill stage's `samples`), cut before any stage runs
    for sp in plan.stages:
        if sp.config.role == "training" and sp.config.samples is not None:
            c = recipe.data.calibration
            train[sp.index] = calibration_windows(calib_docs, tokenizer, sp.config.samples, c.seq_len, c.seed,
                                                  field=f"compress[{sp.index}].samples")
    calib_seen = set() if calib_docs is None else set(win.doc_indices).union(*(t.doc_indices for t in train.values()))
    eval_sets, eval_info = {}, {}
    for i, e in enumerate(recipe.data.evaluation):
        docs = load_documents(e.source, e.field, f"data.evaluation[{i}].source")
        exclude = calib_seen if calib_docs is not None and docs.key == calib_docs.key else set()
        w = evaluation_windows(docs, tokenizer, e.windows, e.seq_len, exclude)
        eval_sets[e.name] = w
        eval_info[e.name] = {"source": e.source, "field": e.field, "source_digest": docs.digest,
                             "documents_used": w.documents_used, "windows": e.windows, "seq_len": e.seq_len,
                             "tokens": w.tokens, "token_digest": w.digest,
                             "disjoint_from_calibration": "same source: calibration documents excluded" if exclude else "different source"}

    out_dtype = getattr(torch, recipe.output.dtype.value)
    store = WeightStore(model.path)
    prev = _key(model.digest)
    stage_results = []
    stage_stores = []
    for sp in plan.stages:
        own = train.get(sp.index)
        sp.key = _key(prev, sp.config.model_dump(mode="json"), sp.targets,
                      _calibration_key(calib_info) if sp.config.needs_calibration else None,
                      *([own.digest] if own is not None else []))
        prev = sp.key
        res = _run_stage(plan, sp, store, calib if own is None else own.ids, out_dir, ctx)
        stage_results.append(res)
        store = store.with_overlays([out_dir / "stages" / sp.dirname / f for f in res["files"]])
        stage_stores.append((sp, store))

    metrics: dict = {}
    eval_digests = {k: v["token_digest"] for k, v in eval_info.items()}
    stored = (recipe.output.dtype.value, STORAGE)  # what the rounded stores read: evaluations of them key on it
    if recipe.evaluate is not None and (recipe.evaluate.perplexity or recipe.evaluate.tasks):
        metrics["baseline"] = _evaluate("baseline", _key(model.digest, eval_digests), plan, WeightStore(model.path),
                                        eval_sets, out_dir, ctx)
        if recipe.evaluate.after_each_stage:
            for sp, st in stage_stores[:-1]:
                r = _evaluate(f"after-{sp.dirname}", _key(sp.key, eval_digests, stored), plan,
                              st.rounded(out_dtype), eval_sets, out_dir, ctx, tasks=False)
                metrics[f"after_stage_{sp.index}"] = r
        final_key = _key(prev, eval_digests, stored)
        metrics["compressed"] = _evaluate("compressed", final_key, plan, store.rounded(out_dtype), eval_sets, out_dir, ctx)
        if recipe.evaluate.reference_rtn and plan.quantized:
            # RTN with each quantizing stage's scheme on the same layers, from the source weights
            ref_store = WeightStore(model.path)
            ref_prev = _key(model.digest, "rtn-reference")
            for sp in plan.stages:
                if not sp.config.quantizes:
                    continue
                ref = StagePlan(sp.index, RTNConfig(scheme=sp.config.quant_scheme, activations=sp.config.act_scheme,
                                                    targets=sp.targets), sp.targets)
                ref.key = ref_prev = _key(ref_prev, ref.config.model_dump(mode="json"))
                res = _run_stage(plan, ref, ref_store, None, out_dir / "reference", ctx, label="rtn-reference")
                ref_store = ref_store.with_overlays([out_dir / "reference" / "stages" / ref.dirname / f for f in res["files"]])
            metrics["rtn"] = _evaluate("rtn", _key(ref_prev, eval_digests, stored), plan,
                                       ref_store.rounded(out_dtype), eval_sets, out_dir, ctx, tasks=False)
        for variant in metrics:
            if variant != "baseline" and metrics[variant]["perplexity"]:
                metrics[variant]["perplexity_ratio"] = {
                    k: v / metrics["baseline"]["perplexity"][k] for k, v in metrics[variant]["perplexity"].items()}

    # --- artifact --------------------------------------------------------------------------------
    run_key = _key(prev, recipe.digest(), eval_digests, recipe.output.model_dump(mode="json"), STORAGE)
    if (manifest := artifact.reusable(target, run_key, ctx.log)) is not None:
        ctx.log(f"artifact up to date: {target}")
        _raise_if_rejected(manifest, target)
    else:
        with ctx.meter("artifact") as art_meter:
            tmp = artifact.staging_dir(target)
            try:
                artifact.build_checkpoint(tmp, model.path, store, plan.quantized, recipe.output.format, out_dtype, plan.tied,
                                          {t: plan.stages[k].config.pattern if plan.stages[k].config.nm else "unstructured"
                                           for t, k in plan.sparse.items()}, plan.head, plan.untied_head)
                (tmp / "recipe.yaml").write_text(_recipe_yaml(recipe))
                manifest = base_manifest()
                manifest.update({
                    "status": "accepted",
                    "run_key": run_key,
                    "recipe_name": recipe.name,
                    "recipe_digest": recipe.digest(),
                    "format": recipe.output.format.value,
                    "dtype": recipe.output.dtype.value,
                    "source": {"origin": model.origin, "kind": model.kind, "sha256": model.digest},
                    "data": {"calibration": calib_info, "evaluation": eval_info},
                    "perplexity_protocol": "non-overlapping windows of seq_len tokens (tokenizer prefix + text), "
                                           "no context across windows, prefix not scored; compressed = the artifact's "
                                           f"weights as stored ({recipe.output.dtype.value} scales and dense weights)",
                    "stages": [_stage_summary(r) for r in stage_results],
                    "quantized_modules": plan.quantized,
                    "metrics": _public_metrics(metrics),
                    "timings": {m.name: m.as_dict() for m in ctx.meters},
                })
                if recipe.compile is not None:
                    from kiln.compile import compile_all

                    first = next(iter(eval_sets.values()))
                    sparse = {t: "dense" for t in plan.sparse}
                    manifest["compile"] = compile_all(recipe.compile, model.path, store.rounded(out_dtype), tmp, first.ids,
                                                      first.prefix_len, sparse, ctx, recipe.model.trust_remote_code)
                    manifest["metrics"].update(_target_metrics(recipe, manifest["compile"], tmp, first.ids, tokenizer, ctx))
                size = _dense_size_bytes(WeightStore(model.path), torch.finfo(out_dtype).bits // 8)
                manifest["metrics"].setdefault("baseline", {})["size_bytes"] = size
                manifest["metrics"].setdefault("compressed", {})["size_bytes"] = sum(
                    f.stat().st_size for f in tmp.glob("*.safetensors"))
                from kiln.artifact.report import write_reports
                from kiln.artifact.serving import write_serving

                manifest["serving"] = write_serving(tmp, manifest, plan.max_positions)
                from kiln.evaluate.gates import check_gates

                manifest["gates"] = check_gates(recipe.gates, manifest["metrics"])
                manifest["status"] = "rejected" if any(not g["passed"] for g in manifest["gates"]) else "accepted"
                manifest["timings"] = {m.name: m.as_dict() for m in ctx.meters}
                write_reports(tmp, manifest)
                artifact.commit(tmp, target, manifest)
                manifest = read_manifest(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        manifest["timings"]["artifact"] = art_meter.as_dict()
        _raise_if_rejected(manifest, target)
    public = manifest["metrics"]
    return {"artifact": str(target), "metrics": public, "stages": [_stage_summary(r) for r in stage_results],
            "timings": manifest.get("timings", {}), "plan_s": round(plan_meter.wall_s, 3)}


def _raise_if_rejected(manifest: dict, target: Path) -> None:
    from kiln.errors import GateError

    failed = [g for g in manifest.get("gates", []) if not g["passed"]]
    if manifest.get("status") == "rejected":
        lines = [f"{g['gate']} {g['subject']}: {g['value'] if g['value'] is None else round(g['value'], 4)} vs limit {g['limit']}"
                 for g in failed]
        raise GateError("the artifact failed its gates and is marked rejected:\n  " + "\n  ".join(lines),
                        hint=f"{target}/report.md has the figures; it will not be published")


def _target_metrics(recipe: Recipe, section: dict, root: Path, eval_ids, tokenizer, ctx: RunContext) -> dict:
    """Tasks and serving latency of every compiled target that ran on its own runtime here."""
    ev = recipe.evaluate
    out = {}
    for name, t in section["targets"].items():
        if t["runtime_checks"] != "ran" or ev is None or not (ev.tasks or ev.latency):
            continue
        folder = root / "onnx" / name
        m: dict = {"perplexity": {}, "size_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file())}
        if ev.tasks:
            from kiln.compile.runtime import OnnxDecoder
            from kiln.evaluate.tasks import OnnxScorer

            with ctx.meter(f"evaluate[onnx:{name}]"):
                m["tasks"] = run_tasks(OnnxScorer(OnnxDecoder(folder / "model.onnx", t["provider"])), tokenizer, ev,
                                       f"onnx:{name}", ctx, t["context_length"])
        if ev.latency:
            from kiln.compile.latency import measure_in_child

            lat = ev.latency
            ids = eval_ids.reshape(-1)[: lat.prompt_tokens].numpy()[None]
            with ctx.meter(f"latency[onnx:{name}]"):
                m["latency"] = measure_in_child(folder, ids, t["provider"], lat.new_tokens, lat.batch, lat.usd_per_hour)
        out[f"onnx:{name}"] = m
    return out


def _stage_summary(r: dict) -> dict:
    return {k: r[k] for k in ("index", "kind", "config", "modules", "module_stats", "wall_s", "peak_rss_bytes")} | {
        "cached": r.get("cached", False), **({"result": r["extra"]} if r.get("extra") else {})}


def _public_metrics(metrics: dict) -> dict:
    return {variant: {k: v for k, v in m.items() if k != "details"} | {"details": m.get("details", {})}
            for variant, m in metrics.items()}


def _recipe_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
