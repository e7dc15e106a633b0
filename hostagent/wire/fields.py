"""Strict construct building blocks.

construct's stock Enum, FlagsEnum, Flag, Padding and Bytes accept unknown,
non-canonical or wrongly typed values in one direction or the other, and its
generic Struct costs more per field than the whole START_INSTANCE budget
allows.  Every field of the protocol is built from the constructs below
instead.  Each one:

- checks the same rule when parsing and when building (properties 4, 6, 7 and
  8 of docs/wire-format.md), raising :class:`Reject` with a precise
  :class:`FrameErrorKind`; building never truncates or wraps;
- reads with ``construct.stream_read``, which raises StreamError on a short
  read, so a truncated input can never be mistaken for a shorter field;
- describes itself (``wire_type``, ``bounds``) for the generated document.

Forward-only by construction: nothing here uses Pointer, Peek or Seek
(property 11).  No count can make a parser allocate more than the bytes
present: counts are checked against their bound first, and every list item
consumes at least one byte before the next is allocated (property 9).
"""

from __future__ import annotations

import enum
import itertools
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import fields as dataclass_fields
from typing import Any

import construct as c

from .errors import FrameErrorKind


class Reject(c.ValidationError):  # type: ignore[misc]
    """A rule of the grammar was broken; carries the kind for FrameError."""

    def __init__(self, kind: FrameErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Field(c.Construct):  # type: ignore[misc]
    """A fixed-size leaf: subclasses define ``size`` and the conversions, each with its check.

    A fixed-size :class:`Record` unpacks all its leaves with one ``struct``
    format; ``struct_code`` is this leaf's part of it.  A byte-string leaf
    unpacks to its raw bytes, checked by ``from_wire`` as from a stream, and
    packs with ``to_packed`` (``to_wire`` plus a size check); an
    :class:`IntField` unpacks to a number, checked by ``from_unpacked``.
    """

    size = 0

    def _sizeof(self, context: Any, path: str) -> int:
        return self.size

    def from_wire(self, raw: bytes) -> Any:
        raise NotImplementedError

    def to_wire(self, value: Any) -> bytes:
        raise NotImplementedError

    def struct_code(self) -> str:
        return f"{self.size}s"

    def to_packed(self, value: Any) -> Any:
        raw = self.to_wire(value)
        if len(raw) != self.size:
            # struct would pad or cut a byte string of the wrong size silently.
            raise Reject(FrameErrorKind.MALFORMED, f"{type(self).__name__} produced {len(raw)} bytes, not {self.size}")
        return raw

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        return self.from_wire(c.stream_read(stream, self.size, path))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        c.stream_write(stream, self.to_wire(obj), self.size, path)
        return obj

    def wire_type(self) -> str:
        return f"{self.size} byte{'s' if self.size != 1 else ''}"

    def bounds(self) -> str:
        return ""


_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


class IntField(Field):
    """A big-endian unsigned integer of 1, 2, 4 or 8 bytes whose rule is stated on its value.

    Subclasses define ``from_unpacked`` (number to value, with the check) and
    ``to_packed`` (value to number, with the same check); the byte
    conversions follow from those, so both paths apply one rule.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        if width not in _INT_CODES:
            raise ValueError(f"integer fields are 1, 2, 4 or 8 bytes wide, not {width}")
        self.size = width

    def struct_code(self) -> str:
        return _INT_CODES[self.size]

    def from_unpacked(self, value: int) -> Any:
        raise NotImplementedError

    def to_packed(self, value: Any) -> int:
        raise NotImplementedError

    def from_wire(self, raw: bytes) -> Any:
        return self.from_unpacked(int.from_bytes(raw, "big"))

    def to_wire(self, value: Any) -> bytes:
        return self.to_packed(value).to_bytes(self.size, "big")


class UInt(IntField):
    """Unsigned big-endian integer with an inclusive range."""

    def __init__(self, width: int, lo: int = 0, hi: int | None = None,
                 kind: FrameErrorKind = FrameErrorKind.OUT_OF_RANGE) -> None:
        super().__init__(width)
        self.full = (1 << (8 * width)) - 1
        self.lo = lo
        self.hi = self.full if hi is None else hi
        self.kind = kind

    def from_unpacked(self, value: int) -> int:
        if not self.lo <= value <= self.hi:
            raise Reject(self.kind, f"{value} not in [{self.lo}, {self.hi}]")
        return value

    def to_packed(self, value: Any) -> int:
        if type(value) is not int:
            raise Reject(self.kind, f"expected int, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise Reject(self.kind, f"{value} not in [{self.lo}, {self.hi}]")
        return value

    def wire_type(self) -> str:
        return f"u{8 * self.size}"

    def bounds(self) -> str:
        return "" if (self.lo, self.hi) == (0, self.full) else f"{self.lo}..{self.hi}"


class StrictEnum(IntField):
    """Closed enum: unknown values are rejected both ways (no default branch)."""

    def __init__(self, width: int, enum_type: type[enum.IntEnum],
                 kind: FrameErrorKind = FrameErrorKind.UNKNOWN_ENUM) -> None:
        super().__init__(width)
        self.enum_type = enum_type
        self.members: dict[int, enum.IntEnum] = {int(m): m for m in enum_type}
        self.kind = kind

    def from_unpacked(self, value: int) -> enum.IntEnum:
        member = self.members.get(value)
        if member is None:
            raise Reject(self.kind, f"{value:#x} is not a {self.enum_type.__name__}")
        return member

    def to_packed(self, value: Any) -> int:
        if not isinstance(value, self.enum_type):
            raise Reject(self.kind, f"expected {self.enum_type.__name__}, got {value!r}")
        return int(value)

    def wire_type(self) -> str:
        return f"u{8 * self.size} enum {self.enum_type.__name__}"

    def bounds(self) -> str:
        return ", ".join(f"{m.name}={int(m)}" for m in self.enum_type)


class StrictFlags(IntField):
    """Bit field where every undefined bit must be zero."""

    def __init__(self, width: int, flag_type: type[enum.IntFlag]) -> None:
        super().__init__(width)
        self.flag_type = flag_type
        self.defined = 0
        for member in flag_type:
            self.defined |= int(member)
        # Every value with no undefined bit, made once: building an IntFlag
        # costs more than the rest of a header check.
        self.members: dict[int, enum.IntFlag] = {}
        for count in range(len(flag_type) + 1):
            for chosen in itertools.combinations(flag_type, count):
                value = sum(int(member) for member in chosen)
                self.members[value] = flag_type(value)

    def from_unpacked(self, value: int) -> enum.IntFlag:
        member = self.members.get(value)
        if member is None:
            raise Reject(FrameErrorKind.UNDEFINED_FLAGS, f"undefined bits {value & ~self.defined:#x}")
        return member

    def to_packed(self, value: Any) -> int:
        if not isinstance(value, self.flag_type) or int(value) & ~self.defined:
            raise Reject(FrameErrorKind.UNDEFINED_FLAGS, f"invalid flags {value!r}")
        return int(value)

    def wire_type(self) -> str:
        return f"u{8 * self.size} flags {self.flag_type.__name__}"

    def bounds(self) -> str:
        names = ", ".join(f"{m.name}={int(m):#x}" for m in self.flag_type)
        return f"{names}; other bits 0"


class Bool(IntField):
    """One byte, exactly 0 or 1 (construct's Flag reads any non-zero byte as true)."""

    def __init__(self) -> None:
        super().__init__(1)

    def from_unpacked(self, value: int) -> bool:
        if value > 1:
            raise Reject(FrameErrorKind.NON_CANONICAL, f"boolean byte {value:#x}")
        return value == 1

    def to_packed(self, value: Any) -> int:
        if type(value) is not bool:
            raise Reject(FrameErrorKind.NON_CANONICAL, f"expected bool, got {value!r}")
        return int(value)

    def wire_type(self) -> str:
        return "u8 bool"

    def bounds(self) -> str:
        return "0 or 1"


class Constant(Field):
    """A fixed byte string (magic, reserved zeros) with its own error kind.

    Unlike construct's Padding, the bytes read are checked.
    """

    def __init__(self, value: bytes, kind: FrameErrorKind) -> None:
        super().__init__()
        self.size = len(value)
        self.value = value
        self.kind = kind

    def from_wire(self, raw: bytes) -> None:
        if raw != self.value:
            raise Reject(self.kind, f"expected {self.value!r}")
        return None

    def to_wire(self, value: Any) -> bytes:
        return self.value

    def bounds(self) -> str:
        return "all zero" if self.value == bytes(self.size) else f"= {self.value!r}"


class FixedBytes(Field):
    """Opaque fixed-size binary value (nonce, digest, signature, MAC)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def from_wire(self, raw: bytes) -> bytes:
        return raw

    def to_wire(self, value: Any) -> bytes:
        if type(value) is not bytes or len(value) != self.size:
            raise Reject(FrameErrorKind.OUT_OF_RANGE, f"expected {self.size} bytes")
        return value


_NIL = bytes(16)


class Uuid(Field):
    """16-byte UUID of the RFC 9562 variant; the nil UUID only where ``nullable`` (as None)."""

    size = 16

    def __init__(self, nullable: bool = False) -> None:
        super().__init__()
        self.nullable = nullable

    def from_wire(self, raw: bytes) -> uuid.UUID | None:
        if raw == _NIL:
            if self.nullable:
                return None
            raise Reject(FrameErrorKind.INVALID_IDENTIFIER, "nil UUID")
        if raw[8] & 0xC0 != 0x80:
            raise Reject(FrameErrorKind.INVALID_IDENTIFIER, "UUID variant is not RFC 9562")
        return uuid.UUID(bytes=raw)

    def to_wire(self, value: Any) -> bytes:
        if value is None and self.nullable:
            return _NIL
        if not isinstance(value, uuid.UUID):
            raise Reject(FrameErrorKind.INVALID_IDENTIFIER, f"expected UUID, got {type(value).__name__}")
        raw = value.bytes
        if raw == _NIL:
            # Even where nil means "none" the encoder takes None, never a nil
            # UUID object: that would decode to None and break the round trip.
            raise Reject(FrameErrorKind.INVALID_IDENTIFIER, "nil UUID (use None where a field may be empty)")
        self.from_wire(raw)  # the same rule both ways
        return raw

    def wire_type(self) -> str:
        return "16 bytes UUID"

    def bounds(self) -> str:
        return ("nil = none, else " if self.nullable else "not nil, ") + "RFC 9562 variant"


class Mac(Field):
    """6-byte Ethernet address: unicast and not all zero."""

    size = 6

    def from_wire(self, raw: bytes) -> bytes:
        if raw == bytes(6) or raw[0] & 0x01:
            raise Reject(FrameErrorKind.INVALID_IDENTIFIER, "MAC is zero or multicast")
        return raw

    def to_wire(self, value: Any) -> bytes:
        if type(value) is not bytes or len(value) != 6:
            raise Reject(FrameErrorKind.INVALID_IDENTIFIER, "expected 6 bytes")
        return self.from_wire(value)

    def wire_type(self) -> str:
        return "6 bytes MAC"

    def bounds(self) -> str:
        return "unicast, not zero"


class Named:
    """A field of a Record: name, construct, meaning.  Constants are checked, not stored."""

    __slots__ = ("doc", "name", "stored", "subcon")

    def __init__(self, name: str, subcon: c.Construct, doc: str) -> None:
        self.name = name
        self.subcon = subcon
        self.doc = doc
        self.stored = not isinstance(subcon, Constant)


def field(name: str, subcon: c.Construct, doc: str) -> Named:
    """A field with its meaning, as rendered into docs/wire-format.md."""
    return Named(name, subcon, doc)


class Record(c.Construct):  # type: ignore[misc]
    """A sequence of fields that decodes to (and encodes from) a frozen dataclass.

    Fields are parsed in order, each from the current stream position
    (forward only).  Constant fields (magic, reserved) are checked, not stored.
    ``rules`` are the cross-field refinements (property 8): each is a
    ``(description, predicate)`` pair checked after parsing and before
    building, so an invalid combination can be neither read nor written.
    """

    def __init__(self, cls: type, *members: Named,
                 rules: Sequence[tuple[str, Callable[[Any], bool]]] = ()) -> None:
        super().__init__()
        self.cls = cls
        self.members = members
        self.names = tuple(f.name for f in dataclass_fields(cls))
        named = tuple(f.name for f in members if f.stored)
        if named != self.names:
            raise TypeError(f"{cls.__name__}: schema fields {named} != dataclass fields {self.names}")
        self.rules = tuple(rules)
        self.stored_indices = tuple(index for index, member in enumerate(members) if member.stored)
        # Fast path for records made only of fixed-size fields (the header and
        # most payloads): one struct unpacks the whole record, then each field
        # checks its own value, in order.  Same rules, same order, fewer calls.
        # ``_leaves`` holds each field with its name (None for a constant),
        # the constant's packed bytes (the same whatever the value, so made
        # once) and whether it unpacks to a number.
        self.fixed: struct.Struct | None = None
        self._leaves: tuple[tuple[Field, str | None, Any, bool], ...] = ()
        if all(isinstance(f.subcon, Field) for f in members):
            self.fixed = struct.Struct(">" + "".join(f.subcon.struct_code() for f in members))
            self._leaves = tuple((f.subcon, f.name if f.stored else None,
                                  None if f.stored else f.subcon.to_packed(None), isinstance(f.subcon, IntField))
                                 for f in members)

    def check_rules(self, obj: Any) -> Any:
        for description, predicate in self.rules:
            if not predicate(obj):
                raise Reject(FrameErrorKind.CROSS_FIELD, f"{self.cls.__name__}: {description}")
        return obj

    def pack(self, obj: Any) -> bytes:
        """Encode a fixed-size record."""
        assert self.fixed is not None
        self._check_type(obj)
        # Fields first, so that every value has passed its own type and range
        # check before a cross-field rule looks at it (a rule must never see a
        # wrongly typed value and leak a TypeError).
        raw: bytes = self.fixed.pack(*[constant if name is None else field_.to_packed(getattr(obj, name))
                                       for field_, name, constant, _ in self._leaves])
        if self.rules:
            self.check_rules(obj)
        return raw

    def pack_values(self, *values: Any) -> bytes:
        """Encode a fixed-size record that has no cross-field rules from its stored values, in order.

        For the frame header, encoded for every frame: no dataclass instance needed.
        """
        assert self.fixed is not None
        if self.rules or len(values) != len(self.names):
            raise TypeError(f"{self.cls.__name__}: pack_values takes the {len(self.names)} stored values "
                            "of a record without cross-field rules")
        stored = iter(values)
        raw: bytes = self.fixed.pack(*[constant if name is None else field_.to_packed(next(stored))
                                       for field_, name, constant, _ in self._leaves])
        return raw

    def _check_type(self, obj: Any) -> None:
        if type(obj) is not self.cls:
            raise Reject(FrameErrorKind.MALFORMED, f"expected {self.cls.__name__}, got {type(obj).__name__}")

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        if self.fixed is not None:
            raw = c.stream_read(stream, self.fixed.size, path)
            values = []
            # One unpacked value per leaf, by construction of the format.  The
            # header has constants and stored fields, so both ways are taken.
            for (field_, name, _, number), value in zip(self._leaves, self.fixed.unpack(raw), strict=False):
                value = field_.from_unpacked(value) if number else field_.from_wire(value)
                if name is not None:
                    values.append(value)
            obj = self.cls(*values)
            return self.check_rules(obj) if self.rules else obj
        parsed = [member.subcon._parse(stream, context, path) for member in self.members]
        # Constants are checked by their own parse and then dropped: keep the stored fields only.
        return self.check_rules(self.cls(*[parsed[index] for index in self.stored_indices]))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if self.fixed is not None:
            c.stream_write(stream, self.pack(obj), self.fixed.size, path)
            return obj
        self._check_type(obj)
        for member in self.members:  # fields first, then the rules (see pack)
            value = getattr(obj, member.name) if member.stored else None
            member.subcon._build(value, stream, context, path)
        self.check_rules(obj)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        return sum(member.subcon._sizeof(context, path) for member in self.members)

    def wire_type(self) -> str:
        return self.cls.__name__

    def bounds(self) -> str:
        return ""


class BoundedList(c.Construct):  # type: ignore[misc]
    """A u8 count followed by that many items, decoded to a tuple.

    The count is checked against ``max_items`` before any item is parsed.
    With ``order_key`` the items must be strictly increasing by that key, which
    makes the encoding canonical and rules out duplicates.
    """

    def __init__(self, item: c.Construct, max_items: int,
                 order_key: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self.count = UInt(1, 0, max_items, FrameErrorKind.TOO_MANY_ITEMS)
        self.item = item
        self.max_items = max_items
        self.order_key = order_key

    def _check_order(self, items: tuple[Any, ...]) -> tuple[Any, ...]:
        if self.order_key is not None:
            keys = [self.order_key(item) for item in items]
            for before, after in itertools.pairwise(keys):
                if before >= after:
                    raise Reject(FrameErrorKind.NON_CANONICAL, "items not strictly increasing")
        return items

    def _parse(self, stream: Any, context: Any, path: str) -> tuple[Any, ...]:
        count = self.count._parse(stream, context, path)
        return self._check_order(tuple(self.item._parse(stream, context, path) for _ in range(count)))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if type(obj) is not tuple:
            raise Reject(FrameErrorKind.MALFORMED, f"expected tuple, got {type(obj).__name__}")
        self.count._build(len(obj), stream, context, path)
        for item in obj:
            self.item._build(item, stream, context, path)
        self._check_order(obj)  # after the items passed their own checks, as in Record
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise c.SizeofError("variable size")

    def wire_type(self) -> str:
        return f"u8 count, then count x {self.item.wire_type()}"

    def bounds(self) -> str:
        order = "; strictly increasing" if self.order_key is not None else ""
        return f"count 0..{self.max_items}{order}"
