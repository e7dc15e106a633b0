"""The QMP monitor of one VM: a Unix socket the agent listens on, and a QMP session over what it accepts.

Theory of operation
-------------------
Three layers, kept apart as in qemu.qmp itself (STYLE.md):

- **Transport** (:class:`PeerListener`): the agent creates, binds and listens on a Unix socket in
  the VM's private runtime directory; QEMU connects to it (``-chardev socket,server=off``). The
  agent never calls connect(2) (claim C1). The listener accepts only a peer whose kernel-reported
  credentials (SO_PEERCRED) name the expected QEMU process; any other peer is closed at once and
  logged as an alarm, because on a passive host nobody else has a reason to connect there. The
  socket file stays the agent's: mode 0600, or 0660 with QEMU's group when QEMU runs as an
  unprivileged user (connect(2) needs write permission on the socket inode; claim C15).
- **Framing** (qemu.qmp's :class:`~qemu.qmp.QMPClient`): JSON objects, one per line. The accepted
  socket is handed to ``QMPClient.connect``, which with a socket object only wraps it in asyncio
  streams (no connect(2) is made). Reads are capped at :data:`QMP_READ_LIMIT` bytes per message
  (the StreamReader limit): QEMU is below the agent in the trust order, and a message larger than
  any reply the agent asks for means the monitor is broken, not that the agent should buffer more.
- **Meaning** (:class:`Monitor`): ``execute`` returns a command's result or raises one subclass of
  :class:`MonitorError`, each wrapping its root cause (``raise ... from``).

Invariants:

1. Every wait has a timeout: accepting (:meth:`PeerListener.accept`, except the console's
   lifelong accept loop, which is cancelled when the VM ends), the QMP greeting and negotiation,
   every command, and every event wait built on :meth:`Monitor.tap`.
2. Memory is bounded: qemu.qmp's default listener, which would queue every event of a VM's life,
   is disabled; events reach the backend only through taps, which keep nothing.
3. Descriptors are passed (SCM_RIGHTS) and claimed with ``getfd`` or ``add-fd`` under one lock, so
   two concurrent passes cannot swap them (both commands take the most recently received descriptor).
4. Error details that came from QEMU are cut to :data:`MAX_DETAIL` printable characters before they
   travel up (to the agent's answers and logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError, Runstate
from qemu.qmp.error import ProtocolError
from qemu.qmp.protocol import ConnectError, StateError

log = logging.getLogger(__name__)

# The largest reply the backend asks for is query-named-block-nodes on a VM with every hot-plug port
# in use: about 1 KiB per node, a few tens of KiB in all. 256 KiB leaves ample room and still bounds
# what one message can make the agent buffer.
QMP_READ_LIMIT = 256 * 1024
MAX_DETAIL = 240
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class MonitorError(Exception):
    """Something went wrong on the monitor; subclasses say what. ``__cause__`` holds the root cause."""


class MonitorTimeout(MonitorError):
    """The monitor did not answer (or the peer did not connect) in time."""


class MonitorClosed(MonitorError):
    """The monitor connection is gone (QEMU exited, closed it, or it was never open)."""


class MonitorProtocolError(MonitorError):
    """QEMU sent something that is not QMP as the agent speaks it (malformed, oversized, unexpected)."""


class CommandFailed(MonitorError):
    """QEMU understood the command and refused it (a QMP error response)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = bounded(error_class, 64)
        self.desc = bounded(desc)
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


