"""The interface between the agent's service layer and a VMM backend.

Two implementations exist: ``backends.qemu`` (real QEMU processes driven over
QMP) and ``backends.sim`` (in-process, for fast tests and hosts without QEMU).
Both honour the same contract, including the failure modes, so the service
layer cannot tell them apart except by speed.

Contract:
- ``launch`` returns only once the VMM answers on its monitor (QMP ready); on
  failure it leaves no process and no runtime file behind.
- Device operations either complete or raise :class:`BackendError` with the
  device absent, never half-plugged.
- ``wait_exit`` completes when the VM process ends for any reason, including a
  guest power-off or a crash; the service layer turns that into an event.
- ``detach_monitors`` drops the agent's connections to running VMs without
  stopping them (live update, claim C10); ``adopt`` reconnects to a VM that a
  previous agent process started, using the record it journaled.
- The agent never initiates a connection (claim C1): a backend creates its
  monitor channel itself (a socket the agent listens on, or a socketpair).
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from .wire.messages import PciAddress, StopMode


def volume_device_id(volume_id: uuid.UUID) -> str:
    """The VMM device id of a volume; part of the contract so that recovery can compare."""
    return f"vol-{volume_id.hex}"


def vf_device_id(vf: PciAddress) -> str:
    """The VMM device id of an assigned VF."""
    return f"vf-{vf.domain:04x}-{vf.bus:02x}-{vf.device:02x}-{vf.function:x}"


_VOLUME_DEVICE = re.compile(r"vol-([0-9a-f]{32})")
_VF_DEVICE = re.compile(r"vf-([0-9a-f]{4})-([0-9a-f]{2})-([0-9a-f]{2})-([0-7])")


def device_of(device_id: str) -> uuid.UUID | PciAddress:
    """What a device id of :func:`volume_device_id` or :func:`vf_device_id` names; ValueError for anything else.

    Recovery uses it to unplug a device that the VMM reports and the journal does not list.
    """
    if found := _VOLUME_DEVICE.fullmatch(device_id):
        return uuid.UUID(hex=found.group(1))
    if found := _VF_DEVICE.fullmatch(device_id):
        return PciAddress(*(int(group, 16) for group in found.groups()))
    raise ValueError(f"not a managed device id: {device_id[:64]!r}")


class BackendFailure(enum.Enum):
    LAUNCH_FAILED = "launch_failed"
    DEVICE_REJECTED = "device_rejected"  # the VMM refused a device (e.g. no VFIO here)
    TIMEOUT = "timeout"
    GONE = "gone"  # the VM process is not running (any more)
    MONITOR_FAILED = "monitor_failed"  # the monitor spoke nonsense or went away


class BackendError(Exception):
    def __init__(self, failure: BackendFailure, detail: str) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.detail = detail


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one VM; every value was validated by the agent."""

    instance_id: uuid.UUID
    vcpus: int
    memory_mib: int
    host_cpus: tuple[int, ...]  # one per vCPU, whole physical cores (claim C9)
    kernel: Path  # verified image parts (claim C14)
    initrd: Path
    cmdline: str
    runtime_dir: Path  # private to this instance; scrubbed when it ends (claim C12)


@dataclass(frozen=True)
class VmRecord:
    """What the agent journals about a running VM so that a new agent process can adopt it."""

    instance_id: uuid.UUID
    pid: int
    pid_start_ticks: int  # field 22 of /proc/PID/stat: tells a reused pid apart
    runtime_dir: Path
    monitor: Path | None = None  # socket the VMM's monitor connects to, if any
    devices: tuple[str, ...] = field(default=())  # ids (volume_device_id, vf_device_id) currently plugged


@dataclass(frozen=True)
class VolumeSpec:
    volume_id: uuid.UUID
    read_only: bool
    path: Path | None = None  # a raw file (VolumeSource.FILE)
    socket_fd: int | None = None  # a connected NBD socket (VolumeSource.NBD_SOCKET)


@dataclass(frozen=True)
class ExitInfo:
    instance_id: uuid.UUID
    requested: bool  # the agent asked for it (stop), as opposed to a guest power-off or crash
    guest_poweroff: bool


class VmHandle(Protocol):
    @property
    def record(self) -> VmRecord: ...


Handle = TypeVar("Handle", bound=VmHandle)


class VmBackend(Protocol[Handle]):
    """A backend is generic over its own handle type; the service only passes handles back."""

    name: str

    async def launch(self, spec: LaunchSpec) -> Handle: ...

    async def adopt(self, record: VmRecord) -> Handle: ...

    async def stop(self, handle: Handle, mode: StopMode, timeout_s: float) -> None: ...

    async def attach_volume(self, handle: Handle, volume: VolumeSpec) -> None: ...

    async def detach_volume(self, handle: Handle, volume_id: uuid.UUID) -> None: ...

    async def attach_vf(self, handle: Handle, vf: PciAddress) -> None: ...

    async def detach_vf(self, handle: Handle, vf: PciAddress) -> None: ...

    async def wait_exit(self, handle: Handle) -> ExitInfo: ...

    async def detach_monitors(self) -> None: ...
