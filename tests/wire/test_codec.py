"""Targeted examples for codec.py, schema.py, messages.py, errors.py and the package API.

The properties live in ``test_properties.py``; this file pins each rejection
path to its exact ``FrameErrorKind`` and covers the branches no property
reaches on its own (the exception translation table, MAC presence checks,
descriptor counts, the cross-field rules in both directions).
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
from typing import Any

import pytest
from wire.strategies import EXAMPLES, HANDSHAKE_TYPES, ID_A, ID_B, example_frame, frame_for, raw_header

import hostagent.wire as wire_api
from hostagent.wire import (
    Direction,
    Frame,
    FrameError,
    FrameErrorKind,
    MessageType,
    decode,
    decode_header,
    encode,
    fields,
    signed_region,
)
from hostagent.wire import messages as m
from hostagent.wire.schema import MESSAGES, SPEC_BY_CLASS

K = FrameErrorKind


def decode_error(data: bytes, direction: Direction | None = None) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode(data, direction)
    return info.value


def encode_error(frame: Frame) -> FrameError:
    with pytest.raises(FrameError) as info:
        encode(frame)
    return info.value


def payload_of(frame: Frame) -> bytearray:
    wire = encode(frame)
    return bytearray(wire[m.HEADER_SIZE: len(wire) - (m.MAC_SIZE if frame.mac is not None else 0)])


def with_payload(message_type: MessageType, payload: bytes, fd_count: int = 0) -> bytes:
    mac = b"" if message_type in HANDSHAKE_TYPES else bytes(m.MAC_SIZE)
    return raw_header(message_type, len(payload), fd_count=fd_count) + bytes(payload) + mac


# --- errors.py, messages.py ---------------------------------------------------------


def test_frame_error_carries_kind_and_detail() -> None:
    error = FrameError(K.TRUNCATED, "header needs 20 bytes")
    assert error.kind is K.TRUNCATED
    assert error.detail == "header needs 20 bytes"
    assert str(error) == "truncated: header needs 20 bytes"


def test_error_kinds_are_distinct_machine_readable_names() -> None:
    values = [kind.value for kind in FrameErrorKind]
    assert len(set(values)) == len(values)
    assert all(value == kind.name.lower() for kind, value in zip(FrameErrorKind, values, strict=True))


def test_pci_address_text_form() -> None:
    assert str(m.PciAddress(0, 0x3B, 0x10, 1)) == "0000:3b:10.1"
    assert str(m.PciAddress(0xABCD, 0xFF, 31, 7)) == "abcd:ff:1f.7"


def test_header_frame_size_counts_the_mac_only_when_flagged() -> None:
    assert m.Header(MessageType.PING, m.Flags.MAC, 0, 0, 8).frame_size == 20 + 8 + 32
    assert m.Header(MessageType.HELLO, m.Flags(0), 0, 0, 32).frame_size == 20 + 32


def test_limits_are_consistent() -> None:
    assert m.MAX_PAYLOAD == m.MAX_FRAME - m.HEADER_SIZE - m.MAC_SIZE
    assert m.MAX_FRAME <= 64 * 1024
    largest = max(len(encode(example_frame(t))) for t in MessageType)
    assert largest <= m.MAX_FRAME


# --- the package API --------------------------------------------------------------------


def test_public_api_is_exported() -> None:
    for name in wire_api.__all__:
        assert hasattr(wire_api, name), name
    assert wire_api.decode is decode and wire_api.encode is encode
    for spec in MESSAGES.values():
        assert getattr(wire_api, spec.cls.__name__) is spec.cls  # message classes are re-exported


# --- schema.py: the message table -------------------------------------------------------


def test_message_table_is_closed_and_invertible() -> None:
    assert set(MESSAGES) == set(MessageType)
    assert all(spec.type is t for t, spec in MESSAGES.items())
    assert {cls: spec.type for cls, spec in SPEC_BY_CLASS.items()} == {s.cls: t for t, s in MESSAGES.items()}
    assert {t for t, spec in MESSAGES.items() if not spec.authenticated} == HANDSHAKE_TYPES


def test_message_spec_doc_is_the_class_docstring() -> None:
    assert MESSAGES[MessageType.PING].doc() == "Liveness check; answered with PONG."
    for spec in MESSAGES.values():
        assert spec.doc() and spec.doc() == spec.doc().strip()


def test_only_nbd_attachments_carry_a_descriptor() -> None:
    attach = EXAMPLES[MessageType.ATTACH_VOLUME]
    assert frame_for(MessageType.ATTACH_VOLUME, attach).fd_count == 1
    as_file = dataclasses.replace(attach, source=m.VolumeSource.FILE)
    assert frame_for(MessageType.ATTACH_VOLUME, as_file).fd_count == 0
    for message_type in MessageType:
        if message_type is not MessageType.ATTACH_VOLUME:
            assert example_frame(message_type).fd_count == 0


# --- codec.py: Frame ------------------------------------------------------------------------


def test_frame_of_a_non_message_is_refused() -> None:
    for bogus in (object(), b"\x00", m.PciAddress(0, 0, 0, 0), m.Header(MessageType.PING, m.Flags.MAC, 0, 0, 8)):
        frame = Frame(1, bogus, bytes(32))  # type: ignore[arg-type]
        for use in (lambda f: f.spec, lambda f: f.type, lambda f: f.fd_count, encode, signed_region):
            with pytest.raises(FrameError) as info:
                use(frame)
            assert info.value.kind is K.MALFORMED
            assert type(bogus).__name__ in info.value.detail


def test_signed_bytes_are_kept_on_decode_and_ignored_everywhere_else() -> None:
    frame = example_frame(MessageType.PING)
    assert frame.signed is None  # frames built by the sender carry none
    decoded = decode(encode(frame))
    assert decoded.signed == encode(frame)[: -m.MAC_SIZE]
    assert decoded == frame  # not part of equality ...
    assert "signed" not in repr(decoded)  # ... nor of the repr
    forged = dataclasses.replace(frame, signed=b"anything")
    assert encode(forged) == encode(frame)  # encoding never trusts it
    assert signed_region(forged) == decoded.signed
    assert decode(encode(example_frame(MessageType.HELLO))).signed is None


def test_frame_type_follows_the_message_class() -> None:
    for message_type in MessageType:
        assert example_frame(message_type).type is message_type


# --- codec.py: encode, signed_region ----------------------------------------------------------


@pytest.mark.parametrize("mac", [None, b"", bytes(31), bytes(33), bytearray(32), "x" * 32],
                         ids=["none", "empty", "31", "33", "bytearray", "str"])
def test_authenticated_frames_need_a_32_byte_mac(mac: Any) -> None:
    frame = Frame(1, EXAMPLES[MessageType.PING], mac)
    assert encode_error(frame).kind is K.BAD_FLAGS


@pytest.mark.parametrize("message_type", sorted(HANDSHAKE_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("mac", [bytes(32), b""], ids=["32", "empty"])
def test_handshake_frames_refuse_a_mac(message_type: MessageType, mac: bytes) -> None:
    error = encode_error(Frame(1, EXAMPLES[message_type], mac))
    assert error.kind is K.BAD_FLAGS
    assert "handshake" in error.detail


def test_signed_region_is_header_and_payload_whatever_the_mac() -> None:
    for message_type in MessageType:
        frame = example_frame(message_type)
        wire = encode(frame)
        region = signed_region(frame)
        assert region == signed_region(dataclasses.replace(frame, mac=None))
        if message_type in HANDSHAKE_TYPES:
            assert region == wire
        else:
            assert wire == region + frame.mac


def test_encode_header_layout() -> None:
    frame = Frame(0x0102030405060708, EXAMPLES[MessageType.ATTACH_VOLUME], bytes(range(32)))
    wire = encode(frame)
    magic, version, type_, flags, seq, fds, reserved, length = struct.unpack(">4sBBHQBBH", wire[:20])
    assert (magic, version, type_, flags, seq, fds, reserved) == (b"PVSR", 1, 0x13, 1, 0x0102030405060708, 1, 0)
    assert length == 16 + 16 + 1 + 1
    assert wire[-32:] == bytes(range(32))


def test_encoding_errors_name_the_message_and_say_encoding() -> None:
    bad = dataclasses.replace(EXAMPLES[MessageType.START_INSTANCE], vcpus=0)
    error = encode_error(frame_for(MessageType.START_INSTANCE, bad))
    assert error.kind is K.OUT_OF_RANGE
    assert error.detail.startswith("encoding START_INSTANCE: ")


# --- codec.py: decode_header, decode ------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4, 19])
def test_short_input_is_truncated(size: int) -> None:
    wire = encode(example_frame(MessageType.PING))
    for call in (decode, decode_header):
        with pytest.raises(FrameError) as info:
            call(wire[:size])
        assert info.value.kind is K.TRUNCATED


HEADER_REJECTIONS = [
    (b"PVSQ" + raw_header(MessageType.PING, 8)[4:], K.BAD_MAGIC),
    (raw_header(MessageType.PING, 8, version=0), K.BAD_VERSION),
    (raw_header(MessageType.PING, 8, version=2), K.BAD_VERSION),
    (raw_header(0x00, 8), K.UNKNOWN_TYPE),
    (raw_header(0x20, 8), K.UNKNOWN_TYPE),
    (raw_header(MessageType.PING, 8, flags=0x0002), K.UNDEFINED_FLAGS),
    (raw_header(MessageType.PING, 8, flags=0x0000), K.BAD_FLAGS),
    (raw_header(MessageType.HELLO, 32, flags=0x0001), K.BAD_FLAGS),
    (raw_header(MessageType.PING, 8, fd_count=2), K.FD_COUNT_MISMATCH),
    (raw_header(MessageType.PING, 8, reserved=0x80), K.RESERVED_NONZERO),
    (raw_header(MessageType.PING, m.MAX_PAYLOAD + 1), K.OVERSIZED),
    (raw_header(MessageType.PING, 0xFFFF), K.OVERSIZED),
]


@pytest.mark.parametrize(("header", "kind"), HEADER_REJECTIONS,
                         ids=[f"{i}-{kind.value}" for i, (_, kind) in enumerate(HEADER_REJECTIONS)])
def test_header_rejections(header: bytes, kind: FrameErrorKind) -> None:
    with pytest.raises(FrameError) as info:
        decode_header(header + b"ignored")
    assert info.value.kind is kind


def test_header_checks_come_in_documented_order() -> None:
    """Magic before version before type ...: the first broken field names the error."""
    everything_wrong = b"XXXX" + struct.pack(">BBHQBBH", 9, 0x7F, 0xFFFF, 0, 9, 9, 0xFFFF)
    assert decode_error(everything_wrong).kind is K.BAD_MAGIC
    assert decode_error(b"PVSR" + everything_wrong[4:]).kind is K.BAD_VERSION


def test_wrong_direction_is_checked_after_the_flags() -> None:
    pong = encode(example_frame(MessageType.PONG))
    assert decode_error(pong, Direction.TO_AGENT).kind is K.WRONG_DIRECTION
    assert decode(pong, Direction.TO_CONTROLLER) == example_frame(MessageType.PONG)
    unflagged_pong = raw_header(MessageType.PONG, 8, flags=0) + bytes(8)
    assert decode_error(unflagged_pong, Direction.TO_AGENT).kind is K.BAD_FLAGS


def test_decode_length_mismatches() -> None:
    wire = encode(example_frame(MessageType.PING))
    assert decode_error(wire[:-1]).kind is K.TRUNCATED
    assert decode_error(wire + b"\x00").kind is K.TRAILING_BYTES
    # The header promises a shorter payload than the message needs.
    short = raw_header(MessageType.PING, 7) + wire[20:27] + bytes(32)
    error = decode_error(short)
    assert error.kind is K.TRUNCATED
    assert error.detail == "PING: ran out of bytes"


def test_decode_returns_the_mac_exactly_on_authenticated_types() -> None:
    for message_type in MessageType:
        frame = decode(encode(example_frame(message_type)))
        if message_type in HANDSHAKE_TYPES:
            assert frame.mac is None
        else:
            assert frame.mac == bytes(range(200, 232))


@pytest.mark.parametrize(("message", "header_fds"), [
    pytest.param(EXAMPLES[MessageType.ATTACH_VOLUME], 0, id="nbd-without-descriptor"),
    pytest.param(dataclasses.replace(EXAMPLES[MessageType.ATTACH_VOLUME], source=m.VolumeSource.FILE), 1,
                 id="file-with-descriptor"),
    pytest.param(EXAMPLES[MessageType.PING], 1, id="ping-with-descriptor"),
])
def test_descriptor_count_must_match_the_message(message: Any, header_fds: int) -> None:
    message_type = SPEC_BY_CLASS[type(message)].type
    payload = payload_of(frame_for(message_type, message))
    error = decode_error(with_payload(message_type, payload, fd_count=header_fds))
    assert error.kind is K.FD_COUNT_MISMATCH


# --- schema.py: refinements, both directions --------------------------------------------------


def stop(mode: m.StopMode, timeout: int) -> m.StopInstance:
    return m.StopInstance(ID_A, mode, timeout)


def info(state: m.InstanceState, cpus: tuple[int, ...] = (), volumes: tuple[uuid.UUID, ...] = (),
         vfs: tuple[m.PciAddress, ...] = (), vcpus: int = 2) -> m.InstanceInfo:
    return m.InstanceInfo(ID_A, state, vcpus, 512, bytes(32), cpus, volumes, vfs)


def event(cursor: int, kind: m.EventKind, instance_id: uuid.UUID | None) -> m.Event:
    return m.Event(cursor, 0, kind, instance_id, m.EventReason.NONE)


VALID_COMBINATIONS = [
    stop(m.StopMode.FORCE, 0),
    stop(m.StopMode.GRACEFUL, 1),
    stop(m.StopMode.GRACEFUL, m.MAX_STOP_TIMEOUT_S),
    info(m.InstanceState.RUNNING, (0, 1)),
    info(m.InstanceState.STARTING, (4094, 4095), (ID_A, ID_B), (m.PciAddress(0, 0, 0, 0),)),
    info(m.InstanceState.STOPPING, (7,), vcpus=1),
    info(m.InstanceState.STOPPED),
    info(m.InstanceState.FAILED, vcpus=128),
    m.Events(0, ()),
    m.Events(5, (event(5, m.EventKind.VF_ASSIGNED, ID_A),)),
    m.Events(9, (event(1, m.EventKind.SESSION_REJECTED, None), event(9, m.EventKind.RECONCILE_MISMATCH, None))),
]

INVALID_COMBINATIONS = [
    stop(m.StopMode.FORCE, 1),
    stop(m.StopMode.FORCE, m.MAX_STOP_TIMEOUT_S),
    stop(m.StopMode.GRACEFUL, 0),
    info(m.InstanceState.RUNNING, (0,)),
    info(m.InstanceState.RUNNING, (0, 1, 2)),
    info(m.InstanceState.STARTING),
    info(m.InstanceState.STOPPED, (0, 1)),
    info(m.InstanceState.STOPPED, volumes=(ID_A,)),
    info(m.InstanceState.FAILED, vfs=(m.PciAddress(0, 0, 0, 0),)),
    m.Events(4, (event(5, m.EventKind.VF_ASSIGNED, ID_A),)),
    m.Events(1, (event(1, m.EventKind.AGENT_RESTARTED, None), event(2, m.EventKind.AGENT_RESTARTED, None))),
    m.Events(5, (event(5, m.EventKind.INSTANCE_EXITED, None),)),
    m.Events(5, (event(5, m.EventKind.SESSION_REJECTED, ID_A),)),
]


def _type_of(message: Any) -> MessageType:
    return SPEC_BY_CLASS[type(message)].type


@pytest.mark.parametrize("message", VALID_COMBINATIONS, ids=lambda message: type(message).__name__)
def test_valid_combinations_round_trip(message: Any) -> None:
    frame = frame_for(_type_of(message), message)
    assert decode(encode(frame)) == frame


@pytest.mark.parametrize("message", INVALID_COMBINATIONS, ids=lambda message: type(message).__name__)
def test_invalid_combinations_are_refused_both_ways(message: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    message_type = _type_of(message)
    frame = frame_for(message_type, message)
    assert encode_error(frame).kind is K.CROSS_FIELD
    # Produce the same bytes with the rules switched off, then decode with them on.
    payload_schema = MESSAGES[message_type].payload
    with monkeypatch.context() as patched:
        patched.setattr(payload_schema, "rules", ())
        for record in _nested_records(payload_schema):
            patched.setattr(record, "rules", ())
        wire = encode(frame)
    error = decode_error(wire)
    assert error.kind is K.CROSS_FIELD
    assert error.detail.startswith(f"{message_type.name}: ")


def _nested_records(record: fields.Record) -> list[fields.Record]:
    found = []
    for member in record.members:
        inner = member.subcon.item if isinstance(member.subcon, fields.BoundedList) else member.subcon
        if isinstance(inner, fields.Record):
            found.append(inner)
    return found


# --- codec.py: the exception translation table --------------------------------------------------

LEAKED = [
    IndexError("index out of range"),
    KeyError("missing"),
    struct.error("unpack requires a buffer"),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    ValueError("bad value"),
    OverflowError("too big"),
]


@pytest.mark.parametrize("leak", LEAKED, ids=lambda e: type(e).__name__)
def test_leaked_exceptions_become_malformed_when_decoding(leak: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky(self: Any, raw: bytes) -> Any:
        raise leak

    monkeypatch.setattr(fields.FixedBytes, "from_wire", leaky)
    error = decode_error(encode(example_frame(MessageType.HELLO)))
    assert error.kind is K.MALFORMED
    assert error.detail == f"HELLO: {type(leak).__name__}"
    assert error.__cause__ is leak  # the root cause is kept for debugging, not shown to the peer


@pytest.mark.parametrize("leak", LEAKED, ids=lambda e: type(e).__name__)
def test_leaked_exceptions_become_malformed_when_encoding(leak: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky(self: Any, value: Any) -> bytes:
        raise leak

    monkeypatch.setattr(fields.FixedBytes, "to_wire", leaky)
    error = encode_error(example_frame(MessageType.HELLO))
    assert error.kind is K.MALFORMED
    assert error.detail == f"encoding HELLO: {type(leak).__name__}"


def test_leaked_exception_in_the_header_is_translated_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky(self: Any, value: int) -> Any:
        raise KeyError(value)

    # The header is a fixed-size record: its integer fields check unpacked numbers.
    monkeypatch.setattr(fields.StrictFlags, "from_unpacked", leaky)
    error = decode_error(encode(example_frame(MessageType.PING)))
    assert (error.kind, error.detail) == (K.MALFORMED, "header: KeyError")


def test_exceptions_outside_the_table_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the documented leak types are translated; anything else is a codec bug and must surface."""

    def broken(self: Any, raw: bytes) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(fields.FixedBytes, "from_wire", broken)
    with pytest.raises(RuntimeError, match="bug"):
        decode(encode(example_frame(MessageType.HELLO)))


