"""Frame codec: the one entry point between untrusted bytes and typed messages.

Theory of operation.  ``decode`` checks, in this order and before any
payload is parsed: the total size against MAX_FRAME, the 20-byte header field
by field (magic, version, type, flags, sequence, descriptor count, reserved
byte, payload length), the MAC flag against the message class, the direction
when the caller names one, and the exact total length.  Only then is the
payload parsed from a slice of exactly ``length`` bytes that must be consumed
to its last byte.  Cross-field rules run inside the schema; the descriptor
count is compared with what the parsed message requires.  The result is a
frozen :class:`Frame` whose message is a frozen dataclass.

Every exception construct can raise (or leak: IndexError, KeyError,
struct.error, UnicodeDecodeError, ValueError, OverflowError) is turned into
:class:`FrameError` here and nowhere else.  Anything else escaping is a bug,
and the fuzz targets treat it as a crash.

``encode`` runs the same rules in the other direction, so that
``decode(encode(f)) == f`` and ``encode(decode(b)) == b`` (properties 4 and 5).
Parsing never uses construct's compiled mode, which skips length checks.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any

import construct as c

from . import messages as m
from .errors import FrameError, FrameErrorKind
from .fields import Record, Reject
from .messages import Header
from .schema import HEADER, MESSAGES, SPEC_BY_CLASS, MessageSpec

_MAC_BIT = int(m.Flags.MAC)
_HEADER_FLAGS = {True: m.Flags.MAC, False: m.Flags(0)}  # by MessageSpec.authenticated
_TYPE_NAMES = {member: member.name for member in m.MessageType}  # Enum.name is a slow property

# Exceptions construct can raise or leak; turned into FrameError here and only here.
_LEAKS = (c.ConstructError, IndexError, KeyError, struct.error, UnicodeDecodeError, ValueError, OverflowError)


def _parse_exact(record: Record, data: bytes, where: str) -> Any:
    """Parse ``data`` with ``record`` and require it to be consumed to the last byte."""
    stream = io.BytesIO(data)
    try:
        value = record._parse(stream, None, where)
    except _LEAKS as exc:
        raise _translate(exc, where) from exc
    if stream.tell() != len(data):
        left = len(data) - stream.tell()
        raise FrameError(FrameErrorKind.TRAILING_BYTES, f"{where}: {left} bytes after the last field")
    return value


def _build(record: Record, value: Any, where: str) -> bytes:
    try:
        if record.fixed is not None:
            return record.pack(value)
        stream = io.BytesIO()
        record._build(value, stream, None, where)
    except _LEAKS as exc:
        raise _translate(exc, f"encoding {where}") from exc
    return stream.getvalue()


@dataclass(frozen=True, slots=True)
class Frame:
    """A fully validated frame.  ``mac`` is present exactly on authenticated types.

    ``signed`` holds the header and payload bytes a decoded authenticated frame
    came from, so the channel can check the MAC without encoding the frame
    again; by canonical encoding (property 4) they equal ``signed_region(frame)``.
    It takes no part in equality.
    """

    seq: int
    message: m.Message
    mac: bytes | None = None
    signed: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def spec(self) -> MessageSpec:
        try:
            return SPEC_BY_CLASS[type(self.message)]
        except KeyError:
            raise FrameError(FrameErrorKind.MALFORMED, f"not a message: {type(self.message).__name__}") from None

    @property
    def type(self) -> m.MessageType:
        return self.spec.type

    @property
    def fd_count(self) -> int:
        """Descriptors that must travel with this frame (SCM_RIGHTS)."""
        return self.spec.fd_count(self.message)


def _translate(exc: Exception, where: str) -> FrameError:
    if isinstance(exc, Reject):
        return FrameError(exc.kind, f"{where}: {exc.args[0] if exc.args else exc}")
    if isinstance(exc, c.StreamError):
        return FrameError(FrameErrorKind.TRUNCATED, f"{where}: ran out of bytes")
    return FrameError(FrameErrorKind.MALFORMED, f"{where}: {type(exc).__name__}")


def decode_header(data: bytes, direction: m.Direction | None = None) -> Header:
    """Parse and check the first HEADER_SIZE bytes of ``data``.

    Used by :func:`decode` and by the streaming decoder, which must know the
    frame size (and reject a bad header) before the rest has arrived.
    """
    if len(data) < m.HEADER_SIZE:
        raise FrameError(FrameErrorKind.TRUNCATED, f"header needs {m.HEADER_SIZE} bytes, got {len(data)}")
    header: Header = _parse_exact(HEADER, data[: m.HEADER_SIZE], "header")
    spec = MESSAGES[header.type]
    # Plain int arithmetic: IntFlag operators cost more than the rest of this check.
    if (int(header.flags) & _MAC_BIT != 0) != spec.authenticated:
        raise FrameError(FrameErrorKind.BAD_FLAGS,
                         f"{spec.type.name} {'requires' if spec.authenticated else 'forbids'} the MAC flag")
    if direction is not None and spec.direction is not direction:
        raise FrameError(FrameErrorKind.WRONG_DIRECTION, f"{spec.type.name} is not sent {direction.value}")
    return header


def decode(data: bytes, direction: m.Direction | None = None) -> Frame:
    """Decode exactly one frame from ``data`` or raise :class:`FrameError`.

    With ``direction`` set, frames that do not travel that way are rejected
    (the agent accepts commands only, the controller answers only).
    """
    if len(data) > m.MAX_FRAME:
        raise FrameError(FrameErrorKind.OVERSIZED, f"{len(data)} bytes > MAX_FRAME {m.MAX_FRAME}")
    return decode_after_header(data, decode_header(data, direction))


def decode_after_header(data: bytes, header: Header) -> Frame:
    """The rest of :func:`decode`, for a ``header`` that :func:`decode_header` returned for ``data``.

    The streaming decoder checked the header as soon as it arrived; this
    spares it a second parse.  Every check after the header is here.
    """
    if len(data) < header.frame_size:
        raise FrameError(FrameErrorKind.TRUNCATED, f"frame needs {header.frame_size} bytes, got {len(data)}")
    if len(data) > header.frame_size:
        raise FrameError(FrameErrorKind.TRAILING_BYTES, f"{len(data) - header.frame_size} bytes after the frame")
    spec = MESSAGES[header.type]
    end = m.HEADER_SIZE + header.length
    message = _parse_exact(spec.payload, data[m.HEADER_SIZE:end], _TYPE_NAMES[header.type])
    required = spec.fd_count(message)
    if header.fd_count != required:
        raise FrameError(FrameErrorKind.FD_COUNT_MISMATCH,
                         f"{header.type.name} carries {required} descriptors, header says {header.fd_count}")
    if not spec.authenticated:
        return Frame(header.seq, message)
    return Frame(header.seq, message, bytes(data[end:]), bytes(data[:end]))


def signed_region(frame: Frame) -> bytes:
    """Header and payload of ``frame``: the bytes its MAC covers.

    ``frame.mac`` is ignored, so the channel can compute the MAC of a frame it
    is about to send.  Raises :class:`FrameError` on any invalid value.
    """
    spec = frame.spec
    payload = _build(spec.payload, frame.message, _TYPE_NAMES[spec.type])
    try:
        # The stored fields of Header, in its order; no Header object is made.
        header = HEADER.pack_values(spec.type, _HEADER_FLAGS[spec.authenticated], frame.seq,
                                    spec.fd_count(frame.message), len(payload))
    except _LEAKS as exc:
        raise _translate(exc, "encoding header") from exc
    return header + payload


def encode(frame: Frame) -> bytes:
    """Encode a frame; the MAC must be present exactly on authenticated types."""
    region = signed_region(frame)
    if frame.spec.authenticated:
        if type(frame.mac) is not bytes or len(frame.mac) != m.MAC_SIZE:
            raise FrameError(FrameErrorKind.BAD_FLAGS, f"{frame.type.name} needs a {m.MAC_SIZE}-byte MAC")
        return region + frame.mac
    if frame.mac is not None:
        raise FrameError(FrameErrorKind.BAD_FLAGS, f"{frame.type.name} is a handshake message and has no MAC")
    return region
