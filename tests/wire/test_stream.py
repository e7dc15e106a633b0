"""The streaming decoder: chunking invariance (property 10), early rejection,
poisoning after an error, ``bytes_needed`` and the buffer limit."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire.strategies import U64, example_frame, frames, raw_header

from hostagent.wire import Direction, Frame, FrameDecoder, FrameError, FrameErrorKind, MessageType, encode
from hostagent.wire import messages as m

frame_lists = st.lists(frames(), min_size=1, max_size=6)


def decode_in_chunks(data: bytes, cuts: list[int], **kwargs: Any) -> list[Frame]:
    """Feed ``data`` split at ``cuts``, collecting frames after every chunk."""
    decoder = FrameDecoder(**kwargs)
    out: list[Frame] = []
    bounds = [0, *sorted(cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        decoder.feed(data[start:end])
        out += decoder.frames()
    assert decoder.buffered == 0
    assert decoder.bytes_needed() == m.HEADER_SIZE
    return out


# --- 10. chunking invariance ----------------------------------------------------


@given(frame_lists, st.data())
def test_same_frames_for_any_chunking(sent: list[Frame], data: st.DataObject) -> None:
    wire = b"".join(encode(frame) for frame in sent)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=20))
    assert decode_in_chunks(wire, []) == sent  # whole
    assert decode_in_chunks(wire, cuts) == sent  # random chunks (empty ones included)


@given(st.lists(frames(), min_size=1, max_size=3))
def test_same_frames_one_byte_at_a_time(sent: list[Frame]) -> None:
    wire = b"".join(encode(frame) for frame in sent)
    assert decode_in_chunks(wire, list(range(1, len(wire)))) == sent


@given(frame_lists, st.data())
def test_direction_applies_to_every_frame(sent: list[Frame], data: st.DataObject) -> None:
    direction = data.draw(st.sampled_from(list(Direction)))
    wire = b"".join(encode(frame) for frame in sent)
    wrong = [i for i, frame in enumerate(sent) if frame.spec.direction is not direction]
    decoder = FrameDecoder(direction)
    decoder.feed(wire)
    if not wrong:
        assert decoder.frames() == sent
        return
    for frame in sent[: wrong[0]]:
        assert decoder.next_frame() == frame
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.kind is FrameErrorKind.WRONG_DIRECTION


@given(st.binary(max_size=3 * m.MAX_FRAME // 2), st.data())
def test_totality_for_arbitrary_chunked_bytes(noise: bytes, data: st.DataObject) -> None:
    """Whatever arrives, in whatever chunks: frames, None or FrameError, nothing else."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(noise)), max_size=10)))
    decoder = FrameDecoder()
    bounds = [0, *cuts, len(noise)]
    try:
        for start, end in itertools.pairwise(bounds):
            decoder.feed(noise[start:end])
            decoder.frames()
    except FrameError:
        with pytest.raises(FrameError):
            decoder.next_frame()


# --- early rejection -------------------------------------------------------------


EARLY_REJECTIONS = [
    (b"XVSR" + raw_header(MessageType.PING, 8)[4:], FrameErrorKind.BAD_MAGIC),
    (raw_header(MessageType.PING, 8, version=2), FrameErrorKind.BAD_VERSION),
    (raw_header(0x7F, 8), FrameErrorKind.UNKNOWN_TYPE),
    (raw_header(MessageType.PING, 8, flags=0x8001), FrameErrorKind.UNDEFINED_FLAGS),
    (raw_header(MessageType.PING, 8, flags=0), FrameErrorKind.BAD_FLAGS),
    (raw_header(MessageType.PING, 8, fd_count=2), FrameErrorKind.FD_COUNT_MISMATCH),
    (raw_header(MessageType.PING, 8, reserved=1), FrameErrorKind.RESERVED_NONZERO),
    (raw_header(MessageType.PING, m.MAX_PAYLOAD + 1), FrameErrorKind.OVERSIZED),
    (raw_header(MessageType.PONG, 8), FrameErrorKind.WRONG_DIRECTION),
]


@pytest.mark.parametrize(("header", "kind"), EARLY_REJECTIONS, ids=[kind.value for _, kind in EARLY_REJECTIONS])
def test_bad_header_rejected_before_the_rest_arrives(header: bytes, kind: FrameErrorKind) -> None:
    decoder = FrameDecoder(Direction.TO_AGENT)
    decoder.feed(header[:-1])
    assert decoder.next_frame() is None  # 19 bytes: nothing to judge yet
    decoder.feed(header[-1:])
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.kind is kind


def test_payload_error_surfaces_once_the_frame_is_complete() -> None:
    wire = bytearray(encode(example_frame(MessageType.START_INSTANCE)))
    wire[m.HEADER_SIZE + 16: m.HEADER_SIZE + 18] = b"\x00\x00"  # vcpus (after the 16-byte id) = 0
    decoder = FrameDecoder()
    decoder.feed(bytes(wire[:-1]))
    assert decoder.next_frame() is None
    decoder.feed(bytes(wire[-1:]))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.kind is FrameErrorKind.OUT_OF_RANGE


# --- poisoning -----------------------------------------------------------------------


