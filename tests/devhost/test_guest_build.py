"""Unit tests of the guest builder; no network: packages come from .deb files made here with dpkg-deb.

GNU cpio (Debian package cpio) is the independent reader of the archives we write.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.devhost import guest
from controller.devhost.guest import (
    DEFAULT_BENCH_MIB,
    MODULE_LOAD_ORDER,
    CpioEntry,
    DiskBenchLine,
    DiskTokenLine,
    GuestBuildError,
    GuestConsoleLine,
    GuestMode,
    GuestSignal,
    build_guest,
    check_load_order,
    find_modules,
    initramfs_entries,
    load_cached,
    marker_sector,
    module_name,
    newc_archive,
    parse_console_line,
    read_module,
)

RELEASE = "6.1.0-99-cloud-amd64"
KERNEL_PACKAGE = f"linux-image-{RELEASE}"

# Real dependencies of the Debian 6.1 cloud kernel's modules (their .modinfo "depends=").
MODULE_DEPENDS = {
    "virtio_ring": "",
    "virtio": "virtio_ring",
    "virtio_pci_legacy_dev": "",
    "virtio_pci_modern_dev": "",
    "virtio_pci": "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio",
    "virtio_blk": "virtio,virtio_ring",
    "virtio_rng": "virtio,virtio_ring",
    "evdev": "",
    "button": "",
}
MODULE_PATHS = {
    "virtio_ring": "drivers/virtio/virtio_ring",
    "virtio": "drivers/virtio/virtio",
    "virtio_pci_legacy_dev": "drivers/virtio/virtio_pci_legacy_dev",
    "virtio_pci_modern_dev": "drivers/virtio/virtio_pci_modern_dev",
    "virtio_pci": "drivers/virtio/virtio_pci",
    "virtio_blk": "drivers/block/virtio_blk",
    "virtio_rng": "drivers/char/hw_random/virtio-rng",
    "evdev": "drivers/input/evdev",
    "button": "drivers/acpi/button",
}


def fake_ko(name: str, depends: str = "") -> bytes:
    """A minimal ELF64 relocatable object with a .modinfo section, as a kernel module has.

    A decoy ``name=`` string in .rodata (real modules have such strings, e.g. libceph.ko) must not
    be mistaken for module information.
    """
    sections = [
        (b".rodata", b"\0name=decoy\0depends=decoy\0"),
        (b".modinfo", f"license=GPL\0depends={depends}\0name={name}\0".encode()),
    ]
    shstrtab = b"\0" + b"".join(n + b"\0" for n, _ in sections) + b".shstrtab\0"
    sections.append((b".shstrtab", shstrtab))
    body = b""
    headers = [bytes(64)]  # section 0 is the null section
    for section_name, data in sections:
        headers.append(
            struct.pack(
                "<IIQQQQIIQQ", shstrtab.index(section_name + b"\0"), 1, 0, 0, 64 + len(body), len(data), 0, 0, 1, 0
            )
        )
        body += data
    body += bytes(-len(body) % 8)
    ehdr = (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, 64 + len(body), 0, 64, 0, 0, 64, len(headers), len(headers) - 1)
    )
    return ehdr + body + b"".join(headers)


# --------------------------------------------------------------------------------------------
# cpio newc writer
# --------------------------------------------------------------------------------------------

SAMPLE = [
    CpioEntry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
    CpioEntry.file("bin/busybox", b"\x7fELF busybox", 0o755),
    CpioEntry.symlink("bin/sh", "busybox"),
    CpioEntry.char_device("dev/console", 5, 1),
    CpioEntry.file("lib/modules/01-a.ko", b"x" * 5),
]


def parse_newc(archive: bytes) -> list[dict[str, Any]]:
    """A reader written from the format description (man 5 cpio), to check fields cpio -t hides."""
    names = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "mtime",
        "filesize",
        "devmajor",
        "devminor",
        "rdevmajor",
        "rdevminor",
        "namesize",
        "check",
    )
    members: list[dict[str, Any]] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        assert archive[pos : pos + 6] == b"070701"
        fields = {n: int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name_start = pos + 110
        name = archive[name_start : name_start + fields["namesize"] - 1].decode()
        assert archive[name_start + fields["namesize"] - 1] == 0
        data_start = name_start + fields["namesize"] + (-(110 + fields["namesize"]) % 4)
        data = archive[data_start : data_start + fields["filesize"]]
        pos = data_start + fields["filesize"] + (-fields["filesize"] % 4)
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return members
        members.append({"name": name, "data": data, **fields})


def cpio_list(archive: bytes) -> list[str]:
    proc = subprocess.run(["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True)
    return proc.stdout.decode().splitlines()


def test_newc_archive_is_read_by_gnu_cpio_with_parents_types_and_content() -> None:
    archive = newc_archive(SAMPLE)
    listing = cpio_list(archive)
    names = [line.split()[-1] if " -> " not in line else line.split()[-3] for line in listing]
    assert names == [
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "init",
        "lib",
        "lib/modules",
        "lib/modules/01-a.ko",
    ]
    by_name = dict(zip(names, listing, strict=True))
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("bin/sh -> busybox")
    assert by_name["dev/console"].startswith("crw-------") and "5,   1" in by_name["dev/console"]
    assert by_name["init"].startswith("-rwxr-xr-x")
    assert by_name["lib"].startswith("drwxr-xr-x")
    init = subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", "init"], input=archive, capture_output=True, check=True
    )
    assert init.stdout == b"#!/bin/sh\necho hi\n"


def test_newc_fields_are_fixed_so_the_bytes_depend_only_on_content() -> None:
    members = parse_newc(newc_archive(SAMPLE))
    assert [m["ino"] for m in members] == list(range(1, len(members) + 1))
    assert {(m["uid"], m["gid"], m["mtime"], m["check"]) for m in members} == {(0, 0, 0, 0)}
    console = next(m for m in members if m["name"] == "dev/console")
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert stat.S_ISCHR(int(console["mode"]))


@given(st.permutations(SAMPLE))
def test_newc_archive_does_not_depend_on_entry_order(entries: Sequence[CpioEntry]) -> None:
    assert newc_archive(entries) == newc_archive(SAMPLE)


@given(
    st.dictionaries(st.from_regex(r"[a-z]{1,6}(/[a-z]{1,6}){0,2}", fullmatch=True), st.binary(max_size=9), max_size=8)
)
def test_newc_round_trips_any_file_tree(files: dict[str, bytes]) -> None:
    # A path may not be both a file and a directory; drop files that are another file's parent.
    files = {n: d for n, d in files.items() if not any(o.startswith(n + "/") for o in files)}
    members = parse_newc(newc_archive([CpioEntry.file(n, d) for n, d in files.items()]))
    names = [str(m["name"]) for m in members]
    assert names == sorted(names)
    assert {str(m["name"]): m["data"] for m in members if stat.S_ISREG(int(m["mode"]))} == files
    for name in names:  # every parent directory is present and comes first
        if "/" in name:
            assert names.index(name.rsplit("/", 1)[0]) < names.index(name)


@pytest.mark.parametrize(
    "entries",
    [
        [CpioEntry.file("../etc/passwd", b"")],
        [CpioEntry.file("", b"")],
        [CpioEntry.file("init", b""), CpioEntry.file("/init", b"")],
        [CpioEntry.file("bin", b""), CpioEntry.file("bin/sh", b"")],
    ],
    ids=["dotdot", "empty", "duplicate", "file-as-parent"],
)
def test_newc_archive_rejects_bad_member_names(entries: list[CpioEntry]) -> None:
    with pytest.raises(ValueError):
        newc_archive(entries)


def test_initramfs_is_byte_identical_for_identical_inputs() -> None:
    modules = [(name, fake_ko(name, MODULE_DEPENDS[name])) for name in MODULE_LOAD_ORDER]
    first = guest.gzip_deterministic(newc_archive(initramfs_entries(b"bb", b"init", modules)))
    second = guest.gzip_deterministic(newc_archive(initramfs_entries(b"bb", b"init", list(modules))))
    assert first == second
    assert first[4:8] == b"\0\0\0\0"  # gzip MTIME field
    listing = cpio_list(gzip.decompress(first))
    assert [line.split()[-1] for line in listing if "lib/modules/" in line] == [
        f"lib/modules/{i:02d}-{name}.ko" for i, name in enumerate(MODULE_LOAD_ORDER, 1)
    ]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def test_module_load_order_is_the_one_design_md_prescribes_then_the_power_button() -> None:
    assert MODULE_LOAD_ORDER == (
        "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk",
        "virtio_rng", "evdev", "button",
    )  # fmt: skip
    check_load_order([(name, fake_ko(name, MODULE_DEPENDS[name])) for name in MODULE_LOAD_ORDER])


def test_check_load_order_rejects_a_dependency_loaded_later() -> None:
    with pytest.raises(GuestBuildError, match="virtio needs virtio_ring"):
        check_load_order([("virtio", fake_ko("virtio", "virtio_ring")), ("virtio_ring", fake_ko("virtio_ring"))])


def test_modinfo_reads_only_the_modinfo_section() -> None:
    assert guest.modinfo(fake_ko("virtio_blk", "virtio,virtio_ring")) == {
        "license": "GPL",
        "depends": "virtio,virtio_ring",
        "name": "virtio_blk",
    }


@pytest.mark.parametrize("cut", [0, 10, 63, 100, -1])
def test_modinfo_rejects_truncated_or_non_elf_objects(cut: int) -> None:
    with pytest.raises(GuestBuildError):
        guest.modinfo(fake_ko("virtio")[:cut])


def test_check_load_order_rejects_a_file_that_is_another_module() -> None:
    with pytest.raises(GuestBuildError, match="calls itself"):
        check_load_order([("virtio_blk", fake_ko("virtio_scsi"))])


def test_check_load_order_treats_dash_and_underscore_alike() -> None:
    check_load_order([("virtio_ring", fake_ko("virtio_ring")), ("virtio_rng", fake_ko("virtio-rng", "virtio-ring"))])


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("virtio-rng.ko", "virtio_rng"),
        ("virtio_blk.ko.xz", "virtio_blk"),
        ("button.ko.zst", "button"),
        ("evdev.ko.gz", "evdev"),
        ("modules.order", None),
        ("virtio.ko.bz2", None),
    ],
)
def test_module_name(filename: str, name: str | None) -> None:
    assert module_name(filename) == name


def test_find_modules_in_order_and_reports_missing_or_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "kernel/a").mkdir(parents=True)
    (tmp_path / "kernel/b").mkdir(parents=True)
    (tmp_path / "kernel/a/virtio-rng.ko").write_bytes(b"")
    (tmp_path / "kernel/a/virtio.ko.xz").write_bytes(b"")
    (tmp_path / "kernel/a/dup.ko").write_bytes(b"")
    (tmp_path / "kernel/b/dup.ko").write_bytes(b"")
    assert find_modules(tmp_path, ["virtio", "virtio_rng"]) == [
        ("virtio", tmp_path / "kernel/a/virtio.ko.xz"),
        ("virtio_rng", tmp_path / "kernel/a/virtio-rng.ko"),
    ]
    with pytest.raises(GuestBuildError, match="virtio_blk is missing"):
        find_modules(tmp_path, ["virtio", "virtio_blk"])
    with pytest.raises(GuestBuildError, match="dup is ambiguous"):
        find_modules(tmp_path, ["dup"])


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [(".ko", lambda b: b), (".ko.xz", lambda b: lzma.compress(b, lzma.FORMAT_XZ)), (".ko.gz", gzip.compress)],
)
def test_read_module_decompresses(tmp_path: Path, suffix: str, compress: Callable[[bytes], bytes]) -> None:
    ko = fake_ko("virtio")
    (tmp_path / f"virtio{suffix}").write_bytes(compress(ko))
    assert read_module(tmp_path / f"virtio{suffix}") == ko


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd tool (Debian package zstd)")
def test_read_module_decompresses_zstd(tmp_path: Path) -> None:
    ko = fake_ko("virtio")
    zst = subprocess.run(["zstd", "-c"], input=ko, capture_output=True, check=True).stdout
    (tmp_path / "virtio.ko.zst").write_bytes(zst)
    assert read_module(tmp_path / "virtio.ko.zst") == ko


def test_read_module_rejects_non_elf_and_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "a.ko").write_bytes(b"not a module")
    (tmp_path / "b.ko.xz").write_bytes(b"not xz")
    for name in ("a.ko", "b.ko.xz"):
        with pytest.raises(GuestBuildError):
            read_module(tmp_path / name)


# --------------------------------------------------------------------------------------------
# Console protocol and /init
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "signal", "words"),
    [
        ("PASSIVISOR-GUEST-READY\r\n", GuestSignal.READY, ()),
        ("PASSIVISOR-RNG virtio_rng.0\r", GuestSignal.RNG, ("virtio_rng.0",)),
        ("PASSIVISOR-DISKS\r\n", GuestSignal.DISKS, ()),
        ("PASSIVISOR-DISKS vda vdb\n", GuestSignal.DISKS, ("vda", "vdb")),
        ("PASSIVISOR-POWEROFF", GuestSignal.POWEROFF, ()),
        (
            "PASSIVISOR-ERROR disk vda cannot write sector 0\r\n",
            GuestSignal.ERROR,
            ("disk", "vda", "cannot", "write", "sector", "0"),
        ),
    ],
)
def test_parse_console_line(line: str, signal: GuestSignal, words: tuple[str, ...]) -> None:
    parsed = parse_console_line(line)
    assert parsed is not None and (parsed.signal, parsed.words) == (signal, words)
    assert type(parsed) is GuestConsoleLine


UUID_TOKEN = "77cd8e28-f80e-4264-82cd-33d5b503c4c9"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            f"PASSIVISOR-DISK-WROTE vda {UUID_TOKEN}\r\n",
            DiskTokenLine(GuestSignal.DISK_WROTE, ("vda", UUID_TOKEN), "vda", UUID_TOKEN),
        ),
        (
            "PASSIVISOR-DISK-MARKER vdab abcdefgh\r",
            DiskTokenLine(GuestSignal.DISK_MARKER, ("vdab", "abcdefgh"), "vdab", "abcdefgh"),
        ),
        (
            "PASSIVISOR-DISK-MARKER vdz " + "Z9-" * 21 + "x",
            DiskTokenLine(GuestSignal.DISK_MARKER, ("vdz", "Z9-" * 21 + "x"), "vdz", "Z9-" * 21 + "x"),
        ),
        (
            "PASSIVISOR-DISK-BENCH vdb write 1073741824 286 read 1073741824 28\r\n",
            DiskBenchLine(
                GuestSignal.DISK_BENCH,
                ("vdb", "write", "1073741824", "286", "read", "1073741824", "28"),
                "vdb",
                1073741824,
                286,
                1073741824,
                28,
            ),
        ),
    ],
)
def test_parse_disk_lines_as_typed_results(line: str, expected: GuestConsoleLine) -> None:
    assert parse_console_line(line) == expected


def test_bench_line_throughput() -> None:
    line = parse_console_line("PASSIVISOR-DISK-BENCH vda write 1073741824 286 read 1048576 0")
    assert isinstance(line, DiskBenchLine)
    assert line.write_bytes_per_s == pytest.approx(1073741824 / 2.86)
    assert line.read_bytes_per_s is None  # faster than the guest's clock can tell


@pytest.mark.parametrize(
    "line",
    [
        "PASSIVISOR-DISK-WROTE vda",  # no token
        "PASSIVISOR-DISK-WROTE",
        f"PASSIVISOR-DISK-WROTE {UUID_TOKEN}",  # no device
        f"PASSIVISOR-DISK-WROTE vda {UUID_TOKEN} extra",
        "PASSIVISOR-DISK-WROTE vda abcdefg",  # token of 7
        "PASSIVISOR-DISK-WROTE vda " + "a" * 65,  # token of 65
        "PASSIVISOR-DISK-MARKER vda abc_defgh",  # outside [A-Za-z0-9-]
        "PASSIVISOR-DISK-MARKER vda abcdéfgh",
        "PASSIVISOR-DISK-MARKER vda abcdefgh[    3.1] virtio_blk",  # spliced with a kernel message
        f"PASSIVISOR-DISK-MARKER sda {UUID_TOKEN}",  # not a virtio disk
        f"PASSIVISOR-DISK-MARKER vda1 {UUID_TOKEN}",
        f"PASSIVISOR-DISK-MARKER ../vda {UUID_TOKEN}",
        "PASSIVISOR-DISK-BENCH vda write 1 2 read 3",  # a word short
        "PASSIVISOR-DISK-BENCH vda write 1 2 read 3 4 5",
        "PASSIVISOR-DISK-BENCH vda read 1 2 write 3 4",  # passes swapped
        "PASSIVISOR-DISK-BENCH vda write -1 2 read 3 4",
        "PASSIVISOR-DISK-BENCH vda write 1 2.5 read 3 4",
        "PASSIVISOR-DISK-BENCH vda write 1 2 read 3 0x4",
        "PASSIVISOR-DISK-BENCH vda write 1 2 read 3 \u0664",  # a digit, but not an ASCII one
        "PASSIVISOR-DISK-BENCH vda write 1234567890123456789 2 read 3 4",  # past 64-bit shell arithmetic
        "PASSIVISOR-DISK-WROTEvda abcdefgh",
    ],
)
def test_malformed_disk_lines_are_not_protocol_lines(line: str) -> None:
    assert parse_console_line(line) is None


@given(
    st.one_of(
        st.text(),
        st.builds(
            "{} {}".format,
            st.sampled_from([s.value for s in GuestSignal]),
            st.lists(st.one_of(st.from_regex(r"vd[a-z]{1,3}|write|read|[0-9]{1,20}", fullmatch=True), st.text())).map(
                " ".join
            ),
        ),
    )
)
def test_parse_console_line_is_total(line: str) -> None:
    parsed = parse_console_line(line)  # never raises, whatever the guest or the kernel prints
    assert parsed is None or isinstance(parsed, GuestConsoleLine)
    if isinstance(parsed, DiskBenchLine):
        assert parsed.words[1::3] == ("write", "read") and len(parsed.words) == 7


@given(
    st.sampled_from([GuestSignal.DISK_MARKER, GuestSignal.DISK_WROTE]),
    st.from_regex(r"vd[a-z]{1,3}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9-]{8,64}", fullmatch=True),
)
def test_disk_token_lines_round_trip(signal: GuestSignal, device: str, token: str) -> None:
    assert parse_console_line(f"{signal.value} {device} {token}\r\n") == DiskTokenLine(
        signal, (device, token), device, token
    )


@given(st.from_regex(r"vd[a-z]{1,3}", fullmatch=True), st.lists(st.integers(0, 10**18 - 1), min_size=4, max_size=4))
def test_disk_bench_lines_round_trip(device: str, counts: list[int]) -> None:
    wb, wc, rb, rc = counts
    parsed = parse_console_line(f"PASSIVISOR-DISK-BENCH {device} write {wb} {wc} read {rb} {rc}\r\n")
    assert isinstance(parsed, DiskBenchLine)
    assert (parsed.device, parsed.write_bytes, parsed.write_centiseconds, parsed.read_bytes) == (device, wb, wc, rb)
    assert parsed.read_centiseconds == rc


def test_marker_sector() -> None:
    sector = marker_sector("abcdefgh")
    assert sector == b"PASSIVISOR-MARKER abcdefgh\n" + bytes(512 - 27)
    assert len(marker_sector("a" * 64)) == 512
    for bad in ("abcdefg", "a" * 65, "abc defgh", "abcdefgh\n"):
        with pytest.raises(ValueError):
            marker_sector(bad)


@pytest.mark.parametrize(
    "line",
    [
        "[    1.234] virtio_blk virtio1: [vda] 16384 512-byte logical blocks",
        " PASSIVISOR-GUEST-READY",
        "PASSIVISOR-GUEST-READYX",
        "passivisor-guest-ready",
        "",
    ],
)
def test_parse_console_line_ignores_everything_else(line: str) -> None:
    assert parse_console_line(line) is None


def test_init_script_is_valid_busybox_sh_and_speaks_the_protocol() -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox-static is a declared dependency (Makefile DEBIAN_PACKAGES)"
    script = guest.init_script()
    subprocess.run([busybox, "sh", "-n"], input=script, check=True)
    assert script.startswith(b"#!/bin/sh\n")
    for signal in GuestSignal:
        assert signal.value.encode() in script
    assert b'echo "PASSIVISOR-GUEST-READY"\n' in script


def test_init_script_and_builder_agree_on_the_bench_defaults_and_mode_files() -> None:
    script = guest.init_script().decode()
    assert f"\nbench_mib={DEFAULT_BENCH_MIB}\n" in script
    assert f"default {DEFAULT_BENCH_MIB}," in script
    assert "/etc/passivisor-guest-mode" in script and "/etc/passivisor-bench-mib" in script
    assert f"'' | 0* | *[!0-9]* | {'?' * len(str(guest.MAX_BENCH_MIB + 1))}*)" in script


# --------------------------------------------------------------------------------------------
# The disk functions of /init, run by the host's busybox (the guest's busybox-static) on files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def applets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH of busybox applets only, as in the guest, so no host tool stands in for one."""
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox-static is a declared dependency (Makefile DEBIAN_PACKAGES)"
    bin_dir = tmp_path_factory.mktemp("applets")
    for name in subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split():
        (bin_dir / name).symlink_to(busybox)
    return bin_dir


