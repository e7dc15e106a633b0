"""QemuBackend's own logic without QEMU: device plumbing, rollback, error mapping, stop and exit.

The VM process is a real ``sleep`` in its own session (so pidfds, reaping and pinning are real); the
monitor is a :class:`FakeMonitor` that models the few QMP commands the backend uses over a tiny
device tree. Every rejection path checks that the VM's state did not change.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import process
from hostagent.backend import BackendError, BackendFailure, LaunchSpec, VmRecord, VolumeSpec, volume_device_id
from hostagent.backends.qemu import _CHILDREN, QemuBackend, QemuVm, VmState
from hostagent.backends.qemu_cmdline import RuntimePaths, volume_node_name
from hostagent.backends.qmp import CommandFailed, MonitorClosed, MonitorProtocolError, MonitorTimeout
from hostagent.wire.messages import PciAddress, StopMode

VF = PciAddress(0, 0x3B, 0, 1)


class FakeMonitor:
    """The QMP commands the backend uses, over a model of QEMU's peripheral tree and block nodes."""

    def __init__(self, vm: QemuVm, ports: int = 8) -> None:
        self.vm = vm
        self.ports = ports
        self.is_open = True
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.peripheral: dict[str, str] = {}  # qdev id -> root port
        self.nodes: set[str] = set()
        self.refuse: dict[str, CommandFailed] = {}
        self.fdsets: dict[int, tuple[int, int]] = {}  # fdset id -> (inode, access mode) of the passed file
        self.opened: list[tuple[int, int]] = []  # what each blockdev-add over an fdset opened
        self.guest_releases = True
        self.on: dict[str, Callable[[dict[str, Any]], Any]] = {}

    async def execute(self, command: str, arguments: Any = None, *, timeout: float) -> Any:
        args = dict(arguments or {})
        self.calls.append((command, args))
        if command in self.refuse:
            raise self.refuse[command]
        if command in self.on:
            result = self.on[command](args)
            return await result if isinstance(result, Awaitable) else result
        if command == "qom-list":
            names = [*(f"rp{i}" for i in range(self.ports)), *self.peripheral]
            return [{"name": "type", "type": "string"}] + [{"name": name, "type": "child<x>"} for name in names]
        if command == "qom-get":
            name = args["path"].rsplit("/", 1)[1]
            return f"/machine/peripheral/{self.peripheral[name]}/{self.peripheral[name]}"
        if command == "blockdev-add":
            filename = args["file"].get("filename", "")
            if filename.startswith("/dev/fdset/"):  # a KeyError here is QEMU's "no such fdset"
                self.opened.append(self.fdsets[int(filename.removeprefix("/dev/fdset/"))])
            self.nodes.add(args["node-name"])
        elif command == "blockdev-del":
            self.nodes.remove(args["node-name"])
        elif command == "device_add":
            self.peripheral[args["id"]] = args["bus"]
        elif command == "device_del":
            if args["id"] not in self.peripheral:
                raise CommandFailed("device_del", "DeviceNotFound", f"Device '{args['id']}' not found")
            if self.guest_releases:
                asyncio.get_running_loop().call_later(0.01, self.release, args["id"])
        elif command == "remove-fd":
            del self.fdsets[args["fdset-id"]]
        elif command == "query-named-block-nodes":
            return [{"node-name": n} for n in sorted(self.nodes)] + [{"node-name": "#block123"}]
        return {}

    def release(self, device: str) -> None:
        """The guest lets go of ``device``: QEMU removes it and says so (DEVICE_DELETED)."""
        self.peripheral.pop(device, None)
        self.vm.on_event("DEVICE_DELETED", {"device": device, "path": f"/machine/peripheral/{device}"})

    async def pass_fd(self, fd: int, fdname: str, *, timeout: float) -> None:
        self.calls.append(("pass_fd", {"fdname": fdname}))

    async def add_fd(self, fd: int, opaque: str, *, timeout: float) -> int:
        self.calls.append(("add_fd", {"opaque": opaque}))
        if "add_fd" in self.refuse:
            raise self.refuse["add_fd"]
        fdset = len(self.fdsets) + 100
        self.fdsets[fdset] = os.fstat(fd).st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        return fdset

    def tap(self, names: Any, callback: Any) -> None:
        pass

    async def wait_closed(self, timeout: float) -> bool:
        return True

    async def close(self) -> None:
        self.is_open = False

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls]


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    path = tmp_path / "vm"
    path.mkdir()
    (path / "console.log").write_bytes(b"guest output\n")
    return path


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield child
    if child.poll() is None:
        child.kill()
        child.wait()


