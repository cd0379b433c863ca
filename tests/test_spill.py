"""The engine's file-backed buffers (low_memory): contents survive page-outs, pages leave the process."""

from __future__ import annotations

import pytest
import torch

from kiln.compress.spill import Spill

pytestmark = pytest.mark.skipif(not Spill.available(), reason="needs Linux shared mappings and madvise")


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_spill_buffer_keeps_its_contents_and_leaves_the_process_when_paged_out(tmp_path):
    spill = Spill(tmp_path)
    n = 16 * 2**20 // 4  # 16 MiB of float32
    t = spill.empty(n)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing to clean up after a crash
    before = _rss_file_kib()
    t.normal_(generator=torch.Generator().manual_seed(0))
    ref = t.clone()
    touched = _rss_file_kib()
    assert touched - before > 12 * 1024  # its pages are in the process once written
    spill.page_out()
    assert touched - _rss_file_kib() > 12 * 1024  # and gone from it after the page-out
    assert torch.equal(t, ref)  # read back from the page cache, unchanged
    spill.page_out()
    views = t[: n // 2].view(-1, 1024)
    del t, ref
    spill.page_out()  # a buffer still held through a view stays watched
    assert len(spill._storages) == 1 and views.sum().isfinite()
    del views
    spill.page_out()
    assert spill._storages == []  # freed with its last tensor


def test_a_spill_that_cannot_reserve_its_blocks_names_the_folder_and_what_to_do(tmp_path, full_disk):
    from kiln.errors import CompressionError

    with pytest.raises(CompressionError, match=r"cannot keep 64 MiB .* in .*: No space left on device") as err:
        Spill(tmp_path).empty(16 * 2**20)
    assert "low_memory: false" in err.value.hint
    assert list(tmp_path.iterdir()) == []