def bounded(text: object, limit: int = MAX_DETAIL) -> str:
    """``text`` as a single line of printable characters, at most ``limit`` long."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in str(text)[: limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------


def peer_pid(sock: socket.socket) -> int:
    """The pid the kernel recorded for the process that connected ``sock`` (SO_PEERCRED)."""
    pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(pid)


class PeerListener:
    """A listening Unix stream socket at ``path`` that accepts only the process ``expected_pid``.

    A stale socket file at ``path`` (left by an agent that died) is replaced; any other kind of
    file there is refused, so the listener never deletes something it does not own.
    """

    def __init__(self, path: Path, group: int | None = None) -> None:
        """``group``: the gid QEMU runs with, if it is not the agent's user (the socket becomes 0660)."""
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(path))
            # The group first, then the mode: the group never holds write permission it should not.
            if group is not None:
                os.chown(path, -1, group, follow_symlinks=False)
            os.chmod(path, 0o600 if group is None else 0o660)
            self._sock.listen(1)
            self._sock.setblocking(False)
            self._inode = os.lstat(path).st_ino
        except BaseException:
            self._sock.close()
            raise

    async def accept(self, expected_pid: int, timeout: float | None) -> socket.socket:
        """The next connection from ``expected_pid``; others are closed and logged.

        ``timeout`` None waits until cancelled (only for the console's lifelong accept loop).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                conn, _ = await asyncio.wait_for(loop.sock_accept(self._sock), remaining)
            except TimeoutError as exc:
                raise MonitorTimeout(f"no connection from pid {expected_pid} on {self.path} in {timeout} s") from exc
            except OSError as exc:
                raise MonitorClosed(f"accept on {self.path} failed: {exc}") from exc
            try:
                pid = peer_pid(conn)
            except OSError as exc:
                conn.close()
                log.warning("ALARM: dropped a connection on %s with unreadable credentials: %s", self.path, exc)
                continue
            if pid != expected_pid:
                conn.close()
                log.warning("ALARM: dropped a connection on %s from pid %d (expected %d)", self.path, pid, expected_pid)
                continue
            return conn

    def close(self, *, unlink: bool) -> None:
        """Stop listening; with ``unlink``, also remove the socket file if it is still ours."""
        self._sock.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.path).st_ino == self._inode:
                    os.unlink(self.path)


# --------------------------------------------------------------------------------------------
# Meaning
# --------------------------------------------------------------------------------------------


class _EventTap(EventListener):
    """Hands each matching event to a callback and queues none (qemu.qmp documents ``accept`` as the
    hook to override). The callback runs in the reader task: it must be quick and must not raise."""

    def __init__(self, names: Collection[str], callback: Callable[[str, Mapping[str, Any]], None]) -> None:
        super().__init__(tuple(names))
        self._callback = callback

    def accept(self, event: Message) -> bool:
        if super().accept(event):
            data = event.get("data", {})
            try:
                self._callback(str(event["event"]), data if isinstance(data, Mapping) else {})
            except Exception:
                log.exception("event callback failed for %s", bounded(event.get("event")))
        return False


def _drop_all(_event: Message) -> bool:
    return False


class Monitor:
    """One QMP session with one QEMU process."""

    def __init__(self, name: str) -> None:
        self._client = QMPClient(name, readbuflen=QMP_READ_LIMIT)
        # The default all-events listener queues every event until someone reads it, which nobody
        # does here: filter it to nothing so a long-lived VM cannot grow the agent's memory.
        self._client.events.event_filter = _drop_all
        self._fd_lock = asyncio.Lock()
        self._failure: BaseException | None = None

    @property
    def is_open(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    async def start(self, sock: socket.socket, timeout: float) -> None:
        """Read QEMU's greeting on an accepted socket and negotiate capabilities (qmp_capabilities)."""
        try:
            # With a socket object, QMPClient.connect only wraps it in streams: no connect(2) (C1).
            await asyncio.wait_for(self._client.connect(sock), timeout)
        except TimeoutError as exc:
            sock.close()
            await self._disconnect_quietly()
            raise MonitorTimeout(f"no QMP greeting and negotiation within {timeout} s") from exc
        except ConnectError as exc:
            sock.close()
            root = exc.exc
            what = f"QMP handshake failed: {type(root).__name__}: {bounded(root)}"
            if isinstance(root, ProtocolError | ValueError):
                raise MonitorProtocolError(what) from exc
            raise MonitorClosed(what) from exc

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float) -> Any:
        """Run one command; its ``return`` value, or a :class:`MonitorError`."""
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise CommandFailed(command, exc.error_class, str(exc)) from exc
        except TimeoutError as exc:
            raise MonitorTimeout(f"{command}: no answer within {timeout} s") from exc
        except (ExecInterruptedError, StateError) as exc:
            raise await self._closed(command, exc) from exc
        except ProtocolError as exc:
            raise MonitorProtocolError(f"{command}: {bounded(exc)}") from exc
        except QMPError as exc:  # any other library error: say so, keep the cause
            raise MonitorProtocolError(f"{command}: {type(exc).__name__}: {bounded(exc)}") from exc

    async def _closed(self, command: str, exc: BaseException) -> MonitorError:
        """The error for a command cut off by a lost connection, naming the root cause if known."""
        await self._disconnect_quietly()
        cause = self._failure
        if isinstance(cause, ProtocolError | ValueError):  # ValueError: a line over QMP_READ_LIMIT
            return MonitorProtocolError(f"{command}: monitor failed: {bounded(cause)}")
        what = f"{type(cause).__name__}: {bounded(cause)}" if cause is not None else bounded(exc)
        return MonitorClosed(f"{command}: monitor connection lost ({what})")

    async def pass_fd(self, fd: int, fdname: str, *, timeout: float) -> None:
        """Give QEMU a duplicate of ``fd`` (SCM_RIGHTS) under the name ``fdname`` (QMP ``getfd``).

        The caller keeps ``fd``: QEMU holds its own copy until a command consumes or closes it.
        """
        async with self._fd_lock:
            await self._send_fd(fd, "getfd")
            await self.execute("getfd", {"fdname": fdname}, timeout=timeout)

    async def add_fd(self, fd: int, opaque: str, *, timeout: float) -> int:
        """Put a duplicate of ``fd`` into a new fdset (QMP ``add-fd``); returns the fdset id.

        QEMU then opens ``/dev/fdset/<id>`` by duplicating that descriptor instead of opening a host
        path, so the file needs no permission for QEMU's user (claim C15). The access mode of
        ``fd`` (O_RDONLY, O_RDWR) must be the one QEMU asks for: QEMU matches on it. The caller
        keeps ``fd``, and should ``remove-fd`` the set once it has been opened.
        """
        async with self._fd_lock:
            await self._send_fd(fd, "add-fd")
            result = await self.execute("add-fd", {"opaque": opaque}, timeout=timeout)
        fdset = result.get("fdset-id") if isinstance(result, dict) else None
        if type(fdset) is not int or fdset < 0:
            raise MonitorProtocolError(f"add-fd returned {bounded(result, 80)}")
        return fdset

    async def _send_fd(self, fd: int, command: str) -> None:
        """SCM_RIGHTS ``fd`` to QEMU, for ``command`` to claim next (the caller holds the fd lock)."""
        try:
            self._client.send_fd_scm(fd)
        except StateError as exc:
            raise await self._closed(command, exc) from exc
        except (OSError, QMPError) as exc:
            raise MonitorClosed(f"sending a descriptor failed: {bounded(exc)}") from exc

    def tap(self, names: Collection[str], callback: Callable[[str, Mapping[str, Any]], None]) -> None:
        """Call ``callback(event_name, data)`` for each event named in ``names``, for the session's life."""
        self._client.register_listener(_EventTap(names, callback))

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until QEMU ends the session (EOF); True if it did within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._client.runstate is Runstate.RUNNING:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._client.runstate_changed(), remaining)
        return True

    async def close(self) -> None:
        """End the session (closing the socket); never raises. QEMU stays as it is."""
        await self._disconnect_quietly()

    async def _disconnect_quietly(self) -> None:
        if self._client.runstate is Runstate.IDLE:
            return
        try:
            await self._client.disconnect()
        except Exception as exc:  # the root cause of an earlier failure surfaces here; keep it
            if self._failure is None:
                self._failure = exc
