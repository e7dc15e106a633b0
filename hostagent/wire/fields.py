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
    """A fixed-size leaf: subclasses define ``size``, ``check`` and the conversions."""

    size = 0

    def _sizeof(self, context: Any, path: str) -> int:
        return self.size

    def from_wire(self, raw: bytes) -> Any:
        raise NotImplementedError

    def to_wire(self, value: Any) -> bytes:
        raise NotImplementedError

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        return self.from_wire(c.stream_read(stream, self.size, path))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        c.stream_write(stream, self.to_wire(obj), self.size, path)
        return obj

    def wire_type(self) -> str:
        return f"{self.size} byte{'s' if self.size != 1 else ''}"

    def bounds(self) -> str:
        return ""


class UInt(Field):
    """Unsigned big-endian integer with an inclusive range."""

    def __init__(self, width: int, lo: int = 0, hi: int | None = None,
                 kind: FrameErrorKind = FrameErrorKind.OUT_OF_RANGE) -> None:
        super().__init__()
        self.size = width
        self.full = (1 << (8 * width)) - 1
        self.lo = lo
        self.hi = self.full if hi is None else hi
        self.kind = kind

    def from_wire(self, raw: bytes) -> int:
        value = int.from_bytes(raw, "big")
        if not self.lo <= value <= self.hi:
            raise Reject(self.kind, f"{value} not in [{self.lo}, {self.hi}]")
        return value

    def to_wire(self, value: Any) -> bytes:
        if type(value) is not int:
            raise Reject(self.kind, f"expected int, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise Reject(self.kind, f"{value} not in [{self.lo}, {self.hi}]")
        return value.to_bytes(self.size, "big")

    def wire_type(self) -> str:
        return f"u{8 * self.size}"

    def bounds(self) -> str:
        return "" if (self.lo, self.hi) == (0, self.full) else f"{self.lo}..{self.hi}"


class StrictEnum(Field):
    """Closed enum: unknown values are rejected both ways (no default branch)."""

    def __init__(self, width: int, enum_type: type[enum.IntEnum],
                 kind: FrameErrorKind = FrameErrorKind.UNKNOWN_ENUM) -> None:
        super().__init__()
        self.size = width
        self.enum_type = enum_type
        self.members: dict[int, enum.IntEnum] = {int(m): m for m in enum_type}
        self.kind = kind

    def from_wire(self, raw: bytes) -> enum.IntEnum:
        member = self.members.get(int.from_bytes(raw, "big"))
        if member is None:
            raise Reject(self.kind, f"{int.from_bytes(raw, 'big'):#x} is not a {self.enum_type.__name__}")
        return member

    def to_wire(self, value: Any) -> bytes:
        if not isinstance(value, self.enum_type):
            raise Reject(self.kind, f"expected {self.enum_type.__name__}, got {value!r}")
        return int(value).to_bytes(self.size, "big")

    def wire_type(self) -> str:
        return f"u{8 * self.size} enum {self.enum_type.__name__}"

    def bounds(self) -> str:
        return ", ".join(f"{m.name}={int(m)}" for m in self.enum_type)


class StrictFlags(Field):
    """Bit field where every undefined bit must be zero."""

    def __init__(self, width: int, flag_type: type[enum.IntFlag]) -> None:
        super().__init__()
        self.size = width
        self.flag_type = flag_type
        self.defined = 0
        for member in flag_type:
            self.defined |= int(member)

    def from_wire(self, raw: bytes) -> enum.IntFlag:
        value = int.from_bytes(raw, "big")
        if value & ~self.defined:
            raise Reject(FrameErrorKind.UNDEFINED_FLAGS, f"undefined bits {value & ~self.defined:#x}")
        return self.flag_type(value)

    def to_wire(self, value: Any) -> bytes:
        if not isinstance(value, self.flag_type) or int(value) & ~self.defined:
            raise Reject(FrameErrorKind.UNDEFINED_FLAGS, f"invalid flags {value!r}")
        return int(value).to_bytes(self.size, "big")

    def wire_type(self) -> str:
        return f"u{8 * self.size} flags {self.flag_type.__name__}"

    def bounds(self) -> str:
        names = ", ".join(f"{m.name}={int(m):#x}" for m in self.flag_type)
        return f"{names}; other bits 0"


class Bool(Field):
    """One byte, exactly 0 or 1 (construct's Flag reads any non-zero byte as true)."""

    size = 1

    def from_wire(self, raw: bytes) -> bool:
        if raw[0] > 1:
            raise Reject(FrameErrorKind.NON_CANONICAL, f"boolean byte {raw[0]:#x}")
        return raw[0] == 1

    def to_wire(self, value: Any) -> bytes:
        if type(value) is not bool:
            raise Reject(FrameErrorKind.NON_CANONICAL, f"expected bool, got {value!r}")
        return b"\x01" if value else b"\x00"

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
        # most payloads): one read of the whole record, then each field checks
        # its own slice, in order.  Same rules, same order, fewer calls.
        self.fixed: tuple[tuple[Field, int, int, bool], ...] | None = None
        if all(isinstance(f.subcon, Field) for f in members):
            layout, offset = [], 0
            for f in members:
                layout.append((f.subcon, offset, offset + f.subcon.size, f.stored))
                offset += f.subcon.size
            self.fixed = tuple(layout)
            self.fixed_size = offset

    def check_rules(self, obj: Any) -> Any:
        for description, predicate in self.rules:
            if not predicate(obj):
                raise Reject(FrameErrorKind.CROSS_FIELD, f"{self.cls.__name__}: {description}")
        return obj

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        if self.fixed is not None:
            raw = c.stream_read(stream, self.fixed_size, path)
            parsed = [field_.from_wire(raw[start:end]) for field_, start, end, _ in self.fixed]
        else:
            parsed = [member.subcon._parse(stream, context, path) for member in self.members]
        # Constants are checked by their own parse and then dropped: keep the stored fields only.
        return self.check_rules(self.cls(*[parsed[index] for index in self.stored_indices]))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if type(obj) is not self.cls:
            raise Reject(FrameErrorKind.MALFORMED, f"expected {self.cls.__name__}, got {type(obj).__name__}")
        # Fields first, so that every value has passed its own type and range
        # check before a cross-field rule looks at it (a rule must never see a
        # wrongly typed value and leak a TypeError).
        if self.fixed is not None:
            raw = b"".join(field_.to_wire(getattr(obj, member.name) if stored else None)
                           for (field_, _, _, stored), member in zip(self.fixed, self.members, strict=True))
            c.stream_write(stream, raw, self.fixed_size, path)
        else:
            for member in self.members:
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
