"""The controller's link to the agent against a scripted agent: deadlines, outages, anomalies (claims C1, C2).

The scripted agent is a real Unix-socket listener running the agent's side of
the real handshake (``hostagent.channel.AgentHandshake``); after it, it
follows a script: answer, stay silent, or misbehave.  The controller side is
the production ``AgentConnection`` over the production ``AgentLink``.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.app import AgentConnection, Code, ControllerError, LinkState
from hostagent import wire
from hostagent.channel import AgentHandshake, Session
from hostagent.wire import messages as m

SECRET = bytes(range(32))

Script = Callable[[socket.socket, Session, wire.Frame], None]


def _read_frame(conn: socket.socket, decoder: wire.FrameDecoder) -> wire.Frame | None:
    while (frame := decoder.next_frame()) is None:
        data = conn.recv(4096)
        if not data:
            return None
        decoder.feed(data)
    return frame


class ScriptedAgent:
    """Accepts connections one at a time; each command goes to ``self.script``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.script: Script = answer_pong
        self.connections = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                decoder = wire.FrameDecoder(wire.Direction.TO_AGENT)
                handshake = AgentHandshake(SECRET)
                hello = _read_frame(conn, decoder)
                if hello is None:
                    continue
                conn.sendall(handshake.on_hello(hello))
                proof = _read_frame(conn, decoder)
                if proof is None:
                    continue
                session = handshake.on_proof(proof)
                while (frame := _read_frame(conn, decoder)) is not None:
                    self.script(conn, session, frame)

    def close(self) -> None:
        self._listener.close()


def answer_pong(conn: socket.socket, session: Session, frame: wire.Frame) -> None:
    ping = session.open(frame)
    assert isinstance(ping, m.Ping)
    conn.sendall(session.seal(m.Pong(ping.token)))


def stay_silent(conn: socket.socket, session: Session, frame: wire.Frame) -> None:
    session.open(frame)
    time.sleep(3)  # longer than any deadline below; the controller must not wait for it


def answer_garbage(conn: socket.socket, session: Session, frame: wire.Frame) -> None:
    session.open(frame)
    conn.sendall(b"\xff" * 64)


def answer_wrong_type(conn: socket.socket, session: Session, frame: wire.Frame) -> None:
    session.open(frame)
    conn.sendall(session.seal(m.InstanceList(False, ())))  # a well-formed answer to another command


CURSOR = uuid.UUID("50000000-0000-4000-8000-000000000000")


def answer_page_from(first: uuid.UUID) -> Script:
    """Answer a LIST_INSTANCES with a page of one instance, ``first``, whatever the cursor."""
    def script(conn: socket.socket, session: Session, frame: wire.Frame) -> None:
        assert isinstance(session.open(frame), m.ListInstances)
        conn.sendall(session.seal(m.InstanceList(False, (m.InstanceSummary(first, m.InstanceState.RUNNING, 1, 64),))))
    return script


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[ScriptedAgent]:
    scripted = ScriptedAgent(tmp_path / "agent.sock")
    yield scripted
    scripted.close()


def connection(agent: ScriptedAgent, alarms: list[str] | None = None) -> AgentConnection:
    sink = alarms if alarms is not None else []
    return AgentConnection(agent.path, SECRET, backoff_s=0.2, max_backoff_s=0.2, on_anomaly=sink.append)


def test_a_healthy_agent_answers_on_one_link(agent: ScriptedAgent) -> None:
    link = connection(agent)
    for token in range(1, 4):
        assert link.request(m.Ping(token), timeout=2.0) == m.Pong(token)
    assert link.state is LinkState.UP and agent.connections == 1
    link.close()


