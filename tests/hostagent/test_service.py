"""The agent's service layer in process: VF assignment against a fabricated sysfs tree.

No SR-IOV hardware exists here (DESIGN.md), so the PF and its VFs live in a
fabricated sysfs tree driven by tests/inventory/fakesysfs.FakeKernel, which
applies the kernel's bind/unbind semantics.  The VMM is the sim backend, which
refuses a vfio-pci device exactly like QEMU on this host unless told VFIO is
available.  The QEMU refusal itself is covered by tests/integration/test_vf_qemu.py.
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from inventory.fakesysfs import FakeKernel, FakePciHost, write_cpu_tree

from hostagent import state as state_module
from hostagent import wire
from hostagent.backends.sim import SimBackend
from hostagent.images import ImageStore, PublishedImage, publish
from hostagent.inventory import allocator as alloc
from hostagent.inventory import cpu, sriov
from hostagent.journal import Journal
from hostagent.service import AgentService
from hostagent.state import AgentState
from hostagent.wire import messages as m

PF, VF0, VF1 = "0000:03:00.0", "0000:03:00.1", "0000:03:00.2"
MAC = b"\x02\x00\x00\x00\x00\x07"
MAC2, MAC3 = b"\x02\x00\x00\x00\x00\x08", b"\x02\x00\x00\x00\x00\x09"


@dataclass
class Host:
    service: AgentService
    pci: FakePciHost
    kernel: FakeKernel
    image: PublishedImage
    journal: Journal


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    pci = FakePciHost(tmp_path / "sys")
    pci.add_driver("vfio-pci")
    pci.add_pf(PF, [VF0, VF1])
    kernel = FakeKernel(pci)
    topology = cpu.read_topology(write_cpu_tree(tmp_path / "cpus", [[0, 1], [2, 3], [4, 5]]))
    key = Ed25519PrivateKey.generate()
    (tmp_path / "images").mkdir()
    image = publish(tmp_path / "images", b"kernel", b"initrd", "console=ttyS0", key)
    journal = Journal(tmp_path / "state")
    journal.directory.mkdir()
    for name in ("run", "volumes"):
        (tmp_path / name).mkdir()
    service = AgentService(
        state=AgentState(), journal=journal, backend=SimBackend(),
        allocator=alloc.CoreAllocator(topology, memory_budget_mib=4096, reserved_cpus=[0]),
        vf_pool=sriov.VfPool(sriov.discover_pfs(kernel)), vf_binder=sriov.SysfsVfBinder(kernel, reprobe=True),
        images=ImageStore(tmp_path / "images", key.public_key()),
        volume_dir=tmp_path / "volumes", runtime_root=tmp_path / "run")
    yield Host(service, pci, kernel, image, journal)
    for instance in service.state.instances():
        if instance.vm is not None:
            asyncio.run(SimBackend().stop(_adopted(instance.vm), m.StopMode.FORCE, 1))


def _adopted(record: object) -> object:
    from hostagent.backends.sim import SimVm

    assert not isinstance(record, SimVm)
    return SimVm(record)  # type: ignore[arg-type]


def pci(text: str) -> m.PciAddress:
    return sriov.parse_bdf(text)


async def started(host: Host) -> uuid.UUID:
    iid = uuid.uuid4()
    answer = await host.service.handle(m.StartInstance(iid, 2, 256, host.image.digest, host.image.signature))
    assert isinstance(answer, m.InstanceInfo) and answer.state is m.InstanceState.RUNNING
    return iid


def observed(host: Host) -> tuple[object, ...]:
    """Everything a refused assignment must leave untouched."""
    return (host.pci.state(), host.service.vf_pool.snapshot(), host.service.state.instances(),
            host.journal.path.read_bytes())


def test_a_vf_the_vmm_refuses_is_unbound_and_returned(host: Host) -> None:
    async def scenario() -> None:
        iid = await started(host)
        before = observed(host)
        answer = await host.service.handle(m.AssignVf(iid, pci(PF), MAC, 0))
        assert answer == m.Error(m.ErrorCode.DEVICE_REJECTED)
        assert observed(host) == before
        # The binder really did bind the VF to vfio-pci before the VMM refused it:
        attempted = [(path, data) for path, data in host.kernel.writes if path.endswith("vfio-pci/bind")]
        assert attempted == [("bus/pci/drivers/vfio-pci/bind", VF0)]
        assert host.pci.driver_of(VF0) == "iavf"

    asyncio.run(scenario())


def test_assign_binds_to_vfio_and_release_gives_it_back(host: Host) -> None:
    host.service.backend = SimBackend(vfio_available=True)

    async def scenario() -> None:
        iid = await started(host)
        answer = await host.service.handle(m.AssignVf(iid, pci(PF), MAC, 42))
        assert answer == m.VfStatus(iid, pci(VF0), 0, m.VfState.ASSIGNED)
        assert host.pci.driver_of(VF0) == "vfio-pci" and host.pci.override_of(VF0) == "vfio-pci"
        info = await host.service.handle(m.DescribeInstance(iid))
        assert isinstance(info, m.InstanceInfo) and info.vfs == (pci(VF0),)
        second = await host.service.handle(m.AssignVf(iid, pci(PF), MAC2, 42))
        assert second == m.VfStatus(iid, pci(VF1), 1, m.VfState.ASSIGNED)
        before = observed(host)
        assert await host.service.handle(m.AssignVf(iid, pci(PF), MAC3, 42)) == m.Error(m.ErrorCode.NO_FREE_VF)
        assert observed(host) == before
        released = await host.service.handle(m.ReleaseVf(iid, pci(VF0)))
        assert released == m.VfStatus(iid, pci(VF0), 0, m.VfState.RELEASED)
        assert host.pci.driver_of(VF0) != "vfio-pci" and host.pci.override_of(VF0) is None
        assert host.service.vf_pool.snapshot().vfs_free == 1

    asyncio.run(scenario())


def test_a_start_beyond_the_instance_bound_says_so_and_changes_nothing(host: Host,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound on instance records is its own refusal, not INSUFFICIENT_CORES (the host has cores left)."""
    monkeypatch.setattr(state_module, "MAX_INSTANCES", 1)

    async def scenario() -> None:
        await started(host)
        before = observed(host)
        command = m.StartInstance(uuid.uuid4(), 2, 256, host.image.digest, host.image.signature)
        assert await host.service.handle(command) == m.Error(m.ErrorCode.TOO_MANY_INSTANCES)
        assert observed(host) == before

    asyncio.run(scenario())


