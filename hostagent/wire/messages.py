"""Typed messages of the agent channel: closed enums and frozen dataclasses.

This module holds types only.  Bounds and rules live in ``schema.py`` (the
single source of truth, rendered into docs/wire-format.md); a message object
is only known to be valid once it came out of ``decode`` or went through
``encode`` without a :class:`~hostagent.wire.errors.FrameError`.

Naming follows the house style: commands are imperative (``StartInstance``),
answers describe state (``InstanceInfo``), states are enum members.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

MAGIC = b"PVSR"
VERSION = 1
HEADER_SIZE = 20
MAC_SIZE = 32
# The whole frame, header and MAC included.  The largest message (EVENTS with
# 64 events) needs about 2.2 KiB; 8 KiB leaves room without letting a peer make
# either side buffer much (property 9 in docs/wire-format.md).
MAX_FRAME = 8192
MAX_PAYLOAD = MAX_FRAME - HEADER_SIZE - MAC_SIZE
MAX_FDS = 1

NONCE_SIZE = 32
PROOF_SIZE = 32
DIGEST_SIZE = 32
SIGNATURE_SIZE = 64

MIN_VCPUS, MAX_VCPUS = 1, 128
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 64, 1 << 20  # 64 MiB .. 1 TiB
MAX_STOP_TIMEOUT_S = 600
MAX_VLAN = 4095  # 12-bit 802.1Q VLAN id; 0 means untagged
MAX_VF_INDEX = 255
MAX_VOLUMES_PER_INSTANCE = 16
MAX_VFS_PER_INSTANCE = 8
# One INSTANCE_LIST page; the agent holds more instances than that (hostagent.state.MAX_INSTANCES),
# so LIST_INSTANCES pages with a cursor.  64 summaries take about 1.5 KiB.
MAX_LISTED_INSTANCES = 64
MAX_EVENTS_PER_PULL = 64


class Direction(enum.Enum):
    TO_AGENT = "to_agent"
    TO_CONTROLLER = "to_controller"


class MessageType(enum.IntEnum):
    # Handshake (unauthenticated, no MAC trailer); see docs/agent-channel.md.
    HELLO = 0x01
    CHALLENGE = 0x02
    PROOF = 0x03
    # Commands, controller -> agent.
    PING = 0x10
    START_INSTANCE = 0x11
    STOP_INSTANCE = 0x12
    ATTACH_VOLUME = 0x13
    DETACH_VOLUME = 0x14
    ASSIGN_VF = 0x15
    RELEASE_VF = 0x16
    DESCRIBE_INSTANCE = 0x17
    LIST_INSTANCES = 0x18
    GET_METRICS = 0x19
    GET_EVENTS = 0x1A
    # Answers, agent -> controller.
    PONG = 0x80
    INSTANCE_INFO = 0x81
    INSTANCE_LIST = 0x82
    VOLUME_STATUS = 0x83
    VF_STATUS = 0x84
    METRICS = 0x85
    EVENTS = 0x86
    ERROR = 0xFF


class Flags(enum.IntFlag):
    # The frame ends with a MAC_SIZE-byte MAC.  Required on every message
    # except the three handshake messages, forbidden on those.
    MAC = 0x0001


_MAC_BIT = int(Flags.MAC)


class InstanceState(enum.IntEnum):
    STARTING = 1
    RUNNING = 2
    STOPPING = 3
    STOPPED = 4
    FAILED = 5


class StopMode(enum.IntEnum):
    GRACEFUL = 1  # ACPI power-down, then quit after timeout_s
    FORCE = 2  # quit at once


class VolumeSource(enum.IntEnum):
    FILE = 1  # a raw file in the agent's volume directory, named by volume id
    NBD_SOCKET = 2  # an NBD server socket passed with the frame (SCM_RIGHTS)


class VolumeState(enum.IntEnum):
    ATTACHED = 1
    DETACHED = 2


class VfState(enum.IntEnum):
    ASSIGNED = 1
    RELEASED = 2


class MetricId(enum.IntEnum):
    INSTANCES_RUNNING = 1
    CORES_TOTAL = 2
    CORES_FREE = 3
    MEMORY_TOTAL_MIB = 4
    MEMORY_FREE_MIB = 5
    VFS_TOTAL = 6
    VFS_FREE = 7
    FRAMES_REJECTED = 8
    SESSIONS_REJECTED = 9
    EVENTS_PENDING = 10


class EventKind(enum.IntEnum):
    INSTANCE_STARTED = 1
    INSTANCE_STOPPED = 2
    INSTANCE_EXITED = 3  # QEMU went away without being asked to
    INSTANCE_FAILED = 4
    VOLUME_ATTACHED = 5
    VOLUME_DETACHED = 6
    VF_ASSIGNED = 7
    VF_RELEASED = 8
    # Host-level events carry no instance id.
    SESSION_REJECTED = 9
    AGENT_RESTARTED = 10
    RECONCILE_MISMATCH = 11


HOST_EVENT_KINDS = frozenset(
    {EventKind.SESSION_REJECTED, EventKind.AGENT_RESTARTED, EventKind.RECONCILE_MISMATCH}
)


class EventReason(enum.IntEnum):
    NONE = 0
    REQUESTED = 1
    GUEST_POWEROFF = 2
    PROCESS_EXITED = 3
    FORCED_AFTER_TIMEOUT = 4
    AUTH_FAILED = 5
    PROTOCOL_VIOLATION = 6
    IDLE_TIMEOUT = 7
    ADOPTED = 8
    LOST = 9


class ErrorCode(enum.IntEnum):
    MALFORMED_FRAME = 1
    UNEXPECTED_MESSAGE = 2
    UNKNOWN_INSTANCE = 16
    INSTANCE_EXISTS = 17
    INVALID_STATE = 18
    INSUFFICIENT_CORES = 19
    INSUFFICIENT_MEMORY = 20
    IMAGE_NOT_FOUND = 21
    IMAGE_REJECTED = 22
    VOLUME_NOT_FOUND = 23
    VOLUME_ALREADY_ATTACHED = 24
    VOLUME_NOT_ATTACHED = 25
    TOO_MANY_DEVICES = 26
    PF_NOT_FOUND = 27
    NO_FREE_VF = 28
    VF_NOT_ASSIGNED = 29
    DEVICE_REJECTED = 30
    BACKEND_FAILURE = 31
    TIMEOUT = 32
    TOO_MANY_INSTANCES = 33
    INTERNAL = 255


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed-size frame header (docs/wire-format.md, "Frame layout")."""

    type: MessageType
    flags: Flags
    seq: int
    fd_count: int
    length: int

    @property
    def frame_size(self) -> int:
        # Plain int arithmetic: this runs for every frame and IntFlag operators are slow.
        return HEADER_SIZE + self.length + (MAC_SIZE if int(self.flags) & _MAC_BIT else 0)


