"""Bounded exhaustive checks: the formal-style complement to random testing.

For every message type (and, where a rule depends on a state, for one base
message per state), starting from an otherwise valid frame built by the
independent ``struct`` encoder in tests/vectors/wire/make_vectors.py, one
field at a time is set to

- every value of its width for every enum, boolean, flags and u8 field and
  every list count: all 2^8 values, and all 2^16 for the u16 fields header
  ``flags`` (on every message type, not a sample) and ERROR ``code``;
- the boundary values of every wider integer field: min-1, min, max, max+1
  where the width can hold them, plus the extremes 0 and 2^n-1 of the width;
- every value of the variant byte of every UUID, the nil UUID, and every
  first byte of a MAC address,

and the decoder's verdict is compared with a reference model written here
from docs/wire-format.md: :data:`RULES` (accepted values per field),
:func:`cross_field_ok` (the cross-field rules) and the header checks.  The
accepted sets are spelled out by hand, never read from ``hostagent.wire``, so
that this test fails when the codec and the document disagree.  Each
accepted frame must also re-encode to the same bytes (property 4).

Where a rule ties two fields together (INSTANCE_INFO vcpus and host_cpus,
EVENTS next_cursor and the cursors, an event's kind and instance id, STOP_INSTANCE
mode and timeout_s, INSTANCE_LIST more and the page size), each value is tried both as is and with the companion
field adjusted, so that every accepted value is seen accepted at least once.

The build side (property 7) is walked too: every bounded field just outside
its range, and every list one item over its maximum, must make ``encode``
raise instead of wrapping or truncating.

Runtime here (2 cores): about 10-15 s for the whole file, most of it the 2^16
flag values on each of the 28 base frames; no sampling was needed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hostagent import wire

_SPEC = importlib.util.spec_from_file_location(
    "wire_make_vectors", Path(__file__).resolve().parents[1] / "vectors" / "wire" / "make_vectors.py")
assert _SPEC is not None and _SPEC.loader is not None
mv = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = mv
_SPEC.loader.exec_module(mv)

# --- the documented accepted sets (docs/wire-format.md), written by hand -----------

U64_MAX = (1 << 64) - 1
MAX_FRAME, MAX_PAYLOAD = 8192, 8140

MESSAGE_TYPES = {
    "HELLO": 0x01, "CHALLENGE": 0x02, "PROOF": 0x03,
    "PING": 0x10, "START_INSTANCE": 0x11, "STOP_INSTANCE": 0x12, "ATTACH_VOLUME": 0x13, "DETACH_VOLUME": 0x14,
    "ASSIGN_VF": 0x15, "RELEASE_VF": 0x16, "DESCRIBE_INSTANCE": 0x17, "LIST_INSTANCES": 0x18,
    "GET_METRICS": 0x19, "GET_EVENTS": 0x1A,
    "PONG": 0x80, "INSTANCE_INFO": 0x81, "INSTANCE_LIST": 0x82, "VOLUME_STATUS": 0x83, "VF_STATUS": 0x84,
    "METRICS": 0x85, "EVENTS": 0x86, "ERROR": 0xFF,
}
HANDSHAKE = {"HELLO", "CHALLENGE", "PROOF"}  # no MAC flag, no trailer; every other type has both
TO_AGENT = {"HELLO", "PROOF", "PING", "START_INSTANCE", "STOP_INSTANCE", "ATTACH_VOLUME", "DETACH_VOLUME",
            "ASSIGN_VF", "RELEASE_VF", "DESCRIBE_INSTANCE", "LIST_INSTANCES", "GET_METRICS", "GET_EVENTS"}
MAC_FLAG = 0x0001
HOST_EVENT_KINDS = {9, 10, 11}  # SESSION_REJECTED, AGENT_RESTARTED, RECONCILE_MISMATCH: no instance id


@dataclass(frozen=True)
class Rule:
    """Accepted values of one integer field, and the error kind for the others."""

    accepted: Callable[[int], bool]
    kind: str
    extra: tuple[int, ...] = ()  # more values worth trying (around a cross-field threshold)


def span(lo: int, hi: int, *extra: int) -> Rule:
    return Rule(lambda v: lo <= v <= hi, "out_of_range", (lo - 1, lo, hi, hi + 1, *extra))


def one_of(*values: int) -> Rule:
    allowed = frozenset(values)
    return Rule(allowed.__contains__, "unknown_enum")


def count(max_items: int) -> Rule:
    return Rule(lambda v: v <= max_items, "too_many_items")


ANY = span(0, U64_MAX)
BOOL = Rule(lambda v: v in (0, 1), "non_canonical")
PCI_RULES = {"domain": span(0, 0xFFFF), "bus": span(0, 0xFF), "device": span(0, 31), "function": span(0, 7)}
VCPUS, MEMORY = span(1, 128), span(64, 1 << 20)
INSTANCE_STATES = one_of(1, 2, 3, 4, 5)
ERROR_CODES = one_of(1, 2, *range(16, 34), 255)


def _pci(prefix: str) -> dict[tuple[str, ...], Rule]:
    return {(prefix, name): rule for name, rule in PCI_RULES.items()}


def _pci_item(prefix: str) -> dict[tuple[str, ...], Rule]:
    return {(prefix, "*", name): rule for name, rule in PCI_RULES.items()}


# Every integer-valued field of every message: (field path) -> rule.  "*" is
# an item of a list, "#" the list's count.
RULES: dict[str, dict[tuple[str, ...], Rule]] = {
    "HELLO": {},
    "CHALLENGE": {},
    "PROOF": {},
    "PING": {("token",): ANY},
    "START_INSTANCE": {("vcpus",): VCPUS, ("memory_mib",): MEMORY},
    "STOP_INSTANCE": {("mode",): one_of(1, 2), ("timeout_s",): span(0, 600, 1, 599)},
    "ATTACH_VOLUME": {("source",): one_of(1, 2), ("read_only",): BOOL},
    "DETACH_VOLUME": {},
    "ASSIGN_VF": {**_pci("pf"), ("vlan",): span(0, 4095)},
    "RELEASE_VF": _pci("vf"),
    "DESCRIBE_INSTANCE": {},
    "LIST_INSTANCES": {},  # its one field, the cursor, is a nullable UUID (test_identifier_fields)
    "GET_METRICS": {},
    "GET_EVENTS": {("after",): ANY, ("limit",): span(1, 64)},
    "PONG": {("token",): ANY},
    "INSTANCE_INFO": {
        ("state",): INSTANCE_STATES, ("vcpus",): VCPUS, ("memory_mib",): MEMORY,
        ("host_cpus", "#"): count(128), ("host_cpus", "*"): span(0, 4095),
        ("volumes", "#"): count(16),
        ("vfs", "#"): count(8), **_pci_item("vfs"),
    },
    "INSTANCE_LIST": {
        ("more",): BOOL, ("instances", "#"): count(64), ("instances", "*", "state"): INSTANCE_STATES,
        ("instances", "*", "vcpus"): VCPUS, ("instances", "*", "memory_mib"): MEMORY,
    },
    "VOLUME_STATUS": {("state",): one_of(1, 2)},
    "VF_STATUS": {**_pci("vf"), ("vf_index",): span(0, 255), ("state",): one_of(1, 2)},
    "METRICS": {("samples", "#"): count(10), ("samples", "*", "metric"): one_of(*range(1, 11)),
                ("samples", "*", "value"): ANY},
    "EVENTS": {
        ("next_cursor",): span(0, U64_MAX, 6, 7, 8), ("events", "#"): count(64),
        ("events", "*", "cursor"): span(1, U64_MAX), ("events", "*", "time_ms"): ANY,
        ("events", "*", "kind"): one_of(*range(1, 12)), ("events", "*", "reason"): one_of(*range(10)),
    },
    "ERROR": {("code",): ERROR_CODES},
}

def uuid_bytes(value: Any) -> bytes:
    """Wire bytes of a UUID value as make_vectors.py accepts it (UUID, None = nil, raw bytes)."""
    return bytes(16) if value is None else value.bytes if isinstance(value, uuid.UUID) else bytes(value)


# Lists are strictly increasing by these keys (canonical order, no duplicates).
ORDER_KEYS: dict[str, Callable[[Any], Any]] = {
    "host_cpus": lambda v: v,
    "volumes": uuid_bytes,
    "vfs": lambda p: (p["domain"], p["bus"], p["device"], p["function"]),
    "instances": lambda s: uuid_bytes(s["instance_id"]),
    "samples": lambda s: s["metric"],
    "events": lambda e: e["cursor"],
}


def lists_ordered(values: dict[str, Any]) -> bool:
    for name, items in values.items():
        if name in ORDER_KEYS and isinstance(items, list):
            keys = [ORDER_KEYS[name](item) for item in items]
            if any(a >= b for a, b in itertools.pairwise(keys)):
                return False
    return True


def event_ok(event: dict[str, Any]) -> bool:
    return (event["instance_id"] is None) == (event["kind"] in HOST_EVENT_KINDS)


def cross_field_ok(type_name: str, v: dict[str, Any]) -> bool:
    """The cross-field rules of docs/wire-format.md, per message."""
    if type_name == "STOP_INSTANCE":
        return (v["mode"] == 1 and 1 <= v["timeout_s"] <= 600) or (v["mode"] == 2 and v["timeout_s"] == 0)
    if type_name == "INSTANCE_INFO":
        if v["state"] in (4, 5):  # STOPPED, FAILED hold no cores, volumes or VFs
            return not v["host_cpus"] and not v["volumes"] and not v["vfs"]
        return len(v["host_cpus"]) == v["vcpus"]
    if type_name == "EVENTS":
        return not v["events"] or v["next_cursor"] >= v["events"][-1]["cursor"]
    if type_name == "INSTANCE_LIST":  # more follow only after a full page
        return not v["more"] or len(v["instances"]) == 64
    return True


# --- the reference model -----------------------------------------------------------


def _uuid_kind(value: Any, nullable: bool) -> str | None:
    raw = uuid_bytes(value)
    if raw == bytes(16):
        return None if nullable else "invalid_identifier"
    return None if raw[8] & 0xC0 == 0x80 else "invalid_identifier"


def _check(type_name: str, kind: Any, value: Any, path: tuple[str, ...]) -> str | None:
    """First error kind of one field (in wire order), or None."""
    if isinstance(kind, str):
        if kind in ("uuid", "uuid?"):
            return _uuid_kind(value, kind == "uuid?")
        if kind == "mac":
            return "invalid_identifier" if value == bytes(6) or value[0] & 1 else None
        rule = RULES[type_name][path]
        return None if rule.accepted(value) else rule.kind
    tag = kind[0]
    if tag == "bytes":
        return None
    if tag == "enum":
        rule = RULES[type_name][path]
        return None if rule.accepted(value) else rule.kind
    if tag == "record":
        for name, sub in kind[1]:
            error = _check(type_name, sub, value[name], (*path, name))
            if error:
                return error
        if kind is mv.EVENT and not event_ok(value):
            return "cross_field"
        return None
    if tag == "list":
        rule = RULES[type_name][(*path, "#")]
        if not rule.accepted(len(value)):
            return rule.kind
        for item in value:
            error = _check(type_name, kind[1], item, (*path, "*"))
            if error:
                return error
        return None if lists_ordered({path[-1]: value}) else "non_canonical"
    raise AssertionError(kind)


def model(type_name: str, values: dict[str, Any]) -> str | None:
    """The error kind the document demands for a frame carrying ``values``, or None."""
    for name, kind in mv.LAYOUTS[type_name].fields:
        error = _check(type_name, kind, values[name], (name,))
        if error:
            return error
    return None if cross_field_ok(type_name, values) else "cross_field"


def outcome(data: bytes, direction: wire.Direction | None = None) -> str | None:
    """The decoder's verdict: None when accepted (and canonical), else the error kind."""
    try:
        frame = wire.decode(data, direction)
    except wire.FrameError as exc:
        return exc.kind.value
    assert wire.encode(frame) == data, "accepted but not canonical"
    return None