DiskShell = Callable[..., list[str]]


@pytest.fixture
def disk_sh(applets: Path, tmp_path: Path) -> Iterator[DiskShell]:
    """Run a command after the block between "# BEGIN disk functions" and "# END disk functions"."""
    script = guest.init_script().decode()
    functions = script[script.index("# BEGIN disk functions") : script.index("# END disk functions")]
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def run(command: str, prelude: str = "") -> list[str]:
        proc = subprocess.run(
            [str(applets / "sh"), "-c", f"{functions}\n{prelude}\n{command}"],
            env={"PATH": str(applets), "TMPDIR": str(scratch)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert proc.stderr == ""
        return proc.stdout.splitlines()

    yield run
    assert list(scratch.iterdir()) == []  # every job removes its scratch directory


def test_disk_marker_writes_a_marker_on_a_blank_disk_then_finds_it(disk_sh: DiskShell, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4096))
    [line] = disk_sh(f"disk_marker vda {disk}")
    wrote = parse_console_line(line)
    assert isinstance(wrote, DiskTokenLine) and (wrote.signal, wrote.device) == (GuestSignal.DISK_WROTE, "vda")
    uuid.UUID(wrote.token)  # a fresh token from /proc/sys/kernel/random/uuid
    data = disk.read_bytes()
    assert data == marker_sector(wrote.token) + bytes(4096 - 512)

    assert disk_sh(f"disk_marker vdb {disk}") == [f"PASSIVISOR-DISK-MARKER vdb {wrote.token}"]
    assert disk.read_bytes() == data  # finding a marker writes nothing


@pytest.mark.parametrize(
    ("sector", "token"),
    [
        (b"PASSIVISOR-MARKER abcdefgh\n", "abcdefgh"),
        (b"PASSIVISOR-MARKER " + b"Az09-" * 12 + b"abcd\n", "Az09-" * 12 + "abcd"),  # 64, the longest
        (b"PASSIVISOR-MARKER abcdefgh\nPASSIVISOR-MARKER ijklmnop\n\xff\xfe", "abcdefgh"),  # after \n: anything
    ],
)
def test_disk_marker_finds_a_marker_and_leaves_the_disk_alone(
    disk_sh: DiskShell, tmp_path: Path, sector: bytes, token: str
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(sector.ljust(1024, b"\xaa"))
    assert disk_sh(f"disk_marker vdc {disk}") == [f"PASSIVISOR-DISK-MARKER vdc {token}"]
    assert disk.read_bytes() == sector.ljust(1024, b"\xaa")


@pytest.mark.parametrize(
    "sector",
    [
        b"",
        b"PASSIVISOR-MARKER abcdefg\n",  # token of 7
        b"PASSIVISOR-MARKER " + b"a" * 65 + b"\n",  # token of 65
        b"PASSIVISOR-MARKER abcdefgh",  # no newline: zero bytes follow
        b"PASSIVISOR-MARKER abcdefgh\r\n",
        b"PASSIVISOR-MARKER abc_defgh\n",
        b"PASSIVISOR-MARKER  abcdefgh\n",
        b"PASSIVISOR-MARKER\tabcdefgh\n",
        b" PASSIVISOR-MARKER abcdefgh\n",  # not at byte 0
        b"passivisor-marker abcdefgh\n",
        b"PASSIVISOR-MARKER abcd\0efgh\n",
        bytes(512) + b"PASSIVISOR-MARKER abcdefgh\n",  # in the second sector
    ],
    ids=lambda b: repr(b[:40]),
)
def test_disk_marker_overwrites_anything_that_is_not_a_marker(
    disk_sh: DiskShell, tmp_path: Path, sector: bytes
) -> None:
    disk = tmp_path / "disk"
    before = sector.ljust(2048, b"\0")
    disk.write_bytes(before)
    [line] = disk_sh(f"disk_marker vdd {disk}")
    wrote = parse_console_line(line)
    assert isinstance(wrote, DiskTokenLine) and wrote.signal is GuestSignal.DISK_WROTE
    assert disk.read_bytes() == marker_sector(wrote.token) + before[512:]


# Fault injection: a shell function named dd stands in for the applet where the case says, and
# `command dd` runs the real one otherwise.
FAIL_DIRECT_WRITES = (
    'dd() { case "$*" in *oflag=direct*) echo "dd: write error: I/O error" >&2; return 1 ;; esac; command dd "$@"; }'
)
LOSE_DIRECT_WRITES = 'dd() { case "$*" in *oflag=direct*) return 0 ;; esac; command dd "$@"; }'


@pytest.mark.parametrize(
    ("prelude", "error"),
    [
        (FAIL_DIRECT_WRITES, "cannot write sector 0"),
        (LOSE_DIRECT_WRITES, "sector 0 read back differs from what was written"),
    ],
)
def test_disk_marker_reports_a_write_that_did_not_land(
    disk_sh: DiskShell, tmp_path: Path, prelude: str, error: str
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(1024))
    assert disk_sh(f"disk_marker vde {disk}", prelude) == [f"PASSIVISOR-ERROR disk vde {error}"]
    assert disk.read_bytes() == bytes(1024)


def test_disk_marker_reports_a_disk_it_cannot_open_or_read_and_creates_nothing(
    disk_sh: DiskShell, tmp_path: Path
) -> None:
    gone, short = tmp_path / "gone", tmp_path / "short"
    short.write_bytes(bytes(100))
    assert disk_sh(f"disk_marker vdf {gone}; disk_marker vdg {short}") == [
        f"PASSIVISOR-ERROR disk vdf cannot open {gone}",
        "PASSIVISOR-ERROR disk vdg cannot read sector 0",
    ]
    assert not gone.exists() and short.read_bytes() == bytes(100)


def test_disk_marker_never_creates_the_disk_it_writes(disk_sh: DiskShell, tmp_path: Path) -> None:
    """A disk unplugged while its job runs: the writes go to the device held open, not to a new file."""
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(1024))
    unplug = f'dd() {{ rm -f {disk}; command dd "$@"; }}'
    [line] = disk_sh(f"disk_marker vdh {disk}", unplug)
    assert parse_console_line(line) is not None and line.startswith("PASSIVISOR-DISK-WROTE vdh ")
    assert not disk.exists()


def test_disk_bench_writes_then_reads_the_first_mib_and_reports_them(disk_sh: DiskShell, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xff" * (3 << 20))
    [line] = disk_sh(f"disk_bench vdb {disk} {3 << 20} 2")
    bench = parse_console_line(line)
    assert isinstance(bench, DiskBenchLine) and bench.device == "vdb"
    assert (bench.write_bytes, bench.read_bytes) == (2 << 20, 2 << 20)
    assert 0 <= bench.write_centiseconds < 6000 and 0 <= bench.read_centiseconds < 6000
    assert disk.read_bytes() == bytes(2 << 20) + b"\xff" * (1 << 20)


def test_disk_bench_is_limited_to_the_disk(disk_sh: DiskShell, tmp_path: Path) -> None:
    disk, tiny = tmp_path / "disk", tmp_path / "tiny"
    disk.write_bytes(b"\xff" * ((2 << 20) + 4096))
    tiny.write_bytes(b"\xff" * 4096)
    out = disk_sh(f"disk_bench vdc {disk} {(2 << 20) + 4096} 1024; disk_bench vdd {tiny} 4096 1024")
    bench = parse_console_line(out[0])
    assert isinstance(bench, DiskBenchLine) and (bench.write_bytes, bench.read_bytes) == (2 << 20, 2 << 20)
    assert out[1:] == ["PASSIVISOR-ERROR disk vdd is smaller than 1 MiB"]
    assert disk.read_bytes() == bytes(2 << 20) + b"\xff" * 4096 and tiny.read_bytes() == b"\xff" * 4096


def test_disk_bench_reports_a_failed_pass(disk_sh: DiskShell, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(2 << 20))
    # A pass that ends early without dd failing is caught by dd's own count of records.
    short = (
        'dd() { case "$*" in *oflag=direct*) echo "1+0 records in" >&2; echo "1+0 records out" >&2; return 0 ;; '
        'esac; command dd "$@"; }'
    )
    [failed] = disk_sh(f"disk_bench vde {disk} {2 << 20} 2", FAIL_DIRECT_WRITES)
    [cut_short] = disk_sh(f"disk_bench vde {disk} {2 << 20} 2", short)
    assert failed == "PASSIVISOR-ERROR disk vde bench failed: dd: write error: I/O error"
    assert cut_short == (
        "PASSIVISOR-ERROR disk vde bench failed: 1+0 records in 1+0 records out 2+0 records in 2+0 records out"
    )
    assert parse_console_line(failed) is not None and parse_console_line(cut_short) is not None


# --------------------------------------------------------------------------------------------
# build_guest and its cache
# --------------------------------------------------------------------------------------------


def make_deb(root: Path, package: str, version: str, out_dir: Path) -> Path:
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: amd64\nMaintainer: test <t@example.invalid>\n"
        "Description: fabricated for passivisor tests\n"
    )
    deb = out_dir / f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(deb)], check=True, capture_output=True
    )
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("debs")
    kernel = base / "kernel"
    # Merged-/usr layout and xz-compressed modules, the harder of the two shapes Debian ships.
    modules = kernel / "usr/lib/modules" / RELEASE / "kernel"
    for name in MODULE_LOAD_ORDER:
        path = modules / f"{MODULE_PATHS[name]}.ko.xz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(fake_ko(name, MODULE_DEPENDS[name])))
    (modules / "drivers/net").mkdir(parents=True)
    (modules / "drivers/net/virtio_net.ko.xz").write_bytes(lzma.compress(fake_ko("virtio_net", "virtio")))
    (kernel / "boot").mkdir()
    (kernel / f"boot/vmlinuz-{RELEASE}").write_bytes(b"MZ fake bzImage " * 64)
    busybox = base / "busybox"
    (busybox / "bin").mkdir(parents=True)
    (busybox / "bin/busybox").write_bytes(b"\x7fELF fake busybox")
    return {
        KERNEL_PACKAGE: make_deb(kernel, KERNEL_PACKAGE, "6.1.999-1", base),
        guest.BUSYBOX_PACKAGE: make_deb(busybox, guest.BUSYBOX_PACKAGE, "1:1.35.0-4", base),
    }


