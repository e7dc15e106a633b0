"""Crash-safe journal of the agent state (claim C10).

Theory of operation.  The whole state (instances with the resources they
hold, the VMM records needed to adopt running VMs, and the event queue) is
small, so it is written whole after every change: to a temporary file in the
same directory, fsync'd, renamed over ``state.json``, and the directory is
fsync'd.  rename(2) is atomic, so after a crash the file holds either the old
or the new state, never a mix.  The service layer writes the journal before
it answers, so an acknowledged operation is always on disk.

Reading is strict: unknown or missing keys, wrong types and out-of-range
values raise :class:`JournalError` rather than being guessed at; the agent
then refuses to start and says why (a corrupt journal needs an operator, not
a silent reset that would forget running VMs).

Only ``state.py`` types cross this module; allocations are not stored
separately because they are derived from the instances (``host_cpus``, VFs).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from .backend import VmRecord
from .state import MAX_EVENTS, MAX_INSTANCES, AgentState, EventQueue, Instance, VfAttachment, VolumeAttachment
from .wire.messages import Event, EventKind, EventReason, InstanceState, PciAddress, VolumeSource

FORMAT = "passivisor-agent-journal/v1"
# The largest state the agent can hold is MAX_INSTANCES (1024) records, each with 16 volumes, 8 VFs and
# their device ids, plus MAX_EVENTS events: about 4.5 MiB (tests/hostagent/test_journal.py builds it).
# The cap leaves room above that, so a full host always restarts (C10), and still bounds the read.
MAX_JOURNAL_BYTES = 16 << 20


class JournalError(Exception):
    """The journal cannot be read; the message says where."""


def _pci(address: PciAddress) -> str:
    return str(address)


def _parse_pci(text: object) -> PciAddress:
    if not isinstance(text, str) or len(text) != 12 or text[4] != ":" or text[7] != ":" or text[10] != ".":
        raise JournalError(f"bad PCI address {text!r}")
    try:
        address = PciAddress(int(text[0:4], 16), int(text[5:7], 16), int(text[8:10], 16), int(text[11], 16))
    except ValueError:
        raise JournalError(f"bad PCI address {text!r}") from None
    if address.device > 31 or address.function > 7 or str(address) != text:
        raise JournalError(f"bad PCI address {text!r}")
    return address


def _instance_to_json(instance: Instance) -> dict[str, Any]:
    vm = instance.vm
    return {
        "instance_id": str(instance.instance_id),
        "state": instance.state.name,
        "vcpus": instance.vcpus,
        "memory_mib": instance.memory_mib,
        "image_digest": instance.image_digest.hex(),
        "host_cpus": list(instance.host_cpus),
        "volumes": [{"volume_id": str(v.volume_id), "source": v.source.name, "read_only": v.read_only}
                    for v in instance.volumes],
        "vfs": [{"pf": _pci(v.pf), "vf": _pci(v.vf), "index": v.index, "mac": v.mac.hex(), "vlan": v.vlan}
                for v in instance.vfs],
        "vm": None if vm is None else {
            "pid": vm.pid,
            "pid_start_ticks": vm.pid_start_ticks,
            "runtime_dir": str(vm.runtime_dir),
            "monitor": None if vm.monitor is None else str(vm.monitor),
            "devices": list(vm.devices),
        },
    }


def _event_to_json(event: Event) -> dict[str, Any]:
    return {
        "cursor": event.cursor,
        "time_ms": event.time_ms,
        "kind": event.kind.name,
        "instance_id": None if event.instance_id is None else str(event.instance_id),
        "reason": event.reason.name,
    }


def dumps(state: AgentState) -> bytes:
    document = {
        "format": FORMAT,
        "instances": [_instance_to_json(i) for i in state.instances()],
        "events": {
            "next_cursor": state.events.next_cursor,
            "dropped": state.events.dropped,
            "queue": [_event_to_json(e) for e in state.events.events],
        },
    }
    return json.dumps(document, sort_keys=True, indent=1).encode()


class _Reader:
    """Typed access to a parsed JSON object; every mistake is a JournalError naming the path."""

    def __init__(self, value: object, path: str) -> None:
        self.path = path
        if not isinstance(value, dict):
            raise JournalError(f"{path}: expected an object")
        self.value: dict[str, object] = value

    def keys(self, *names: str) -> _Reader:
        if set(self.value) != set(names):
            raise JournalError(f"{self.path}: keys {sorted(self.value)} != {sorted(names)}")
        return self

    def integer(self, name: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
        value = self.value[name]
        if type(value) is not int or not lo <= value <= hi:
            raise JournalError(f"{self.path}.{name}: expected an integer in [{lo}, {hi}]")
        return value

    def boolean(self, name: str) -> bool:
        value = self.value[name]
        if type(value) is not bool:
            raise JournalError(f"{self.path}.{name}: expected a boolean")
        return value

    def string(self, name: str) -> str:
        value = self.value[name]
        if not isinstance(value, str):
            raise JournalError(f"{self.path}.{name}: expected a string")
        return value

    def optional_string(self, name: str) -> str | None:
        return None if self.value[name] is None else self.string(name)

    def array(self, name: str) -> list[object]:
        value = self.value[name]
        if not isinstance(value, list):
            raise JournalError(f"{self.path}.{name}: expected a list")
        return value

    def identifier(self, name: str) -> uuid.UUID:
        text = self.string(name)
        try:
            value = uuid.UUID(text)
        except ValueError:
            raise JournalError(f"{self.path}.{name}: bad UUID") from None
        if str(value) != text:
            raise JournalError(f"{self.path}.{name}: UUID not in canonical form")
        return value

    def hexbytes(self, name: str, size: int) -> bytes:
        text = self.string(name)
        try:
            value = bytes.fromhex(text)
        except ValueError:
            raise JournalError(f"{self.path}.{name}: bad hex") from None
        if len(value) != size or value.hex() != text:
            raise JournalError(f"{self.path}.{name}: expected {size} bytes of lowercase hex")
        return value

    def enum(self, name: str, enum_type: Any) -> Any:
        text = self.string(name)
        if text not in enum_type.__members__:
            raise JournalError(f"{self.path}.{name}: unknown {enum_type.__name__} {text!r}")
        return enum_type[text]


def _instance_from_json(raw: object, path: str) -> Instance:
    r = _Reader(raw, path).keys("instance_id", "state", "vcpus", "memory_mib", "image_digest", "host_cpus",
                                "volumes", "vfs", "vm")
    host_cpus = []
    for index, cpu in enumerate(r.array("host_cpus")):
        if type(cpu) is not int or not 0 <= cpu <= 4095:
            raise JournalError(f"{path}.host_cpus[{index}]: expected a CPU number")
        host_cpus.append(cpu)
    volumes = []
    for index, item in enumerate(r.array("volumes")):
        v = _Reader(item, f"{path}.volumes[{index}]").keys("volume_id", "source", "read_only")
        volumes.append(VolumeAttachment(v.identifier("volume_id"), v.enum("source", VolumeSource),
                                        v.boolean("read_only")))
    vfs = []
    for index, item in enumerate(r.array("vfs")):
        v = _Reader(item, f"{path}.vfs[{index}]").keys("pf", "vf", "index", "mac", "vlan")
        vfs.append(VfAttachment(_parse_pci(v.value["pf"]), _parse_pci(v.value["vf"]), v.integer("index", 0, 255),
                                v.hexbytes("mac", 6), v.integer("vlan", 0, 4095)))
    vm = None
    if r.value["vm"] is not None:
        v = _Reader(r.value["vm"], f"{path}.vm").keys("pid", "pid_start_ticks", "runtime_dir", "monitor", "devices")
        devices = v.array("devices")
        if not all(isinstance(d, str) for d in devices):
            raise JournalError(f"{path}.vm.devices: expected strings")
        monitor = v.optional_string("monitor")
        vm = VmRecord(r.identifier("instance_id"), v.integer("pid", 1), v.integer("pid_start_ticks"),
                      Path(v.string("runtime_dir")),
                      None if monitor is None else Path(monitor), tuple(str(d) for d in devices))
    return Instance(r.identifier("instance_id"), r.enum("state", InstanceState), r.integer("vcpus", 1, 128),
                    r.integer("memory_mib", 1, 1 << 20), r.hexbytes("image_digest", 32), tuple(host_cpus),
                    tuple(volumes), tuple(vfs), vm)


def _event_from_json(raw: object, path: str) -> Event:
    r = _Reader(raw, path).keys("cursor", "time_ms", "kind", "instance_id", "reason")
    instance_id = None if r.value["instance_id"] is None else r.identifier("instance_id")
    return Event(r.integer("cursor", 1), r.integer("time_ms"), r.enum("kind", EventKind), instance_id,
                 r.enum("reason", EventReason))


def loads(data: bytes) -> AgentState:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JournalError(f"not valid JSON: {exc}") from None
    top = _Reader(document, "journal").keys("format", "instances", "events")
    if top.string("format") != FORMAT:
        raise JournalError(f"journal: unknown format {top.string('format')!r}")
    instances = [_instance_from_json(item, f"instances[{i}]") for i, item in enumerate(top.array("instances"))]
    if len({i.instance_id for i in instances}) != len(instances):
        raise JournalError("instances: duplicate instance id")
    if len(instances) > MAX_INSTANCES:
        raise JournalError(f"instances: more than {MAX_INSTANCES}")
    ev = _Reader(top.value["events"], "events").keys("next_cursor", "dropped", "queue")
    queue = [_event_from_json(item, f"events.queue[{i}]") for i, item in enumerate(ev.array("queue"))]
    if len(queue) > MAX_EVENTS:
        raise JournalError("events.queue: too many events")
    next_cursor = ev.integer("next_cursor", 1)
    cursors = [e.cursor for e in queue]
    if cursors != sorted(set(cursors)) or (cursors and cursors[-1] >= next_cursor):
        raise JournalError("events.queue: cursors out of order")
    events = EventQueue(next_cursor, ev.integer("dropped"), deque(queue))
    return AgentState(instances, events)


class Journal:
    """The state file in ``directory``; ``load`` and ``save`` are the only I/O."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"

    def load(self) -> AgentState:
        """The journaled state, or an empty one when there is no journal yet."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return AgentState()
        except OSError as exc:  # ELOOP for a symlink, EACCES, ...
            raise JournalError(f"cannot open {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as file:
            data = file.read(MAX_JOURNAL_BYTES + 1)
        if len(data) > MAX_JOURNAL_BYTES:
            raise JournalError(f"{self.path} is larger than {MAX_JOURNAL_BYTES} bytes")
        try:
            return loads(data)
        except JournalError as exc:
            raise JournalError(f"{self.path}: {exc}") from None

    def save(self, state: AgentState) -> None:
        data = dumps(state)
        temporary = self.directory / f".state.json.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
