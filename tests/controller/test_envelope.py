"""The volume-key envelope (controller/envelope.py; docs/envelope-format.md; claim C8, issue 5).

Known-answer vector: KNOWN_ANSWER was produced by an independent implementation, Node.js ``crypto``
(v20: ``diffieHellman`` on JWK X25519 keys, ``hkdfSync``, ``createCipheriv('aes-256-gcm')``), from the
RFC 7748 §6.1 keys (host = Bob, ephemeral = Alice), the data key 00 01 .. 1f and the ids below.  It is
checked three ways: recomputed here with plain ``cryptography`` calls (not the module's code), opened by
the module, and reproduced byte for byte by ``wrap`` with the same ephemeral key.

Properties (hypothesis): parse(build(e)) == e; build(parse(b)) == b for every accepted b; parse raises
nothing but EnvelopeError(MALFORMED) for arbitrary bytes and for mutations of valid envelopes.  Every one
of the 1160 single-bit flips of a valid envelope is refused with the kind its field predicts, and none
opens.
"""

from __future__ import annotations

import functools
import hashlib
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from controller import envelope as ev
from controller import identity
from controller.envelope import Envelope, EnvelopeError
from controller.identity import HostIdentity

Kind = ev.EnvelopeErrorKind
ROOT = Path(__file__).resolve().parents[2]

RFC7748_BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
RFC7748_BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
RFC7748_ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
KAT_DATA_KEY = bytes(range(32))
INSTANCE = uuid.UUID("6f1c2a4e-8d3b-4c57-9a10-2b3c4d5e6f70")
VOLUME = uuid.UUID("0d9e8f7a-6b5c-4d3e-af10-11223344aabb")
OTHER_INSTANCE = uuid.UUID("7a2b3c4d-5e6f-4701-8213-243546576879")
OTHER_VOLUME = uuid.UUID("1e2d3c4b-5a69-4788-b9aa-bbccddeeff00")
KNOWN_ANSWER = bytes.fromhex(
    "01f35e5616160a30bf3c6e79fa73c576d40205e8fc3ba4e1c6dcf93e6b98e857b4"  # version, host_fingerprint
    "6f1c2a4e8d3b4c579a102b3c4d5e6f70"  # instance_id
    "0d9e8f7a6b5c4d3eaf1011223344aabb"  # volume_id
    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"  # ephemeral_public (Alice)
    "0e45bcc39576cb00c62968caa0c529f57723dd32db7614884b0af4dd2800adcc"  # sealed: ciphertext
    "12df9116713319723fd4d9b17ffc9485"  # sealed: tag
)
# X25519 points of small order (libsodium's list): 0, 1, two points of order 8, p-1, p, p+1.
LOW_ORDER_POINTS = [bytes.fromhex(h) for h in (
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
)]
# Eight or more bytes in hex: what an echo of input or key bytes in an error would look like.
HEX_RUN = re.compile(r"[0-9a-fA-F]{16}")


def bob() -> HostIdentity:
    return HostIdentity(X25519PrivateKey.from_private_bytes(RFC7748_BOB_PRIVATE), Ed25519PrivateKey.generate())


def alice() -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(RFC7748_ALICE_PRIVATE)


@pytest.fixture(scope="module")
def host() -> HostIdentity:
    return HostIdentity.generate()


@pytest.fixture(scope="module")
def data_key() -> bytes:
    return hashlib.sha256(b"test_envelope data key").digest()


@pytest.fixture(scope="module")
def sealed(host: HostIdentity, data_key: bytes) -> bytes:
    return ev.wrap(data_key, host.public_bytes, INSTANCE, VOLUME)


def fingerprint(identity_: HostIdentity) -> bytes:
    return bytes.fromhex(identity_.fingerprint)


def unseal(data: bytes, host: HostIdentity, instance: uuid.UUID = INSTANCE, volume: uuid.UUID = VOLUME) -> bytearray:
    """The controller's order: parse, check the binding, open."""
    envelope = ev.parse(data)
    ev.check_binding(envelope, fingerprint(host), instance, volume)
    return ev.open_envelope(envelope, host.exchange, host.public_bytes)


def refusal(call: Callable[[], object]) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        call()
    return info.value


# --- The known-answer vector -------------------------------------------------------------------------