def _numbered(n: int) -> uuid.UUID:
    """The n-th of a family of RFC 9562 UUIDs, increasing with n (in bytes, as the wire orders them)."""
    return uuid.UUID(f"{n:08x}-0000-4000-8000-000000000000")


def _summary_ids(answer: m.Message) -> list[uuid.UUID]:
    assert isinstance(answer, m.InstanceList)
    wire.encode(wire.Frame(1, answer, bytes(m.MAC_SIZE)))  # a page the codec accepts: ordered, `more` only if full
    return [s.instance_id for s in answer.instances]


def test_listing_pages_with_a_cursor(host: Host) -> None:
    """150 records come back in 3 pages of at most 64, in id order, each after the cursor it was asked for."""
    ids = [_numbered(2 * n + 2) for n in range(150)]  # even numbers: the odd ones name no instance
    host.service.state = AgentState(state_module.Instance(iid, m.InstanceState.STOPPED, 2, 256, bytes(32))
                                    for iid in ids)

    async def scenario() -> None:
        walked: list[uuid.UUID] = []
        cursor: uuid.UUID | None = None
        pages = []
        while True:
            answer = await host.service.handle(m.ListInstances(cursor))
            assert isinstance(answer, m.InstanceList)
            page = _summary_ids(answer)
            pages.append((len(page), answer.more))
            walked += page
            if not answer.more:
                break
            cursor = page[-1]
        assert pages == [(64, True), (64, True), (22, False)]
        assert walked == ids
        # The nil cursor is the first page; a cursor naming no instance lists from where it would sort.
        assert _summary_ids(await host.service.handle(m.ListInstances(None))) == ids[:64]
        after_gap = await host.service.handle(m.ListInstances(_numbered(2 * 99 + 3)))
        assert _summary_ids(after_gap) == ids[100:] and isinstance(after_gap, m.InstanceList) and not after_gap.more
        assert await host.service.handle(m.ListInstances(ids[-1])) == m.InstanceList(False, ())

    asyncio.run(scenario())


