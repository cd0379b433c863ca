"""The recipe: one YAML file, validated into frozen typed models before anything runs.

Sections: `model`, `data` (calibration and evaluation), `compress` (ordered stages), `evaluate`,
`compile` (ONNX targets), `output`. Errors carry the YAML path *and* the line so the user can jump to it.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from kiln.compile.targets import CompileConfig
from kiln.compress import CompressConfig
from kiln.data import TEXT_SUFFIXES
from kiln.errors import InputError, RecipeError


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Frozen):
    """Where the model comes from. `source` is a local HF folder, a `.gguf` file, `pkg:module/path`
    (a file shipped inside an installed Python package), a hub id, or a list of paths that are the
    consecutive parts of one GGUF file split across packages."""

    source: str | list[str]
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` when it is a folder")
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("source")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) < 2:
            raise ValueError("a list of GGUF parts needs at least two entries; use a plain string for one file")
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty")
        return v


class _TextSource(Frozen):
    @field_validator("field", check_fields=False)
    @classmethod
    def _field_needs_table(cls, v: str, info: ValidationInfo) -> str:
        source = info.data.get("source")  # a set `field` only: defaults are not validated
        if v != "text" and source and Path(source).suffix.lower() in TEXT_SUFFIXES:
            raise ValueError(f"does not apply to a plain-text source ({source}), whose documents are the text between "
                             "blank lines; `field` picks a column of .jsonl/.json/.parquet/.arrow sources (or of such "
                             "files in a folder): remove it")
        return v


class CalibrationConfig(_TextSource):
    """N samples × L tokens drawn (seeded) from `source`."""

    source: str
    field: str = Field("text", description="text column for JSONL/Parquet/Arrow sources")
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0
    batch_size: int = Field(4, ge=1, description="samples per forward pass in the layer loop: a pass holds one "
                            "batch's activations and temporaries at once (on CPU, 4 was both leaner and faster than 8)")
    low_memory: bool = Field(False, description="keep the calibration activations and the inputs saved between "
                             "passes in files in the stage folder, paged in one batch at a time (Linux; elsewhere the "
                             "last pass recomputes each layer's MLP instead of keeping its last linear's inputs), and "
                             "give freed memory back to the OS after every pass and rewrite: the same results with "
                             "less memory")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="precision of what runs the model on calibration text (the layer-wise passes, "
        "distillation's training steps): bfloat16 runs linears, matmuls and attention under CPU autocast "
        "(AMX/AVX512-BF16 GEMMs, several times faster on CPUs that have them, far slower on those that do not); "
        "Hessians, the methods' arithmetic, trained parameters and the stored weights stay float32. Its "
        "activations are rounded to 8 mantissa bits, which moves the results a little: on SmolLM2 GPTQ W4A16 "
        "perplexity rose 0.9%")


class EvalTextConfig(_TextSource):
    """A perplexity dataset: `windows` non-overlapping windows of `seq_len` tokens, from the start of
    the text (documents joined by a blank line), disjoint from the calibration documents."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    field: str = "text"
    windows: int = Field(8, ge=1)
    seq_len: int = Field(512, ge=8)


class DataConfig(Frozen):
    calibration: CalibrationConfig | None = None
    evaluation: list[EvalTextConfig] = Field(default_factory=list)

    @field_validator("evaluation")
    @classmethod
    def _unique_names(cls, v: list[EvalTextConfig]) -> list[EvalTextConfig]:
        names = [e.name for e in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"evaluation names must be unique; repeated: {sorted(dup)}")
        return v


class EvaluateConfig(Frozen):
    after_each_stage: bool = Field(False, description="also measure perplexity after every stage but the last "
                                   "(metrics `after_stage_N`), e.g. to see what distillation recovered")
    perplexity: bool = True
    reference_rtn: bool = Field(
        False,
        description="also evaluate plain round-to-nearest with each quantization stage's scheme, "
        "so the report shows what the calibrated method bought over RTN",
    )
    batch_size: int = Field(4, ge=1)
    tasks: list[Literal["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada"]] = Field(
        default_factory=list, description="zero-shot tasks scored as lm-evaluation-harness does, on the baseline, "
        "the compressed model and every compiled target that runs here")
    limit: int | None = Field(None, ge=1, description="documents per task (null: all)")
    seed: int | None = Field(1234, description="which `limit` documents: a seeded sample; null takes the first ones "
                             "(lm-eval's --limit)")
    latency: "LatencyConfig | None" = Field(None, description="time-to-first-token, inter-token latency and throughput "
                                            "per compiled target that runs here")

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, v: list) -> list:
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"tasks listed twice: {dup}")
        return v


class LatencyConfig(Frozen):
    prompt_tokens: int = Field(512, ge=1)
    new_tokens: int = Field(64, ge=2)
    batch: int = Field(8, ge=1, description="the batch size of the throughput figure (batch 1 is always measured)")
    usd_per_hour: float | None = Field(None, gt=0, description="price of the machine, for cost per 1M tokens")


class GatesConfig(Frozen):
    """Release criteria. A failed gate: exit code 9, the artifact written with status `rejected`."""

    max_perplexity_ratio: float | None = Field(None, gt=0, description="compressed / baseline perplexity, every set")
    max_task_drop: float | None = Field(None, ge=0, description="baseline − variant accuracy per task (absolute, "
                                        "e.g. 0.02), for the compressed model and every compiled target")
    min_decode_tokens_per_s: dict[str, float] = Field(default_factory=dict, description="compiled target name → "
                                                      "minimum batch-1 decode tokens/s (needs evaluate.latency)")


EvaluateConfig.model_rebuild()


