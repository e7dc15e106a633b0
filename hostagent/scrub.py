"""Scrubbing of residual data (claim C12).

When an instance or a failed operation ends, every regular file it left
(verified image copies, console log, scratch data) is overwritten with zeros
and fsync'd before its name goes away, so the blocks do not keep guest or
image data for the next user of the disk.  One module serves the service
layer, the backends and the image store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

_ZERO_CHUNK = 1 << 20


def zero_file(fd: int) -> None:
    """Overwrite every data byte of the regular file open for writing on ``fd`` with zeros, then fsync.

    Holes of a sparse file hold no data and are skipped (SEEK_DATA/SEEK_HOLE), so a large, mostly
    empty scratch disk costs only its written blocks.
    """
    size = os.fstat(fd).st_size
    zeros = bytes(_ZERO_CHUNK)
    for start, end in _data_extents(fd, size):
        offset = start
        while offset < end:
            offset += os.pwrite(fd, zeros[: min(_ZERO_CHUNK, end - offset)], offset)
    os.fsync(fd)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset: the rest is a hole
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            offset = end
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)]  # the file system cannot tell holes apart: zero everything
    return extents


def scrub_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, overwriting regular files with zeros first (C12).

    - Symbolic links are removed, never followed: a link planted in a runtime directory cannot
      make the scrub zero a file elsewhere.
    - A regular file with other hard links is unlinked but not zeroed: its data is still someone
      else's file (an image, a volume), and zeroing it would destroy that, not scrub residue.
    - Sockets, FIFOs and device nodes are unlinked (opening a FIFO or a device could block or act).
    - Idempotent: a missing ``path`` (already scrubbed, maybe by the other layer) is not an error.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as entries:
            children = [Path(entry.path) for entry in entries]
        for child in children:
            scrub_tree(child)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)
        return
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_ino == st.st_ino:  # still the file we looked at
                zero_file(fd)
        finally:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def scrub_file(path: Path, *, missing_ok: bool = False) -> None:
    """Overwrite one regular file this process created with zeros, fsync, then unlink it.

    Stricter than :func:`scrub_tree` about what it is given: a symlink or any
    other kind of file is refused (``OSError``), never followed or opened
    for long.  Other hard links to the same inode see the zeros.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        zero_file(fd)
    finally:
        os.close(fd)
    os.unlink(path)