@dataclass(frozen=True, slots=True)
class PciAddress:
    """A PCI function address (domain:bus:device.function)."""

    domain: int
    bus: int
    device: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"


# --- handshake ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Handshake 1: the controller opens a session with a fresh nonce."""

    controller_nonce: bytes


@dataclass(frozen=True, slots=True)
class Challenge:
    """Handshake 2: the agent's nonce and its proof of the channel secret."""

    agent_nonce: bytes
    agent_proof: bytes


@dataclass(frozen=True, slots=True)
class Proof:
    """Handshake 3: the controller's proof of the channel secret."""

    controller_proof: bytes


# --- commands ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness check; answered with PONG."""

    token: int


@dataclass(frozen=True, slots=True)
class StartInstance:
    """Launch an instance from a signed image; answered with INSTANCE_INFO."""

    instance_id: uuid.UUID
    vcpus: int
    memory_mib: int
    image_digest: bytes
    image_signature: bytes


@dataclass(frozen=True, slots=True)
class StopInstance:
    """Stop an instance; answered with INSTANCE_INFO."""

    instance_id: uuid.UUID
    mode: StopMode
    timeout_s: int


@dataclass(frozen=True, slots=True)
class AttachVolume:
    """Hot-plug a block device; answered with VOLUME_STATUS."""

    instance_id: uuid.UUID
    volume_id: uuid.UUID
    source: VolumeSource
    read_only: bool


