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
