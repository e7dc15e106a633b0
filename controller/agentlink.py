"""The controller's end of the agent channel (claims C1, C2, C11).

Theory of operation.  The controller is the only party that initiates the
channel: it connects to the agent's socket, runs the controller side of the
handshake (``hostagent.channel``) and then sends one command at a time, each
followed by exactly one answer.  Answers are hostile input: they are decoded
strictly (direction TO_CONTROLLER), their MAC and sequence number checked, and
their type must be one the command can be answered with.  Anything else is an
anomaly: the link is closed and :class:`AgentLinkError` raised with
``anomaly=True`` so the caller can raise an alarm and refuse mutating calls
until a clean handshake succeeds again.

Blocking I/O; a request's ``timeout`` (set per call by the caller, from the
gRPC deadline) bounds the whole send-and-answer exchange.  One request at a
time (callers serialise).
"""

from __future__ import annotations

import array
import contextlib
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from hostagent import wire
from hostagent.channel import ChannelError, ControllerHandshake, Session
from hostagent.wire import messages as m

# Which answers each command may get (ERROR is always possible).
ANSWERS: dict[type, tuple[type, ...]] = {
    m.Ping: (m.Pong,),
    m.StartInstance: (m.InstanceInfo,),
    m.StopInstance: (m.InstanceInfo,),
    m.AttachVolume: (m.VolumeStatus,),
    m.DetachVolume: (m.VolumeStatus,),
    m.AssignVf: (m.VfStatus,),
    m.ReleaseVf: (m.VfStatus,),
    m.DescribeInstance: (m.InstanceInfo,),
    m.ListInstances: (m.InstanceList,),
    m.GetMetrics: (m.Metrics,),
    m.GetEvents: (m.Events,),
}


def _within_cursor(command: m.Message, answer: m.Message) -> bool:
    """An INSTANCE_LIST page starts after the cursor it was asked for (docs/wire-format.md, LIST_INSTANCES).

    The codec already made the page strictly ordered, so checking its first entry checks them all; a
    page walk therefore always moves forward, whatever the agent answers.
    """
    if not isinstance(command, m.ListInstances) or not isinstance(answer, m.InstanceList):
        return True
    return (command.after is None or not answer.instances
            or answer.instances[0].instance_id.bytes > command.after.bytes)


class AgentLinkError(Exception):
    """The link is unusable.  ``anomaly`` marks behaviour no honest agent shows."""

    def __init__(self, detail: str, *, anomaly: bool = False, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.anomaly = anomaly
        self.timed_out = timed_out  # the caller's deadline passed before the agent answered


class AgentLink:
    def __init__(self, socket_path: Path, secret: bytes, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self._secret = secret
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._session: Session | None = None
        self._decoder = wire.FrameDecoder(wire.Direction.TO_CONTROLLER)

    @property
    def connected(self) -> bool:
        return self._session is not None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise AgentLinkError(f"agent unreachable at {self.socket_path}: {exc.strerror}") from None
        self._sock = sock
        self._decoder = wire.FrameDecoder(wire.Direction.TO_CONTROLLER)
        try:
            handshake = ControllerHandshake(self._secret)
            self._send(handshake.start())
            proof, session = handshake.on_challenge(self._read_frame())
            self._send(proof)
        except ChannelError as exc:
            self.close()
            raise AgentLinkError(f"agent handshake failed: {exc.failure.value}", anomaly=True) from None
        except AgentLinkError:
            self.close()
            raise
        self._session = session

    def request(self, message: m.Message, fds: Sequence[int] = ()) -> m.Message:
        """Send one command and return the agent's answer (an ERROR answer is returned, not raised)."""
        if self._session is None or self._sock is None:
            raise AgentLinkError("not connected")
        expected = ANSWERS.get(type(message))
        if expected is None:
            raise ValueError(f"{type(message).__name__} is not a command")
        # The caller's deadline bounds the whole exchange, not each system call.
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.settimeout(self.timeout)
            self._send(self._session.seal(message), fds)
            answer = self._session.open(self._read_frame(deadline))
        except ChannelError as exc:
            self.close()
            raise AgentLinkError(f"agent answer refused: {exc.failure.value}", anomaly=True) from None
        except AgentLinkError:
            self.close()
            raise
        if not isinstance(answer, (*expected, m.Error)):
            self.close()
            raise AgentLinkError(f"agent answered {type(message).__name__} with {type(answer).__name__}",
                                 anomaly=True)
        if not _within_cursor(message, answer):
            self.close()
            raise AgentLinkError("agent listed an instance that does not sort after the page cursor", anomaly=True)
        return answer

    def close(self) -> None:
        self._session = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        assert self._sock is not None
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self._sock.sendmsg([data], ancillary)
                self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
        except OSError as exc:
            raise AgentLinkError(f"agent link broken while sending: {exc.strerror or exc}") from None

    def _read_frame(self, deadline: float | None = None) -> wire.Frame:
        assert self._sock is not None
        try:
            while (frame := self._decoder.next_frame()) is None:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    self._sock.settimeout(remaining)
                # The agent answers one frame per request and never passes
                # descriptors back, so reading ahead of the frame is safe here.
                data = self._sock.recv(max(self._decoder.bytes_needed(), 4096))
                if not data:
                    raise AgentLinkError("agent closed the connection")
                self._decoder.feed(data)
        except wire.FrameError as exc:
            raise AgentLinkError(f"malformed frame from the agent: {exc.kind.value}", anomaly=True) from None
        except TimeoutError:
            raise AgentLinkError("agent did not answer in time", timed_out=True) from None
        except OSError as exc:
            raise AgentLinkError(f"agent link broken while reading: {exc.strerror or exc}") from None
        return frame