class OutputFormat(str, enum.Enum):
    compressed_tensors = "compressed-tensors"  # vLLM / compressed-tensors pack-quantized
    kiln = "kiln"  # same packing, any module type (GPT-2 Conv1D), ragged last groups allowed


class OutputDtype(str, enum.Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class OutputConfig(Frozen):
    format: OutputFormat = OutputFormat.compressed_tensors
    dtype: OutputDtype = Field(OutputDtype.float16, description="dtype of unquantized weights and of scales")


class Recipe(Frozen):
    name: str = "kiln-run"
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    compress: list[Annotated[CompressConfig, Field(discriminator="kind")]] = Field(default_factory=list)
    evaluate: EvaluateConfig | None = Field(default_factory=EvaluateConfig)
    compile: CompileConfig | None = None
    gates: GatesConfig | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        needs_calib = [s.kind for s in self.compress if s.needs_calibration]
        if needs_calib and self.data.calibration is None:
            raise ValueError(f"stages {needs_calib} need calibration text: add data.calibration.source")
        if self.evaluate is not None and self.evaluate.perplexity and not self.data.evaluation:
            raise ValueError("evaluate.perplexity is on but data.evaluation lists no text; add one or set evaluate: null")
        if self.compile is not None and not self.data.evaluation:
            raise ValueError("compile checks parity on evaluation text, but data.evaluation lists none; add one")
        g = self.gates
        if g is not None:
            ev = self.evaluate
            if g.max_perplexity_ratio is not None and (ev is None or not ev.perplexity or not self.compress):
                raise ValueError("gates.max_perplexity_ratio needs evaluate.perplexity and at least one compress stage")
            if g.max_task_drop is not None and (ev is None or not ev.tasks):
                raise ValueError("gates.max_task_drop needs evaluate.tasks")
            targets = {t.folder for t in self.compile.targets} if self.compile else set()
            unknown = sorted(set(g.min_decode_tokens_per_s) - targets)
            if unknown:
                raise ValueError(f"gates.min_decode_tokens_per_s names {unknown}, not compile targets ({sorted(targets) or 'none'})")
            if g.min_decode_tokens_per_s and (ev is None or ev.latency is None):
                raise ValueError("gates.min_decode_tokens_per_s needs evaluate.latency")
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


# --- loading with line numbers ------------------------------------------------------------------


def _node_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Walk the composed YAML tree along a pydantic error location; return the 1-based line."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None  # discriminator tags ('gptq') and missing fields stay on the parent's line
        if nxt is None:
            continue
        node = nxt
        line = node.start_mark.line + 1
    return line


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part in {"rtn", "gptq", "awq", "smoothquant", "sparsegpt", "distill"} and out.startswith("compress")
              or part in {"cpu", "cuda"} and out.startswith("compile")):
            continue  # pydantic inserts the union tag; the user never wrote it
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _duplicate_keys(node: yaml.Node | None, origin: str, path: str = "",
                    seen: set[int] | None = None, inside: frozenset[int] = frozenset()) -> None:
    """YAML lets a later key silently replace an earlier one; a recipe must not (two `model:` entries).
    A node reached again through an alias is checked once (`seen`); one reached from inside itself
    (`x: &a [1, *a]`) is a structure without end, which no recipe field can hold."""
    seen = set() if seen is None else seen
    if id(node) in inside:
        raise RecipeError(f"{origin}:{node.start_mark.line + 1}: {path or '(top level)'}: an alias refers to a node "
                          "that contains it, making a structure without end", hint="remove that alias")
    if id(node) in seen:
        return
    seen.add(id(node))
    inside = inside | {id(node)}
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for k, v in node.value:
            line = k.start_mark.line + 1
            if isinstance(k, yaml.ScalarNode) and k.value in first:
                name = f"{path}.{k.value}" if path else k.value
                raise RecipeError(f"{origin}:{line}: {name}: key given twice (lines {first[k.value]} and {line}); "
                                  "YAML would silently keep only the last", hint="delete or merge one of them")
            if isinstance(k, yaml.ScalarNode):
                first[k.value] = line
                _duplicate_keys(v, origin, f"{path}.{k.value}" if path else k.value, seen, inside)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _duplicate_keys(v, origin, f"{path}[{i}]", seen, inside)


def _show_input(err: dict, msg: str) -> bool:
    """Append the offending value unless the message (a validator's own words) already shows it."""
    if "input" not in err or err["type"] in ("missing", "union_tag_invalid") or isinstance(err["input"], (dict, list)):
        return False
    return repr(err["input"]) not in msg and str(err["input"]) not in msg


def parse_recipe(text: str, origin: str = "<recipe>") -> Recipe:
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark else origin
        raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}",
                          hint="check indentation and quoting near that line") from None
    _duplicate_keys(node, origin)
    if not isinstance(raw, dict):
        raise RecipeError(f"{origin}: a recipe is a YAML mapping with sections model, data, compress, evaluate, output")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _node_line(node, loc)
            where = f"{origin}:{line}" if line else origin
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field; remove it or check its spelling"
            elif _show_input(err, msg):
                msg += f" (got {err['input']!r})"
            lines.append(f"{where}: {_format_loc(loc)}: {msg}")
        raise RecipeError("\n".join(lines)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a recipe file", hint="pass the path to a .yaml recipe inside it, "
                         "e.g. recipes/quickstart.yaml")
    if not path.is_file():
        raise InputError(f"recipe file not found: {path}", hint="pass the path to a .yaml recipe, e.g. recipes/quickstart.yaml")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})",
                          hint="save the recipe as UTF-8 (it may be in another encoding, or not a recipe at all)") from None
    return parse_recipe(text, origin=str(path))