Scenario = Callable[[QemuBackend, QemuVm, FakeMonitor], Awaitable[None]]


def run_with_vm(runtime_dir: Path, child: subprocess.Popen[bytes], scenario: Scenario, **options: Any) -> None:
    async def main() -> None:
        backend = QemuBackend("qemu-system-x86_64", "tcg", **options)
        ticks = process.start_ticks(child.pid)
        assert ticks is not None
        _CHILDREN[child.pid] = child  # as launch registers the QEMU it starts
        vm = QemuVm(uuid.uuid4(), child.pid, ticks, RuntimePaths.for_dir(runtime_dir), os.pidfd_open(child.pid))
        monitor = FakeMonitor(vm, backend.options.hotplug_ports)
        vm.monitor = monitor  # type: ignore[assignment]
        vm.state = VmState.RUNNING
        backend._vms.add(vm)
        vm.spawn(backend._watch_exit(vm), "exit")
        try:
            await scenario(backend, vm, monitor)
        finally:
            if vm.state is not VmState.EXITED:
                vm.kill()
                await vm.wait_ended(5)
            _CHILDREN.pop(child.pid, None)

    asyncio.run(main())


def raw_file(tmp_path: Path) -> Path:
    path = tmp_path / "vol.raw"
    path.write_bytes(bytes(4096))
    return path


# --- volumes -----------------------------------------------------------------------------


def test_attach_plugs_a_raw_file_on_the_first_free_port(runtime_dir: Path, sleeper: Any, tmp_path: Path) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()

    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        await backend.attach_volume(vm, VolumeSpec(a, read_only=True, path=raw_file(tmp_path)))
        await backend.attach_volume(vm, VolumeSpec(b, read_only=False, path=raw_file(tmp_path)))
        assert vm.record.devices == (volume_device_id(a), volume_device_id(b))
        assert monitor.peripheral == {volume_device_id(a): "rp0", volume_device_id(b): "rp1"}
        blockdev = next(args for c, args in monitor.calls if c == "blockdev-add")
        # QEMU opens the file through an fdset, never by its path (C15).
        assert blockdev == {"driver": "raw", "node-name": volume_node_name(a), "read-only": True,
                            "file": {"driver": "file", "filename": "/dev/fdset/100"}}  # fmt: skip
        inode = os.stat(tmp_path / "vol.raw").st_ino
        assert monitor.opened == [(inode, os.O_RDONLY), (inode, os.O_RDWR)]  # the access mode QEMU asks for
        assert monitor.fdsets == {}  # removed once opened: only the block nodes hold the file
        assert monitor.commands()[:6] == ["qom-list", "add_fd", "blockdev-add", "remove-fd", "device_add",
                                          "qom-list"]  # fmt: skip
        device = next(args for c, args in monitor.calls if c == "device_add")
        assert device == {"driver": "virtio-blk-pci", "id": volume_device_id(a), "drive": volume_node_name(a),
                          "bus": "rp0", "serial": a.hex[:20]}  # fmt: skip

    run_with_vm(runtime_dir, sleeper, scenario)


def test_a_refused_device_add_rolls_back_the_block_node(runtime_dir: Path, sleeper: Any, tmp_path: Path) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        monitor.refuse["device_add"] = CommandFailed("device_add", "GenericError", "Bus 'rp0' not found")
        with pytest.raises(BackendError) as refused:
            await backend.attach_volume(vm, VolumeSpec(uuid.uuid4(), read_only=False, path=raw_file(tmp_path)))
        assert refused.value.failure is BackendFailure.DEVICE_REJECTED
        assert "GenericError: Bus 'rp0' not found" in refused.value.detail
        assert monitor.commands()[-1] == "blockdev-del"
        assert monitor.nodes == set() and vm.nodes == set() and vm.record.devices == ()

    run_with_vm(runtime_dir, sleeper, scenario)


