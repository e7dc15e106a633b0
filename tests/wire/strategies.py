"""Hypothesis strategies for VALID agent-channel messages and frames.

Every strategy here produces only values that the grammar in
``hostagent/wire/schema.py`` accepts: each integer inside its documented
range, RFC 9562 variant non-nil UUIDs, unicast non-zero MACs, lists sorted
strictly by their key (so no duplicates), and every cross-field rule:

- STOP_INSTANCE: FORCE has ``timeout_s == 0``, GRACEFUL has 1..MAX_STOP_TIMEOUT_S;
- INSTANCE_INFO: ``len(host_cpus) == vcpus`` unless STOPPED or FAILED, which
  hold no cores, volumes or VFs (all three lists empty);
- EVENT: ``instance_id`` is None exactly for host-level kinds;
- EVENTS: cursors strictly increasing, ``next_cursor`` >= the last cursor.

The rules are restated here independently of the schema (the sort keys are
re-derived from the field meanings, not imported), so that a strategy and the
codec cannot share a mistake.

``EXAMPLES`` holds one fixed, hand-written valid message per type with every
list non-empty where the type allows it; ``raw_header`` packs a header with
``struct``, independently of the construct schema.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

from hypothesis import strategies as st

from hostagent.wire import Frame
from hostagent.wire import messages as m
from hostagent.wire.schema import MESSAGES

U8, U16, U32, U64 = (1 << 8) - 1, (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
HOST_LEVEL_KINDS = frozenset(
    {m.EventKind.SESSION_REJECTED, m.EventKind.AGENT_RESTARTED, m.EventKind.RECONCILE_MISMATCH}
)
NO_RESOURCES_STATES = frozenset({m.InstanceState.STOPPED, m.InstanceState.FAILED})
HANDSHAKE_TYPES = frozenset({m.MessageType.HELLO, m.MessageType.CHALLENGE, m.MessageType.PROOF})


def authenticated(message_type: m.MessageType) -> bool:
    """Whether frames of this type carry the MAC flag and a MAC trailer."""
    return message_type not in HANDSHAKE_TYPES


# --- leaves ------------------------------------------------------------------


def _rfc9562(raw: bytes) -> uuid.UUID:
    # Force the variant bits of byte 8 to 10xxxxxx; this also makes the UUID non-nil.
    return uuid.UUID(bytes=raw[:8] + bytes([0x80 | (raw[8] & 0x3F)]) + raw[9:])


def uuids() -> st.SearchStrategy[uuid.UUID]:
    """Non-nil UUIDs of the RFC 9562 variant (any version nibble)."""
    return st.binary(min_size=16, max_size=16).map(_rfc9562)


def macs() -> st.SearchStrategy[bytes]:
    """Unicast (I/G bit clear), non-zero 6-byte Ethernet addresses."""
    return (
        st.binary(min_size=6, max_size=6)
        .map(lambda raw: bytes([raw[0] & 0xFE]) + raw[1:])
        .filter(lambda raw: raw != bytes(6))
    )


def blobs(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


def pci_addresses() -> st.SearchStrategy[m.PciAddress]:
    return st.builds(
        m.PciAddress,
        domain=st.integers(0, U16),
        bus=st.integers(0, U8),
        device=st.integers(0, 31),
        function=st.integers(0, 7),
    )


def pci_order(address: m.PciAddress) -> tuple[int, int, int, int]:
    """Wire order of PCI addresses: domain, bus, device, function."""
    return (address.domain, address.bus, address.device, address.function)


def uuid_order(value: uuid.UUID) -> bytes:
    """Wire order of UUIDs: their 16 bytes, compared lexicographically."""
    return value.bytes


def sorted_unique(elements: st.SearchStrategy[Any], max_size: int, key: Any,
                  min_size: int = 0) -> st.SearchStrategy[tuple[Any, ...]]:
    """Tuples strictly increasing by ``key`` (which rules out duplicates)."""
    return st.lists(elements, min_size=min_size, max_size=max_size, unique_by=key).map(
        lambda items: tuple(sorted(items, key=key))
    )


vcpu_counts = st.integers(m.MIN_VCPUS, m.MAX_VCPUS)
memory_sizes = st.integers(m.MIN_MEMORY_MIB, m.MAX_MEMORY_MIB)


# --- messages ----------------------------------------------------------------


@st.composite
def stop_instances(draw: st.DrawFn) -> m.StopInstance:
    mode = draw(st.sampled_from(m.StopMode))
    timeout = 0 if mode is m.StopMode.FORCE else draw(st.integers(1, m.MAX_STOP_TIMEOUT_S))
    return m.StopInstance(draw(uuids()), mode, timeout)


@st.composite
def instance_infos(draw: st.DrawFn) -> m.InstanceInfo:
    state = draw(st.sampled_from(m.InstanceState))
    vcpus = draw(vcpu_counts)
    if state in NO_RESOURCES_STATES:
        host_cpus: tuple[int, ...] = ()
        volumes: tuple[uuid.UUID, ...] = ()
        vfs: tuple[m.PciAddress, ...] = ()
    else:
        host_cpus = tuple(sorted(draw(st.lists(st.integers(0, 4095), min_size=vcpus, max_size=vcpus, unique=True))))
        volumes = draw(sorted_unique(uuids(), m.MAX_VOLUMES_PER_INSTANCE, uuid_order))
        vfs = draw(sorted_unique(pci_addresses(), m.MAX_VFS_PER_INSTANCE, pci_order))
    return m.InstanceInfo(draw(uuids()), state, vcpus, draw(memory_sizes), draw(blobs(m.DIGEST_SIZE)),
                          host_cpus, volumes, vfs)


def instance_summaries() -> st.SearchStrategy[m.InstanceSummary]:
    return st.builds(m.InstanceSummary, uuids(), st.sampled_from(m.InstanceState), vcpu_counts, memory_sizes)


def metric_samples() -> st.SearchStrategy[m.MetricSample]:
    return st.builds(m.MetricSample, st.sampled_from(m.MetricId), st.integers(0, U64))


@st.composite
def instance_lists(draw: st.DrawFn) -> m.InstanceList:
    """Pages of any size; a full page (drawn often, or `more` would hardly ever be set) may say more follow."""
    full = draw(st.booleans())
    instances = draw(sorted_unique(instance_summaries(), m.MAX_LISTED_INSTANCES, lambda s: s.instance_id.bytes,
                                   min_size=m.MAX_LISTED_INSTANCES if full else 0))
    more = draw(st.booleans()) if len(instances) == m.MAX_LISTED_INSTANCES else False
    return m.InstanceList(more, instances)


@st.composite
def events_with_cursor(draw: st.DrawFn, cursor: int) -> m.Event:
    kind = draw(st.sampled_from(m.EventKind))
    instance_id = None if kind in HOST_LEVEL_KINDS else draw(uuids())
    return m.Event(cursor, draw(st.integers(0, U64)), kind, instance_id, draw(st.sampled_from(m.EventReason)))


@st.composite
def events_messages(draw: st.DrawFn) -> m.Events:
    cursors = sorted(draw(st.lists(st.integers(1, U64), max_size=m.MAX_EVENTS_PER_PULL, unique=True)))
    events = tuple(draw(events_with_cursor(cursor)) for cursor in cursors)
    floor = cursors[-1] if cursors else 0
    return m.Events(draw(st.integers(floor, U64)), events)


MESSAGE_STRATEGIES: dict[m.MessageType, st.SearchStrategy[Any]] = {
    m.MessageType.HELLO: st.builds(m.Hello, blobs(m.NONCE_SIZE)),
    m.MessageType.CHALLENGE: st.builds(m.Challenge, blobs(m.NONCE_SIZE), blobs(m.PROOF_SIZE)),
    m.MessageType.PROOF: st.builds(m.Proof, blobs(m.PROOF_SIZE)),
    m.MessageType.PING: st.builds(m.Ping, st.integers(0, U64)),
    m.MessageType.START_INSTANCE: st.builds(
        m.StartInstance, uuids(), vcpu_counts, memory_sizes, blobs(m.DIGEST_SIZE), blobs(m.SIGNATURE_SIZE)
    ),
    m.MessageType.STOP_INSTANCE: stop_instances(),
    m.MessageType.ATTACH_VOLUME: st.builds(
        m.AttachVolume, uuids(), uuids(), st.sampled_from(m.VolumeSource), st.booleans()
    ),
    m.MessageType.DETACH_VOLUME: st.builds(m.DetachVolume, uuids(), uuids()),
    m.MessageType.ASSIGN_VF: st.builds(m.AssignVf, uuids(), pci_addresses(), macs(), st.integers(0, m.MAX_VLAN)),
    m.MessageType.RELEASE_VF: st.builds(m.ReleaseVf, uuids(), pci_addresses()),
    m.MessageType.DESCRIBE_INSTANCE: st.builds(m.DescribeInstance, uuids()),
    m.MessageType.LIST_INSTANCES: st.builds(m.ListInstances, st.none() | uuids()),
    m.MessageType.GET_METRICS: st.just(m.GetMetrics()),
    m.MessageType.GET_EVENTS: st.builds(m.GetEvents, st.integers(0, U64), st.integers(1, m.MAX_EVENTS_PER_PULL)),
    m.MessageType.PONG: st.builds(m.Pong, st.integers(0, U64)),
    m.MessageType.INSTANCE_INFO: instance_infos(),
    m.MessageType.INSTANCE_LIST: instance_lists(),
    m.MessageType.VOLUME_STATUS: st.builds(m.VolumeStatus, uuids(), uuids(), st.sampled_from(m.VolumeState)),
    m.MessageType.VF_STATUS: st.builds(
        m.VfStatus, uuids(), pci_addresses(), st.integers(0, m.MAX_VF_INDEX), st.sampled_from(m.VfState)
    ),
    m.MessageType.METRICS: st.builds(
        m.Metrics, sorted_unique(metric_samples(), len(m.MetricId), lambda s: int(s.metric))
    ),
    m.MessageType.EVENTS: events_messages(),
    m.MessageType.ERROR: st.builds(m.Error, st.sampled_from(m.ErrorCode)),
}


def messages_of(message_type: m.MessageType) -> st.SearchStrategy[Any]:
    """Valid messages of one type."""
    return MESSAGE_STRATEGIES[message_type]


def messages() -> st.SearchStrategy[Any]:
    """Valid messages of any type."""
    return st.one_of(*MESSAGE_STRATEGIES.values())


def frame_for(message_type: m.MessageType, message: Any, seq: int = 0, mac: bytes | None = None) -> Frame:
    """A frame around ``message``: a MAC exactly on authenticated types (zeros unless given)."""
    if authenticated(message_type):
        return Frame(seq, message, bytes(m.MAC_SIZE) if mac is None else mac)
    return Frame(seq, message, None)


@st.composite
def frames_of(draw: st.DrawFn, message_type: m.MessageType) -> Frame:
    """Valid frames of one type: any u64 sequence number, a random MAC where required."""
    message = draw(messages_of(message_type))
    seq = draw(st.integers(0, U64))
    mac = draw(blobs(m.MAC_SIZE)) if authenticated(message_type) else None
    return Frame(seq, message, mac)


def frames(types: Any = None) -> st.SearchStrategy[Frame]:
    """Valid frames of any type (or of the given types)."""
    chosen = list(m.MessageType) if types is None else list(types)
    return st.sampled_from(chosen).flatmap(frames_of)


# --- fixed examples ----------------------------------------------------------

ID_A = uuid.UUID("11111111-2222-4333-8444-555555555555")
ID_B = uuid.UUID("66666666-7777-4888-9999-aaaaaaaaaaaa")
PCI_A = m.PciAddress(0, 0x3B, 0x10, 1)
PCI_B = m.PciAddress(1, 0x00, 0x02, 0)

EXAMPLES: dict[m.MessageType, Any] = {
    m.MessageType.HELLO: m.Hello(bytes(range(32))),
    m.MessageType.CHALLENGE: m.Challenge(bytes(range(32, 64)), bytes(range(64, 96))),
    m.MessageType.PROOF: m.Proof(bytes(range(96, 128))),
    m.MessageType.PING: m.Ping(0x0102030405060708),
    m.MessageType.START_INSTANCE: m.StartInstance(ID_A, 2, 512, b"\xd1" * 32, b"\x5a" * 64),
    m.MessageType.STOP_INSTANCE: m.StopInstance(ID_A, m.StopMode.GRACEFUL, 30),
    m.MessageType.ATTACH_VOLUME: m.AttachVolume(ID_A, ID_B, m.VolumeSource.NBD_SOCKET, True),
    m.MessageType.DETACH_VOLUME: m.DetachVolume(ID_A, ID_B),
    m.MessageType.ASSIGN_VF: m.AssignVf(ID_A, PCI_A, b"\x02\x00\x00\x00\x00\x01", 100),
    m.MessageType.RELEASE_VF: m.ReleaseVf(ID_A, PCI_B),
    m.MessageType.DESCRIBE_INSTANCE: m.DescribeInstance(ID_A),
    m.MessageType.LIST_INSTANCES: m.ListInstances(ID_B),
    m.MessageType.GET_METRICS: m.GetMetrics(),
    m.MessageType.GET_EVENTS: m.GetEvents(7, 64),
    m.MessageType.PONG: m.Pong(0x0102030405060708),
    m.MessageType.INSTANCE_INFO: m.InstanceInfo(
        ID_A, m.InstanceState.RUNNING, 2, 512, b"\xd1" * 32, (4, 5), (ID_B,), (PCI_A, PCI_B)
    ),
    m.MessageType.INSTANCE_LIST: m.InstanceList(False, (
        m.InstanceSummary(ID_A, m.InstanceState.RUNNING, 2, 512),
        m.InstanceSummary(ID_B, m.InstanceState.STOPPED, 4, 1024),
    )),
    m.MessageType.VOLUME_STATUS: m.VolumeStatus(ID_A, ID_B, m.VolumeState.ATTACHED),
    m.MessageType.VF_STATUS: m.VfStatus(ID_A, PCI_A, 3, m.VfState.ASSIGNED),
    m.MessageType.METRICS: m.Metrics((
        m.MetricSample(m.MetricId.INSTANCES_RUNNING, 1),
        m.MetricSample(m.MetricId.CORES_FREE, 6),
    )),
    m.MessageType.EVENTS: m.Events(12, (
        m.Event(10, 1_700_000_000_000, m.EventKind.INSTANCE_STARTED, ID_A, m.EventReason.REQUESTED),
        m.Event(11, 1_700_000_000_500, m.EventKind.AGENT_RESTARTED, None, m.EventReason.NONE),
    )),
    m.MessageType.ERROR: m.Error(m.ErrorCode.UNKNOWN_INSTANCE),
}


def example_frame(message_type: m.MessageType, seq: int = 1) -> Frame:
    return frame_for(message_type, EXAMPLES[message_type], seq, bytes(range(200, 232)))


def raw_header(type_: int, length: int, *, flags: int | None = None, seq: int = 1, fd_count: int = 0,
               magic: bytes = m.MAGIC, version: int = m.VERSION, reserved: int = 0) -> bytes:
    """A 20-byte header packed with ``struct`` (independent of the construct schema).

    ``flags`` defaults to what the type requires (MAC except on handshake types).
    """
    if flags is None:
        known = type_ in MESSAGES and not authenticated(m.MessageType(type_))
        flags = 0 if known else int(m.Flags.MAC)
    return magic + struct.pack(">BBHQBBH", version, type_, flags, seq, fd_count, reserved, length)
