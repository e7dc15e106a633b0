"""The controller's core: one guarded link to the agent, and the errors the API speaks.

Theory of operation.  The controller is the only party that talks to the
agent (claim C1: the agent never connects).  :class:`AgentConnection` owns the
one :class:`~controller.agentlink.AgentLink` and serialises requests on it
(the agent serves one command at a time).  When the link breaks, calls fail
with UNAVAILABLE and the next call after a backoff tries a fresh, fully
authenticated handshake.  An *anomaly* (a malformed, misdirected or
unsolicited frame, or a failed handshake) is behaviour no honest agent shows:
it is counted, reported to an alarm callback, and mutating calls are refused
until a clean handshake succeeds again.

:class:`ControllerError` is the controller's typed error; it names a gRPC
status code by name only, so this module stays free of grpc.  The mapping
from agent error codes to those codes is here and nowhere else.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostagent.wire import messages as m

from .agentlink import AgentLink, AgentLinkError


class Code(enum.Enum):
    """The gRPC status codes the API uses (canonical names)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class Violation:
    field: str
    description: str


@dataclass
class ControllerError(Exception):
    code: Code
    detail: str
    violations: tuple[Violation, ...] = ()
    retry_after_ms: int | None = None
    agent_code: m.ErrorCode | None = None  # the agent's own code, when the agent refused

    def __str__(self) -> str:
        return f"{self.code.value}: {self.detail}"


# The agent's closed set of error codes, as the API reports them.
AGENT_CODES: dict[m.ErrorCode, Code] = {
    m.ErrorCode.MALFORMED_FRAME: Code.INTERNAL,
    m.ErrorCode.UNEXPECTED_MESSAGE: Code.INTERNAL,
    m.ErrorCode.UNKNOWN_INSTANCE: Code.NOT_FOUND,
    m.ErrorCode.INSTANCE_EXISTS: Code.ALREADY_EXISTS,
    m.ErrorCode.INVALID_STATE: Code.FAILED_PRECONDITION,
    m.ErrorCode.INSUFFICIENT_CORES: Code.RESOURCE_EXHAUSTED,
    m.ErrorCode.TOO_MANY_INSTANCES: Code.RESOURCE_EXHAUSTED,
    m.ErrorCode.INSUFFICIENT_MEMORY: Code.RESOURCE_EXHAUSTED,
    m.ErrorCode.IMAGE_NOT_FOUND: Code.NOT_FOUND,
    m.ErrorCode.IMAGE_REJECTED: Code.FAILED_PRECONDITION,
    m.ErrorCode.VOLUME_NOT_FOUND: Code.NOT_FOUND,
    m.ErrorCode.VOLUME_ALREADY_ATTACHED: Code.ALREADY_EXISTS,
    m.ErrorCode.VOLUME_NOT_ATTACHED: Code.FAILED_PRECONDITION,
    m.ErrorCode.TOO_MANY_DEVICES: Code.RESOURCE_EXHAUSTED,
    m.ErrorCode.PF_NOT_FOUND: Code.FAILED_PRECONDITION,
    m.ErrorCode.NO_FREE_VF: Code.RESOURCE_EXHAUSTED,
    m.ErrorCode.VF_NOT_ASSIGNED: Code.FAILED_PRECONDITION,
    m.ErrorCode.DEVICE_REJECTED: Code.FAILED_PRECONDITION,
    m.ErrorCode.BACKEND_FAILURE: Code.INTERNAL,
    m.ErrorCode.TIMEOUT: Code.DEADLINE_EXCEEDED,
    m.ErrorCode.INTERNAL: Code.INTERNAL,
}


class LinkState(enum.Enum):
    UP = "up"
    DOWN = "down"
    ANOMALY = "anomaly"  # refused to serve mutating calls until a clean handshake


@dataclass
class LinkStats:
    requests: int = 0
    reconnects: int = 0
    failures: int = 0
    anomalies: int = 0
    history: list[str] = field(default_factory=list)


class AgentConnection:
    """The controller's one, serialised, self-healing link to the agent."""

    def __init__(self, socket_path: Path, secret: bytes, *, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 on_anomaly: Callable[[str], None] | None = None) -> None:
        self._socket_path = socket_path
        self._secret = secret
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._on_anomaly = on_anomaly or (lambda detail: None)
        self._lock = threading.Lock()
        self._link: AgentLink | None = None
        self._state = LinkState.DOWN
        self._next_attempt = 0.0
        self._delay = backoff_s
        self.stats = LinkStats()

    @property
    def state(self) -> LinkState:
        return self._state

    def request(self, message: m.Message, *, timeout: float, mutating: bool = False,
                fds: Sequence[int] = ()) -> m.Message:
        """Send one command; an agent ERROR answer becomes a ControllerError with the mapped code."""
        with self._lock:
            # After any failure the link is gone: only a new, clean handshake brings it back,
            # which is also what clears an anomaly.
            link = self._link if self._link is not None else self._connect(timeout)
            link.timeout = max(0.001, timeout)
            self.stats.requests += 1
            try:
                answer = link.request(message, fds)
            except AgentLinkError as exc:
                self._broken(exc)
                if exc.timed_out:
                    raise ControllerError(Code.DEADLINE_EXCEEDED, "the agent did not answer in time") from None
                raise ControllerError(Code.UNAVAILABLE, f"agent link broken: {exc.detail}") from None
        if isinstance(answer, m.Error):
            raise ControllerError(AGENT_CODES[answer.code], f"agent refused: {answer.code.name}",
                                  agent_code=answer.code)
        return answer

    def close(self) -> None:
        with self._lock:
            if self._link is not None:
                self._link.close()
                self._link = None
            self._state = LinkState.DOWN

    def _connect(self, timeout: float) -> AgentLink:
        now = time.monotonic()
        if now < self._next_attempt:
            raise ControllerError(Code.UNAVAILABLE, "agent unreachable (backing off)")
        link = AgentLink(self._socket_path, self._secret, timeout=max(0.5, min(timeout, 10.0)))
        try:
            link.connect()
        except AgentLinkError as exc:
            self._broken(exc)
            raise ControllerError(Code.UNAVAILABLE, f"agent unreachable: {exc.detail}") from None
        self._link = link
        self._state = LinkState.UP
        self._delay = self._backoff_s
        self.stats.reconnects += 1
        return link

    def _broken(self, exc: AgentLinkError) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
        self.stats.failures += 1
        if exc.timed_out and not exc.anomaly:
            # One caller's deadline passed: the link is closed (a late answer must never be read as the
            # answer to the next command) but nothing says the agent is unwell, so the next caller
            # reconnects at once instead of being refused for a backoff another caller's deadline caused.
            self._state = LinkState.DOWN if self._state is not LinkState.ANOMALY else self._state
            return
        self._next_attempt = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self._max_backoff_s)
        if exc.anomaly:
            self.stats.anomalies += 1
            self._state = LinkState.ANOMALY
            self._on_anomaly(exc.detail)
        elif self._state is not LinkState.ANOMALY:
            self._state = LinkState.DOWN
