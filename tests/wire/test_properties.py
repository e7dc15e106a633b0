"""The strictness properties of docs/wire-format.md, stated as tests.

Numbers refer to the "Strictness properties" list of docs/wire-format.md:
round trip (5), canonical encoding (4), totality (1), exact consumption (3),
closed sets and direction filtering (6), build-side checks (7), bounded cost
(9) and forward-only parsing (11).  Chunking invariance (10) is in
``test_stream.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import io
import itertools
import sys
import tracemalloc
import types
import uuid
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from wire.strategies import (
    EXAMPLES,
    MESSAGE_STRATEGIES,
    U64,
    authenticated,
    example_frame,
    frame_for,
    frames,
    frames_of,
    messages_of,
    raw_header,
)

from hostagent.wire import (
    Direction,
    Frame,
    FrameError,
    FrameErrorKind,
    MessageType,
    codec,
    decode,
    encode,
    fields,
    signed_region,
)
from hostagent.wire import messages as m
from hostagent.wire.codec import decode_header
from hostagent.wire.schema import MESSAGES

ALL_TYPES = list(MessageType)


def mac_size(message_type: MessageType) -> int:
    return m.MAC_SIZE if authenticated(message_type) else 0


def decode_or_none(data: bytes, direction: Direction | None = None) -> Frame | None:
    """decode, with FrameError (and only FrameError) mapped to None."""
    try:
        return decode(data, direction)
    except FrameError:
        return None


# --- strategies cover the protocol -------------------------------------------


def test_strategies_cover_every_message_type() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MessageType)
    assert set(EXAMPLES) == set(MessageType)


@pytest.mark.parametrize("message_type", ALL_TYPES, ids=lambda t: t.name)
@given(data=st.data())
def test_strategy_produces_valid_messages_of_its_type(message_type: MessageType, data: st.DataObject) -> None:
    message = data.draw(messages_of(message_type))
    assert type(message) is MESSAGES[message_type].cls
    frame = frame_for(message_type, message)
    assert frame.type is message_type
    assert decode(encode(frame)) == frame


# --- 5. round trip; 4. canonical encoding --------------------------------------


@pytest.mark.parametrize("message_type", ALL_TYPES, ids=lambda t: t.name)
@given(data=st.data())
def test_round_trip(message_type: MessageType, data: st.DataObject) -> None:
    frame = data.draw(frames_of(message_type))
    wire = encode(frame)
    decoded = decode(wire)
    assert decoded == frame
    # Authenticated frames keep the bytes their MAC covers; they equal what the sender signed.
    if authenticated(message_type):
        assert decoded.signed == signed_region(frame) == wire[: -m.MAC_SIZE]
    else:
        assert decoded.signed is None
    # The header describes exactly the bytes that follow it.
    header = decode_header(wire)
    assert (header.type, header.seq, header.fd_count) == (message_type, frame.seq, frame.fd_count)
    assert header.length == len(wire) - m.HEADER_SIZE - mac_size(message_type)
    assert header.frame_size == len(wire) <= m.MAX_FRAME


@st.composite
def mutated_encodings(draw: st.DrawFn) -> bytes:
    """A valid encoding with 1..4 random edits: bit flips, byte replacements, truncation, extension."""
    data = bytearray(encode(draw(frames())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "replace", "truncate", "extend", "insert", "delete"]))
        if op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
            continue
        index = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif op == "replace":
            data[index] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[index:]
        elif op == "insert":
            data.insert(index, draw(st.integers(0, 255)))
        else:
            del data[index]
        if not data:
            break
    return bytes(data)


@given(mutated_encodings())
def test_canonical_encoding_of_mutated_frames(data: bytes) -> None:
    frame = decode_or_none(data)
    event("decoded" if frame is not None else "rejected")
    if frame is not None:
        assert encode(frame) == data


# Bytes of the header that no valid frame can change: magic, version, reserved.
_FIXED_HEADER_BYTES = {0, 1, 2, 3, 4, 18}


@pytest.mark.parametrize("message_type", ALL_TYPES, ids=lambda t: t.name)
def test_canonical_encoding_every_single_bit_flip(message_type: MessageType) -> None:
    """Exhaustive over one frame per type: a flipped bit is rejected or re-encodes to the flipped bytes."""
    original = encode(example_frame(message_type))
    accepted = 0
    for bit in range(8 * len(original)):
        mutated = bytearray(original)
        mutated[bit // 8] ^= 1 << (bit % 8)
        frame = decode_or_none(bytes(mutated))
        if frame is None:
            continue
        accepted += 1
        assert bit // 8 not in _FIXED_HEADER_BYTES
        assert encode(frame) == bytes(mutated)
        assert frame != example_frame(message_type)
    # The 64 sequence-number bits are free in every frame, so this cannot pass vacuously.
    assert accepted >= 64


# --- 1. totality ---------------------------------------------------------------


@given(st.binary(max_size=m.MAX_FRAME))
def test_totality_arbitrary_bytes(data: bytes) -> None:
    decode_or_none(data)  # any exception other than FrameError fails the test


@given(st.binary(max_size=m.MAX_FRAME - 5))
def test_totality_bytes_after_magic_and_version(rest: bytes) -> None:
    data = m.MAGIC + bytes([m.VERSION]) + rest
    frame = decode_or_none(data)
    if frame is not None:
        assert encode(frame) == data


@st.composite
def valid_header_arbitrary_payload(draw: st.DrawFn) -> bytes:
    """A well-formed header for a random type announcing a random payload, so the payload parsers run."""
    message_type = draw(st.sampled_from(ALL_TYPES))
    example = encode(example_frame(message_type))
    size = len(example) - m.HEADER_SIZE - mac_size(message_type)
    payload = draw(st.one_of(st.binary(min_size=size, max_size=size), st.binary(max_size=2 * size + 64)))
    fd_count = draw(st.integers(0, m.MAX_FDS))
    mac = draw(st.binary(min_size=m.MAC_SIZE, max_size=m.MAC_SIZE)) if authenticated(message_type) else b""
    return raw_header(message_type, len(payload), seq=draw(st.integers(0, U64)), fd_count=fd_count) + payload + mac


@given(valid_header_arbitrary_payload())
def test_totality_valid_header_arbitrary_payload(data: bytes) -> None:
    frame = decode_or_none(data)
    event("decoded" if frame is not None else "rejected")
    if frame is not None:
        assert encode(frame) == data


@given(st.binary(min_size=m.HEADER_SIZE, max_size=m.HEADER_SIZE), st.sampled_from([None, *Direction]))
def test_totality_decode_header(data: bytes, direction: Direction | None) -> None:
    try:
        header = decode_header(data, direction)
    except FrameError:
        return
    assert header.frame_size <= m.MAX_FRAME


# --- 3. exact consumption -------------------------------------------------------


@given(frames(), st.binary(min_size=1, max_size=64))
def test_bytes_after_the_frame_are_rejected(frame: Frame, extra: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode(encode(frame) + extra)
    assert info.value.kind is FrameErrorKind.TRAILING_BYTES


@given(frames(), st.data())
def test_every_truncation_is_rejected(frame: Frame, data: st.DataObject) -> None:
    wire = encode(frame)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(FrameError) as info:
        decode(wire[:cut])
    assert info.value.kind is FrameErrorKind.TRUNCATED


@given(frames(), st.binary(min_size=1, max_size=16))
def test_payload_leftovers_inside_the_length_are_rejected(frame: Frame, extra: bytes) -> None:
    """Bytes hidden between the last field and the MAC, counted in ``length``: TRAILING_BYTES."""
    wire = encode(frame)
    mac = mac_size(frame.type)
    payload = wire[m.HEADER_SIZE: len(wire) - mac] + extra
    header = raw_header(frame.type, len(payload), seq=frame.seq, fd_count=frame.fd_count)
    with pytest.raises(FrameError) as info:
        decode(header + payload + wire[len(wire) - mac:])
    assert info.value.kind is FrameErrorKind.TRAILING_BYTES


# --- 6. direction filtering ------------------------------------------------------


@given(frames(), st.sampled_from(list(Direction)))
def test_direction_filtering(frame: Frame, direction: Direction) -> None:
    wire = encode(frame)
    if MESSAGES[frame.type].direction is direction:
        assert decode(wire, direction) == frame
        assert decode_header(wire, direction).type is frame.type
    else:
        for call in (decode, decode_header):
            with pytest.raises(FrameError) as info:
                call(wire, direction)
            assert info.value.kind is FrameErrorKind.WRONG_DIRECTION


def test_directions_are_commands_to_agent_and_answers_to_controller() -> None:
    for message_type, spec in MESSAGES.items():
        to_agent = message_type in (MessageType.HELLO, MessageType.PROOF) or 0x10 <= message_type < 0x80
        expected = Direction.TO_AGENT if to_agent else Direction.TO_CONTROLLER
        assert spec.direction is expected, message_type


# --- 7. build-side checks --------------------------------------------------------

_ALL_INT_ENUMS: list[enum.IntEnum] = [
    member
    for enum_type in (m.MessageType, m.InstanceState, m.StopMode, m.VolumeSource, m.VolumeState, m.VfState,
                      m.MetricId, m.EventKind, m.EventReason, m.ErrorCode)
    for member in enum_type
]


def _bad_variant_uuids() -> st.SearchStrategy[uuid.UUID]:
    """UUIDs that are not nil but whose variant bits (byte 8) are not 10xxxxxx."""
    return (
        st.binary(min_size=16, max_size=16)
        .filter(lambda raw: raw[8] & 0xC0 != 0x80 and raw != bytes(16))
        .map(lambda raw: uuid.UUID(bytes=raw))
    )


def draw_invalid(data: st.DataObject, subcon: Any, valid: Any, *, in_list: bool) -> Any:
    """A value the field ``subcon`` must refuse to encode, derived from the valid value ``valid``.

    Every value drawn has the right "shape" for its position (an int-like in an
    int field, an object with the sort-key attributes inside a list), so the
    only defect is the one under test; wrongly typed values are the table
    ``WRONG_TYPES`` below.
    """
    if isinstance(subcon, fields.UInt):
        return data.draw(st.one_of(
            st.integers(max_value=subcon.lo - 1),
            st.integers(min_value=subcon.hi + 1),
            st.booleans(),  # bool where int expected
            st.sampled_from(_ALL_INT_ENUMS),  # an enum where a plain int is expected
        ))
    if isinstance(subcon, fields.StrictEnum):
        return data.draw(st.one_of(
            st.sampled_from([int(member) for member in subcon.enum_type]),  # the bare number
            st.sampled_from([e for e in _ALL_INT_ENUMS if not isinstance(e, subcon.enum_type)]),
            st.booleans(),
        ))
    if isinstance(subcon, fields.Bool):
        return data.draw(st.one_of(st.integers(-1, 2), st.none()))
    if isinstance(subcon, fields.FixedBytes):
        return data.draw(st.one_of(
            st.binary(max_size=subcon.size + 8).filter(lambda raw: len(raw) != subcon.size),
            st.just(bytearray(valid)),
        ))
    if isinstance(subcon, fields.Uuid):
        options = [_bad_variant_uuids()]
        if not subcon.nullable:
            options.append(st.just(uuid.UUID(int=0)))
            if not in_list:
                options.append(st.sampled_from([valid.bytes, str(valid)]))
        return data.draw(st.one_of(*options))
    if isinstance(subcon, fields.Mac):
        return data.draw(st.one_of(
            st.just(bytes([valid[0] | 1]) + valid[1:]),  # multicast
            st.just(bytes(6)),
            st.binary(max_size=12).filter(lambda raw: len(raw) != 6),
            st.just(bytearray(valid)),
        ))
    if isinstance(subcon, fields.Record):
        if not in_list and data.draw(st.booleans()):
            return tuple(getattr(valid, name) for name in subcon.names)  # not the dataclass
        named = [member for member in subcon.members if member.name in subcon.names]
        member = data.draw(st.sampled_from(named))
        bad = draw_invalid(data, member.subcon, getattr(valid, member.name), in_list=in_list)
        return dataclasses.replace(valid, **{member.name: bad})
    assert isinstance(subcon, fields.BoundedList), subcon
    options = ["list", "too_long"]
    if valid:
        options += ["duplicate", "bad_item"]
    if len(valid) >= 2:
        options.append("unsorted")
    choice = data.draw(st.sampled_from(options))
    if choice == "list":
        return list(valid)
    if choice == "too_long":
        filler = valid[0] if valid else EXAMPLES_LIST_ITEMS[id(subcon)]
        return tuple(valid) + (filler,) * (subcon.max_items + 1 - len(valid))
    if choice == "duplicate":
        return (*valid, valid[-1])
    if choice == "unsorted":
        return tuple(reversed(valid))
    index = data.draw(st.integers(0, len(valid) - 1))
    bad = draw_invalid(data, subcon.item, valid[index], in_list=True)
    return (*valid[:index], bad, *valid[index + 1:])


def _list_items() -> dict[int, Any]:
    """One valid item per list field (from EXAMPLES), to build over-long lists from empty ones."""
    items: dict[int, Any] = {}
    for message_type, spec in MESSAGES.items():
        for member in spec.payload.members:
            if isinstance(member.subcon, fields.BoundedList):
                items[id(member.subcon)] = getattr(EXAMPLES[message_type], member.name)[0]
    return items


EXAMPLES_LIST_ITEMS = _list_items()
TYPES_WITH_FIELDS = [t for t in ALL_TYPES if dataclasses.fields(MESSAGES[t].cls)]


@pytest.mark.parametrize("message_type", TYPES_WITH_FIELDS, ids=lambda t: t.name)
@given(data=st.data())
def test_encode_refuses_any_invalid_field(message_type: MessageType, data: st.DataObject) -> None:
    """Property 7: one invalid field (range, type, identifier, order, count) makes encode raise."""
    message = data.draw(messages_of(message_type))
    payload = MESSAGES[message_type].payload
    named = [member for member in payload.members if member.name in payload.names]
    member = data.draw(st.sampled_from(named))
    bad = draw_invalid(data, member.subcon, getattr(message, member.name), in_list=False)
    event(f"{member.name}: {type(bad).__name__}")
    frame = frame_for(message_type, dataclasses.replace(message, **{member.name: bad}))
    with pytest.raises(FrameError):
        encode(frame)


@given(frames(), st.one_of(st.integers(max_value=-1), st.integers(min_value=U64 + 1), st.booleans()))
def test_encode_refuses_invalid_sequence_numbers(frame: Frame, seq: Any) -> None:
    with pytest.raises(FrameError) as info:
        encode(dataclasses.replace(frame, seq=seq))
    assert info.value.kind is FrameErrorKind.OUT_OF_RANGE


@pytest.mark.parametrize(("message", "field_name", "value"), [
    (EXAMPLES[MessageType.START_INSTANCE], "vcpus", (1 << 16) + 2),  # would wrap to 2 in a u16
    (EXAMPLES[MessageType.START_INSTANCE], "memory_mib", (1 << 32) + 512),
    (EXAMPLES[MessageType.PING], "token", 1 << 64),
    (EXAMPLES[MessageType.ASSIGN_VF], "vlan", 4096 + 100),  # would wrap to 100 in 12 bits
    (EXAMPLES[MessageType.VF_STATUS], "vf_index", 256 + 3),
    (EXAMPLES[MessageType.START_INSTANCE], "image_digest", b"\xd1" * 33),  # would truncate to 32
    (EXAMPLES[MessageType.START_INSTANCE], "image_signature", b"\x5a" * 65),
    (EXAMPLES[MessageType.ERROR], "code", 0x10000 + 16),
])
def test_encode_never_wraps_or_truncates(message: Any, field_name: str, value: Any) -> None:
    message_type = next(t for t, spec in MESSAGES.items() if spec.cls is type(message))
    with pytest.raises(FrameError):
        encode(frame_for(message_type, dataclasses.replace(message, **{field_name: value})))


# Wrongly typed values at every position of every example message.  Every one
# must be refused with FrameError: fields check their own type before any
# cross-field rule or list ordering looks at them (this once leaked TypeError).
WRONG_TYPES: dict[str, Any] = {"None": None, "str": "1", "list": [1]}
# Where None is a value of the field (a nullable UUID whose message has no rule against it), not a wrong type.
NONE_ALLOWED = {(MessageType.LIST_INSTANCES, ("after",))}


def value_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a message: fields, the first item of each list, fields of nested records."""
    paths: list[tuple[Any, ...]] = []
    for f in dataclasses.fields(value):
        inner = getattr(value, f.name)
        paths.append((*prefix, f.name))
        if dataclasses.is_dataclass(inner):
            paths += value_paths(inner, (*prefix, f.name))
        elif isinstance(inner, tuple) and inner:
            paths.append((*prefix, f.name, 0))
            if dataclasses.is_dataclass(inner[0]):
                paths += value_paths(inner[0], (*prefix, f.name, 0))
    return paths


