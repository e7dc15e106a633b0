"""The QEMU backend against real QEMU (TCG) and the real development guest.

Real components: ``qemu-system-x86_64`` (q35, TCG: nested KVM hangs guests on this machine kind), the
guest that ``controller.devhost.guest.build_guest`` builds (cached after the first run), and for the
NBD test ``nbdkit -s`` serving a raw file over one end of a socketpair. What the guest sees is read
from its serial console, which the backend writes to ``console.log`` in the VM's runtime directory.

Throughout, the agent side must never call connect(2) (claim C1): a fixture makes every Python-level
connect in this process fail the test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from controller.devhost.guest import GuestConsoleLine, GuestImage, GuestSignal, build_guest, parse_console_line
from hostagent.backend import BackendError, BackendFailure, LaunchSpec, VolumeSpec, volume_device_id
from hostagent.backends.console import LogFollower
from hostagent.backends.qemu import QemuBackend, QemuVm
from hostagent.wire.messages import PciAddress, StopMode

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(240)]

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT_S = 90.0
GUEST_TIMEOUT_S = 40.0  # hot-plug and PCIe native unplug (about 5 s) under TCG, with margin


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    return build_guest()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pvq-"))  # short: a Unix socket path has 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim C1: the agent side listens and accepts, it never connects."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"connect called with {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def make_spec(image: GuestImage, workdir: Path, vcpus: int = 1) -> LaunchSpec:
    cpus = sorted(os.sched_getaffinity(0))
    return LaunchSpec(
        instance_id=uuid.uuid4(),
        vcpus=vcpus,
        memory_mib=256,
        host_cpus=tuple(cpus[i % len(cpus)] for i in range(vcpus)) if vcpus <= len(cpus) else (),
        kernel=image.kernel,
        initrd=image.initramfs,
        cmdline=image.cmdline,
        runtime_dir=workdir / "vm",
    )


def raw_disk(path: Path, size: int = 8 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


class Console:
    """Follows the backend's console log and hands out the guest's protocol lines in order."""

    def __init__(self, vm: QemuVm) -> None:
        self.vm = vm
        self.path = vm.record.runtime_dir / "console.log"
        self._follower = LogFollower(self.path)
        self._lines: list[GuestConsoleLine] = []

    async def wait_for(
        self, signal: GuestSignal, timeout: float = GUEST_TIMEOUT_S, words: tuple[str, ...] | None = None
    ) -> GuestConsoleLine:
        return await self.wait_until(lambda line: line.signal is signal and (words is None or line.words == words),
                                     timeout, f"{signal.value} {words}")  # fmt: skip

    async def wait_until(
        self, match: Callable[[GuestConsoleLine], bool], timeout: float, what: str
    ) -> GuestConsoleLine:
        deadline = time.monotonic() + timeout
        while True:
            for raw in self._follower.poll():
                line = parse_console_line(raw.decode(errors="replace"))
                if line is not None:
                    self._lines.append(line)
            while self._lines:
                line = self._lines.pop(0)
                if match(line):
                    return line
            if time.monotonic() > deadline or self.vm.process_exited.done():
                text = self.path.read_text(errors="replace") if self.path.exists() else "(no log)"
                pytest.fail(f"no console line {what} within {timeout} s; log:\n{text[-4000:]}")
            await asyncio.sleep(0.05)


async def managed_devices_in_qemu(vm: QemuVm) -> list[str]:
    """Device ids under /machine/peripheral that a hot-plug would create, straight from QEMU."""
    children = await vm.monitor.execute("qom-list", {"path": "/machine/peripheral"}, timeout=10)
    return sorted(c["name"] for c in children if c["name"].startswith(("vol-", "vf-")))


def affinity_of_vcpus(vm: QemuVm) -> dict[int, set[int]]:
    """thread id -> CPU set, for the threads QEMU names "CPU n/TCG" (-name debug-threads=on)."""
    result = {}
    for tid in os.listdir(f"/proc/{vm.pid}/task"):
        name = Path(f"/proc/{vm.pid}/task/{tid}/comm").read_text().strip()
        if name.startswith("CPU "):
            result[int(tid)] = os.sched_getaffinity(int(tid))
    return result


def test_launch_hotplug_vf_refusal_and_graceful_stop(image: GuestImage, workdir: Path) -> None:
    spec = make_spec(image, workdir)
    timings: dict[str, float] = {}

    async def scenario() -> None:
        backend = QemuBackend(accel="tcg")
        t0 = time.monotonic()
        vm = await backend.launch(spec)
        timings["launch (QMP ready, pinned, cont)"] = time.monotonic() - t0
        record = vm.record
        assert record.pid == vm.pid and record.monitor == spec.runtime_dir / "qmp.sock"
        assert record.devices == ()
        # Live update needs QEMU outside the agent's session and process group (C10).
        assert os.getsid(record.pid) != os.getsid(0)
        assert os.getpgid(record.pid) != os.getpgid(0)
        assert list(affinity_of_vcpus(vm).values()) == [{spec.host_cpus[0]}]  # C9: pinned from outside
        assert os.sched_getaffinity(record.pid) == set(spec.host_cpus)  # emulator threads too

        console = Console(vm)
        await console.wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)
        timings["boot to PASSIVISOR-GUEST-READY"] = time.monotonic() - t0
        rng = await console.wait_for(GuestSignal.RNG)
        assert any(word.startswith("virtio_rng") for word in rng.words), rng  # C13
        await console.wait_for(GuestSignal.DISKS, words=())

        volume_id = uuid.uuid4()
        disk = raw_disk(workdir / "vol.raw")
        t1 = time.monotonic()
        await backend.attach_volume(vm, VolumeSpec(volume_id, read_only=False, path=disk))
        timings["attach_volume (QMP)"] = time.monotonic() - t1
        assert vm.record.devices == (volume_device_id(volume_id),)
        await console.wait_for(GuestSignal.DISKS, words=("vda",))
        timings["attach to guest lists vda"] = time.monotonic() - t1

        # A second attach of the same volume is refused and changes nothing.
        with pytest.raises(BackendError) as dup:
            await backend.attach_volume(vm, VolumeSpec(volume_id, read_only=False, path=disk))
        assert dup.value.failure is BackendFailure.DEVICE_REJECTED
        assert await managed_devices_in_qemu(vm) == [volume_device_id(volume_id)]

        t2 = time.monotonic()
        await backend.detach_volume(vm, volume_id)
        timings["detach_volume (DEVICE_DELETED)"] = time.monotonic() - t2
        assert vm.record.devices == ()
        await console.wait_for(GuestSignal.DISKS, words=())
        assert await managed_devices_in_qemu(vm) == []
        assert not any(n.startswith("nv") for n in await block_nodes(vm))  # blockdev-del ran

        # No VFIO hardware here: QEMU refuses, the error says why, and nothing stays plugged.
        with pytest.raises(BackendError) as refused:
            await backend.attach_vf(vm, PciAddress(0, 0x3B, 0, 1))
        assert refused.value.failure is BackendFailure.DEVICE_REJECTED
        assert "vfio" in refused.value.detail and len(refused.value.detail) <= 400
        assert vm.record.devices == ()
        assert await managed_devices_in_qemu(vm) == []
        with pytest.raises(BackendError) as absent:
            await backend.detach_vf(vm, PciAddress(0, 0x3B, 0, 1))
        assert absent.value.failure is BackendFailure.DEVICE_REJECTED

        exit_waiter = asyncio.ensure_future(backend.wait_exit(vm))
        t3 = time.monotonic()
        await backend.stop(vm, StopMode.GRACEFUL, timeout_s=30)
        timings["graceful stop"] = time.monotonic() - t3
        info = await asyncio.wait_for(exit_waiter, 10)
        assert info.instance_id == spec.instance_id
        assert info.requested and info.guest_poweroff  # the guest honoured the ACPI power button
        assert not Path(f"/proc/{record.pid}").exists()  # reaped, not a zombie
        assert not spec.runtime_dir.exists()  # console log and sockets scrubbed (C12)
        await backend.stop(vm, StopMode.FORCE, timeout_s=1)  # stopping a stopped VM is a no-op
        with pytest.raises(BackendError) as gone:
            await backend.attach_vf(vm, PciAddress(0, 0x3B, 0, 1))
        assert gone.value.failure is BackendFailure.GONE

    asyncio.run(scenario())
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.2f} s")


async def block_nodes(vm: QemuVm) -> list[str]:
    nodes = await vm.monitor.execute("query-named-block-nodes", {"flat": True}, timeout=10)
    return [n["node-name"] for n in nodes]


def test_live_update_detach_adopt_and_stop(image: GuestImage, workdir: Path) -> None:
    spec = make_spec(image, workdir, vcpus=min(2, len(os.sched_getaffinity(0))))

    async def scenario() -> None:
        first = QemuBackend(accel="tcg")
        vm = await first.launch(spec)
        assert sorted(map(sorted, affinity_of_vcpus(vm).values())) == [[cpu] for cpu in sorted(spec.host_cpus)]
        console = Console(vm)
        await console.wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)
        volume_id = uuid.uuid4()
        await first.attach_volume(vm, VolumeSpec(volume_id, read_only=True, path=raw_disk(workdir / "ro.raw")))
        await console.wait_for(GuestSignal.DISKS, words=("vda",))
        record = vm.record
        orphaned_wait = asyncio.ensure_future(first.wait_exit(vm))

        # The agent "dies": its connections close, QEMU and the guest carry on.
        await first.detach_monitors()
        with pytest.raises(BackendError) as detached:
            await orphaned_wait
        assert detached.value.failure is BackendFailure.MONITOR_FAILED
        with pytest.raises(BackendError):
            await first.stop(vm, StopMode.FORCE, timeout_s=1)
        assert Path(f"/proc/{record.pid}").exists()

        # A journal entry whose start time does not match is not this process: refused, QEMU untouched.
        second = QemuBackend(accel="tcg")
        with pytest.raises(BackendError) as stale:
            await second.adopt(replace(record, pid_start_ticks=record.pid_start_ticks + 1))
        assert stale.value.failure is BackendFailure.GONE

        t0 = time.monotonic()
        adopted = await second.adopt(record)
        print(f"adopt (QEMU reconnects its monitor): {time.monotonic() - t0:.2f} s")
        assert adopted.record == record  # same pid, start time, paths, and the plugged volume
        # The guest kept running and its console reaches the new agent.
        follow = Console(adopted)
        follow._follower.poll()  # skip what the first agent wrote
        await follow.wait_for(GuestSignal.DISKS, words=("vda",))

        await second.detach_volume(adopted, volume_id)
        await follow.wait_for(GuestSignal.DISKS, words=())
        t1 = time.monotonic()
        await second.stop(adopted, StopMode.GRACEFUL, timeout_s=30)
        print(f"graceful stop after adopt: {time.monotonic() - t1:.2f} s")
        info = await asyncio.wait_for(second.wait_exit(adopted), 10)
        assert info.requested and info.guest_poweroff
        assert not spec.runtime_dir.exists()

    asyncio.run(scenario())


def test_forced_stop_quits_at_once(image: GuestImage, workdir: Path) -> None:
    spec = make_spec(image, workdir)

    async def scenario() -> None:
        backend = QemuBackend(accel="tcg")
        vm = await backend.launch(spec)
        await Console(vm).wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)
        t0 = time.monotonic()
        await backend.stop(vm, StopMode.FORCE, timeout_s=30)
        elapsed = time.monotonic() - t0
        info = await backend.wait_exit(vm)
        assert info.requested and not info.guest_poweroff
        assert elapsed < 5, elapsed
        assert not spec.runtime_dir.exists()

    asyncio.run(scenario())


def test_failed_launch_leaves_no_process_and_no_files(image: GuestImage, workdir: Path) -> None:
    not_a_kernel = workdir / "bogus-kernel"
    not_a_kernel.write_bytes(b"this is not a bzImage\n" * 100)
    spec = replace(make_spec(image, workdir), kernel=not_a_kernel)

    async def scenario() -> None:
        backend = QemuBackend(accel="tcg")
        with pytest.raises(BackendError) as failed:
            await backend.launch(spec)
        assert failed.value.failure is BackendFailure.LAUNCH_FAILED
        # QEMU's own words reach the error: "status 1; qemu: linux kernel too old to load a ram disk".
        assert "QEMU exited during launch: status 1; qemu" in failed.value.detail
        assert not spec.runtime_dir.exists()
        leftovers = subprocess.run(["pgrep", "-f", str(spec.runtime_dir)], capture_output=True, text=True)
        assert leftovers.stdout == ""

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit is not installed (Debian package nbdkit)")
def test_nbd_volume_over_a_passed_socket(image: GuestImage, workdir: Path) -> None:
    """The encrypted-volume data path's QEMU half: an NBD socket passed with SCM_RIGHTS and getfd."""
    spec = make_spec(image, workdir)
    disk = raw_disk(workdir / "nbd.raw")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = subprocess.Popen(["nbdkit", "-s", "--exit-with-parent", "file", str(disk)], stdin=theirs, stdout=theirs)
    theirs.close()

    async def scenario() -> None:
        backend = QemuBackend(accel="tcg")
        vm = await backend.launch(spec)
        try:
            console = Console(vm)
            await console.wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)
            await console.wait_for(GuestSignal.DISKS, words=())
            volume_id = uuid.uuid4()
            await backend.attach_volume(vm, VolumeSpec(volume_id, read_only=False, socket_fd=ours.fileno()))
            await console.wait_for(GuestSignal.DISKS, words=("vda",))
            await backend.detach_volume(vm, volume_id)
            await console.wait_for(GuestSignal.DISKS, words=())
        finally:
            await backend.stop(vm, StopMode.FORCE, timeout_s=10)

    try:
        asyncio.run(scenario())
    finally:
        ours.close()
        server.wait(timeout=30)
