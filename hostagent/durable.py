"""Durability of directory entries, shared by every component that writes state.

A file's data is made durable by fsync on the file; the *name* that points to
it (a create, a rename, a hard link, an unlink) is made durable only by fsync
on the directory that holds it.  Every writer of state in this project (the
agent's journal and image store, the controller's host keys, encrypted-volume
attachments and volume files) calls :func:`fsync_directory` after changing a
directory, so that a crash never leaves a name pointing to nothing or a file
without its name.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (creates, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
