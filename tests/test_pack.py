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
