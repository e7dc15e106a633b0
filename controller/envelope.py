"""The volume-key envelope: a volume's data key wrapped to this host's X25519 key (DESIGN.md claim C8; issue 5).

Theory of operation
-------------------
The control plane encrypts each volume with its own 32-byte data key and hands that key to the host only
inside an *envelope*: a fixed 145-byte record (docs/envelope-format.md) that only the holder of the host's
X25519 private key (:class:`controller.identity.HostIdentity`, i.e. this controller) can open::

    offset size field
    0      1    version            = 1
    1      32   host_fingerprint   SHA-256 of the host's raw X25519 public key
    33     16   instance_id        the instance the volume is attached to (RFC 4122 variant, not nil)
    49     16   volume_id          the volume the key decrypts (same rule)
    65     32   ephemeral_public   the sender's one-time X25519 public key
    97     48   sealed             AES-256-GCM(data key) || 16-byte tag

The sender (:func:`wrap`, run by pvctl) makes a fresh ephemeral X25519 key pair per envelope and derives
``key || nonce = HKDF-SHA256(salt="passivisor/envelope/v1", ikm=X25519(ephemeral, host),
info=ephemeral_public || host_public, 44 bytes)``.  The opener (:func:`open_envelope`) computes the same
shared secret from the host's private key and ``ephemeral_public``.  Why each field is there:

- ``version`` selects this key schedule; it is part of the associated data, so it cannot be changed
  to downgrade an envelope to another format.
- ``host_fingerprint`` names the host the key was wrapped to.  It is only a label -- the binding itself is
  cryptographic, because only that host's private key gives the shared secret -- but it lets the
  controller say WRONG_HOST before doing any key agreement, and it is authenticated.
- ``instance_id`` and ``volume_id`` bind the key to one attachment.  They are authenticated, not secret.
- ``ephemeral_public`` is the sender's half of the key agreement.  It enters both the HKDF ``info`` and
  the associated data as the exact 32 bytes received: X25519 ignores bit 255 and accepts non-canonical
  encodings, so two different byte strings can give the same shared secret; binding the bytes makes every
  such variant fail the tag, and the envelope is non-malleable.
- ``sealed`` is the data key under AES-256-GCM with associated data = bytes 0..97 (everything above).

The nonce is derived, not sent.  That is safe because the ephemeral key is fresh for every envelope, so
every envelope has its own (key, nonce) pair and no GCM key is ever used twice.  (The ``_ephemeral``
parameter of :func:`wrap` exists for known-answer tests only; reusing an ephemeral key for two data keys
would reuse a nonce.)

What a replay gets an attacker.  An envelope sent to another host fails the fingerprint check
(WRONG_HOST); rewriting the fingerprint does not help, because the other host's private key does not
give the shared secret and the rewritten header fails the tag (DOES_NOT_OPEN).  An envelope presented
for another instance or volume on the right host fails check_binding (WRONG_INSTANCE, WRONG_VOLUME);
rewriting the ids changes the associated data, so it does not open (DOES_NOT_OPEN).  What the envelope
does *not* do: it does not stop the same envelope from being presented again for the same host, instance
and volume (there is no freshness; whether that attach is allowed is the job of mTLS and policy), and it
does not authenticate the sender -- anyone who knows the host's public key can wrap a key of their own
choosing.  The authority of the key comes from the authenticated AttachVolume call that carries it.

Invariants
----------
- :func:`parse` checks the input's length (exactly :data:`ENVELOPE_SIZE`) before it allocates or reads
  anything, and accepts exactly the bytes that :func:`build` produces (canonical: one envelope, one
  encoding).  It raises :class:`EnvelopeError` of kind MALFORMED and nothing else for any ``bytes``; any
  other exception escaping it is a bug (fuzz/fuzz_envelope.py states this invariant).
- The check order is fixed: parse (MALFORMED), then :func:`check_binding` (WRONG_HOST, WRONG_INSTANCE,
  WRONG_VOLUME, in that order), then :func:`open_envelope` (DOES_NOT_OPEN).  A low-order ephemeral point
  (an all-zero shared secret) and a failed tag are the same DOES_NOT_OPEN, with the same detail: like
  ``cryptography``'s own InvalidTag, the opener learns nothing about why.
- :attr:`EnvelopeError.detail` names a field and a rule; it never echoes input bytes or key material.
- The plaintext data key exists only in ``bytearray`` buffers: the one :func:`open_envelope` returns, which
  the caller wipes with :func:`wipe` when done, and a scratch buffer wiped before returning.  On a failed
  tag every buffer is wiped before the error is raised.

The honest limit: Python cannot promise that intermediate values are erased.  The shared secret, the HKDF
output and the derived AES key and nonce are immutable ``bytes`` (and OpenSSL holds its own copies in
the cipher context) that live until the garbage collector frees them, without being overwritten.  Only the
plaintext data key is kept in a wipeable buffer.  The controller's memory is the trusted zone
(docs/threat-model.md); this module keeps the key out of logs, errors and the wire, not out of RAM.

This is a pure module: no I/O, no grpc.  The layout is a fixed-size :class:`hostagent.wire.fields.Record`,
the project's one strict codec (STYLE.md: only hostagent/wire imports construct), with the same UUID rule
as the agent channel.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hostagent.wire.errors import FrameErrorKind
from hostagent.wire.fields import FixedBytes, Record, Reject, UInt, Uuid, field

__all__ = [
    "DATA_KEY_SIZE",
    "ENVELOPE_SIZE",
    "HEADER_SIZE",
    "VERSION",
    "Envelope",
    "EnvelopeError",
    "EnvelopeErrorKind",
    "build",
    "check_binding",
    "host_fingerprint_of",
    "layout",
    "open_envelope",
    "parse",
    "wipe",
    "wrap",
]

VERSION = 1
DATA_KEY_SIZE = 32
PUBLIC_KEY_SIZE = 32
FINGERPRINT_SIZE = 32
TAG_SIZE = 16
SEALED_SIZE = DATA_KEY_SIZE + TAG_SIZE
ENVELOPE_SIZE = 145
HEADER_SIZE = ENVELOPE_SIZE - SEALED_SIZE
"""Bytes 0..97: the associated data of the AES-GCM seal (everything but ``sealed``)."""

SALT = b"passivisor/envelope/v1"
_AES_KEY_SIZE = 32
_NONCE_SIZE = 12
_GCM_BLOCK = 16


class EnvelopeErrorKind(enum.Enum):
    """Why an envelope was refused.  Closed set; docs/envelope-format.md maps each to a gRPC code."""

    MALFORMED = "malformed"  # not 145 bytes, unknown version, nil or non-RFC 4122 UUID
    WRONG_HOST = "wrong_host"  # wrapped to another host's key (fingerprint mismatch)
    WRONG_INSTANCE = "wrong_instance"  # bound to another instance
    WRONG_VOLUME = "wrong_volume"  # bound to another volume
    DOES_NOT_OPEN = "does_not_open"  # low-order ephemeral key, or the tag does not verify


class EnvelopeError(Exception):
    """An envelope was refused (or could not be built).

    ``kind`` is machine-readable; ``detail`` is short, names a field and a rule, and never contains input
    bytes or key material, so it is safe to log and to return to the caller.
    """

    def __init__(self, kind: EnvelopeErrorKind, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope: every field checked for form, nothing yet checked for binding or opened."""

    version: int
    host_fingerprint: bytes
    instance_id: uuid.UUID
    volume_id: uuid.UUID
    ephemeral_public: bytes
    sealed: bytes

    def __repr__(self) -> str:
        # The sealed key is ciphertext, but there is no reason to put it in a log either.
        return (f"Envelope(version={self.version}, host_fingerprint={self.host_fingerprint.hex()!r}, "
                f"instance_id={self.instance_id}, volume_id={self.volume_id})")


