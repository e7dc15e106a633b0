"""Build the tiny development guest: a Debian cloud kernel and a busybox initramfs.

Theory of operation
-------------------
The end-to-end tests boot a real guest under QEMU (TCG) and watch, on its serial console, what the
host agent did to it (issue 3, section 10). The guest is built from two Debian packages fetched with
``apt-get download``: the kernel named by the ``linux-image-cloud-amd64`` meta-package and
``busybox-static``. Nothing else is downloaded and nothing is compiled.

The initramfs is a gzip-compressed cpio archive in the "newc" format, written here rather than by
the ``cpio`` tool so that its bytes depend only on its inputs: entries are sorted by name, owned by
0:0, stamped with mtime 0 and numbered in order; gzip's own timestamp is 0 as well. It holds
busybox, ``/init`` (``guest_init.sh`` in this package, which documents the console protocol that
:func:`parse_console_line` reads), ``/dev/console`` (the kernel opens it for init before any
devtmpfs is mounted) and the kernel modules of :data:`MODULE_LOAD_ORDER`, decompressed because
busybox ``insmod`` does not decompress.

The guest has modes (:class:`GuestMode`): what it does with each disk that appears. The default,
``MARKER``, finds or writes a marker in the disk's first sector, so that a test can see what reaches
a volume's backing file; ``BENCH`` times sequential I/O on it instead. A mode other than the default
adds ``/etc/passivisor-guest-mode`` (and ``/etc/passivisor-bench-mib``) to the initramfs and is
built and cached on its own, in ``<cache>/variants/<mode>-<MiB>/``, with the layout below; building
one mode never evicts another.

Cache invariants
----------------
- ``<cache>/guest.json`` is the commit point. It is written last, by an atomic rename, and names a
  build directory ``<cache>/builds/<id>/`` plus the SHA-256 digests of its kernel and initramfs.
  A build interrupted at any point therefore leaves either the previous marker or none, never a
  marker that names half an image; its temporary ``.build-*`` directory is removed by the next build.
- A cached build is used only if the marker's recipe digest (this module's format, the init script,
  the module list and the mode) matches the current one and both files still hash to the recorded
  digests.
  Using a cached build touches no network.
- One build runs at a time per cache directory (an ``flock`` on ``<cache>/.lock``).

The digests are what the host signs and verifies (claim C14); building does not sign anything.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import gzip
import hashlib
import importlib.resources
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: virtio is modular in Debian's cloud kernel; this order satisfies each module's ``depends=``
#: (DESIGN.md, "Environment facts"). The build re-checks it against the modules it ships.
VIRTIO_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_rng",
)
#: The ACPI power button reaches user space only through these two modules (both are ``=m`` in the
#: cloud kernel). Without them a QMP ``system_powerdown`` is ignored and every stop is forced.
POWER_BUTTON_MODULES: tuple[str, ...] = ("evdev", "button")
MODULE_LOAD_ORDER: tuple[str, ...] = VIRTIO_MODULES + POWER_BUTTON_MODULES

#: Kernel command line for the guest. console=ttyS0: the console protocol is on the first serial
#: port. panic=-1: a dead /init reboots at once, which QEMU run with -no-reboot turns into an exit
#: instead of a hang. quiet: only kernel errors and worse reach the console, so kernel messages
#: rarely split a protocol line.
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet"

MARKER_NAME = "guest.json"
VARIANTS_DIR = "variants"
_FORMAT = 1
_INIT_RESOURCE = "guest_init.sh"
_SUBPROCESS_TIMEOUT_S = 900
_MODULE_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


class GuestBuildError(Exception):
    """The guest could not be built; the message says which step failed and why."""


class GuestMode(enum.Enum):
    """What the guest does with each virtio disk that appears (guest_init.sh, "Disks")."""

    MARKER = "marker"  # find the marker in sector 0, or write one and read it back (the default)
    BENCH = "bench"  # time a sequential direct-I/O write pass, then a read pass, over the disk


#: The size of each bench pass unless ``bench_mib`` says otherwise; guest_init.sh has the same
#: default (a test keeps the two equal). TCG emulates the guest's instructions, not its I/O: QEMU
#: moves virtio data natively. Measured with this guest through the agent, a raw volume on this
#: machine kind takes 2.4 to 3 s to write 1 GiB and 0.25 s to read it back (from the host's page
#: cache); 32 MiB took 5 and 2 centiseconds, too few for the clock. Reads fast enough to last over a
#: second would need several GiB written per run; at 1 GiB a centisecond is 4 % of the read pass.
DEFAULT_BENCH_MIB = 1024
#: guest_init.sh accepts at most five digits in /etc/passivisor-bench-mib.
MAX_BENCH_MIB = 99_999


@dataclass(frozen=True)
class _Variant:
    """A mode with its parameters: the part of the recipe that is not the packages."""

    mode: GuestMode
    bench_mib: int | None

    @staticmethod
    def of(mode: GuestMode, bench_mib: int | None) -> _Variant:
        if not isinstance(mode, GuestMode):
            raise TypeError(f"mode must be a GuestMode, not {mode!r}")
        if mode is not GuestMode.BENCH:
            if bench_mib is not None:
                raise ValueError("bench_mib applies to GuestMode.BENCH only")
            return _Variant(mode, None)
        mib = DEFAULT_BENCH_MIB if bench_mib is None else bench_mib
        if isinstance(mib, bool) or not isinstance(mib, int) or not 1 <= mib <= MAX_BENCH_MIB:
            raise ValueError(f"bench_mib must be an integer from 1 to {MAX_BENCH_MIB}, not {bench_mib!r}")
        return _Variant(mode, mib)

    def cache_dir(self, base: Path) -> Path:
        if self.mode is GuestMode.MARKER:
            return base
        return base / VARIANTS_DIR / f"{self.mode.value}-{self.bench_mib}"

    def files(self) -> list[CpioEntry]:
        """The initramfs members that select this mode; the default mode needs none."""
        if self.mode is GuestMode.MARKER:
            return []
        return [
            CpioEntry.file("etc/passivisor-guest-mode", f"{self.mode.value}\n".encode()),
            CpioEntry.file("etc/passivisor-bench-mib", f"{self.bench_mib}\n".encode()),
        ]


@dataclass(frozen=True)
class GuestImage:
    """A complete guest build: the files QEMU boots and the digests the host signs and verifies."""

    kernel: Path
    initramfs: Path
    kernel_sha256: str
    initramfs_sha256: str
    kernel_package: str
    kernel_version: str
    cmdline: str = KERNEL_CMDLINE
    mode: GuestMode = GuestMode.MARKER
    bench_mib: int | None = None

    def to_json(self) -> dict[str, str | int | None]:
        return {
            "kernel": str(self.kernel),
            "kernel_sha256": self.kernel_sha256,
            "initramfs": str(self.initramfs),
            "initramfs_sha256": self.initramfs_sha256,
            "kernel_package": self.kernel_package,
            "kernel_version": self.kernel_version,
            "cmdline": self.cmdline,
            "mode": self.mode.value,
            "bench_mib": self.bench_mib,
        }


# --------------------------------------------------------------------------------------------
# The console protocol (its definition is the header of guest_init.sh)
# --------------------------------------------------------------------------------------------


class GuestSignal(enum.Enum):
    READY = "PASSIVISOR-GUEST-READY"
    RNG = "PASSIVISOR-RNG"
    DISKS = "PASSIVISOR-DISKS"
    DISK_MARKER = "PASSIVISOR-DISK-MARKER"
    DISK_WROTE = "PASSIVISOR-DISK-WROTE"
    DISK_BENCH = "PASSIVISOR-DISK-BENCH"
    POWEROFF = "PASSIVISOR-POWEROFF"
    ERROR = "PASSIVISOR-ERROR"


@dataclass(frozen=True)
class GuestConsoleLine:
    signal: GuestSignal
    words: tuple[str, ...]


@dataclass(frozen=True)
class DiskTokenLine(GuestConsoleLine):
    """DISK_MARKER (the disk came with a marker) or DISK_WROTE (the guest wrote one and read it back)."""

    device: str
    token: str


@dataclass(frozen=True)
class DiskBenchLine(GuestConsoleLine):
    """DISK_BENCH: one sequential direct-I/O write pass and one read pass, timed inside the guest."""

    device: str
    write_bytes: int
    write_centiseconds: int
    read_bytes: int
    read_centiseconds: int

    @property
    def write_bytes_per_s(self) -> float | None:
        """None when the pass took less than the clock's resolution (a centisecond)."""
        return self.write_bytes * 100 / self.write_centiseconds if self.write_centiseconds else None

    @property
    def read_bytes_per_s(self) -> float | None:
        return self.read_bytes * 100 / self.read_centiseconds if self.read_centiseconds else None


