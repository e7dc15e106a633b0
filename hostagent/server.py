"""The agent's listener: one Unix socket, one controller session at a time (claims C1, C11).

Theory of operation.  The agent creates, binds and listens on its socket; it
never calls connect(2).  For each accepted connection it checks the peer's uid
(SO_PEERCRED) against the configured controller uid and refuses a second
session while one is open.  A session then runs the handshake of
``channel.py`` and, once authenticated, a strict loop: read exactly one frame,
open it (MAC and sequence), hand the message to the service, seal and send the
one answer.  The agent never sends anything unprompted.

Reads never go past the end of the current frame (``FrameDecoder.bytes_needed``),
so descriptors passed with SCM_RIGHTS arrive with the frame they belong to,
and their number is checked against the frame's ``fd_count``.

Deadlines: the handshake must finish within ``handshake_timeout``; between
frames the controller may stay idle for ``idle_timeout``; once the first byte
of a frame has arrived the whole frame must arrive within ``frame_timeout``
(a peer that sends half a frame and stalls is cut off).

Any violation (malformed frame, bad MAC, replay, wrong uid, timeout) closes
the session with a logged reason, bumps a counter and queues a
SESSION_REJECTED event; running instances and the rest of the state are not
touched, because nothing reaches the service before a frame is fully
validated and authenticated.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import wire
from .channel import AgentHandshake, ChannelError, ChannelFailure, Session
from .service import AgentService
from .wire import messages as m

log = logging.getLogger("passivisor.agent.server")

_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(m.MAX_FDS * _FD_SIZE)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag's & costs a microsecond per frame


class SessionClosed(Exception):
    """The session ended; ``reason`` is for the log and the event."""

    def __init__(self, reason: m.EventReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 5.0
    idle_timeout: float = 300.0
    frame_timeout: float = 5.0


def _hung_up(conn: socket.socket) -> bool:
    """True if the peer of ``conn`` has closed its end (checked without reading)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class FrameChannel:
    """Frame-aligned reads and writes on one non-blocking Unix stream socket.

    Nearly every frame is waited for, so waiting is kept cheap: the socket
    stays registered with the loop between frames (no epoll_ctl per wait),
    and one timer serves every deadline.  Invariants:

    - the loop calls ``_on_readable`` only while the socket is registered;
      if that happens while nobody waits (the peer wrote while a command
      ran), the socket is unregistered at once, so a peer cannot make the
      level-triggered loop spin;
    - ``_timer`` fires at or before ``_deadline``; when it fires early it is
      re-armed, so a wait never outlives its deadline and the common case
      (the idle deadline moving later with each frame) touches no timer;
    - :meth:`close` unregisters the socket before closing it, so a later
      connection that gets the same descriptor number starts clean.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = wire.FrameDecoder(wire.Direction.TO_AGENT)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # loop time at which the current wait fails
        self._timer: asyncio.TimerHandle | None = None

    async def read_frame(self, idle_timeout: float, frame_timeout: float) -> tuple[wire.Frame, list[int]]:
        fds: list[int] = []
        deadline: float | None = None  # set when the first byte of the frame arrives
        try:
            while (frame := self.decoder.next_frame()) is None:
                try:
                    data = await self._receive(self.decoder.bytes_needed(), fds,
                                               self._loop.time() + idle_timeout if deadline is None else deadline)
                except TimeoutError:
                    if deadline is None:
                        raise SessionClosed(m.EventReason.IDLE_TIMEOUT, "idle timeout") from None
                    raise SessionClosed(m.EventReason.IDLE_TIMEOUT, "half-sent frame timed out") from None
                if not data:
                    raise SessionClosed(m.EventReason.NONE,
                                        "peer closed" if deadline is None else "peer closed in mid-frame")
                if deadline is None:
                    deadline = self._loop.time() + frame_timeout
                self.decoder.feed(data)
            if len(fds) != frame.fd_count:
                raise wire.FrameError(wire.FrameErrorKind.FD_COUNT_MISMATCH,
                                      f"{frame.type.name} declares {frame.fd_count} descriptors, "
                                      f"{len(fds)} arrived")
            return frame, fds
        except BaseException:
            _close_all(fds)
            raise

    async def _receive(self, size: int, fds: list[int], deadline: float) -> bytes:
        """One recvmsg of at most ``size`` bytes; waits (until ``deadline``) only if nothing is there yet."""
        while True:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(size, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await self._readable(deadline)
                continue
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                    fds.extend(received)
            if flags & _MSG_CTRUNC or len(fds) > m.MAX_FDS:
                raise wire.FrameError(wire.FrameErrorKind.FD_COUNT_MISMATCH, "too many descriptors")
            return data

    async def _readable(self, deadline: float) -> None:
        """Wait until the socket is readable; TimeoutError at ``deadline`` (loop time).

        A bare future, not ``asyncio.wait_for``: that would create a task and
        cost an extra turn of the event loop on every read.
        """
        # Registering again when registered makes no system call; it replaces
        # the callback and cancels a call the loop queued before the last read
        # (a stale "readable" that would wake this wait for nothing).
        self._loop.add_reader(self._fd, self._on_readable)
        self._deadline = deadline
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        if self._waiter is None:
            # Nobody reads now (a command is running): stop watching until the
            # next wait, or the level-triggered loop would call this every turn.
            self._loop.remove_reader(self._fd)
        elif not self._waiter.done():
            self._waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # the next wait arms a new timer
        if self._loop.time() >= self._deadline:
            self._waiter.set_exception(TimeoutError())
        else:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)  # a no-op if it is not registered
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.sock.close()

    async def send(self, data: bytes, timeout: float) -> None:
        """Write one frame; a peer that stops reading is cut off after ``timeout``."""
        try:
            sent = self.sock.send(data)  # an answer almost always fits the socket buffer at once
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        try:
            await asyncio.wait_for(self._loop.sock_sendall(self.sock, data[sent:]), timeout)
        except TimeoutError:
            raise SessionClosed(m.EventReason.IDLE_TIMEOUT, "peer stopped reading its answers") from None


class AgentServer:
    def __init__(self, service: AgentService, *, socket_path: Path, secret: bytes, controller_uid: int,
                 limits: Limits | None = None) -> None:
        self.service = service
        self.socket_path = socket_path
        self.secret = secret
        self.controller_uid = controller_uid
        self.limits = limits or Limits()
        self._listener: socket.socket | None = None
        self._socket_inode: int | None = None
        self._busy = False
        self._current: tuple[asyncio.Task[None], socket.socket] | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()

    def bind(self) -> None:
        """Create the listening socket (before the seccomp filter is installed)."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        listener.listen(4)
        self._listener = listener
        self._socket_inode = os.stat(self.socket_path).st_ino

    async def serve(self) -> None:
        """Accept connections until :meth:`stop` is called."""
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        accepting = loop.create_task(self._accept_loop(self._listener))
        await self._stopped.wait()
        accepting.cancel()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(accepting, *self._sessions, return_exceptions=True)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            # Only our own socket: never pull the name from under another process.
            if os.stat(self.socket_path).st_ino == self._socket_inode:
                self.socket_path.unlink()

    def stop(self) -> None:
        self._stopped.set()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            if self._current is not None and _hung_up(self._current[1]):
                # The controller closed its old connection and reconnected before
                # the session task read the end: finish that session first.
                task, _ = self._current
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            refusal = self._refusal(conn)
            if refusal is not None:
                log.warning("connection refused: %s", refusal)
                conn.close()
                self.service.session_rejected(m.EventReason.AUTH_FAILED if "uid" in refusal
                                              else m.EventReason.PROTOCOL_VIOLATION)
            else:
                self._busy = True
                task = loop.create_task(self._run(conn))
                self._current = (task, conn)
                self._sessions.add(task)
                task.add_done_callback(self._sessions.discard)
            # sock_accept returns at once while connections are queued: yield, so
            # that a flood of connections cannot starve the open session.
            await asyncio.sleep(0)

    def _refusal(self, conn: socket.socket) -> str | None:
        credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", credentials)
        if uid != self.controller_uid:
            return f"peer uid {uid} (pid {pid}) is not the controller uid"
        if self._busy:
            return f"a controller session is already open (peer pid {pid})"
        return None

    async def _run(self, conn: socket.socket) -> None:
        channel = FrameChannel(conn)
        session: Session | None = None
        try:
            session = await self._handshake(channel)
            log.info("controller session established")
            while True:
                frame, fds = await channel.read_frame(self.limits.idle_timeout, self.limits.frame_timeout)
                try:
                    message = session.open(frame)
                    answer = await self.service.handle(message, fds)
                finally:
                    _close_all(fds)  # a backend that keeps a descriptor has its own duplicate
                await channel.send(session.seal(answer), self.limits.frame_timeout)
        except SessionClosed as exc:
            log.info("session closed: %s", exc.detail)
            if exc.reason is not m.EventReason.NONE:
                self.service.session_rejected(exc.reason)
        except wire.FrameError as exc:
            log.warning("session closed: malformed frame (%s)", exc.kind.value)
            self.service.counters.frames_rejected += 1
            if session is not None:
                with contextlib.suppress(OSError, ChannelError, SessionClosed):
                    await channel.send(session.seal(m.Error(m.ErrorCode.MALFORMED_FRAME)), self.limits.frame_timeout)
            self.service.session_rejected(m.EventReason.PROTOCOL_VIOLATION)
        except ChannelError as exc:
            log.warning("session closed: %s", exc.failure.value)
            self.service.counters.frames_rejected += 1
            reason = (m.EventReason.AUTH_FAILED if exc.failure is ChannelFailure.AUTHENTICATION_FAILED
                      else m.EventReason.PROTOCOL_VIOLATION)
            self.service.session_rejected(reason)
        except OSError as exc:
            log.info("session closed: %s", exc.strerror)
        except asyncio.CancelledError:
            log.info("session closed: peer hung up")
            if self._stopped.is_set():
                raise
        finally:
            channel.close()
            self._busy = False
            if self._current is not None and self._current[1] is conn:
                self._current = None

    async def _handshake(self, channel: FrameChannel) -> Session:
        handshake = AgentHandshake(self.secret)
        timeout = self.limits.handshake_timeout
        try:
            async with asyncio.timeout(timeout):
                hello, fds = await channel.read_frame(timeout, timeout)
                _close_all(fds)
                await channel.send(handshake.on_hello(hello), timeout)
                try:
                    proof, fds = await channel.read_frame(timeout, timeout)
                except SessionClosed as exc:
                    if exc.reason is not m.EventReason.NONE:
                        raise
                    # What a controller does when the agent's proof fails to verify
                    # under its secret: it hangs up without a PROOF.  Not a normal end.
                    raise SessionClosed(m.EventReason.AUTH_FAILED,
                                        "peer hung up after CHALLENGE (wrong channel secret?)") from None
                _close_all(fds)
                return handshake.on_proof(proof)
        except TimeoutError:
            raise SessionClosed(m.EventReason.IDLE_TIMEOUT, "handshake timed out") from None
