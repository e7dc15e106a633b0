"""The ``python -m bench`` contract (DESIGN.md, "Public contracts") and the honesty of the wire baseline.

Starts ``python -m bench`` as a subprocess from the project root, as CI and users do.  No timing is
asserted here: performance is what the benchmarks report, not what tests decide.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from hostagent.wire import FrameError, FrameErrorKind, MessageType, decode, encode

ROOT = Path(__file__).resolve().parents[2]
# bench/ is a tool run from the checkout (``python -m bench``), not an installed package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import BENCHMARKS  # noqa: E402
from bench.wire import baseline_decode, baseline_encode_start_instance, sample_frames  # noqa: E402

REQUIRED = {"name", "ours", "baseline", "ratio", "unit"}
EXTRAS = {"samples", "bytes", "target_us"}


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def quick_wire() -> list[dict[str, Any]]:
    run = _bench("wire", "--quick")
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_stdout_holds_only_result_lines(quick_wire: list[dict[str, Any]]) -> None:
    assert quick_wire
    for line in quick_wire:
        assert isinstance(line, dict)
        assert REQUIRED <= line.keys() <= REQUIRED | EXTRAS, line
        assert isinstance(line["name"], str)
        assert line["unit"] == "us"
        assert line["ours"] > 0 and line["baseline"] > 0


def test_every_message_type_is_decoded_once_and_start_instance_encoded(quick_wire: list[dict[str, Any]]) -> None:
    names = [line["name"] for line in quick_wire]
    expected = [f"wire.decode.{t.name}" for t in MessageType] + ["wire.encode.START_INSTANCE"]
    assert len(MessageType) == 22
    assert sorted(names) == sorted(expected)


def test_ratio_is_ours_over_baseline(quick_wire: list[dict[str, Any]]) -> None:
    for line in quick_wire:
        assert line["ratio"] == pytest.approx(line["ours"] / line["baseline"], abs=6e-4), line


def test_start_instance_decode_states_the_issue_target(quick_wire: list[dict[str, Any]]) -> None:
    (line,) = [line for line in quick_wire if line["name"] == "wire.decode.START_INSTANCE"]
    assert line["target_us"] == 20
    assert all("target_us" not in other for other in quick_wire if other is not line)


# --- the baseline parses the same bytes to the same values --------------------------


def _plain(value: Any) -> Any:
    """A decoded value in the baseline's shape: raw UUID bytes (nil for None), ints for enums,
    tuples for nested records and lists."""
    if value is None:  # only a nullable UUID (Event.instance_id) can be None
        return bytes(16)
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value):
        return tuple(_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    return value


@pytest.mark.parametrize("type_", list(MessageType), ids=lambda t: t.name)
def test_baseline_parses_the_same_values_as_decode(type_: MessageType) -> None:
    frame = sample_frames()[type_]
    data = encode(frame)
    decoded = decode(data)
    assert decoded == frame
    got_type, seq, payload, mac = baseline_decode(data)
    assert (got_type, seq, mac) == (type_, decoded.seq, decoded.mac)
    expected = {f.name: _plain(getattr(decoded.message, f.name)) for f in dataclasses.fields(decoded.message)}
    assert payload == expected


def test_list_bearing_samples_are_realistic() -> None:
    frames = sample_frames()
    info = frames[MessageType.INSTANCE_INFO].message
    assert (len(info.host_cpus), len(info.volumes), len(info.vfs)) == (4, 2, 1)
    assert len(frames[MessageType.INSTANCE_LIST].message.instances) == 16
    events = frames[MessageType.EVENTS].message.events
    assert len(events) == 16
    assert {e.instance_id is None for e in events} == {True, False}  # host-level and instance events


def test_baseline_does_not_validate_so_the_ratio_is_the_price_of_strictness() -> None:
    data = bytearray(encode(sample_frames()[MessageType.START_INSTANCE]))
    data[20 + 16:20 + 18] = (0).to_bytes(2, "big")  # vcpus = 0, below MIN_VCPUS
    with pytest.raises(FrameError) as info:
        decode(bytes(data))
    assert info.value.kind is FrameErrorKind.OUT_OF_RANGE
    assert baseline_decode(bytes(data))[2]["vcpus"] == 0


def test_baseline_encoder_produces_the_same_bytes() -> None:
    frame = sample_frames()[MessageType.START_INSTANCE]
    assert baseline_encode_start_instance(frame) == encode(frame)


# --- the command line ----------------------------------------------------------------


def test_unknown_benchmark_is_a_usage_error_before_anything_runs() -> None:
    run = _bench("wire", "no-such-bench", "--quick")
    assert run.returncode == 2
    assert "unknown benchmark 'no-such-bench'" in run.stderr
    assert "known: wire" in run.stderr
    assert run.stdout == ""


def test_list_names_every_registered_benchmark() -> None:
    run = _bench("--list")
    assert run.returncode == 0, run.stderr
    assert [line.split("\t")[0] for line in run.stdout.splitlines()] == list(BENCHMARKS)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_registered_modules_define_run(name: str) -> None:
    assert callable(importlib.import_module(BENCHMARKS[name].module).run)
