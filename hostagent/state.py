"""The agent's state: instances, the resources they hold, and the event queue.

Pure domain code: no I/O, no asyncio, no sockets, no construct.

Theory of operation.  ``AgentState`` is a value-like container of frozen
:class:`Instance` records plus an :class:`EventQueue`.  Every change goes
through a method that first checks the lifecycle table (``TRANSITIONS``) and
raises :class:`Refused` without touching anything when the step is not
allowed, so a refused command leaves the state exactly as it was.  The service
layer journals the whole state after each change (``journal.py``), which is
why the records are plain data.

Lifecycle (``InstanceState``):

    (absent, STOPPED, FAILED) --begin_start--> STARTING --launched--> RUNNING
    STARTING --launch_failed--> FAILED
    RUNNING --begin_stop--> STOPPING --exited--> STOPPED
    RUNNING --exited--> STOPPED          (guest power-off or crash: INSTANCE_EXITED)
    STOPPING --stop_failed--> RUNNING    (the VMM would not stop; still holds its resources)

Invariants:
- an instance holds cores, volumes and VFs only while STARTING, RUNNING or
  STOPPING; STOPPED and FAILED records hold nothing;
- event cursors increase strictly and are never reused, also across restarts
  (the next cursor is journaled);
- the event queue is bounded; when full, the oldest event is dropped and
  counted, never the newest.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .backend import VmRecord
from .wire.messages import (
    HOST_EVENT_KINDS,
    Event,
    EventKind,
    EventReason,
    InstanceState,
    PciAddress,
    VolumeSource,
)

# Instance records the agent keeps (STOPPED and FAILED ones are forgotten, oldest-listed first, to make
# room).  More than one INSTANCE_LIST frame carries (wire MAX_LISTED_INSTANCES = 64): LIST_INSTANCES pages
# with a cursor (``page``).  The bound keeps the journal, a page walk (16 frames) and the sorting in
# ``instances`` small.
MAX_INSTANCES = 1024
MAX_EVENTS = 1024


class Refusal(enum.Enum):
    """Why the agent refused a command.  Mapped to wire error codes in one place (service.py)."""

    UNKNOWN_INSTANCE = "unknown_instance"
    INSTANCE_EXISTS = "instance_exists"
    INVALID_STATE = "invalid_state"
    TOO_MANY_INSTANCES = "too_many_instances"
    VOLUME_ALREADY_ATTACHED = "volume_already_attached"
    VOLUME_NOT_ATTACHED = "volume_not_attached"
    TOO_MANY_DEVICES = "too_many_devices"
    VF_NOT_ASSIGNED = "vf_not_assigned"


class Refused(Exception):
    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(f"{refusal.value}: {detail}")
        self.refusal = refusal
        self.detail = detail


class Step(enum.Enum):
    BEGIN_START = "begin_start"
    LAUNCHED = "launched"
    LAUNCH_FAILED = "launch_failed"
    BEGIN_STOP = "begin_stop"
    EXITED = "exited"
    STOP_FAILED = "stop_failed"


# (current state or None for an unknown instance, step) -> next state.  A pair
# that is not in the table is refused; there is no default.
TRANSITIONS: Mapping[tuple[InstanceState | None, Step], InstanceState] = MappingProxyType({
    (None, Step.BEGIN_START): InstanceState.STARTING,
    (InstanceState.STOPPED, Step.BEGIN_START): InstanceState.STARTING,
    (InstanceState.FAILED, Step.BEGIN_START): InstanceState.STARTING,
    (InstanceState.STARTING, Step.LAUNCHED): InstanceState.RUNNING,
    (InstanceState.STARTING, Step.LAUNCH_FAILED): InstanceState.FAILED,
    (InstanceState.RUNNING, Step.BEGIN_STOP): InstanceState.STOPPING,
    (InstanceState.RUNNING, Step.EXITED): InstanceState.STOPPED,
    (InstanceState.STOPPING, Step.EXITED): InstanceState.STOPPED,
    (InstanceState.STOPPING, Step.STOP_FAILED): InstanceState.RUNNING,
})

HOLDS_RESOURCES = frozenset({InstanceState.STARTING, InstanceState.RUNNING, InstanceState.STOPPING})
MAX_VOLUMES = 16
MAX_VFS = 8


@dataclass(frozen=True)
class VolumeAttachment:
    volume_id: uuid.UUID
    source: VolumeSource
    read_only: bool


@dataclass(frozen=True)
class VfAttachment:
    pf: PciAddress
    vf: PciAddress
    index: int
    mac: bytes
    vlan: int


@dataclass(frozen=True)
class Instance:
    instance_id: uuid.UUID
    state: InstanceState
    vcpus: int
    memory_mib: int
    image_digest: bytes
    host_cpus: tuple[int, ...] = ()
    volumes: tuple[VolumeAttachment, ...] = ()
    vfs: tuple[VfAttachment, ...] = ()
    vm: VmRecord | None = None

    def volume(self, volume_id: uuid.UUID) -> VolumeAttachment | None:
        return next((v for v in self.volumes if v.volume_id == volume_id), None)

    def vf(self, address: PciAddress) -> VfAttachment | None:
        return next((v for v in self.vfs if v.vf == address), None)

    def vf_with_mac(self, pf: PciAddress, mac: bytes) -> VfAttachment | None:
        return next((v for v in self.vfs if v.pf == pf and v.mac == mac), None)


@dataclass
class EventQueue:
    """Events wait here until the controller pulls them (claim C5: pull, never push)."""

    next_cursor: int = 1
    dropped: int = 0
    events: deque[Event] = field(default_factory=deque)

    def append(self, time_ms: int, kind: EventKind, instance_id: uuid.UUID | None, reason: EventReason) -> Event:
        if (instance_id is None) != (kind in HOST_EVENT_KINDS):
            raise ValueError(f"{kind.name} {'needs' if instance_id is None else 'takes no'} instance id")
        event = Event(self.next_cursor, time_ms, kind, instance_id, reason)
        self.next_cursor += 1
        self.events.append(event)
        while len(self.events) > MAX_EVENTS:
            self.events.popleft()
            self.dropped += 1
        return event

    def after(self, cursor: int, limit: int) -> tuple[tuple[Event, ...], int]:
        """Events with a cursor above ``cursor`` (at most ``limit``) and the cursor to continue from.

        Pulling with ``after=N`` also acknowledges every event up to N: they are
        forgotten, which is what keeps the queue short in normal operation.
        """
        while self.events and self.events[0].cursor <= cursor:
            self.events.popleft()
        batch = tuple(e for _, e in zip(range(limit), self.events, strict=False))
        next_cursor = batch[-1].cursor if batch else max(cursor, self.next_cursor - 1)
        return batch, next_cursor


class AgentState:
    def __init__(self, instances: Iterable[Instance] = (), events: EventQueue | None = None) -> None:
        self._instances: dict[uuid.UUID, Instance] = {i.instance_id: i for i in instances}
        self.events = events if events is not None else EventQueue()

    # --- reading -------------------------------------------------------------

    def get(self, instance_id: uuid.UUID) -> Instance:
        instance = self._instances.get(instance_id)
        if instance is None:
            raise Refused(Refusal.UNKNOWN_INSTANCE, f"no instance {instance_id}")
        return instance

    def find(self, instance_id: uuid.UUID) -> Instance | None:
        return self._instances.get(instance_id)

    def instances(self) -> tuple[Instance, ...]:
        return tuple(sorted(self._instances.values(), key=lambda i: i.instance_id.bytes))

    def page(self, after: uuid.UUID | None, limit: int) -> tuple[tuple[Instance, ...], bool]:
        """At most ``limit`` instances whose id sorts after ``after`` (by its 16 bytes; None: from the first),
        and whether more follow.  ``after`` need not name an instance that exists."""
        start = b"" if after is None else after.bytes
        rest = [i for i in self.instances() if i.instance_id.bytes > start]
        return tuple(rest[:limit]), len(rest) > limit

    def running(self) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances() if i.state is InstanceState.RUNNING)

    # --- lifecycle -----------------------------------------------------------

    @staticmethod
    def next_state(current: InstanceState | None, step: Step, instance_id: uuid.UUID) -> InstanceState:
        target = TRANSITIONS.get((current, step))
        if target is None:
            if step is Step.BEGIN_START:
                raise Refused(Refusal.INSTANCE_EXISTS, f"instance {instance_id} is {current.name if current else '?'}")
            if current is None:
                raise Refused(Refusal.UNKNOWN_INSTANCE, f"no instance {instance_id}")
            raise Refused(Refusal.INVALID_STATE, f"instance {instance_id} is {current.name}, cannot {step.value}")
        return target

    def check_start(self, instance_id: uuid.UUID) -> None:
        """Refuse a start before any resource is allocated for it."""
        existing = self._instances.get(instance_id)
        self.next_state(existing.state if existing else None, Step.BEGIN_START, instance_id)
        if existing is None and len(self._instances) >= MAX_INSTANCES and not self._forgettable():
            raise Refused(Refusal.TOO_MANY_INSTANCES, f"at most {MAX_INSTANCES} instances")

    def begin_start(self, instance: Instance) -> Instance:
        self.check_start(instance.instance_id)
        if instance.state is not InstanceState.STARTING:
            raise ValueError("a new instance record must be STARTING")
        if instance.instance_id not in self._instances and len(self._instances) >= MAX_INSTANCES:
            forget = self._forgettable()
            assert forget is not None  # check_start guaranteed it
            del self._instances[forget]
        self._instances[instance.instance_id] = instance
        return instance

    def step(self, instance_id: uuid.UUID, step: Step, **changes: object) -> Instance:
        current = self.get(instance_id)
        target = self.next_state(current.state, step, instance_id)
        if target not in HOLDS_RESOURCES:
            changes.update(host_cpus=(), volumes=(), vfs=(), vm=None)
        updated = replace(current, state=target, **changes)  # type: ignore[arg-type]
        self._instances[instance_id] = updated
        return updated

    def _forgettable(self) -> uuid.UUID | None:
        """The oldest-listed record that holds nothing, to make room for a new one."""
        return next((i.instance_id for i in self.instances() if i.state not in HOLDS_RESOURCES), None)

    # --- devices -------------------------------------------------------------

    def running_instance(self, instance_id: uuid.UUID) -> Instance:
        instance = self.get(instance_id)
        if instance.state is not InstanceState.RUNNING:
            raise Refused(Refusal.INVALID_STATE, f"instance {instance_id} is {instance.state.name}, not RUNNING")
        return instance

    def check_attach(self, instance_id: uuid.UUID, volume_id: uuid.UUID) -> Instance:
        instance = self.running_instance(instance_id)
        for other in self._instances.values():
            if other.volume(volume_id) is not None:
                raise Refused(Refusal.VOLUME_ALREADY_ATTACHED, f"volume {volume_id} is attached to {other.instance_id}")
        if len(instance.volumes) >= MAX_VOLUMES:
            raise Refused(Refusal.TOO_MANY_DEVICES, f"at most {MAX_VOLUMES} volumes per instance")
        return instance

    def attach(self, instance_id: uuid.UUID, volume: VolumeAttachment, vm: VmRecord | None) -> Instance:
        instance = self.check_attach(instance_id, volume.volume_id)
        volumes = tuple(sorted((*instance.volumes, volume), key=lambda v: v.volume_id.bytes))
        return self._put(replace(instance, volumes=volumes, vm=vm))

    def check_detach(self, instance_id: uuid.UUID, volume_id: uuid.UUID) -> Instance:
        instance = self.running_instance(instance_id)
        if instance.volume(volume_id) is None:
            raise Refused(Refusal.VOLUME_NOT_ATTACHED, f"volume {volume_id} is not attached to {instance_id}")
        return instance

    def detach(self, instance_id: uuid.UUID, volume_id: uuid.UUID, vm: VmRecord | None) -> Instance:
        instance = self.check_detach(instance_id, volume_id)
        volumes = tuple(v for v in instance.volumes if v.volume_id != volume_id)
        return self._put(replace(instance, volumes=volumes, vm=vm))

    def check_assign(self, instance_id: uuid.UUID, pf: PciAddress, mac: bytes, vlan: int) -> VfAttachment | None:
        """Refuse an assignment that cannot be made; return the VF already held if it is a repetition.

        An instance's VF on a physical function is named by its MAC: asking again
        for the same PF, MAC and VLAN (a retry whose answer was lost) names the
        VF the instance already holds, so the caller answers with it and changes
        nothing.  The same MAC on another VLAN is a conflict, not a second VF.
        """
        instance = self.running_instance(instance_id)
        held = instance.vf_with_mac(pf, mac)
        if held is not None:
            if held.vlan != vlan:
                raise Refused(Refusal.INVALID_STATE, f"{instance_id} holds VF {held.vf} of {pf} with this MAC on "
                                                     f"VLAN {held.vlan}; release it first")
            return held
        if len(instance.vfs) >= MAX_VFS:
            raise Refused(Refusal.TOO_MANY_DEVICES, f"at most {MAX_VFS} VFs per instance")
        return None

    def assign(self, instance_id: uuid.UUID, vf: VfAttachment, vm: VmRecord | None) -> Instance:
        if self.check_assign(instance_id, vf.pf, vf.mac, vf.vlan) is not None:
            raise Refused(Refusal.INVALID_STATE, f"{instance_id} already holds a VF of {vf.pf} with this MAC")
        instance = self.running_instance(instance_id)
        vfs = tuple(sorted((*instance.vfs, vf), key=lambda v: (v.vf.domain, v.vf.bus, v.vf.device, v.vf.function)))
        return self._put(replace(instance, vfs=vfs, vm=vm))

    def check_release(self, instance_id: uuid.UUID, address: PciAddress) -> VfAttachment:
        instance = self.running_instance(instance_id)
        vf = instance.vf(address)
        if vf is None:
            raise Refused(Refusal.VF_NOT_ASSIGNED, f"VF {address} is not assigned to {instance_id}")
        return vf

    def release(self, instance_id: uuid.UUID, address: PciAddress, vm: VmRecord | None) -> Instance:
        self.check_release(instance_id, address)
        instance = self.get(instance_id)
        return self._put(replace(instance, vfs=tuple(v for v in instance.vfs if v.vf != address), vm=vm))

    def set_vm(self, instance_id: uuid.UUID, vm: VmRecord | None) -> Instance:
        return self._put(replace(self.get(instance_id), vm=vm))

    def _put(self, instance: Instance) -> Instance:
        self._instances[instance.instance_id] = instance
        return instance
