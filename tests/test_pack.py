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