class FakeSource:
    def __init__(self, debs: dict[str, Path]) -> None:
        self.debs = debs
        self.calls: list[str] = []

    def resolve_kernel_package(self) -> str:
        self.calls.append("resolve")
        return KERNEL_PACKAGE

    def download(self, packages: Sequence[str], dest: Path) -> None:
        self.calls.append("download " + " ".join(packages))
        for package in packages:
            shutil.copy(self.debs[package], dest)


class OfflineSource:
    def resolve_kernel_package(self) -> str:
        raise AssertionError("a cached build must not touch the package source")

    def download(self, packages: Sequence[str], dest: Path) -> None:
        raise AssertionError("a cached build must not touch the package source")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_guest_produces_a_bootable_layout_and_a_marker(tmp_path: Path, debs: dict[str, Path]) -> None:
    source = FakeSource(debs)
    image = build_guest(tmp_path, source=source)

    assert source.calls == ["resolve", f"download {KERNEL_PACKAGE} busybox-static"]
    assert (image.kernel_package, image.kernel_version) == (KERNEL_PACKAGE, "6.1.999-1")
    assert image.kernel.read_bytes() == b"MZ fake bzImage " * 64
    assert sha256(image.kernel) == image.kernel_sha256 and sha256(image.initramfs) == image.initramfs_sha256
    archive = gzip.decompress(image.initramfs.read_bytes())
    members = {str(m["name"]): m for m in parse_newc(archive)}
    assert members["init"]["data"] == guest.init_script()
    assert members["bin/busybox"]["data"] == b"\x7fELF fake busybox"
    assert [n for n in members if n.startswith("lib/modules/")] == [
        f"lib/modules/{i:02d}-{name}.ko" for i, name in enumerate(MODULE_LOAD_ORDER, 1)
    ]
    assert members["lib/modules/07-virtio_rng.ko"]["data"] == fake_ko("virtio_rng", MODULE_DEPENDS["virtio_rng"])
    marker = json.loads((tmp_path / guest.MARKER_NAME).read_text())
    assert marker["kernel_sha256"] == image.kernel_sha256 and marker["kernel_release"] == RELEASE
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "builds", guest.MARKER_NAME]


