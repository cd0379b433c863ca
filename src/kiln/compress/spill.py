"""Float32 buffers kept in files instead of process memory (the layer-wise engine's `low_memory`).

A buffer is a shared mapping of an unlinked file in the stage folder: its pages live in the kernel's
page cache, which can write them to disk under memory pressure, where anonymous memory (there is no
swap on most build machines) cannot go anywhere. `page_out` drops the pages a batch touched from the
process's mapping without losing them (shared file mappings are re-read from the page cache on the
next touch), so the process holds one batch of a buffer at a time. Unlinked at once: nothing is left
behind by a crash, and the disk space goes with the last reference."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import tempfile
import weakref
from pathlib import Path

import torch

from kiln.errors import CompressionError

MADV_DONTNEED = 4  # Linux: on a shared file mapping, unmap the pages; their contents stay in the file


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class Spill:
    """Makes file-backed float32 buffers in `folder` and pages them all out on request. A buffer is
    freed (file and all) with its last tensor: the Spill only watches it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._storages: list[weakref.ref] = []

    @staticmethod
    def available() -> bool:
        """Linux only: elsewhere MADV_DONTNEED on a shared file mapping is not documented to keep
        the data, and the engine recomputes instead (the same numbers)."""
        return sys.platform.startswith("linux") and _madvise() is not None

    def empty(self, numel: int) -> torch.Tensor:
        """The blocks are allocated up front: a full disk is this error, not a SIGBUS on a later write."""
        if numel == 0:
            return torch.empty(0)
        fd = path = None
        try:
            fd, path = tempfile.mkstemp(prefix=".spill-", dir=self.folder)
            os.posix_fallocate(fd, 0, numel * 4)
            t = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a file system that cannot map it
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CompressionError(
                f"low_memory: cannot keep {numel * 4 / 2**20:.0f} MiB of calibration activations in {self.folder}: {reason}",
                hint="free disk space there, or set data.calibration.low_memory: false to keep them in memory") from None
        finally:
            if fd is not None:
                os.close(fd)
            if path is not None:
                os.unlink(path)
        self._storages.append(weakref.ref(t.untyped_storage()))
        return t

    def page_out(self) -> None:
        """Unmap every buffer's resident pages (they stay in the page cache, dirty or not)."""
        madvise = _madvise()
        live = [s for s in (ref() for ref in self._storages) if s is not None]
        self._storages = [weakref.ref(s) for s in live]
        for s in live:
            if s.nbytes() and madvise(s.data_ptr(), s.nbytes(), MADV_DONTNEED) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed on a spill buffer")