def test_the_1025th_start_is_refused_and_changes_nothing(host: Host) -> None:
    """At the real bound (1024 records, none of them forgettable), a start is TOO_MANY_INSTANCES."""
    assert state_module.MAX_INSTANCES == 1024
    host.service.state = AgentState(state_module.Instance(uuid.uuid4(), m.InstanceState.RUNNING, 2, 256, bytes(32))
                                    for _ in range(1024))

    async def scenario() -> None:
        before = (host.service.state.instances(), host.journal.path.exists(), host.service.allocator.snapshot())
        command = m.StartInstance(uuid.uuid4(), 2, 256, host.image.digest, host.image.signature)
        assert await host.service.handle(command) == m.Error(m.ErrorCode.TOO_MANY_INSTANCES)
        after = (host.service.state.instances(), host.journal.path.exists(), host.service.allocator.snapshot())
        assert after == before

    asyncio.run(scenario())


def test_a_repeated_assignment_answers_with_the_vf_already_held(host: Host) -> None:
    """A retry whose first answer was lost (same PF, MAC, VLAN) gets the same VF; nothing else changes."""
    host.service.backend = SimBackend(vfio_available=True)

    async def scenario() -> None:
        iid = await started(host)
        first = await host.service.handle(m.AssignVf(iid, pci(PF), MAC, 42))
        assert first == m.VfStatus(iid, pci(VF0), 0, m.VfState.ASSIGNED)
        before, events = observed(host), len(host.service.state.events.events)
        assert await host.service.handle(m.AssignVf(iid, pci(PF), MAC, 42)) == first
        assert observed(host) == before and len(host.service.state.events.events) == events
        refused = await host.service.handle(m.AssignVf(iid, pci(PF), MAC, 43))  # the same MAC on another VLAN
        assert refused == m.Error(m.ErrorCode.INVALID_STATE)
        assert observed(host) == before

    asyncio.run(scenario())


def test_stopping_an_instance_releases_its_vfs(host: Host) -> None:
    host.service.backend = SimBackend(vfio_available=True)

    async def scenario() -> None:
        iid = await started(host)
        await host.service.handle(m.AssignVf(iid, pci(PF), MAC, 0))
        stopped = await host.service.handle(m.StopInstance(iid, m.StopMode.FORCE, 0))
        assert isinstance(stopped, m.InstanceInfo) and stopped.vfs == () and stopped.host_cpus == ()
        assert host.pci.driver_of(VF0) != "vfio-pci"
        assert host.service.vf_pool.snapshot().vfs_free == 2

    asyncio.run(scenario())


def test_a_failed_bind_is_rolled_back(host: Host) -> None:
    host.service.backend = SimBackend(vfio_available=True)

    async def scenario() -> None:
        iid = await started(host)
        before = observed(host)
        host.kernel.fail_path("bus/pci/drivers/vfio-pci/bind", errno.EIO)
        assert await host.service.handle(m.AssignVf(iid, pci(PF), MAC, 0)) == m.Error(m.ErrorCode.DEVICE_REJECTED)
        assert observed(host) == before

    asyncio.run(scenario())


@pytest.mark.parametrize(("command", "code"), [
    (lambda iid: m.AssignVf(iid, pci("0000:09:00.0"), MAC, 0), m.ErrorCode.PF_NOT_FOUND),
    (lambda iid: m.ReleaseVf(iid, pci(VF1)), m.ErrorCode.VF_NOT_ASSIGNED),
    (lambda iid: m.AssignVf(uuid.uuid4(), pci(PF), MAC, 0), m.ErrorCode.UNKNOWN_INSTANCE),
])
def test_vf_refusals_change_nothing(host: Host, command: object, code: m.ErrorCode) -> None:
    async def scenario() -> None:
        iid = await started(host)
        before = observed(host)
        assert callable(command)
        assert await host.service.handle(command(iid)) == m.Error(code)
        assert observed(host) == before

    asyncio.run(scenario())


def test_a_start_that_cannot_be_placed_changes_nothing(host: Host) -> None:
    async def scenario() -> None:
        await started(host)
        before = observed(host)
        for vcpus, code in ((3, m.ErrorCode.INSUFFICIENT_CORES), (6, m.ErrorCode.INSUFFICIENT_CORES)):
            command = m.StartInstance(uuid.uuid4(), vcpus, 256, host.image.digest, host.image.signature)
            assert await host.service.handle(command) == m.Error(code)
        command = m.StartInstance(uuid.uuid4(), 2, 8192, host.image.digest, host.image.signature)
        assert await host.service.handle(command) == m.Error(m.ErrorCode.INSUFFICIENT_MEMORY)
        assert observed(host) == before
        assert list((host.service.runtime_root).iterdir()) == [host.service.runtime_root / before[2][0].instance_id.hex]

    asyncio.run(scenario())
