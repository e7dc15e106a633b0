"""The size-bounded console log and its follower (hostagent/backends/console.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostagent.backends.console import MAX_LINE_BYTES, MIN_CAP, BoundedLog, LogFollower

CAP = MIN_CAP

chunks = st.lists(
    st.one_of(st.binary(max_size=700), st.text("ab\n", max_size=3000).map(str.encode)), max_size=40
)


@given(chunks)
def test_the_log_never_exceeds_its_cap_and_keeps_the_newest_bytes(tmp_path_factory: pytest.TempPathFactory,
                                                                   writes: list[bytes]) -> None:  # fmt: skip
    path = tmp_path_factory.mktemp("log") / "console.log"
    log = BoundedLog(path, CAP)
    everything = b""
    for chunk in writes:
        log.write(chunk)
        everything += chunk
        content = path.read_bytes()
        assert len(content) <= CAP  # invariant 1
        assert log.size == len(content)
        assert everything.endswith(content)  # invariant 2: a suffix of what was written...
        if content and len(content) < len(everything):  # ...from a line start when something was dropped
            assert everything[len(everything) - len(content) - 1] == ord("\n")
    log.close()


def test_a_large_write_keeps_its_tail(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "c.log", CAP)
    log.write(b"older\n")
    data = b"".join(b"%05d\n" % i for i in range(2000))
    log.write(data)
    content = (tmp_path / "c.log").read_bytes()
    assert data.endswith(content) and content.startswith(b"0") and CAP // 2 - 6 <= len(content) <= CAP // 2
    assert log.bytes_dropped == len(b"older\n") + len(data) - len(content)


def test_trimming_zeroes_the_dropped_bytes(tmp_path: Path) -> None:
    """C12: the replaced inode's blocks hold no console bytes once it is let go."""
    path = tmp_path / "c.log"
    log = BoundedLog(path, CAP)
    for _ in range(300):
        log.write(b"secret line\n")  # 3600 bytes in all, under the cap
    old = os.open(path, os.O_RDONLY)  # keeps the old inode readable after the rename
    try:
        log.write(b"x" * 1000)  # forces a trim
        assert os.pread(old, 10_000, 0) == bytes(os.fstat(old).st_size)
        assert b"secret" not in path.read_bytes()[-1000:]
    finally:
        os.close(old)
    assert not list(tmp_path.glob(".*.trim"))


def test_the_file_is_private_and_never_followed_through_a_symlink(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "c.log")
    assert stat.S_IMODE(os.stat(tmp_path / "c.log").st_mode) == 0o600
    log.close()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    (tmp_path / "link.log").symlink_to(target)
    with pytest.raises(OSError):
        BoundedLog(tmp_path / "link.log")
    assert target.read_bytes() == b"keep"


def test_a_restarted_agent_appends_and_trims_an_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"old line\n" * 1000)  # 9000 bytes: larger than the new cap
    log = BoundedLog(path, CAP)
    assert log.size <= CAP // 2 and path.read_bytes().startswith(b"old line\n")
    log.write(b"new\n")
    assert path.read_bytes().endswith(b"old line\nnew\n")


def test_cap_and_closed_state(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BoundedLog(tmp_path / "c.log", MIN_CAP - 1)
    log = BoundedLog(tmp_path / "d.log")
    log.close()
    log.close()  # idempotent
    assert log.closed
    with pytest.raises(ValueError):
        log.write(b"x")


def test_the_follower_hands_out_complete_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    follower = LogFollower(path)
    assert follower.poll() == []  # no file yet
    log = BoundedLog(path, CAP)
    log.write(b"one\r\ntw")
    assert follower.poll() == [b"one"]
    assert follower.poll() == []
    log.write(b"o\nthree\n")
    assert follower.poll() == [b"two", b"three"]


def test_the_follower_starts_over_after_a_trim(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    follower = LogFollower(path)
    log = BoundedLog(path, CAP)
    log.write(b"a" * 99 + b"\n")
    assert follower.poll() == [b"a" * 99]
    for i in range(100):
        log.write(b"line %03d\n" % i + b"." * 60 + b"\n")
    lines = follower.poll()
    assert lines[-1] == b"." * 60 and b"line 099" in lines  # nothing half, the newest present
    assert all(line in (b"." * 60,) or line.startswith(b"line ") or line == b"a" * 99 for line in lines)


def test_the_follower_drops_an_endless_line(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"z" * (MAX_LINE_BYTES + 1))
    follower = LogFollower(path)
    assert follower.poll() == []
    with path.open("ab") as f:
        f.write(b"tail\nnext\n")
    assert follower.poll() == [b"tail", b"next"]  # the overlong prefix is gone, not glued on