def replace_path(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    step, rest = path[0], path[1:]
    if isinstance(step, int):
        items = list(value)
        items[step] = replace_path(items[step], rest, new)
        return tuple(items)
    return dataclasses.replace(value, **{step: replace_path(getattr(value, step), rest, new)})


def _wrong_type_cases() -> list[Any]:
    cases = []
    for message_type, message in EXAMPLES.items():
        for path in value_paths(message):
            for label, value in WRONG_TYPES.items():
                if value is None and (message_type, path) in NONE_ALLOWED:
                    continue
                case_id = f"{message_type.name} {'.'.join(map(str, path))} {label}"
                cases.append(pytest.param(message_type, path, value, id=case_id))
    return cases


@pytest.mark.parametrize(("message_type", "path", "value"), _wrong_type_cases())
def test_encode_refuses_wrongly_typed_values(message_type: MessageType, path: tuple[Any, ...], value: Any) -> None:
    frame = frame_for(message_type, replace_path(EXAMPLES[message_type], path, value))
    with pytest.raises(FrameError):
        encode(frame)


@pytest.mark.parametrize("kind", list(m.EventKind), ids=lambda k: k.name)
def test_encode_refuses_nil_uuid_object_in_nullable_field(kind: m.EventKind) -> None:
    """None means "no instance"; a nil UUID object would encode as None and break the round trip."""
    event_ = m.Event(1, 0, kind, uuid.UUID(int=0), m.EventReason.NONE)
    with pytest.raises(FrameError) as info:
        encode(frame_for(MessageType.EVENTS, m.Events(1, (event_,))))
    assert info.value.kind in (FrameErrorKind.INVALID_IDENTIFIER, FrameErrorKind.CROSS_FIELD)


# --- 9. bounded cost --------------------------------------------------------------


def _forbid(*_: Any, **__: Any) -> Any:
    raise AssertionError("parsing started on an oversized input")


@pytest.mark.parametrize("size", [m.MAX_FRAME + 1, 2 * m.MAX_FRAME, 1 << 20])
def test_oversized_input_rejected_before_any_parsing(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    wire = encode(example_frame(MessageType.PING))
    data = wire + bytes(size - len(wire))  # a valid frame, then padding past MAX_FRAME
    monkeypatch.setattr(codec, "decode_header", _forbid)
    monkeypatch.setattr(fields.Record, "_parse", _forbid)
    with pytest.raises(FrameError) as info:
        decode(data)
    assert info.value.kind is FrameErrorKind.OVERSIZED


def test_max_frame_input_is_parsed() -> None:
    """The limit is inclusive: exactly MAX_FRAME bytes reach the header parser (and fail later)."""
    data = raw_header(MessageType.PING, m.MAX_PAYLOAD) + bytes(m.MAX_PAYLOAD + m.MAC_SIZE)
    assert len(data) == m.MAX_FRAME
    with pytest.raises(FrameError) as info:
        decode(data)
    assert info.value.kind is FrameErrorKind.TRAILING_BYTES  # the 8-byte PING payload, then leftovers


def test_header_length_above_max_payload_rejected_from_header_alone() -> None:
    with pytest.raises(FrameError) as info:
        decode_header(raw_header(MessageType.EVENTS, m.MAX_PAYLOAD + 1))
    assert info.value.kind is FrameErrorKind.OVERSIZED
    assert decode_header(raw_header(MessageType.EVENTS, m.MAX_PAYLOAD)).frame_size == m.MAX_FRAME


def _list_fields() -> list[Any]:
    cases = []
    for message_type, spec in MESSAGES.items():
        for position, member in enumerate(spec.payload.members):
            if isinstance(member.subcon, fields.BoundedList):
                cases.append(pytest.param(message_type, position, id=f"{message_type.name}.{member.name}"))
    return cases


def _count_offset(message_type: MessageType, position: int) -> int:
    """Offset of a list's count byte in a payload where every earlier list is empty."""
    offset = 0
    for member in MESSAGES[message_type].payload.members[:position]:
        offset += 1 if isinstance(member.subcon, fields.BoundedList) else member.subcon._sizeof(None, "")
    return offset


def _empty_lists_payload(message_type: MessageType) -> bytes:
    """The payload of the example message with every list emptied (STOPPED, so the rules still hold)."""
    example = EXAMPLES[message_type]
    changes: dict[str, Any] = {
        f.name: () for f in dataclasses.fields(example) if isinstance(getattr(example, f.name), tuple)
    }
    if message_type is MessageType.INSTANCE_INFO:
        changes["state"] = m.InstanceState.STOPPED
    wire = encode(frame_for(message_type, dataclasses.replace(example, **changes)))
    return wire[m.HEADER_SIZE: len(wire) - mac_size(message_type)]


@pytest.mark.parametrize(("message_type", "position"), _list_fields())
@pytest.mark.parametrize("items_present", [0, 1, 3])
def test_count_claiming_the_maximum_allocates_only_what_is_present(
    message_type: MessageType, position: int, items_present: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A maximal count with few items behind it: TRUNCATED after at most present+1 item parses."""
    bounded = MESSAGES[message_type].payload.members[position].subcon
    item = _encode_item(bounded, EXAMPLES_LIST_ITEMS[id(bounded)])
    offset = _count_offset(message_type, position)
    payload = _empty_lists_payload(message_type)[:offset] + bytes([bounded.max_items]) + item * items_present
    data = raw_header(message_type, len(payload)) + payload + bytes(mac_size(message_type))

    calls = []
    real_parse = bounded.item._parse

    def counting_parse(*args: Any) -> Any:
        calls.append(1)
        return real_parse(*args)

    monkeypatch.setattr(bounded.item, "_parse", counting_parse)
    with pytest.raises(FrameError) as info:
        decode(data)
    assert info.value.kind is FrameErrorKind.TRUNCATED
    assert len(calls) == items_present + 1  # the present items, then one short read
    assert len(calls) * len(item) <= len(payload) + len(item)


def _encode_item(bounded: Any, item: Any) -> bytes:
    stream = io.BytesIO()
    bounded.item._build(item, stream, None, "")
    return stream.getvalue()


def _events_frame(count: int) -> bytes:
    events = tuple(
        m.Event(cursor, 5, m.EventKind.INSTANCE_STARTED, EXAMPLES[MessageType.DESCRIBE_INSTANCE].instance_id,
                m.EventReason.NONE)
        for cursor in range(1, count + 1)
    )
    return encode(frame_for(MessageType.EVENTS, m.Events(count, events)))


def _host_cpus_frame(count: int) -> bytes:
    info = dataclasses.replace(EXAMPLES[MessageType.INSTANCE_INFO], vcpus=count, host_cpus=tuple(range(count)))
    return encode(frame_for(MessageType.INSTANCE_INFO, info))


def _python_calls(data: bytes) -> int:
    """Python function calls made by one decode: a deterministic measure of work."""
    count = 0

    def profiler(_frame: types.FrameType, kind: str, _arg: Any) -> None:
        nonlocal count
        if kind == "call":
            count += 1

    # A garbage collection during the decode could run finalizers of objects left by
    # other tests (sockets, event loops) and count their calls: collect first, then
    # keep the collector off while counting.
    gc.collect()
    gc.disable()
    sys.setprofile(profiler)
    try:
        decode(data)
    finally:
        sys.setprofile(None)
        gc.enable()
    return count


@pytest.mark.parametrize("build", [_events_frame, _host_cpus_frame], ids=["events", "host_cpus"])
def test_decode_work_is_linear_in_the_number_of_items(build: Any) -> None:
    base = _python_calls(build(1))
    per_item = _python_calls(build(2)) - base
    assert per_item > 0
    for count in (4, 16, 64):
        assert _python_calls(build(count)) <= base + (count - 1) * per_item


# Allocation independent of the input (BytesIO objects, the Frame, construct's path strings).
_FIXED_OVERHEAD = 4096


def _peak_allocation(data: bytes) -> int:
    decode_or_none(data)  # warm caches (and coverage's own bookkeeping) outside the measurement
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        decode_or_none(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _max_frame_inputs() -> dict[str, bytes]:
    full_events = _events_frame(m.MAX_EVENTS_PER_PULL)
    payload = full_events[m.HEADER_SIZE: -m.MAC_SIZE]
    padded = payload + bytes(m.MAX_PAYLOAD - len(payload))
    return {
        "events-then-padding": raw_header(MessageType.EVENTS, m.MAX_PAYLOAD) + padded + bytes(m.MAC_SIZE),
        "max-count-then-garbage": raw_header(MessageType.INSTANCE_LIST, m.MAX_PAYLOAD)
        + bytes([m.MAX_LISTED_INSTANCES]) + b"\x11" * (m.MAX_FRAME - m.HEADER_SIZE - 1),
        "zeros": bytes(m.MAX_FRAME),
    }


@pytest.mark.parametrize("name", list(_max_frame_inputs()))
def test_peak_memory_of_decode_is_a_small_multiple_of_the_input(name: str) -> None:
    data = _max_frame_inputs()[name]
    assert len(data) == m.MAX_FRAME
    assert _peak_allocation(data) <= 8 * len(data)


def test_peak_memory_grows_linearly() -> None:
    sizes = [_events_frame(count) for count in (1, 4, 16, 64)]
    peaks = [_peak_allocation(data) for data in sizes]
    for data, peak in zip(sizes, peaks, strict=True):
        assert peak <= _FIXED_OVERHEAD + 8 * len(data)
    for (small, small_peak), (large, large_peak) in itertools.pairwise(zip(sizes, peaks, strict=True)):
        assert large_peak - small_peak <= 8 * (len(large) - len(small))


# --- 11. forward only ---------------------------------------------------------------


class ForwardOnlyStream(io.BytesIO):
    """A stream that refuses to move backwards or jump, and records what was read."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def seek(self, *_: Any) -> int:
        raise AssertionError("a parser seeked")

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.reads.append(len(chunk))
        return chunk


@pytest.mark.parametrize("message_type", ALL_TYPES, ids=lambda t: t.name)
def test_every_byte_is_read_once_in_order(message_type: MessageType, monkeypatch: pytest.MonkeyPatch) -> None:
    streams: list[ForwardOnlyStream] = []

    def make(data: bytes = b"") -> ForwardOnlyStream:
        streams.append(ForwardOnlyStream(data))
        return streams[-1]

    monkeypatch.setattr(codec, "io", types.SimpleNamespace(BytesIO=make))
    wire = encode(example_frame(message_type))
    streams.clear()
    assert decode(wire) == example_frame(message_type)
    header_stream, payload_stream = streams
    assert sum(header_stream.reads) == m.HEADER_SIZE
    assert sum(payload_stream.reads) == len(wire) - m.HEADER_SIZE - mac_size(message_type)
