"""The authenticated channel: handshake, MAC and sequence checks (claim C11).

Each attack named in docs/agent-channel.md has a test here: wrong secret on
either side, tampering with any bit, replay, reordering, dropping, reflection,
a man in the middle who rewrites nonces, cross-session replay.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostagent import wire
from hostagent.channel import (
    SECRET_SIZE,
    AgentHandshake,
    ChannelError,
    ChannelFailure,
    ControllerHandshake,
    Session,
    _session_keys,
    load_secret,
    write_secret,
)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
INSTANCE = uuid.UUID("0c3f8a52-7a0e-4d4b-8f61-3f2a9d7e5b10")


def handshake(controller_secret: bytes = SECRET, agent_secret: bytes = SECRET) -> tuple[Session, Session]:
    """Run the three-frame handshake through the real codec; return (controller, agent) sessions."""
    controller = ControllerHandshake(controller_secret)
    agent = AgentHandshake(agent_secret)
    challenge = agent.on_hello(wire.decode(controller.start(), wire.Direction.TO_AGENT))
    proof, controller_session = controller.on_challenge(wire.decode(challenge, wire.Direction.TO_CONTROLLER))
    agent_session = agent.on_proof(wire.decode(proof, wire.Direction.TO_AGENT))
    return controller_session, agent_session


def receive(session: Session, data: bytes) -> wire.Message:
    return session.open(wire.decode(data, session.receive_direction))


def test_commands_and_answers_flow_both_ways_in_sequence() -> None:
    controller, agent = handshake()
    for token in range(1, 6):
        assert receive(agent, controller.seal(wire.Ping(token))) == wire.Ping(token)
        assert receive(controller, agent.seal(wire.Pong(token))) == wire.Pong(token)
    assert controller.next_send_seq == agent.next_receive_seq == 6


def test_the_agent_rejects_a_controller_with_the_wrong_secret() -> None:
    with pytest.raises(ChannelError) as info:
        handshake(controller_secret=OTHER_SECRET)
    # The controller notices first: the agent's proof does not verify, and it
    # stops before revealing a proof of its own.
    assert info.value.failure is ChannelFailure.AUTHENTICATION_FAILED


def test_the_agent_rejects_a_forged_proof() -> None:
    agent = AgentHandshake(SECRET)
    agent.on_hello(wire.decode(ControllerHandshake(OTHER_SECRET).start()))
    with pytest.raises(ChannelError) as info:
        agent.on_proof(wire.Frame(0, wire.Proof(bytes(32))))
    assert info.value.failure is ChannelFailure.AUTHENTICATION_FAILED
    with pytest.raises(ChannelError) as again:
        agent.on_proof(wire.Frame(0, wire.Proof(bytes(32))))
    assert again.value.failure is ChannelFailure.CLOSED


def test_a_man_in_the_middle_who_rewrites_a_nonce_is_detected() -> None:
    controller = ControllerHandshake(SECRET)
    agent = AgentHandshake(SECRET)
    hello = wire.decode(controller.start())
    rewritten = wire.Frame(0, wire.Hello(bytes(32)))
    assert rewritten != hello
    challenge = wire.decode(agent.on_hello(rewritten))
    with pytest.raises(ChannelError) as info:
        controller.on_challenge(challenge)
    assert info.value.failure is ChannelFailure.AUTHENTICATION_FAILED


def test_a_replayed_handshake_does_not_authenticate() -> None:
    """Recording a whole good handshake and replaying PROOF to a new agent session fails: fresh nonce."""
    controller = ControllerHandshake(SECRET)
    agent = AgentHandshake(SECRET)
    hello = wire.decode(controller.start())
    proof, _ = controller.on_challenge(wire.decode(agent.on_hello(hello)))
    fresh_agent = AgentHandshake(SECRET)
    fresh_agent.on_hello(hello)
    with pytest.raises(ChannelError) as info:
        fresh_agent.on_proof(wire.decode(proof))
    assert info.value.failure is ChannelFailure.AUTHENTICATION_FAILED


@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_refused(position: int, bit: int) -> None:
    controller, agent = handshake()
    data = bytearray(controller.seal(wire.StopInstance(INSTANCE, wire.StopMode.GRACEFUL, 30)))
    data[position % len(data)] ^= 1 << bit
    with pytest.raises((wire.FrameError, ChannelError)) as info:
        receive(agent, bytes(data))
    if isinstance(info.value, ChannelError):
        assert info.value.failure is ChannelFailure.AUTHENTICATION_FAILED


def test_replay_reorder_and_drop_end_the_session() -> None:
    controller, agent = handshake()
    first, second, third = (controller.seal(wire.Ping(n)) for n in (1, 2, 3))
    receive(agent, first)
    with pytest.raises(ChannelError) as replay:
        receive(agent, first)
    assert replay.value.failure is ChannelFailure.OUT_OF_SEQUENCE

    controller, agent = handshake()
    first, second, third = (controller.seal(wire.Ping(n)) for n in (1, 2, 3))
    with pytest.raises(ChannelError) as reorder:
        receive(agent, second)
    assert reorder.value.failure is ChannelFailure.OUT_OF_SEQUENCE

    controller, agent = handshake()
    first, second, third = (controller.seal(wire.Ping(n)) for n in (1, 2, 3))
    receive(agent, first)
    with pytest.raises(ChannelError) as dropped:
        receive(agent, third)
    assert dropped.value.failure is ChannelFailure.OUT_OF_SEQUENCE
    with pytest.raises(ChannelError) as closed:
        receive(agent, second)
    assert closed.value.failure is ChannelFailure.CLOSED


def test_a_frame_from_another_session_is_refused() -> None:
    controller_a, _ = handshake()
    _, agent_b = handshake()
    with pytest.raises(ChannelError) as info:
        receive(agent_b, controller_a.seal(wire.Ping(1)))
    assert info.value.failure is ChannelFailure.AUTHENTICATION_FAILED


def test_a_frame_reflected_to_its_sender_is_refused() -> None:
    controller, _ = handshake()
    sealed = wire.decode(controller.seal(wire.Ping(1)))
    with pytest.raises(ChannelError) as info:
        controller.open(sealed)
    assert info.value.failure is ChannelFailure.UNEXPECTED_MESSAGE


def test_directions_use_different_keys() -> None:
    """Defense in depth: even a frame of the right direction, MAC'd with the other direction's key, fails."""
    keys = _session_keys(SECRET, bytes(32), bytes(range(32)))
    assert keys.controller_to_agent != keys.agent_to_controller
    agent_side = Session(keys.agent_to_controller, keys.controller_to_agent, wire.Direction.TO_AGENT)
    # A sender that wrongly uses the agent-to-controller key for a command:
    confused = Session(keys.agent_to_controller, keys.agent_to_controller, wire.Direction.TO_CONTROLLER)
    with pytest.raises(ChannelError) as info:
        receive(agent_side, confused.seal(wire.Ping(1)))
    assert info.value.failure is ChannelFailure.AUTHENTICATION_FAILED


@pytest.mark.parametrize("message", [wire.Pong(1), wire.Hello(bytes(32))])
def test_an_end_seals_only_what_it_may_send(message: wire.Message) -> None:
    controller, _ = handshake()
    with pytest.raises(ChannelError) as info:
        controller.seal(message)
    assert info.value.failure is ChannelFailure.UNEXPECTED_MESSAGE
    assert controller.next_send_seq == 1


def test_handshake_messages_after_the_handshake_are_refused() -> None:
    _, agent = handshake()
    with pytest.raises(ChannelError) as info:
        agent.open(wire.Frame(0, wire.Hello(bytes(32))))
    assert info.value.failure is ChannelFailure.UNEXPECTED_MESSAGE


@pytest.mark.parametrize("frame", [
    wire.Frame(0, wire.Proof(bytes(32))),
    wire.Frame(1, wire.Hello(bytes(32))),
    wire.Frame(1, wire.Ping(1), bytes(32)),
])
def test_the_agent_handshake_accepts_only_hello_first(frame: wire.Frame) -> None:
    agent = AgentHandshake(SECRET)
    with pytest.raises(ChannelError) as info:
        agent.on_hello(frame) if isinstance(frame.message, wire.Hello) else agent.on_proof(frame)
    assert info.value.failure is ChannelFailure.UNEXPECTED_MESSAGE


def test_the_controller_handshake_is_single_use() -> None:
    controller = ControllerHandshake(SECRET)
    agent = AgentHandshake(SECRET)
    challenge = wire.decode(agent.on_hello(wire.decode(controller.start())))
    controller.on_challenge(challenge)
    with pytest.raises(ChannelError) as info:
        controller.on_challenge(challenge)
    assert info.value.failure is ChannelFailure.CLOSED
    with pytest.raises(ChannelError):
        controller.start()


def test_a_challenge_before_hello_is_refused() -> None:
    with pytest.raises(ChannelError) as info:
        ControllerHandshake(SECRET).on_challenge(wire.Frame(0, wire.Challenge(bytes(32), bytes(32))))
    assert info.value.failure is ChannelFailure.UNEXPECTED_MESSAGE


def test_a_second_hello_is_refused() -> None:
    agent = AgentHandshake(SECRET)
    hello = wire.Frame(0, wire.Hello(bytes(32)))
    agent.on_hello(hello)
    with pytest.raises(ChannelError) as info:
        agent.on_hello(hello)
    assert info.value.failure is ChannelFailure.UNEXPECTED_MESSAGE


@pytest.mark.parametrize("secret", [b"", bytes(31), bytes(33), bytearray(32)])
def test_secrets_of_the_wrong_shape_are_refused(secret: bytes) -> None:
    with pytest.raises(ChannelError) as info:
        AgentHandshake(secret)
    assert info.value.failure is ChannelFailure.BAD_SECRET


def test_secret_files_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "channel.key"
    write_secret(path, SECRET)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_secret(path) == SECRET
    with pytest.raises(FileExistsError):
        write_secret(path, SECRET)
    with pytest.raises(ValueError):
        write_secret(tmp_path / "short.key", b"short")


@pytest.mark.parametrize("problem", ["missing", "group_readable", "too_short", "too_long", "symlink", "directory"])
def test_unsafe_secret_files_are_refused(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "channel.key"
    if problem == "symlink":
        target = tmp_path / "real.key"
        write_secret(target, SECRET)
        path.symlink_to(target)
    elif problem == "directory":
        path.mkdir(mode=0o700)
    elif problem != "missing":
        size = {"group_readable": SECRET_SIZE, "too_short": 31, "too_long": 33}[problem]
        path.write_bytes(bytes(size))
        path.chmod(0o640 if problem == "group_readable" else 0o600)
    with pytest.raises(ChannelError) as info:
        load_secret(path)
    assert info.value.failure is ChannelFailure.BAD_SECRET
    assert "\\x" not in str(info.value)  # never echoes file content
