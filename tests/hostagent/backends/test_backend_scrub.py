"""Residual-data scrubbing of a VM's runtime directory (hostagent.backends.scrub, claim C12)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from hostagent.scrub import scrub_tree as scrub
from hostagent.scrub import zero_file


def test_files_are_zeroed_before_they_are_unlinked(tmp_path: Path) -> None:
    runtime = tmp_path / "vm"
    (runtime / "sub").mkdir(parents=True)
    (runtime / "console.log").write_bytes(b"guest secrets\n" * 1000)
    (runtime / "sub" / "scratch").write_bytes(b"more secrets" * 10)
    held = [os.open(runtime / "console.log", os.O_RDONLY), os.open(runtime / "sub" / "scratch", os.O_RDONLY)]
    try:
        scrub(runtime)
        assert not runtime.exists()
        for fd in held:  # the inodes live on through our descriptors: their bytes must be zeros
            size = os.fstat(fd).st_size
            assert size > 0 and os.pread(fd, size, 0) == bytes(size)
    finally:
        for fd in held:
            os.close(fd)


def test_sparse_files_keep_their_holes(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    with path.open("wb") as f:
        f.truncate(1 << 30)  # 1 GiB of hole
        f.seek(1 << 20)
        f.write(b"data" * 1024)
    fd = os.open(path, os.O_RDWR)
    try:
        zero_file(fd)
        assert os.fstat(fd).st_blocks * 512 < 64 << 20  # the holes were not filled in
        assert os.pread(fd, 4096, 1 << 20) == bytes(4096)
    finally:
        os.close(fd)


def test_symlinks_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    (tmp_path / "outside-dir").mkdir()
    (tmp_path / "outside-dir" / "f").write_bytes(b"keep me too")
    runtime = tmp_path / "vm"
    runtime.mkdir()
    (runtime / "link").symlink_to(outside)
    (runtime / "dirlink").symlink_to(tmp_path / "outside-dir")
    scrub(runtime)
    assert not runtime.exists()
    assert outside.read_bytes() == b"keep me"
    assert (tmp_path / "outside-dir" / "f").read_bytes() == b"keep me too"


def test_a_hard_linked_file_is_unlinked_but_not_zeroed(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"an image someone else owns")
    runtime = tmp_path / "vm"
    runtime.mkdir()
    os.link(image, runtime / "image")
    scrub(runtime)
    assert image.read_bytes() == b"an image someone else owns"
    assert not runtime.exists()


def test_sockets_and_fifos_are_removed(tmp_path: Path) -> None:
    runtime = tmp_path / "vm"
    runtime.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(runtime / "qmp.sock"))
    os.mkfifo(runtime / "fifo")  # opening it for writing would block: scrub must not
    scrub(runtime)
    sock.close()
    assert not runtime.exists()


def test_scrub_is_idempotent(tmp_path: Path) -> None:
    scrub(tmp_path / "never-existed")
    runtime = tmp_path / "vm"
    runtime.mkdir()
    scrub(runtime)
    scrub(runtime)
    assert not runtime.exists()
