"""Unit tier: our int32 packing is the layout compressed-tensors reads."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from kiln.artifact.pack import pack_int32, unpack_int32


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [32, 40, 96, 576])
def test_pack_matches_compressed_tensors(bits, cols):
    g = torch.Generator().manual_seed(bits * cols)
    codes = torch.randint(0, 2**bits, (6, cols), generator=g)
    ours = pack_int32(codes, bits)
    # compressed-tensors packs signed codes after adding 2^(bits-1): our unsigned codes
    assert torch.equal(ours, pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits))
    assert torch.equal(unpack_int32(ours, bits, cols), codes)
    back = unpack_from_int32(ours, bits, torch.Size([6, cols]))
    assert torch.equal(back.to(torch.int64) + 2 ** (bits - 1), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_along_rows_for_zero_points(bits):
    z = torch.randint(0, 2**bits, (40, 3))
    ours = pack_int32(z, bits, dim=0)
    assert torch.equal(ours, pack_to_int32((z - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=0))
    assert torch.equal(unpack_int32(ours, bits, 40, dim=0), z)


def test_streamed_shards_read_back_with_safetensors(tmp_path):
    import json

    from safetensors.torch import load_file

    from kiln.artifact import _ShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g), "b.half": torch.randn(3, generator=g).half(),
               "c.packed": torch.randint(-2**31, 2**31 - 1, (4, 3), dtype=torch.int32, generator=g),
               "d.codes": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g)}
    w = _ShardWriter(tmp_path, shard_bytes=150)
    for k, v in tensors.items():
        w.add(k, v)
    w.add("a.weight", torch.zeros(1))  # a second name of a tied tensor is not written twice
    w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) >= 2
    back = {}
    for f in set(index["weight_map"].values()):
        back.update(load_file(tmp_path / f))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob(".shard-*"))


def test_large_tensors_stream_from_the_store_in_row_blocks(tmp_path):
    """A dense tensor goes from the source file to the artifact in row blocks (an embedding is never
    in memory whole): the bytes are those of converting the whole tensor at once."""
    from safetensors.torch import load_file, save_file

    from kiln.artifact import _ShardWriter
    from kiln.model import WeightStore

    g = torch.Generator().manual_seed(0)
    src = {"emb.weight": torch.randn(37, 6, generator=g), "norm.weight": torch.randn(6, generator=g),
           "ids": torch.arange(5), "scalar": torch.tensor(3.0)}
    save_file(src, str(tmp_path / "model.safetensors"))
    store = WeightStore(tmp_path)
    shape, dtype, blocks = store.dense_rows("emb.weight", max_bytes=10 * 6 * 4)  # 10 rows a block
    blocks = list(blocks)
    assert shape == [37, 6] and dtype == torch.float32 and [len(b) for b in blocks] == [10, 10, 10, 7]
    assert store.dense_rows("scalar") is None  # 0-d: read whole

    out = tmp_path / "out"
    out.mkdir()
    w = _ShardWriter(out)
    w.add_rows("emb.weight", shape, torch.float16, iter(blocks))
    w.add_rows("ids", [5], torch.int64, store.dense_rows("ids")[2])
    w.finish()
    back = load_file(out / "model.safetensors")
    assert torch.equal(back["emb.weight"], src["emb.weight"].half()) and torch.equal(back["ids"], src["ids"])
    with pytest.raises(ValueError, match="bytes written for shape"):  # blocks that do not add up
        _ShardWriter(out).add_rows("x", [4, 6], torch.float16, [torch.zeros(3, 6)])


def test_float16_artifact_keeps_vectors_in_float32(tmp_path):
    """A float16 artifact stores matrices in float16 and vectors (norm weights, biases) in float32,
    and the store rounded to float16, which kiln evaluates and compiles, reads them as stored. A
    Gemma norm smoothed to w ≈ −1 (it scales by 1 + w) keeps its 1 + w; float16 would not."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kiln.artifact import build_checkpoint
    from kiln.model import WeightStore
    from kiln.recipe import OutputFormat

    g = torch.Generator().manual_seed(0)
    norm = -1.0 + torch.linspace(1e-3, 2e-2, 6)  # 1 + w from 0.001 to 0.02
    src = {"emb.weight": torch.randn(37, 6, generator=g), "norm.weight": norm, "proj.bias": torch.randn(6, generator=g)}
    save_file(src, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    store = WeightStore(tmp_path).rounded(torch.float16)
    assert torch.equal(store.get("norm.weight"), norm)
    assert torch.equal(store.get("emb.weight"), src["emb.weight"].half().float())
    assert float(((1 + norm.half().float()) / (1 + norm) - 1).abs().max()) > 0.01  # what float16 would do to 1 + w

    out = tmp_path / "artifact"
    out.mkdir()
    build_checkpoint(out, tmp_path, store, {}, OutputFormat.compressed_tensors, torch.float16, {})
    with safe_open(out / "model.safetensors", "pt") as h:
        stored = {k: h.get_tensor(k) for k in h.keys()}
    assert {k: t.dtype for k, t in stored.items()} == {
        "emb.weight": torch.float16, "norm.weight": torch.float32, "proj.bias": torch.float32}
    assert torch.equal(stored["norm.weight"], norm) and torch.equal(stored["emb.weight"].float(), store.get("emb.weight"))


# --- the artifact folder: what kiln replaces, what verify trusts --------------------------------


@pytest.fixture(scope="module")
def built_run(tiny_models, tmp_path_factory):
    """One finished run (stages cached, artifact written) under umask 022, and its recipe."""
    import os

    from conftest import gptq_recipe, run_json, write_recipe

    tmp = tmp_path_factory.mktemp("artifact-run")
    r = gptq_recipe(tiny_models("llama"))
    r["evaluate"] = None
    recipe = write_recipe(tmp / "r.yaml", r)
    mask = os.umask(0o022)
    try:
        run_json("run", str(recipe), "--out", str(tmp / "run"), "-q")
    finally:
        os.umask(mask)
    return tmp / "run", recipe


def _copy_run(built_run, tmp_path):
    import shutil

    run, recipe = built_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", recipe


def test_run_never_replaces_an_artifact_folder_kiln_did_not_write(built_run, tmp_path):
    from conftest import run_cli

    _, recipe = built_run
    foreign = tmp_path / "u" / "artifact"
    foreign.mkdir(parents=True)
    (foreign / "thesis.txt").write_text("precious")
    code, _, err = run_cli("run", str(recipe), "--out", str(tmp_path / "u"), "-q")
    assert code == 7 and "holds files but no kiln manifest.json" in err and "another --out" in err, err
    assert (foreign / "thesis.txt").read_text() == "precious"
    # a kiln artifact with a file of the user's added is refused too, naming the file
    run, _ = _copy_run(built_run, tmp_path)
    (run / "artifact" / "notes.txt").write_text("mine")
    code, _, err = run_cli("run", str(recipe), "--out", str(run), "-q")
    assert code == 7 and "kiln did not write: notes.txt" in err, err
    assert (run / "artifact" / "notes.txt").exists()


def test_commit_refuses_a_foreign_folder_that_appeared_during_the_run(tmp_path):
    from kiln.artifact import commit
    from kiln.errors import ArtifactError

    tmp, target = tmp_path / ".artifact.tmp-x", tmp_path / "artifact"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    target.mkdir()
    (target / "thesis.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not written, so as not to delete it"):
        commit(tmp, target, {"schema_version": 2, "kiln_version": "0", "status": "accepted"})
    assert (target / "thesis.txt").read_text() == "precious" and sorted(p.name for p in target.iterdir()) == ["thesis.txt"]


def test_an_edited_manifest_fails_verification_everywhere(built_run, tmp_path):
    import json

    from conftest import run_cli

    from kiln.artifact import load_model
    from kiln.errors import ArtifactError

    run, _ = _copy_run(built_run, tmp_path)
    art = run / "artifact"
    m = json.loads((art / "manifest.json").read_text())
    assert m["schema_version"] == 2 and m["content_sha256"]
    m["recipe_name"] = "renamed"
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    for cmd in (["verify", str(art)], ["inspect", str(art)], ["compare", str(art)],
                ["publish", str(art), "--to", "oci://127.0.0.1:9/kiln/x:v1"]):
        code, _, err = run_cli(*cmd)
        assert code == 7 and "edited after kiln wrote it" in err, (cmd, err)
    with pytest.raises(ArtifactError, match="edited after kiln wrote it"):
        load_model(art)
    # a manifest from before schema 2 (no content digest) still verifies, and says it is unprotected
    del m["content_sha256"]
    m["schema_version"], m["recipe_name"] = 1, "test-gptq"
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    code, out, _ = run_cli("verify", str(art))
    assert code == 0 and "has no content_sha256" in out
    code, out, _ = run_cli("verify", str(art), "--json")
    assert code == 0 and json.loads(out)["manifest_protected"] is False


@pytest.mark.parametrize("content,needle", [
    ("[]", "the top level is a JSON list, not an object"),
    ('{"schema_version": 2, "kiln_version": "0", "status": "accepted", "files": {"config.json": "abc"}}',
     "files ['config.json'] have no sha256 string"),
    ('{"schema_version": 2, "files": {}}', "no 'kiln_version' key; no 'status' key"),
    ('{"schema_version": 2, "kiln_version": "0", "status": "accepted", "files": []}', "'files' is a JSON list"),
])
def test_a_malformed_manifest_is_named_not_a_traceback(content, needle, tmp_path):
    from conftest import run_cli

    (tmp_path / "manifest.json").write_text(content)
    for cmd in ("verify", "inspect", "compare"):
        code, _, err = run_cli(cmd, str(tmp_path))
        assert code == 7 and f"{tmp_path / 'manifest.json'}: not a kiln manifest" in err and needle in err, err


def test_rerun_rebuilds_a_tampered_artifact_and_clears_stale_folders(built_run, tmp_path):
    from conftest import run_cli

    run, recipe = _copy_run(built_run, tmp_path)
    weights = run / "artifact" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    stale = run / ".artifact.old-k1ln0000" / "a"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("left by a run killed between commit's renames")
    code, _, err = run_cli("run", str(recipe), "--out", str(run))
    assert code == 0, err
    assert "sha256 mismatch: model.safetensors; rebuilding it from the cached stages" in " ".join(err.split())
    assert run_cli("verify", str(run / "artifact"))[0] == 0
    assert not (run / ".artifact.old-k1ln0000").exists()


def test_artifact_folders_are_readable_under_the_umask(built_run):
    import stat

    art = built_run[0] / "artifact"
    for p in [art, *art.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_compare_verifies_digests_and_inspect_names_a_missing_path(built_run, tmp_path):
    from conftest import run_cli

    run, _ = _copy_run(built_run, tmp_path)
    with open(run / "artifact" / "config.json", "a") as f:
        f.write(" ")
    code, _, err = run_cli("compare", str(built_run[0] / "artifact"), str(run / "artifact"))
    assert code == 7 and "sha256 mismatch: config.json" in err
    code, _, err = run_cli("inspect", str(tmp_path / "no" / "such"))
    assert code == 4 and "no such folder" in err


def test_only_the_top_level_manifest_is_exempt_from_the_digests(built_run, tmp_path):
    from conftest import run_cli

    from kiln.artifact.manifest import file_digests

    run, _ = _copy_run(built_run, tmp_path)
    art = run / "artifact"
    (art / "serving" / "manifest.json").write_text('{"added": "after kiln wrote the artifact"}')
    code, _, err = run_cli("verify", str(art))
    assert code == 7 and "not in manifest: serving/manifest.json" in err, err
    code, _, err = run_cli("publish", str(art), "--to", "oci://127.0.0.1:9/kiln/x:v1")
    assert code == 7 and "not in manifest: serving/manifest.json" in err, err
    assert "serving/manifest.json" in file_digests(art) and "manifest.json" not in file_digests(art)


def test_rerun_over_an_unreadable_manifest_says_so_and_how_to_proceed(built_run, tmp_path):
    import shutil

    from conftest import run_cli

    run, recipe = _copy_run(built_run, tmp_path)
    manifest = run / "artifact" / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    code, _, err = run_cli("run", str(recipe), "--out", str(run), "-q")
    err = " ".join(err.split())
    assert code == 7 and "holds a manifest.json kiln cannot read (not valid JSON" in err, err
    assert "no kiln manifest.json" not in err and "delete the folder: it is rebuilt from the cached stages" in err, err
    assert (run / "artifact" / "model.safetensors").exists()
    shutil.rmtree(run / "artifact")
    code, _, err = run_cli("run", str(recipe), "--out", str(run), "-q")
    assert code == 0 and run_cli("verify", str(run / "artifact"))[0] == 0, err