def test_a_refused_blockdev_add_plugs_nothing(runtime_dir: Path, sleeper: Any, tmp_path: Path) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        monitor.refuse["blockdev-add"] = CommandFailed("blockdev-add", "GenericError", "Could not open")
        with pytest.raises(BackendError) as refused:
            await backend.attach_volume(vm, VolumeSpec(uuid.uuid4(), read_only=False, path=raw_file(tmp_path)))
        assert refused.value.failure is BackendFailure.DEVICE_REJECTED
        assert "device_add" not in monitor.commands() and vm.record.devices == ()

    run_with_vm(runtime_dir, sleeper, scenario)


def descriptors_on(path: Path) -> int:
    """How many descriptors of this process are open on ``path``'s inode."""
    inode = os.stat(path).st_ino
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.stat(f"/proc/self/fd/{fd}").st_ino == inode
        except OSError:
            continue
    return count


def test_a_refused_file_blockdev_add_drops_the_fdset_and_the_descriptor(
    runtime_dir: Path, sleeper: Any, tmp_path: Path
) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        path = raw_file(tmp_path)
        monitor.refuse["blockdev-add"] = CommandFailed("blockdev-add", "GenericError", "Could not open")
        with pytest.raises(BackendError) as refused:
            await backend.attach_volume(vm, VolumeSpec(uuid.uuid4(), read_only=False, path=path))
        assert refused.value.failure is BackendFailure.DEVICE_REJECTED
        assert monitor.commands()[-3:] == ["add_fd", "blockdev-add", "remove-fd"]
        assert monitor.fdsets == {} and descriptors_on(path) == 0 and vm.record.devices == ()

        monitor.refuse["add_fd"] = CommandFailed("add-fd", "GenericError", "No file descriptor supplied")
        with pytest.raises(BackendError) as not_passed:
            await backend.attach_volume(vm, VolumeSpec(uuid.uuid4(), read_only=False, path=path))
        assert not_passed.value.failure is BackendFailure.DEVICE_REJECTED
        assert monitor.commands()[-1] == "add_fd" and descriptors_on(path) == 0 and vm.record.devices == ()

    run_with_vm(runtime_dir, sleeper, scenario)


