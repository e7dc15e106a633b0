"""The sim backend: the VmBackend contract without QEMU, for fast tests and hosts without it.

Theory of operation.  Each "VM" is a real, tiny process (``sleep infinity``)
in its own session, so the parts of the contract that are about processes
behave exactly as with QEMU: the VM survives a SIGKILL of the agent, exit is
observed through a pidfd, and a new agent adopts it by (pid, start ticks).
The devices are simulated: their ids are kept in ``devices.json`` in the
VM's runtime directory, so an adopting agent sees the same devices.

Failure modes match the QEMU backend on this host: a VF hot-plug is refused
(no VFIO hardware) unless ``vfio_available`` is set, plugging a device id
twice or a missing volume file is refused, and a stop that times out ends in
SIGKILL.  The sim never stands in for an end-to-end test that needs a guest.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import uuid
from dataclasses import dataclass, field, replace

from .. import process
from ..backend import (
    BackendError,
    BackendFailure,
    ExitInfo,
    LaunchSpec,
    VmRecord,
    VolumeSpec,
    vf_device_id,
    volume_device_id,
)
from ..wire.messages import PciAddress, StopMode

READY_LINE = "PASSIVISOR-GUEST-READY"


@dataclass
class SimVm:
    record: VmRecord
    stop_requested: bool = False
    held_fds: dict[str, int] = field(default_factory=dict)


class SimBackend:
    name = "sim"

    def __init__(self, *, vfio_available: bool = False, sleep_binary: str = "/bin/sleep") -> None:
        self.vfio_available = vfio_available
        self.sleep_binary = sleep_binary

    async def launch(self, spec: LaunchSpec) -> SimVm:
        spec.runtime_dir.mkdir(mode=0o700, exist_ok=True)
        # argv[0] names the runtime directory, as QEMU's argv does, so that
        # recovery can find a VM that was spawned but never journaled.
        child = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [f"passivisor-sim-vm:{spec.runtime_dir}", "infinity"], executable=self.sleep_binary,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        ticks = process.start_ticks(child.pid)
        if ticks is None:
            child.wait()
            raise BackendError(BackendFailure.LAUNCH_FAILED, "the sim VM process exited at once")
        vm = SimVm(VmRecord(spec.instance_id, child.pid, ticks, spec.runtime_dir))
        self._save_devices(vm)
        (spec.runtime_dir / "console.log").write_text(f"{READY_LINE}\n")
        return vm

    async def adopt(self, record: VmRecord) -> SimVm:
        if not process.is_same_process(record.pid, record.pid_start_ticks):
            raise BackendError(BackendFailure.GONE, f"process {record.pid} is not running")
        try:
            devices = json.loads((record.runtime_dir / "devices.json").read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(BackendFailure.MONITOR_FAILED, f"cannot read device list: {exc}") from None
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise BackendError(BackendFailure.MONITOR_FAILED, "device list is malformed")
        return SimVm(replace(record, devices=tuple(devices)))

    async def stop(self, handle: SimVm, mode: StopMode, timeout_s: float) -> None:
        handle.stop_requested = True
        record = handle.record
        first = signal.SIGTERM if mode is StopMode.GRACEFUL else signal.SIGKILL
        if not process.kill(record.pid, record.pid_start_ticks, first):
            return  # already gone
        try:
            await asyncio.wait_for(process.wait_exit(record.pid), timeout_s if mode is StopMode.GRACEFUL else 5)
        except TimeoutError:
            process.kill(record.pid, record.pid_start_ticks, signal.SIGKILL)
            await process.wait_exit(record.pid)
        self._close_fds(handle)

    async def attach_volume(self, handle: SimVm, volume: VolumeSpec) -> None:
        device = volume_device_id(volume.volume_id)
        self._check_running(handle)
        self._check_absent(handle, device)
        if volume.path is not None and not volume.path.is_file():
            raise BackendError(BackendFailure.DEVICE_REJECTED, f"volume file for {volume.volume_id} does not exist")
        if volume.socket_fd is not None:
            if not stat.S_ISSOCK(os.fstat(volume.socket_fd).st_mode):
                raise BackendError(BackendFailure.DEVICE_REJECTED, "the volume descriptor is not a socket")
            handle.held_fds[device] = os.dup(volume.socket_fd)  # as QEMU keeps it after getfd
        self._plug(handle, device)

    async def detach_volume(self, handle: SimVm, volume_id: uuid.UUID) -> None:
        device = volume_device_id(volume_id)
        self._check_running(handle)
        self._unplug(handle, device)
        fd = handle.held_fds.pop(device, None)
        if fd is not None:
            os.close(fd)

    async def attach_vf(self, handle: SimVm, vf: PciAddress) -> None:
        device = vf_device_id(vf)
        self._check_running(handle)
        self._check_absent(handle, device)
        if not self.vfio_available:
            raise BackendError(BackendFailure.DEVICE_REJECTED, f"vfio-pci {vf}: no VFIO device on this host (sim)")
        self._plug(handle, device)

    async def detach_vf(self, handle: SimVm, vf: PciAddress) -> None:
        self._check_running(handle)
        self._unplug(handle, vf_device_id(vf))

    async def wait_exit(self, handle: SimVm) -> ExitInfo:
        await process.wait_exit(handle.record.pid)
        self._close_fds(handle)
        return ExitInfo(handle.record.instance_id, requested=handle.stop_requested,
                        guest_poweroff=not handle.stop_requested)

    async def detach_monitors(self) -> None:
        """Nothing to detach: the sim has no monitor connections."""

    def power_off_guest(self, handle: SimVm) -> None:
        """Test hook: the guest powers itself off (an exit the agent did not ask for)."""
        process.kill(handle.record.pid, handle.record.pid_start_ticks, signal.SIGTERM)

    # --- helpers -------------------------------------------------------------

    def _check_running(self, handle: SimVm) -> None:
        if not process.is_same_process(handle.record.pid, handle.record.pid_start_ticks):
            raise BackendError(BackendFailure.GONE, f"instance {handle.record.instance_id} is not running")

    @staticmethod
    def _check_absent(handle: SimVm, device: str) -> None:
        if device in handle.record.devices:
            raise BackendError(BackendFailure.DEVICE_REJECTED, f"duplicate device id {device}")

    def _plug(self, handle: SimVm, device: str) -> None:
        handle.record = replace(handle.record, devices=(*handle.record.devices, device))
        self._save_devices(handle)

    def _unplug(self, handle: SimVm, device: str) -> None:
        if device not in handle.record.devices:
            raise BackendError(BackendFailure.DEVICE_REJECTED, f"no device {device}")
        handle.record = replace(handle.record, devices=tuple(d for d in handle.record.devices if d != device))
        self._save_devices(handle)

    @staticmethod
    def _save_devices(handle: SimVm) -> None:
        path = handle.record.runtime_dir / "devices.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(list(handle.record.devices)))
        os.replace(temporary, path)

    @staticmethod
    def _close_fds(handle: SimVm) -> None:
        for fd in handle.held_fds.values():
            os.close(fd)
        handle.held_fds.clear()
