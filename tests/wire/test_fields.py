"""Unit tests of the strict construct fields (hostagent/wire/fields.py).

Each field is exercised through construct's own ``parse`` / ``build`` entry
points, so these tests see exactly what a Record sees.  Rejections are
:class:`fields.Reject` here; ``codec`` turns them into ``FrameError``.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from typing import Any

import pytest

from hostagent.wire import FrameErrorKind, fields
from hostagent.wire import messages as m
from hostagent.wire.fields import (
    Bool,
    BoundedList,
    Constant,
    Field,
    FixedBytes,
    Mac,
    Record,
    Reject,
    StrictEnum,
    StrictFlags,
    UInt,
    Uuid,
    field,
)
from hostagent.wire.schema import HEADER, MESSAGES, PCI_ADDRESS

K = FrameErrorKind


def rejects(kind: FrameErrorKind, call: Any, *args: Any) -> Reject:
    with pytest.raises(Reject) as info:
        call(*args)
    assert info.value.kind is kind
    return info.value


# --- Field (the base) ---------------------------------------------------------


def test_field_base_has_no_conversions() -> None:
    base = Field()
    with pytest.raises(NotImplementedError):
        base.from_wire(b"")
    with pytest.raises(NotImplementedError):
        base.to_wire(None)


def test_field_default_description_counts_bytes() -> None:
    assert FixedBytes(32).wire_type() == "32 bytes"
    assert FixedBytes(1).wire_type() == "1 byte"
    assert Constant(b"\x00", K.RESERVED_NONZERO).wire_type() == "1 byte"
    assert FixedBytes(32).bounds() == ""
    assert FixedBytes(32).sizeof() == 32


def test_short_read_is_a_stream_error_not_a_shorter_value() -> None:
    with pytest.raises(Exception) as info:
        FixedBytes(4).parse(b"abc")
    assert type(info.value).__name__ == "StreamError"
    assert not isinstance(info.value, Reject)


# --- UInt -----------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_uint_full_range(width: int) -> None:
    full = (1 << (8 * width)) - 1
    field_ = UInt(width)
    assert field_.parse(bytes(width)) == 0
    assert field_.parse(b"\xff" * width) == full
    assert field_.build(full) == b"\xff" * width
    assert field_.build(1) == bytes(width - 1) + b"\x01"
    rejects(K.OUT_OF_RANGE, field_.build, full + 1)
    rejects(K.OUT_OF_RANGE, field_.build, -1)
    assert field_.wire_type() == f"u{8 * width}"
    assert field_.bounds() == ""


def test_uint_bounds_are_inclusive_both_ways() -> None:
    vcpus = UInt(2, 1, 128)
    assert [vcpus.parse(n.to_bytes(2, "big")) for n in (1, 128)] == [1, 128]
    for value in (0, 129, 0xFFFF):
        rejects(K.OUT_OF_RANGE, vcpus.parse, value.to_bytes(2, "big"))
        rejects(K.OUT_OF_RANGE, vcpus.build, value)
    assert vcpus.bounds() == "1..128"


@pytest.mark.parametrize("value", [True, False, m.StopMode.FORCE, 1.0, "1", None, b"\x01"])
def test_uint_builds_plain_ints_only(value: Any) -> None:
    rejects(K.OUT_OF_RANGE, UInt(1).build, value)


def test_uint_reports_its_own_kind() -> None:
    count = UInt(1, 0, 3, K.TOO_MANY_ITEMS)
    rejects(K.TOO_MANY_ITEMS, count.parse, b"\x04")
    rejects(K.TOO_MANY_ITEMS, count.build, True)


# --- StrictEnum ---------------------------------------------------------------------


def test_strict_enum_accepts_exactly_its_members() -> None:
    mode = StrictEnum(1, m.StopMode)
    for raw in range(256):
        if raw in {int(member) for member in m.StopMode}:
            assert mode.parse(bytes([raw])) is m.StopMode(raw)
        else:
            error = rejects(K.UNKNOWN_ENUM, mode.parse, bytes([raw]))
            assert "StopMode" in str(error)


@pytest.mark.parametrize("value", [1, 2, True, m.VolumeSource.FILE, m.InstanceState.RUNNING, None, "FORCE"])
def test_strict_enum_builds_members_of_its_own_type_only(value: Any) -> None:
    rejects(K.UNKNOWN_ENUM, StrictEnum(1, m.StopMode).build, value)


def test_strict_enum_width_kind_and_description() -> None:
    code = StrictEnum(2, m.ErrorCode)
    assert code.build(m.ErrorCode.INTERNAL) == b"\x00\xff"
    assert code.parse(b"\x00\xff") is m.ErrorCode.INTERNAL
    rejects(K.UNKNOWN_ENUM, code.parse, b"\x01\xff")  # the high byte counts
    rejects(K.UNKNOWN_TYPE, StrictEnum(1, m.MessageType, K.UNKNOWN_TYPE).parse, b"\x00")
    assert StrictEnum(1, m.StopMode).wire_type() == "u8 enum StopMode"
    assert StrictEnum(1, m.StopMode).bounds() == "GRACEFUL=1, FORCE=2"


# --- StrictFlags -----------------------------------------------------------------------


def test_strict_flags_accept_exactly_the_defined_bits() -> None:
    flags = StrictFlags(2, m.Flags)
    accepted = {}
    for raw in range(1 << 16):
        try:
            accepted[raw] = flags.parse(raw.to_bytes(2, "big"))
        except Reject as error:
            assert error.kind is K.UNDEFINED_FLAGS
    assert accepted == {0: m.Flags(0), 1: m.Flags.MAC}


@pytest.mark.parametrize("value", [m.Flags(0x8000), m.Flags(0x0003), 1, 0, None, m.StopMode.GRACEFUL])
def test_strict_flags_refuse_to_build_undefined_bits_or_other_types(value: Any) -> None:
    rejects(K.UNDEFINED_FLAGS, StrictFlags(2, m.Flags).build, value)


def test_strict_flags_build_and_describe() -> None:
    flags = StrictFlags(2, m.Flags)
    assert flags.build(m.Flags.MAC) == b"\x00\x01"
    assert flags.build(m.Flags(0)) == b"\x00\x00"
    assert flags.wire_type() == "u16 flags Flags"
    assert flags.bounds() == "MAC=0x1; other bits 0"


# --- Bool ------------------------------------------------------------------------------


def test_bool_is_exactly_zero_or_one() -> None:
    assert Bool().parse(b"\x00") is False
    assert Bool().parse(b"\x01") is True
    for raw in range(2, 256):
        rejects(K.NON_CANONICAL, Bool().parse, bytes([raw]))
    assert Bool().build(True) == b"\x01"
    assert Bool().build(False) == b"\x00"
    assert (Bool().wire_type(), Bool().bounds()) == ("u8 bool", "0 or 1")


@pytest.mark.parametrize("value", [0, 1, None, "true", b"\x01"])
def test_bool_builds_bools_only(value: Any) -> None:
    rejects(K.NON_CANONICAL, Bool().build, value)


# --- Constant, FixedBytes -------------------------------------------------------------------


def test_constant_checks_what_it_reads_and_writes_only_itself() -> None:
    magic = Constant(b"PVSR", K.BAD_MAGIC)
    assert magic.parse(b"PVSR") is None
    rejects(K.BAD_MAGIC, magic.parse, b"PVSQ")
    assert magic.build(None) == b"PVSR"
    assert magic.build("anything") == b"PVSR"  # the value is not the caller's to choose
    assert magic.bounds() == "= b'PVSR'"
    assert Constant(b"\x00\x00", K.RESERVED_NONZERO).bounds() == "all zero"


@pytest.mark.parametrize("value", [b"\x00" * 3, b"\x00" * 5, bytearray(4), "abcd", None, [0, 0, 0, 0]])
def test_fixed_bytes_build_exact_size_bytes_only(value: Any) -> None:
    rejects(K.OUT_OF_RANGE, FixedBytes(4).build, value)


def test_fixed_bytes_round_trip() -> None:
    assert FixedBytes(4).build(b"\x00\xff\x10\x01") == b"\x00\xff\x10\x01"
    assert FixedBytes(4).parse(b"\x00\xff\x10\x01") == b"\x00\xff\x10\x01"


# --- Uuid ------------------------------------------------------------------------------------


def _uuid_with_byte8(value: int) -> bytes:
    return bytes(range(1, 9)) + bytes([value]) + bytes(range(10, 17))


@pytest.mark.parametrize("byte8", [0x00, 0x3F, 0x40, 0x7F, 0xC0, 0xFF])
def test_uuid_refuses_other_variants(byte8: int) -> None:
    raw = _uuid_with_byte8(byte8)
    rejects(K.INVALID_IDENTIFIER, Uuid().parse, raw)
    rejects(K.INVALID_IDENTIFIER, Uuid(nullable=True).parse, raw)
    rejects(K.INVALID_IDENTIFIER, Uuid().build, uuid.UUID(bytes=raw))


@pytest.mark.parametrize("byte8", [0x80, 0xBF])
def test_uuid_accepts_the_rfc9562_variant(byte8: int) -> None:
    raw = _uuid_with_byte8(byte8)
    assert Uuid().parse(raw) == uuid.UUID(bytes=raw)
    assert Uuid().build(uuid.UUID(bytes=raw)) == raw


def test_nil_uuid_is_none_only_where_nullable() -> None:
    rejects(K.INVALID_IDENTIFIER, Uuid().parse, bytes(16))
    assert Uuid(nullable=True).parse(bytes(16)) is None
    assert Uuid(nullable=True).build(None) == bytes(16)
    rejects(K.INVALID_IDENTIFIER, Uuid().build, None)
    rejects(K.INVALID_IDENTIFIER, Uuid().build, uuid.UUID(int=0))


@pytest.mark.parametrize("value", [str(uuid.UUID(int=1 << 63)), (1 << 63).to_bytes(16, "big"), 5])
def test_uuid_builds_uuid_objects_only(value: Any) -> None:
    rejects(K.INVALID_IDENTIFIER, Uuid().build, value)
    rejects(K.INVALID_IDENTIFIER, Uuid(nullable=True).build, value)


def test_uuid_descriptions() -> None:
    assert Uuid().wire_type() == "16 bytes UUID"
    assert Uuid().bounds() == "not nil, RFC 9562 variant"
    assert Uuid(nullable=True).bounds() == "nil = none, else RFC 9562 variant"


# --- Mac ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [bytes(6), b"\x01\x00\x00\x00\x00\x00", b"\xff" * 6, b"\x03\x11\x22\x33\x44\x55"])
def test_mac_refuses_zero_and_group_addresses(raw: bytes) -> None:
    rejects(K.INVALID_IDENTIFIER, Mac().parse, raw)
    rejects(K.INVALID_IDENTIFIER, Mac().build, raw)


@pytest.mark.parametrize("raw", [b"\x02\x00\x00\x00\x00\x01", b"\x00\x00\x00\x00\x00\x01", b"\xfe" + b"\xff" * 5])
def test_mac_accepts_unicast_addresses(raw: bytes) -> None:
    assert Mac().parse(raw) == raw
    assert Mac().build(raw) == raw


@pytest.mark.parametrize("value", [b"\x02\x00\x00\x00\x00", b"\x02" * 7, bytearray(b"\x02" * 6), "02:00:00:00:00:01"])
def test_mac_builds_six_bytes_only(value: Any) -> None:
    rejects(K.INVALID_IDENTIFIER, Mac().build, value)


def test_mac_descriptions() -> None:
    assert (Mac().wire_type(), Mac().bounds()) == ("6 bytes MAC", "unicast, not zero")


# --- Named, Record ------------------------------------------------------------------------------


def test_named_fields_store_everything_but_constants() -> None:
    stored = field("token", UInt(8), "a token")
    constant = field("magic", Constant(b"PV", K.BAD_MAGIC), "magic")
    assert (stored.name, stored.doc, stored.stored) == ("token", "a token", True)
    assert constant.stored is False


@dataclasses.dataclass(frozen=True)
class Pair:
    low: int
    high: int


PAIR = Record(
    Pair,
    field("magic", Constant(b"P", K.BAD_MAGIC), "magic"),
    field("low", UInt(1), "low"),
    field("high", UInt(1), "high"),
    rules=[("low <= high", lambda p: p.low <= p.high)],
)


def test_record_parses_in_order_skipping_constants() -> None:
    assert PAIR.parse(b"P\x01\x02") == Pair(1, 2)
    assert PAIR.build(Pair(1, 2)) == b"P\x01\x02"
    assert PAIR.sizeof() == 3
    rejects(K.BAD_MAGIC, PAIR.parse, b"Q\x01\x02")


def test_record_rules_run_both_ways() -> None:
    error = rejects(K.CROSS_FIELD, PAIR.parse, b"P\x02\x01")
    assert "Pair: low <= high" in str(error)
    rejects(K.CROSS_FIELD, PAIR.build, Pair(2, 1))
    assert PAIR.build(Pair(2, 2)) == b"P\x02\x02"


def test_record_builds_its_own_dataclass_only() -> None:
    @dataclasses.dataclass(frozen=True)
    class Other:
        low: int
        high: int

    @dataclasses.dataclass(frozen=True)
    class SubPair(Pair):
        pass

    for value in (Other(1, 2), SubPair(1, 2), (1, 2), None):
        rejects(K.MALFORMED, PAIR.build, value)


@pytest.mark.parametrize("names", [("low",), ("high", "low"), ("low", "high", "extra")])
def test_record_refuses_a_schema_that_differs_from_its_dataclass(names: tuple[str, ...]) -> None:
    with pytest.raises(TypeError, match="Pair"):
        Record(Pair, *(field(name, UInt(1), name) for name in names))


def test_record_descriptions_and_size() -> None:
    assert PCI_ADDRESS.wire_type() == "PciAddress"
    assert PCI_ADDRESS.bounds() == ""
    assert PCI_ADDRESS.sizeof() == 5
    assert HEADER.sizeof() == m.HEADER_SIZE
    with pytest.raises(Exception, match="variable size"):
        MESSAGES[m.MessageType.INSTANCE_INFO].payload.sizeof()


# --- BoundedList ------------------------------------------------------------------------------


def test_bounded_list_without_order_allows_any_order_and_repeats() -> None:
    items = BoundedList(UInt(1), 3)
    assert items.parse(b"\x03\x05\x01\x05") == (5, 1, 5)
    assert items.build((5, 1, 5)) == b"\x03\x05\x01\x05"
    assert items.parse(b"\x00") == ()
    assert items.bounds() == "count 0..3"


def test_bounded_list_with_order_requires_strictly_increasing_keys() -> None:
    items = BoundedList(UInt(1), 3, order_key=int)
    assert items.parse(b"\x03\x01\x02\x05") == (1, 2, 5)
    for raw in (b"\x02\x02\x01", b"\x02\x01\x01", b"\x03\x01\x03\x02"):
        rejects(K.NON_CANONICAL, items.parse, raw)
    for value in ((2, 1), (1, 1)):
        rejects(K.NON_CANONICAL, items.build, value)
    assert items.bounds() == "count 0..3; strictly increasing"
    assert items.wire_type() == "u8 count, then count x u8"


def test_bounded_list_checks_the_count_before_any_item() -> None:
    parsed: list[bytes] = []

    class Spy(UInt):
        def from_wire(self, raw: bytes) -> int:
            parsed.append(raw)
            return super().from_wire(raw)

    items = BoundedList(Spy(1), 3)
    rejects(K.TOO_MANY_ITEMS, items.parse, b"\x04\x01\x02\x03\x04")
    assert parsed == []
    rejects(K.TOO_MANY_ITEMS, items.build, (1, 2, 3, 4))
    assert parsed == []


@pytest.mark.parametrize("value", [[1, 2], None, {1, 2}, b"\x01\x02"])
def test_bounded_list_builds_tuples_only(value: Any) -> None:
    rejects(K.MALFORMED, BoundedList(UInt(1), 3).build, value)


def test_bounded_list_has_no_static_size() -> None:
    with pytest.raises(Exception, match="variable size") as info:
        BoundedList(UInt(1), 3).sizeof()
    assert type(info.value).__name__ == "SizeofError"


# --- the schema uses strict fields only ----------------------------------------------------


STRICT_LEAVES = (UInt, StrictEnum, StrictFlags, Bool, Constant, FixedBytes, Uuid, Mac)


def _walk(node: Any) -> list[Any]:
    if isinstance(node, Record):
        return [node] + [n for member in node.members for n in _walk(member.subcon)]
    if isinstance(node, BoundedList):
        return [node, *_walk(node.count), *_walk(node.item)]
    return [node]


def test_every_construct_in_the_grammar_is_a_strict_field() -> None:
    """Properties 6 and 11: no stock Enum/Flag/Padding, no Pointer/Peek/Seek anywhere in the grammar."""
    nodes = _walk(HEADER) + [n for spec in MESSAGES.values() for n in _walk(spec.payload)]
    assert len(nodes) > 100
    for node in nodes:
        assert isinstance(node, (Record, BoundedList, *STRICT_LEAVES)), node
        assert type(node).__module__ == fields.__name__


def test_every_enum_field_uses_an_int_enum() -> None:
    enum_fields = [n for spec in MESSAGES.values() for n in _walk(spec.payload) if isinstance(n, StrictEnum)]
    assert enum_fields
    for node in enum_fields:
        assert issubclass(node.enum_type, enum.IntEnum)
        assert max(int(member) for member in node.enum_type) <= (1 << (8 * node.size)) - 1
