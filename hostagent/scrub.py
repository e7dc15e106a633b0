"""Scrubbing of residual data (claim C12).

When an instance or a failed operation ends, every regular file it left in
its runtime directory (verified image copies, console log, scratch data) is
overwritten with zeros and fsync'd before it is unlinked, so the blocks do not
keep guest or image data for the next user of the disk. Sockets and other
non-regular files are simply removed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_CHUNK = 1 << 20


def scrub_file(path: Path) -> None:
    """Overwrite a regular file with zeros, fsync, then unlink it."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(min(size, _CHUNK))
        written = 0
        while written < size:
            written += os.write(fd, zeros[: size - written])
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


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
