"""Fuzz target: the streaming decoder fed in fuzzer-chosen chunk sizes.

Invariant (any violation is a bug in hostagent.wire; claim C4, properties 1,
9 and 10 of docs/wire-format.md).  The input is a configuration prefix and a
byte stream (layout below).

The reference is feeding one byte at a time, and it is computed without the
streaming decoder (``model``): frame by frame, a header is decided when its
HEADER_SIZE-th byte arrives (``decode_header`` of those bytes) and a frame
when its last byte does (``decode`` of exactly ``frame_size`` bytes).  That
gives the frames, then the error kind if any, each with its *position*: the
stream offset whose arrival makes it ready.  ``FrameDecoder(direction,
max_buffer)`` is then fed the stream three ways, every ready frame taken with
``next_frame()`` after each ``feed()``:

- whole: the entire stream in one ``feed`` (with a buffer big enough for it);
- at decision points: cut just before and at every frame's and the error's
  position.  Things surface only at chunk ends, so a decoder that decided a
  byte early would show it one end too soon and one that decided late would
  miss its end: observably this *is* feeding one byte at a time, at a few
  calls per frame instead of two per byte (tests/fuzz/test_replay.py also
  feeds every corpus file literally byte by byte);
- in chunks: the chunk sizes the input chooses, cycled, for the first
  MAX_CHUNKS chunks; then the rest in one.

Within one input every distinct slice is decoded once and the result reused
by all runs (see Memo): decoding is not what this target tests, and doing it
four times over would cost most of the exec/s budget.

For every input:

1. No exception other than FrameError escapes; every FrameError carries a
   FrameErrorKind.
2. Each run yields the reference frames in order, then the reference error
   kind or none, each surfacing at the end of the chunk that holds its
   position.  One difference is permitted, in the chunked run only: ``feed``
   refuses a chunk with OVERSIZED exactly when it would take the buffer above
   ``max_buffer``; everything that surfaced before agrees with the reference.
3. The buffer never holds more than ``max_buffer`` bytes: before every
   ``feed`` it holds exactly the stream bytes not yet taken as frames, and
   ``feed`` accepts a chunk exactly when that plus the chunk fits.
4. The frames are the stream's: the n-th one equals ``decode`` of exactly
   the n-th frame's bytes (as the header's length delimits them), with the
   same direction.  What ``decode`` itself promises (canonical encoding,
   round trip, direction) is for fuzz_to_agent and fuzz_to_controller.
5. In the chunked run, after a FrameError the decoder is poisoned:
   ``next_frame``, ``feed`` and ``bytes_needed`` raise the same kind again.
6. In the chunked run, after each chunk, offset + ``bytes_needed()`` is
   exactly the next decision point (the next header's or frame's end): a
   reader that reads what it is told never reads past a frame.

Input layout (``make_input`` builds it; atheris.FuzzedDataProvider reads it):

- byte 0, ``config``: bits 0-1 direction (0 and 3: none, 1: TO_AGENT,
  2: TO_CONTROLLER); bits 2-3 number of chunk sizes minus one; bit 4 set:
  ``max_buffer = MAX_FRAME`` (the smallest allowed), clear: the default
  ``2 * MAX_FRAME``;
- then a little-endian u16 per chunk size: bit 15 clear: 1 + (value % 128);
  bit 15 set: 1 + (value & 0x7fff), up to 32768 bytes, enough to overflow;
- the rest is the stream, cut after its MAX_STREAM_FRAMES-th frame.

Instrumented: hostagent.wire.stream and hostagent.wire.codec, the layer under
test; not the field parsers (see STREAM_ONLY) nor construct (fuzz/_harness.py).
Run: ``python -m fuzz.fuzz_stream [libFuzzer flags] [corpus dirs]``, or
``python -m fuzz --target fuzz_stream``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import atheris

from fuzz._harness import fuzz, instrumented

# Instrument the layer under test (stream.py, and codec.py which it calls), not
# the field parsers: fuzz_to_agent and fuzz_to_controller guide the search
# through those, and here they cost a quarter of the exec/s (replaying corpus
# and campaign units: 10,000 instrumented, 12,900 not).
STREAM_ONLY = ("hostagent.wire.fields", "hostagent.wire.schema", "hostagent.wire.messages", "hostagent.wire.errors")

with instrumented(__name__, exclude=STREAM_ONLY):
    from hostagent import wire
    from hostagent.wire import stream as stream_module
    from hostagent.wire.messages import HEADER_SIZE, MAX_FRAME, Header

DIRECTIONS = (None, wire.Direction.TO_AGENT, wire.Direction.TO_CONTROLLER, None)
SMALL_CHUNKS = 128
LARGE = 0x8000
WHOLE = 0x8000  # the largest chunk size the layout can express: more than any input
TIGHT = 0x10
# After a frame the decoder is back in its initial state: further frames add
# cost, not paths, so the stream is cut after this many.
MAX_STREAM_FRAMES = 2
# Each chunk costs a few decoder calls; past this many, the rest of the stream
# arrives as one chunk (which also exercises the large-chunk path).
MAX_CHUNKS = 8

# The streaming decoder calls these two by their names in its own module (see Memo).
_REAL_DECODE, _REAL_DECODE_HEADER = stream_module.decode, stream_module.decode_header


def chunk_size(code: int) -> int:
    return 1 + (code & 0x7FFF) if code & LARGE else 1 + code % SMALL_CHUNKS


def make_input(direction: wire.Direction | None, sizes: list[int], stream: bytes, tight: bool = False) -> bytes:
    """The fuzz input that feeds ``stream`` in ``sizes`` chunks (one to four sizes, each 1..32768)."""
    if not 1 <= len(sizes) <= 4 or not all(1 <= size <= WHOLE for size in sizes):
        raise ValueError(f"one to four chunk sizes of 1..{WHOLE} bytes")
    config = DIRECTIONS.index(direction) | (len(sizes) - 1) << 2 | (TIGHT if tight else 0)
    codes = [size - 1 if size <= SMALL_CHUNKS else LARGE | (size - 1) for size in sizes]
    return bytes([config]) + b"".join(code.to_bytes(2, "little") for code in codes) + stream


def parse_input(data: bytes) -> tuple[wire.Direction | None, list[int], int, bytes]:
    """(direction, chunk sizes, max_buffer, stream): the inverse of ``make_input``."""
    provider = atheris.FuzzedDataProvider(data)
    config = provider.ConsumeUInt(1)
    sizes = [chunk_size(provider.ConsumeUInt(2)) for _ in range(1 + (config >> 2 & 3))]
    max_buffer = MAX_FRAME if config & TIGHT else 2 * MAX_FRAME
    return DIRECTIONS[config & 3], sizes, max_buffer, provider.ConsumeBytes(provider.remaining_bytes())


class Violation(AssertionError):
    """An invariant of the module docstring does not hold: a bug in hostagent.wire."""


class Memo:
    """Each distinct slice is decoded once per input, however many runs ask for it.

    ``decode`` and ``decode_header`` are pure functions of their arguments,
    and the whole-frame targets fuzz them.  Here the model and three runs
    decode the same slices over and over, which alone would take the target
    below its 10,000 exec/s budget.  While the context is open, the streaming
    decoder's references to the two functions (``hostagent.wire.stream.decode``
    and ``.decode_header``) are memoizing wrappers around the real ones; on
    exit they are restored, whatever happened.  All that the streaming layer
    itself does (buffering, slicing, timing, poisoning) runs unchanged, and
    the first call for every slice is a real one.
    """

    def __init__(self, direction: wire.Direction | None) -> None:
        # One input has one direction, so the slice alone is the key.
        self._direction = direction
        self._frames: dict[bytes, wire.Frame | wire.FrameError] = {}
        self._headers: dict[bytes, Header | wire.FrameError] = {}

    def decode(self, data: bytes, direction: wire.Direction | None = None) -> wire.Frame:
        return self._call(self._frames, _REAL_DECODE, data, direction)

    def decode_header(self, data: bytes, direction: wire.Direction | None = None) -> Header:
        return self._call(self._headers, _REAL_DECODE_HEADER, data, direction)

    def _call(self, cache: dict[bytes, Any], real: Callable[..., Any], data: bytes,
              direction: wire.Direction | None) -> Any:
        if direction is not self._direction:
            raise Violation(f"decoding for {direction} in a stream for {self._direction}")
        key = bytes(data)
        result = cache.get(key)
        if result is None:
            try:
                result = real(key, direction)
            except wire.FrameError as exc:
                result = exc
            cache[key] = result
        if isinstance(result, wire.FrameError):
            raise result
        return result

    def __enter__(self) -> Memo:
        stream_module.decode, stream_module.decode_header = self.decode, self.decode_header
        return self

    def __exit__(self, *exc_info: object) -> None:
        stream_module.decode, stream_module.decode_header = _REAL_DECODE, _REAL_DECODE_HEADER


@dataclass
class Run:
    """What feeding produced: (position, frame) pairs, then perhaps (position, error kind).

    In a run a position is the end of the chunk after which ``next_frame``
    returned the frame or raised; in the model it is where byte-by-byte
    feeding would.
    """

    frames: list[tuple[int, wire.Frame]] = field(default_factory=list)
    error: tuple[int, wire.FrameErrorKind] | None = None
    overflow_at: int | None = None  # start of the chunk that feed refused with OVERSIZED
    buffered: int = 0  # bytes held after the last chunk, when there was no error


@dataclass
class Model(Run):
    # Every offset at which a correct decoder decides (a header's end, a
    # frame's end), up to and including the first one past the stream.
    decisions: list[int] = field(default_factory=list)
    length: int = 0  # bytes of the stream considered (cut after MAX_STREAM_FRAMES frames)


def model(stream: bytes, direction: wire.Direction | None, memo: Memo) -> Model:
    """Where a correct streaming decoder decides what, computed without it."""
    run = Model()
    start = 0
    while len(run.frames) < MAX_STREAM_FRAMES:
        header_end = start + HEADER_SIZE
        run.decisions.append(header_end)
        if header_end > len(stream):
            break
        try:
            header = memo.decode_header(stream[start:header_end], direction)
        except wire.FrameError as exc:
            run.error = (header_end, exc.kind)
            break
        end = start + header.frame_size
        run.decisions.append(end)
        if end > len(stream):
            break
        try:
            run.frames.append((end, memo.decode(stream[start:end], direction)))
        except wire.FrameError as exc:
            run.error = (end, exc.kind)
            break
        start = end
    else:
        # Cut after the last frame; the decoder then waits for the next header.
        run.decisions.append(start + HEADER_SIZE)
    run.length = min(len(stream), start) if len(run.frames) == MAX_STREAM_FRAMES else len(stream)
    run.buffered = 0 if run.error else run.length - start
    return run


def _check_poisoned(decoder: wire.FrameDecoder, exc: wire.FrameError) -> None:
    if not isinstance(exc.kind, wire.FrameErrorKind):
        raise Violation(f"FrameError without a kind: {exc!r}")
    for again in (decoder.next_frame, lambda: decoder.feed(b"\x00"), decoder.bytes_needed):
        try:
            again()
        except wire.FrameError as later:
            if later.kind is not exc.kind:
                raise Violation(f"poisoned decoder raised {later.kind} after {exc.kind}") from later
        else:
            raise Violation("decoder accepted a call after raising FrameError")


def feed(stream: bytes, ends: list[int], direction: wire.Direction | None, max_buffer: int,
         reference: Model, thorough: bool = False) -> Run:
    """Feed ``stream`` cut at ``ends`` (increasing chunk end offsets), draining after each chunk.

    Checks invariants 1 and 3 on the way, and with ``thorough`` 5 and 6 too.
    """
    decoder = wire.FrameDecoder(direction, max_buffer)
    run = Run()
    start = 0
    taken = 0  # stream offset up to which bytes left the decoder as frames
    frame_ends = [position for position, _ in reference.frames]
    decisions = reference.decisions
    pending = 0  # index of the first decision after the current offset
    for end in ends:
        chunk = stream[start:end]
        if run.frames:
            # The frames so far are the reference's (compare checks it), so they took this much.
            if len(run.frames) > len(frame_ends):
                raise Violation(f"more frames than the {len(frame_ends)} in the stream")
            taken = frame_ends[len(run.frames) - 1]
        if decoder.buffered != start - taken:
            raise Violation(f"{decoder.buffered} bytes buffered at offset {start}, {start - taken} not yet taken")
        overflow = start - taken + len(chunk) > max_buffer
        try:
            decoder.feed(chunk)
        except wire.FrameError as exc:
            if not overflow or exc.kind is not wire.FrameErrorKind.OVERSIZED:
                raise Violation(f"feed of {len(chunk)} bytes, {start - taken} buffered: {exc!r}") from exc
            if thorough:
                _check_poisoned(decoder, exc)
            run.overflow_at = start
            run.error = (start, exc.kind)
            return run
        if overflow:
            raise Violation(f"feed accepted {len(chunk)} bytes to {start - taken} beyond max_buffer {max_buffer}")
        try:
            while (frame := decoder.next_frame()) is not None:
                run.frames.append((end, frame))
        except wire.FrameError as exc:
            if thorough:
                _check_poisoned(decoder, exc)
            run.error = (end, exc.kind)
            return run
        if thorough:
            while decisions[pending] <= end:
                pending += 1
            needed = decoder.bytes_needed()
            if end + needed != decisions[pending]:
                raise Violation(f"bytes_needed() = {needed} at offset {end}, next decision at {decisions[pending]}")
        start = end
    run.buffered = decoder.buffered
    return run


def _chunk_ends(length: int, sizes: list[int]) -> list[int]:
    """End offsets of the chunks ``sizes`` (cycled) cut a ``length``-byte stream into.

    After MAX_CHUNKS chunks the rest of the stream arrives as one more chunk.
    """
    ends, offset = [], 0
    while offset < length and len(ends) < MAX_CHUNKS:
        offset = min(length, offset + sizes[len(ends) % len(sizes)])
        ends.append(offset)
    if offset < length:
        ends.append(length)
    return ends


def _decision_ends(reference: Model) -> list[int]:
    """Chunk ends just before and at the position of every frame and of the error."""
    points = {reference.length} if reference.length else set()
    positions = [position for position, _ in reference.frames]
    if reference.error is not None:
        positions.append(reference.error[0])
    for position in positions:
        points.update((position - 1, position))
    points.discard(0)
    return sorted(points)


def expect(reference: Model, ends: list[int]) -> Run:
    """The run a correct decoder gives when the chunks end at ``ends``.

    Each frame and the error surface at the end of the chunk holding their
    position; bytes after the last frame that is complete by the last chunk
    stay buffered.
    """
    run = Run()
    limit = ends[-1] if ends else 0
    decided = [(position, frame) for position, frame in reference.frames if position <= limit]
    run.frames = [(ends[bisect.bisect_left(ends, position)], frame) for position, frame in decided]
    if reference.error is not None and reference.error[0] <= limit:
        run.error = (ends[bisect.bisect_left(ends, reference.error[0])], reference.error[1])
    else:
        run.buffered = limit - (decided[-1][0] if decided else 0)
    return run


def compare(how: str, actual: Run, expected: Run, overflow_allowed: bool = False) -> None:
    if actual.overflow_at is not None:
        if not overflow_allowed:
            raise Violation(f"{how}: the buffer overflowed at offset {actual.overflow_at}")
        # Invariant 2's one exception: everything before the refused chunk agrees.
        expected.frames = [(end, frame) for end, frame in expected.frames if end <= actual.overflow_at]
        if expected.error is not None and expected.error[0] <= actual.overflow_at:
            raise Violation(f"{how}: overflow at offset {actual.overflow_at}, after the error {expected.error}")
        expected.error = actual.error
    if actual.frames != expected.frames:
        raise Violation(f"{how}: frames at {[p for p, _ in actual.frames]}, "
                        f"expected at {[p for p, _ in expected.frames]} (or other frames)")
    if actual.error != expected.error:
        raise Violation(f"{how}: error {actual.error}, expected {expected.error}")
    if actual.error is None and actual.buffered != expected.buffered:
        raise Violation(f"{how}: {actual.buffered} bytes left buffered, expected {expected.buffered}")


def check(stream: bytes, sizes: list[int], direction: wire.Direction | None, max_buffer: int,
          bytewise: bool = False) -> None:
    """Invariants 1-6 for one stream.  ``bytewise`` also feeds it literally one byte at a time."""
    with Memo(direction) as memo:
        reference = model(stream, direction, memo)
        stream = stream[: reference.length]

        ways = [
            ("in chunks", _chunk_ends(len(stream), sizes), max_buffer, True, True),
            ("whole", [len(stream)], max(max_buffer, len(stream)), False, False),
            ("at decision points", _decision_ends(reference), max_buffer, False, False),
        ]
        if bytewise:
            ways.append(("byte by byte", list(range(1, len(stream) + 1)), max_buffer, True, False))
        done: list[list[int]] = []
        for how, ends, buffer_size, thorough, overflow_allowed in ways:
            # A run cut where an earlier one was (one chunk, say) would repeat it.
            if ends and ends[-1] and ends not in done:
                done.append(ends)
                try:
                    run = feed(stream, ends, direction, buffer_size, reference, thorough)
                    compare(how, run, expect(reference, ends), overflow_allowed)
                except Violation as exc:
                    raise Violation(f"{exc}; chunk sizes {sizes}, direction {direction}, "
                                    f"max_buffer {max_buffer}, stream {stream[:64].hex()}...") from exc


def TestOneInput(data: bytes) -> None:
    direction, sizes, max_buffer, stream = parse_input(data)
    check(stream, sizes, direction, max_buffer)


def main() -> None:
    fuzz(TestOneInput)


if __name__ == "__main__":
    main()
