"""Known-answer vectors for the agent wire codec, made by an independent encoder.

Theory of operation.  This file is a second implementation of the frame
layout in docs/wire-format.md, written with nothing but :mod:`struct` (plus
uuid, json and pathlib).  It deliberately imports neither construct nor
``hostagent.wire``: a vector produced by the codec under test could only prove
that the codec agrees with itself (the pyca/cryptography habit: known answers
come from somewhere else).

The frame (all integers big-endian)::

    magic "PVSR" | version u8 = 1 | type u8 | flags u16 | seq u64 |
    fd_count u8 | reserved u8 = 0 | length u16 | payload | MAC (32 bytes, iff flags bit 0)

Flags bit 0 (MAC) is set on every type except HELLO, CHALLENGE and PROOF and
clear on those; ``fd_count`` is 1 only for ATTACH_VOLUME with source
NBD_SOCKET.  Lists are a u8 count followed by the items.

Message field values are plain Python: ints (also for enums and booleans, so
that invalid values such as a boolean byte 2 can be written), ``bytes``,
``uuid.UUID`` (``None`` for the nil UUID, raw 16 ``bytes`` for deliberately
invalid identifiers), dicts for records and lists for lists.  A :class:`Raw`
value is copied verbatim, which is how the invalid vectors lie about counts.

Running ``python tests/vectors/wire/make_vectors.py`` rewrites
``valid/*.json`` and ``invalid/*.json`` deterministically (fixed identifiers,
fixed bytes, no randomness); ``tests/wire/test_vectors.py`` checks that the
committed files equal what :func:`generate` returns.
"""

from __future__ import annotations

import json
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

MAGIC = b"PVSR"
VERSION = 1
HEADER = struct.Struct(">4sBBHQBBH")  # magic, version, type, flags, seq, fd_count, reserved, length
assert HEADER.size == 20
MAC_SIZE = 32
MAC_FLAG = 0x0001
MAX_FRAME = 8192
MAX_PAYLOAD = MAX_FRAME - HEADER.size - MAC_SIZE

# --- enum name tables (docs/wire-format.md), used only to name values in JSON ----

INSTANCE_STATES = {1: "STARTING", 2: "RUNNING", 3: "STOPPING", 4: "STOPPED", 5: "FAILED"}
STOP_MODES = {1: "GRACEFUL", 2: "FORCE"}
VOLUME_SOURCES = {1: "FILE", 2: "NBD_SOCKET"}
VOLUME_STATES = {1: "ATTACHED", 2: "DETACHED"}
VF_STATES = {1: "ASSIGNED", 2: "RELEASED"}
METRIC_IDS = {
    1: "INSTANCES_RUNNING", 2: "CORES_TOTAL", 3: "CORES_FREE", 4: "MEMORY_TOTAL_MIB", 5: "MEMORY_FREE_MIB",
    6: "VFS_TOTAL", 7: "VFS_FREE", 8: "FRAMES_REJECTED", 9: "SESSIONS_REJECTED", 10: "EVENTS_PENDING",
}
EVENT_KINDS = {
    1: "INSTANCE_STARTED", 2: "INSTANCE_STOPPED", 3: "INSTANCE_EXITED", 4: "INSTANCE_FAILED",
    5: "VOLUME_ATTACHED", 6: "VOLUME_DETACHED", 7: "VF_ASSIGNED", 8: "VF_RELEASED",
    9: "SESSION_REJECTED", 10: "AGENT_RESTARTED", 11: "RECONCILE_MISMATCH",
}
EVENT_REASONS = {
    0: "NONE", 1: "REQUESTED", 2: "GUEST_POWEROFF", 3: "PROCESS_EXITED", 4: "FORCED_AFTER_TIMEOUT",
    5: "AUTH_FAILED", 6: "PROTOCOL_VIOLATION", 7: "IDLE_TIMEOUT", 8: "ADOPTED", 9: "LOST",
}
ERROR_CODES = {
    1: "MALFORMED_FRAME", 2: "UNEXPECTED_MESSAGE", 16: "UNKNOWN_INSTANCE", 17: "INSTANCE_EXISTS",
    18: "INVALID_STATE", 19: "INSUFFICIENT_CORES", 20: "INSUFFICIENT_MEMORY", 21: "IMAGE_NOT_FOUND",
    22: "IMAGE_REJECTED", 23: "VOLUME_NOT_FOUND", 24: "VOLUME_ALREADY_ATTACHED", 25: "VOLUME_NOT_ATTACHED",
    26: "TOO_MANY_DEVICES", 27: "PF_NOT_FOUND", 28: "NO_FREE_VF", 29: "VF_NOT_ASSIGNED",
    30: "DEVICE_REJECTED", 31: "BACKEND_FAILURE", 32: "TIMEOUT", 33: "TOO_MANY_INSTANCES", 255: "INTERNAL",
}

# --- layouts --------------------------------------------------------------------
# A wire kind is one of "u8", "u16", "u32", "u64", "bool", "uuid", "uuid?"
# (nil = None), "mac", ("bytes", n), ("enum", width, names), ("record", fields)
# or ("list", item_kind); fields are (name, kind) pairs in wire order.

UINT_FORMATS = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q"}
PCI = ("record", (("domain", "u16"), ("bus", "u8"), ("device", "u8"), ("function", "u8")))
SUMMARY = ("record", (("instance_id", "uuid"), ("state", ("enum", 1, INSTANCE_STATES)),
                      ("vcpus", "u16"), ("memory_mib", "u32")))
SAMPLE = ("record", (("metric", ("enum", 1, METRIC_IDS)), ("value", "u64")))
EVENT = ("record", (("cursor", "u64"), ("time_ms", "u64"), ("kind", ("enum", 1, EVENT_KINDS)),
                    ("instance_id", "uuid?"), ("reason", ("enum", 1, EVENT_REASONS))))


@dataclass(frozen=True)
class Layout:
    code: int
    direction: str  # "to_agent" or "to_controller"
    authenticated: bool  # MAC flag and trailer
    fields: tuple[tuple[str, Any], ...]


def _cmd(code: int, *fields: tuple[str, Any], authenticated: bool = True) -> Layout:
    return Layout(code, "to_agent", authenticated, fields)


def _ans(code: int, *fields: tuple[str, Any], authenticated: bool = True) -> Layout:
    return Layout(code, "to_controller", authenticated, fields)


