"""The agent's service layer: one command in, one answer out (claims C2, C9, C10, C12, C14).

Theory of operation.  ``AgentService.handle`` receives a message that the
codec and the channel have already fully validated, dispatches it through a
closed table (no default branch), and returns exactly one answer message.
Every command is re-checked against the agent's own state and inventory
before anything changes (claim C2): lifecycle, resources, image, devices. A
refusal raises before the first change, so state is untouched.

Each command that changes state runs under one lock, in this order: check,
act (allocate, verify the image, drive the backend), record the result in
``AgentState``, queue the event, journal the whole state, answer. The journal
is written before the answer, so an acknowledged operation survives a crash
(claim C10). When an action fails half-way, what it did is undone in reverse
order before the error is answered (e.g. a VF hot-plug refused by the VMM
unbinds the VF and returns it to the pool).

VMs that end on their own (guest power-off, crash) are noticed by one watcher
task per VM, which takes the same lock and finishes the instance: resources
released, runtime directory scrubbed (claim C12), event queued for the
controller to pull (claim C5).

``recover`` runs once at start-up: it adopts VMs that a previous agent
process left running (live update), finishes interrupted starts and stops,
brings each adopted VM's devices back to the journal (a device command that
was never answered is undone or finished, see ``_reconcile_devices``), and
reports what it could not reconcile as RECONCILE_MISMATCH events.

Domain errors become wire error codes in exactly one place: ``_error_code``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import process
from .backend import (
    BackendError,
    BackendFailure,
    LaunchSpec,
    VmBackend,
    VmHandle,
    VolumeSpec,
    device_of,
    vf_device_id,
    volume_device_id,
)
from .images import ImageError, ImageFailure, PreparedImage
from .inventory import allocator as alloc
from .inventory import sriov
from .journal import Journal
from .scrub import scrub_tree
from .state import AgentState, Instance, Refusal, Refused, Step, VfAttachment, VolumeAttachment
from .wire import messages as m

log = logging.getLogger("passivisor.agent")

MAX_PENDING_SESSION_EVENTS = 16


class Images(Protocol):
    def prepare(self, digest: bytes, signature: bytes, dest_dir: Path) -> PreparedImage: ...


@dataclass
class Counters:
    """Counters the adapters bump and GET_METRICS reports."""

    frames_rejected: int = 0
    sessions_rejected: int = 0


class CommandFailed(Exception):
    """A command was refused or failed; ``code`` is what the controller is told."""

    def __init__(self, code: m.ErrorCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail


_REFUSAL_CODES = {
    Refusal.UNKNOWN_INSTANCE: m.ErrorCode.UNKNOWN_INSTANCE,
    Refusal.INSTANCE_EXISTS: m.ErrorCode.INSTANCE_EXISTS,
    Refusal.INVALID_STATE: m.ErrorCode.INVALID_STATE,
    Refusal.TOO_MANY_INSTANCES: m.ErrorCode.TOO_MANY_INSTANCES,
    Refusal.VOLUME_ALREADY_ATTACHED: m.ErrorCode.VOLUME_ALREADY_ATTACHED,
    Refusal.VOLUME_NOT_ATTACHED: m.ErrorCode.VOLUME_NOT_ATTACHED,
    Refusal.TOO_MANY_DEVICES: m.ErrorCode.TOO_MANY_DEVICES,
    Refusal.VF_NOT_ASSIGNED: m.ErrorCode.VF_NOT_ASSIGNED,
}

_BACKEND_CODES = {
    BackendFailure.LAUNCH_FAILED: m.ErrorCode.BACKEND_FAILURE,
    BackendFailure.DEVICE_REJECTED: m.ErrorCode.DEVICE_REJECTED,
    BackendFailure.TIMEOUT: m.ErrorCode.TIMEOUT,
    BackendFailure.GONE: m.ErrorCode.BACKEND_FAILURE,
    BackendFailure.MONITOR_FAILED: m.ErrorCode.BACKEND_FAILURE,
}


def _error_code(exc: Exception) -> m.ErrorCode | None:
    """The one mapping from domain and adapter errors to wire error codes."""
    match exc:
        case CommandFailed():
            return exc.code
        case Refused():
            return _REFUSAL_CODES[exc.refusal]
        case alloc.InsufficientCores() | alloc.VcpuCountNotMultipleOfSmtWidth() | alloc.InvalidVcpuCount():
            return m.ErrorCode.INSUFFICIENT_CORES
        case alloc.InsufficientMemory() | alloc.InvalidMemorySize():
            return m.ErrorCode.INSUFFICIENT_MEMORY
        case alloc.InstanceAlreadyAllocated():
            return m.ErrorCode.INSTANCE_EXISTS
        case ImageError():
            return m.ErrorCode.IMAGE_NOT_FOUND if exc.reason is ImageFailure.NOT_FOUND else m.ErrorCode.IMAGE_REJECTED
        case sriov.PfNotFound():
            return m.ErrorCode.PF_NOT_FOUND
        case sriov.NoFreeVf():
            return m.ErrorCode.NO_FREE_VF
        case sriov.VfNotAssigned():
            return m.ErrorCode.VF_NOT_ASSIGNED
        case sriov.VfBindError():
            return m.ErrorCode.DEVICE_REJECTED
        case BackendError():
            return _BACKEND_CODES[exc.failure]
    return None


@dataclass
class _Running:
    handle: VmHandle
    watcher: asyncio.Task[None] | None = None


@dataclass
class RecoveryReport:
    adopted: list[uuid.UUID] = field(default_factory=list)
    ended: list[uuid.UUID] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


class AgentService:
    def __init__(self, *, state: AgentState, journal: Journal, backend: VmBackend[Any], allocator: alloc.CoreAllocator,
                 vf_pool: sriov.VfPool, vf_binder: sriov.VfBinder, images: Images, volume_dir: Path,
                 runtime_root: Path, counters: Counters | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.journal = journal
        self.backend = backend
        self.allocator = allocator
        self.vf_pool = vf_pool
        self.vf_binder = vf_binder
        self.images = images
        self.volume_dir = volume_dir
        self.runtime_root = runtime_root
        self.counters = counters or Counters()
        self._clock = clock
        self._lock = asyncio.Lock()
        self._running: dict[uuid.UUID, _Running] = {}
        self._handlers: dict[type, Callable[[Any, Sequence[int]], Awaitable[m.Message]]] = {
            m.Ping: self._ping,
            m.StartInstance: self._start,
            m.StopInstance: self._stop,
            m.AttachVolume: self._attach_volume,
            m.DetachVolume: self._detach_volume,
            m.AssignVf: self._assign_vf,
            m.ReleaseVf: self._release_vf,
            m.DescribeInstance: self._describe,
            m.ListInstances: self._list,
            m.GetMetrics: self._metrics,
            m.GetEvents: self._events,
        }

    # --- the entry point -----------------------------------------------------

    async def handle(self, message: m.Message, fds: Sequence[int] = ()) -> m.Message:
        """Answer one command.  Never raises for a refused or failed command: that is an ERROR answer."""
        handler = self._handlers.get(type(message))
        if handler is None:
            return m.Error(m.ErrorCode.UNEXPECTED_MESSAGE)
        try:
            async with self._lock:
                return await handler(message, fds)
        except Exception as exc:
            code = _error_code(exc)
            if code is None:
                log.exception("command %s failed unexpectedly", type(message).__name__)
                return m.Error(m.ErrorCode.INTERNAL)
            log.info("command %s refused: %s", type(message).__name__, exc)
            return m.Error(code)

    # --- commands ------------------------------------------------------------

    async def _ping(self, ping: m.Ping, fds: Sequence[int]) -> m.Message:
        return m.Pong(ping.token)

    async def _start(self, cmd: m.StartInstance, fds: Sequence[int]) -> m.Message:
        self.state.check_start(cmd.instance_id)
        allocation = self.allocator.allocate(cmd.instance_id, cmd.vcpus, cmd.memory_mib)
        runtime_dir = self._runtime_dir(cmd.instance_id)
        try:
            scrub_tree(runtime_dir)  # leftovers of an earlier life of this id
            runtime_dir.mkdir(mode=0o700, parents=True)
            image = self.images.prepare(cmd.image_digest, cmd.image_signature, runtime_dir)
        except BaseException:
            self.allocator.release(cmd.instance_id)
            scrub_tree(runtime_dir)
            raise
        self.state.begin_start(Instance(cmd.instance_id, m.InstanceState.STARTING, cmd.vcpus, cmd.memory_mib,
                                        cmd.image_digest, allocation.cpus))
        self._save()  # STARTING is on disk before a VMM process exists: recovery can find strays
        spec = LaunchSpec(cmd.instance_id, cmd.vcpus, cmd.memory_mib, allocation.cpus, image.kernel, image.initrd,
                          image.cmdline, runtime_dir)
        try:
            handle = await self.backend.launch(spec)
        except BaseException as exc:
            self._end(cmd.instance_id, Step.LAUNCH_FAILED, m.EventKind.INSTANCE_FAILED, m.EventReason.NONE)
            self._save()
            raise exc
        instance = self.state.step(cmd.instance_id, Step.LAUNCHED, vm=handle.record)
        self._event(m.EventKind.INSTANCE_STARTED, cmd.instance_id, m.EventReason.REQUESTED)
        self._save()
        self._watch(cmd.instance_id, handle)
        return self._info(instance)

    async def _stop(self, cmd: m.StopInstance, fds: Sequence[int]) -> m.Message:
        instance = self.state.get(cmd.instance_id)
        self.state.next_state(instance.state, Step.BEGIN_STOP, cmd.instance_id)
        running = self._running[cmd.instance_id]
        self.state.step(cmd.instance_id, Step.BEGIN_STOP)
        self._save()
        started = self._clock()
        try:
            await self.backend.stop(running.handle, cmd.mode, float(cmd.timeout_s))
        except BaseException:
            self.state.step(cmd.instance_id, Step.STOP_FAILED)
            self._save()
            raise
        forced = cmd.mode is m.StopMode.FORCE or self._clock() - started >= cmd.timeout_s
        reason = m.EventReason.FORCED_AFTER_TIMEOUT if forced else m.EventReason.REQUESTED
        instance = self._end(cmd.instance_id, Step.EXITED, m.EventKind.INSTANCE_STOPPED, reason)
        self._save()
        return self._info(instance)

    async def _attach_volume(self, cmd: m.AttachVolume, fds: Sequence[int]) -> m.Message:
        self.state.check_attach(cmd.instance_id, cmd.volume_id)
        handle = self._running[cmd.instance_id].handle
        if cmd.source is m.VolumeSource.FILE:
            path = self.volume_dir / str(cmd.volume_id)
            if not path.is_file() or path.is_symlink():
                raise CommandFailed(m.ErrorCode.VOLUME_NOT_FOUND, f"no volume file {path.name}")
            spec = VolumeSpec(cmd.volume_id, cmd.read_only, path=path)
        else:
            if len(fds) != 1:  # the server checked this against the frame; kept as a guard
                raise CommandFailed(m.ErrorCode.MALFORMED_FRAME, "NBD_SOCKET needs exactly one descriptor")
            spec = VolumeSpec(cmd.volume_id, cmd.read_only, socket_fd=fds[0])
        await self.backend.attach_volume(handle, spec)
        self.state.attach(cmd.instance_id, VolumeAttachment(cmd.volume_id, cmd.source, cmd.read_only), handle.record)
        self._event(m.EventKind.VOLUME_ATTACHED, cmd.instance_id, m.EventReason.REQUESTED)
        self._save()
        return m.VolumeStatus(cmd.instance_id, cmd.volume_id, m.VolumeState.ATTACHED)

    async def _detach_volume(self, cmd: m.DetachVolume, fds: Sequence[int]) -> m.Message:
        self.state.check_detach(cmd.instance_id, cmd.volume_id)
        handle = self._running[cmd.instance_id].handle
        await self.backend.detach_volume(handle, cmd.volume_id)
        self.state.detach(cmd.instance_id, cmd.volume_id, handle.record)
        self._event(m.EventKind.VOLUME_DETACHED, cmd.instance_id, m.EventReason.REQUESTED)
        self._save()
        return m.VolumeStatus(cmd.instance_id, cmd.volume_id, m.VolumeState.DETACHED)

    async def _assign_vf(self, cmd: m.AssignVf, fds: Sequence[int]) -> m.Message:
        held = self.state.check_assign(cmd.instance_id, cmd.pf, cmd.mac, cmd.vlan)
        if held is not None:  # a repetition (a retry whose answer was lost): the same VF, nothing changes
            return m.VfStatus(cmd.instance_id, held.vf, held.index, m.VfState.ASSIGNED)
        handle = self._running[cmd.instance_id].handle
        vf = self.vf_pool.acquire(cmd.instance_id, cmd.pf)
        try:
            self.vf_binder.bind_vfio(vf.address)
            try:
                await self.backend.attach_vf(handle, vf.address)
            except BaseException:
                self.vf_binder.unbind_vfio(vf.address)
                raise
        except BaseException:
            self.vf_pool.release(cmd.instance_id, vf.address)
            raise
        # MAC and VLAN are recorded with the assignment.  Programming them on
        # the PF needs its driver's netlink interface, which the agent's
        # seccomp policy forbids (AF_UNIX only); see docs/claims.md (C6).
        attachment = VfAttachment(cmd.pf, vf.address, vf.index, cmd.mac, cmd.vlan)
        self.state.assign(cmd.instance_id, attachment, handle.record)
        self._event(m.EventKind.VF_ASSIGNED, cmd.instance_id, m.EventReason.REQUESTED)
        self._save()
        return m.VfStatus(cmd.instance_id, vf.address, vf.index, m.VfState.ASSIGNED)

    async def _release_vf(self, cmd: m.ReleaseVf, fds: Sequence[int]) -> m.Message:
        attachment = self.state.check_release(cmd.instance_id, cmd.vf)
        handle = self._running[cmd.instance_id].handle
        await self.backend.detach_vf(handle, cmd.vf)
        self.vf_binder.unbind_vfio(cmd.vf)
        self.vf_pool.release(cmd.instance_id, cmd.vf)
        self.state.release(cmd.instance_id, cmd.vf, handle.record)
        self._event(m.EventKind.VF_RELEASED, cmd.instance_id, m.EventReason.REQUESTED)
        self._save()
        return m.VfStatus(cmd.instance_id, cmd.vf, attachment.index, m.VfState.RELEASED)

    async def _describe(self, cmd: m.DescribeInstance, fds: Sequence[int]) -> m.Message:
        return self._info(self.state.get(cmd.instance_id))

    async def _list(self, cmd: m.ListInstances, fds: Sequence[int]) -> m.Message:
        # One page (docs/wire-format.md, LIST_INSTANCES): the instances whose id sorts after the cursor, in
        # the order INSTANCE_LIST requires.  The cursor need not name an instance that still exists, so a
        # walk goes on past an instance forgotten between two pages.
        page, more = self.state.page(cmd.after, m.MAX_LISTED_INSTANCES)
        return m.InstanceList(more, tuple(m.InstanceSummary(i.instance_id, i.state, i.vcpus, i.memory_mib)
                                          for i in page))

    async def _metrics(self, cmd: m.GetMetrics, fds: Sequence[int]) -> m.Message:
        cores = self.allocator.snapshot()
        vfs = self.vf_pool.snapshot()
        values = {
            m.MetricId.INSTANCES_RUNNING: len(self.state.running()),
            m.MetricId.CORES_TOTAL: cores.cores_total,
            m.MetricId.CORES_FREE: cores.cores_free,
            m.MetricId.MEMORY_TOTAL_MIB: cores.memory_total_mib,
            m.MetricId.MEMORY_FREE_MIB: cores.memory_free_mib,
            m.MetricId.VFS_TOTAL: vfs.vfs_total,
            m.MetricId.VFS_FREE: vfs.vfs_free,
            m.MetricId.FRAMES_REJECTED: self.counters.frames_rejected,
            m.MetricId.SESSIONS_REJECTED: self.counters.sessions_rejected,
            m.MetricId.EVENTS_PENDING: len(self.state.events.events),
        }
        return m.Metrics(tuple(m.MetricSample(metric, values[metric]) for metric in m.MetricId))

    async def _events(self, cmd: m.GetEvents, fds: Sequence[int]) -> m.Message:
        before = len(self.state.events.events)
        events, next_cursor = self.state.events.after(cmd.after, cmd.limit)
        if len(self.state.events.events) != before:
            self._save()  # acknowledged events are forgotten durably
        return m.Events(next_cursor, events)

    # --- host-level events from the adapters ---------------------------------

    def session_rejected(self, reason: m.EventReason) -> None:
        """The server refused or closed a session; queue the event for the next pull.

        The counter is always exact, but at most MAX_PENDING_SESSION_EVENTS such
        events wait in the queue: a flood of bad connections must not push
        unpulled instance events out of the bounded queue, nor cost a journal
        write (fsync) per connection.
        """
        self.counters.sessions_rejected += 1
        pending = sum(1 for e in self.state.events.events if e.kind is m.EventKind.SESSION_REJECTED)
        if pending >= MAX_PENDING_SESSION_EVENTS:
            return
        self._event(m.EventKind.SESSION_REJECTED, None, reason)
        self._save()

    # --- recovery (live update, claim C10) ------------------------------------

    async def recover(self) -> RecoveryReport:
        report = RecoveryReport()
        holding = [i for i in self.state.instances() if i.state in (m.InstanceState.STARTING,
                                                                   m.InstanceState.RUNNING,
                                                                   m.InstanceState.STOPPING)]
        self.allocator.restore(alloc.Allocation(i.instance_id, i.host_cpus, i.memory_mib) for i in holding)
        assignments = []
        for instance in holding:
            for attachment in instance.vfs:
                vf = sriov.Vf(attachment.pf, attachment.index, attachment.vf)
                assignments.append(sriov.VfAssignment(instance.instance_id, vf))
        self.vf_pool.restore(assignments)
        async with self._lock:
            for instance in holding:
                await self._recover_one(instance, report)
            self._event(m.EventKind.AGENT_RESTARTED, None, m.EventReason.ADOPTED)
            for _ in report.mismatches:
                self._event(m.EventKind.RECONCILE_MISMATCH, None, m.EventReason.LOST)
            self._save()
        return report

    async def _recover_one(self, instance: Instance, report: RecoveryReport) -> None:
        iid = instance.instance_id
        if instance.vm is None:
            # Interrupted start: the start was never acknowledged.  Kill any VMM
            # process that got as far as existing, then fail the instance.
            self._kill_strays(self._runtime_dir(iid))
            self._end(iid, Step.LAUNCH_FAILED, m.EventKind.INSTANCE_FAILED, m.EventReason.LOST)
            report.ended.append(iid)
            return
        try:
            handle = await self.backend.adopt(instance.vm)
        except BackendError as exc:
            log.warning("instance %s could not be adopted: %s", iid, exc)
            self._kill_strays(instance.vm.runtime_dir)
            step = Step.EXITED
            self._end(iid, step, m.EventKind.INSTANCE_EXITED, m.EventReason.LOST)
            report.ended.append(iid)
            return
        self._running[iid] = _Running(handle)
        if instance.state is m.InstanceState.RUNNING:
            await self._reconcile_devices(instance, handle)
        expected = {volume_device_id(v.volume_id) for v in self.state.get(iid).volumes}
        expected |= {vf_device_id(v.vf) for v in self.state.get(iid).vfs}
        actual = set(handle.record.devices)
        if expected != actual:
            report.mismatches.append(f"{iid}: journal has {sorted(expected)}, VMM has {sorted(actual)}")
        self.state.set_vm(iid, handle.record)
        if instance.state is m.InstanceState.STOPPING:
            await self.backend.stop(handle, m.StopMode.FORCE, 0.0)
            self._end(iid, Step.EXITED, m.EventKind.INSTANCE_STOPPED, m.EventReason.REQUESTED)
            report.ended.append(iid)
            return
        report.adopted.append(iid)
        self._watch(iid, handle)

    async def _reconcile_devices(self, instance: Instance, handle: VmHandle) -> None:
        """Bring the devices of an adopted, running VM back to what the journal says (claims C10, C12).

        Every device command changes the VMM (and, for a VF, sysfs) first and journals after, and the
        journal is written before the answer.  So the journal holds every acknowledged device change,
        and the VMM can be ahead of it only by the one command that was running when the previous agent
        died, which was never acknowledged.  A device the VMM has and the journal does not was being
        attached: it is unplugged, and a VF given back to its host driver, so that the controller's
        retry attaches it again.  A device the journal lists and the VMM no longer has was being
        detached: the detach is finished (a VF is also given back to its host driver and to the pool),
        so the retry is refused as not attached, like any repeated detach.  A device that cannot be
        unplugged stays, and the caller reports the difference as a mismatch.
        """
        iid = instance.instance_id
        volumes = {volume_device_id(v.volume_id): v for v in instance.volumes}
        vfs = {vf_device_id(v.vf): v for v in instance.vfs}
        for device in sorted(set(handle.record.devices) - volumes.keys() - vfs.keys()):
            try:
                target = device_of(device)
                if isinstance(target, uuid.UUID):
                    await self.backend.detach_volume(handle, target)
                else:
                    await self.backend.detach_vf(handle, target)
                    self.vf_binder.unbind_vfio(target)
            except (ValueError, BackendError, sriov.SriovError) as exc:
                log.warning("instance %s: cannot unplug %s, which the journal does not list: %s", iid, device, exc)
            else:
                log.warning("instance %s: unplugged %s, attached by a command that was never answered", iid, device)
        actual = set(handle.record.devices)
        for device, volume in volumes.items():
            if device not in actual:
                self.state.detach(iid, volume.volume_id, handle.record)
                log.warning("instance %s: finished the detach of %s, never answered", iid, device)
        for device, vf in vfs.items():
            if device not in actual:
                with contextlib.suppress(sriov.SriovError):
                    self.vf_binder.unbind_vfio(vf.vf)
                with contextlib.suppress(sriov.SriovError):
                    self.vf_pool.release(iid, vf.vf)
                self.state.release(iid, vf.vf, handle.record)
                log.warning("instance %s: finished the release of %s, never answered", iid, device)

    async def detach(self) -> None:
        """Let go of every VM without stopping it (the agent is being restarted or upgraded)."""
        for running in self._running.values():
            if running.watcher is not None:
                running.watcher.cancel()
        await self.backend.detach_monitors()
        self._running.clear()

    # --- helpers ---------------------------------------------------------------

    def _runtime_dir(self, instance_id: uuid.UUID) -> Path:
        return self.runtime_root / instance_id.hex

    def _watch(self, instance_id: uuid.UUID, handle: VmHandle) -> None:
        running = self._running.setdefault(instance_id, _Running(handle))
        running.handle = handle
        running.watcher = asyncio.get_running_loop().create_task(self._watch_exit(instance_id, handle))

    async def _watch_exit(self, instance_id: uuid.UUID, handle: VmHandle) -> None:
        info = await self.backend.wait_exit(handle)
        async with self._lock:
            instance = self.state.find(instance_id)
            vm = instance.vm if instance is not None else None
            same_process = vm is not None and (vm.pid, vm.pid_start_ticks) == (handle.record.pid,
                                                                              handle.record.pid_start_ticks)
            if instance is None or instance.state is not m.InstanceState.RUNNING or not same_process:
                return  # a stop in progress (or done) finishes the instance itself
            reason = m.EventReason.GUEST_POWEROFF if info.guest_poweroff else m.EventReason.PROCESS_EXITED
            self._end(instance_id, Step.EXITED, m.EventKind.INSTANCE_EXITED, reason)
            self._save()

    def _end(self, instance_id: uuid.UUID, step: Step, kind: m.EventKind, reason: m.EventReason) -> Instance:
        """Finish an instance: give back cores, VFs and memory, scrub its files, queue the event."""
        before = self.state.get(instance_id)
        for attachment in before.vfs:
            with contextlib.suppress(sriov.SriovError):
                self.vf_binder.unbind_vfio(attachment.vf)
            with contextlib.suppress(sriov.SriovError):
                self.vf_pool.release(instance_id, attachment.vf)
        with contextlib.suppress(alloc.InstanceNotAllocated):
            self.allocator.release(instance_id)
        instance = self.state.step(instance_id, step)
        running = self._running.pop(instance_id, None)
        if running is not None and running.watcher is not None and running.watcher is not asyncio.current_task():
            running.watcher.cancel()
        scrub_tree(self._runtime_dir(instance_id))
        self._event(kind, instance_id, reason)
        return instance

    def _kill_strays(self, runtime_dir: Path) -> None:
        marker = str(runtime_dir).encode()
        for pid in process.find_by_argument(marker):
            ticks = process.start_ticks(pid)
            if ticks is not None and process.kill(pid, ticks, signal.SIGKILL):
                log.warning("killed stray VMM process %d of %s", pid, runtime_dir.name)

    def _event(self, kind: m.EventKind, instance_id: uuid.UUID | None, reason: m.EventReason) -> None:
        self.state.events.append(int(self._clock() * 1000), kind, instance_id, reason)

    def _save(self) -> None:
        self.journal.save(self.state)

    @staticmethod
    def _info(instance: Instance) -> m.InstanceInfo:
        return m.InstanceInfo(instance.instance_id, instance.state, instance.vcpus, instance.memory_mib,
                              instance.image_digest, tuple(sorted(instance.host_cpus)),
                              tuple(v.volume_id for v in instance.volumes), tuple(v.vf for v in instance.vfs))

