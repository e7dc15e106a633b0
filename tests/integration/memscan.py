"""Search a live process's memory, or a directory tree, for secret byte strings (issue 5, claim C8).

Theory of operation.  A process's memory is what ``/proc/PID/maps`` lists; every mapping readable by
the process (``r`` in its permissions) is read through ``/proc/PID/mem`` at its own addresses, in
chunks of at most :data:`CHUNK` bytes so that a 256 MiB guest RAM mapping, or QEMU's 1 GiB TCG code
buffer, never has to be in this process's memory at once.  Consecutive chunks overlap by the longest
needle's length minus one, so a needle that straddles a chunk boundary is still found, exactly once.
Reading an untouched anonymous page maps the shared zero page; it allocates nothing in the target.

What is skipped, and why: ``[vvar]`` (and ``[vvar_vclock]``), the kernel's clock page, which faults
on access from another process; ``[vsyscall]``, a fixed kernel page above the largest file offset
``pread`` accepts; and any chunk whose read raises ``OSError`` (the mapping went away or changed
while it was read, or it is device memory): the scan then continues with the next mapping and counts
the skip, so a caller can see how much was really read in :attr:`ProcessScan.scanned`.

The caller needs the right to read the target's memory: root (CAP_SYS_PTRACE), which also reads a
process that made itself non-dumpable, as the controller does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 16 << 20
_UNREADABLE = frozenset({"[vvar]", "[vvar_vclock]", "[vsyscall]"})


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    perms: str
    name: str

    def __str__(self) -> str:
        return f"{self.start:x}-{self.end:x} {self.perms} {self.name or '(anonymous)'}"


@dataclass
class ProcessScan:
    """What one scan of a process read, and where each needle was found (by needle name)."""

    pid: int
    scanned: int = 0  # bytes read from the target
    mappings: int = 0  # readable mappings looked at
    skipped: list[str] = field(default_factory=list)  # mappings not (fully) read, with the reason
    found: dict[str, list[str]] = field(default_factory=dict)  # needle name -> "mapping +offset"

    def holds(self, name: str) -> bool:
        return bool(self.found.get(name))


def regions(pid: int) -> list[Region]:
    """The mappings of ``pid`` from /proc/PID/maps, in address order."""
    result = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        result.append(Region(start, end, fields[1], fields[5] if len(fields) == 6 else ""))
    return result


def find_in_range(fd: int, start: int, end: int, needles: Mapping[str, bytes], *,
                  chunk: int = CHUNK) -> tuple[int, dict[str, list[int]]]:
    """Search bytes ``[start, end)`` of ``fd`` (read with ``pread``) for each needle.

    Returns the number of bytes read and, per needle name, every offset (from ``start``) where it begins.
    Raises the ``OSError`` of a failed read; a short read ends the range there.
    """
    longest = max(len(needle) for needle in needles.values())
    if chunk < longest:
        raise ValueError("a chunk must hold the longest needle")
    hits: dict[str, list[int]] = {name: [] for name in needles}
    read = 0
    carry = b""  # the last longest-1 bytes of the previous chunk, so that a straddling needle is found
    position = start
    while position < end:
        data = os.pread(fd, min(chunk, end - position), position)
        if not data:
            break
        read += len(data)
        window = carry + data
        base = position - start - len(carry)
        for name, needle in needles.items():
            index = window.find(needle)
            while index != -1:
                # A hit entirely inside the carry was reported with the previous chunk.
                if index + len(needle) > len(carry):
                    hits[name].append(base + index)
                index = window.find(needle, index + 1)
        carry = window[len(window) - (longest - 1):] if longest > 1 else b""
        position += len(data)
    return read, hits


def scan_process(pid: int, needles: Mapping[str, bytes], *, chunk: int = CHUNK) -> ProcessScan:
    """Read every readable mapping of ``pid`` and look for each needle; see the module doc."""
    scan = ProcessScan(pid, found={name: [] for name in needles})
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for mapping in regions(pid):
            if not mapping.perms.startswith("r"):
                continue
            if mapping.name in _UNREADABLE:
                scan.skipped.append(f"{mapping}: kernel page")
                continue
            scan.mappings += 1
            try:
                read, hits = find_in_range(fd, mapping.start, mapping.end, needles, chunk=chunk)
            except OSError as exc:
                scan.skipped.append(f"{mapping}: {exc.strerror}")
                continue
            scan.scanned += read
            if read < mapping.end - mapping.start:
                scan.skipped.append(f"{mapping}: short read after {read} bytes")
            for name, offsets in hits.items():
                scan.found[name] += [f"{mapping} +{offset:#x}" for offset in offsets]
    finally:
        os.close(fd)
    return scan


@dataclass
class FileScan:
    files: int = 0
    scanned: int = 0
    found: list[str] = field(default_factory=list)  # "path: needle name"


def scan_files(roots: Iterable[Path], needles: Mapping[str, bytes]) -> FileScan:
    """Every regular file below each of ``roots`` (not following symbolic links), read whole."""
    scan = FileScan()
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in paths:
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            scan.files += 1
            scan.scanned += len(data)
            scan.found += [f"{path}: {name}" for name, needle in needles.items() if needle in data]
    return scan
