"""Integration tier: tiny seeded models of every claimed architecture through the whole pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import ARCHS, gptq_recipe, run_cli, run_json, write_recipe


def _compressed_reference(artifact_dir, run_dir):
    """Our own compressed model, assembled from the stage outputs (not from the artifact)."""
    from kiln.model import WeightStore, load_full

    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    src = manifest["source"]["origin"]
    stage_files = sorted((run_dir / "stages").glob("*/layer-*.safetensors"))
    dtype = getattr(torch, manifest["dtype"])
    store = WeightStore(src, stage_files, round_to=dtype)
    return load_full(src, store)


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_end_to_end(arch, tiny_models, tmp_path):
    from kiln.artifact import load_model

    model_dir = tiny_models(arch)
    fmt = "kiln" if arch == "gpt2" else "compressed-tensors"  # GPT-2's Conv1D is not an nn.Linear
    recipe = write_recipe(tmp_path / "r.yaml", gptq_recipe(model_dir, fmt=fmt))
    out = run_json("run", str(recipe), "--out", str(tmp_path / "run"), "--quiet")

    artifact = tmp_path / "run" / "artifact"
    assert out["artifact"] == str(artifact)
    (stage,) = out["stages"]
    assert stage["kind"] == "gptq" and len(stage["modules"]) >= 8  # every linear of every layer
    m = out["metrics"]
    for variant in ("baseline", "compressed", "rtn"):
        assert m[variant]["perplexity"]["wiki"] > 1.0
    assert m["compressed"]["size_bytes"] < m["baseline"]["size_bytes"]

    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["stages"][0]["modules"] == stage["modules"]
    assert set(manifest["files"]) >= {"config.json", "recipe.yaml", "tokenizer.json"}

    # The artifact, loaded back by kiln's reader and (compressed-tensors format) by transformers with
    # compressed-tensors, is the model we evaluated.
    ours = _compressed_reference(artifact, tmp_path / "run")
    loaded = [load_model(artifact)]
    if fmt == "compressed-tensors":
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        loaded.append(AutoModelForCausalLM.from_pretrained(artifact, quantization_config=CompressedTensorsConfig(
            run_compressed=False), dtype=torch.float32).eval())
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    for model in loaded:
        with torch.no_grad():
            a, b = model(ids).logits, ours(ids).logits
        assert (a - b).abs().max() < 1e-4 * max(1.0, float(b.abs().max()))


def test_rerun_does_no_work_and_resume_after_kill(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", gptq_recipe(tiny_models("llama")))
    run_dir = tmp_path / "run"
    first = run_json("run", str(recipe), "--out", str(run_dir), "--quiet")
    digest_before = json.loads((run_dir / "artifact" / "manifest.json").read_text())["files"]
    second = run_json("run", str(recipe), "--out", str(run_dir), "--quiet")
    assert second["stages"][0]["cached"] is True
    assert second["metrics"]["compressed"]["perplexity"] == first["metrics"]["compressed"]["perplexity"]
    assert json.loads((run_dir / "artifact" / "manifest.json").read_text())["files"] == digest_before

    # A run killed after compression (artifact and evaluation gone, a stale temp folder left behind)
    shutil.rmtree(run_dir / "artifact")
    shutil.rmtree(run_dir / "evals")
    (run_dir / ".artifact.tmp-killed").mkdir()
    third = run_json("run", str(recipe), "--out", str(run_dir), "--quiet")
    assert third["stages"][0]["cached"] is True
    assert third["metrics"]["compressed"]["perplexity"] == first["metrics"]["compressed"]["perplexity"]
    assert run_cli("inspect", str(run_dir / "artifact"))[0] == 0
    assert not (run_dir / ".artifact.tmp-killed").exists()  # the killed run's leftovers are gone


def test_calibration_batch_size_is_recorded_and_keys_the_stage(tiny_models, tmp_path):
    """Batching changes only the order of float sums, not the method: the stage reruns (its key has
    the batch size), the manifest says which batch size ran, and the result barely moves."""
    r = gptq_recipe(tiny_models("llama"))
    run_dir = tmp_path / "run"
    first = run_json("run", str(write_recipe(tmp_path / "a.yaml", r)), "--out", str(run_dir), "--quiet")
    r["data"]["calibration"]["batch_size"] = 3  # 8 samples: batches of 3, 3 and 2
    second = run_json("run", str(write_recipe(tmp_path / "b.yaml", r)), "--out", str(run_dir), "--quiet")
    assert first["stages"][0]["cached"] is False and second["stages"][0]["cached"] is False
    manifest = json.loads((run_dir / "artifact" / "manifest.json").read_text())
    assert manifest["data"]["calibration"]["batch_size"] == 3
    a, b = (x["metrics"]["compressed"]["perplexity"]["wiki"] for x in (first, second))
    assert abs(a - b) / a < 0.01


@pytest.mark.parametrize("arch,w8a8", [("llama", False), ("gemma3_text", True)])
def test_bfloat16_calibration_forward_is_keyed_recorded_and_close_to_float32(arch, w8a8, tiny_models, tmp_path):
    """`compute_dtype: bfloat16` runs the calibration passes under autocast: a different stage (its key
    has the dtype, its weights differ from float32's) recorded in the manifest, whose result is close
    to float32's; W8A8 linears' int8 products stay exact inside it (tests/test_w8a8.py)."""
    from kiln.compress.engine import native_bf16

    r = gptq_recipe(tiny_models(arch))
    if w8a8:
        r["compress"] = [{"kind": "smoothquant", "alpha": 0.5},
                         {"kind": "gptq", "scheme": {"bits": 8, "group_size": None}, "activations": {"bits": 8}}]
    runs, ppl = {}, {}
    for dtype in ("float32", "bfloat16"):
        r["data"]["calibration"]["compute_dtype"] = dtype
        runs[dtype] = tmp_path / dtype
        out = run_json("run", str(write_recipe(tmp_path / f"{dtype}.yaml", r)), "--out", str(runs[dtype]), "--quiet")
        assert not any(st["cached"] for st in out["stages"])
        cal = json.loads((runs[dtype] / "artifact" / "manifest.json").read_text())["data"]["calibration"]
        assert cal["compute_dtype"] == dtype
        assert cal.get("native_bf16") == (native_bf16() if dtype == "bfloat16" else None)
        ppl[dtype] = out["metrics"]["compressed"]["perplexity"]["wiki"]
    files = {d: {p.name: p.read_bytes() for p in sorted(run.glob("stages/*/*.safetensors"))} for d, run in runs.items()}
    assert files["float32"].keys() == files["bfloat16"].keys() and files["float32"] != files["bfloat16"]
    assert abs(ppl["bfloat16"] - ppl["float32"]) / ppl["float32"] < 0.02
    # the float32 recipe again reuses its own stages, not the bfloat16 ones
    r["data"]["calibration"]["compute_dtype"] = "float32"
    again = run_json("run", str(write_recipe(tmp_path / "again.yaml", r)), "--out", str(runs["float32"]), "--quiet")
    assert all(st["cached"] for st in again["stages"])


@pytest.mark.parametrize("arch,w8a8", [("llama", False), ("opt", False), ("gemma3_text", True)])  # OPT keeps o_proj's inputs
def test_low_memory_gives_the_same_stage_files_and_is_recorded(arch, w8a8, tiny_models, tmp_path, monkeypatch):
    """Keeping the activations and saved inputs in files (Linux), or recomputing the MLP instead of
    keeping its inputs (where files cannot be paged out), changes how the layer loop spends memory,
    not one number: the stage files are byte-identical, so the stage key leaves it out and a run
    that flips it reuses the stage; the manifest says which way ran."""
    from kiln.compress.spill import Spill

    r = gptq_recipe(tiny_models(arch))
    if w8a8:  # smoothing, then int8 linears in the passes after them
        r["compress"] = [{"kind": "smoothquant", "alpha": 0.5},
                         {"kind": "gptq", "scheme": {"bits": 8, "group_size": None}, "activations": {"bits": 8}}]
    runs = {}
    for way in ("memory", "files", "recompute"):
        low = way != "memory"
        monkeypatch.setattr(Spill, "available", staticmethod(lambda: way == "files"))
        r["data"]["calibration"]["low_memory"] = low
        runs[way] = tmp_path / f"run-{way}"
        out = run_json("run", str(write_recipe(tmp_path / f"{way}.yaml", r)), "--out", str(runs[way]), "--quiet")
        assert not any(st["cached"] for st in out["stages"])
        manifest = json.loads((runs[way] / "artifact" / "manifest.json").read_text())
        assert manifest["data"]["calibration"]["low_memory"] is low
        assert not list(runs[way].rglob(".spill-*"))
    stage_files = {way: {p.name: p.read_bytes() for p in sorted(d.glob("stages/*/*.safetensors"))} for way, d in runs.items()}
    assert stage_files["memory"] and stage_files["files"] == stage_files["memory"] == stage_files["recompute"]
    r["data"]["calibration"]["low_memory"] = False
    again = run_json("run", str(write_recipe(tmp_path / "again.yaml", r)), "--out", str(runs["files"]), "--quiet")
    assert all(st["cached"] for st in again["stages"])


def test_low_memory_on_a_full_disk_is_a_clear_error_and_no_artifact(tiny_models, tmp_path, full_disk):
    r = gptq_recipe(tiny_models("llama"))
    r["data"]["calibration"]["low_memory"] = True
    code, _, err = run_cli("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    assert code == 5
    assert "No space left on device" in err and "low_memory: false" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "artifact").exists()


def test_inspect_detects_a_tampered_file(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", gptq_recipe(tiny_models("qwen2")))
    run_json("run", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    artifact = tmp_path / "run" / "artifact"
    code, out, _ = run_cli("inspect", str(artifact))
    assert code == 0 and "verified" in out
    with open(artifact / "config.json", "a") as f:
        f.write(" ")
    code, _, err = run_cli("inspect", str(artifact))
    assert code == 7 and "sha256 mismatch: config.json" in err


def test_group_size_that_does_not_divide_is_decided_per_format(tiny_models, tmp_path):
    from kiln.artifact import load_model

    model_dir = tiny_models("llama")  # in_features 64 (attention, up) and 128 (down)
    bad = write_recipe(tmp_path / "ct.yaml", gptq_recipe(model_dir, group_size=48))
    code, _, err = run_cli("run", str(bad), "--out", str(tmp_path / "ct"), "--quiet")
    assert code == 3
    assert "group_size 48 does not divide in_features=64 of model.layers.0.self_attn.q_proj" in err
    assert "use one of 16, 32, 64" in err and "output.format: kiln" in err
    assert not (tmp_path / "ct" / "artifact").exists()

    ok = write_recipe(tmp_path / "kiln.yaml", gptq_recipe(model_dir, group_size=48, fmt="kiln"))
    out = run_json("run", str(ok), "--out", str(tmp_path / "k"), "--quiet")
    loaded = load_model(tmp_path / "k" / "artifact")
    assert out["metrics"]["compressed"]["perplexity"]["wiki"] > 1
    w = loaded.model.layers[0].mlp.down_proj.weight  # 128 = 2×48 + 32: a shorter last group
    assert w.shape == (64, 128) and torch.isfinite(w).all()


def test_asymmetric_and_rtn_stage(tiny_models, tmp_path):
    from kiln.artifact import load_model

    recipe = gptq_recipe(tiny_models("mistral"), kind="rtn", symmetric=False, bits=3, group_size=None)
    recipe["data"].pop("calibration")
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run"), "--quiet")
    assert out["stages"][0]["kind"] == "rtn"
    # RTN with the same scheme is the reference: identical perplexity
    assert out["metrics"]["compressed"]["perplexity"] == pytest.approx(out["metrics"]["rtn"]["perplexity"], rel=1e-6)
    loaded = load_model(tmp_path / "run" / "artifact")
    cfg = json.loads((tmp_path / "run" / "artifact" / "config.json").read_text())
    (group,) = cfg["quantization_config"]["config_groups"].values()
    assert group["weights"]["symmetric"] is False and group["weights"]["strategy"] == "channel"
    assert loaded.model.layers[1].mlp.up_proj.weight.shape == (128, 64)


def test_targets_and_ignore_resolve_to_concrete_names(tiny_models, tmp_path):
    recipe = gptq_recipe(tiny_models("llama"))
    recipe["compress"][0]["targets"] = ["*.mlp.*"]
    recipe["compress"][0]["ignore"] = ["*.down_proj"]
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run"), "--quiet")
    assert out["stages"][0]["modules"] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]

    recipe["compress"][0]["targets"] = ["*.nothing"]
    code, _, err = run_cli("validate", str(write_recipe(tmp_path / "bad.yaml", recipe)))
    assert code == 3 and "pattern '*.nothing' matches no linear layer" in err


def test_validate_json(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", gptq_recipe(tiny_models("opt")))
    out = run_json("validate", str(recipe))
    assert out["valid"] and out["modules"] == {"compress[0]": 12}


def test_a_damaged_stage_file_is_run_again_not_trusted(tiny_models, tmp_path):
    """Resume trusts a finished stage only if its files still have the digests recorded when it
    finished: a flipped byte, a truncated file or an unreadable result.json reruns that stage, and
    the rerun rebuilds the very same files."""
    recipe = write_recipe(tmp_path / "r.yaml", gptq_recipe(tiny_models("llama")))
    run_dir = tmp_path / "run"
    first = run_json("run", str(recipe), "--out", str(run_dir), "--quiet")
    stage = next((run_dir / "stages").iterdir())
    layer = stage / "layer-001.safetensors"
    original = layer.read_bytes()
    artifact_files = json.loads((run_dir / "artifact" / "manifest.json").read_text())["files"]

    def damage_and_rerun(damage) -> dict:
        damage()
        shutil.rmtree(run_dir / "artifact")
        code, out, err = run_cli("run", str(recipe), "--out", str(run_dir), "--json")
        assert code == 0, err
        assert f"cached stage {stage.name} is damaged" in err
        assert layer.read_bytes() == original
        assert json.loads((run_dir / "artifact" / "manifest.json").read_text())["files"] == artifact_files
        return json.loads(out)

    flipped = bytearray(original)
    flipped[-1] ^= 0xFF
    result = json.loads((stage / "result.json").read_text())

    def result_json(**change):
        return lambda: (stage / "result.json").write_text(json.dumps({k: v for k, v in {**result, **change}.items() if v is not None}))

    for damage in (lambda: layer.write_bytes(bytes(flipped)), lambda: layer.write_bytes(original[: len(original) // 2]),
                   layer.unlink, lambda: (stage / "result.json").write_text("{"), lambda: (stage / "result.json").write_text("{}"),
                   result_json(digests=None),  # as a kiln that recorded no digests wrote it: not trusted
                   result_json(modules=None), result_json(files="layer-001.safetensors"),
                   result_json(files=[*result["files"], "layer-999.safetensors"])):
        again = damage_and_rerun(damage)
        assert again["stages"][0]["cached"] is False
        assert again["metrics"]["compressed"]["perplexity"] == first["metrics"]["compressed"]["perplexity"]
    assert run_json("run", str(recipe), "--out", str(run_dir), "--quiet")["stages"][0]["cached"] is True


def test_a_run_folder_under_a_file_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "taken").write_text("a file")
    recipe = write_recipe(tmp_path / "r.yaml", gptq_recipe(tmp_path / "no-such-model"))  # never reached
    code, out, err = run_cli("run", str(recipe), "--out", str(tmp_path / "taken" / "run"), "--json")
    assert code == 4, err
    error = json.loads(out)["error"]
    assert error["exit_code"] == 4 and "taken is a file, not a folder" in error["message"]
    assert "--out" in error["message"] and "Traceback" not in err
    code, out, err = run_cli("run", str(recipe), "--out", str(tmp_path / "new" / "run"))  # the check passes, the model is missing
    assert code == 4 and "no-such-model" in err
    assert not (tmp_path / "new").exists()  # the folders made for the check are gone again


@pytest.mark.parametrize("signum,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_unwinds_the_run_and_reports_json(signum, code, tmp_path, capsys):
    """SIGTERM (timeout, systemd, Kubernetes) unwinds like Ctrl-C: the half-built folder is removed,
    the exit code says which signal, --json still gets its error object, and the handler that was
    there before is back afterwards."""
    import os
    import signal
    import time

    import typer

    from kiln.cli import _guard
    from kiln.pipeline import _atomic_dir

    def build(tmp):
        (tmp / "half-written").write_text("x")
        os.kill(os.getpid(), getattr(signal, signum))
        time.sleep(10)  # interrupted long before

    before = signal.getsignal(signal.SIGTERM)
    # a shell starts background jobs with SIGINT ignored, and Python (like kiln) keeps it so; the
    # test is about the unwinding, so it gives this process the interactive Ctrl-C handler
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(typer.Exit) as exit_info:
            _guard(lambda: _atomic_dir(tmp_path / "artifact", build), as_json=True)
    finally:
        signal.signal(signal.SIGINT, interactive)
    assert exit_info.value.exit_code == code
    error = json.loads(capsys.readouterr().out)["error"]
    assert error == {"kind": "interrupted", "exit_code": code, "message": error["message"]}
    assert signum in error["message"] and "resume" in error["message"]
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temporary folder
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_run_folder_inside_an_artifact_or_the_model_or_over_files_is_refused(tiny_models, tmp_path):
    model = tiny_models("llama")
    recipe = write_recipe(tmp_path / "r.yaml", gptq_recipe(model, evaluate=None))
    host = tmp_path / "host"
    run_json("run", str(recipe), "--out", str(host), "--quiet")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "stages").write_text("a file where kiln keeps its stages")
    cases = {host / "artifact": "inside the artifact", host / "artifact" / "sub": "inside the artifact",
             model / "run": "inside the model folder", tmp_path / "busy": "stages is a file",
             tmp_path / ("x" * 300): "cannot write there"}
    for out, says in cases.items():
        code, stdout, err = run_cli("run", str(recipe), "--out", str(out), "--json")
        assert code == 4, (out, err)
        assert says in json.loads(stdout)["error"]["message"] and "Traceback" not in err
    assert run_cli("verify", str(host / "artifact"))[0] == 0  # nothing was written into it
    assert not (model / "run").exists()


def test_a_model_folder_without_its_tokenizer_is_exit_4(tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    code, out, err = run_cli("run", str(write_recipe(tmp_path / "r.yaml", gptq_recipe(model))), "--out", str(tmp_path / "run"), "--json")
    assert code == 4, err
    assert "cannot load its tokenizer" in json.loads(out)["error"]["message"] and str(model) in err


def test_a_distill_teacher_is_resolved_before_any_stage_runs(tiny_models, tmp_path):
    """A teacher folder with no weights, or one whose config names an unknown family, fails at plan
    time naming compress[1].teacher: stage 0 never starts."""
    broken = {"no-weights": lambda d: [f.unlink() for f in d.glob("*.safetensors")],
              "unknown-family": lambda d: (d / "config.json").write_text(
                  json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "frobnicator"}))}
    for name, breaks in broken.items():
        teacher = tmp_path / name
        shutil.copytree(tiny_models("llama"), teacher)
        breaks(teacher)
        r = gptq_recipe(tiny_models("llama"))
        r["compress"].append({"kind": "distill", "teacher": str(teacher), "steps": 1, "batch_size": 2, "seq_len": 32})
        run_dir = tmp_path / f"run-{name}"
        code, out, err = run_cli("run", str(write_recipe(tmp_path / f"{name}.yaml", r)), "--out", str(run_dir), "--json")
        assert code == 4, err
        assert json.loads(out)["error"]["message"].startswith("compress[1].teacher: "), out
        assert not (run_dir / "stages").exists()


def test_distill_samples_trains_on_windows_beyond_calibration_and_evaluation_skips_their_documents(tiny_models, tmp_path):
    """`samples` on a distill stage cuts its own windows from the calibration stream: the first ones are
    the calibration windows, the rest come from further documents, and an evaluation set on the same
    source leaves all of those documents out. Too few tokens for them fails before any stage runs."""
    import random

    from kiln.data import calibration_windows, evaluation_windows, load_documents
    from kiln.pipeline import _tokenizer

    rng = random.Random(0)
    words = "river stone market winter signal harbor lantern orchard copper meadow engine valley".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Note {i}: " + " ".join(rng.choice(words) for _ in range(24)) for i in range(80)))
    model = tiny_models("llama")
    r = gptq_recipe(model, samples=2, seq_len=32)
    r["data"]["calibration"]["source"] = str(corpus)
    r["data"]["evaluation"] = [{"name": "notes", "source": str(corpus), "windows": 2, "seq_len": 32}]
    r["compress"] = [{"kind": "sparsegpt", "sparsity": 0.5, "block_size": 16},
                     {"kind": "distill", "teacher": "original", "steps": 2, "batch_size": 4, "samples": 150}]
    out = run_json("run", str(write_recipe(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "run"), "--quiet")
    assert out["stages"][1]["result"]["train_windows"] == 150

    docs, tok = load_documents(str(corpus)), _tokenizer(model)
    calib, train = calibration_windows(docs, tok, 2, 32, 0), calibration_windows(docs, tok, 150, 32, 0)
    assert torch.equal(train.ids[:2], calib.ids) and len(train.doc_indices) > len(calib.doc_indices)
    manifest = json.loads((tmp_path / "run" / "artifact" / "manifest.json").read_text())
    got = manifest["data"]["evaluation"]["notes"]["token_digest"]
    assert got == evaluation_windows(docs, tok, 2, 32, set(train.doc_indices)).digest
    unseen_by_calibration = evaluation_windows(docs, tok, 2, 32, set(calib.doc_indices))
    assert set(unseen_by_calibration.doc_indices) & set(train.doc_indices)  # so leaving out only those would overlap
    assert got != unseen_by_calibration.digest

    r["compress"][1]["samples"] = 5000
    run_dir = tmp_path / "run-short"
    code, js, err = run_cli("run", str(write_recipe(tmp_path / "short.yaml", r)), "--out", str(run_dir), "--json")
    msg = json.loads(js)["error"]
    assert code == 4 and "5000 samples" in msg["message"] and "lower compress[1].samples" in msg["message"], js
    assert not (run_dir / "stages").exists()
