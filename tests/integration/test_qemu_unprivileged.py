"""QEMU as an unprivileged user (claim C15), against real QEMU (TCG) and the real development guest.

Real components: ``qemu-system-x86_64`` started by :class:`QemuBackend` with ``run_as`` set, the guest that
``controller.devhost.guest.build_guest`` builds, and ``/bin/sh`` run as QEMU's identity to probe the
permission model from QEMU's side. The backend runs in this (root) process, as it does in the agent.

The layout is the agent's: a runtime root prepared by ``prepare_runtime_root``, a 0700 runtime directory
holding 0600 copies of the kernel and initrd (as the image store leaves them), and volume files in a
0700 directory of their own that QEMU's user cannot enter: QEMU gets volumes as open descriptors.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_qemu_backend import (
    BOOT_TIMEOUT_S,
    Console,
    affinity_of_vcpus,
    managed_devices_in_qemu,
    no_connect,  # noqa: F401 - autouse: the agent side never connects (C1)
)

from controller.devhost.guest import GuestImage, GuestSignal, build_guest
from hostagent.backend import LaunchSpec, VolumeSpec, volume_device_id
from hostagent.backends.qemu import QemuBackend, QemuVm, RunAs
from hostagent.wire.messages import StopMode

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting QEMU as another user needs root, as the agent has"),
]

QEMU = shutil.which("qemu-system-x86_64")
PATTERN = 0xA5


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    return build_guest()


@pytest.fixture(scope="module")
def ids() -> RunAs:
    """``passivisor-qemu`` when ``make deps`` created it; else ids no account uses (the backend needs no name)."""
    try:
        return RunAs.lookup("passivisor-qemu")
    except KeyError:
        uid = 61_000
        while uid in {e.pw_uid for e in pwd.getpwall()} or uid in {g.gr_gid for g in grp.getgrall()}:
            uid += 1
        return RunAs(uid, uid, name="unnamed")


@pytest.fixture
def host() -> Iterator[Path]:
    """A short scratch directory (Unix socket paths have 108 bytes) holding ``run/`` and ``volumes/``."""
    path = Path(tempfile.mkdtemp(prefix="pvu-"))
    path.chmod(0o711)  # like /run: anyone may pass through to the runtime root, nobody may list it
    for name in ("run", "volumes"):
        (path / name).mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_like_spec(image: GuestImage, run: Path) -> LaunchSpec:
    runtime_dir = run / uuid.uuid4().hex
    runtime_dir.mkdir(mode=0o700)
    for name, source in (("kernel", image.kernel), ("initrd", image.initramfs)):
        shutil.copyfile(source, runtime_dir / name)
        (runtime_dir / name).chmod(0o600)
    return LaunchSpec(uuid.uuid4(), 1, 256, (sorted(os.sched_getaffinity(0))[0],), runtime_dir / "kernel",
                      runtime_dir / "initrd", image.cmdline, runtime_dir)  # fmt: skip


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def as_qemu(ids: RunAs, *probes: str) -> list[str]:
    """Run each shell probe as QEMU's identity (uid, gid, supplementary groups); "ok" or "denied" each."""
    script = 'for p in "$@"; do if sh -c "$p" >/dev/null 2>&1; then echo ok; else echo denied; fi; done'
    done = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *probes],
        user=ids.uid, group=ids.gid, extra_groups=list(ids.groups),
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return done.stdout.split()


def files_held(pid: int) -> list[str]:
    """What the descriptors of ``pid`` name."""
    return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]


async def qemu_io(vm: QemuVm, volume_id: uuid.UUID, command: str) -> str:
    """Run a qemu-io command on a plugged volume's block backend, from inside QEMU (HMP over QMP).

    The answer holds only a refusal; what qemu-io prints goes to QEMU's stdout.
    """
    device = f"/machine/peripheral/{volume_device_id(volume_id)}/virtio-backend"
    line = f'qemu-io -d {device} "{command}"'
    said = await vm.monitor.execute("human-monitor-command", {"command-line": line}, timeout=20)
    return str(said)


