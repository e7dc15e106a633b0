"""Fuzz target: volume-key envelopes, as the controller checks and opens them (claim C8).

An envelope arrives in AttachVolumeRequest.envelope from the control plane; its bytes are untrusted until
they have been parsed, checked against the attach they came with and opened with the host's key.

Invariant (any violation is a bug in controller/envelope.py; docs/envelope-format.md): for every input
``data``, ``parse(data)`` either raises EnvelopeError of kind MALFORMED or returns an Envelope.  Any
other exception escaping parse is a bug.  Every EnvelopeError carries a detail of at most MAX_DETAIL
printable ASCII characters with no run of 16 hex digits (no echo of input or key bytes).  When parse
returns:

- ``build(envelope) == data`` (canonical: one envelope, one encoding) and ``len(data) == ENVELOPE_SIZE``;
- ``check_binding`` against this target's fixed host, instance and volume either returns, and then the
  envelope names exactly those, or raises EnvelopeError of kind WRONG_HOST, WRONG_INSTANCE or
  WRONG_VOLUME, the first field that differs in that order;
- ``open_envelope`` with this target's fixed host key either raises EnvelopeError of kind DOES_NOT_OPEN
  or returns a 32-byte bytearray, and then ``data`` is one of the envelopes this target wrapped itself
  (WRAPPED) and the key is the one it wrapped: no change to any byte of a sealed envelope opens.

The fixed host key is the RFC 7748 §6.1 "Bob" private key and the first seed is the known-answer vector
of tests/controller/test_envelope.py (ephemeral key "Alice"), so a seed that opens is in the corpus.

Instrumented: controller.envelope only, not the rest of controller (which imports grpc), not
hostagent.wire (whose Record the parse uses) and not construct; see fuzz/_harness.py.
Run: ``python -m fuzz.fuzz_envelope [libFuzzer flags] [corpus dirs]``, or
``python -m fuzz --target fuzz_envelope``.  The seeds and the dictionary are generated:
``python -c 'import fuzz.fuzz_envelope as t; t.write_seeds()'`` (tests/controller/test_envelope.py
checks that the committed files are up to date).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fuzz._harness import fuzz, instrumented

with instrumented(__name__, include=("controller.envelope",)):
    from controller import envelope as ev

# After the block: controller.identity imports controller.envelope, which must be imported under the hook.
from controller.identity import HostIdentity

FUZZ = Path(__file__).resolve().parent
MAX_DETAIL = 256
# Eight bytes or more in hex: what an echo of input or key bytes in a detail would look like.
ECHO = re.compile(r"[0-9a-fA-F]{16}")
Kind = ev.EnvelopeErrorKind

# RFC 7748 §6.1: Bob is the host, Alice the sender's ephemeral key of the known-answer vector.
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
HOST = HostIdentity(X25519PrivateKey.from_private_bytes(BOB_PRIVATE),
                    Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz_envelope signing").digest()))
HOST_PUBLIC = HOST.public_bytes
HOST_FINGERPRINT = ev.host_fingerprint_of(HOST_PUBLIC)
INSTANCE = uuid.UUID("6f1c2a4e-8d3b-4c57-9a10-2b3c4d5e6f70")
VOLUME = uuid.UUID("0d9e8f7a-6b5c-4d3e-af10-11223344aabb")
OTHER_INSTANCE = uuid.UUID("7a2b3c4d-5e6f-4701-8213-243546576879")
OTHER_VOLUME = uuid.UUID("1e2d3c4b-5a69-4788-b9aa-bbccddeeff00")
DATA_KEY = bytes(range(ev.DATA_KEY_SIZE))
OTHER_HOST_PUBLIC = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz_envelope other host").digest()) \
    .public_key().public_bytes_raw()

# X25519 points of small order (libsodium's list): 0, 1, two points of order 8, p-1, p, p+1.
LOW_ORDER_POINTS = tuple(bytes.fromhex(h) for h in (
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
))


def _ephemeral(label: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(f"fuzz_envelope {label}".encode()).digest())


def _wrapped() -> dict[bytes, bytes]:
    """Envelopes wrapped to HOST, each with its data key: the only inputs that may open."""
    cases = [
        (DATA_KEY, INSTANCE, VOLUME, X25519PrivateKey.from_private_bytes(ALICE_PRIVATE)),
        (bytes(32), INSTANCE, VOLUME, _ephemeral("zero key")),
        (b"\xff" * 32, OTHER_INSTANCE, VOLUME, _ephemeral("other instance")),
        (DATA_KEY[::-1], INSTANCE, OTHER_VOLUME, _ephemeral("other volume")),
    ]
    return {ev.wrap(key, HOST_PUBLIC, instance, volume, _ephemeral=ephemeral): key
            for key, instance, volume, ephemeral in cases}


WRAPPED = _wrapped()
KNOWN_ANSWER = next(iter(WRAPPED))


def _check_detail(exc: ev.EnvelopeError) -> None:
    detail = exc.detail
    if (not isinstance(exc.kind, Kind) or len(detail) > MAX_DETAIL or not (detail.isascii() and detail.isprintable())
            or ECHO.search(detail)):
        raise AssertionError(f"malformed EnvelopeError {exc!r}") from exc


def TestOneInput(data: bytes) -> None:
    try:
        envelope = ev.parse(data)
    except ev.EnvelopeError as exc:
        _check_detail(exc)
        if exc.kind is not Kind.MALFORMED:
            raise AssertionError(f"parse raised {exc.kind}") from exc
        return
    if type(envelope) is not ev.Envelope or len(data) != ev.ENVELOPE_SIZE:
        raise AssertionError(f"parse returned {envelope!r} for {len(data)} bytes")
    built = ev.build(envelope)
    if built != data:
        raise AssertionError(f"not canonical: {data.hex()} parses to an envelope that builds {built.hex()}")

    expected_binding = (Kind.WRONG_HOST if envelope.host_fingerprint != HOST_FINGERPRINT
                        else Kind.WRONG_INSTANCE if envelope.instance_id != INSTANCE
                        else Kind.WRONG_VOLUME if envelope.volume_id != VOLUME else None)
    try:
        ev.check_binding(envelope, HOST_FINGERPRINT, INSTANCE, VOLUME)
        binding = None
    except ev.EnvelopeError as exc:
        _check_detail(exc)
        binding = exc.kind
    if binding is not expected_binding:
        raise AssertionError(f"check_binding gave {binding}, expected {expected_binding}")

    # Opened whatever the binding said, so that the seal is fuzzed under every header.
    try:
        key = ev.open_envelope(envelope, HOST.exchange, HOST_PUBLIC)
    except ev.EnvelopeError as exc:
        _check_detail(exc)
        if exc.kind is not Kind.DOES_NOT_OPEN:
            raise AssertionError(f"open_envelope raised {exc.kind}") from exc
        return
    if type(key) is not bytearray or len(key) != ev.DATA_KEY_SIZE:
        raise AssertionError(f"open_envelope returned {type(key).__name__} of {len(key)} bytes")
    expected = WRAPPED.get(data)
    if expected is None or not hmac.compare_digest(key, expected):
        raise AssertionError(f"an envelope this target did not wrap opened: {data.hex()}")
    ev.wipe(key)


def seeds() -> list[bytes]:
    """The seed corpus: envelopes that open, that are bound elsewhere, that do not open, and malformed ones."""
    opens = KNOWN_ANSWER
    other_host = ev.wrap(DATA_KEY, OTHER_HOST_PUBLIC, INSTANCE, VOLUME, _ephemeral=_ephemeral("other host"))
    header, sealed = opens[: ev.HEADER_SIZE], opens[ev.HEADER_SIZE:]
    low_order = [header[:65] + point + sealed for point in LOW_ORDER_POINTS[:2]]
    flipped_tag = opens[:-1] + bytes([opens[-1] ^ 1])
    flipped_high_bit = opens[:96] + bytes([opens[96] ^ 0x80]) + opens[97:]  # bit 255 of ephemeral_public
    malformed = [
        b"",
        opens[:1],
        opens[: ev.HEADER_SIZE],
        opens[:-1],
        opens + b"\x00",
        opens + opens,
        b"\x02" + opens[1:],
        b"\x00" + opens[1:],
        opens[:33] + bytes(16) + opens[49:],  # nil instance_id
        opens[:49] + opens[49:57] + b"\xc0" + opens[58:],  # volume_id of the Microsoft variant
    ]
    return [*WRAPPED, other_host, *low_order, flipped_tag, flipped_high_bit, *malformed]


def _entry(name: str, value: bytes) -> str:
    return f'{name}="' + "".join(f"\\x{byte:02x}" for byte in value) + '"'


def dictionary() -> str:
    """The libFuzzer dictionary: the version, this target's fingerprint and ids, UUID variants, low-order keys."""
    entries = [
        ("version", bytes([ev.VERSION])),
        ("version_next", bytes([ev.VERSION + 1])),
        ("version_zero", b"\x00"),
        ("host_fingerprint", HOST_FINGERPRINT),
        ("other_host_fingerprint", ev.host_fingerprint_of(OTHER_HOST_PUBLIC)),
        ("instance_id", INSTANCE.bytes),
        ("volume_id", VOLUME.bytes),
        ("other_instance_id", OTHER_INSTANCE.bytes),
        ("uuid_nil", bytes(16)),
        # Byte 8 of a UUID holds its variant: 10xxxxxx (RFC 4122 / 9562) is the only one accepted.
        ("uuid_variant_rfc", b"\x80"),
        ("uuid_variant_rfc_max", b"\xbf"),
        ("uuid_variant_ncs", b"\x40"),
        ("uuid_variant_microsoft", b"\xc0"),
        ("host_public", HOST_PUBLIC),
        *((f"low_order_{index}", point) for index, point in enumerate(LOW_ORDER_POINTS)),
    ]
    lines = ["# libFuzzer dictionary for fuzz_envelope; generated by fuzz.fuzz_envelope.dictionary(), do not edit."]
    lines += [_entry(name, value) for name, value in entries]
    return "\n".join(lines) + "\n"


def main() -> None:
    fuzz(TestOneInput)


if __name__ == "__main__":
    main()
