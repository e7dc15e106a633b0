"""Known-answer vectors: the codec against an independent ``struct`` encoder.

The vectors in tests/vectors/wire/ are produced by make_vectors.py, which
never imports construct or hostagent.wire.  Each valid vector must decode to
exactly the expected fields and re-encode to exactly its bytes (properties 4
and 5); each invalid vector must be refused with exactly its error kind.
"""

from __future__ import annotations

import ast
import enum
import importlib.util
import json
import sys
import uuid
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from hostagent import wire

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "wire"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("wire_make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _load(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(path.stem, json.loads(path.read_text())) for path in sorted((VECTORS / kind).glob("*.json"))]


VALID = _load("valid")
INVALID = _load("invalid")

# Properties 1..11 of docs/wire-format.md.  Property 7 (build-side checks) is
# about *encoding* an out-of-range value; a decode vector (bytes -> error)
# cannot express it; tests/wire/test_exhaustive.py proves it on the encode side
# (test_encode_refuses_every_out_of_range_value).
EXPRESSIBLE_PROPERTIES = set(range(1, 12)) - {7}
# No byte string reaches MALFORMED: every field is a fixed-size leaf or a
# bounded list, whose failures all carry a precise kind; MALFORMED is left for
# exceptions construct might leak and for encoding a non-message object.
UNREACHABLE_FROM_BYTES = {wire.FrameErrorKind.MALFORMED}


def _direction(vector: dict[str, Any]) -> wire.Direction | None:
    return None if vector["direction"] is None else wire.Direction(vector["direction"])


def to_json(value: Any) -> Any:
    """The JSON form of a decoded value, as documented in make_vectors.py."""
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [to_json(item) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
    raise TypeError(f"no JSON form for {type(value).__name__}")


def frame_to_json(frame: wire.Frame) -> dict[str, Any]:
    return {
        "seq": frame.seq,
        "type": frame.type.name,
        "mac": None if frame.mac is None else frame.mac.hex(),
        "message": to_json(frame.message),
    }


@pytest.mark.parametrize(("name", "vector"), VALID, ids=[name for name, _ in VALID])
def test_valid_vector_decodes_to_expected_fields(name: str, vector: dict[str, Any]) -> None:
    frame = wire.decode(bytes.fromhex(vector["hex"]), _direction(vector))
    assert frame_to_json(frame) == vector["expected"]


@pytest.mark.parametrize(("name", "vector"), VALID, ids=[name for name, _ in VALID])
def test_valid_vector_encodes_canonically(name: str, vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    frame = wire.decode(data, _direction(vector))
    assert wire.encode(frame) == data
    assert frame.fd_count == data[16]  # the header's fd_count is what the message requires


@pytest.mark.parametrize(("name", "vector"), VALID, ids=[name for name, _ in VALID])
def test_valid_vector_streams_byte_by_byte(name: str, vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    decoder = wire.FrameDecoder(_direction(vector))
    out = []
    for i in range(len(data)):
        decoder.feed(data[i:i + 1])
        out.extend(decoder.frames())
    assert out == [wire.decode(data, _direction(vector))]
    assert decoder.buffered == 0


@pytest.mark.parametrize(("name", "vector"), INVALID, ids=[name for name, _ in INVALID])
def test_invalid_vector_is_refused_with_its_kind(name: str, vector: dict[str, Any]) -> None:
    with pytest.raises(wire.FrameError) as caught:
        wire.decode(bytes.fromhex(vector["hex"]), _direction(vector))
    assert caught.value.kind.value == vector["error"], caught.value.detail


def test_invalid_vectors_without_direction_are_direction_independent() -> None:
    """A vector with direction null must fail the same way for the peer that would receive it."""
    for name, vector in INVALID:
        if vector["direction"] is not None or vector["error"] == "wrong_direction":
            continue
        data = bytes.fromhex(vector["hex"])
        for direction in wire.Direction:
            try:
                wire.decode(data, direction)
            except wire.FrameError as exc:
                if exc.kind is wire.FrameErrorKind.WRONG_DIRECTION:
                    continue  # a receiver that never accepts this type refuses it earlier
                assert exc.kind.value == vector["error"], (name, direction, exc.detail)
            else:
                pytest.fail(f"{name} accepted with direction {direction}")


def test_committed_vectors_match_the_generator() -> None:
    generated = _load_generator().generate()
    committed = {
        f"{kind}/{path.name}": path.read_text()
        for kind in ("valid", "invalid")
        for path in (VECTORS / kind).glob("*.json")
    }
    assert sorted(committed) == sorted(generated), "vector files differ: run tests/vectors/wire/make_vectors.py"
    stale = [path for path, text in generated.items() if committed[path] != text]
    assert not stale, f"stale vectors {stale}: run tests/vectors/wire/make_vectors.py"


def test_generator_is_independent_of_the_codec() -> None:
    """The encoder may use struct and a few standard modules, never construct or the codec."""
    tree = ast.parse((VECTORS / "make_vectors.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("__import__", "exec", "eval")
    assert "struct" in imported
    assert imported <= {"__future__", "dataclasses", "json", "pathlib", "struct", "sys", "typing", "uuid"}


def test_every_message_type_has_a_valid_vector() -> None:
    covered = {vector["expected"]["type"] for _, vector in VALID}
    assert covered == {t.name for t in wire.MessageType}


def test_valid_vectors_cover_both_directions_and_none() -> None:
    assert {vector["direction"] for _, vector in VALID} == {None, "to_agent", "to_controller"}


def test_every_expressible_property_has_an_invalid_vector() -> None:
    covered = {vector["property"] for _, vector in INVALID}
    assert covered == EXPRESSIBLE_PROPERTIES


def test_every_reachable_error_kind_has_an_invalid_vector() -> None:
    covered = {vector["error"] for _, vector in INVALID}
    expected = {kind.value for kind in wire.FrameErrorKind} - {kind.value for kind in UNREACHABLE_FROM_BYTES}
    assert covered == expected


def test_trailing_bytes_is_covered_after_the_frame_and_inside_the_payload() -> None:
    places = set()
    for _, vector in INVALID:
        data = bytes.fromhex(vector["hex"])
        if vector["error"] != "trailing_bytes" or len(data) < 20:
            continue
        flags, length = int.from_bytes(data[6:8], "big"), int.from_bytes(data[18:20], "big")
        announced = 20 + length + (32 if flags & 1 else 0)
        places.add("after the frame" if len(data) > announced else "inside the payload")
    assert places == {"after the frame", "inside the payload"}


def test_to_json_handles_every_value_shape() -> None:
    """The converter itself must not be a tautology: check it against hand-written forms."""
    info = wire.InstanceInfo(
        instance_id=uuid.UUID("3f2a6c1e-9b4d-4e7a-8c21-5d6e7f809a1b"), state=wire.InstanceState.RUNNING,
        vcpus=1, memory_mib=64, image_digest=b"\x01\xff", host_cpus=(7,), volumes=(),
        vfs=(wire.PciAddress(1, 2, 3, 4),),
    )
    assert to_json(info) == {
        "instance_id": "3f2a6c1e-9b4d-4e7a-8c21-5d6e7f809a1b", "state": "RUNNING", "vcpus": 1, "memory_mib": 64,
        "image_digest": "01ff", "host_cpus": [7], "volumes": [],
        "vfs": [{"domain": 1, "bus": 2, "device": 3, "function": 4}],
    }
    assert to_json(wire.AttachVolume(uuid.UUID(int=1 << 63), uuid.UUID(int=1 << 63), wire.VolumeSource.FILE,
                                      False))["read_only"] is False
    assert to_json(wire.Event(1, 2, wire.EventKind.AGENT_RESTARTED, None, wire.EventReason.NONE)) == {
        "cursor": 1, "time_ms": 2, "kind": "AGENT_RESTARTED", "instance_id": None, "reason": "NONE"}