LAYOUTS: dict[str, Layout] = {
    "HELLO": _cmd(0x01, ("controller_nonce", ("bytes", 32)), authenticated=False),
    "CHALLENGE": _ans(0x02, ("agent_nonce", ("bytes", 32)), ("agent_proof", ("bytes", 32)), authenticated=False),
    "PROOF": _cmd(0x03, ("controller_proof", ("bytes", 32)), authenticated=False),
    "PING": _cmd(0x10, ("token", "u64")),
    "START_INSTANCE": _cmd(0x11, ("instance_id", "uuid"), ("vcpus", "u16"), ("memory_mib", "u32"),
                           ("image_digest", ("bytes", 32)), ("image_signature", ("bytes", 64))),
    "STOP_INSTANCE": _cmd(0x12, ("instance_id", "uuid"), ("mode", ("enum", 1, STOP_MODES)), ("timeout_s", "u16")),
    "ATTACH_VOLUME": _cmd(0x13, ("instance_id", "uuid"), ("volume_id", "uuid"),
                          ("source", ("enum", 1, VOLUME_SOURCES)), ("read_only", "bool")),
    "DETACH_VOLUME": _cmd(0x14, ("instance_id", "uuid"), ("volume_id", "uuid")),
    "ASSIGN_VF": _cmd(0x15, ("instance_id", "uuid"), ("pf", PCI), ("mac", "mac"), ("vlan", "u16")),
    "RELEASE_VF": _cmd(0x16, ("instance_id", "uuid"), ("vf", PCI)),
    "DESCRIBE_INSTANCE": _cmd(0x17, ("instance_id", "uuid")),
    "LIST_INSTANCES": _cmd(0x18, ("after", "uuid?")),
    "GET_METRICS": _cmd(0x19),
    "GET_EVENTS": _cmd(0x1A, ("after", "u64"), ("limit", "u8")),
    "PONG": _ans(0x80, ("token", "u64")),
    "INSTANCE_INFO": _ans(0x81, ("instance_id", "uuid"), ("state", ("enum", 1, INSTANCE_STATES)),
                          ("vcpus", "u16"), ("memory_mib", "u32"), ("image_digest", ("bytes", 32)),
                          ("host_cpus", ("list", "u16")), ("volumes", ("list", "uuid")), ("vfs", ("list", PCI))),
    "INSTANCE_LIST": _ans(0x82, ("more", "bool"), ("instances", ("list", SUMMARY))),
    "VOLUME_STATUS": _ans(0x83, ("instance_id", "uuid"), ("volume_id", "uuid"),
                          ("state", ("enum", 1, VOLUME_STATES))),
    "VF_STATUS": _ans(0x84, ("instance_id", "uuid"), ("vf", PCI), ("vf_index", "u16"),
                      ("state", ("enum", 1, VF_STATES))),
    "METRICS": _ans(0x85, ("samples", ("list", SAMPLE))),
    "EVENTS": _ans(0x86, ("next_cursor", "u64"), ("events", ("list", EVENT))),
    "ERROR": _ans(0xFF, ("code", ("enum", 2, ERROR_CODES))),
}

# --- the encoder -----------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Bytes written verbatim in place of a field (to build deliberately broken payloads)."""

    data: bytes