def test_a_current_cache_is_returned_without_touching_the_source(tmp_path: Path, debs: dict[str, Path]) -> None:
    image = build_guest(tmp_path, source=FakeSource(debs))
    assert build_guest(tmp_path, source=OfflineSource()) == image
    assert build_guest(tmp_path, source=OfflineSource(), kernel_package=KERNEL_PACKAGE) == image


def test_builds_are_reproducible_across_cache_dirs(tmp_path: Path, debs: dict[str, Path]) -> None:
    first = build_guest(tmp_path / "a", source=FakeSource(debs))
    second = build_guest(tmp_path / "b", source=FakeSource(debs))
    assert (first.kernel_sha256, first.initramfs_sha256) == (second.kernel_sha256, second.initramfs_sha256)


def test_force_rebuilds_and_keeps_only_the_current_build(tmp_path: Path, debs: dict[str, Path]) -> None:
    image = build_guest(tmp_path, source=FakeSource(debs))
    source = FakeSource(debs)
    assert build_guest(tmp_path, force=True, source=source) == image
    assert source.calls[0] == "resolve"
    assert [p.name for p in (tmp_path / "builds").iterdir()] == [image.kernel.parent.name]


@pytest.mark.parametrize("damage", ["initramfs", "kernel", "marker-json", "recipe", "format", "build", "missing-build"])
def test_a_damaged_or_stale_cache_is_rebuilt(tmp_path: Path, debs: dict[str, Path], damage: str) -> None:
    image = build_guest(tmp_path, source=FakeSource(debs))
    marker_path = tmp_path / guest.MARKER_NAME
    marker = json.loads(marker_path.read_text())
    if damage == "initramfs":
        image.initramfs.write_bytes(b"truncated")
    elif damage == "kernel":
        image.kernel.write_bytes(b"other kernel")
    elif damage == "marker-json":
        marker_path.write_text("{")
    elif damage == "missing-build":
        shutil.rmtree(image.kernel.parent)
    else:
        marker[damage] = {"recipe": "stale", "format": 0, "build": "../../outside"}[damage]
        marker_path.write_text(json.dumps(marker))
    assert load_cached(tmp_path) is None

    source = FakeSource(debs)
    assert build_guest(tmp_path, source=source) == image
    assert "resolve" in source.calls
    assert load_cached(tmp_path) == image