class _Version(UInt):
    """The version byte: only :data:`VERSION`.  The refusal does not echo the byte read."""

    def __init__(self) -> None:
        super().__init__(1, VERSION, VERSION, FrameErrorKind.BAD_VERSION)

    def from_unpacked(self, value: int) -> int:
        if value != VERSION:
            raise Reject(self.kind, f"version: only version {VERSION} is defined")
        return value


class _Identifier(Uuid):
    """A non-nil RFC 4122 UUID (the agent channel's rule), whose refusal names its field."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def from_wire(self, raw: bytes) -> uuid.UUID | None:
        try:
            return super().from_wire(raw)
        except Reject as exc:
            raise Reject(exc.kind, f"{self.name}: {exc}") from None

    def to_wire(self, value: Any) -> bytes:
        if not isinstance(value, uuid.UUID):
            raise Reject(FrameErrorKind.INVALID_IDENTIFIER, f"{self.name}: expected a UUID")
        self.from_wire(value.bytes)  # the same rule both ways
        return value.bytes


_SCHEMA = Record(
    Envelope,
    field("version", _Version(), "Format version; this document defines 1 only."),
    field("host_fingerprint", FixedBytes(FINGERPRINT_SIZE), "SHA-256 of the host's raw X25519 public key."),
    field("instance_id", _Identifier("instance_id"), "The instance the volume is attached to."),
    field("volume_id", _Identifier("volume_id"), "The volume whose data key is sealed."),
    field("ephemeral_public", FixedBytes(PUBLIC_KEY_SIZE), "The sender's one-time X25519 public key."),
    field("sealed", FixedBytes(SEALED_SIZE), "AES-256-GCM ciphertext of the 32-byte data key, then the tag."),
)
if _SCHEMA.sizeof() != ENVELOPE_SIZE:  # the layout and the constants are one fact
    raise ImportError(f"envelope schema is {_SCHEMA.sizeof()} bytes, not {ENVELOPE_SIZE}")

_FIELD_TYPES: tuple[tuple[str, type], ...] = (
    ("version", int), ("host_fingerprint", bytes), ("instance_id", uuid.UUID), ("volume_id", uuid.UUID),
    ("ephemeral_public", bytes), ("sealed", bytes),
)


def layout() -> list[tuple[int, int, str, str]]:
    """(offset, size, name, meaning) of every field, in order: the table of docs/envelope-format.md."""
    rows, offset = [], 0
    for member in _SCHEMA.members:
        size = member.subcon.sizeof()
        rows.append((offset, size, member.name, member.doc))
        offset += size
    return rows


def parse(data: bytes) -> Envelope:
    """Parse an envelope's form; raise :class:`EnvelopeError` of kind MALFORMED for anything else.

    Checks form only: the binding (:func:`check_binding`) and the seal (:func:`open_envelope`) come next.
    """
    if type(data) is not bytes:
        raise ValueError("an envelope is parsed from bytes")
    # The length first, before anything is read or allocated: the format has exactly one size.
    if len(data) != ENVELOPE_SIZE:
        raise EnvelopeError(EnvelopeErrorKind.MALFORMED, f"an envelope is exactly {ENVELOPE_SIZE} bytes")
    try:
        envelope: Envelope = _SCHEMA.parse(data)
    except Reject as exc:
        # With the length fixed, a field rule is the only refusal the record can raise; anything else
        # escaping here is a bug, which the fuzz target reports.
        raise EnvelopeError(EnvelopeErrorKind.MALFORMED, str(exc)) from None
    return envelope


def build(envelope: Envelope) -> bytes:
    """Encode ``envelope``: the canonical inverse of :func:`parse`, under the same rules.

    A field of the wrong Python type is a programming error (``ValueError``); a value that breaks a rule of
    the format (another version, a wrong size, a nil or non-RFC 4122 UUID) is MALFORMED, as in parse.
    """
    _check_types(envelope)
    for name, size in (("host_fingerprint", FINGERPRINT_SIZE), ("ephemeral_public", PUBLIC_KEY_SIZE),
                       ("sealed", SEALED_SIZE)):
        if len(getattr(envelope, name)) != size:
            raise EnvelopeError(EnvelopeErrorKind.MALFORMED, f"{name}: expected {size} bytes")
    if envelope.version != VERSION:
        raise EnvelopeError(EnvelopeErrorKind.MALFORMED, f"version: only version {VERSION} is defined")
    try:
        data: bytes = _SCHEMA.pack(envelope)
    except Reject as exc:
        raise EnvelopeError(EnvelopeErrorKind.MALFORMED, str(exc)) from None
    return data


def _check_types(envelope: Any) -> None:
    if type(envelope) is not Envelope:
        raise ValueError(f"expected an Envelope, got {type(envelope).__name__}")
    for name, expected in _FIELD_TYPES:
        value = getattr(envelope, name)
        # type(), not isinstance, for the version and the byte strings: a bool is not a version, and a
        # bytes subclass could compare or hash differently.
        if not (isinstance(value, uuid.UUID) if expected is uuid.UUID else type(value) is expected):
            raise ValueError(f"Envelope.{name} must be {expected.__name__}, not {type(value).__name__}")


def host_fingerprint_of(host_public: bytes) -> bytes:
    """The raw 32-byte SHA-256 of a host's X25519 public key, as the envelope and GetHostIdentity carry it.

    (:func:`controller.identity.fingerprint_of` is the same digest in lowercase hex.)
    """
    _check_public(host_public, "host_public")
    return hashlib.sha256(host_public).digest()


def _check_public(value: object, name: str) -> None:
    if type(value) is not bytes or len(value) != PUBLIC_KEY_SIZE:
        raise ValueError(f"{name} is a raw {PUBLIC_KEY_SIZE}-byte X25519 public key")


def _check_identifier(value: object, name: str) -> None:
    if not isinstance(value, uuid.UUID):
        raise ValueError(f"{name} must be a uuid.UUID, not {type(value).__name__}")


def _derive(shared: bytes, ephemeral_public: bytes, host_public: bytes) -> tuple[bytes, bytes]:
    """(AES key, GCM nonce) from the shared secret; the exact public-key bytes are bound through ``info``."""
    okm = HKDF(algorithm=hashes.SHA256(), length=_AES_KEY_SIZE + _NONCE_SIZE, salt=SALT,
               info=ephemeral_public + host_public).derive(shared)
    return okm[:_AES_KEY_SIZE], okm[_AES_KEY_SIZE:]


def wrap(data_key: bytes | bytearray, host_public: bytes, instance_id: uuid.UUID, volume_id: uuid.UUID,
         *, _ephemeral: X25519PrivateKey | None = None) -> bytes:
    """Wrap ``data_key`` to the host whose X25519 public key is ``host_public``, bound to one attachment.

    The control-plane side (pvctl).  ``data_key`` is exactly :data:`DATA_KEY_SIZE` bytes and
    ``host_public`` exactly 32 (``ValueError`` otherwise, also for a low-order ``host_public``, which is not
    a key anyone holds); a nil or non-RFC 4122 id is MALFORMED, as parse would say.  ``_ephemeral`` is for
    known-answer tests only: the ephemeral key must be fresh for every envelope (see the module docstring).
    """
    if type(data_key) not in (bytes, bytearray) or len(data_key) != DATA_KEY_SIZE:
        raise ValueError(f"a data key is exactly {DATA_KEY_SIZE} bytes")
    _check_public(host_public, "host_public")
    _check_identifier(instance_id, "instance_id")
    _check_identifier(volume_id, "volume_id")
    ephemeral = X25519PrivateKey.generate() if _ephemeral is None else _ephemeral
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    unsealed = Envelope(VERSION, host_fingerprint_of(host_public), instance_id, volume_id, ephemeral_public,
                        bytes(SEALED_SIZE))
    # Building the header first checks the ids before any key agreement, with parse's own rules.
    associated_data = build(unsealed)[:HEADER_SIZE]
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(host_public))
    except ValueError:
        raise ValueError("host_public is a low-order X25519 point, not a host key") from None
    key, nonce = _derive(shared, ephemeral_public, host_public)
    sealed = AESGCM(key).encrypt(nonce, data_key, associated_data)
    return associated_data + sealed


def check_binding(envelope: Envelope, host_fingerprint: bytes, instance_id: uuid.UUID,
                  volume_id: uuid.UUID) -> None:
    """Check that ``envelope`` was wrapped for this host, instance and volume; raise the first mismatch.

    The order is fixed: WRONG_HOST, then WRONG_INSTANCE, then WRONG_VOLUME.  ``host_fingerprint`` is the
    raw 32-byte digest (:func:`host_fingerprint_of`).  The details name the field only, never either value.
    """
    _check_types(envelope)
    if type(host_fingerprint) is not bytes or len(host_fingerprint) != FINGERPRINT_SIZE:
        raise ValueError(f"host_fingerprint is a raw {FINGERPRINT_SIZE}-byte SHA-256 digest")
    _check_identifier(instance_id, "instance_id")
    _check_identifier(volume_id, "volume_id")
    # Constant time, as for any digest compared against attacker-chosen bytes; the ids are not secret.
    if not hmac.compare_digest(envelope.host_fingerprint, host_fingerprint):
        raise EnvelopeError(EnvelopeErrorKind.WRONG_HOST, "host_fingerprint: wrapped to another host's key")
    if envelope.instance_id != instance_id:
        raise EnvelopeError(EnvelopeErrorKind.WRONG_INSTANCE, "instance_id: bound to another instance")
    if envelope.volume_id != volume_id:
        raise EnvelopeError(EnvelopeErrorKind.WRONG_VOLUME, "volume_id: bound to another volume")


_DOES_NOT_OPEN = "sealed: does not open with this host's key"


def open_envelope(envelope: Envelope, exchange: Callable[[X25519PublicKey], bytes],
                  host_public: bytes) -> bytearray:
    """Unseal the data key: a new ``bytearray`` of :data:`DATA_KEY_SIZE` bytes that the caller must :func:`wipe`.

    ``exchange`` is :meth:`controller.identity.HostIdentity.exchange` (X25519 with the host's private key)
    and ``host_public`` that identity's ``public_bytes``.  A low-order ephemeral key (``exchange`` raises
    ValueError for the all-zero shared secret) and a tag that does not verify -- another host's key, any
    changed header byte, any changed ciphertext byte -- are both DOES_NOT_OPEN, with the same detail.
    Call :func:`check_binding` first: opening proves the header authentic, not that it names this attach.
    An Envelope made by hand that breaks a rule of the format is MALFORMED, as :func:`build` says, before
    any key agreement.
    """
    associated_data = build(envelope)[:HEADER_SIZE]  # the header, under parse's rules
    _check_public(host_public, "host_public")
    try:
        shared = exchange(X25519PublicKey.from_public_bytes(envelope.ephemeral_public))
    except ValueError:
        raise EnvelopeError(EnvelopeErrorKind.DOES_NOT_OPEN, _DOES_NOT_OPEN) from None
    key, nonce = _derive(shared, envelope.ephemeral_public, host_public)
    ciphertext, tag = envelope.sealed[:DATA_KEY_SIZE], envelope.sealed[DATA_KEY_SIZE:]
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(associated_data)
    # update_into asks for len(data) + block size - 1 bytes of room.  GCM writes the plaintext there before
    # finalize checks the tag, so the scratch buffer holds a candidate key even when the tag fails: it is
    # wiped on every path.  A good key is copied into a buffer of its exact size (no resize can leave a
    # stray copy behind).
    scratch = bytearray(DATA_KEY_SIZE + _GCM_BLOCK - 1)
    try:
        decryptor.update_into(ciphertext, scratch)  # GCM writes exactly len(ciphertext) bytes
        try:
            decryptor.finalize()
        except InvalidTag:
            raise EnvelopeError(EnvelopeErrorKind.DOES_NOT_OPEN, _DOES_NOT_OPEN) from None
        data_key = bytearray(DATA_KEY_SIZE)
        data_key[:] = memoryview(scratch)[:DATA_KEY_SIZE]
        return data_key
    finally:
        wipe(scratch)


def wipe(buffer: bytearray) -> None:
    """Overwrite ``buffer`` with zeros in place (the same object, the same size).

    Best effort, see the module docstring: CPython may hold other copies (a key object's own, ``bytes``
    temporaries), but the buffer itself does not outlive its use with its secret in it.
    """
    if not isinstance(buffer, bytearray):
        raise TypeError(f"only a bytearray can be wiped, not {type(buffer).__name__}")
    # A slice assignment of equal length writes in place; it never reallocates the buffer.
    buffer[:] = bytes(len(buffer))
