"""Fuzz target: whole frames from the agent, as the controller decodes them.

The agent sits below the controller in the trust order (DESIGN.md), so its
answers are hostile input to the controller, parsed as strictly as commands.

Invariant (any violation is a bug in hostagent.wire; claim C4, properties 1,
4, 5 and 6 of docs/wire-format.md): for every input ``data``,
``decode(data, Direction.TO_CONTROLLER)`` either raises FrameError or returns
a Frame.  Any other exception escaping decode is a bug.  When it raises, the
error carries a FrameErrorKind and a detail of at most MAX_DETAIL
characters (errors.py: it never echoes more than a bounded part of the
input).  When it returns:

- the frame is a message that travels to the controller, with a MAC exactly
  when its type is authenticated;
- ``encode(frame) == data`` (canonical: one frame, one encoding) and
  ``decode(encode(frame)) == frame`` (round trip);
- ``decode(data)`` without a direction returns the same frame.

When it raises WRONG_DIRECTION, ``decode_header(data)`` without a direction
accepts the header, and its type travels to the agent: the direction check
rejects exactly the other direction's frames, nothing else.

Instrumented: hostagent (of which only hostagent.wire is imported), not
construct; see fuzz/_harness.py.
Run: ``python -m fuzz.fuzz_to_controller [libFuzzer flags] [corpus dirs]``, or
``python -m fuzz --target fuzz_to_controller``.
"""

from __future__ import annotations

from fuzz._harness import fuzz, instrumented

with instrumented(__name__):
    from hostagent import wire
    from hostagent.wire.schema import MESSAGES

DIRECTION = wire.Direction.TO_CONTROLLER
# FrameError.detail names a field and a rule and never echoes the input.
MAX_DETAIL = 256


def TestOneInput(data: bytes) -> None:
    try:
        frame = wire.decode(data, DIRECTION)
    except wire.FrameError as exc:
        if not isinstance(exc.kind, wire.FrameErrorKind) or len(exc.detail) > MAX_DETAIL:
            raise AssertionError(f"malformed FrameError {exc!r}") from exc
        if exc.kind is wire.FrameErrorKind.WRONG_DIRECTION:
            header = wire.decode_header(data)
            if MESSAGES[header.type].direction is DIRECTION:
                raise AssertionError(f"WRONG_DIRECTION for a {header.type.name} frame") from exc
        return
    if type(frame) is not wire.Frame or frame.spec.direction is not DIRECTION:
        raise AssertionError(f"decode returned {frame!r}")
    if (frame.mac is not None) != frame.spec.authenticated:
        raise AssertionError(f"{frame.type.name}: MAC {frame.mac!r}")
    encoded = wire.encode(frame)
    if encoded != data:
        raise AssertionError(f"not canonical: {data.hex()} decodes to a frame that encodes to {encoded.hex()}")
    if wire.decode(encoded, DIRECTION) != frame:
        raise AssertionError("round trip changed the frame")
    if wire.decode(data) != frame:
        raise AssertionError("the frame depends on whether a direction is given")


def main() -> None:
    fuzz(TestOneInput)


if __name__ == "__main__":
    main()