def test_qemu_runs_unprivileged_and_still_boots_pins_and_takes_volumes(
    image: GuestImage, ids: RunAs, host: Path
) -> None:
    run, volumes = host / "run", host / "volumes"
    backend = QemuBackend(accel="tcg", run_as=ids)
    backend.prepare_runtime_root(run)
    spec = agent_like_spec(image, run)
    (run / "secret").write_bytes(b"not QEMU's business")
    (run / "secret").chmod(0o640)  # even readable by root's group: QEMU is not in it
    disk = volumes / "disk.raw"
    with disk.open("wb") as blank:
        blank.truncate(8 << 20)
    disk.chmod(0o600)

    async def scenario() -> None:
        vm = await backend.launch(spec)
        try:
            # The kernel's view of QEMU: real, effective, saved and filesystem ids, no other group, no
            # capability (C15).
            status = status_fields(vm.pid)
            assert status["Uid"].split() == [str(ids.uid)] * 4, status["Uid"]
            assert status["Gid"].split() == [str(ids.gid)] * 4, status["Gid"]
            assert status["Groups"].split() == [str(g) for g in ids.groups]
            assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
            # Pinning is done by the (root) agent on another user's threads (C9).
            assert list(affinity_of_vcpus(vm).values()) == [{spec.host_cpus[0]}]
            assert os.sched_getaffinity(vm.pid) == set(spec.host_cpus)

            console = Console(vm)
            await console.wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)
            await console.wait_for(GuestSignal.DISKS, words=())

            # What QEMU's user may do, probed from its side while QEMU runs.
            rt = spec.runtime_dir
            assert (
                as_qemu(
                    ids,
                    f"cat {rt}/kernel {rt}/initrd",  # its image: yes
                    f"test -w {rt}/console.sock",  # its console socket: yes (connect needs write)
                    f"ls {rt}",  # list its runtime directory: no
                    f"touch {rt}/planted",  # create anything there: no
                    f"cat {rt}/qemu.log",  # its own log by path: no (it writes through a descriptor)
                    f"cat {rt}/console.log",  # the guest's console log: no (the agent writes it)
                    f"ls {run}",  # list the runtime root (other instances): no
                    f"cat {run}/secret",  # a file beside the runtime directories: no
                    f"cat {disk}",  # the volume file by its path: no
                )
                == ["ok", "ok"] + ["denied"] * 7
            )

            # A raw volume QEMU cannot open by path is attached through a passed descriptor...
            volume_id = uuid.uuid4()
            await backend.attach_volume(vm, VolumeSpec(volume_id, read_only=False, path=disk))
            await console.wait_for(GuestSignal.DISKS, words=("vda",))
            assert await managed_devices_in_qemu(vm) == [volume_device_id(volume_id)]
            # ... and QEMU writes through it to the host file.
            said = await qemu_io(vm, volume_id, f"write -P {PATTERN:#x} 4096 512")  # qemu-io reports to qemu.log
            assert said == "", said
            with disk.open("rb") as f:
                f.seek(4096)
                assert f.read(512) == bytes([PATTERN]) * 512
            assert await vm.monitor.execute("query-fdsets", timeout=10) == [{"fdset-id": 0, "fds": []}]

            await backend.detach_volume(vm, volume_id)
            await console.wait_for(GuestSignal.DISKS, words=())
            assert await managed_devices_in_qemu(vm) == []
            # The block node's descriptor closed with it, and QEMU freed the fdset: no reference is left.
            assert await vm.monitor.execute("query-fdsets", timeout=10) == []
            assert str(disk) not in files_held(vm.pid)

            # A read-only volume gets a read-only descriptor: QEMU cannot write even if it tried.
            ro_id = uuid.uuid4()
            await backend.attach_volume(vm, VolumeSpec(ro_id, read_only=True, path=disk))
            await console.wait_for(GuestSignal.DISKS, words=("vda",))
            assert files_held(vm.pid).count(str(disk)) == 1  # the block node's; the fdset's copy is gone
            refused = await qemu_io(vm, ro_id, "write -P 0 4096 512")
            assert "read-only" in refused, refused
            await backend.detach_volume(vm, ro_id)
            await console.wait_for(GuestSignal.DISKS, words=())
        finally:
            t0 = time.monotonic()
            await backend.stop(vm, StopMode.GRACEFUL, timeout_s=30)
            print(f"graceful stop: {time.monotonic() - t0:.2f} s")
        assert not spec.runtime_dir.exists()  # scrubbed by the agent, which owns every file (C12)

    asyncio.run(scenario())
    with disk.open("rb") as f:
        f.seek(4096)
        assert f.read(512) == bytes([PATTERN]) * 512  # the read-only attachment changed nothing


def test_adopt_lets_the_unprivileged_qemu_reconnect(image: GuestImage, ids: RunAs, host: Path) -> None:
    """Live update (C10): the sockets a new agent binds must again be reachable by QEMU's group."""
    run = host / "run"
    first = QemuBackend(accel="tcg", run_as=ids)
    first.prepare_runtime_root(run)
    spec = agent_like_spec(image, run)

    async def scenario() -> None:
        vm = await first.launch(spec)
        await Console(vm).wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)
        record = vm.record
        await first.detach_monitors()
        second = QemuBackend(accel="tcg", run_as=ids)
        adopted = await second.adopt(record)
        follow = Console(adopted)
        follow._follower.poll()  # skip what the first backend wrote
        await follow.wait_for(GuestSignal.DISKS, words=())  # the console reconnected too
        assert status_fields(adopted.pid)["Uid"].split() == [str(ids.uid)] * 4
        await second.stop(adopted, StopMode.FORCE, timeout_s=10)
        assert not spec.runtime_dir.exists()

    asyncio.run(scenario())
