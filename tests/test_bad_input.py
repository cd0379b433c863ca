"""Bad input: one clear message, its own exit code, no traceback, no artifact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import gptq_recipe, run_cli, write_recipe


def _assert_fails(tmp_path, recipe_path, code, *needles):
    out_dir = tmp_path / "run"
    rc, stdout, stderr = run_cli("run", str(recipe_path), "--out", str(out_dir), "--quiet", "--json")
    assert rc == code, stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in stderr
    err = json.loads(stdout)["error"]
    assert err["exit_code"] == code
    assert not (out_dir / "artifact").exists()


def test_malformed_yaml(tmp_path):
    p = write_recipe(tmp_path / "r.yaml", "model:\n  source: [oops\ncompress: {")
    _assert_fails(tmp_path, p, 3, "r.yaml:", "not valid YAML")


def test_unknown_kind(tiny_models, tmp_path):
    r = gptq_recipe(tiny_models("llama"), kind="gptqq")
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 3, "compress[0]", "'gptqq'", "'gptq'")


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_outside_range(tiny_models, tmp_path, bits):
    r = gptq_recipe(tiny_models("llama"), bits=bits)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 3, "compress[0].scheme.bits")


def test_missing_model_file(tmp_path):
    r = gptq_recipe(tmp_path / "no-such-model.gguf")
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 4, "model not found", "no-such-model.gguf")


def test_missing_package_model(tmp_path):
    r = gptq_recipe("x")
    r["model"]["source"] = "pkg:not_a_kiln_package/model.gguf"
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 4, "not_a_kiln_package", "pip install")


def test_empty_calibration_set(tiny_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    r = gptq_recipe(tiny_models("llama"))
    r["data"]["calibration"]["source"] = str(empty)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 4, "holds no text")


def test_calibration_too_small(tiny_models, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("A short text.")
    r = gptq_recipe(tiny_models("llama"))
    r["data"]["calibration"]["source"] = str(small)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 4, "calibration data", "lower data.calibration.samples")


def test_nan_weight(tiny_models, tmp_path):
    import shutil

    src = tiny_models("llama")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    r = gptq_recipe(broken)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 5, "model.layers.1.mlp.up_proj.weight", "NaN")


def test_missing_text_column(tiny_models, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "hello world"}\n')
    r = gptq_recipe(tiny_models("llama"))
    r["data"]["calibration"]["source"] = str(rows)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 4, "no column 'text'", "body")


def test_sequence_longer_than_model(tiny_models, tmp_path):
    r = gptq_recipe(tiny_models("gpt2"), fmt="kiln", seq_len=1024)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 3, "exceeds the model's 512 positions")