def test_a_different_kernel_package_is_not_served_from_cache(tmp_path: Path, debs: dict[str, Path]) -> None:
    build_guest(tmp_path, source=FakeSource(debs))
    assert load_cached(tmp_path, kernel_package="linux-image-6.1.0-1-cloud-amd64") is None


def test_a_failed_build_leaves_the_previous_build_in_place(tmp_path: Path, debs: dict[str, Path]) -> None:
    cache = tmp_path / "cache"
    image = build_guest(cache, source=FakeSource(debs))
    broken = dict(debs)
    broken[KERNEL_PACKAGE] = tmp_path / f"{KERNEL_PACKAGE}_0_amd64.deb"
    broken[KERNEL_PACKAGE].write_bytes(b"!<arch>\ntruncated")
    with pytest.raises(GuestBuildError, match="dpkg-deb"):
        build_guest(cache, force=True, source=FakeSource(broken))
    assert load_cached(cache) == image
    assert not list(cache.glob(".build-*"))


def test_an_interrupted_commit_never_publishes_a_half_build(
    tmp_path: Path, debs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Interrupt at the commit point itself: the new build directory exists, its marker is not in place.
    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_guest(tmp_path, source=FakeSource(debs))
    monkeypatch.undo()
    assert not (tmp_path / guest.MARKER_NAME).exists() and load_cached(tmp_path) is None
    assert not list(tmp_path.glob(".build-*"))

    image = build_guest(tmp_path, source=FakeSource(debs))
    assert load_cached(tmp_path) == image


def test_apt_source_resolves_the_meta_package(monkeypatch: pytest.MonkeyPatch) -> None:
    output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    seen: list[Sequence[str]] = []

    def fake_run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
        seen.append(argv)
        return output

    monkeypatch.setattr(guest, "_run", fake_run)
    assert guest.AptPackageSource().resolve_kernel_package() == "linux-image-6.1.0-56-cloud-amd64"
    assert seen == [["apt-cache", "depends", "linux-image-cloud-amd64"]]
    output = "linux-image-cloud-amd64\n"
    with pytest.raises(GuestBuildError, match="cannot resolve"):
        guest.AptPackageSource().resolve_kernel_package()


def test_cli_prints_the_cached_image_as_json(
    tmp_path: Path, debs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = build_guest(tmp_path, source=FakeSource(debs))
    monkeypatch.setattr(guest, "AptPackageSource", OfflineSource)
    assert guest.main(["--cache", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == image.to_json()


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert guest.default_cache_dir() == tmp_path / "passivisor" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert guest.default_cache_dir() == tmp_path / "home" / ".cache" / "passivisor" / "guest"


# --------------------------------------------------------------------------------------------
# Guest modes
# --------------------------------------------------------------------------------------------


def initramfs_members(image: guest.GuestImage) -> dict[str, bytes]:
    return {str(m["name"]): m["data"] for m in parse_newc(gzip.decompress(image.initramfs.read_bytes()))}


def test_bench_mode_is_its_own_cached_artefact_beside_the_default(tmp_path: Path, debs: dict[str, Path]) -> None:
    default = build_guest(tmp_path, source=FakeSource(debs))
    assert load_cached(tmp_path, mode=GuestMode.BENCH) is None
    bench = build_guest(tmp_path, source=FakeSource(debs), mode=GuestMode.BENCH)
    small = build_guest(tmp_path, source=FakeSource(debs), mode=GuestMode.BENCH, bench_mib=8)

    assert (default.mode, default.bench_mib) == (GuestMode.MARKER, None)
    assert (bench.mode, bench.bench_mib, small.bench_mib) == (GuestMode.BENCH, DEFAULT_BENCH_MIB, 8)
    assert bench.kernel_sha256 == default.kernel_sha256
    assert len({default.initramfs_sha256, bench.initramfs_sha256, small.initramfs_sha256}) == 3
    assert bench.initramfs.is_relative_to(tmp_path / guest.VARIANTS_DIR / f"bench-{DEFAULT_BENCH_MIB}")
    assert small.initramfs.is_relative_to(tmp_path / guest.VARIANTS_DIR / "bench-8")

    members = {name: initramfs_members(image) for name, image in [("d", default), ("b", bench), ("s", small)]}
    assert not [n for n in members["d"] if n.startswith("etc")]
    assert members["b"]["etc/passivisor-guest-mode"] == b"bench\n"
    assert members["b"]["etc/passivisor-bench-mib"] == f"{DEFAULT_BENCH_MIB}\n".encode()
    assert members["s"]["etc/passivisor-bench-mib"] == b"8\n"
    assert {n: d for n, d in members["b"].items() if not n.startswith("etc")} == members["d"]

    # Building one mode evicted no other, and each is served from its cache without the network.
    assert build_guest(tmp_path, source=OfflineSource()) == default
    assert build_guest(tmp_path, source=OfflineSource(), mode=GuestMode.BENCH) == bench
    assert load_cached(tmp_path, mode=GuestMode.BENCH, bench_mib=8) == small
    marker = json.loads((tmp_path / guest.VARIANTS_DIR / "bench-8" / guest.MARKER_NAME).read_text())
    assert (marker["mode"], marker["bench_mib"]) == ("bench", 8)
    assert marker["recipe"] == guest.recipe_digest(GuestMode.BENCH, 8)


def test_the_recipe_digest_depends_on_the_mode() -> None:
    digests = {
        guest.recipe_digest(),
        guest.recipe_digest(GuestMode.BENCH),
        guest.recipe_digest(GuestMode.BENCH, DEFAULT_BENCH_MIB + 1),
    }
    assert len(digests) == 3
    assert guest.recipe_digest(GuestMode.BENCH) == guest.recipe_digest(GuestMode.BENCH, DEFAULT_BENCH_MIB)


@pytest.mark.parametrize(
    ("mode", "bench_mib"),
    [
        (GuestMode.MARKER, 32),
        (GuestMode.BENCH, 0),
        (GuestMode.BENCH, -1),
        (GuestMode.BENCH, guest.MAX_BENCH_MIB + 1),
        (GuestMode.BENCH, True),
        (GuestMode.BENCH, 1.5),
        ("bench", None),
    ],
)
def test_bad_mode_options_are_refused_before_anything_is_touched(tmp_path: Path, mode: Any, bench_mib: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        build_guest(tmp_path / "cache", source=OfflineSource(), mode=mode, bench_mib=bench_mib)
    assert not (tmp_path / "cache").exists()


def test_cli_builds_a_mode_and_refuses_a_bench_size_without_it(
    tmp_path: Path, debs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = build_guest(tmp_path, source=FakeSource(debs), mode=GuestMode.BENCH, bench_mib=4)
    monkeypatch.setattr(guest, "AptPackageSource", OfflineSource)
    assert guest.main(["--cache", str(tmp_path), "--mode", "bench", "--bench-mib", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == image.to_json() and (printed["mode"], printed["bench_mib"]) == ("bench", 4)
    with pytest.raises(SystemExit) as refused:
        guest.main(["--cache", str(tmp_path), "--bench-mib", "4"])
    assert refused.value.code == 2
