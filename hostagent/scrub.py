"""Scrubbing of residual data (claim C12).

When an instance or a failed operation ends, every regular file it left in
its runtime directory (verified image copies, console log, scratch data) is
overwritten with zeros and fsync'd before it is unlinked, so the blocks do not
keep guest or image data for the next user of the disk. Sockets and other
non-regular files are simply removed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_CHUNK = 1 << 20


def zero_fd(fd: int, length: int) -> None:
    """Overwrite the first ``length`` bytes of an open file with zeros and fsync."""
    zeros = bytes(min(_CHUNK, length))
    offset = 0
    while offset < length:
        offset += os.pwrite(fd, zeros[: min(len(zeros), length - offset)], offset)
    os.fsync(fd)


def scrub_file(path: Path, *, missing_ok: bool = False) -> None:
    """Overwrite a regular file with zeros (same length, fsync), then unlink it.

    A symlink is refused (``OSError``), never followed: scrubbing must not be
    steerable to some other file.  Other links to the same inode see zeros.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        zero_fd(fd, info.st_size)
    finally:
        os.close(fd)
    os.unlink(path)


def scrub_tree(directory: Path) -> None:
    """Scrub every regular file under ``directory``, remove everything else, then the directory."""
    if not directory.exists():
        return
    for root, dirs, files in os.walk(directory, topdown=False):
        base = Path(root)
        for name in files:
            path = base / name
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                scrub_file(path)
            else:
                path.unlink()
        for name in dirs:
            path = base / name
            if path.is_symlink():
                path.unlink()
            else:
                path.rmdir()
    directory.rmdir()