def independent_envelope() -> bytes:
    """The v1 format from the written specification, with plain ``cryptography`` calls only."""
    host_public = X25519PrivateKey.from_private_bytes(RFC7748_BOB_PRIVATE).public_key().public_bytes_raw()
    ephemeral = alice()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(host_public))
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=b"passivisor/envelope/v1",
               info=ephemeral_public + host_public).derive(shared)
    header = b"\x01" + hashlib.sha256(host_public).digest() + INSTANCE.bytes + VOLUME.bytes + ephemeral_public
    return header + AESGCM(okm[:32]).encrypt(okm[32:], KAT_DATA_KEY, header)


def test_the_known_answer_is_what_the_specification_gives() -> None:
    assert X25519PrivateKey.from_private_bytes(RFC7748_BOB_PRIVATE).public_key().public_bytes_raw() \
        == RFC7748_BOB_PUBLIC
    assert alice().exchange(X25519PublicKey.from_public_bytes(RFC7748_BOB_PUBLIC)) == RFC7748_SHARED
    assert len(KNOWN_ANSWER) == ev.ENVELOPE_SIZE == 145
    assert independent_envelope() == KNOWN_ANSWER


def test_the_module_opens_the_known_answer() -> None:
    host = bob()
    envelope = ev.parse(KNOWN_ANSWER)
    assert envelope == Envelope(1, hashlib.sha256(RFC7748_BOB_PUBLIC).digest(), INSTANCE, VOLUME,
                                KNOWN_ANSWER[65:97], KNOWN_ANSWER[97:])
    ev.check_binding(envelope, fingerprint(host), INSTANCE, VOLUME)
    key = ev.open_envelope(envelope, host.exchange, host.public_bytes)
    assert type(key) is bytearray and key == KAT_DATA_KEY


@pytest.mark.parametrize("data_key", [KAT_DATA_KEY, bytearray(KAT_DATA_KEY)], ids=["bytes", "bytearray"])
def test_wrap_reproduces_the_known_answer(data_key: bytes | bytearray) -> None:
    assert ev.wrap(data_key, RFC7748_BOB_PUBLIC, INSTANCE, VOLUME, _ephemeral=alice()) == KNOWN_ANSWER


def test_host_fingerprint_is_the_identity_fingerprint_in_raw_bytes() -> None:
    host = bob()
    assert ev.host_fingerprint_of(host.public_bytes) == fingerprint(host) == KNOWN_ANSWER[1:33]
    with pytest.raises(ValueError):
        ev.host_fingerprint_of(host.fingerprint.encode())


# --- Wrap and open ----------------------------------------------------------------------------------


def test_round_trip(host: HostIdentity, data_key: bytes, sealed: bytes) -> None:
    assert len(sealed) == ev.ENVELOPE_SIZE
    assert unseal(sealed, host) == data_key


def test_every_envelope_has_its_own_ephemeral_key(host: HostIdentity, data_key: bytes) -> None:
    """A fresh ephemeral key per envelope is what makes the derived nonce safe."""
    first, second = (ev.parse(ev.wrap(data_key, host.public_bytes, INSTANCE, VOLUME)) for _ in range(2))
    assert first.ephemeral_public != second.ephemeral_public
    assert first.sealed != second.sealed


def test_another_host_is_wrong_host_and_does_not_open(host: HostIdentity, sealed: bytes) -> None:
    other = HostIdentity.generate()
    envelope = ev.parse(sealed)
    assert refusal(lambda: ev.check_binding(envelope, fingerprint(other), INSTANCE, VOLUME)).kind \
        is Kind.WRONG_HOST
    # Past the label: the other host's key does not give the shared secret.
    assert refusal(lambda: ev.open_envelope(envelope, other.exchange, other.public_bytes)).kind \
        is Kind.DOES_NOT_OPEN
    # Rewriting the label to the other host passes its binding check and still does not open there.
    relabelled = ev.build(replace(envelope, host_fingerprint=fingerprint(other)))
    assert refusal(lambda: unseal(relabelled, other)).kind is Kind.DOES_NOT_OPEN


