"""A size-bounded log file for a guest's serial console, and a follower that reads it.

Theory of operation
-------------------
The guest is untrusted (DESIGN.md, trust zones) and may write to its serial port as fast as it
likes, for as long as it runs. QEMU does not write the log itself: the console is a socket the agent
listens on (see ``qemu_cmdline``), and the agent appends what it reads to a :class:`BoundedLog`.
So the agent, not the guest, decides how much disk the console costs.

Invariants of a :class:`BoundedLog` with capacity ``cap``:

1. the file never holds more than ``cap`` bytes after a :meth:`BoundedLog.write` returns;
2. it holds the *newest* bytes written: when a write would pass ``cap``, the oldest bytes are
   dropped, down to about half the capacity (so trimming costs amortized O(1) per byte written)
   and up to the next line end (so no line is kept without its beginning, and the remains of a
   cut line cannot pass for a protocol line);
3. trimming replaces the file atomically (a new inode renamed over the old one), so a reader sees
   either the old or the new content, never a mix;
4. the file is created with mode 0600, never follows a symlink, and is reopened in append mode by a
   restarted agent (live update, C10), which carries on from its current size.

A :class:`LogFollower` reads the lines appended since its last poll. It notices a trim and starts
again at the beginning of the new file, so a poller may see a line twice across a trim but never
half a line. Inode numbers are reused (the trimmed-away inode is free for the next trim's file), so
a trim is recognized by content: the bytes just before the follower's offset must still be the
ones it read there last time.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DEFAULT_CONSOLE_CAP = 1 << 20  # 1 MiB: hours of a chatty boot, a trivial cost per instance
MIN_CAP = 4096
# A follower never buffers more than this much of an unterminated line: a guest that prints no
# newline for a megabyte is not speaking the console protocol, and its bytes are dropped.
MAX_LINE_BYTES = 64 * 1024

_CONTINUITY_BYTES = 256
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


class BoundedLog:
    """An append-only file that keeps at most ``cap`` of the newest bytes written to it."""

    def __init__(self, path: Path, cap: int = DEFAULT_CONSOLE_CAP) -> None:
        if cap < MIN_CAP:
            raise ValueError(f"cap must be at least {MIN_CAP} bytes")
        self.path = path
        self.cap = cap
        self._fd = os.open(path, _OPEN_FLAGS, 0o600)
        self._size = os.fstat(self._fd).st_size
        self.bytes_dropped = 0
        if self._size > cap:  # a previous agent died mid-trim, or a smaller cap now
            self._trim(0)

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            raise ValueError("write to a closed BoundedLog")
        if not data:
            return
        if len(data) > self.cap // 2:
            # More than a trim keeps: keep the write's tail from a line start, and nothing older
            # (older bytes kept beside a cut write would not be a suffix of the output any more).
            tail = data[-(self.cap // 2) :]
            newline = tail.find(b"\n")
            tail = tail[newline + 1 :] if newline >= 0 else b""
            self.bytes_dropped += len(data) - len(tail)
            if self._size:
                self._trim(self.cap)
            data = tail
        if self._size + len(data) > self.cap:
            self._trim(len(data))
        _write_all(self._fd, data)
        self._size += len(data)

    def _trim(self, incoming: int) -> None:
        """Keep the newest bytes: at most half the capacity, less ``incoming``, from a line start."""
        keep = max(0, self.cap // 2 - incoming)
        start = max(0, self._size - keep)
        # self._fd is write-only and O_APPEND (and Linux appends even a pwrite on such a descriptor),
        # so the old inode is read and zeroed through a second descriptor on the same path; only
        # this object renames over that path.
        old = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            tail = os.pread(old, keep, start) if keep else b""
            if start > 0:
                newline = tail.find(b"\n")
                tail = tail[newline + 1 :] if newline >= 0 else b""
            tmp = self.path.with_name(f".{self.path.name}.trim")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, tail)
            finally:
                os.close(fd)
            # The old inode still holds the dropped bytes: overwrite them before letting it go (C12).
            _zero_fd(old, os.fstat(old).st_size)
            os.fsync(old)
        finally:
            os.close(old)
        os.replace(tmp, self.path)
        self.bytes_dropped += self._size - len(tail)
        os.close(self._fd)
        self._fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        self._size = len(tail)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _zero_fd(fd: int, size: int) -> None:
    """Overwrite ``size`` bytes from offset 0 with zeros, with pwrite (the fd may be O_APPEND)."""
    zeros = bytes(min(size, 1 << 20))
    offset = 0
    while offset < size:
        n = os.pwrite(fd, zeros[: size - offset], offset)
        offset += n


class LogFollower:
    """Reads the complete lines appended to a :class:`BoundedLog` file since the previous poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._seen = b""  # the last bytes read, which end at self._offset

    def poll(self) -> list[bytes]:
        """New complete lines (without their line end); [] when there is nothing new or no file yet."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            st = os.fstat(fd)
            if (
                st.st_ino != self._inode
                or st.st_size < self._offset
                or os.pread(fd, len(self._seen), self._offset - len(self._seen)) != self._seen
            ):
                self._inode, self._offset, self._partial, self._seen = st.st_ino, 0, b"", b""
            chunk = os.pread(fd, max(0, st.st_size - self._offset), self._offset)
        finally:
            os.close(fd)
        self._offset += len(chunk)
        self._seen = (self._seen + chunk)[-_CONTINUITY_BYTES:]
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        if len(self._partial) > MAX_LINE_BYTES:
            self._partial = b""
        return [line.rstrip(b"\r") for line in lines]