def test_reject_keeps_its_kind_and_names_the_region() -> None:
    payload = payload_of(example_frame(MessageType.ASSIGN_VF))
    payload[16 + 5] |= 0x01  # multicast bit of the MAC (after the id and the 5-byte PCI address)
    error = decode_error(with_payload(MessageType.ASSIGN_VF, payload))
    assert error.kind is K.INVALID_IDENTIFIER
    assert error.detail == "ASSIGN_VF: MAC is zero or multicast"


# --- fields.py: the one-struct path of fixed-size records ------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tagged:
    items: tuple[int, ...]


# A constant in a record of variable size: parsed field by field from the stream.
_TAGGED = fields.Record(
    _Tagged,
    fields.field("tag", fields.Constant(b"T", K.BAD_MAGIC), "tag"),
    fields.field("items", fields.BoundedList(fields.UInt(1), 3), "items"),
)


def test_a_variable_size_record_checks_its_constants_and_stores_the_rest() -> None:
    assert _TAGGED.fixed is None
    assert _TAGGED.parse(b"T\x02\x07\x09") == _Tagged((7, 9))
    assert _TAGGED.build(_Tagged((7, 9))) == b"T\x02\x07\x09"
    with pytest.raises(fields.Reject) as info:
        _TAGGED.parse(b"X\x00")
    assert info.value.kind is K.BAD_MAGIC


