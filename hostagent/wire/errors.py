"""The one error type of the wire codec.

Every rejection of untrusted bytes, and every refusal to encode an invalid
message, is a :class:`FrameError` carrying a :class:`FrameErrorKind`.  Any
other exception escaping :func:`hostagent.wire.decode` is a bug in the codec;
the fuzz targets in ``fuzz/`` state exactly that invariant.
"""

from __future__ import annotations

import enum


class FrameErrorKind(enum.Enum):
    """Why a frame was rejected.  Closed set; each row of docs/wire-format.md names one."""

    TRUNCATED = "truncated"  # fewer bytes than the header or its length field announce
    OVERSIZED = "oversized"  # more than MAX_FRAME bytes, or a length above MAX_PAYLOAD
    TRAILING_BYTES = "trailing_bytes"  # bytes left over after the frame or a payload region
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    UNDEFINED_FLAGS = "undefined_flags"  # a flag bit that the protocol does not define
    BAD_FLAGS = "bad_flags"  # defined bits, but not the ones this message type requires
    WRONG_DIRECTION = "wrong_direction"  # a command sent by the agent or an answer sent to it
    FD_COUNT_MISMATCH = "fd_count_mismatch"
    RESERVED_NONZERO = "reserved_nonzero"
    UNKNOWN_ENUM = "unknown_enum"
    NON_CANONICAL = "non_canonical"  # booleans other than 0/1, lists out of order or repeated
    OUT_OF_RANGE = "out_of_range"
    INVALID_IDENTIFIER = "invalid_identifier"  # nil UUID, multicast MAC, ...
    CROSS_FIELD = "cross_field"  # each field valid alone, the combination is not
    TOO_MANY_ITEMS = "too_many_items"  # a count above its documented bound
    MALFORMED = "malformed"  # anything else the grammar refuses


class FrameError(Exception):
    """A frame was rejected (decoding) or could not be produced (encoding).

    ``kind`` is machine-readable; ``detail`` names the field and the rule but
    never echoes more than a bounded number of input bytes.
    """

    def __init__(self, kind: FrameErrorKind, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