#: The first bytes of a disk that carries a marker: ``MARKER_PREFIX + token + b"\n"``, then anything.
MARKER_PREFIX = b"PASSIVISOR-MARKER "
SECTOR_SIZE = 512
_SIGNALS = {s.value: s for s in GuestSignal}
_DEVICE = re.compile(r"vd[a-z]{1,3}")
_TOKEN = re.compile(r"[A-Za-z0-9-]{8,64}")
# A count the guest computed with shell arithmetic (64-bit): 18 digits cannot overflow it.
_COUNT = re.compile(r"[0-9]{1,18}")


def marker_sector(token: str) -> bytes:
    """The sector 0 the guest writes to a disk without a marker (guest_init.sh, "Marker mode")."""
    if _TOKEN.fullmatch(token) is None:
        raise ValueError(f"not a marker token: {token!r}")
    return (MARKER_PREFIX + token.encode() + b"\n").ljust(SECTOR_SIZE, b"\0")


def _typed(signal: GuestSignal, words: tuple[str, ...]) -> GuestConsoleLine | None:
    """The typed form of a line whose arguments have a grammar; None if they break it."""
    if signal in (GuestSignal.DISK_MARKER, GuestSignal.DISK_WROTE):
        if len(words) != 2 or _DEVICE.fullmatch(words[0]) is None or _TOKEN.fullmatch(words[1]) is None:
            return None
        return DiskTokenLine(signal, words, words[0], words[1])
    if signal is GuestSignal.DISK_BENCH:
        if len(words) != 7 or _DEVICE.fullmatch(words[0]) is None or (words[1], words[4]) != ("write", "read"):
            return None
        counts = (words[2], words[3], words[5], words[6])
        if not all(_COUNT.fullmatch(c) for c in counts):
            return None
        write_bytes, write_cs, read_bytes, read_cs = (int(c) for c in counts)
        return DiskBenchLine(signal, words, words[0], write_bytes, write_cs, read_bytes, read_cs)
    return GuestConsoleLine(signal, words)


