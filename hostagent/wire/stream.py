"""Streaming decoder: bytes arrive in any chunks, whole frames come out.

Theory of operation.  The decoder owns one buffer.  As soon as HEADER_SIZE
bytes are present the header is checked (so a bad magic or an oversized
length is refused without waiting for, or buffering, the rest), which fixes
the size of the frame; once that many bytes are present the rest of the frame
is decoded (:func:`~hostagent.wire.codec.decode_after_header`, the same checks
as ``decode`` without parsing the header twice) and removed from the buffer.

Invariants:
- the buffer never holds more than ``max_buffer`` bytes (``feed`` refuses);
- the frames yielded do not depend on how the bytes were chunked (property 10);
- after the first :class:`FrameError` the decoder is poisoned: every later
  call raises the same error, because a byte stream cannot be resynchronised
  safely and the session must end.

``bytes_needed`` tells a transport how much to read so that it never reads
past the current frame; the agent uses it so that descriptors passed with
SCM_RIGHTS arrive with the first byte of the frame they belong to.
"""

from __future__ import annotations

from typing import NoReturn

from . import messages as m
from .codec import (
    Frame,
    decode,  # noqa: F401 - not called here, but fuzz/fuzz_stream.py swaps this module's decode and decode_header
    decode_after_header,
    decode_header,
)
from .errors import FrameError, FrameErrorKind
from .messages import Header


class FrameDecoder:
    def __init__(self, direction: m.Direction | None = None, max_buffer: int = 2 * m.MAX_FRAME) -> None:
        if max_buffer < m.MAX_FRAME:
            raise ValueError("max_buffer must hold at least one maximal frame")
        self._direction = direction
        self._max_buffer = max_buffer
        self._buffer = bytearray()
        self._header: Header | None = None
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append bytes from the peer; raises if that would exceed ``max_buffer``."""
        self._raise_if_poisoned()
        if len(self._buffer) + len(data) > self._max_buffer:
            self._poison(FrameError(FrameErrorKind.OVERSIZED,
                                    f"more than {self._max_buffer} bytes buffered"))
        self._buffer += data

    def bytes_needed(self) -> int:
        """Bytes still missing to complete the header or the current frame (0 = a frame is ready).

        Once a whole header is buffered it is checked here, so a bad header
        raises (and poisons the decoder) without waiting for ``next_frame``.
        """
        self._raise_if_poisoned()
        self._read_header()
        target = m.HEADER_SIZE if self._header is None else self._header.frame_size
        return max(0, target - len(self._buffer))

    def _read_header(self) -> None:
        if self._header is None and len(self._buffer) >= m.HEADER_SIZE:
            try:
                self._header = decode_header(bytes(self._buffer[: m.HEADER_SIZE]), self._direction)
            except FrameError as exc:
                self._poison(exc)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more data is needed."""
        self._raise_if_poisoned()
        self._read_header()
        if self._header is None:
            return None
        size = self._header.frame_size
        if len(self._buffer) < size:
            return None
        try:
            # The header was checked on arrival: decode only what follows it.
            frame = decode_after_header(bytes(self._buffer[:size]), self._header)
        except FrameError as exc:
            self._poison(exc)
        del self._buffer[:size]
        self._header = None
        return frame

    def frames(self) -> list[Frame]:
        """Every complete frame currently buffered, in order."""
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    def _poison(self, exc: FrameError) -> NoReturn:
        self._error = exc
        self._buffer.clear()
        raise exc

    def _raise_if_poisoned(self) -> None:
        if self._error is not None:
            raise self._error
