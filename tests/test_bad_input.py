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


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type(tiny_models, tmp_path):
    model = _copy_model(tiny_models("llama"), tmp_path / "frob")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "frobnicator"}))
    p = write_recipe(tmp_path / "r.yaml", gptq_recipe(model))
    _assert_fails(tmp_path, p, 4, str(model), "'frobnicator'", "transformers", "llama")
    rc, _, stderr = run_cli("validate", str(p))
    assert rc == 4 and "'frobnicator'" in stderr and "Traceback" not in stderr


def test_config_not_json(tiny_models, tmp_path):
    model = _copy_model(tiny_models("llama"), tmp_path / "badjson")
    (model / "config.json").write_text('{"model_type": "llama",,}')
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", gptq_recipe(model)), 4,
                  str(model / "config.json"), "not valid JSON", "line 1, column 24")


def test_truncated_weights(tiny_models, tmp_path):
    import os

    model = _copy_model(tiny_models("llama"), tmp_path / "trunc")
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 1000)
    p = write_recipe(tmp_path / "r.yaml", gptq_recipe(model))
    _assert_fails(tmp_path, p, 4, str(weights), f"header says {size} bytes, the file has {size - 1000}")
    rc, _, stderr = run_cli("validate", str(p))
    assert rc == 4 and "truncated or corrupt" in stderr


def test_unusable_cache_dir(tiny_models, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KILN_CACHE", str(blocker / "cache"))
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", gptq_recipe(tiny_models("llama"))), 4,
                  f"KILN_CACHE={blocker / 'cache'}", "cannot create the folder", "hint:")


def test_corrupt_digest_memo_is_recomputed(tmp_path, monkeypatch):
    from kiln.paths import cached_sha256, sha256_file

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    memo = tmp_path / "cache" / "digests.json"
    memo.parent.mkdir()
    memo.write_text('{"truncated": ')
    f = tmp_path / "data.txt"
    f.write_text("some bytes")
    assert cached_sha256(f) == sha256_file(f)
    assert list(json.loads(memo.read_text()).values()) == [sha256_file(f)]


def test_relative_path_typo_is_not_a_hub_id(tiny_models, tmp_path, monkeypatch):
    import time

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", gptq_recipe("models/lama")), 4,
                  "model not found: models/lama")
    assert time.monotonic() - start < 30


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the environment may have come too late
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", gptq_recipe("someorg/some-model")), 4,
                  "'someorg/some-model' is not a local path and not in the Hugging Face cache", "HF_HUB_OFFLINE")


def test_hub_id_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    start = time.monotonic()
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", gptq_recipe("someorg/some-model")), 4,
                  "not in the Hugging Face cache", "the hub could not be reached")
    assert time.monotonic() - start < 30


def test_tensors_renamed_by_transformers(tiny_models, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    model = tmp_path / "neox"
    config = GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    for f in tiny_models("llama").iterdir():
        if "token" in f.name:
            shutil.copy2(f, model / f.name)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", gptq_recipe(model)), 4,
                  "(gpt_neox)", "no tensor named lm_head.weight", "embed_out")


def _rewrite_header(weights, edit) -> None:
    """Rewrite a safetensors header through `edit(header)`, leaving the data bytes as they are."""
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def test_safetensors_shape_disagrees_with_byte_range(tiny_models, tmp_path):
    model = _copy_model(tiny_models("llama"), tmp_path / "m")
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_header(model / "model.safetensors", lambda h: h[name].update(shape=[32, 64]))
    p = write_recipe(tmp_path / "r.yaml", gptq_recipe(model))
    _assert_fails(tmp_path, p, 4, "model.safetensors", f"tensor {name} is F32 of shape [32, 64]",
                  "byte range holds 16384 bytes")


def test_weights_shape_disagrees_with_config(tiny_models, tmp_path):
    model = _copy_model(tiny_models("llama"), tmp_path / "m")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors = load_file(model / "model.safetensors")
    tensors[name] = tensors[name].reshape(32, 128).contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    p = write_recipe(tmp_path / "r.yaml", gptq_recipe(model))
    _assert_fails(tmp_path, p, 4, "config.json and the weights disagree", name,
                  "config.json gives [64, 64], the weights hold [32, 128]")


def test_checkpoint_shapes_agree_for_conv1d_and_tied(tiny_models):
    from kiln.model import build_skeleton, check_checkpoint

    for arch in ("gpt2", "llama"):  # GPT-2 stores Conv1D weights (in, out); llama ties lm_head
        check_checkpoint(build_skeleton(tiny_models(arch)), tiny_models(arch))


def test_corrupt_pytorch_bin(tiny_models, tmp_path):
    model = _copy_model(tiny_models("llama"), tmp_path / "binbad")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"garbage" * 1000)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", gptq_recipe(model)), 4,
                  f"could not load model {model}", "a weight file is corrupt, truncated or not a PyTorch checkpoint")


@pytest.mark.parametrize("text", ["x: &a [1, *a]\n", "extra: &o {format: kiln, extra: *o}\n"])
def test_recursive_yaml_alias(tiny_models, tmp_path, text):
    p = write_recipe(tmp_path / "r.yaml", gptq_recipe(tiny_models("llama")))
    p.write_text(p.read_text() + text)
    _assert_fails(tmp_path, p, 3, "r.yaml:", "an alias refers to a node that contains it")
    rc, _, stderr = run_cli("validate", str(p))
    assert rc == 3 and "Traceback" not in stderr and "structure without end" in stderr


def test_kiln_cache_is_a_file(tiny_models, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KILN_CACHE", str(blocker))
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", gptq_recipe(tiny_models("llama"))), 4,
                  f"KILN_CACHE={blocker}: {blocker} is a file, not a folder")


def test_digest_memo_is_a_folder(tmp_path, monkeypatch):
    from kiln.paths import cached_sha256, sha256_file

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "digests.json").mkdir(parents=True)
    f = tmp_path / "data.txt"
    f.write_text("some bytes")
    assert cached_sha256(f) == sha256_file(f)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["digests.json"]


def test_crlf_text_splits_into_documents(tmp_path):
    from kiln.data import load_documents

    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(b"first line\nsame doc\n\nsecond doc\n\nthird doc\n")
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    assert load_documents(str(crlf)).texts == load_documents(str(lf)).texts == [
        "first line\nsame doc", "second doc", "third doc"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_calibration_text(tiny_models, tmp_path, encoding):
    text = tmp_path / "calib.txt"
    text.write_bytes("Some text.\n\nMore text.\n".encode(encoding))
    r = gptq_recipe(tiny_models("llama"))
    r["data"]["calibration"]["source"] = str(text)
    _assert_fails(tmp_path, write_recipe(tmp_path / "r.yaml", r), 4, f"{text} is UTF-{encoding[4:6]} text",
                  "save it as UTF-8")


def test_recipe_path_is_a_folder(tmp_path):
    rc, _, stderr = run_cli("run", str(tmp_path), "--quiet")
    assert rc == 4 and f"{tmp_path} is a folder, not a recipe file" in stderr