def parse_console_line(line: str) -> GuestConsoleLine | None:
    """Read one serial-console line; None for anything that is not a protocol line.

    The guest is untrusted and kernel messages may share the port, so only a line that starts with
    a known keyword (after the tty's CR is stripped) counts; everything else is ignored. The disk
    lines have a grammar (guest_init.sh): they come back as :class:`DiskTokenLine` or
    :class:`DiskBenchLine`, and one that breaks its grammar (a line cut short or spliced with a
    kernel message, a token outside ``[A-Za-z0-9-]{8,64}``) is not a protocol line either. The
    other lines are :class:`GuestConsoleLine` with their words as they came. Never raises.
    """
    head, _, rest = line.strip("\r\n").partition(" ")
    signal = _SIGNALS.get(head)
    if signal is None:
        return None
    return _typed(signal, tuple(rest.split()))


# --------------------------------------------------------------------------------------------
# newc cpio writer
# --------------------------------------------------------------------------------------------

_NEWC_MAGIC = b"070701"
_NEWC_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``data`` is the file content, or the target of a symlink."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @staticmethod
    def directory(name: str) -> CpioEntry:
        return CpioEntry(name, stat.S_IFDIR | 0o755)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return CpioEntry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> CpioEntry:
        return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return CpioEntry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_member(ino: int, entry: CpioEntry) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime: fixed, for reproducible archives
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check: unused by "070701"
    )
    header = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + name + _pad4(len(header) + len(name)) + entry.data + _pad4(len(entry.data))