# --- walking the fields ------------------------------------------------------------


def _width(kind: Any) -> int:
    if kind in ("u8", "bool"):
        return 1
    if isinstance(kind, str):
        return {"u16": 2, "u32": 4, "u64": 8}[kind]
    return int(kind[1])  # ("enum", width, names)


def _is(kind: Any, tag: str) -> bool:
    return isinstance(kind, tuple) and kind[0] == tag


def _is_int(kind: Any) -> bool:
    return kind in ("u8", "u16", "u32", "u64", "bool") or _is(kind, "enum")


def int_leaves(fields: tuple[tuple[str, Any], ...], prefix: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], int]]:
    """(path, width) of every integer-valued field, list items as "*", list counts as "#"."""
    for name, kind in fields:
        path = (*prefix, name)
        if _is(kind, "record"):
            yield from int_leaves(kind[1], path)
        elif _is(kind, "list"):
            yield (*path, "#"), 1
            if _is(kind[1], "record"):
                yield from int_leaves(kind[1][1], (*path, "*"))
            elif _is_int(kind[1]):
                yield (*path, "*"), _width(kind[1])
        elif _is_int(kind):
            yield path, _width(kind)


def uuid_leaves(fields: tuple[tuple[str, Any], ...], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, kind in fields:
        path = (*prefix, name)
        if kind in ("uuid", "uuid?"):
            yield path
        elif isinstance(kind, tuple) and kind[0] == "record":
            yield from uuid_leaves(kind[1], path)
        elif isinstance(kind, tuple) and kind[0] == "list":
            if kind[1] == "uuid":
                yield (*path, "*")
            elif isinstance(kind[1], tuple) and kind[1][0] == "record":
                yield from uuid_leaves(kind[1][1], (*path, "*"))


def candidates(width: int, rule: Rule) -> list[int]:
    full = (1 << (8 * width)) - 1
    if width <= 2 and (width == 1 or rule.kind != "out_of_range"):
        return list(range(full + 1))  # every value: u8 fields, u16 enums
    return sorted({v for v in (0, full, *rule.extra) if 0 <= v <= full})


def concrete(path: tuple[str, ...], values: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The concrete positions of ``path`` in ``values``: the first and the last item of a list."""
    if "*" not in path:
        return [path]
    i = path.index("*")
    assert i == 1, "lists only appear at the top level of a payload"
    items = values[path[0]]
    if not items:
        return []  # another base message of this type has items here (checked below)
    return [(*path[:i], j, *path[i + 1:]) for j in sorted({0, len(items) - 1})]


def put(values: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = values
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


def companions(type_name: str, path: tuple[Any, ...], value: Any, values: dict[str, Any]) -> dict[str, Any] | None:
    """``values`` with the fields tied to ``path`` by a cross-field rule adjusted to ``value``, if any.

    The adjustment only ever touches the companion field, never ``path`` itself, so the
    value under test still decides the verdict.
    """
    if type_name == "STOP_INSTANCE":
        if path == ("mode",):
            return {**values, "timeout_s": 0 if value == 2 else 30}
        if path == ("timeout_s",):
            return {**values, "mode": 2 if value == 0 else 1}
    if type_name == "INSTANCE_INFO":
        holds_cores = values["state"] not in (4, 5)
        if path == ("vcpus",) and holds_cores and 1 <= value <= 128:
            return {**values, "host_cpus": list(range(value))}
        if path == ("state",) and value in (4, 5):
            return {**values, "host_cpus": [], "volumes": [], "vfs": []}
        if path == ("state",) and values["vcpus"] <= 128:
            return {**values, "host_cpus": list(range(values["vcpus"]))}
    if type_name == "INSTANCE_LIST" and path == ("more",) and value == 1 and len(values["instances"]) != 64:
        return {**values, "instances": _count_items(type_name, "instances", 64)}
    if type_name == "EVENTS":
        last = len(values["events"]) - 1
        if path == ("next_cursor",) and values["events"] and value < values["events"][-1]["cursor"]:
            if value == 0:
                return {**values, "events": []}
            events = _copy(values["events"])
            events[-1]["cursor"] = value
            return {**values, "events": events} if len(events) == 1 else None
        if len(path) == 3 and path[0] == "events" and path[2] == "cursor":
            return {**values, "next_cursor": max(value, values["next_cursor"])}
        if len(path) == 3 and path[0] == "events" and path[2] == "kind" and path[1] == last:
            new_id = None if value in HOST_EVENT_KINDS else mv.INSTANCE_A
            if new_id != values["events"][last]["instance_id"]:
                events = _copy(values["events"])
                events[last]["instance_id"] = new_id
                return {**values, "events": events}
    return None


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


BASE_CASES = [(type_name, i) for type_name in mv.LAYOUTS for i in range(len(mv.BASES[type_name]))]
BASE_IDS = [f"{type_name}-{i}" for type_name, i in BASE_CASES]


def _frame(type_name: str, values: dict[str, Any], **overrides: Any) -> bytes:
    return bytes(mv.frame(type_name, values, **overrides))


# --- consistency of the reference model itself ---------------------------------------


def test_model_tables_match_the_documented_message_table() -> None:
    assert {name: layout.code for name, layout in mv.LAYOUTS.items()} == MESSAGE_TYPES
    assert {name for name, layout in mv.LAYOUTS.items() if not layout.authenticated} == HANDSHAKE
    assert {name for name, layout in mv.LAYOUTS.items() if layout.direction == "to_agent"} == TO_AGENT
    assert {t.name: int(t) for t in wire.MessageType} == MESSAGE_TYPES


@pytest.mark.parametrize("type_name", list(mv.LAYOUTS))
def test_every_integer_field_has_a_documented_rule(type_name: str) -> None:
    """No field can escape the exhaustive walk, and the rule table has no stray entries."""
    leaves = {path for path, _ in int_leaves(mv.LAYOUTS[type_name].fields)}
    assert leaves == set(RULES[type_name])


@pytest.mark.parametrize(("type_name", "index"), BASE_CASES, ids=BASE_IDS)
def test_base_frames_are_valid(type_name: str, index: int) -> None:
    values = mv.base(type_name, index)
    assert model(type_name, values) is None
    direction = wire.Direction.TO_AGENT if type_name in TO_AGENT else wire.Direction.TO_CONTROLLER
    data = _frame(type_name, values)
    assert outcome(data, direction) is None
    other = wire.Direction.TO_CONTROLLER if type_name in TO_AGENT else wire.Direction.TO_AGENT
    assert outcome(data, other) == "wrong_direction"


# --- header fields -----------------------------------------------------------------


@pytest.mark.parametrize(("type_name", "index"), BASE_CASES, ids=BASE_IDS)
def test_header_flags_every_value(type_name: str, index: int) -> None:
    """All 2^16 flag values on every message type: only the required MAC bit pattern passes."""
    data = bytearray(_frame(type_name, mv.base(type_name, index)))
    required = 0 if type_name in HANDSHAKE else MAC_FLAG
    accepted = []
    for flags in range(1 << 16):
        data[6:8] = flags.to_bytes(2, "big")
        verdict = outcome(bytes(data))
        if verdict is None:
            accepted.append(flags)
        else:
            assert verdict == ("undefined_flags" if flags & ~MAC_FLAG else "bad_flags"), (flags, verdict)
    assert accepted == [required]


@pytest.mark.parametrize(("type_name", "index"), BASE_CASES, ids=BASE_IDS)
def test_header_u8_fields_every_value(type_name: str, index: int) -> None:
    """version, type, fd_count, reserved and each magic byte: all 256 values."""
    values = mv.base(type_name, index)
    data = _frame(type_name, values)
    required_fds = 1 if type_name == "ATTACH_VOLUME" and values["source"] == 2 else 0
    codes = set(MESSAGE_TYPES.values())
    handshake_codes = {MESSAGE_TYPES[name] for name in HANDSHAKE}
    own = MESSAGE_TYPES[type_name]
    for offset, name in [(0, "magic0"), (1, "magic1"), (2, "magic2"), (3, "magic3"), (4, "version"),
                         (5, "type"), (16, "fd_count"), (17, "reserved")]:
        accepted = set()
        for value in range(256):
            mutated = data[:offset] + bytes([value]) + data[offset + 1:]
            verdict = outcome(mutated)
            if verdict is None:
                accepted.add(value)
            if name.startswith("magic"):
                assert verdict == (None if value == b"PVSR"[offset] else "bad_magic"), (name, value)
            elif name == "version":
                assert verdict == (None if value == 1 else "bad_version"), value
            elif name == "fd_count":
                assert verdict == (None if value == required_fds else "fd_count_mismatch"), value
            elif name == "reserved":
                assert verdict == (None if value == 0 else "reserved_nonzero"), value
            elif value not in codes:
                assert verdict == "unknown_type", value
            elif (value in handshake_codes) != (own in handshake_codes):
                assert verdict == "bad_flags", value  # the MAC flag is wrong for the new type
            else:
                assert verdict != "unknown_type", value  # known type: the payload decides
        if name == "type":
            assert own in accepted and accepted <= codes
        else:
            assert len(accepted) == 1, (name, accepted)


@pytest.mark.parametrize(("type_name", "index"), BASE_CASES, ids=BASE_IDS)
def test_header_seq_length_and_trailer_bounds(type_name: str, index: int) -> None:
    values = mv.base(type_name, index)
    for seq in (0, 1, U64_MAX - 1, U64_MAX):
        frame = wire.decode(_frame(type_name, values, seq=seq))
        assert frame.seq == seq
    data = _frame(type_name, values)
    length = int.from_bytes(data[18:20], "big")
    for value in sorted({0, length - 1, length, length + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xFFFF} - {-1}):
        mutated = data[:18] + value.to_bytes(2, "big") + data[20:]
        if value > MAX_PAYLOAD:
            expected = "oversized"
        elif value < length:
            expected = "trailing_bytes"  # the bytes present run past the announced frame
        elif value > length:
            expected = "truncated"
        else:
            expected = None
        assert outcome(mutated) == expected, value
    # The length field counting one byte more than the message, with the byte present.
    payload = mv.pack_payload(type_name, values)
    padded = _frame(type_name, {**values}, length=length + 1)
    padded = padded[:20] + payload + b"\x00" + padded[20 + length:]
    assert outcome(padded) == "trailing_bytes"
    mac_size = 0 if type_name in HANDSHAKE else 32
    body = data[:len(data) - mac_size]
    for trailer in (0, 1, 31, 32, 33):
        expected = None if trailer == mac_size else "truncated" if trailer < mac_size else "trailing_bytes"
        assert outcome(body + bytes(range(trailer))) == expected, trailer
    assert outcome(data + bytes(MAX_FRAME + 1 - len(data))) == "oversized"


# --- payload fields ----------------------------------------------------------------


def _count_items(type_name: str, field: str, n: int) -> list[Any]:
    """n distinct, ordered, individually valid items for a list field."""
    if field == "host_cpus":
        return list(range(n))
    if field == "volumes":
        return [mv.numbered_uuid(i) for i in range(n)]
    if field == "vfs":
        return [mv.pci(0, i, 0, 0) for i in range(n)]
    if field == "instances":
        return [mv.summary(mv.numbered_uuid(i), 2, 1, 64) for i in range(n)]
    if field == "samples":
        return [{"metric": 1 + i, "value": i} for i in range(n)]
    if field == "events":
        return [mv.event(1 + i, 9, None, 5) for i in range(n)]
    raise AssertionError(field)


@pytest.mark.parametrize(("type_name", "index"), BASE_CASES, ids=BASE_IDS)
def test_payload_integer_fields(type_name: str, index: int) -> None:
    """Every enum, boolean and u8 field over its whole width, every wider integer at its bounds."""
    fields = mv.LAYOUTS[type_name].fields
    checked = 0
    for path, width in int_leaves(fields):
        rule = RULES[type_name][path]
        seen_tried, seen_accepted = set(), set()
        for value in candidates(width, rule):
            base = mv.base(type_name, index)
            if path[-1] == "#":
                cases = _count_cases(type_name, path[0], value, base)
            else:
                cases = []
                for position in concrete(path, base):
                    values = _copy(base)
                    put(values, position, value)
                    cases.append(values)
                    other = companions(type_name, position, value, values)
                    if other is not None:
                        cases.append(other)
            for values in cases:
                expected = model(type_name, values)
                verdict = outcome(_frame(type_name, values))
                assert verdict == expected, (path, value, values)
                checked += 1
                seen_tried.add(value)
                if verdict is None:
                    seen_accepted.add(value)
        # Every documented value tried must be seen accepted in some otherwise valid frame.
        documented = {v for v in seen_tried if rule.accepted(v)}
        assert seen_accepted == documented, (path, sorted(documented - seen_accepted)[:10])
    assert checked >= len(RULES[type_name])


@pytest.mark.parametrize("type_name", list(mv.LAYOUTS))
def test_every_list_item_field_is_exercised_by_some_base(type_name: str) -> None:
    for path, _ in int_leaves(mv.LAYOUTS[type_name].fields):
        if "*" in path:
            assert any(concrete(path, values) for values in mv.BASES[type_name]), path
    for path in uuid_leaves(mv.LAYOUTS[type_name].fields):
        if "*" in path:
            assert any(concrete(path, values) for values in mv.BASES[type_name]), path


def _count_cases(type_name: str, field: str, n: int, base: dict[str, Any]) -> list[dict[str, Any]]:
    max_items = max(v for v in range(256) if RULES[type_name][(field, "#")].accepted(v))
    if n > max_items + 1:
        # Announce n items, provide max+1: the count is refused before any item is parsed (property 9).
        items = _count_items(type_name, field, max_items + 1)
        packed = bytes([n]) + b"".join(mv.pack_value(dict(mv.LAYOUTS[type_name].fields)[field][1], item)
                                       for item in items)
        values = {**base, field: mv.Raw(packed)}
        assert outcome(_frame(type_name, values)) == "too_many_items"
        return []
    values = {**base, field: _count_items(type_name, field, n)}
    cases = [values]
    if type_name == "INSTANCE_INFO" and field == "host_cpus" and not n:
        cases.append({**values, "state": 4, "volumes": [], "vfs": []})  # only an instance without cores
    if type_name == "INSTANCE_INFO" and n:
        running = {**values, "state": 2}
        if field == "host_cpus":
            if n <= 128:
                cases.append({**running, "vcpus": n})
        else:
            cases.append({**running, "host_cpus": list(range(base["vcpus"]))})
    if type_name == "EVENTS" and n:
        cases.append({**values, "next_cursor": n})
    if type_name == "INSTANCE_LIST" and base["more"] and n != 64:
        cases.append({**values, "more": 0})  # a short page is the last one
    return cases


@pytest.mark.parametrize(("type_name", "index"), BASE_CASES, ids=BASE_IDS)
def test_identifier_fields(type_name: str, index: int) -> None:
    """Each UUID: every variant byte and nil; each MAC: every first byte and all zero."""
    fields = mv.LAYOUTS[type_name].fields
    kinds = dict(fields)
    for path in uuid_leaves(fields):
        base = mv.base(type_name, index)
        for position in concrete(path, base):
            nullable = path in (("events", "*", "instance_id"), ("after",))
            for variant in range(256):
                raw = bytearray(mv.INSTANCE_A.bytes if path[0] != "volumes" else mv.VOLUME_A.bytes)
                raw[8] = variant
                values = _copy(base)
                put(values, position, bytes(raw))
                expected = None if variant & 0xC0 == 0x80 else "invalid_identifier"
                if expected is None:
                    expected = model(type_name, values)
                assert outcome(_frame(type_name, values)) == expected, (path, variant)
            values = _copy(base)
            put(values, position, None)
            expected = model(type_name, values)
            assert (expected == "invalid_identifier") == (not nullable)
            assert outcome(_frame(type_name, values)) == expected, (path, "nil")
    if "mac" in kinds:
        for first in range(256):
            values = {**mv.base(type_name, index), "mac": bytes([first]) + b"\x16\x3e\x4a\x5b\x6c"}
            assert outcome(_frame(type_name, values)) == (None if first % 2 == 0 else "invalid_identifier"), first
        assert outcome(_frame(type_name, {**mv.base(type_name, index), "mac": bytes(6)})) == "invalid_identifier"
        assert outcome(_frame(type_name, {**mv.base(type_name, index), "mac": bytes(5) + b"\x01"})) is None


# --- the build side (property 7) ---------------------------------------------------


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    head, rest = path[0], path[1:]
    if isinstance(obj, tuple):
        items = list(obj)
        items[head] = _replace(items[head], rest, value) if rest else value
        return tuple(items)
    inner = _replace(getattr(obj, head), rest, value) if rest else value
    return dataclasses.replace(obj, **{head: inner})


@pytest.mark.parametrize(("type_name", "index"), BASE_CASES, ids=BASE_IDS)
def test_encode_refuses_every_out_of_range_value(type_name: str, index: int) -> None:
    """Property 7: each bounded integer just outside its range (and outside its width) makes encode raise.

    A codec that wrapped or truncated would produce bytes here instead.  The
    cross-field rules run before the fields when encoding, so where the changed
    value also breaks one (or the order of a list), either kind is a correct refusal.
    """
    base = mv.base(type_name, index)
    frame = wire.decode(_frame(type_name, base))
    refused = 0
    for path, width in int_leaves(mv.LAYOUTS[type_name].fields):
        rule = RULES[type_name][path]
        if rule.kind not in ("out_of_range", "non_canonical") or path[-1] == "#":
            continue
        outside = {v for v in (*rule.extra, -1, 1 << (8 * width)) if not rule.accepted(v)}
        for position in concrete(path, base):
            for value in sorted(outside):
                values = _copy(base)
                put(values, position, value)
                with pytest.raises(wire.FrameError) as caught:
                    wire.encode(dataclasses.replace(frame, message=_replace(frame.message, position, value)))
                allowed = {rule.kind}
                if not cross_field_ok(type_name, values):
                    allowed.add("cross_field")
                if not lists_ordered(values):
                    allowed.add("non_canonical")
                assert caught.value.kind.value in allowed, (path, value)
                refused += 1
    for name, kind in mv.LAYOUTS[type_name].fields:
        if _is(kind, "list"):
            max_items = max(v for v in range(256) if RULES[type_name][(name, "#")].accepted(v))
            items = getattr(frame.message, name)
            too_many = tuple(items[:1]) * (max_items + 1) if items else None
            if too_many is not None:
                with pytest.raises(wire.FrameError) as caught:
                    wire.encode(dataclasses.replace(frame, message=dataclasses.replace(frame.message,
                                                                                       **{name: too_many})))
                assert caught.value.kind.value in ("too_many_items", "cross_field"), name
                refused += 1
    has_bounded = any(RULES[type_name][p].kind in ("out_of_range", "non_canonical")
                      for p, _ in int_leaves(mv.LAYOUTS[type_name].fields) if p[-1] != "#")
    assert refused > 0 or not has_bounded