def test_a_volume_path_that_is_not_a_plain_file_is_refused_without_blocking(
    runtime_dir: Path, sleeper: Any, tmp_path: Path
) -> None:
    """The path is opened once, without following links and without waiting; the opened object is checked."""
    link = tmp_path / "link"
    link.symlink_to(raw_file(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it O_RDONLY would block until a writer came, freezing the agent

    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        for path, read_only in ((link, False), (fifo, True), (fifo, False), (tmp_path, True)):
            with pytest.raises(BackendError) as refused:
                await asyncio.wait_for(backend.attach_volume(vm, VolumeSpec(uuid.uuid4(), read_only, path=path)), 5)
            assert refused.value.failure is BackendFailure.DEVICE_REJECTED, path
        assert monitor.calls == [] and vm.record.devices == ()

    run_with_vm(runtime_dir, sleeper, scenario)


def test_a_lost_answer_to_device_add_is_resolved_by_looking(runtime_dir: Path, sleeper: Any, tmp_path: Path) -> None:
    """A timeout leaves QEMU's state unknown; the backend looks, and keeps what is really there."""

    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        def plugged_but_silent(args: dict[str, Any]) -> Any:
            monitor.peripheral[args["id"]] = args["bus"]
            raise MonitorTimeout("device_add: no answer")

        monitor.on["device_add"] = plugged_but_silent
        volume_id = uuid.uuid4()
        await backend.attach_volume(vm, VolumeSpec(volume_id, read_only=False, path=raw_file(tmp_path)))
        assert vm.record.devices == (volume_device_id(volume_id),)

        def silent(args: dict[str, Any]) -> Any:
            raise MonitorTimeout("device_add: no answer")

        monitor.on["device_add"] = silent
        with pytest.raises(BackendError) as lost:
            await backend.attach_volume(vm, VolumeSpec(uuid.uuid4(), read_only=False, path=raw_file(tmp_path)))
        assert lost.value.failure is BackendFailure.TIMEOUT
        assert vm.record.devices == (volume_device_id(volume_id),) and monitor.commands()[-1] == "blockdev-del"

    run_with_vm(runtime_dir, sleeper, scenario)


def test_every_port_in_use_is_a_refusal(runtime_dir: Path, sleeper: Any, tmp_path: Path) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        await backend.attach_volume(vm, VolumeSpec(uuid.uuid4(), read_only=False, path=raw_file(tmp_path)))
        before = vm.record
        with pytest.raises(BackendError) as full:
            await backend.attach_vf(vm, VF)
        assert full.value.failure is BackendFailure.DEVICE_REJECTED and "in use" in full.value.detail
        assert vm.record == before

    run_with_vm(runtime_dir, sleeper, scenario, hotplug_ports=1)


def test_malformed_volumes_are_refused_before_qemu_hears_of_them(
    runtime_dir: Path, sleeper: Any, tmp_path: Path
) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        pipe_r, pipe_w = os.pipe()
        try:
            for volume in (
                VolumeSpec(uuid.uuid4(), read_only=False),
                VolumeSpec(uuid.uuid4(), read_only=False, path=raw_file(tmp_path), socket_fd=pipe_r),
                VolumeSpec(uuid.uuid4(), read_only=False, path=tmp_path / "missing"),
                VolumeSpec(uuid.uuid4(), read_only=False, path=tmp_path),  # a directory
                VolumeSpec(uuid.uuid4(), read_only=False, socket_fd=pipe_r),  # not a socket
                VolumeSpec(uuid.uuid4(), read_only=False, socket_fd=9999),  # not open
            ):
                with pytest.raises(BackendError) as refused:
                    await backend.attach_volume(vm, volume)
                assert refused.value.failure is BackendFailure.DEVICE_REJECTED
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
        assert monitor.calls == [] and vm.record.devices == ()

    run_with_vm(runtime_dir, sleeper, scenario)


def test_an_nbd_socket_is_passed_then_opened_by_name(runtime_dir: Path, sleeper: Any) -> None:
    volume_id = uuid.uuid4()

    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        a, b = socket.socketpair()
        with a, b:
            await backend.attach_volume(vm, VolumeSpec(volume_id, read_only=False, socket_fd=a.fileno()))
        fdname = next(args["fdname"] for c, args in monitor.calls if c == "pass_fd")
        blockdev = next(args for c, args in monitor.calls if c == "blockdev-add")
        assert blockdev["file"] == {"driver": "nbd", "server": {"type": "fd", "str": fdname}}
        assert monitor.commands().index("pass_fd") < monitor.commands().index("blockdev-add")

    run_with_vm(runtime_dir, sleeper, scenario)


def test_a_refused_nbd_blockdev_closes_the_named_descriptor(runtime_dir: Path, sleeper: Any) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        monitor.refuse["blockdev-add"] = CommandFailed("blockdev-add", "GenericError", "NBD handshake failed")
        a, b = socket.socketpair()
        with a, b, pytest.raises(BackendError):
            await backend.attach_volume(vm, VolumeSpec(uuid.uuid4(), read_only=False, socket_fd=a.fileno()))
        assert monitor.commands()[-1] == "closefd" and vm.record.devices == ()

    run_with_vm(runtime_dir, sleeper, scenario)


def test_detach_waits_for_the_guest_then_deletes_the_node(runtime_dir: Path, sleeper: Any, tmp_path: Path) -> None:
    volume_id = uuid.uuid4()

    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        await backend.attach_volume(vm, VolumeSpec(volume_id, read_only=False, path=raw_file(tmp_path)))
        await backend.detach_volume(vm, volume_id)
        assert vm.record.devices == () and monitor.peripheral == {} and monitor.nodes == set()
        assert monitor.commands()[-2:] == ["device_del", "blockdev-del"]
        with pytest.raises(BackendError) as absent:
            await backend.detach_volume(vm, volume_id)
        assert absent.value.failure is BackendFailure.DEVICE_REJECTED

    run_with_vm(runtime_dir, sleeper, scenario)


def test_an_unplug_the_guest_ignores_times_out_and_completes_later(
    runtime_dir: Path, sleeper: Any, tmp_path: Path
) -> None:
    volume_id = uuid.uuid4()
    device = volume_device_id(volume_id)

    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        await backend.attach_volume(vm, VolumeSpec(volume_id, read_only=False, path=raw_file(tmp_path)))
        monitor.guest_releases = False
        with pytest.raises(BackendError) as slow:
            await backend.detach_volume(vm, volume_id)
        assert slow.value.failure is BackendFailure.TIMEOUT
        assert vm.record.devices == (device,) and monitor.nodes == {volume_node_name(volume_id)}  # consistent

        # A retry while QEMU still has the unplug pending: QEMU refuses to repeat it; the backend waits.
        monitor.refuse["device_del"] = CommandFailed("device_del", "GenericError", "already in the process of unplug")
        with pytest.raises(BackendError) as again:
            await backend.detach_volume(vm, volume_id)
        assert again.value.failure is BackendFailure.TIMEOUT

        monitor.release(device)  # the guest lets go at last
        for _ in range(100):
            if not monitor.nodes:
                break
            await asyncio.sleep(0.01)
        assert vm.record.devices == () and monitor.nodes == set() and vm.nodes == set()

    run_with_vm(runtime_dir, sleeper, scenario, unplug_timeout_s=0.2)


# --- VFs ---------------------------------------------------------------------------------


def test_a_refused_vf_is_device_rejected_with_qemus_reason(runtime_dir: Path, sleeper: Any) -> None:
    desc = "vfio 0000:3b:00.1: no such host device: No such file or directory" + "!" * 5000

    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        monitor.refuse["device_add"] = CommandFailed("device_add", "GenericError", desc)
        with pytest.raises(BackendError) as refused:
            await backend.attach_vf(vm, VF)
        assert refused.value.failure is BackendFailure.DEVICE_REJECTED
        assert "GenericError: vfio 0000:3b:00.1: no such host device" in refused.value.detail
        assert len(refused.value.detail) <= 400
        device_add = next(args for c, args in monitor.calls if c == "device_add")
        assert device_add == {"driver": "vfio-pci", "host": "0000:3b:00.1", "id": "vf-0000-3b-00-1", "bus": "rp0"}
        assert vm.record.devices == ()

    run_with_vm(runtime_dir, sleeper, scenario)


def test_bad_vf_addresses_never_reach_qemu(runtime_dir: Path, sleeper: Any) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        with pytest.raises(BackendError) as refused:
            await backend.attach_vf(vm, PciAddress(0, 0, 0x20, 0))
        assert refused.value.failure is BackendFailure.DEVICE_REJECTED and monitor.calls == []

    run_with_vm(runtime_dir, sleeper, scenario)


# --- error mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (MonitorTimeout("x"), BackendFailure.TIMEOUT),
        (MonitorClosed("x"), BackendFailure.MONITOR_FAILED),  # QEMU alive: the monitor failed
        (MonitorProtocolError("x"), BackendFailure.MONITOR_FAILED),
        (CommandFailed("query-status", "GenericError", "x"), BackendFailure.MONITOR_FAILED),
    ],
)
def test_monitor_errors_map_to_backend_failures(
    runtime_dir: Path, sleeper: Any, error: Exception, failure: BackendFailure
) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        monitor.refuse["query-status"] = error  # type: ignore[assignment]
        with pytest.raises(BackendError) as mapped:
            await backend._execute(vm, "query-status")
        assert mapped.value.failure is failure and mapped.value.__cause__ is error

    run_with_vm(runtime_dir, sleeper, scenario)