@pytest.mark.parametrize(("instance", "volume", "kind"), [
    (OTHER_INSTANCE, VOLUME, Kind.WRONG_INSTANCE),
    (INSTANCE, OTHER_VOLUME, Kind.WRONG_VOLUME),
    (OTHER_INSTANCE, OTHER_VOLUME, Kind.WRONG_INSTANCE),  # the instance is checked before the volume
])
def test_another_instance_or_volume(host: HostIdentity, sealed: bytes, instance: uuid.UUID, volume: uuid.UUID,
                                    kind: Kind) -> None:
    envelope = ev.parse(sealed)
    assert refusal(lambda: ev.check_binding(envelope, fingerprint(host), instance, volume)).kind is kind
    # Rewriting the ids to the ones asked for passes the binding check, and the seal refuses them.
    rebound = ev.build(replace(envelope, instance_id=instance, volume_id=volume))
    assert refusal(lambda: unseal(rebound, host, instance, volume)).kind is Kind.DOES_NOT_OPEN


def test_the_host_is_checked_first(host: HostIdentity, sealed: bytes) -> None:
    envelope = ev.parse(sealed)
    other = fingerprint(HostIdentity.generate())
    assert refusal(lambda: ev.check_binding(envelope, other, OTHER_INSTANCE, OTHER_VOLUME)).kind is Kind.WRONG_HOST


@pytest.mark.parametrize("point", LOW_ORDER_POINTS + [p[:31] + bytes([p[31] | 0x80]) for p in LOW_ORDER_POINTS],
                         ids=lambda p: p.hex()[:8] + p.hex()[-2:])
def test_a_low_order_ephemeral_key_does_not_open(host: HostIdentity, sealed: bytes, point: bytes) -> None:
    # The exchange itself refuses the point (all-zero shared secret): the path under test is that one.
    with pytest.raises(ValueError):
        host.exchange(X25519PublicKey.from_public_bytes(point))
    envelope = replace(ev.parse(sealed), ephemeral_public=point)
    error = refusal(lambda: ev.open_envelope(envelope, host.exchange, host.public_bytes))
    assert error.kind is Kind.DOES_NOT_OPEN
    # The same detail as a failed tag: the opener learns nothing about why.
    tampered = replace(ev.parse(sealed), sealed=bytes(48))
    assert error.detail == refusal(lambda: ev.open_envelope(tampered, host.exchange, host.public_bytes)).detail


def test_a_non_canonical_ephemeral_key_does_not_open(host: HostIdentity, sealed: bytes) -> None:
    """Bit 255 is ignored by X25519: same shared secret, but the bytes are bound, so the seal refuses it."""
    envelope = ev.parse(sealed)
    flipped = envelope.ephemeral_public[:31] + bytes([envelope.ephemeral_public[31] ^ 0x80])
    assert host.exchange(X25519PublicKey.from_public_bytes(flipped)) == \
        host.exchange(X25519PublicKey.from_public_bytes(envelope.ephemeral_public))
    variant = replace(envelope, ephemeral_public=flipped)
    assert refusal(lambda: ev.open_envelope(variant, host.exchange, host.public_bytes)).kind is Kind.DOES_NOT_OPEN


def test_the_wrong_host_public_key_does_not_open(host: HostIdentity, sealed: bytes) -> None:
    """host_public enters the HKDF info: the opener must pass the key the exchange belongs to."""
    envelope = ev.parse(sealed)
    other_public = HostIdentity.generate().public_bytes
    assert refusal(lambda: ev.open_envelope(envelope, host.exchange, other_public)).kind is Kind.DOES_NOT_OPEN


def expected_kind(byte: int, bit: int) -> Kind:
    """The refusal a flip of ``bit`` of ``byte`` must give, from the layout (docs/envelope-format.md)."""
    if byte == 0:
        return Kind.MALFORMED
    if byte < 33:
        return Kind.WRONG_HOST
    if byte in (33 + 8, 49 + 8) and bit >= 6:  # the two variant bits of a UUID
        return Kind.MALFORMED
    if byte < 49:
        return Kind.WRONG_INSTANCE
    if byte < 65:
        return Kind.WRONG_VOLUME
    return Kind.DOES_NOT_OPEN  # ephemeral_public and sealed


def test_every_single_bit_flip_is_refused_as_its_field_predicts(host: HostIdentity, sealed: bytes) -> None:
    seen = set()
    for byte in range(ev.ENVELOPE_SIZE):
        for bit in range(8):
            flipped = bytearray(sealed)
            flipped[byte] ^= 1 << bit
            error = refusal(functools.partial(unseal, bytes(flipped), host))
            assert error.kind is expected_kind(byte, bit), (byte, bit, error)
            seen.add(error.kind)
    assert seen == set(Kind)