def pack_value(kind: Any, value: Any) -> bytes:
    """Encode one field of the given wire kind with :mod:`struct`; no validation at all."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(kind, str):
        if kind in UINT_FORMATS:
            return struct.pack(UINT_FORMATS[kind], value)
        if kind == "bool":
            return struct.pack(">B", int(value))
        if kind in ("uuid", "uuid?"):
            if value is None:
                return bytes(16)
            raw = value.bytes if isinstance(value, uuid.UUID) else bytes(value)
            return struct.pack(">16s", raw)
        if kind == "mac":
            return struct.pack(">6s", value)
        raise ValueError(kind)
    tag = kind[0]
    if tag == "bytes":
        if len(value) != kind[1]:
            raise ValueError(f"expected {kind[1]} bytes")
        return struct.pack(f">{kind[1]}s", value)
    if tag == "enum":
        return struct.pack(">B" if kind[1] == 1 else ">H", value)
    if tag == "record":
        return b"".join(pack_value(sub, value[name]) for name, sub in kind[1])
    if tag == "list":
        return struct.pack(">B", len(value)) + b"".join(pack_value(kind[1], item) for item in value)
    raise ValueError(kind)


def pack_payload(type_name: str, values: dict[str, Any]) -> bytes:
    layout = LAYOUTS[type_name]
    if set(values) != {name for name, _ in layout.fields}:
        raise ValueError(f"{type_name}: fields {sorted(values)}")
    return pack_value(("record", layout.fields), values)


def required_fds(type_name: str, values: dict[str, Any]) -> int:
    """Descriptors the message carries: one NBD socket for ATTACH_VOLUME from NBD_SOCKET."""
    return 1 if type_name == "ATTACH_VOLUME" and values["source"] == 2 else 0


DEFAULT_MAC = bytes(range(0xA0, 0xC0))


def pack_frame(type_code: int, payload: bytes, *, seq: int = 1, flags: int = 0, fd_count: int = 0,
               reserved: int = 0, length: int | None = None, magic: bytes = MAGIC, version: int = VERSION,
               mac: bytes | None = None) -> bytes:
    """A frame from raw header values; ``mac`` (if given) is appended as is."""
    header = HEADER.pack(magic, version, type_code, flags, seq, fd_count, reserved,
                         len(payload) if length is None else length)
    return header + payload + (mac or b"")


def frame(type_name: str, values: dict[str, Any], **overrides: Any) -> bytes:
    """A frame that is valid for ``values``; keyword arguments override header fields or the MAC."""
    layout = LAYOUTS[type_name]
    fields: dict[str, Any] = {
        "seq": 1,
        "flags": MAC_FLAG if layout.authenticated else 0,
        "fd_count": required_fds(type_name, values),
        "mac": DEFAULT_MAC if layout.authenticated else None,
    }
    fields.update(overrides)
    type_code = fields.pop("type_code", layout.code)
    return pack_frame(type_code, pack_payload(type_name, values), **fields)


# --- the JSON form of a decoded message (see tests/wire/test_vectors.py) ------------


def json_value(kind: Any, value: Any) -> Any:
    if isinstance(kind, str):
        if kind in UINT_FORMATS:
            return value
        if kind == "bool":
            return bool(value)
        if kind in ("uuid", "uuid?"):
            return None if value is None else str(value)
        if kind == "mac":
            return value.hex()
        raise ValueError(kind)
    tag = kind[0]
    if tag == "bytes":
        return value.hex()
    if tag == "enum":
        return kind[2][value]
    if tag == "record":
        return {name: json_value(sub, value[name]) for name, sub in kind[1]}
    if tag == "list":
        return [json_value(kind[1], item) for item in value]
    raise ValueError(kind)


def json_message(type_name: str, values: dict[str, Any]) -> dict[str, Any]:
    return dict(json_value(("record", LAYOUTS[type_name].fields), values))


# --- fixed values ------------------------------------------------------------------

INSTANCE_A = uuid.UUID("3f2a6c1e-9b4d-4e7a-8c21-5d6e7f809a1b")
INSTANCE_B = uuid.UUID("7c9e2b44-1a3f-4d58-9e6b-0f1a2b3c4d5e")
VOLUME_A = uuid.UUID("a1b2c3d4-e5f6-4718-a9b0-c1d2e3f40516")
VOLUME_B = uuid.UUID("b7c6d5e4-f3a2-4b1c-b0d9-e8f7a6b5c4d3")
DIGEST = bytes(range(32))
SIGNATURE = bytes(range(0x40, 0x80))
NONCE_C = bytes(range(0x10, 0x30))
NONCE_A = bytes(range(0x60, 0x80))
PROOF_A = bytes(range(0x80, 0xA0))
PROOF_C = bytes(range(0xC0, 0xE0))
VF_MAC = bytes.fromhex("02163e4a5b6c")
U64_MAX = (1 << 64) - 1


def numbered_uuid(n: int) -> uuid.UUID:
    """The n-th of a family of distinct RFC 9562 (v4, variant 10) UUIDs, increasing with n."""
    return uuid.UUID(f"{n + 1:08x}-5eed-4000-8000-{n:012x}")


def pci(domain: int, bus: int, device: int, function: int) -> dict[str, int]:
    return {"domain": domain, "bus": bus, "device": device, "function": function}


def summary(instance_id: uuid.UUID, state: int, vcpus: int, memory_mib: int) -> dict[str, Any]:
    return {"instance_id": instance_id, "state": state, "vcpus": vcpus, "memory_mib": memory_mib}


def event(cursor: int, kind: int, instance_id: uuid.UUID | None, reason: int,
          time_ms: int = 1_767_225_600_000) -> dict[str, Any]:
    return {"cursor": cursor, "time_ms": time_ms, "kind": kind, "instance_id": instance_id, "reason": reason}


def instance_info(state: int, vcpus: int, host_cpus: list[int], volumes: list[uuid.UUID] | None = None,
                  vfs: list[dict[str, int]] | None = None, memory_mib: int = 2048) -> dict[str, Any]:
    return {"instance_id": INSTANCE_A, "state": state, "vcpus": vcpus, "memory_mib": memory_mib,
            "image_digest": DIGEST, "host_cpus": host_cpus, "volumes": volumes or [], "vfs": vfs or []}


# One valid message per type: the "otherwise valid" frames that the exhaustive
# checks (tests/wire/test_exhaustive.py) mutate one field at a time.  Types whose
# rules depend on a state get one base per relevant state.
BASES: dict[str, list[dict[str, Any]]] = {
    "HELLO": [{"controller_nonce": NONCE_C}],
    "CHALLENGE": [{"agent_nonce": NONCE_A, "agent_proof": PROOF_A}],
    "PROOF": [{"controller_proof": PROOF_C}],
    "PING": [{"token": 0x0123456789ABCDEF}],
    "START_INSTANCE": [{"instance_id": INSTANCE_A, "vcpus": 4, "memory_mib": 4096,
                        "image_digest": DIGEST, "image_signature": SIGNATURE}],
    "STOP_INSTANCE": [{"instance_id": INSTANCE_A, "mode": 1, "timeout_s": 30},
                      {"instance_id": INSTANCE_A, "mode": 2, "timeout_s": 0}],
    "ATTACH_VOLUME": [{"instance_id": INSTANCE_A, "volume_id": VOLUME_A, "source": 1, "read_only": 0},
                      {"instance_id": INSTANCE_A, "volume_id": VOLUME_A, "source": 2, "read_only": 1}],
    "DETACH_VOLUME": [{"instance_id": INSTANCE_A, "volume_id": VOLUME_A}],
    "ASSIGN_VF": [{"instance_id": INSTANCE_A, "pf": pci(0, 0x3B, 0, 0), "mac": VF_MAC, "vlan": 100}],
    "RELEASE_VF": [{"instance_id": INSTANCE_A, "vf": pci(0, 0x3B, 2, 1)}],
    "DESCRIBE_INSTANCE": [{"instance_id": INSTANCE_A}],
    "LIST_INSTANCES": [{"after": None}, {"after": INSTANCE_A}],
    "GET_METRICS": [{}],
    "GET_EVENTS": [{"after": 41, "limit": 16}],
    "PONG": [{"token": 0x0123456789ABCDEF}],
    "INSTANCE_INFO": [instance_info(2, 2, [4, 5], [VOLUME_A], [pci(0, 0x3B, 2, 1)]),
                      instance_info(4, 2, [])],
    "INSTANCE_LIST": [{"more": 0, "instances": [summary(INSTANCE_A, 2, 2, 2048)]},
                      {"more": 1, "instances": [summary(numbered_uuid(i), 2, 1, 64) for i in range(64)]}],
    "VOLUME_STATUS": [{"instance_id": INSTANCE_A, "volume_id": VOLUME_A, "state": 1}],
    "VF_STATUS": [{"instance_id": INSTANCE_A, "vf": pci(0, 0x3B, 2, 1), "vf_index": 9, "state": 1}],
    "METRICS": [{"samples": [{"metric": 3, "value": 12}]}],
    "EVENTS": [{"next_cursor": 7, "events": [event(7, 2, INSTANCE_A, 1)]},
               {"next_cursor": 7, "events": [event(7, 10, None, 8)]}],
    "ERROR": [{"code": 18}],
}


def base(type_name: str, index: int = 0) -> dict[str, Any]:
    """A copy of a base message, safe to mutate (records and lists are copied too)."""

    def copy(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value

    return dict(copy(BASES[type_name][index]))


def with_fields(type_name: str, index: int = 0, **changes: Any) -> dict[str, Any]:
    values = base(type_name, index)
    unknown = set(changes) - set(values)
    if unknown:
        raise ValueError(f"{type_name} has no field {unknown}")
    values.update(changes)
    return values


# --- the vectors ---------------------------------------------------------------------

ALL_METRICS = [{"metric": i, "value": v} for i, v in zip(range(1, 11), (3, 64, 58, 262144, 253952, 16, 15,
                                                                         0, 2, U64_MAX), strict=True)]


def _valid_cases() -> list[tuple[str, str, str, dict[str, Any], dict[str, Any], str | None]]:
    """(name, description, type, values, header overrides, direction) of every valid vector."""
    full_info = instance_info(
        2, 128, [*range(0, 127 * 2, 2), 4095],
        [numbered_uuid(i) for i in range(16)],
        [pci(0xFFFF, 0xFF, 31, i) for i in range(8)],
        memory_mib=1 << 20,
    )
    many_instances = [summary(numbered_uuid(i), 1 + i % 5, 1 + i, 64 + i) for i in range(64)]
    many_events = [event(1000 + i, 1 + i % 11, None if 1 + i % 11 >= 9 else numbered_uuid(i), i % 10,
                         time_ms=1_767_225_600_000 + i) for i in range(64)]
    a, c = "to_agent", "to_controller"
    return [
        ("hello", "handshake HELLO: no MAC flag, no trailer", "HELLO", base("HELLO"), {}, a),
        ("challenge", "handshake CHALLENGE from the agent", "CHALLENGE", base("CHALLENGE"), {}, c),
        ("proof", "handshake PROOF from the controller", "PROOF", base("PROOF"), {}, None),
        ("ping", "PING with a MAC trailer", "PING", base("PING"), {"seq": 2}, a),
        ("ping_bounds", "PING: token 0, seq and MAC at their extremes (u64 max, all 0xff)", "PING",
         {"token": 0}, {"seq": U64_MAX, "mac": b"\xff" * 32}, None),
        ("pong_token_max", "PONG: token u64 max, seq 0", "PONG", {"token": U64_MAX}, {"seq": 0}, c),
        ("start_instance", "START_INSTANCE with typical values", "START_INSTANCE", base("START_INSTANCE"), {}, a),
        ("start_instance_min", "START_INSTANCE at the lower bounds: 1 vCPU, 64 MiB", "START_INSTANCE",
         with_fields("START_INSTANCE", vcpus=1, memory_mib=64), {}, None),
        ("start_instance_max", "START_INSTANCE at the upper bounds: 128 vCPUs, 1 TiB", "START_INSTANCE",
         with_fields("START_INSTANCE", vcpus=128, memory_mib=1 << 20), {}, a),
        ("stop_graceful_min", "STOP_INSTANCE GRACEFUL with the shortest timeout (1 s)", "STOP_INSTANCE",
         with_fields("STOP_INSTANCE", timeout_s=1), {}, a),
        ("stop_graceful_max", "STOP_INSTANCE GRACEFUL with the longest timeout (600 s)", "STOP_INSTANCE",
         with_fields("STOP_INSTANCE", timeout_s=600), {}, None),
        ("stop_force", "STOP_INSTANCE FORCE, timeout 0 as required", "STOP_INSTANCE", base("STOP_INSTANCE", 1),
         {}, a),
        ("attach_volume_file", "ATTACH_VOLUME from a FILE, read-write, no descriptor", "ATTACH_VOLUME",
         base("ATTACH_VOLUME"), {}, a),
        ("attach_volume_nbd", "ATTACH_VOLUME from an NBD_SOCKET, read-only, fd_count 1", "ATTACH_VOLUME",
         base("ATTACH_VOLUME", 1), {}, None),
        ("detach_volume", "DETACH_VOLUME", "DETACH_VOLUME", base("DETACH_VOLUME"), {}, a),
        ("assign_vf", "ASSIGN_VF, VLAN 100", "ASSIGN_VF", base("ASSIGN_VF"), {}, a),
        ("assign_vf_untagged_min", "ASSIGN_VF: VLAN 0 (untagged), PCI 0000:00:00.0", "ASSIGN_VF",
         with_fields("ASSIGN_VF", pf=pci(0, 0, 0, 0), vlan=0), {}, None),
        ("assign_vf_max", "ASSIGN_VF: VLAN 4095, PCI ffff:ff:1f.7, largest unicast MAC", "ASSIGN_VF",
         with_fields("ASSIGN_VF", pf=pci(0xFFFF, 0xFF, 31, 7), mac=bytes.fromhex("feffffffffff"), vlan=4095),
         {}, a),
        ("release_vf", "RELEASE_VF", "RELEASE_VF", base("RELEASE_VF"), {}, a),
        ("describe_instance", "DESCRIBE_INSTANCE", "DESCRIBE_INSTANCE", base("DESCRIBE_INSTANCE"), {}, a),
        ("list_instances", "LIST_INSTANCES from the start: the nil cursor", "LIST_INSTANCES", base("LIST_INSTANCES"),
         {}, a),
        ("list_instances_after", "LIST_INSTANCES after an instance id (the last one of the previous page)",
         "LIST_INSTANCES", base("LIST_INSTANCES", 1), {}, None),
        ("get_metrics", "GET_METRICS: empty payload", "GET_METRICS", {}, {}, None),
        ("get_events", "GET_EVENTS typical", "GET_EVENTS", base("GET_EVENTS"), {}, a),
        ("get_events_min", "GET_EVENTS: after 0, limit 1", "GET_EVENTS", {"after": 0, "limit": 1}, {}, a),
        ("get_events_max", "GET_EVENTS: after u64 max, limit 64", "GET_EVENTS", {"after": U64_MAX, "limit": 64},
         {}, None),
        ("instance_info_running", "INSTANCE_INFO RUNNING: 2 vCPUs on 2 host CPUs, one volume, one VF",
         "INSTANCE_INFO", base("INSTANCE_INFO"), {}, c),
        ("instance_info_stopped", "INSTANCE_INFO STOPPED: holds no cores, volumes or VFs", "INSTANCE_INFO",
         base("INSTANCE_INFO", 1), {}, None),
        ("instance_info_full", "INSTANCE_INFO with every list full: 128 host CPUs (up to id 4095), "
         "16 volumes, 8 VFs; 1 TiB", "INSTANCE_INFO", full_info, {}, c),
        ("instance_info_starting_min", "INSTANCE_INFO STARTING: 1 vCPU on host CPU 0, 64 MiB, empty lists",
         "INSTANCE_INFO", instance_info(1, 1, [0], memory_mib=64), {}, c),
        ("instance_info_failed", "INSTANCE_INFO FAILED: vCPUs kept, no host CPUs", "INSTANCE_INFO",
         instance_info(5, 128, []), {}, c),
        ("instance_list_empty", "INSTANCE_LIST with no instances, the last page", "INSTANCE_LIST",
         {"more": 0, "instances": []}, {}, c),
        ("instance_list", "INSTANCE_LIST with two instances ordered by id, the last page", "INSTANCE_LIST",
         {"more": 0, "instances": [summary(INSTANCE_A, 2, 2, 2048), summary(INSTANCE_B, 3, 128, 1 << 20)]},
         {}, None),
        ("instance_list_full", "INSTANCE_LIST with 64 instances (the maximum), every state, more follow",
         "INSTANCE_LIST", {"more": 1, "instances": many_instances}, {}, c),
        ("instance_list_full_last", "INSTANCE_LIST with 64 instances, the last page (more 0)", "INSTANCE_LIST",
         {"more": 0, "instances": many_instances}, {}, c),
        ("volume_status_attached", "VOLUME_STATUS ATTACHED", "VOLUME_STATUS", base("VOLUME_STATUS"), {}, c),
        ("volume_status_detached", "VOLUME_STATUS DETACHED", "VOLUME_STATUS",
         with_fields("VOLUME_STATUS", state=2), {}, None),
        ("vf_status", "VF_STATUS ASSIGNED, vf_index 0", "VF_STATUS", with_fields("VF_STATUS", vf_index=0), {}, c),
        ("vf_status_max", "VF_STATUS RELEASED, vf_index 255", "VF_STATUS",
         with_fields("VF_STATUS", vf_index=255, state=2), {}, c),
        ("metrics_empty", "METRICS with no samples", "METRICS", {"samples": []}, {}, c),
        ("metrics_one", "METRICS with one sample", "METRICS", base("METRICS"), {}, None),
        ("metrics_full", "METRICS with all 10 metrics in id order", "METRICS", {"samples": ALL_METRICS}, {}, c),
        ("events_empty", "EVENTS with no events, next_cursor 0", "EVENTS", {"next_cursor": 0, "events": []}, {}, c),
        ("events_instance", "EVENTS with one instance event, next_cursor equal to its cursor", "EVENTS",
         base("EVENTS"), {}, c),
        ("events_host", "EVENTS with one host event (nil instance id), cursor 1, next_cursor u64 max", "EVENTS",
         {"next_cursor": U64_MAX, "events": [event(1, 10, None, 8, time_ms=0)]}, {}, None),
        ("events_full", "EVENTS with 64 events (the maximum): every kind and reason", "EVENTS",
         {"next_cursor": 1100, "events": many_events}, {}, c),
        ("error", "ERROR INVALID_STATE", "ERROR", base("ERROR"), {}, c),
        ("error_min", "ERROR MALFORMED_FRAME (code 1, the smallest)", "ERROR", {"code": 1}, {}, None),
        ("error_max", "ERROR INTERNAL (code 255, the largest)", "ERROR", {"code": 255}, {}, c),
    ]


def _valid_vector(description: str, type_name: str, values: dict[str, Any], overrides: dict[str, Any],
                  direction: str | None) -> dict[str, Any]:
    data = frame(type_name, values, **overrides)
    authenticated = LAYOUTS[type_name].authenticated
    mac = overrides.get("mac", DEFAULT_MAC) if authenticated else None
    return {
        "description": description,
        "hex": data.hex(),
        "direction": direction,
        "expected": {
            "seq": overrides.get("seq", 1),
            "type": type_name,
            "mac": None if mac is None else mac.hex(),
            "message": json_message(type_name, values),
        },
    }


def _invalid_cases() -> list[tuple[str, str, bytes, str | None, str, int]]:
    """(name, description, bytes, direction, error kind, property) of every invalid vector."""
    f = frame
    w = with_fields
    ping = f("PING", base("PING"))
    start = f("START_INSTANCE", base("START_INSTANCE"))
    hello = f("HELLO", base("HELLO"))
    info = base("INSTANCE_INFO")
    wrong_variant = bytearray(INSTANCE_A.bytes)
    wrong_variant[8] = 0xC0 | (wrong_variant[8] & 0x3F)  # Microsoft's reserved variant (110x)
    ncs_variant = bytearray(VOLUME_A.bytes)
    ncs_variant[8] &= 0x3F  # the NCS variant (0xxx)
    attach_file = base("ATTACH_VOLUME")
    payload_ping = pack_payload("PING", base("PING"))
    long_payload = pack_payload("START_INSTANCE", base("START_INSTANCE"))
    return [
        # 1. Totality: any bytes give a frame or a FrameError, never another exception.
        ("totality_empty", "property 1: the empty input", b"", None, "truncated", 1),
        ("totality_short_garbage", "property 1: 7 bytes of garbage, shorter than a header",
         bytes.fromhex("deadbeef00ff17"), None, "truncated", 1),
        ("totality_header_garbage", "property 1: 60 bytes of 0xff (no magic)", b"\xff" * 60, None, "bad_magic", 1),
        ("totality_magic_only", "property 1: the magic alone", MAGIC, None, "truncated", 1),
        # 2. Full recognition before processing.
        ("recognition_nbd_without_fd", "property 2: ATTACH_VOLUME from NBD_SOCKET with fd_count 0; the "
         "descriptor count is known only once the whole payload is parsed, and the frame is still refused",
         f("ATTACH_VOLUME", base("ATTACH_VOLUME", 1), fd_count=0), "to_agent", "fd_count_mismatch", 2),
        ("recognition_file_with_fd", "property 2: ATTACH_VOLUME from a FILE announcing a descriptor",
         f("ATTACH_VOLUME", attach_file, fd_count=1), None, "fd_count_mismatch", 2),
        ("recognition_ping_with_fd", "property 2: PING announcing a descriptor", f("PING", base("PING"), fd_count=1),
         None, "fd_count_mismatch", 2),
        ("recognition_last_field_truncated", "property 2: START_INSTANCE whose signature (the last field) "
         "is one byte short; nothing of the valid prefix may reach a handler",
         pack_frame(0x11, long_payload[:-1], flags=MAC_FLAG, mac=DEFAULT_MAC), None, "truncated", 2),
        ("direction_answer_to_agent", "property 2: PONG decoded by the agent (direction to_agent)",
         f("PONG", base("PONG")), "to_agent", "wrong_direction", 2),
        ("direction_command_to_controller", "property 2: START_INSTANCE decoded by the controller",
         start, "to_controller", "wrong_direction", 2),
        ("direction_hello_to_controller", "property 2: HELLO decoded by the controller", hello,
         "to_controller", "wrong_direction", 2),
        ("direction_challenge_to_agent", "property 2: CHALLENGE decoded by the agent",
         f("CHALLENGE", base("CHALLENGE")), "to_agent", "wrong_direction", 2),
        # 3. Exact consumption.
        ("exact_byte_after_frame", "property 3: a valid PING followed by one extra byte", ping + b"\x00",
         None, "trailing_bytes", 3),
        ("exact_length_beyond_payload", "property 3: PING whose length field (9) exceeds its 8-byte "
         "payload; the extra byte is present, so the payload region is not consumed to its end",
         pack_frame(0x10, payload_ping + b"\x00", flags=MAC_FLAG, mac=DEFAULT_MAC), None, "trailing_bytes", 3),
        ("exact_empty_payload_with_byte", "property 3: GET_METRICS (empty payload) with length 1",
         pack_frame(0x19, b"\x00", flags=MAC_FLAG, mac=DEFAULT_MAC), None, "trailing_bytes", 3),
        ("exact_mac_short", "property 3: PING with a 31-byte MAC trailer", ping[:-1], None, "truncated", 3),
        ("exact_length_short", "property 3: HELLO whose length field (31) is one short of the nonce",
         pack_frame(0x01, NONCE_C[:-1]), None, "truncated", 3),
        ("exact_header_only", "property 3: a header announcing 8 payload bytes and a MAC, nothing after it",
         ping[:20], None, "truncated", 3),
        # 4. Canonical encoding.
        ("canonical_bool_2", "property 4: ATTACH_VOLUME read_only byte 2",
         f("ATTACH_VOLUME", {**attach_file, "read_only": 2}), None, "non_canonical", 4),
        ("canonical_bool_ff", "property 4: ATTACH_VOLUME read_only byte 0xff",
         f("ATTACH_VOLUME", {**attach_file, "read_only": 0xFF}), None, "non_canonical", 4),
        ("canonical_host_cpus_order", "property 4: INSTANCE_INFO host_cpus out of order (5, 4)",
         f("INSTANCE_INFO", {**info, "host_cpus": [5, 4]}), None, "non_canonical", 4),
        ("canonical_host_cpus_duplicate", "property 4: INSTANCE_INFO host_cpus repeated (4, 4)",
         f("INSTANCE_INFO", {**info, "host_cpus": [4, 4]}), None, "non_canonical", 4),
        ("canonical_volumes_duplicate", "property 4: INSTANCE_INFO volume listed twice",
         f("INSTANCE_INFO", {**info, "volumes": [VOLUME_A, VOLUME_A]}), None, "non_canonical", 4),
        ("canonical_vfs_order", "property 4: INSTANCE_INFO VFs out of order",
         f("INSTANCE_INFO", {**info, "vfs": [pci(0, 0x3B, 2, 2), pci(0, 0x3B, 2, 1)]}), None, "non_canonical", 4),
        ("canonical_instances_order", "property 4: INSTANCE_LIST not ordered by instance id",
         f("INSTANCE_LIST", {"more": 0, "instances": [summary(INSTANCE_B, 2, 2, 2048),
                                                      summary(INSTANCE_A, 2, 2, 2048)]}),
         "to_controller", "non_canonical", 4),
        ("canonical_more_2", "property 4: INSTANCE_LIST more byte 2 on a full page",
         f("INSTANCE_LIST", {**base("INSTANCE_LIST", 1), "more": 2}), None, "non_canonical", 4),
        ("canonical_metrics_duplicate", "property 4: METRICS with the same metric twice",
         f("METRICS", {"samples": [{"metric": 3, "value": 1}, {"metric": 3, "value": 2}]}), None,
         "non_canonical", 4),
        ("canonical_events_order", "property 4: EVENTS with cursors 8 then 7",
         f("EVENTS", {"next_cursor": 8, "events": [event(8, 2, INSTANCE_A, 1), event(7, 2, INSTANCE_A, 1)]}),
         None, "non_canonical", 4),
        ("canonical_reserved_nonzero", "property 4: reserved header byte 0x01",
         f("PING", base("PING"), reserved=1), None, "reserved_nonzero", 4),
        ("canonical_reserved_ff", "property 4: reserved header byte 0xff",
         f("HELLO", base("HELLO"), reserved=0xFF), None, "reserved_nonzero", 4),
        ("canonical_undefined_flag", "property 4: flags 0x0003 (bit 1 undefined) on PING",
         f("PING", base("PING"), flags=0x0003), None, "undefined_flags", 4),
        ("canonical_undefined_flag_high", "property 4: flags 0x8000 (bit 15 undefined) on HELLO",
         f("HELLO", base("HELLO"), flags=0x8000), None, "undefined_flags", 4),
        # 5. Round trip: a Frame cannot express these, so decoding them would break decode∘encode.
        ("roundtrip_hello_with_mac", "property 5: HELLO with the MAC flag and a trailer; a handshake Frame "
         "has no MAC, so encode could never produce these bytes",
         f("HELLO", base("HELLO"), flags=MAC_FLAG, mac=DEFAULT_MAC), None, "bad_flags", 5),
        ("roundtrip_ping_without_mac", "property 5: PING without the MAC flag and trailer",
         f("PING", base("PING"), flags=0, mac=None), None, "bad_flags", 5),
        ("roundtrip_proof_with_flag_no_trailer", "property 5: PROOF with the MAC flag but no trailer",
         f("PROOF", base("PROOF"), flags=MAC_FLAG), None, "bad_flags", 5),
        # 6. Closed sets.
        ("closed_bad_magic", "property 6: magic PVSQ", f("PING", base("PING"), magic=b"PVSQ"), None, "bad_magic", 6),
        ("closed_bad_magic_lowercase", "property 6: magic pvsr", f("PING", base("PING"), magic=b"pvsr"), None,
         "bad_magic", 6),
        ("closed_version_0", "property 6: version 0", f("PING", base("PING"), version=0), None, "bad_version", 6),
        ("closed_version_2", "property 6: version 2", f("PING", base("PING"), version=2), None, "bad_version", 6),
        ("closed_type_0", "property 6: message type 0x00", f("PING", base("PING"), type_code=0x00), None,
         "unknown_type", 6),
        ("closed_type_1b", "property 6: message type 0x1b (one past GET_EVENTS)",
         f("PING", base("PING"), type_code=0x1B), None, "unknown_type", 6),
        ("closed_type_87", "property 6: message type 0x87 (one past EVENTS)",
         f("PONG", base("PONG"), type_code=0x87), None, "unknown_type", 6),
        ("closed_type_fe", "property 6: message type 0xfe", f("ERROR", base("ERROR"), type_code=0xFE), None,
         "unknown_type", 6),
        ("closed_stop_mode_0", "property 6: STOP_INSTANCE mode 0",
         f("STOP_INSTANCE", w("STOP_INSTANCE", mode=0)), None, "unknown_enum", 6),
        ("closed_stop_mode_3", "property 6: STOP_INSTANCE mode 3",
         f("STOP_INSTANCE", w("STOP_INSTANCE", mode=3)), None, "unknown_enum", 6),
        ("closed_volume_source_3", "property 6: ATTACH_VOLUME source 3",
         f("ATTACH_VOLUME", w("ATTACH_VOLUME", source=3)), None, "unknown_enum", 6),
        ("closed_instance_state_0", "property 6: INSTANCE_INFO state 0",
         f("INSTANCE_INFO", w("INSTANCE_INFO", state=0)), None, "unknown_enum", 6),
        ("closed_instance_state_6", "property 6: INSTANCE_LIST summary state 6",
         f("INSTANCE_LIST", {"more": 0, "instances": [summary(INSTANCE_A, 6, 2, 2048)]}), None, "unknown_enum", 6),
        ("closed_volume_state_3", "property 6: VOLUME_STATUS state 3",
         f("VOLUME_STATUS", w("VOLUME_STATUS", state=3)), None, "unknown_enum", 6),
        ("closed_vf_state_0", "property 6: VF_STATUS state 0",
         f("VF_STATUS", w("VF_STATUS", state=0)), None, "unknown_enum", 6),
        ("closed_metric_11", "property 6: METRICS metric id 11",
         f("METRICS", {"samples": [{"metric": 11, "value": 1}]}), None, "unknown_enum", 6),
        ("closed_event_kind_12", "property 6: EVENTS kind 12",
         f("EVENTS", {"next_cursor": 7, "events": [event(7, 12, INSTANCE_A, 1)]}), None, "unknown_enum", 6),
        ("closed_event_reason_10", "property 6: EVENTS reason 10",
         f("EVENTS", {"next_cursor": 7, "events": [event(7, 2, INSTANCE_A, 10)]}), None, "unknown_enum", 6),
        ("closed_error_code_0", "property 6: ERROR code 0", f("ERROR", {"code": 0}), None, "unknown_enum", 6),
        ("closed_error_code_3", "property 6: ERROR code 3 (a gap between 2 and 16)", f("ERROR", {"code": 3}),
         None, "unknown_enum", 6),
        ("closed_error_code_256", "property 6: ERROR code 0x0100 (INTERNAL plus 1; the code is u16)",
         f("ERROR", {"code": 0x100}), None, "unknown_enum", 6),
        ("closed_error_code_01ff", "property 6: ERROR code 0x01ff (INTERNAL in the low byte only)",
         f("ERROR", {"code": 0x1FF}), None, "unknown_enum", 6),
        # 8. Refinements: ranges and cross-field rules.
        ("range_vcpus_0", "property 8: START_INSTANCE vcpus 0", f("START_INSTANCE", w("START_INSTANCE", vcpus=0)),
         None, "out_of_range", 8),
        ("range_vcpus_129", "property 8: START_INSTANCE vcpus 129",
         f("START_INSTANCE", w("START_INSTANCE", vcpus=129)), None, "out_of_range", 8),
        ("range_vcpus_ffff", "property 8: START_INSTANCE vcpus 65535",
         f("START_INSTANCE", w("START_INSTANCE", vcpus=0xFFFF)), None, "out_of_range", 8),
        ("range_memory_63", "property 8: START_INSTANCE memory_mib 63",
         f("START_INSTANCE", w("START_INSTANCE", memory_mib=63)), None, "out_of_range", 8),
        ("range_memory_above_1tib", "property 8: START_INSTANCE memory_mib 1048577",
         f("START_INSTANCE", w("START_INSTANCE", memory_mib=(1 << 20) + 1)), None, "out_of_range", 8),
        ("range_timeout_601", "property 8: STOP_INSTANCE GRACEFUL timeout_s 601",
         f("STOP_INSTANCE", w("STOP_INSTANCE", timeout_s=601)), None, "out_of_range", 8),
        ("range_vlan_4096", "property 8: ASSIGN_VF vlan 4096", f("ASSIGN_VF", w("ASSIGN_VF", vlan=4096)), None,
         "out_of_range", 8),
        ("range_pci_device_32", "property 8: ASSIGN_VF PCI device 32",
         f("ASSIGN_VF", w("ASSIGN_VF", pf=pci(0, 0x3B, 32, 0))), None, "out_of_range", 8),
        ("range_pci_function_8", "property 8: RELEASE_VF PCI function 8",
         f("RELEASE_VF", w("RELEASE_VF", vf=pci(0, 0x3B, 2, 8))), None, "out_of_range", 8),
        ("range_vf_index_256", "property 8: VF_STATUS vf_index 256",
         f("VF_STATUS", w("VF_STATUS", vf_index=256)), None, "out_of_range", 8),
        ("range_limit_0", "property 8: GET_EVENTS limit 0", f("GET_EVENTS", w("GET_EVENTS", limit=0)), None,
         "out_of_range", 8),
        ("range_limit_65", "property 8: GET_EVENTS limit 65", f("GET_EVENTS", w("GET_EVENTS", limit=65)), None,
         "out_of_range", 8),
        ("range_host_cpu_4096", "property 8: INSTANCE_INFO host CPU id 4096",
         f("INSTANCE_INFO", {**info, "host_cpus": [4, 4096]}), None, "out_of_range", 8),
        ("range_event_cursor_0", "property 8: EVENTS event cursor 0",
         f("EVENTS", {"next_cursor": 0, "events": [event(0, 2, INSTANCE_A, 1)]}), None, "out_of_range", 8),
        ("range_summary_vcpus_0", "property 8: INSTANCE_LIST summary vcpus 0",
         f("INSTANCE_LIST", {"more": 0, "instances": [summary(INSTANCE_A, 2, 0, 2048)]}), None, "out_of_range", 8),
        ("range_fd_count_2", "property 8: fd_count 2 (at most one descriptor per frame)",
         f("ATTACH_VOLUME", base("ATTACH_VOLUME", 1), fd_count=2), None, "fd_count_mismatch", 8),
        ("identifier_nil_instance", "property 8: START_INSTANCE with the nil instance id",
         f("START_INSTANCE", w("START_INSTANCE", instance_id=None)), None, "invalid_identifier", 8),
        ("identifier_wrong_variant", "property 8: DESCRIBE_INSTANCE id with variant bits 110 (not RFC 9562)",
         f("DESCRIBE_INSTANCE", {"instance_id": bytes(wrong_variant)}), None, "invalid_identifier", 8),
        ("identifier_ncs_variant", "property 8: DETACH_VOLUME volume id with variant bit 0 (NCS)",
         f("DETACH_VOLUME", w("DETACH_VOLUME", volume_id=bytes(ncs_variant))), None, "invalid_identifier", 8),
        ("identifier_nil_volume_in_list", "property 8: INSTANCE_INFO listing the nil volume id",
         f("INSTANCE_INFO", {**info, "volumes": [None]}), None, "invalid_identifier", 8),
        ("identifier_multicast_mac", "property 8: ASSIGN_VF multicast MAC 01:00:5e:00:00:01",
         f("ASSIGN_VF", w("ASSIGN_VF", mac=bytes.fromhex("01005e000001"))), None, "invalid_identifier", 8),
        ("identifier_broadcast_mac", "property 8: ASSIGN_VF broadcast MAC ff:ff:ff:ff:ff:ff",
         f("ASSIGN_VF", w("ASSIGN_VF", mac=b"\xff" * 6)), None, "invalid_identifier", 8),
        ("identifier_zero_mac", "property 8: ASSIGN_VF all-zero MAC",
         f("ASSIGN_VF", w("ASSIGN_VF", mac=bytes(6))), None, "invalid_identifier", 8),
        ("cross_stop_force_timeout", "property 8: STOP_INSTANCE FORCE with timeout_s 5 (FORCE needs 0)",
         f("STOP_INSTANCE", w("STOP_INSTANCE", mode=2, timeout_s=5)), None, "cross_field", 8),
        ("cross_stop_graceful_zero", "property 8: STOP_INSTANCE GRACEFUL with timeout_s 0",
         f("STOP_INSTANCE", w("STOP_INSTANCE", mode=1, timeout_s=0)), None, "cross_field", 8),
        ("cross_info_cpu_count", "property 8: INSTANCE_INFO RUNNING with 2 vCPUs but 3 host CPUs",
         f("INSTANCE_INFO", {**info, "host_cpus": [4, 5, 6]}), None, "cross_field", 8),
        ("cross_info_stopped_holds_cores", "property 8: INSTANCE_INFO STOPPED still listing host CPUs",
         f("INSTANCE_INFO", {**base("INSTANCE_INFO", 1), "host_cpus": [4, 5]}), None, "cross_field", 8),
        ("cross_info_failed_holds_volume", "property 8: INSTANCE_INFO FAILED still listing a volume",
         f("INSTANCE_INFO", {**base("INSTANCE_INFO", 1), "state": 5, "volumes": [VOLUME_A]}), None,
         "cross_field", 8),
        ("cross_event_nil_instance", "property 8: EVENTS INSTANCE_STOPPED event with the nil instance id",
         f("EVENTS", {"next_cursor": 7, "events": [event(7, 2, None, 1)]}), None, "cross_field", 8),
        ("cross_host_event_with_instance", "property 8: EVENTS AGENT_RESTARTED event naming an instance",
         f("EVENTS", {"next_cursor": 7, "events": [event(7, 10, INSTANCE_A, 8)]}), None, "cross_field", 8),
        ("cross_list_more_on_short_page", "property 8: INSTANCE_LIST more 1 on a page of one instance "
         "(more follow only after a full page of 64)",
         f("INSTANCE_LIST", {**base("INSTANCE_LIST"), "more": 1}), None, "cross_field", 8),
        ("identifier_list_after_wrong_variant", "property 8: LIST_INSTANCES cursor with variant bits 110",
         f("LIST_INSTANCES", {"after": bytes(wrong_variant)}), None, "invalid_identifier", 8),
        ("cross_events_cursor_behind", "property 8: EVENTS next_cursor 6 below the last event's cursor 7",
         f("EVENTS", {"next_cursor": 6, "events": [event(7, 2, INSTANCE_A, 1)]}), None, "cross_field", 8),
        # 9. Bounded cost.
        ("bounded_frame_above_max", "property 9: 8193 bytes (MAX_FRAME + 1) starting with a HELLO header",
         pack_frame(0x01, bytes(MAX_FRAME + 1 - HEADER.size)), None, "oversized", 9),
        ("bounded_length_above_max", "property 9: HELLO header with length 8141 (MAX_PAYLOAD + 1)",
         pack_frame(0x01, bytes(MAX_PAYLOAD + 1)), None, "oversized", 9),
        ("bounded_length_ffff_header_only", "property 9: a header announcing 65535 payload bytes, nothing after "
         "it; refused without waiting for (or allocating) the payload",
         pack_frame(0x10, b"", flags=MAC_FLAG, length=0xFFFF), None, "oversized", 9),
        ("bounded_events_count_255", "property 9: EVENTS announcing 255 events with none present; the count "
         "is refused before any item is allocated",
         f("EVENTS", {"next_cursor": 7, "events": Raw(b"\xff")}), None, "too_many_items", 9),
        ("bounded_events_count_unbacked", "property 9: EVENTS announcing 64 events (allowed) with one present",
         f("EVENTS", {"next_cursor": 7, "events": Raw(b"\x40" + pack_value(EVENT, event(7, 2, INSTANCE_A, 1)))}),
         None, "truncated", 9),
        ("bounded_host_cpus_129", "property 9: INSTANCE_INFO with 129 host CPUs",
         f("INSTANCE_INFO", {**info, "vcpus": 128, "host_cpus": list(range(129))}), None, "too_many_items", 9),
        ("bounded_volumes_17", "property 9: INSTANCE_INFO with 17 volumes",
         f("INSTANCE_INFO", {**info, "volumes": [numbered_uuid(i) for i in range(17)]}), None,
         "too_many_items", 9),
        ("bounded_vfs_9", "property 9: INSTANCE_INFO with 9 VFs",
         f("INSTANCE_INFO", {**info, "vfs": [pci(0, 1, i, 0) for i in range(9)]}), None, "too_many_items", 9),
        ("bounded_instances_65", "property 9: INSTANCE_LIST with 65 instances",
         f("INSTANCE_LIST", {"more": 0, "instances": [summary(numbered_uuid(i), 2, 1, 64) for i in range(65)]}), None,
         "too_many_items", 9),
        ("bounded_metrics_11", "property 9: METRICS with 11 samples (there are 10 metrics)",
         f("METRICS", {"samples": [*ALL_METRICS, {"metric": 10, "value": 0}]}), None, "too_many_items", 9),
        ("bounded_events_65", "property 9: EVENTS with 65 events",
         f("EVENTS", {"next_cursor": 65, "events": [event(1 + i, 9, None, 5) for i in range(65)]}), None,
         "too_many_items", 9),
        # 10. Chunking: what a stream reader may hold at a chunk boundary is not a frame.
        ("chunk_first_header_bytes", "property 10: the first 19 bytes of START_INSTANCE (a chunk boundary "
         "inside the header); the one-frame decoder must not guess", start[:19], None, "truncated", 10),
        ("chunk_header_and_part", "property 10: START_INSTANCE cut after 100 bytes (a chunk boundary inside "
         "the payload)", start[:100], None, "truncated", 10),
        ("chunk_two_frames", "property 10: two PING frames in one chunk; decode takes exactly one frame, "
         "splitting is the streaming decoder's job", ping + ping, None, "trailing_bytes", 10),
        # 11. Forward only: nothing may be read outside the current region or twice.
        ("forward_payload_region_ends_early", "property 11: PING whose length field is 7 while 8 token bytes "
         "follow and the MAC is one byte short; a parser that read past its payload region into the MAC "
         "would accept it, a forward-only region-bounded parser runs out of payload",
         pack_frame(0x10, payload_ping, flags=MAC_FLAG, length=7, mac=DEFAULT_MAC[:-1]), None, "truncated", 11),
        ("forward_count_not_peeked", "property 11: INSTANCE_INFO RUNNING with vcpus 3 and 2 host CPUs; the "
         "rule relating them runs after both were read in order, without peeking at the later count",
         f("INSTANCE_INFO", {**info, "vcpus": 3}), None, "cross_field", 11),
    ]


def generate() -> dict[str, str]:
    """Every vector file: path relative to this directory -> file text."""
    files: dict[str, str] = {}

    def put(path: str, obj: dict[str, Any]) -> None:
        if path in files:
            raise ValueError(f"duplicate vector {path}")
        files[path] = json.dumps(obj, indent=2) + "\n"

    for name, description, type_name, values, overrides, direction in _valid_cases():
        put(f"valid/{name}.json", _valid_vector(description, type_name, values, overrides, direction))
    for name, description, data, direction, error, prop in _invalid_cases():
        put(f"invalid/{name}.json", {"description": description, "hex": data.hex(), "direction": direction,
                                     "error": error, "property": prop})
    return files


def write(root: Path = HERE) -> None:
    files = generate()
    for sub in ("valid", "invalid"):
        (root / sub).mkdir(exist_ok=True)
        for stale in (root / sub).glob("*.json"):
            if f"{sub}/{stale.name}" not in files:
                stale.unlink()
    for rel, text in files.items():
        (root / rel).write_text(text)


if __name__ == "__main__":
    write()
    sys.stdout.write(f"wrote {len(generate())} vectors under {HERE}\n")
