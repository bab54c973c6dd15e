"""Writing files so that a process killed (or a disk filling up) at any moment leaves the old version or the new one
whole, never a mix, and errors that name the file.

The pattern: write under a temporary name beside the target (`<name>.partial`), fsync, rename over the target,
fsync the directory. Each file has one writer at a time (rank 0, the one pipeline driver, the one data job): the
temporary name is fixed so that a leftover from a killed writer is recognised and replaced by the next one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"  # a file being written; renamed to its final name only once complete


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries to disk: a rename or a new file is only durable once its directory is, so a
    power loss after os.replace without this can bring back the old name or lose the new file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming_path(path: str | os.PathLike) -> Iterator[None]:
    """Add `path` to an OSError raised without a file name: Python reports a write that hits a full disk (ENOSPC)
    or the file size limit (EFBIG) as a bare "[Errno 28] No space left on device", which names nothing."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` so that a process killed at any moment leaves the old file or the new one whole:
    the bytes go to a temporary name, reach the disk, and only then are renamed over `path`."""
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with naming_path(partial), open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a file size limit: no half-written temporary file is left behind
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    fsync_directory(path.parent)