# --- Parse and build ---------------------------------------------------------------------------------


def rfc4122_uuids() -> st.SearchStrategy[uuid.UUID]:
    """Every version, the RFC 4122 variant (st.uuids() also gives the others); never nil by construction."""
    return st.binary(min_size=16, max_size=16).map(
        lambda b: uuid.UUID(bytes=b[:8] + bytes([(b[8] & 0x3F) | 0x80]) + b[9:]))


def envelopes() -> st.SearchStrategy[Envelope]:
    return st.builds(Envelope, st.just(ev.VERSION), st.binary(min_size=32, max_size=32), rfc4122_uuids(),
                     rfc4122_uuids(), st.binary(min_size=32, max_size=32), st.binary(min_size=48, max_size=48))


@st.composite
def near_envelopes(draw: st.DrawFn) -> bytes:
    """145 bytes that are often accepted: random, with the version and both variants set or not."""
    data = bytearray(draw(st.binary(min_size=145, max_size=145)))
    if draw(st.booleans()):
        data[0] = ev.VERSION
    for offset in (41, 57):
        if draw(st.booleans()):
            data[offset] = (data[offset] & 0x3F) | 0x80
    return bytes(data)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """A valid envelope, then bit flips, a truncation or an extension."""
    data = bytearray(ev.build(draw(envelopes())))
    mutation = draw(st.sampled_from(["flip", "truncate", "extend"]))
    if mutation == "flip":
        for position in draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8)):
            data[position // 8] ^= 1 << (position % 8)
    elif mutation == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    else:
        data += draw(st.binary(min_size=1, max_size=160))
    return bytes(data)


@given(envelopes())
def test_parse_inverts_build(envelope: Envelope) -> None:
    data = ev.build(envelope)
    assert len(data) == ev.ENVELOPE_SIZE
    assert ev.parse(data) == envelope


@given(st.one_of(near_envelopes(), mutations()))
def test_build_inverts_parse_on_every_accepted_input(data: bytes) -> None:
    try:
        envelope = ev.parse(data)
    except EnvelopeError as exc:
        assert exc.kind is Kind.MALFORMED
        return
    assert ev.build(envelope) == data


@given(st.one_of(st.binary(max_size=400), near_envelopes(), mutations()))
def test_parse_raises_only_malformed(data: bytes) -> None:
    try:
        ev.parse(data)
    except EnvelopeError as exc:
        assert exc.kind is Kind.MALFORMED
        assert len(exc.detail) <= 80 and not HEX_RUN.search(exc.detail)


def test_near_envelopes_are_accepted_when_fixed_up() -> None:
    """The canonical property above sees accepted inputs, not only refusals."""
    data = bytearray(range(145))
    data[0], data[41], data[57] = 1, 0x80, 0xBF
    assert ev.build(ev.parse(bytes(data))) == bytes(data)


@pytest.mark.parametrize(("data", "detail"), [
    (b"", "exactly 145 bytes"),
    (KNOWN_ANSWER[:-1], "exactly 145 bytes"),
    (KNOWN_ANSWER + b"\x00", "exactly 145 bytes"),
    (KNOWN_ANSWER * 2, "exactly 145 bytes"),
    (b"\x02" + KNOWN_ANSWER[1:], "version"),
    (b"\x00" + KNOWN_ANSWER[1:], "version"),
    (KNOWN_ANSWER[:33] + bytes(16) + KNOWN_ANSWER[49:], "instance_id: nil"),
    (KNOWN_ANSWER[:49] + bytes(16) + KNOWN_ANSWER[65:], "volume_id: nil"),
    (KNOWN_ANSWER[:41] + b"\x40" + KNOWN_ANSWER[42:], "instance_id: UUID variant"),
    (KNOWN_ANSWER[:57] + b"\xc0" + KNOWN_ANSWER[58:], "volume_id: UUID variant"),
], ids=["empty", "short", "trailing", "doubled", "version-2", "version-0", "nil-instance", "nil-volume",
        "ncs-instance", "microsoft-volume"])
def test_parse_refusals(data: bytes, detail: str) -> None:
    error = refusal(lambda: ev.parse(data))
    assert error.kind is Kind.MALFORMED and detail in error.detail


@pytest.mark.parametrize("data", [bytearray(KNOWN_ANSWER), memoryview(KNOWN_ANSWER), KNOWN_ANSWER.hex()],
                         ids=["bytearray", "memoryview", "str"])
def test_parse_takes_bytes_only(data: object) -> None:
    with pytest.raises(ValueError):
        ev.parse(data)  # type: ignore[arg-type]


VALID = ev.parse(KNOWN_ANSWER)


@pytest.mark.parametrize("changes", [
    {"version": 2}, {"version": 0}, {"host_fingerprint": bytes(31)}, {"ephemeral_public": bytes(33)},
    {"sealed": bytes(47)}, {"instance_id": uuid.UUID(int=0)}, {"volume_id": uuid.UUID(int=0)},
    {"instance_id": uuid.UUID("6f1c2a4e-8d3b-4c57-da10-2b3c4d5e6f70")},
], ids=lambda changes: "-".join(f"{k}={v}" for k, v in changes.items())[:40])
def test_build_refuses_what_parse_refuses(changes: dict[str, object]) -> None:
    assert refusal(lambda: ev.build(replace(VALID, **changes))).kind is Kind.MALFORMED  # type: ignore[arg-type]


@pytest.mark.parametrize("changes", [
    {"version": True}, {"version": "1"}, {"host_fingerprint": bytearray(32)}, {"instance_id": str(INSTANCE)},
    {"volume_id": VOLUME.bytes}, {"sealed": None},
], ids=lambda changes: "-".join(f"{k}={type(v).__name__}" for k, v in changes.items()))
def test_build_refuses_wrong_types_as_value_error(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ev.build(replace(VALID, **changes))  # type: ignore[arg-type]


def test_build_takes_an_envelope_only() -> None:
    with pytest.raises(ValueError):
        ev.build(KNOWN_ANSWER)  # type: ignore[arg-type]


# --- The arguments of wrap, check_binding and open_envelope ------------------------------------------


@pytest.mark.parametrize("key", [bytes(31), bytes(33), b"", "k" * 32, memoryview(bytes(32))],
                         ids=["31", "33", "empty", "str", "memoryview"])
def test_wrap_refuses_a_data_key_that_is_not_32_bytes(key: object) -> None:
    with pytest.raises(ValueError):
        ev.wrap(key, RFC7748_BOB_PUBLIC, INSTANCE, VOLUME)  # type: ignore[arg-type]


@pytest.mark.parametrize("point", LOW_ORDER_POINTS[:3], ids=lambda p: p.hex()[:8])
def test_wrap_refuses_a_low_order_host_key(point: bytes) -> None:
    with pytest.raises(ValueError, match="low-order"):
        ev.wrap(KAT_DATA_KEY, point, INSTANCE, VOLUME)


def test_wrap_refuses_bad_hosts_and_ids() -> None:
    for host_public in (RFC7748_BOB_PUBLIC[:31], bytearray(RFC7748_BOB_PUBLIC), RFC7748_BOB_PUBLIC.hex()):
        with pytest.raises(ValueError):
            ev.wrap(KAT_DATA_KEY, host_public, INSTANCE, VOLUME)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ev.wrap(KAT_DATA_KEY, RFC7748_BOB_PUBLIC, str(INSTANCE), VOLUME)  # type: ignore[arg-type]
    assert refusal(lambda: ev.wrap(KAT_DATA_KEY, RFC7748_BOB_PUBLIC, uuid.UUID(int=0), VOLUME)).kind \
        is Kind.MALFORMED
    ncs = uuid.UUID("0d9e8f7a-6b5c-4d3e-2f10-11223344aabb")
    assert refusal(lambda: ev.wrap(KAT_DATA_KEY, RFC7748_BOB_PUBLIC, INSTANCE, ncs)).kind is Kind.MALFORMED


def test_check_binding_and_open_refuse_bad_arguments() -> None:
    host = bob()
    with pytest.raises(ValueError):
        ev.check_binding(VALID, host.fingerprint.encode(), INSTANCE, VOLUME)  # hex, not the raw digest
    with pytest.raises(ValueError):
        ev.check_binding(VALID, fingerprint(host), str(INSTANCE), VOLUME)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ev.check_binding(KNOWN_ANSWER, fingerprint(host), INSTANCE, VOLUME)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ev.open_envelope(VALID, host.exchange, host.public_bytes[:31])
    with pytest.raises(ValueError):
        ev.open_envelope(KNOWN_ANSWER, host.exchange, host.public_bytes)  # type: ignore[arg-type]


def test_open_refuses_a_hand_made_malformed_envelope_before_key_agreement() -> None:
    calls: list[X25519PublicKey] = []

    def exchange(peer: X25519PublicKey) -> bytes:
        calls.append(peer)
        return bytes(32)

    bad = replace(VALID, instance_id=uuid.UUID(int=0))
    assert refusal(lambda: ev.open_envelope(bad, exchange, RFC7748_BOB_PUBLIC)).kind is Kind.MALFORMED
    assert calls == []


def test_an_exchange_failure_other_than_low_order_is_not_swallowed() -> None:
    def broken(peer: X25519PublicKey) -> bytes:
        raise RuntimeError("the key store is gone")

    with pytest.raises(RuntimeError):
        ev.open_envelope(VALID, broken, RFC7748_BOB_PUBLIC)


# --- Nothing secret in errors ------------------------------------------------------------------------


def test_errors_never_show_key_or_envelope_bytes(host: HostIdentity, data_key: bytes, sealed: bytes) -> None:
    envelope = ev.parse(sealed)
    other = HostIdentity.generate()
    tag_flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    errors = [
        refusal(lambda: ev.parse(sealed[:-1])),
        refusal(lambda: ev.parse(b"\x07" + sealed[1:])),
        refusal(lambda: ev.parse(sealed[:41] + b"\x00" + sealed[42:])),
        refusal(lambda: ev.check_binding(envelope, fingerprint(other), INSTANCE, VOLUME)),
        refusal(lambda: ev.check_binding(envelope, fingerprint(host), OTHER_INSTANCE, VOLUME)),
        refusal(lambda: ev.check_binding(envelope, fingerprint(host), INSTANCE, OTHER_VOLUME)),
        refusal(lambda: ev.open_envelope(envelope, other.exchange, other.public_bytes)),
        refusal(lambda: unseal(tag_flipped, host)),
        refusal(lambda: ev.open_envelope(replace(envelope, ephemeral_public=bytes(32)), host.exchange,
                                         host.public_bytes)),
    ]
    assert {error.kind for error in errors} == set(Kind)
    secrets = [data_key, sealed, envelope.sealed, envelope.host_fingerprint, envelope.ephemeral_public,
               fingerprint(other)]
    for error in errors:
        for text in (error.detail, str(error), repr(error)):
            assert not HEX_RUN.search(text), text
            assert text.isascii() and text.isprintable()
            for secret in secrets:
                assert secret.hex() not in text and secret.decode("latin-1") not in text
            assert str(INSTANCE) not in text and str(OTHER_INSTANCE) not in text
        # No chained exception (an InvalidTag, a construct error) travels with it and its bytes.
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_the_envelope_repr_leaves_out_the_key_material(sealed: bytes) -> None:
    envelope = ev.parse(sealed)
    assert envelope.sealed.hex() not in repr(envelope) and envelope.ephemeral_public.hex() not in repr(envelope)
    assert str(envelope.instance_id) in repr(envelope)


# --- Wiping ------------------------------------------------------------------------------------------


def test_wipe_zeroes_the_same_buffer_in_place() -> None:
    buffer = bytearray(b"a data key that must not linger!")
    view = memoryview(buffer)  # an export: a resize would fail, an in-place write does not
    ev.wipe(buffer)
    assert buffer == bytes(32) and view.tobytes() == bytes(32) and len(buffer) == 32
    view.release()
    with pytest.raises(TypeError):
        ev.wipe(b"immutable")  # type: ignore[arg-type]


def test_identity_uses_the_same_wipe() -> None:
    assert vars(identity)["_wipe"] is ev.wipe


class Spy:
    """Wraps ev.wipe: records each buffer and what it held just before it was wiped."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytearray, bytes]] = []

    def __call__(self, buffer: bytearray) -> None:
        self.calls.append((buffer, bytes(buffer)))
        real_wipe(buffer)


real_wipe = ev.wipe


def test_a_failed_tag_wipes_the_plaintext_it_decrypted(host: HostIdentity, data_key: bytes, sealed: bytes,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the tag is changed, so the streaming decryptor writes the *real* key before finalize refuses it."""
    spy = Spy()
    monkeypatch.setattr(ev, "wipe", spy)
    tag_flipped = replace(ev.parse(sealed), sealed=ev.parse(sealed).sealed[:-1] + bytes([sealed[-1] ^ 1]))
    assert refusal(lambda: ev.open_envelope(tag_flipped, host.exchange, host.public_bytes)).kind \
        is Kind.DOES_NOT_OPEN
    assert len(spy.calls) == 1
    buffer, held = spy.calls[0]
    assert held[:32] == data_key  # the secret really was in the buffer ...
    assert buffer == bytes(len(buffer))  # ... and is gone


def test_a_successful_open_wipes_its_scratch(host: HostIdentity, data_key: bytes, sealed: bytes,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy()
    monkeypatch.setattr(ev, "wipe", spy)
    key = ev.open_envelope(ev.parse(sealed), host.exchange, host.public_bytes)
    assert key == data_key
    (scratch, held), = spy.calls
    assert scratch is not key and held[:32] == data_key and scratch == bytes(len(scratch))
    real_wipe(key)
    assert key == bytes(32)


# --- The format document and the fuzz target ---------------------------------------------------------


def test_the_document_has_the_layout_of_the_code() -> None:
    text = (ROOT / "docs" / "envelope-format.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| `(\w+)` \|", text, re.MULTILINE)
    assert [(int(offset), int(size), name) for offset, size, name in rows] == \
        [(offset, size, name) for offset, size, name, _ in ev.layout()]
    assert sum(size for _, size, _, _ in ev.layout()) == ev.ENVELOPE_SIZE
    for kind, code in [("MALFORMED", "INVALID_ARGUMENT"), ("DOES_NOT_OPEN", "INVALID_ARGUMENT"),
                       ("WRONG_HOST", "PERMISSION_DENIED"), ("WRONG_INSTANCE", "PERMISSION_DENIED"),
                       ("WRONG_VOLUME", "PERMISSION_DENIED")]:
        assert re.search(rf"^\| `{kind}` \|.*`{code}`", text, re.MULTILINE), kind


def test_the_documented_snippet_wraps_a_key_the_module_opens(tmp_path: Path) -> None:
    """The by-hand snippet in docs/envelope-format.md is correct: run it, open what it prints."""
    text = (ROOT / "docs" / "envelope-format.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert snippet is not None
    host = bob()
    script = tmp_path / "wrap_by_hand.py"
    script.write_text(snippet.group(1))
    completed = subprocess.run(
        [sys.executable, str(script), host.public_bytes.hex(), str(INSTANCE), str(VOLUME), KAT_DATA_KEY.hex()],
        capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert unseal(bytes.fromhex(completed.stdout.strip()), host) == KAT_DATA_KEY


def test_the_fuzz_seeds_and_dictionary_are_up_to_date() -> None:
    target = pytest.importorskip("fuzz.fuzz_envelope")
    corpus = ROOT / "fuzz" / "corpus" / "fuzz_envelope"
    expected = {hashlib.sha1(data, usedforsecurity=False).hexdigest() for data in target.seeds()}
    assert {path.name for path in corpus.iterdir()} == expected, "run python -m fuzz.seed"
    assert (ROOT / "fuzz" / "fuzz_envelope.dict").read_text() == target.dictionary()
    assert target.KNOWN_ANSWER == KNOWN_ANSWER  # the seed that opens under the target's fixed key


def test_the_fuzz_target_instruments_the_envelope_module_only() -> None:
    completed = subprocess.run([sys.executable, "-m", "fuzz.fuzz_envelope", "-runs=0"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    instrumented = re.findall(r"^INFO: Instrumenting (\S+)$", completed.stderr, re.MULTILINE)
    assert instrumented == ["controller.envelope"]


def test_the_fuzz_target_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-canonical build must be reported: the target's invariant is not vacuous."""
    target = pytest.importorskip("fuzz.fuzz_envelope")
    target.TestOneInput(KNOWN_ANSWER)
    real_build = ev.build
    monkeypatch.setattr(target.ev, "build", lambda envelope: real_build(envelope)[:-1] + b"\x00")
    with pytest.raises(AssertionError, match="not canonical"):
        target.TestOneInput(KNOWN_ANSWER)