def test_the_integer_field_base_has_no_rule() -> None:
    base = fields.IntField(2)
    assert base.struct_code() == "H"
    with pytest.raises(NotImplementedError):
        base.from_wire(b"\x00\x01")
    with pytest.raises(NotImplementedError):
        base.to_wire(1)


@pytest.mark.parametrize("width", [0, 3, 5, 16])
def test_integer_fields_are_one_two_four_or_eight_bytes(width: int) -> None:
    """Each fixed-size record unpacks its integers with one struct format, which has no other widths."""
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        fields.UInt(width)


def test_a_byte_field_of_the_wrong_size_is_refused_not_padded() -> None:
    """struct pads or cuts an "Ns" value silently; the record refuses it instead."""

    class Short(fields.FixedBytes):
        def to_wire(self, value: Any) -> bytes:
            return b"\x00"

    @dataclasses.dataclass(frozen=True)
    class Blob:
        data: bytes

    record = fields.Record(Blob, fields.field("data", Short(4), "data"))
    with pytest.raises(fields.Reject) as info:
        record.build(Blob(bytes(4)))
    assert info.value.kind is K.MALFORMED


def test_pack_values_is_the_header_encoding_without_a_header_object() -> None:
    header = m.Header(MessageType.PING, m.Flags.MAC, 7, 0, 8)
    from hostagent.wire.schema import HEADER, PCI_ADDRESS

    assert HEADER.pack_values(MessageType.PING, m.Flags.MAC, 7, 0, 8) == HEADER.build(header)
    with pytest.raises(fields.Reject) as info:
        HEADER.pack_values(MessageType.PING, m.Flags.MAC, 7, 0, m.MAX_PAYLOAD + 1)
    assert info.value.kind is K.OVERSIZED
    with pytest.raises(TypeError, match="5 stored values"):
        HEADER.pack_values(MessageType.PING, m.Flags.MAC, 7, 0)
    stop = MESSAGES[MessageType.STOP_INSTANCE].payload
    with pytest.raises(TypeError, match="cross-field rules"):
        stop.pack_values(ID_A, m.StopMode.FORCE, 0)
    assert PCI_ADDRESS.pack_values(0, 1, 2, 3) == b"\x00\x00\x01\x02\x03"
