"""The codec walk-through behind `make demo` runs and refuses every hostile variant."""

from __future__ import annotations

import pytest

from hostagent import wire
from hostagent.wire import demo


def test_demo_refuses_every_variant_with_a_typed_error(capsys: pytest.CaptureFixture[str]) -> None:
    demo.main()
    out = capsys.readouterr().out
    for name, _, _ in demo.hostile_variants(b"\x00" * 200):
        assert f"  {name}" in out
    assert "round trip: identical frame, identical bytes" in out
    assert "-> 3 frames, all equal: True" in out


def test_demo_fails_loudly_if_the_codec_accepts_a_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "hostile_variants", lambda data: [("untouched frame", data, None)])
    with pytest.raises(SystemExit, match="accepted 'untouched frame'"):
        demo.main()


def test_variants_are_each_rejected_for_their_own_reason() -> None:
    frame = wire.encode(wire.Frame(1, wire.StartInstance(demo.INSTANCE, 2, 256, bytes(32), bytes(64)), bytes(32)))
    kinds = []
    for _, variant, direction in demo.hostile_variants(frame):
        with pytest.raises(wire.FrameError) as info:
            wire.decode(variant, direction)
        kinds.append(info.value.kind)
    assert len(set(kinds)) == len(kinds), kinds


def test_demo_fails_loudly_if_the_round_trip_changes_the_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    real_decode = wire.decode

    def shifted(data: bytes, direction: wire.Direction | None = None) -> wire.Frame:
        frame = real_decode(data, direction)
        return wire.Frame(frame.seq + 1, frame.message, frame.mac)

    monkeypatch.setattr(demo, "decode", shifted)
    with pytest.raises(SystemExit, match="round trip changed the frame"):
        demo.main()
