"""The authenticated agent channel, sans-IO (claim C11).

Theory of operation.  Both ends hold the same provisioned 32-byte channel
secret.  From it each derives, with HKDF-SHA256, a handshake key that is used
for nothing else.  The handshake is three frames, each with sequence number 0
and no MAC trailer (docs/agent-channel.md has the full argument):

1. controller -> agent  HELLO(Nc)                 Nc: 32 fresh random bytes
2. agent -> controller  CHALLENGE(Na, Pa)         Pa = HMAC(Kh, "agent" | Nc | Na)
3. controller -> agent  PROOF(Pc)                 Pc = HMAC(Kh, "controller" | Nc | Na)

The controller checks Pa before it sends anything derived from the secret; the
agent checks Pc.  Both then derive two session keys from the secret with the
nonces as salt, one per direction, so a frame reflected back to its sender
fails its MAC check.  Every later frame carries HMAC-SHA256 over its header
(which holds the sequence number) and payload.  Sequence numbers start at 1 in
each direction and increase by exactly one: a replayed, reordered or dropped
frame is detected on the next frame and ends the session.

Invariants:
- a :class:`Session` exists only after both proofs checked out;
- every verification is constant-time (cryptography's ``verify``);
- any failure raises :class:`ChannelError` and the object is unusable after
  it: the caller must close the connection;
- authentication failures carry one undifferentiated reason, so a peer
  learns nothing about which check failed; the local log learns the stage.

No I/O happens here: callers feed decoded frames in and write the returned
bytes out.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import wire
from .wire import messages as m

SECRET_SIZE = 32
_LABEL = b"passivisor/v1 "
_HANDSHAKE_INFO = _LABEL + b"handshake key"
_SESSION_INFO = _LABEL + b"session keys"
_AGENT_PROOF = _LABEL + b"agent proof"
_CONTROLLER_PROOF = _LABEL + b"controller proof"


class ChannelFailure(enum.Enum):
    AUTHENTICATION_FAILED = "authentication_failed"  # a proof or a MAC did not verify
    OUT_OF_SEQUENCE = "out_of_sequence"  # authentic frame, wrong sequence number: replay or reorder
    UNEXPECTED_MESSAGE = "unexpected_message"  # a message the protocol does not allow at this point
    BAD_SECRET = "bad_secret"  # noqa: S105 - a failure name, not a secret; the secret file is missing, too open or of the wrong size
    CLOSED = "closed"  # the object already failed once


class ChannelError(Exception):
    """The channel must be closed.  ``failure`` is for local logs and metrics only."""

    def __init__(self, failure: ChannelFailure, detail: str) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.detail = detail


Random = Callable[[int], bytes]


def load_secret(path: Path) -> bytes:
    """Read the channel secret: a regular file of exactly 32 bytes, mode 0600 or stricter.

    The file is opened without following symlinks and checked through the
    open descriptor, so it cannot be swapped between check and read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO cannot block
    except OSError as exc:
        raise ChannelError(ChannelFailure.BAD_SECRET, f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ChannelError(ChannelFailure.BAD_SECRET, f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise ChannelError(ChannelFailure.BAD_SECRET, f"{path} is accessible to group or others (chmod 600)")
        if info.st_size != SECRET_SIZE:
            raise ChannelError(ChannelFailure.BAD_SECRET, f"{path} must hold exactly {SECRET_SIZE} bytes")
        data = os.read(fd, SECRET_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != SECRET_SIZE:
        raise ChannelError(ChannelFailure.BAD_SECRET, f"{path} must hold exactly {SECRET_SIZE} bytes")
    return data


def write_secret(path: Path, secret: bytes) -> None:
    """Create a new secret file with mode 0600 (fails if it exists)."""
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"a channel secret is {SECRET_SIZE} bytes")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)


def _hkdf(secret: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _mac(key: bytes, *parts: bytes) -> hmac.HMAC:
    h = hmac.HMAC(key, hashes.SHA256())
    for part in parts:
        h.update(part)
    return h


def _check_secret(secret: bytes) -> bytes:
    if type(secret) is not bytes or len(secret) != SECRET_SIZE:
        raise ChannelError(ChannelFailure.BAD_SECRET, f"a channel secret is {SECRET_SIZE} bytes")
    return secret


@dataclass(frozen=True)
class _Keys:
    controller_to_agent: bytes
    agent_to_controller: bytes


def _session_keys(secret: bytes, controller_nonce: bytes, agent_nonce: bytes) -> _Keys:
    material = _hkdf(secret, controller_nonce + agent_nonce, _SESSION_INFO, 64)
    return _Keys(material[:32], material[32:])


class Session:
    """An established channel: seals outgoing messages, opens incoming frames."""

    def __init__(self, send_key: bytes, receive_key: bytes, receive_direction: m.Direction) -> None:
        # One keyed HMAC per direction, copied for each frame: keying costs
        # more than hashing a small frame, and a copy carries the key state.
        self._send_mac = hmac.HMAC(send_key, hashes.SHA256())
        self._receive_mac = hmac.HMAC(receive_key, hashes.SHA256())
        self.receive_direction = receive_direction
        self.send_direction = (m.Direction.TO_AGENT if receive_direction is m.Direction.TO_CONTROLLER
                               else m.Direction.TO_CONTROLLER)
        self._next_send = 1
        self._next_receive = 1
        self._failed = False

    def seal(self, message: m.Message) -> bytes:
        """Encode ``message`` as the next frame, with its sequence number and MAC."""
        self._ensure_open()
        frame = wire.Frame(self._next_send, message)
        if frame.spec.direction is not self.send_direction or not frame.spec.authenticated:
            raise ChannelError(ChannelFailure.UNEXPECTED_MESSAGE, f"this end does not send {frame.type.name}")
        region = wire.signed_region(frame)
        self._next_send += 1
        mac = self._send_mac.copy()
        mac.update(region)
        return region + mac.finalize()

    def open(self, frame: wire.Frame) -> m.Message:
        """Check the MAC and sequence number of a decoded frame; return its message."""
        self._ensure_open()
        try:
            if frame.mac is None:
                raise ChannelError(ChannelFailure.UNEXPECTED_MESSAGE, f"{frame.type.name} after the handshake")
            if frame.spec.direction is not self.receive_direction:
                raise ChannelError(ChannelFailure.UNEXPECTED_MESSAGE, f"{frame.type.name} sent the wrong way")
            try:
                region = frame.signed if frame.signed is not None else wire.signed_region(frame)
                mac = self._receive_mac.copy()
                mac.update(region)
                mac.verify(frame.mac)
            except InvalidSignature:
                raise ChannelError(ChannelFailure.AUTHENTICATION_FAILED, "frame MAC") from None
            if frame.seq != self._next_receive:
                raise ChannelError(ChannelFailure.OUT_OF_SEQUENCE,
                                   f"expected sequence {self._next_receive}, got {frame.seq}")
        except ChannelError:
            self._failed = True
            raise
        self._next_receive += 1
        return frame.message

    @property
    def next_send_seq(self) -> int:
        return self._next_send

    @property
    def next_receive_seq(self) -> int:
        return self._next_receive

    def _ensure_open(self) -> None:
        if self._failed:
            raise ChannelError(ChannelFailure.CLOSED, "the session already failed")


class _Handshake:
    def __init__(self, secret: bytes, random: Random) -> None:
        secret = _check_secret(secret)
        self._secret = secret
        self._handshake_key = _hkdf(secret, None, _HANDSHAKE_INFO, 32)
        self._random = random
        self._failed = False

    def _guard(self, frame: wire.Frame, expected: type) -> None:
        if self._failed:
            raise ChannelError(ChannelFailure.CLOSED, "the handshake already failed")
        if type(frame.message) is not expected or frame.seq != 0:
            self._failed = True
            raise ChannelError(ChannelFailure.UNEXPECTED_MESSAGE,
                               f"expected {expected.__name__} with sequence 0, got {frame.type.name}")

    def _verify(self, label: bytes, controller_nonce: bytes, agent_nonce: bytes, proof: bytes) -> None:
        try:
            _mac(self._handshake_key, label, controller_nonce, agent_nonce).verify(proof)
        except InvalidSignature:
            self._failed = True
            raise ChannelError(ChannelFailure.AUTHENTICATION_FAILED, "handshake proof") from None

    def _proof(self, label: bytes, controller_nonce: bytes, agent_nonce: bytes) -> bytes:
        return _mac(self._handshake_key, label, controller_nonce, agent_nonce).finalize()


class ControllerHandshake(_Handshake):
    """The controller's side: ``start()``, then ``on_challenge()`` yields the session."""

    def __init__(self, secret: bytes, random: Random = os.urandom) -> None:
        super().__init__(secret, random)
        self._nonce: bytes | None = None

    def start(self) -> bytes:
        if self._nonce is not None:
            raise ChannelError(ChannelFailure.CLOSED, "the handshake was already started")
        self._nonce = self._random(m.NONCE_SIZE)
        return wire.encode(wire.Frame(0, m.Hello(self._nonce)))

    def on_challenge(self, frame: wire.Frame) -> tuple[bytes, Session]:
        """Verify the agent's proof; return the PROOF frame to send and the session."""
        self._guard(frame, m.Challenge)
        if self._nonce is None:
            self._failed = True
            raise ChannelError(ChannelFailure.UNEXPECTED_MESSAGE, "CHALLENGE before HELLO was sent")
        challenge = frame.message
        assert isinstance(challenge, m.Challenge)
        self._verify(_AGENT_PROOF, self._nonce, challenge.agent_nonce, challenge.agent_proof)
        proof = self._proof(_CONTROLLER_PROOF, self._nonce, challenge.agent_nonce)
        keys = _session_keys(self._secret, self._nonce, challenge.agent_nonce)
        self._failed = True  # single use: a second CHALLENGE is refused
        session = Session(keys.controller_to_agent, keys.agent_to_controller, m.Direction.TO_CONTROLLER)
        return wire.encode(wire.Frame(0, m.Proof(proof))), session


class AgentHandshake(_Handshake):
    """The agent's side: ``on_hello()`` answers, ``on_proof()`` yields the session."""

    def __init__(self, secret: bytes, random: Random = os.urandom) -> None:
        super().__init__(secret, random)
        self._nonces: tuple[bytes, bytes] | None = None

    def on_hello(self, frame: wire.Frame) -> bytes:
        self._guard(frame, m.Hello)
        if self._nonces is not None:
            self._failed = True
            raise ChannelError(ChannelFailure.UNEXPECTED_MESSAGE, "second HELLO")
        hello = frame.message
        assert isinstance(hello, m.Hello)
        agent_nonce = self._random(m.NONCE_SIZE)
        self._nonces = (hello.controller_nonce, agent_nonce)
        proof = self._proof(_AGENT_PROOF, hello.controller_nonce, agent_nonce)
        return wire.encode(wire.Frame(0, m.Challenge(agent_nonce, proof)))

    def on_proof(self, frame: wire.Frame) -> Session:
        self._guard(frame, m.Proof)
        if self._nonces is None:
            self._failed = True
            raise ChannelError(ChannelFailure.UNEXPECTED_MESSAGE, "PROOF before HELLO")
        proof = frame.message
        assert isinstance(proof, m.Proof)
        controller_nonce, agent_nonce = self._nonces
        self._verify(_CONTROLLER_PROOF, controller_nonce, agent_nonce, proof.controller_proof)
        keys = _session_keys(self._secret, controller_nonce, agent_nonce)
        self._failed = True  # single use
        return Session(keys.agent_to_controller, keys.controller_to_agent, m.Direction.TO_AGENT)