def test_a_lost_monitor_of_an_ended_process_is_gone(runtime_dir: Path, sleeper: Any) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        monitor.refuse["query-status"] = MonitorClosed("eof")  # type: ignore[assignment]
        sleeper.send_signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.shield(vm.process_exited), 5)
        with pytest.raises(BackendError) as mapped:
            await backend._execute(vm, "query-status")
        assert mapped.value.failure is BackendFailure.GONE

    run_with_vm(runtime_dir, sleeper, scenario)


# --- pinning (the thread ids come from QEMU: hostile input) -------------------------------


def test_vcpu_threads_are_pinned_and_foreign_threads_refused(runtime_dir: Path, sleeper: Any) -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]

    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        monitor.on["query-cpus-fast"] = lambda _: [{"cpu-index": 0, "thread-id": os.getpid()}]
        with pytest.raises(MonitorProtocolError, match="not a thread of QEMU"):
            await backend._pin(vm, (cpu,))
        assert os.sched_getaffinity(0) != {cpu} or len(os.sched_getaffinity(0)) == 1  # we were not pinned
        monitor.on["query-cpus-fast"] = lambda _: [{"cpu-index": 0, "thread-id": vm.pid}, {"cpu-index": 1}]
        with pytest.raises(MonitorProtocolError):
            await backend._pin(vm, (cpu,))
        monitor.on["query-cpus-fast"] = lambda _: [{"cpu-index": 0, "thread-id": vm.pid}]
        await backend._pin(vm, (cpu,))
        assert os.sched_getaffinity(vm.pid) == {cpu}

    run_with_vm(runtime_dir, sleeper, scenario)


