"""Unit tier: recipe validation — every error names the YAML path and line."""

from pathlib import Path

import pytest

from kiln.errors import InputError, RecipeError
from kiln.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
model:
  source: /models/x
data:
  calibration:
    source: data.txt
  evaluation:
    - name: wiki
      source: eval.txt
compress:
  - kind: gptq
    scheme:
      bits: 4
      group_size: 64
"""


def test_good_recipe_parses_with_defaults():
    r = parse_recipe(GOOD)
    (stage,) = r.compress
    assert stage.kind == "gptq" and stage.scheme.group_size == 64 and stage.act_order
    assert r.output.format.value == "compressed-tensors"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    load_recipe(path)


def test_bits_out_of_range_names_field_and_line():
    with pytest.raises(RecipeError) as exc:
        parse_recipe(GOOD.replace("bits: 4", "bits: 9"), "r.yaml")
    assert "r.yaml:13: compress[0].scheme.bits" in str(exc.value) and "less than or equal to 8" in str(exc.value)


def test_low_memory_is_off_by_default_and_a_bool():
    assert parse_recipe(GOOD).data.calibration.low_memory is False
    on = parse_recipe(GOOD.replace("    source: data.txt\n", "    source: data.txt\n    low_memory: true\n", 1))
    assert on.data.calibration.low_memory is True
    with pytest.raises(RecipeError, match=r"r.yaml:7: data\.calibration\.low_memory.*valid boolean"):
        parse_recipe(GOOD.replace("    source: data.txt\n", "    source: data.txt\n    low_memory: sometimes\n", 1), "r.yaml")


def test_compute_dtype_is_float32_by_default_bfloat16_on_request_and_nothing_else():
    assert parse_recipe(GOOD).data.calibration.compute_dtype == "float32"
    on = parse_recipe(GOOD.replace("    source: data.txt\n", "    source: data.txt\n    compute_dtype: bfloat16\n", 1))
    assert on.data.calibration.compute_dtype == "bfloat16"
    with pytest.raises(RecipeError, match=r"r.yaml:7: data\.calibration\.compute_dtype.*'float32' or 'bfloat16'"):
        parse_recipe(GOOD.replace("    source: data.txt\n", "    source: data.txt\n    compute_dtype: float16\n", 1), "r.yaml")


def test_calibration_batch_size_defaults_to_four_and_must_be_positive():
    assert parse_recipe(GOOD).data.calibration.batch_size == 4
    with pytest.raises(RecipeError, match=r"r.yaml:7: data\.calibration\.batch_size.*greater than or equal to 1"):
        parse_recipe(GOOD.replace("    source: data.txt\n", "    source: data.txt\n    batch_size: 0\n", 1), "r.yaml")


def test_bits_below_two():
    with pytest.raises(RecipeError, match=r"compress\[0\]\.scheme\.bits.*greater than or equal to 2"):
        parse_recipe(GOOD.replace("bits: 4", "bits: 1"))


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(RecipeError) as exc:
        parse_recipe(GOOD.replace("kind: gptq", "kind: gptqq"), "r.yaml")
    msg = str(exc.value)
    assert "r.yaml:11" in msg and "'gptqq'" in msg and "'gptq'" in msg and "'rtn'" in msg


def test_unknown_field_is_rejected_with_its_line():
    with pytest.raises(RecipeError, match=r"r.yaml:15: compress\[0\]\.scheme\.grup_size: unknown field"):
        parse_recipe(GOOD.replace("group_size: 64", "group_size: 64\n      grup_size: 3"), "r.yaml")


def test_malformed_yaml_gives_line():
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: not valid YAML"):
        parse_recipe("model:\n  source: [unclosed\n", "r.yaml")


def test_gptq_without_calibration_is_rejected():
    text = GOOD.replace("  calibration:\n    source: data.txt\n", "")
    with pytest.raises(RecipeError, match="need calibration text"):
        parse_recipe(text)


def test_perplexity_needs_evaluation_text():
    text = GOOD.split("  evaluation:")[0] + GOOD.split("      source: eval.txt\n")[1]
    with pytest.raises(RecipeError, match="data.evaluation lists no text"):
        parse_recipe(text)


def test_missing_recipe_file_is_missing_input(tmp_path):
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_top_level_must_be_mapping():
    with pytest.raises(RecipeError, match="YAML mapping"):
        parse_recipe("- 1\n- 2\n")


# --- audit fixes: what is refused before anything runs ---------------------------------------------


def test_recipe_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(GOOD.encode().replace(b"name: t", b"name: caf\xe9"))
    with pytest.raises(RecipeError, match=r"r\.yaml:1: not UTF-8 text \(byte 9: b'\\xe9'\)"):
        load_recipe(path)


def test_duplicate_key_names_the_key_and_both_lines():
    with pytest.raises(RecipeError, match=r"r\.yaml:15: model: key given twice \(lines 2 and 15\)"):
        parse_recipe(GOOD + "model:\n  source: /models/y\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"r\.yaml:15: compress\[0\]\.scheme\.bits: key given twice \(lines 13 and 15\)"):
        parse_recipe(GOOD + "      bits: 8\n", "r.yaml")


def test_field_on_a_plain_text_source_is_refused():
    with pytest.raises(RecipeError, match=r"r\.yaml:7: data\.calibration\.field: .*does not apply to a plain-text source"):
        parse_recipe(GOOD.replace("    source: data.txt\n", "    source: data.txt\n    field: passage\n"), "r.yaml")
    assert parse_recipe(GOOD.replace("    source: data.txt\n", "    source: d.jsonl\n    field: passage\n")).data.calibration.field == "passage"


@pytest.mark.parametrize("stage,value", [("kind: smoothquant\n  alpha: 1.5", "1.5"), ("kind: sparsegpt\n  pattern: '4:2'", "'4:2'")])
def test_validator_messages_show_the_value_once(stage, value):
    text = GOOD.split("compress:\n")[0] + f"compress:\n- {stage}\n"
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text)
    assert str(exc.value).count(value) == 1, str(exc.value)


def _validate(tmp_path, recipe: dict) -> tuple[int, str]:
    from conftest import run_cli, write_recipe

    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", recipe)))
    return code, err


def test_ignore_pattern_that_matches_nothing_is_refused(tiny_models, tmp_path):
    from conftest import gptq_recipe

    r = gptq_recipe(tiny_models("llama"))
    r["compress"][0]["ignore"] = ["model.layers.9.*"]
    code, err = _validate(tmp_path, r)
    assert code == 3 and "compress[0].ignore: pattern 'model.layers.9.*' matches no linear layer" in err


@pytest.mark.parametrize("max_length,needle", [(16, "data.evaluation[0].seq_len (the parity windows) = 64"),
                                               (64, "min(32, data.evaluation[0].seq_len) + generate_tokens = 40")])
def test_compile_max_length_must_hold_what_the_checks_run(tiny_models, tmp_path, max_length, needle):
    from conftest import gptq_recipe

    r = gptq_recipe(tiny_models("llama"), compile={"targets": [{"target": "cpu", "max_length": max_length}],
                                                   "parity": {"generate_tokens": 8}})
    if max_length == 64:
        r["data"]["evaluation"][0]["seq_len"] = 32
        r["compile"]["targets"][0]["max_length"] = 39
    code, err = _validate(tmp_path, r)
    assert code == 3 and "compile.targets[0].max_length" in err and needle in err, err


@pytest.mark.parametrize("teacher,code,needle", [
    ("{tmp}/nope", 4, "compress[1].teacher: model not found: {tmp}/nope"),
    ("{tmp}/t.txt", 4, "compress[1].teacher: model {tmp}/t.txt: a single file must be a .gguf"),
])
def test_distill_teacher_is_checked_at_plan_time(tiny_models, tmp_path, teacher, code, needle):
    from conftest import gptq_recipe

    (tmp_path / "t.txt").write_text("not a model")
    r = gptq_recipe(tiny_models("llama"))
    r["compress"].append({"kind": "distill", "teacher": teacher.format(tmp=tmp_path), "steps": 1, "batch_size": 2})
    got, err = _validate(tmp_path, r)
    assert got == code and needle.format(tmp=tmp_path) in err, err


@pytest.mark.parametrize("extra,needle", [
    ({"seq_len": 4096}, "compress[1].seq_len: 4096 tokens exceeds the model's 512 positions"),
    ({"seq_len": 128}, "compress[1].seq_len: 128 is longer than the calibration windows it trains on (data.calibration.seq_len: 64)"),
    ({"batch_size": 64}, "compress[1].batch_size: 64 is more than the 8 training windows (data.calibration.samples)"),
    ({"samples": 1}, "compress[1].batch_size: 2 is more than the 1 training windows (compress[1].samples)"),
])
def test_distill_sizes_beyond_the_calibration_data_are_refused(tiny_models, tmp_path, extra, needle):
    from conftest import gptq_recipe

    r = gptq_recipe(tiny_models("llama"))
    r["compress"].append({"kind": "distill", "teacher": "original", "steps": 1, "batch_size": 2, **extra})
    code, err = _validate(tmp_path, r)
    assert code == 3 and needle in err, err


def test_missing_and_binary_data_name_the_field(tiny_models, tmp_path):
    from conftest import gptq_recipe

    model = tiny_models("llama")
    r = gptq_recipe(model)
    r["data"]["evaluation"][0] = {"name": "ev", "source": str(tmp_path / "nope.txt")}
    code, err = _validate(tmp_path, r)
    assert code == 4 and f"data.evaluation[0].source not found: {tmp_path / 'nope.txt'}" in err, err
    r = gptq_recipe(model)
    r["data"]["calibration"]["source"] = str(model / "model.safetensors")
    code, err = _validate(tmp_path, r)
    assert code == 4 and "data.calibration.source: " in err and "model.safetensors is not text (it holds NUL bytes)" in err, err


def test_text_in_a_legacy_encoding_is_still_text(tmp_path):
    from kiln.data import load_documents

    (tmp_path / "a.txt").write_bytes("The fee was \xa35m, a record for the club this season.".encode("latin-1"))
    assert load_documents(str(tmp_path / "a.txt")).texts[0].startswith("The fee was")


def test_bad_jsonl_names_the_line_and_the_cause(tmp_path):
    from kiln.data import load_documents

    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"text": "two"\n')
    with pytest.raises(InputError, match=r"data\.calibration\.source: .*d\.jsonl: cannot read it as jsonl: line 2: "):
        load_documents(str(tmp_path / "d.jsonl"), "text", "data.calibration.source")


def test_speed_gate_on_a_target_that_cannot_run_here_is_refused(tiny_models, tmp_path, monkeypatch):
    import kiln.compile.targets as targets
    from conftest import gptq_recipe

    monkeypatch.setattr(targets, "runtime_problem", lambda t: "no CUDAExecutionProvider" if t.target == "cuda" else None)
    r = gptq_recipe(tiny_models("llama"), compile={"targets": [{"target": "cpu"}, {"target": "cuda"}]},
                    gates={"min_decode_tokens_per_s": {"cuda": 1}})
    r["evaluate"]["latency"] = {"prompt_tokens": 16, "new_tokens": 4, "batch": 2}
    code, err = _validate(tmp_path, r)
    assert code == 3 and "gates.min_decode_tokens_per_s.cuda: compile target 'cuda' cannot run on this machine" in err, err


def test_the_problem_is_the_headline_and_the_format_second(tiny_models, tmp_path):
    from conftest import gptq_recipe

    r = gptq_recipe(tiny_models("llama"), group_size=48)
    code, err = _validate(tmp_path, r)
    headline = err.split("invalid recipe: ")[-1].splitlines()[0]
    assert code == 3 and headline.startswith("compress[0]: group_size 48 does not divide in_features=128 of "
                                             "model.layers.0.mlp.down_proj"), err
    assert headline.endswith("(output.format 'compressed-tensors' cannot store this plan)"), err
    r = gptq_recipe(tiny_models("llama"), activations={"bits": 8})
    r["compress"][0]["activations"] = r.pop("activations")
    code, err = _validate(tmp_path, r)
    headline = err.split("invalid recipe: ")[-1].splitlines()[0]
    assert code == 3 and headline.startswith("compress[0]: activations: int8 activations need int8 symmetric"), err
    assert "output.format" not in err, err
