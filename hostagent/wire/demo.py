"""A walk through the wire codec: what `make demo` shows until the controller exists.

It encodes a START_INSTANCE command, decodes it back, then feeds the decoder
a series of hostile variations and prints the typed error each one gets.
"""

from __future__ import annotations

import uuid

from . import messages as m
from .codec import Frame, decode, encode
from .errors import FrameError
from .stream import FrameDecoder

INSTANCE = uuid.UUID("6f1c2a4e-0b7d-4c1e-9a53-2f0d8e6b1c77")


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def hostile_variants(frame: bytes) -> list[tuple[str, bytes, m.Direction | None]]:
    """Named corruptions of a valid START_INSTANCE frame (offsets from docs/wire-format.md)."""
    payload = m.HEADER_SIZE
    return [
        ("truncated by one byte", frame[:-1], None),
        ("one byte appended", frame + b"\x00", None),
        ("wrong magic", _patched(frame, 0, b"XVSR"), None),
        ("unknown message type 0x77", _patched(frame, 5, b"\x77"), None),
        ("undefined flag bit", _patched(frame, 6, b"\x80\x01"), None),
        ("reserved byte set", _patched(frame, 17, b"\x01"), None),
        ("length field beyond MAX_PAYLOAD", _patched(frame, 18, b"\xff\xff"), None),
        ("nil instance id", _patched(frame, payload, bytes(16)), None),
        ("0 vCPUs", _patched(frame, payload + 16, b"\x00\x00"), None),
        ("command sent to the controller", frame, m.Direction.TO_CONTROLLER),
    ]


def main() -> None:
    command = m.StartInstance(INSTANCE, vcpus=2, memory_mib=256,
                              image_digest=bytes(range(32)), image_signature=bytes(64))
    frame = Frame(seq=1, message=command, mac=bytes(m.MAC_SIZE))
    data = encode(frame)
    print(f"START_INSTANCE frame, {len(data)} bytes:")
    print(f"  header  {data[:m.HEADER_SIZE].hex(' ')}")
    print(f"  payload {data[m.HEADER_SIZE:-m.MAC_SIZE].hex()}")
    print(f"  mac     {data[-m.MAC_SIZE:].hex()}")
    decoded = decode(data, m.Direction.TO_AGENT)
    print(f"decoded: {type(decoded.message).__name__} instance={command.instance_id} "
          f"vcpus={command.vcpus} memory_mib={command.memory_mib} seq={decoded.seq}")
    if decoded != frame or encode(decoded) != data:
        raise SystemExit("demo: the round trip changed the frame")
    print("round trip: identical frame, identical bytes")
    print("hostile variants (each must be refused with a typed error):")
    for name, variant, direction in hostile_variants(data):
        try:
            decode(variant, direction)
        except FrameError as exc:
            print(f"  {name:34} -> {exc.kind.value}: {exc.detail}")
        else:
            raise SystemExit(f"demo: the codec accepted '{name}'")
    stream = FrameDecoder(m.Direction.TO_AGENT)
    frames = []
    for offset in range(0, 3 * len(data), 7):
        stream.feed((data * 3)[offset:offset + 7])
        frames += stream.frames()
    print(f"stream: 3 frames fed in 7-byte chunks -> {len(frames)} frames, all equal: {set(frames) == {frame}}")


if __name__ == "__main__":
    main()