# --- stop and exit -----------------------------------------------------------------------


def test_an_ignored_power_button_falls_back_to_quit(runtime_dir: Path, sleeper: Any) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        monitor.on["quit"] = lambda _: sleeper.send_signal(signal.SIGTERM)
        await backend.stop(vm, StopMode.GRACEFUL, timeout_s=0.2)
        assert monitor.commands() == ["system_powerdown", "quit"]
        info = await backend.wait_exit(vm)
        assert info.requested and not info.guest_poweroff
        assert not runtime_dir.exists()  # scrubbed (C12)

    run_with_vm(runtime_dir, sleeper, scenario)


def test_a_guest_power_off_is_reported_as_such(runtime_dir: Path, sleeper: Any) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        vm.on_event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        sleeper.send_signal(signal.SIGTERM)
        info = await asyncio.wait_for(backend.wait_exit(vm), 5)
        assert info.instance_id == vm.instance_id and not info.requested and info.guest_poweroff
        assert sleeper.returncode is not None  # reaped
        await backend.stop(vm, StopMode.FORCE, timeout_s=1)  # no-op once ended
        with pytest.raises(BackendError) as gone:
            await backend.attach_vf(vm, VF)
        assert gone.value.failure is BackendFailure.GONE

    run_with_vm(runtime_dir, sleeper, scenario)


def test_force_skips_the_power_button_and_sigkill_is_the_last_resort(runtime_dir: Path, sleeper: Any) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        await backend.stop(vm, StopMode.FORCE, timeout_s=30)  # quit is ignored by the fake
        assert monitor.commands() == ["quit"]
        assert sleeper.returncode == -signal.SIGKILL

    run_with_vm(runtime_dir, sleeper, scenario, quit_timeout_s=0.2)


def test_a_detached_vm_cannot_be_driven_until_adopted(runtime_dir: Path, sleeper: Any) -> None:
    async def scenario(backend: QemuBackend, vm: QemuVm, monitor: FakeMonitor) -> None:
        waiter = asyncio.ensure_future(backend.wait_exit(vm))
        await backend.detach_monitors()
        with pytest.raises(BackendError) as detached:
            await waiter
        assert detached.value.failure is BackendFailure.MONITOR_FAILED
        for attempt in (backend.stop(vm, StopMode.FORCE, 1), backend.attach_vf(vm, VF)):
            with pytest.raises(BackendError) as refused:
                await attempt
            assert refused.value.failure is BackendFailure.MONITOR_FAILED
        assert sleeper.poll() is None and runtime_dir.exists()  # QEMU and its files untouched

    run_with_vm(runtime_dir, sleeper, scenario)


# --- adopt -------------------------------------------------------------------------------