@dataclass(frozen=True, slots=True)
class DetachVolume:
    """Unplug a block device; answered with VOLUME_STATUS."""

    instance_id: uuid.UUID
    volume_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class AssignVf:
    """Bind a free VF of a PF to vfio-pci and hot-plug it, or name the one held with this MAC; answered: VF_STATUS."""

    instance_id: uuid.UUID
    pf: PciAddress
    mac: bytes
    vlan: int


@dataclass(frozen=True, slots=True)
class ReleaseVf:
    """Unplug a VF and return it to the pool; answered with VF_STATUS."""

    instance_id: uuid.UUID
    vf: PciAddress


@dataclass(frozen=True, slots=True)
class DescribeInstance:
    """Read one instance; answered with INSTANCE_INFO."""

    instance_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ListInstances:
    """Read one page of instances, those whose id sorts after a cursor; answered with INSTANCE_LIST."""

    after: uuid.UUID | None  # None (nil on the wire): from the first instance


@dataclass(frozen=True, slots=True)
class GetMetrics:
    """Pull the agent's gauges and counters; answered with METRICS."""


@dataclass(frozen=True, slots=True)
class GetEvents:
    """Pull queued events after a cursor; answered with EVENTS."""

    after: int
    limit: int


# --- answers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to PING."""

    token: int


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """One instance, with the host resources it holds."""

    instance_id: uuid.UUID
    state: InstanceState
    vcpus: int
    memory_mib: int
    image_digest: bytes
    host_cpus: tuple[int, ...]
    volumes: tuple[uuid.UUID, ...]
    vfs: tuple[PciAddress, ...]


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    """One row of INSTANCE_LIST."""

    instance_id: uuid.UUID
    state: InstanceState
    vcpus: int
    memory_mib: int


@dataclass(frozen=True, slots=True)
class InstanceList:
    """One page of the instances known to the agent, ordered by id."""

    more: bool  # set only on a full page: instances sorting after the last one were not listed
    instances: tuple[InstanceSummary, ...]


@dataclass(frozen=True, slots=True)
class VolumeStatus:
    """Result of ATTACH_VOLUME or DETACH_VOLUME."""

    instance_id: uuid.UUID
    volume_id: uuid.UUID
    state: VolumeState


@dataclass(frozen=True, slots=True)
class VfStatus:
    """Result of ASSIGN_VF or RELEASE_VF."""

    instance_id: uuid.UUID
    vf: PciAddress
    vf_index: int
    state: VfState


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One gauge or counter."""

    metric: MetricId
    value: int


@dataclass(frozen=True, slots=True)
class Metrics:
    """Answer to GET_METRICS."""

    samples: tuple[MetricSample, ...]


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened on its own, queued until pulled."""

    cursor: int
    time_ms: int
    kind: EventKind
    instance_id: uuid.UUID | None
    reason: EventReason


@dataclass(frozen=True, slots=True)
class Events:
    """Answer to GET_EVENTS."""

    next_cursor: int
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class Error:
    """A command was refused or failed; the code is from a closed set."""

    code: ErrorCode


Message = (
    Hello
    | Challenge
    | Proof
    | Ping
    | StartInstance
    | StopInstance
    | AttachVolume
    | DetachVolume
    | AssignVf
    | ReleaseVf
    | DescribeInstance
    | ListInstances
    | GetMetrics
    | GetEvents
    | Pong
    | InstanceInfo
    | InstanceList
    | VolumeStatus
    | VfStatus
    | Metrics
    | Events
    | Error
)
