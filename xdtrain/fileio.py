"""Atomic file writes: a reader sees either the old file or the complete new one."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

# mkstemp creates files readable by their owner only; finished files get the usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, data: bytes | str, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and rename it.

    ``fsync`` also makes the file survive a power cut, not only a killed process; it costs a
    disk flush per file, which bulk writers that rename a whole folder at the end can skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@functools.cache
def _sync_file_range():
    """libc's ``sync_file_range`` on Linux, else None; looked up on first use (``ctypes``
    costs milliseconds to import, which every command would otherwise pay)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE_WRITE = 2  # start writing back dirty pages of the range; do not wait


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk now,
    without waiting for it; False where the system cannot (the data is still written back
    later, and an ``fsync`` still waits for all of it).

    A writer that will ``fsync`` a large file calls this as it goes, so that the disk works
    while the file is written and the final ``fsync`` only waits for the last part.
    """
    function = _sync_file_range()
    return function is not None and function(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0