def test_every_call_after_an_error_raises_the_same_error() -> None:
    good = encode(example_frame(MessageType.PING))
    decoder = FrameDecoder()
    decoder.feed(b"JUNK" + good[4:] + good)
    with pytest.raises(FrameError) as first:
        decoder.next_frame()
    assert first.value.kind is FrameErrorKind.BAD_MAGIC
    assert decoder.buffered == 0  # nothing kept from a stream that cannot be resynchronised
    calls = [decoder.next_frame, decoder.frames, decoder.bytes_needed, lambda: decoder.feed(good)]
    for call in calls:
        with pytest.raises(FrameError) as later:
            call()
        assert later.value is first.value
    assert decoder.buffered == 0  # the refused feed did not append


def test_frames_before_the_error_are_delivered() -> None:
    good = encode(example_frame(MessageType.PING, seq=1))
    decoder = FrameDecoder()
    decoder.feed(good + b"JUNK" + good[4:])
    assert decoder.next_frame() == example_frame(MessageType.PING, seq=1)
    with pytest.raises(FrameError):
        decoder.frames()


# --- bytes_needed ---------------------------------------------------------------------


def test_bytes_needed_asks_for_the_header_then_the_rest_of_the_frame() -> None:
    wire = encode(example_frame(MessageType.START_INSTANCE))
    decoder = FrameDecoder()
    assert decoder.bytes_needed() == m.HEADER_SIZE
    decoder.feed(wire[:5])
    assert decoder.bytes_needed() == m.HEADER_SIZE - 5
    decoder.feed(wire[5:m.HEADER_SIZE])
    assert decoder.next_frame() is None  # parses the header, learns the frame size
    assert decoder.bytes_needed() == len(wire) - m.HEADER_SIZE
    decoder.feed(wire[m.HEADER_SIZE:-1])
    assert decoder.next_frame() is None
    assert decoder.bytes_needed() == 1
    decoder.feed(wire[-1:])
    assert decoder.bytes_needed() == 0
    assert decoder.next_frame() == example_frame(MessageType.START_INSTANCE)
    assert decoder.bytes_needed() == m.HEADER_SIZE
    assert decoder.next_frame() is None


@given(frame_lists)
def test_reading_bytes_needed_never_crosses_a_frame_boundary(sent: list[Frame]) -> None:
    """A transport that reads exactly ``bytes_needed()`` holds no byte of the next frame
    when a frame comes out (so SCM_RIGHTS descriptors stay with their frame)."""
    wire = b"".join(encode(frame) for frame in sent)
    decoder = FrameDecoder()
    position, received = 0, []
    while position < len(wire) or decoder.buffered:
        needed = decoder.bytes_needed()
        if needed == 0:
            frame = decoder.next_frame()
            if frame is not None:
                received.append(frame)
                assert decoder.buffered == 0
                assert position == sum(len(encode(f)) for f in received)
            else:
                assert decoder.bytes_needed() > 0  # the header was just parsed: progress is guaranteed
            continue
        chunk = wire[position: position + needed]
        assert len(chunk) == needed  # never asks for more than the rest of the current frame
        decoder.feed(chunk)
        position += needed
    assert received == sent


# --- the buffer limit -------------------------------------------------------------------


def test_feed_refuses_to_grow_the_buffer_past_max_buffer() -> None:
    decoder = FrameDecoder(max_buffer=m.MAX_FRAME)
    decoder.feed(bytes(m.MAX_FRAME - 1))
    decoder.feed(b"\x00")  # exactly max_buffer is allowed
    assert decoder.buffered == m.MAX_FRAME
    with pytest.raises(FrameError) as info:
        decoder.feed(b"\x00")
    assert info.value.kind is FrameErrorKind.OVERSIZED
    assert decoder.buffered == 0
    with pytest.raises(FrameError) as later:
        decoder.bytes_needed()
    assert later.value is info.value


def test_max_buffer_holds_back_to_back_frames_until_drained() -> None:
    wire = encode(example_frame(MessageType.PING))
    decoder = FrameDecoder(max_buffer=m.MAX_FRAME)
    count = m.MAX_FRAME // len(wire)
    decoder.feed(wire * count)
    assert len(decoder.frames()) == count
    decoder.feed(wire)  # draining made room again
    assert decoder.next_frame() == example_frame(MessageType.PING)


@pytest.mark.parametrize("max_buffer", [0, m.HEADER_SIZE, m.MAX_FRAME - 1])
def test_constructor_refuses_a_buffer_smaller_than_one_frame(max_buffer: int) -> None:
    with pytest.raises(ValueError, match="max_buffer"):
        FrameDecoder(max_buffer=max_buffer)


def test_default_buffer_holds_two_maximal_frames() -> None:
    decoder = FrameDecoder()
    decoder.feed(bytes(2 * m.MAX_FRAME))
    with pytest.raises(FrameError):
        decoder.feed(b"\x00")


@given(st.integers(0, U64))
def test_sequence_numbers_pass_through_unchanged(seq: int) -> None:
    frame = example_frame(MessageType.PONG, seq=seq)
    decoder = FrameDecoder(Direction.TO_CONTROLLER)
    decoder.feed(encode(frame))
    assert decoder.frames() == [frame]
