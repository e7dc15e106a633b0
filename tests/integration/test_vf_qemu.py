"""VF assignment against a fabricated sysfs tree, refused by a real QEMU (TCG).

No SR-IOV hardware or VFIO device exists here (DESIGN.md), so the PF and its
VFs live in a fabricated sysfs tree whose bind/unbind semantics come from
tests/inventory/fakesysfs.FakeKernel, and the VMM is real QEMU, which refuses
``device_add vfio-pci`` because the host device does not exist.  The agent
must roll back: the VF goes back to its host driver, returns to the pool, and
the instance, the journal and the guest are as before.  The agent's service
runs in this process so that the fake kernel sees its sysfs writes.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from inventory.fakesysfs import FakeKernel, FakePciHost

from controller.devhost.guest import build_guest
from hostagent.backends.qemu import QemuBackend
from hostagent.images import ImageStore, publish
from hostagent.inventory import allocator as alloc
from hostagent.inventory import cpu, sriov
from hostagent.journal import Journal
from hostagent.service import AgentService
from hostagent.state import AgentState
from hostagent.wire import messages as m

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="QEMU is installed by `make test` (Debian qemu-system-x86)"),
]

PF, VF = "0000:03:00.0", "0000:03:00.1"


@pytest.fixture
def runtime_root() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pv-vf-"))  # short: instance sockets live below it
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_a_vf_qemu_refuses_is_rolled_back(tmp_path: Path, runtime_root: Path) -> None:
    pci = FakePciHost(tmp_path / "sys")
    pci.add_driver("vfio-pci")
    pci.add_pf(PF, [VF])
    kernel = FakeKernel(pci)
    guest = build_guest()
    key = Ed25519PrivateKey.generate()
    (tmp_path / "images").mkdir()
    image = publish(tmp_path / "images", guest.kernel, guest.initramfs, guest.cmdline, key)
    journal = Journal(tmp_path / "state")
    journal.directory.mkdir()
    service = AgentService(
        state=AgentState(), journal=journal, backend=QemuBackend(accel="tcg"),
        allocator=alloc.CoreAllocator(cpu.read_topology(), memory_budget_mib=1024, reserved_cpus=[]),
        vf_pool=sriov.VfPool(sriov.discover_pfs(kernel)), vf_binder=sriov.SysfsVfBinder(kernel, reprobe=True),
        images=ImageStore(tmp_path / "images", key.public_key()), volume_dir=tmp_path, runtime_root=runtime_root)

    async def scenario() -> None:
        iid = uuid.uuid4()
        info = await service.handle(m.StartInstance(iid, 1, 256, image.digest, image.signature))
        assert isinstance(info, m.InstanceInfo) and info.state is m.InstanceState.RUNNING
        try:
            before = (pci.state(), service.vf_pool.snapshot(), service.state.instances(), journal.path.read_bytes())
            answer = await service.handle(m.AssignVf(iid, sriov.parse_bdf(PF), b"\x02\x00\x00\x00\x00\x09", 0))
            assert answer == m.Error(m.ErrorCode.DEVICE_REJECTED)
            after = (pci.state(), service.vf_pool.snapshot(), service.state.instances(), journal.path.read_bytes())
            assert after == before
            # The VF really was bound to vfio-pci before QEMU refused it, and was given back:
            assert ("bus/pci/drivers/vfio-pci/bind", VF) in kernel.writes
            assert pci.driver_of(VF) == "iavf"
            # The guest is unaffected: still running, no VF in its device list.
            described = await service.handle(m.DescribeInstance(iid))
            assert isinstance(described, m.InstanceInfo)
            assert described.state is m.InstanceState.RUNNING and described.vfs == ()
        finally:
            stopped = await service.handle(m.StopInstance(iid, m.StopMode.FORCE, 0))
            assert isinstance(stopped, m.InstanceInfo) and stopped.state is m.InstanceState.STOPPED

    asyncio.run(scenario())
