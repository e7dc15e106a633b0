"""The QMP monitor transport and error mapping (hostagent/backends/qmp.py), against a scripted fake QEMU.

The fake speaks QMP on one end of a socketpair from a thread with blocking I/O (so that it can
receive descriptors with recvmsg, as QEMU does); the monitor under test gets the other end.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostagent.backends.qmp import (
    MAX_DETAIL,
    QMP_READ_LIMIT,
    CommandFailed,
    Monitor,
    MonitorClosed,
    MonitorProtocolError,
    MonitorTimeout,
    PeerListener,
    bounded,
)

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}
CLOSE = object()
Reply = list[Any]  # dicts to send as JSON, raw bytes to send as they are, or CLOSE


class FakeQemu(threading.Thread):
    """Greets, accepts qmp_capabilities, then answers each command with ``script(command, arguments)``."""

    def __init__(self, sock: socket.socket, script: Callable[[str, dict[str, Any]], Reply],
                 greeting: Any = GREETING) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.sock = sock
        self.script = script
        self.greeting = greeting
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.fds: list[int] = []

    def send(self, item: Any) -> None:
        self.sock.sendall(item if isinstance(item, bytes) else json.dumps(item).encode() + b"\r\n")

    def messages(self, buffer: bytes) -> list[dict[str, Any]]:
        """Complete JSON objects at the front of ``buffer`` (QMP needs no line ends, like QEMU's parser)."""
        decoder, text, found = json.JSONDecoder(), buffer.decode(), []
        position = 0
        while True:
            while position < len(text) and text[position].isspace():
                position += 1
            try:
                message, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                break
            found.append(message)
        self.rest = text[position:].encode()
        return found

    def run(self) -> None:
        try:
            if self.greeting is not None:
                self.send(self.greeting)
            buffer = b""
            while True:
                fds = array.array("i")
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
                if not data:
                    return
                buffer += data
                for message in self.messages(buffer):
                    command, arguments = message["execute"], message.get("arguments", {})
                    self.commands.append((command, arguments))
                    replies = [{"return": {}}] if command == "qmp_capabilities" else self.script(command, arguments)
                    for reply in replies:
                        if reply is CLOSE:
                            self.sock.shutdown(socket.SHUT_RDWR)
                            return
                        if isinstance(reply, dict) and ("return" in reply or "error" in reply) and "id" in message:
                            reply = {**reply, "id": message["id"]}
                        self.send(reply)
                buffer = self.rest
        except OSError:
            return
        finally:
            self.sock.close()


async def connected(script: Callable[[str, dict[str, Any]], Reply], greeting: Any = GREETING,
                    timeout: float = 5.0) -> tuple[Monitor, FakeQemu]:  # fmt: skip
    ours, theirs = socket.socketpair()
    fake = FakeQemu(theirs, script, greeting)
    fake.start()
    monitor = Monitor("test")
    await monitor.start(ours, timeout)
    return monitor, fake


def answers(table: dict[str, Reply]) -> Callable[[str, dict[str, Any]], Reply]:
    return lambda command, _arguments: table[command]


def test_commands_are_answered_after_negotiation() -> None:
    async def scenario() -> None:
        monitor, fake = await connected(answers({"query-status": [{"return": {"status": "running"}}]}))
        assert monitor.is_open
        assert await monitor.execute("query-status", timeout=5) == {"status": "running"}
        assert [c for c, _ in fake.commands] == ["qmp_capabilities", "query-status"]
        await monitor.close()
        assert not monitor.is_open
        await monitor.close()  # idempotent

    asyncio.run(scenario())


def test_a_refusal_is_command_failed_with_a_bounded_printable_detail() -> None:
    desc = "no such host device\x1b[2J" + "x" * 10_000

    async def scenario() -> None:
        monitor, _ = await connected(answers({"device_add": [{"error": {"class": "GenericError", "desc": desc}}],
                                              "query-status": [{"return": {}}]}))  # fmt: skip
        with pytest.raises(CommandFailed) as refused:
            await monitor.execute("device_add", {"driver": "vfio-pci"}, timeout=5)
        assert refused.value.error_class == "GenericError" and refused.value.command == "device_add"
        assert len(refused.value.desc) <= MAX_DETAIL and refused.value.desc.isprintable()
        assert refused.value.desc.startswith("no such host device?[2J")
        assert await monitor.execute("query-status", timeout=5) == {}  # the session carries on
        await monitor.close()

    asyncio.run(scenario())


def test_no_answer_is_a_timeout_and_the_session_survives() -> None:
    async def scenario() -> None:
        monitor, _ = await connected(answers({"system_powerdown": [], "query-status": [{"return": {"ok": 1}}]}))
        with pytest.raises(MonitorTimeout):
            await monitor.execute("system_powerdown", timeout=0.2)
        assert await monitor.execute("query-status", timeout=5) == {"ok": 1}
        await monitor.close()

    asyncio.run(scenario())


def test_an_oversized_message_ends_the_session_as_a_protocol_error() -> None:
    huge = b'{"return": "' + b"a" * (QMP_READ_LIMIT + 10) + b'"}\n'

    async def scenario() -> None:
        monitor, _ = await connected(answers({"query-pci": [huge]}))
        with pytest.raises(MonitorProtocolError) as failed:
            await monitor.execute("query-pci", timeout=5)
        assert isinstance(failed.value.__cause__, Exception)
        assert not monitor.is_open
        with pytest.raises(MonitorProtocolError, match="longer than limit"):  # the root cause sticks
            await monitor.execute("query-status", timeout=1)

    asyncio.run(scenario())


def test_garbage_from_qemu_is_a_protocol_error() -> None:
    async def scenario() -> None:
        monitor, _ = await connected(answers({"query-status": [b"{not json\n"]}))
        with pytest.raises(MonitorProtocolError):
            await monitor.execute("query-status", timeout=5)

    asyncio.run(scenario())


def test_a_hang_up_is_monitor_closed() -> None:
    async def scenario() -> None:
        monitor, _ = await connected(answers({"quit": [CLOSE]}))
        with pytest.raises(MonitorClosed):
            await monitor.execute("quit", timeout=5)
        assert await monitor.wait_closed(1)

    asyncio.run(scenario())


@pytest.mark.parametrize("greeting", [{"hello": 1}, {"QMP": {"version": "7"}}, b"\x00\xff\n"])
def test_a_bad_greeting_is_a_protocol_error(greeting: Any) -> None:
    async def scenario() -> None:
        with pytest.raises(MonitorProtocolError):
            await connected(answers({}), greeting=greeting)

    asyncio.run(scenario())


def test_a_silent_peer_times_out_at_the_greeting() -> None:
    async def scenario() -> None:
        with pytest.raises(MonitorTimeout):
            await connected(answers({}), greeting=None, timeout=0.2)

    asyncio.run(scenario())


def test_a_descriptor_is_passed_with_scm_rights_then_named() -> None:
    async def scenario() -> None:
        monitor, fake = await connected(answers({"getfd": [{"return": {}}]}))
        a, b = socket.socketpair()
        try:
            await monitor.pass_fd(a.fileno(), "nbd-x", timeout=5)
            assert fake.commands[-1] == ("getfd", {"fdname": "nbd-x"})
            assert len(fake.fds) == 1
            assert os.fstat(fake.fds[0]).st_ino == os.fstat(a.fileno()).st_ino  # the same socket
            assert a.fileno() >= 0  # the caller keeps its descriptor
        finally:
            a.close()
            b.close()
            for fd in fake.fds:
                os.close(fd)
        await monitor.close()

    asyncio.run(scenario())


def test_events_reach_taps_and_are_not_queued() -> None:
    shutdown = {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"},
                "timestamp": {"seconds": 1, "microseconds": 2}}  # fmt: skip
    other = {"event": "RTC_CHANGE", "data": {"offset": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}

    async def scenario() -> None:
        monitor, _ = await connected(answers({"system_powerdown": [other] * 50 + [shutdown, {"return": {}}]}))
        seen: list[tuple[str, dict[str, Any]]] = []
        monitor.tap(["SHUTDOWN"], lambda name, data: seen.append((name, dict(data))))
        monitor.tap(["SHUTDOWN"], lambda name, data: 1 / 0)  # a failing callback harms nobody
        await monitor.execute("system_powerdown", timeout=5)
        assert seen == [("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})]
        assert monitor._client.events.empty()  # the library's default listener keeps nothing
        await monitor.close()

    asyncio.run(scenario())


def test_bounded() -> None:
    assert bounded("a\nb\x00c") == "a?b?c"
    assert len(bounded("x" * 1000, 50)) == 50
    assert bounded(12) == "12"


# --- PeerListener ----------------------------------------------------------------------


def test_the_listener_accepts_the_expected_peer_only(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"

    async def scenario() -> None:
        listener = PeerListener(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))  # the test plays QEMU here
        with pytest.raises(MonitorTimeout):  # from the wrong pid: dropped, and nobody else comes
            await listener.accept(expected_pid=os.getpid() + 1_000_000, timeout=0.3)
        assert client.recv(1) == b""  # the intruder was hung up on
        client.close()
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        conn = await listener.accept(expected_pid=os.getpid(), timeout=5)
        conn.close()
        client.close()
        listener.close(unlink=True)
        assert not path.exists()

    asyncio.run(scenario())


def test_the_listener_shares_its_socket_with_qemus_group_when_asked(tmp_path: Path) -> None:
    """QEMU running as another user connects through its group: connect(2) needs write on the inode (C15)."""
    gid = 61_002 if os.geteuid() == 0 else os.getgid()  # not root: only a group of our own may be given
    listener = PeerListener(tmp_path / "qmp.sock", group=gid)
    info = os.lstat(tmp_path / "qmp.sock")
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o660, os.geteuid(), gid)
    listener.close(unlink=True)


def test_the_listener_replaces_a_stale_socket_but_nothing_else(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "qmp.sock"))
    stale.close()  # a socket file nobody listens on: what a dead agent leaves
    PeerListener(tmp_path / "qmp.sock").close(unlink=False)
    assert (tmp_path / "qmp.sock").exists()
    (tmp_path / "file").write_bytes(b"not a socket")
    with pytest.raises(FileExistsError):
        PeerListener(tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"not a socket"


def test_closing_does_not_unlink_a_successor(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    first = PeerListener(path)
    second = PeerListener(path)  # a new agent took over the path
    first.close(unlink=True)
    assert path.exists()
    second.close(unlink=True)
    assert not path.exists()