def newc_archive(entries: Sequence[CpioEntry]) -> bytes:
    """Serialize ``entries`` as a newc cpio archive whose bytes depend only on the entries' content.

    Entries are written sorted by name, so a directory always precedes its contents (a parent's
    name is a prefix of its children's); the kernel's initramfs unpacker creates nothing implicitly.
    Missing parent directories are added. Names are relative ("bin/sh"), as the kernel expects.
    """
    by_name: dict[str, CpioEntry] = {}
    for entry in entries:
        name = entry.name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad archive member name {entry.name!r}")
        if name in by_name:
            raise ValueError(f"duplicate archive member {name!r}")
        by_name[name] = CpioEntry(name, entry.mode, entry.data, entry.rdev)
    for name in list(by_name):
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = by_name.setdefault(parent, CpioEntry.directory(parent))
            if not stat.S_ISDIR(existing.mode):
                raise ValueError(f"{parent!r} is both a directory and a non-directory")
    out = [_newc_member(ino, by_name[name]) for ino, name in enumerate(sorted(by_name), start=1)]
    out.append(_newc_member(0, CpioEntry(_NEWC_TRAILER, 0)))
    return b"".join(out)


def gzip_deterministic(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def initramfs_entries(
    busybox: bytes, init: bytes, modules: Sequence[tuple[str, bytes]], extra: Sequence[CpioEntry] = ()
) -> list[CpioEntry]:
    """The members of the guest's initramfs; ``modules`` are (name, uncompressed .ko) in load order.

    ``extra`` are further members, such as the files that select a mode (:class:`GuestMode`).
    """
    entries = [
        *extra,
        CpioEntry.file("init", init, 0o755),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.directory("proc"),
        CpioEntry.directory("sys"),
        CpioEntry.directory("tmp"),
        CpioEntry.directory("lib/modules"),
    ]
    # The numeric prefix is the load order: /init loads /lib/modules/*.ko in glob (sorted) order.
    entries += [CpioEntry.file(f"lib/modules/{i:02d}-{name}.ko", ko) for i, (name, ko) in enumerate(modules, 1)]
    return entries


# --------------------------------------------------------------------------------------------
# Kernel modules
# --------------------------------------------------------------------------------------------


def module_name(filename: str) -> str | None:
    """``virtio-rng.ko.xz`` -> ``virtio_rng`` (the kernel treats - and _ alike); None if not a module."""
    match = _MODULE_SUFFIX.search(filename)
    if match is None:
        return None
    return filename[: match.start()].replace("-", "_")


def find_modules(modules_dir: Path, names: Sequence[str]) -> list[tuple[str, Path]]:
    """Locate each module of ``names`` under ``modules_dir`` (``.../lib/modules/<release>``)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(modules_dir.rglob("*.ko*")):
        name = module_name(path.name)
        if name is not None and name in names:
            found.setdefault(name, []).append(path)
    result = []
    for name in names:
        paths = found.get(name, [])
        if len(paths) != 1:
            what = "missing" if not paths else f"ambiguous ({', '.join(str(p) for p in paths)})"
            raise GuestBuildError(f"kernel module {name} is {what} under {modules_dir}")
        result.append((name, paths[0]))
    return result


def read_module(path: Path) -> bytes:
    """The uncompressed ELF object of a module file (.ko, .ko.xz, .ko.gz or .ko.zst)."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            data = lzma.decompress(data)
        elif path.name.endswith(".ko.gz"):
            data = gzip.decompress(data)
        elif path.name.endswith(".ko.zst"):
            data = _zstd_decompress(data, path)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise GuestBuildError(f"cannot decompress {path}: {exc}") from exc
    if not data.startswith(b"\x7fELF"):
        raise GuestBuildError(f"{path} is not an ELF kernel module")
    return data


def _zstd_decompress(data: bytes, path: Path) -> bytes:
    # The standard library gains zstd only in 3.14; Debian's zstd tool is the fallback.
    zstd = shutil.which("zstd")
    if zstd is None:
        raise GuestBuildError(f"{path} is zstd-compressed and the zstd tool is not installed")
    proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [zstd, "-dc"], input=data, capture_output=True, check=False, timeout=_SUBPROCESS_TIMEOUT_S
    )
    if proc.returncode != 0:
        raise GuestBuildError(f"zstd could not decompress {path}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _elf_section(ko: bytes, wanted: bytes) -> bytes:
    """The content of the section named ``wanted`` in a 64-bit little-endian ELF object (x86_64)."""
    try:
        if ko[:4] != b"\x7fELF" or ko[4:6] != b"\x02\x01":
            raise GuestBuildError("not a 64-bit little-endian ELF object")
        (shoff,) = struct.unpack_from("<Q", ko, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
        if shentsize < 64 or shoff + shnum * shentsize > len(ko) or shstrndx >= shnum:
            raise GuestBuildError("bad section header table")

        def section(index: int) -> tuple[int, bytes]:
            name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + index * shentsize)
            if offset + size > len(ko):
                raise GuestBuildError(f"section {index} runs past the end of the file")
            return name, ko[offset : offset + size]

        _, names = section(shstrndx)
        for index in range(shnum):
            name, data = section(index)
            if names[name : names.find(b"\0", name)] == wanted:
                return data
    except struct.error as exc:
        raise GuestBuildError(f"truncated ELF object: {exc}") from exc
    raise GuestBuildError(f"no {wanted.decode()} section")


def modinfo(ko: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's .modinfo section (first value of each key)."""
    info: dict[str, str] = {}
    for field in _elf_section(ko, b".modinfo").split(b"\0"):
        key, sep, value = field.partition(b"=")
        if sep:
            info.setdefault(key.decode(errors="replace"), value.decode(errors="replace"))
    return info


def check_load_order(modules: Sequence[tuple[str, bytes]]) -> None:
    """Raise unless every module names itself as expected and its dependencies load before it.

    busybox insmod resolves nothing, so a wrong order would only show as a guest without disks.
    """
    loaded: set[str] = set()
    for name, ko in modules:
        try:
            info = modinfo(ko)
        except GuestBuildError as exc:
            raise GuestBuildError(f"module {name}: {exc}") from exc
        if info.get("name", "").replace("-", "_") != name:
            raise GuestBuildError(f"module file for {name} calls itself {info.get('name')!r}")
        missing = [d for d in info.get("depends", "").split(",") if d and d.replace("-", "_") not in loaded]
        if missing:
            raise GuestBuildError(f"module {name} needs {', '.join(missing)} loaded before it")
        loaded.add(name)


# --------------------------------------------------------------------------------------------
# Package source (the only part that reaches the network)
# --------------------------------------------------------------------------------------------


class PackageSource(Protocol):
    def resolve_kernel_package(self) -> str:
        """The concrete kernel package to use, e.g. ``linux-image-6.1.0-56-cloud-amd64``."""
        ...

    def download(self, packages: Sequence[str], dest: Path) -> None:
        """Place ``<package>_<version>_<arch>.deb`` for each package in ``dest``."""
        ...


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=_SUBPROCESS_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestBuildError(f"{argv[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


_KERNEL_DEPENDS = re.compile(r"^\s*\|?Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", re.MULTILINE)


class AptPackageSource:
    """Debian's archive through apt (``apt-get update`` must have been run)."""

    def resolve_kernel_package(self) -> str:
        # The meta-package depends on exactly the kernel Debian currently ships for this release.
        output = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
        names: list[str] = sorted({match.group(1) for match in _KERNEL_DEPENDS.finditer(output)})
        if len(names) != 1:
            raise GuestBuildError(
                f"cannot resolve {KERNEL_META_PACKAGE} to one kernel package (found {names}); run apt-get update"
            )
        return names[0]

    def download(self, packages: Sequence[str], dest: Path) -> None:
        _run(["apt-get", "download", "-q", *packages], cwd=dest)


# --------------------------------------------------------------------------------------------
# Building and caching
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "passivisor" / "guest"


def init_script() -> bytes:
    return importlib.resources.files(__package__ or "controller.devhost").joinpath(_INIT_RESOURCE).read_bytes()


def recipe_digest(mode: GuestMode = GuestMode.MARKER, bench_mib: int | None = None) -> str:
    """What, besides the two packages, determines the image; a change invalidates the cache."""
    return _recipe_digest(_Variant.of(mode, bench_mib))


def _recipe_digest(variant: _Variant) -> str:
    h = hashlib.sha256()
    h.update(f"passivisor-guest format {_FORMAT}\n".encode())
    h.update(("modules " + " ".join(MODULE_LOAD_ORDER) + "\n").encode())
    h.update(f"mode {variant.mode.value} bench_mib {variant.bench_mib}\n".encode())
    h.update(init_script())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    with (cache_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_cached(
    cache_dir: Path,
    *,
    kernel_package: str | None = None,
    mode: GuestMode = GuestMode.MARKER,
    bench_mib: int | None = None,
) -> GuestImage | None:
    """The cached build of ``mode`` if its marker is current and the files match their digests, else None.

    ``cache_dir`` is the one :func:`build_guest` was given; each mode has its own place in it.
    """
    variant = _Variant.of(mode, bench_mib)
    return _load_cached(variant.cache_dir(cache_dir), variant, kernel_package)


def _load_cached(cache_dir: Path, variant: _Variant, kernel_package: str | None) -> GuestImage | None:
    try:
        marker = json.loads((cache_dir / MARKER_NAME).read_text())
        if marker.get("format") != _FORMAT or marker.get("recipe") != _recipe_digest(variant):
            return None
        if kernel_package is not None and marker["kernel_package"] != kernel_package:
            return None
        if not re.fullmatch(r"[0-9a-f]{16}", marker["build"]):
            return None
        build = cache_dir / "builds" / marker["build"]
        image = GuestImage(
            kernel=build / "vmlinuz",
            initramfs=build / "initramfs.cpio.gz",
            kernel_sha256=marker["kernel_sha256"],
            initramfs_sha256=marker["initramfs_sha256"],
            kernel_package=marker["kernel_package"],
            kernel_version=marker["kernel_version"],
            mode=variant.mode,
            bench_mib=variant.bench_mib,
        )
        if sha256_file(image.kernel) != image.kernel_sha256 or sha256_file(image.initramfs) != image.initramfs_sha256:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return image


def build_guest(
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    kernel_package: str | None = None,
    source: PackageSource | None = None,
    mode: GuestMode = GuestMode.MARKER,
    bench_mib: int | None = None,
) -> GuestImage:
    """Return the guest image, building it into ``cache_dir`` unless a current build is cached.

    ``force`` rebuilds (and re-resolves the kernel package) even when the cache is current.
    ``kernel_package`` pins a concrete package instead of the one the meta-package names.
    ``mode`` selects what the guest does with its disks; ``bench_mib`` (``GuestMode.BENCH`` only,
    default :data:`DEFAULT_BENCH_MIB`) is the size of each bench pass. Each mode and size is a
    separate image with its own digests, cached apart from the others. Raises ValueError for a bad
    ``bench_mib`` and GuestBuildError when a build fails.
    """
    variant = _Variant.of(mode, bench_mib)
    cache_dir = variant.cache_dir((cache_dir or default_cache_dir()).absolute())
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir):
        if not force:
            cached = _load_cached(cache_dir, variant, kernel_package)
            if cached is not None:
                return cached
        for stale in cache_dir.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            return _build(cache_dir, work, kernel_package, source or AptPackageSource(), variant)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _only(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise GuestBuildError(f"expected one {what}, found {[str(p) for p in paths]}")
    return paths[0]


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).strip()


def _build(
    cache_dir: Path, work: Path, kernel_package: str | None, source: PackageSource, variant: _Variant
) -> GuestImage:
    kernel_package = kernel_package or source.resolve_kernel_package()
    downloads = work / "debs"
    downloads.mkdir()
    source.download([kernel_package, BUSYBOX_PACKAGE], downloads)
    kernel_deb = _only(sorted(downloads.glob(f"{kernel_package}_*.deb")), f"{kernel_package} .deb")
    busybox_deb = _only(sorted(downloads.glob(f"{BUSYBOX_PACKAGE}_*.deb")), f"{BUSYBOX_PACKAGE} .deb")

    kernel_root, busybox_root = work / "kernel", work / "busybox"
    _run(["dpkg-deb", "-x", str(kernel_deb), str(kernel_root)])
    _run(["dpkg-deb", "-x", str(busybox_deb), str(busybox_root)])

    # Debian 12 ships modules under /lib/modules; merged-/usr packages under /usr/lib/modules.
    module_trees = [p for base in ("lib/modules", "usr/lib/modules") for p in sorted((kernel_root / base).glob("*"))]
    modules_dir = _only([p for p in module_trees if p.is_dir()], "kernel module tree")
    release = modules_dir.name
    vmlinuz = _only(sorted(kernel_root.glob(f"boot/vmlinuz-{release}")), f"vmlinuz-{release}")
    busybox_paths = [busybox_root / "bin/busybox", busybox_root / "usr/bin/busybox"]
    busybox = _only([p for p in busybox_paths if p.is_file()], "busybox binary")

    modules = [(name, read_module(path)) for name, path in find_modules(modules_dir, MODULE_LOAD_ORDER)]
    check_load_order(modules)
    entries = initramfs_entries(busybox.read_bytes(), init_script(), modules, variant.files())
    initramfs = gzip_deterministic(newc_archive(entries))

    out = work / "out"
    out.mkdir()
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    _fsync_path(out / "vmlinuz")
    _write_synced(out / "initramfs.cpio.gz", initramfs)
    kernel_sha256 = sha256_file(out / "vmlinuz")
    initramfs_sha256 = hashlib.sha256(initramfs).hexdigest()

    builds = cache_dir / "builds"
    builds.mkdir(exist_ok=True)
    build_id = hashlib.sha256(f"{kernel_sha256} {initramfs_sha256}".encode()).hexdigest()[:16]
    final = builds / build_id
    if final.exists() and (
        sha256_file(final / "vmlinuz") != kernel_sha256 or sha256_file(final / "initramfs.cpio.gz") != initramfs_sha256
    ):
        # The id is derived from both digests, so a damaged copy is the only way to get here.
        shutil.rmtree(final)
    if not final.exists():
        out.rename(final)
        _fsync_path(builds)

    image = GuestImage(
        kernel=final / "vmlinuz",
        initramfs=final / "initramfs.cpio.gz",
        kernel_sha256=kernel_sha256,
        initramfs_sha256=initramfs_sha256,
        kernel_package=_deb_field(kernel_deb, "Package"),
        kernel_version=_deb_field(kernel_deb, "Version"),
        mode=variant.mode,
        bench_mib=variant.bench_mib,
    )
    marker = {
        "format": _FORMAT,
        "recipe": _recipe_digest(variant),
        "mode": variant.mode.value,
        "bench_mib": variant.bench_mib,
        "build": build_id,
        "kernel_sha256": kernel_sha256,
        "initramfs_sha256": initramfs_sha256,
        "kernel_package": image.kernel_package,
        "kernel_version": image.kernel_version,
        "kernel_release": release,
        "busybox_version": _deb_field(busybox_deb, "Version"),
        "modules": list(MODULE_LOAD_ORDER),
        "cmdline": KERNEL_CMDLINE,
    }
    pending = work / MARKER_NAME
    _write_synced(pending, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())
    os.replace(pending, cache_dir / MARKER_NAME)  # the commit point
    _fsync_path(cache_dir)

    for old in builds.iterdir():
        if old.name != build_id:
            shutil.rmtree(old, ignore_errors=True)
    return image


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.devhost.guest", description="Build the tiny development guest (JSON on stdout)."
    )
    parser.add_argument("--cache", type=Path, default=None, help=f"cache directory (default {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache holds a current build")
    parser.add_argument("--kernel-package", default=None, help="concrete linux-image-*-cloud-amd64 package to use")
    parser.add_argument(
        "--mode",
        choices=[m.value for m in GuestMode],
        default=GuestMode.MARKER.value,
        help="what the guest does with disks",
    )
    parser.add_argument(
        "--bench-mib", type=int, default=None, help=f"size of each bench pass (default {DEFAULT_BENCH_MIB})"
    )
    args = parser.parse_args(argv)
    mode = GuestMode(args.mode)
    try:
        _Variant.of(mode, args.bench_mib)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        image = build_guest(
            args.cache, force=args.force, kernel_package=args.kernel_package, mode=mode, bench_mib=args.bench_mib
        )
    except GuestBuildError as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(image.to_json(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