def test_the_callers_deadline_bounds_the_agent_hop_and_does_not_penalise_the_next_caller(
        agent: ScriptedAgent) -> None:
    link = AgentConnection(agent.path, SECRET, backoff_s=30.0, max_backoff_s=30.0)
    link.request(m.Ping(1), timeout=2.0)  # connected with a generous timeout first
    agent.script = stay_silent
    started = time.monotonic()
    with pytest.raises(ControllerError) as info:
        link.request(m.Ping(2), timeout=0.3)
    elapsed = time.monotonic() - started
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert elapsed < 1.5, f"a 0.3 s deadline took {elapsed:.2f} s"
    assert link.state is LinkState.DOWN  # the answer may still come: that link is never reused
    # One caller's deadline says nothing about the agent's health: the next caller is not refused for a
    # backoff (30 s here) but served on a fresh, authenticated session once the agent answers again.
    agent.script = answer_pong
    assert link.request(m.Ping(3), timeout=10.0) == m.Pong(3)
    assert link.state is LinkState.UP and agent.connections == 2
    link.close()


def test_an_absent_agent_is_unavailable_then_backoff_then_reconnect(tmp_path: Path) -> None:
    link = AgentConnection(tmp_path / "nobody.sock", SECRET, backoff_s=0.2, max_backoff_s=0.2)
    with pytest.raises(ControllerError) as info:
        link.request(m.Ping(1), timeout=1.0)
    assert info.value.code is Code.UNAVAILABLE
    with pytest.raises(ControllerError) as info:
        link.request(m.Ping(1), timeout=1.0)
    assert info.value.code is Code.UNAVAILABLE and "backing off" in info.value.detail
    scripted = ScriptedAgent(tmp_path / "nobody.sock")
    try:
        time.sleep(0.25)
        assert link.request(m.Ping(2), timeout=1.0) == m.Pong(2)
        assert link.state is LinkState.UP
    finally:
        scripted.close()
        link.close()


@pytest.mark.parametrize("first", [CURSOR, uuid.UUID("4fffffff-ffff-4fff-bfff-ffffffffffff")],
                         ids=["the cursor itself", "before the cursor"])
def test_a_page_that_does_not_start_after_its_cursor_is_an_anomaly(agent: ScriptedAgent, first: uuid.UUID) -> None:
    """A page walk must move forward (docs/wire-format.md, LIST_INSTANCES); an agent that goes back is not followed."""
    alarms: list[str] = []
    link = connection(agent, alarms)
    agent.script = answer_page_from(first)
    with pytest.raises(ControllerError) as info:
        link.request(m.ListInstances(CURSOR), timeout=1.0)
    assert info.value.code is Code.UNAVAILABLE
    assert link.state is LinkState.ANOMALY and len(alarms) == 1 and "page cursor" in alarms[0]
    after = uuid.UUID("50000000-0000-4000-8000-000000000001")
    agent.script = answer_page_from(after)
    time.sleep(0.25)  # the backoff
    assert link.request(m.ListInstances(CURSOR), timeout=1.0) == m.InstanceList(
        False, (m.InstanceSummary(after, m.InstanceState.RUNNING, 1, 64),))
    assert link.request(m.ListInstances(None), timeout=1.0) is not None  # the nil cursor: any first page
    link.close()


@pytest.mark.parametrize("script", [answer_garbage, answer_wrong_type], ids=["garbage", "wrong answer type"])
def test_an_anomaly_raises_the_alarm_until_a_clean_handshake(agent: ScriptedAgent, script: Script) -> None:
    alarms: list[str] = []
    link = connection(agent, alarms)
    agent.script = script
    with pytest.raises(ControllerError) as info:
        link.request(m.Ping(1), timeout=1.0)
    assert info.value.code is Code.UNAVAILABLE
    assert link.state is LinkState.ANOMALY and link.stats.anomalies == 1 and len(alarms) == 1
    agent.script = answer_pong
    time.sleep(0.25)  # the backoff
    assert link.request(m.Ping(2), timeout=1.0) == m.Pong(2)
    assert link.state is LinkState.UP and agent.connections == 2  # a fresh, authenticated session
    link.close()