def test_adopt_refuses_a_record_that_names_another_process(runtime_dir: Path, sleeper: Any) -> None:
    ticks = process.start_ticks(sleeper.pid)
    assert ticks is not None
    record = VmRecord(uuid.uuid4(), sleeper.pid, ticks + 1, runtime_dir, runtime_dir / "qmp.sock")

    async def scenario() -> None:
        backend = QemuBackend()
        with pytest.raises(BackendError) as reused:
            await backend.adopt(record)
        assert reused.value.failure is BackendFailure.GONE
        with pytest.raises(BackendError) as no_monitor:
            await backend.adopt(VmRecord(record.instance_id, sleeper.pid, ticks, runtime_dir))
        assert no_monitor.value.failure is BackendFailure.MONITOR_FAILED
        dead = subprocess.Popen(["true"])
        dead.wait()
        with pytest.raises(BackendError) as gone:
            await backend.adopt(VmRecord(record.instance_id, dead.pid, ticks, runtime_dir, record.monitor))
        assert gone.value.failure is BackendFailure.GONE

    asyncio.run(scenario())
    assert sleeper.poll() is None


def test_adopt_without_a_reconnection_fails_and_leaves_the_vm_alone(runtime_dir: Path, sleeper: Any) -> None:
    ticks = process.start_ticks(sleeper.pid)
    assert ticks is not None
    record = VmRecord(uuid.uuid4(), sleeper.pid, ticks, runtime_dir, runtime_dir / "qmp.sock")

    async def scenario() -> None:
        with pytest.raises(BackendError) as silent:
            await QemuBackend(adopt_timeout_s=0.3).adopt(record)
        assert silent.value.failure is BackendFailure.MONITOR_FAILED and "reconnect" in silent.value.detail

    asyncio.run(scenario())
    assert sleeper.poll() is None
    assert (runtime_dir / "console.log").read_bytes() == b"guest output\n"  # not scrubbed: the VM lives
    assert not (runtime_dir / "qmp.sock").exists()


# --- launch, without QEMU ----------------------------------------------------------------


def launch_spec(tmp_path: Path, **changes: Any) -> LaunchSpec:
    (tmp_path / "k").write_bytes(b"kernel")
    (tmp_path / "i").write_bytes(b"initrd")
    values: dict[str, Any] = {
        "instance_id": uuid.uuid4(), "vcpus": 1, "memory_mib": 128, "host_cpus": (0,), "kernel": tmp_path / "k",
        "initrd": tmp_path / "i", "cmdline": "console=ttyS0", "runtime_dir": tmp_path / "rt",
    }  # fmt: skip
    values.update(changes)
    return LaunchSpec(**values)


@pytest.mark.parametrize(
    ("binary", "changes", "message"),
    [
        ("no-such-qemu-binary", {}, "not found"),
        ("qemu-system-x86_64", {"host_cpus": (0, 1)}, "host CPUs"),
        ("qemu-system-x86_64", {"kernel": Path("/nonexistent/kernel")}, "not a file"),
    ],
)
def test_an_invalid_launch_creates_nothing(tmp_path: Path, binary: str, changes: dict[str, Any], message: str) -> None:
    spec = launch_spec(tmp_path, **changes)
    with pytest.raises(BackendError) as refused:
        asyncio.run(QemuBackend(binary).launch(spec))
    assert refused.value.failure is BackendFailure.LAUNCH_FAILED and message in refused.value.detail
    assert not spec.runtime_dir.exists()


def test_a_vmm_that_dies_at_once_is_a_clean_launch_failure(tmp_path: Path) -> None:
    script = tmp_path / "fake-qemu"
    script.write_text("#!/bin/sh\necho 'qemu: cannot do that' >&2\nexit 3\n")
    script.chmod(0o755)
    spec = launch_spec(tmp_path)
    with pytest.raises(BackendError) as failed:
        asyncio.run(QemuBackend(str(script)).launch(spec))
    assert failed.value.failure is BackendFailure.LAUNCH_FAILED
    assert "status 3" in failed.value.detail and "qemu: cannot do that" in failed.value.detail
    assert not spec.runtime_dir.exists()


def test_a_vmm_that_never_connects_times_out_and_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "fake-qemu"
    pid_file = tmp_path / "pid"
    script.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    script.chmod(0o755)
    spec = launch_spec(tmp_path)
    with pytest.raises(BackendError) as slow:
        asyncio.run(QemuBackend(str(script), launch_timeout_s=0.5).launch(spec))
    assert slow.value.failure is BackendFailure.TIMEOUT
    assert not spec.runtime_dir.exists()
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
