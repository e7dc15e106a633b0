"""Regenerate the seed corpora and dictionaries of the fuzz targets (``python -m fuzz.seed``).

Writes fuzz/corpus/<target>/ and fuzz/<target>.dict; tests/fuzz checks that
the committed files are what this script generates.

Deterministic: the same codec and the same vector files give the same seeds,
and afterwards each corpus directory holds exactly those (``--keep`` leaves
other files, e.g. units merged from a campaign, in place).  Each seed file is
named by the SHA-1 of its content, as libFuzzer names the units it writes, so
a diff shows only real changes.

Sources:

- one representative valid frame of every message type, encoded with
  ``hostagent.wire.encode`` from fixed UUIDs and bytes (a 32-byte MAC on the
  authenticated types), plus a few variants that reach other branches
  (nullable UUIDs, empty and full lists, the file-descriptor flag);
- the ``hex`` of every test vector in tests/vectors/wire/{valid,invalid}/*.json
  (the directory may still be empty);
- for fuzz_stream, the same bytes behind a configuration prefix (see
  ``fuzz_stream.make_input``) and a few multi-frame streams;
- for fuzz_envelope, ``fuzz_envelope.seeds()`` and its own dictionary (the
  envelope is not a wire frame).

Both whole-frame targets get every frame and vector of both directions: a
frame travelling the other way is a rejection path too.  The dictionaries
are derived from the constants and enums in hostagent/wire/messages.py.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

from hostagent import wire
from hostagent.wire import messages as m
from hostagent.wire.schema import MESSAGES

from . import fuzz_envelope, fuzz_stream

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
CORPUS = FUZZ / "corpus"
VECTORS = ROOT / "tests" / "vectors" / "wire"

INSTANCE = uuid.UUID("6f1c2a4e-8d3b-4c57-9a10-2b3c4d5e6f70")
OTHER_INSTANCE = uuid.UUID("7a2b3c4d-5e6f-4701-8213-243546576879")
VOLUME = uuid.UUID("0d9e8f7a-6b5c-4d3e-af10-11223344aabb")
VOLUME_2 = uuid.UUID("1e2d3c4b-5a69-4788-b9aa-bbccddeeff00")
MAC = bytes(range(0xA0, 0xA0 + m.MAC_SIZE))
NONCE = bytes(range(m.NONCE_SIZE))
PROOF = bytes(range(0x40, 0x40 + m.PROOF_SIZE))
DIGEST = hashlib.sha256(b"passivisor seed image").digest()
SIGNATURE = bytes(range(0x80, 0x80 + m.SIGNATURE_SIZE))
PF = m.PciAddress(0, 0x3B, 0, 0)
VF = m.PciAddress(0, 0x3B, 0x10, 2)


def messages() -> list[m.Message]:
    """At least one valid message of every type, plus branch-reaching variants."""
    return [
        m.Hello(NONCE),
        m.Challenge(NONCE[::-1], PROOF),
        m.Proof(PROOF),
        m.Ping(0x0123456789ABCDEF),
        m.StartInstance(INSTANCE, 4, 2048, DIGEST, SIGNATURE),
        m.StopInstance(INSTANCE, m.StopMode.GRACEFUL, 30),
        m.StopInstance(INSTANCE, m.StopMode.FORCE, 0),
        m.AttachVolume(INSTANCE, VOLUME, m.VolumeSource.FILE, True),
        m.AttachVolume(INSTANCE, VOLUME, m.VolumeSource.NBD_SOCKET, False),
        m.DetachVolume(INSTANCE, VOLUME),
        m.AssignVf(INSTANCE, PF, bytes.fromhex("02005e0010aa"), 100),
        m.ReleaseVf(INSTANCE, VF),
        m.DescribeInstance(INSTANCE),
        m.ListInstances(None),
        m.ListInstances(OTHER_INSTANCE),
        m.GetMetrics(),
        m.GetEvents(0, m.MAX_EVENTS_PER_PULL),
        m.Pong(0x0123456789ABCDEF),
        m.InstanceInfo(INSTANCE, m.InstanceState.RUNNING, 2, 1024, DIGEST, (4, 5),
                       (VOLUME, VOLUME_2), (VF,)),
        m.InstanceInfo(INSTANCE, m.InstanceState.STOPPED, 2, 1024, DIGEST, (), (), ()),
        m.InstanceList(False, ()),
        m.InstanceList(False, (m.InstanceSummary(INSTANCE, m.InstanceState.RUNNING, 2, 1024),
                               m.InstanceSummary(OTHER_INSTANCE, m.InstanceState.STOPPING, 1, 64))),
        m.InstanceList(True, tuple(m.InstanceSummary(uuid.UUID(f"{i:08x}-0000-4000-8000-000000000000"),
                                                     m.InstanceState.RUNNING, 1, 64)
                                   for i in range(1, m.MAX_LISTED_INSTANCES + 1))),
        m.VolumeStatus(INSTANCE, VOLUME, m.VolumeState.ATTACHED),
        m.VfStatus(INSTANCE, VF, 3, m.VfState.ASSIGNED),
        m.Metrics(tuple(m.MetricSample(metric, 10 * int(metric)) for metric in m.MetricId)),
        m.Events(0, ()),
        m.Events(9, (m.Event(7, 1_700_000_000_000, m.EventKind.INSTANCE_STARTED, INSTANCE,
                             m.EventReason.REQUESTED),
                     m.Event(8, 1_700_000_000_001, m.EventKind.AGENT_RESTARTED, None, m.EventReason.NONE))),
        m.Error(m.ErrorCode.UNKNOWN_INSTANCE),
    ]


def frames() -> list[wire.Frame]:
    out = []
    for seq, message in enumerate(messages(), start=1):
        authenticated = wire.Frame(seq, message, MAC).spec.authenticated
        out.append(wire.Frame(seq, message, MAC if authenticated else None))
    return out


def vectors() -> list[tuple[bytes, wire.Direction | None]]:
    """(bytes, direction) of every wire test vector, valid and invalid, in path order."""
    out = []
    for path in sorted(VECTORS.glob("*/*.json")):
        try:
            vector = json.loads(path.read_text())
            direction = {d.value: d for d in wire.Direction}.get(vector.get("direction"))
            out.append((bytes.fromhex(vector["hex"]), direction))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"seed: skipping {path.relative_to(ROOT)}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out


def _raw_header(type_: m.MessageType, length: int, flags: int = 1, seq: int = 1) -> bytes:
    """A header built by hand, for inputs that no valid frame gives (see the overflow seed)."""
    return (m.MAGIC + bytes([m.VERSION, type_]) + flags.to_bytes(2, "big") + seq.to_bytes(8, "big")
            + b"\x00\x00" + length.to_bytes(2, "big"))


def seeds() -> dict[str, list[bytes]]:
    """Seed inputs per target."""
    all_frames = frames()
    encoded = [wire.encode(frame) for frame in all_frames]
    by_direction: dict[wire.Direction, list[bytes]] = {direction: [] for direction in wire.Direction}
    for frame, data in zip(all_frames, encoded, strict=True):
        by_direction[frame.spec.direction].append(data)
    to_agent = by_direction[wire.Direction.TO_AGENT]
    to_controller = by_direction[wire.Direction.TO_CONTROLLER]
    vector_inputs = vectors()
    every = encoded + [data for data, _ in vector_inputs]

    make = fuzz_stream.make_input
    stream = [make(None, [fuzz_stream.WHOLE], data) for data in encoded]
    stream += [make(direction, [fuzz_stream.WHOLE], data) for data, direction in vector_inputs]
    for direction, same_way in by_direction.items():
        # Consecutive pairs: a frame, then the next one, cut in assorted places.
        for index, (first, second) in enumerate(itertools.pairwise(same_way)):
            sizes = [[1], [7, 64], [20, 3], [len(first) - 1, 2], [len(first) + 5]][index % 5]
            stream.append(make(direction, sizes, first + second))
    stream += [
        # Frames from both directions with no direction set; then a wrong-direction stream.
        make(None, [5, 300, 1], to_agent[0] + to_controller[0]),
        make(wire.Direction.TO_AGENT, [33], to_controller[1] + to_agent[1]),
        # A valid stream cut inside its second frame: a frame, then "need more data".
        make(wire.Direction.TO_AGENT, [13], (to_agent[4] + to_agent[5])[:-5]),
        # The largest header the grammar accepts, then more than the tightest buffer holds:
        # feed must refuse the second chunk with OVERSIZED.
        make(wire.Direction.TO_CONTROLLER, [m.HEADER_SIZE, fuzz_stream.WHOLE],
             _raw_header(m.MessageType.EVENTS, m.MAX_PAYLOAD) + bytes(m.MAX_FRAME + 8), tight=True),
    ]
    return {"fuzz_to_agent": every, "fuzz_to_controller": every, "fuzz_stream": stream,
            "fuzz_envelope": fuzz_envelope.seeds()}


def _entry(value: bytes) -> str:
    """libFuzzer dictionary syntax: a quoted string; every byte as \\xNN unless all are letters."""
    return f'"{value.decode()}"' if value.isalpha() else '"' + "".join(f"\\x{b:02x}" for b in value) + '"'


def _be(value: int, width: int) -> bytes:
    return value.to_bytes(width, "big")


def dictionary(target: str) -> str:
    """The libFuzzer dictionary of ``target``: protocol tokens and boundary values, all big-endian."""
    if target == "fuzz_envelope":  # not a wire frame: the envelope target keeps its own tokens
        return fuzz_envelope.dictionary()
    directions = {
        "fuzz_to_agent": (wire.Direction.TO_AGENT,),
        "fuzz_to_controller": (wire.Direction.TO_CONTROLLER,),
    }.get(target, tuple(wire.Direction))
    entries: list[tuple[str, bytes]] = [
        ("magic", m.MAGIC),
        ("version", bytes([m.VERSION])),
        ("version_next", bytes([m.VERSION + 1])),
        ("magic_version", m.MAGIC + bytes([m.VERSION])),
        ("flags_none", _be(0, 2)),
        ("flags_mac", _be(int(m.Flags.MAC), 2)),
        ("flags_undefined", _be(0x0002, 2)),
        ("flags_high", _be(0x8000, 2)),
        ("flags_all", _be(0xFFFF, 2)),
        ("fd_count_max", bytes([m.MAX_FDS])),
        ("fd_count_above", bytes([m.MAX_FDS + 1])),
        ("length_max_payload", _be(m.MAX_PAYLOAD, 2)),
        ("length_above_max_payload", _be(m.MAX_PAYLOAD + 1, 2)),
        ("length_max_frame", _be(m.MAX_FRAME, 2)),
        ("length_frame_minus_header", _be(m.MAX_FRAME - m.HEADER_SIZE, 2)),
    ]
    for spec in MESSAGES.values():
        entries.append((f"type_{spec.type.name}", bytes([spec.type])))
        if spec.direction in directions:
            flags = int(m.Flags.MAC) if spec.authenticated else 0
            entries.append((f"header_{spec.type.name}", m.MAGIC + bytes([m.VERSION, spec.type]) + _be(flags, 2)))
    for frame in frames():
        if frame.spec.direction in directions:
            data = wire.encode(frame)
            length = data[m.HEADER_SIZE - 2: m.HEADER_SIZE]
            entries.append((f"length_{frame.type.name}_{int.from_bytes(length, 'big')}", length))
    for width, name in ((1, "u8"), (2, "u16"), (4, "u32"), (8, "u64")):
        top = (1 << (8 * width)) - 1
        for value in sorted(v for v in {0, 1, 0x7F, 0x80, 0xFF, 0x100, top >> 1, (top >> 1) + 1, top} if v <= top):
            entries.append((f"{name}_{value:#x}", _be(value, width)))
    bounds = [
        ("vcpus", 2, m.MIN_VCPUS, m.MAX_VCPUS), ("memory_mib", 4, m.MIN_MEMORY_MIB, m.MAX_MEMORY_MIB),
        ("stop_timeout", 2, 1, m.MAX_STOP_TIMEOUT_S), ("vlan", 2, 0, m.MAX_VLAN), ("vf_index", 2, 0, m.MAX_VF_INDEX),
        ("events_limit", 1, 1, m.MAX_EVENTS_PER_PULL), ("volumes", 1, 0, m.MAX_VOLUMES_PER_INSTANCE),
        ("vfs", 1, 0, m.MAX_VFS_PER_INSTANCE), ("instances", 1, 0, m.MAX_LISTED_INSTANCES),
        ("metrics", 1, 0, len(m.MetricId)), ("host_cpu", 2, 0, 4095),
        ("pci_device", 1, 0, 31), ("pci_function", 1, 0, 7),
    ]
    for name, width, lo, hi in bounds:
        for label, value in (("min_minus_1", lo - 1), ("min", lo), ("max", hi), ("max_plus_1", hi + 1)):
            if 0 <= value < 1 << (8 * width):
                entries.append((f"{name}_{label}", _be(value, width)))
    for enum_type, width in ((m.StopMode, 1), (m.VolumeSource, 1), (m.InstanceState, 1), (m.VolumeState, 1),
                             (m.VfState, 1), (m.MetricId, 1), (m.EventKind, 1), (m.EventReason, 1),
                             (m.ErrorCode, 2)):
        for member in enum_type:
            entries.append((f"{enum_type.__name__}_{member.name}", _be(int(member), width)))
    entries += [
        # Byte 8 of a UUID holds its variant: 10xxxxxx is RFC 9562, the only one accepted.
        ("uuid_variant_rfc", b"\x80"),
        ("uuid_variant_rfc_max", b"\xbf"),
        ("uuid_variant_ncs", b"\x40"),
        ("uuid_variant_microsoft", b"\xc0"),
        ("uuid", INSTANCE.bytes),
        ("uuid_nil", bytes(16)),
        ("mac_unicast", bytes.fromhex("02005e0010aa")),
        ("mac_multicast", bytes.fromhex("01005e0010aa")),
        ("bool_true", b"\x01"),
        ("bool_noncanonical", b"\x02"),
    ]
    seen: set[str] = set()
    lines = [f"# libFuzzer dictionary for {target}; generated by `python -m fuzz.seed`, do not edit.",
             "# The wire is big-endian (docs/wire-format.md)."]
    for name, value in entries:
        if name not in seen:
            seen.add(name)
            lines.append(f"{name}={_entry(value)}")
    return "\n".join(lines) + "\n"


def write(corpus: Path, inputs: Iterable[bytes], keep: bool) -> tuple[int, int]:
    """Write ``inputs`` into ``corpus``; returns (files added, files removed)."""
    corpus.mkdir(parents=True, exist_ok=True)
    wanted = {hashlib.sha1(data, usedforsecurity=False).hexdigest(): data for data in inputs}
    removed = 0
    if not keep:
        for old in sorted(corpus.iterdir()):
            if old.name not in wanted:
                old.unlink()
                removed += 1
    added = 0
    for name, data in wanted.items():
        path = corpus / name
        if not path.exists():
            path.write_bytes(data)
            added += 1
    return added, removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.seed", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep files that are not generated seeds")
    args = parser.parse_args(argv)
    for target, inputs in seeds().items():
        added, removed = write(CORPUS / target, inputs, args.keep)
        total = len(list((CORPUS / target).iterdir()))
        print(f"seed: {target}: {total} files in {(CORPUS / target).relative_to(ROOT)} "
              f"({added} added, {removed} removed)")
        (FUZZ / f"{target}.dict").write_text(dictionary(target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
